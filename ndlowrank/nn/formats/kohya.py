"""kohya LoRA / LoCon: one safetensors file, read by diffusers, ComfyUI, A1111/Forge and sd-scripts.

Keys: ``<prefix>_<path with dots as underscores>.lora_down.weight`` (linear ``(r, I)``, conv
``(r, I, *k)``), ``.lora_up.weight`` (``(O, r)``, ``(O, r, 1, …)``) and ``.alpha`` (a scalar; the
scale is ``alpha / r``, and a missing alpha means ``alpha = r``). The prefix is ``lora_unet``
for a Stable Diffusion UNet, ``lora_te`` for its text encoder. LyCORIS LoCon files use the
same keys, with ``.lora_mid.weight`` for a Tucker middle kernel; :func:`read` takes both.
diffusers runs such a file through PEFT, so the same layers are refused as for PEFT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from .._file_format import read_safetensors
from .._host import DeltaHost
from ._layer import LowRankLayer, lora_layers, refuse_geometry, write_safetensors

__all__ = ["check", "read", "write"]

NAME = "kohya"
PREFIX = "lora_unet"
PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha")


def check(name: str, host: DeltaHost) -> None:
    """Raise ``ValueError`` naming the layer if a kohya LoRA cannot reproduce it exactly."""
    refuse_geometry(name, host, "kohya LoRA", groups=False, dilation=False, kinds=("linear", "conv"))


layers = lora_layers


def stem(prefix: str, name: str) -> str:
    """The key stem of the layer ``name``: ``lora_unet_down_blocks_0_resnets_0_conv1`` (``name`` itself without a prefix)."""
    return f"{prefix}_{name.replace('.', '_')}" if prefix else name.replace(".", "_")


def stems(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """``{stem: name}``; ``ValueError`` if two names give the same stem (their dots and underscores differ)."""
    out: dict[str, str] = {}
    for name in names:
        key = stem(prefix, name)
        if key in out:
            raise ValueError(
                f"layers {out[key]!r} and {name!r} both get the key {key!r}; the format cannot tell them apart"
            )
        out[key] = name
    return out


def write(
    path: str,
    entries: list[LowRankLayer],
    *,
    prefix: str | None = None,
    network_module: str = "networks.lora",
    **_: Any,
) -> list[str]:
    """Write ``entries`` to the safetensors file ``path``; returns the files written.

    ``network_module`` goes into the ``ss_network_module`` metadata, as kohya's scripts record it.
    """
    prefix = PREFIX if prefix is None else prefix
    keys = stems(prefix, [layer.name for layer in entries])
    tensors: dict[str, torch.Tensor] = {}
    for key, layer in zip(keys, entries, strict=True):
        extra = (1,) * (layer.down.ndim - 2 if layer.mid is None else layer.mid.ndim - 2)
        up = layer.up.reshape(*layer.up.shape, *extra)
        down = layer.down if layer.mid is None else layer.down.reshape(*layer.down.shape, *extra)
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.lora_down.weight"] = down
        if layer.mid is not None:
            tensors[f"{key}.lora_mid.weight"] = layer.mid
        tensors[f"{key}.alpha"] = torch.tensor(float(layer.rank), dtype=layer.up.dtype)
    ranks = sorted({layer.rank for layer in entries})
    metadata = {
        "ss_network_module": network_module,
        "ss_network_dim": str(ranks[-1]),
        "ss_network_alpha": str(ranks[-1]),
    }
    write_safetensors(path, tensors, metadata)
    return [path]


def read(path: str, names: Iterable[str] | None, skipped: list[str] | None = None) -> list[LowRankLayer]:
    """Every layer of the kohya / LyCORIS LoCon file ``path``, named by the model's layer ``names``.

    A key's stem is ``<prefix>_<name with underscores>``; the prefix is whatever precedes a
    model layer's underscored name (the shortest such prefix wins). Without ``names`` (no
    model at hand), each layer is named by its whole stem. A stem that names no layer of the
    model is an error, or with ``skipped`` given, is appended to it and left out.
    """
    tensors, _ = read_safetensors(path)
    by_underscores: dict[str, list[str]] = {}
    for layer_name in names or ():
        by_underscores.setdefault(layer_name.replace(".", "_"), []).append(layer_name)
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        key_stem, _, part = key.partition(".")
        if part not in PARTS:
            raise ValueError(
                f"{path!r}: key {key!r} is not part of a LoRA/LoCon layer (lora_down, lora_up, lora_mid, alpha);"
                " LoHa, LoKr and other LyCORIS algorithms cannot be read"
            )
        pieces.setdefault(key_stem, {})[part] = tensor
    layers = []
    for key_stem, parts in pieces.items():
        name = key_stem if names is None else _layer_name(key_stem, by_underscores, path)
        if name is None:
            if skipped is None:
                raise ValueError(f"{path!r}: layer {key_stem!r} names no layer of the model")
            skipped.append(key_stem)
            continue
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(
                f"{path!r}: layer {key_stem!r} lacks lora_down or lora_up (it has {sorted(parts)})"
            )
        down, up, mid = parts["lora_down.weight"], parts["lora_up.weight"], parts.get("lora_mid.weight")
        up = up.reshape(up.shape[0], -1)
        r = down.shape[0]
        alpha = parts.get("alpha")
        scale = 1.0 if alpha is None else float(alpha.reshape(-1)[0]) / r
        if mid is not None:
            down = down.reshape(down.shape[0], -1)
            if mid.shape[:2] != (up.shape[1], r):
                raise ValueError(
                    f"{path!r}: layer {key_stem!r}: lora_mid {tuple(mid.shape)} does not chain lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)}"
                )
        elif up.shape[1] != r:
            raise ValueError(
                f"{path!r}: layer {key_stem!r}: lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} do not chain"
            )
        kind = "conv" if (mid is not None or down.ndim > 2) else "linear"
        layers.append(LowRankLayer(name, kind, up, down, mid, scale))
    return layers


def _layer_name(key_stem: str, by_underscores: dict[str, list[str]], path: str) -> str | None:
    for match in re.finditer("_", key_stem):
        candidates = by_underscores.get(key_stem[match.end() :])
        if candidates is None:
            continue
        if len(candidates) > 1:
            raise ValueError(f"{path!r}: layer {key_stem!r} could be any of {candidates}")
        return candidates[0]
    return None
