"""PEFT LoRA: a directory with ``adapter_model.safetensors`` and ``adapter_config.json``.

Keys (as ``PeftModel.save_pretrained`` writes them, the adapter name removed):
``base_model.model.<path>.lora_A.weight`` (linear ``(r, I)``, conv ``(r, I, *k)``) and
``.lora_B.weight`` (``(O, r)``, ``(O, r, 1, …)``); embeddings ``.lora_embedding_A`` ``(r, num)`` and
``.lora_embedding_B`` ``(dim, r)``. The scale is ``lora_alpha / r`` per layer (``alpha_pattern``
and ``rank_pattern`` override the defaults; ``/ sqrt(r)`` with ``use_rslora``).
A transformers ``Conv1D`` (GPT-2) gets the ``nn.Linear`` layout, ``lora_A`` ``(r, in)`` and
``lora_B`` ``(out, r)``, with ``fan_in_fan_out=True`` as PEFT expects there.
PEFT runs ``lora_A`` with the base convolution's kernel, stride and padding but neither its
groups, dilation nor padding mode, so such layers are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from .._file_format import read_safetensors
from .._host import DeltaHost
from ._layer import (
    TRANSPOSED,
    LowRankLayer,
    lora_layers,
    refuse_geometry,
    write_json,
    write_safetensors,
)

__all__ = ["check", "check_config", "factor_pieces", "pair_layers", "read", "write"]

NAME = "peft"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."


def check(name: str, host: DeltaHost) -> None:
    """Raise ``ValueError`` naming the layer if a PEFT LoRA cannot reproduce it exactly.

    Parameter adapters on 2-D parameters become PEFT's ``target_parameters`` LoRAs.
    """
    refuse_geometry(
        name,
        host,
        "PEFT LoRA",
        groups=False,
        dilation=False,
        kinds=("linear", TRANSPOSED, "conv", "embedding", "parameter"),
    )
    if host.kind == "parameter" and host.weight.ndim != 2:
        raise ValueError(
            f"parameter {name!r} has shape {tuple(host.weight.shape)}: PEFT's target_parameters"
            " LoRA holds 2-D parameters exactly, not this"
        )


layers = lora_layers


def write(path: str, entries: list[LowRankLayer], **_: Any) -> list[str]:
    """Write the PEFT directory ``path`` (created if missing); returns the files written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"format='peft' writes a directory, and {path!r} is a file")
    os.makedirs(path, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    parameters: list[str] = []
    for layer in entries:
        key = PREFIX + layer.name
        ranks[layer.name] = layer.rank
        if layer.kind == "parameter":  # PEFT's target_parameters: keyed by the owning module's path
            module = layer.name.rpartition(".")[0]
            if any(other.rpartition(".")[0] == module for other in parameters):
                raise ValueError(
                    f"parameters {parameters[-1]!r} and {layer.name!r} share a module; a PEFT file keys"
                    " one adapted parameter per module"
                )
            parameters.append(layer.name)
            key = PREFIX + module
        if layer.kind == "embedding":
            tensors[f"{key}.lora_embedding_A"] = layer.up.T
            tensors[f"{key}.lora_embedding_B"] = layer.down.T
        else:
            extra = (1,) * (layer.down.ndim - 2)
            tensors[f"{key}.lora_A.weight"] = layer.down
            tensors[f"{key}.lora_B.weight"] = layer.up.reshape(*layer.up.shape, *extra)
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    # exact names: PEFT matches a rank_pattern key k by re.match(rf"(.*\.)?({k})$", name)
    pattern = {f"^{re.escape(name)}": r for name, r in ranks.items() if r != common}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": common,
        "lora_alpha": common,  # alpha = r everywhere: the scale is folded into lora_A
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": "|".join(f"(?:{re.escape(name)})" for name in ranks if name not in parameters)
        or [],
        "target_parameters": parameters or None,
        "lora_dropout": 0.0,
        "bias": "none",
        # GPT-2's Conv1D: PEFT wants True there (it flips the flag per module with a warning
        # otherwise), and refuses it for target_parameters
        "fan_in_fan_out": any(layer.kind == TRANSPOSED for layer in entries) and not parameters,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    weights, config_path = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    write_safetensors(weights, tensors, {"format": "pt"})
    write_json(config_path, config)
    return [weights, config_path]


def is_peft(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rule: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def check_config(config: Any, where: str) -> dict[str, Any]:
    """``config`` if it describes a plain LoRA (a weight delta); ``ValueError`` naming ``where`` otherwise."""
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{where!r} holds a PEFT {kind} adapter; only LoRA (peft_type 'LORA') is read")
    for flag in ("use_dora", "lora_bias"):
        if config.get(flag):
            raise ValueError(f"{where!r}: a LoRA with {flag}=True is not a weight delta and cannot be read")
    return config


def read(path: str) -> list[LowRankLayer]:
    """Every layer of the PEFT LoRA directory ``path``."""
    if not is_peft(path):
        raise ValueError(f"{path!r} is not a PEFT adapter directory (no {CONFIG} in it)")
    try:
        with open(os.path.join(path, CONFIG)) as handle:
            config = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{os.path.join(path, CONFIG)!r} is not a readable JSON file ({exc})") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ValueError(f"{path!r}: {CONFIG} has no peft_type; it is not a PEFT adapter config")
    check_config(config, path)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"{path!r} has no {WEIGHTS} (a PEFT directory saved with safe_serialization=False?)"
        )
    tensors, _ = read_safetensors(weights)
    pieces = factor_pieces(
        tensors, weights, lambda key: key.removeprefix(PREFIX) if key.startswith(PREFIX) else None
    )
    # a target_parameters LoRA is keyed by its module's path: name it by the parameter
    owners = {name.rpartition(".")[0]: name for name in config.get("target_parameters") or []}
    pieces = {owners.get(module, module): parts for module, parts in pieces.items()}
    layers = pair_layers(pieces, {"lora_alpha": 8, **config}, weights)  # PEFT's default alpha
    return [replace(layer, kind="parameter") if layer.name in owners.values() else layer for layer in layers]


def factor_pieces(
    tensors: dict[str, torch.Tensor],
    where: str,
    name_of: Callable[[str], str | None],
    skipped: list[str] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """``{layer path: {"lora_A": …, "lora_B": …}}``; ``name_of`` maps a key's module path to the layer's.

    A module path that names no layer (``name_of`` gives ``None``) is an error, or with
    ``skipped`` given, is appended to it and left out.
    """
    pieces: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?", key)
        if match is None:
            raise ValueError(f"{where!r}: key {key!r} is not a LoRA factor (lora_A/lora_B); cannot read it")
        name = name_of(match[1])
        if name is None:
            if skipped is None:
                raise ValueError(
                    f"{where!r}: key {key!r} names no layer of the model (module path {match[1]!r})"
                )
            if match[1] not in skipped:
                skipped.append(match[1])
            continue
        pieces.setdefault(name, {})[match[2]] = tensor
    return pieces


def pair_layers(
    pieces: dict[str, dict[str, torch.Tensor]], config: dict[str, Any], where: str
) -> list[LowRankLayer]:
    """The layers of PEFT-keyed factors, scaled by ``config``'s ``lora_alpha`` / ``alpha_pattern`` (``alpha = r`` if absent)."""
    rs = bool(config.get("use_rslora", False))
    layers = []
    for name, parts in pieces.items():
        if {"lora_A", "lora_B"} == set(parts):
            down, up = parts["lora_A"], parts["lora_B"]
            kind = "conv" if down.ndim > 2 else "linear"
            up = up.reshape(up.shape[0], -1)
        elif {"lora_embedding_A", "lora_embedding_B"} == set(parts):
            down, up, kind = parts["lora_embedding_B"].T, parts["lora_embedding_A"].T, "embedding"
        else:
            raise ValueError(
                f"{where!r}: layer {name!r} has {sorted(parts)}, not a matching pair of LoRA factors"
            )
        if up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(
                f"{where!r}: layer {name!r} has factors of shapes {tuple(up.shape)} and {tuple(down.shape)} that do not chain"
            )
        r = down.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r)))
        layers.append(LowRankLayer(name, kind, up, down, None, alpha / (math.sqrt(r) if rs else r)))
    return layers
