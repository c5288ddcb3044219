"""diffusers LoRA: one safetensors file with PEFT keys under a component prefix, as ``save_lora_weights`` writes.

Keys: ``unet.<path>.lora_A.weight`` and ``.lora_B.weight`` (``text_encoder.`` for a text
encoder, ``transformer.`` for a DiT), read by ``pipe.load_lora_weights`` and
``model.load_lora_adapter(..., prefix="unet")``. The scale is ``alpha / r`` with ``alpha``
from the ``lora_adapter_metadata`` JSON in the file's metadata, ``alpha = r`` without it
(what this package writes: the scale is folded into ``lora_A``). diffusers runs the file
through PEFT, so the same layers are refused as for PEFT, and a transformers ``Conv1D`` is
written as for PEFT (PEFT sets ``fan_in_fan_out`` for it when it loads the file).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import torch

from .._file_format import read_safetensors
from .._host import DeltaHost
from . import peft
from ._layer import (
    TRANSPOSED,
    LowRankLayer,
    lora_layers,
    refuse_geometry,
    write_safetensors,
)

__all__ = ["check", "layers", "read", "write"]

NAME = "diffusers"
PREFIX = "unet"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
METADATA_KEY = "lora_adapter_metadata"


def check(name: str, host: DeltaHost) -> None:
    """Raise ``ValueError`` naming the layer if a diffusers LoRA cannot reproduce it exactly."""
    refuse_geometry(
        name, host, "diffusers LoRA", groups=False, dilation=False, kinds=("linear", TRANSPOSED, "conv")
    )


layers = lora_layers


def write(path: str, entries: list[LowRankLayer], *, prefix: str | None = None, **_: Any) -> list[str]:
    """Write ``entries`` to the safetensors file ``path``; returns the files written."""
    prefix = PREFIX if prefix is None else prefix
    tensors: dict[str, torch.Tensor] = {}
    for layer in entries:
        key = f"{prefix}.{layer.name}" if prefix else layer.name
        extra = (1,) * (layer.down.ndim - 2)
        tensors[f"{key}.lora_A.weight"] = layer.down
        tensors[f"{key}.lora_B.weight"] = layer.up.reshape(*layer.up.shape, *extra)
    write_safetensors(path, tensors, {"format": "pt"})
    return [path]


def is_diffusers(tensors: Iterable[str]) -> bool:
    """Whether the keys are PEFT factors (``.lora_A.`` / ``.lora_B.``) rather than kohya's."""
    return any(".lora_A." in key or ".lora_B." in key for key in tensors)


def read(path: str, names: Iterable[str] | None, skipped: list[str] | None = None) -> list[LowRankLayer]:
    """Every layer of the diffusers file ``path``, named by the model's layer ``names``.

    A key's module path is ``<component>.<layer path>``; the component prefix is whatever
    precedes a model layer's path (the shortest such prefix wins). Without ``names``, a
    known component prefix (``unet.``, ``transformer.``, ``text_encoder.`` …) is removed.
    A layer the model does not have is an error, or with ``skipped`` given, is appended to it.
    """
    tensors, metadata = read_safetensors(path)
    known = set(names) if names is not None else None
    prefixes: set[str] = set()

    def name_of(module_path: str) -> str | None:
        parts = module_path.split(".")
        for i in range(len(parts)):
            rest = ".".join(parts[i:])
            if (known is not None and rest in known) or (
                known is None and (i > 0 or parts[0] not in COMPONENTS)
            ):
                prefixes.add(".".join(parts[:i]))
                return rest
        return None

    pieces = peft.factor_pieces(tensors, path, name_of, skipped)
    config: dict[str, Any] = {}
    if metadata.get(METADATA_KEY):
        try:
            packed = json.loads(metadata[METADATA_KEY])
        except ValueError as exc:
            raise ValueError(f"{path!r}: its {METADATA_KEY} is not JSON ({exc})") from exc
        if not isinstance(packed, dict):
            raise ValueError(f"{path!r}: its {METADATA_KEY} is not a JSON object")
        prefix = next(iter(prefixes), "")
        config = {
            k.removeprefix(f"{prefix}."): v
            for k, v in packed.items()
            if not prefix or k.startswith(f"{prefix}.")
        }
        peft.check_config(config, path)
    return peft.pair_layers(pieces, config, path)
