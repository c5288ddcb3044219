"""LyCORIS LoCon with ``use_tucker``: the LoRA-family file closest to a Tucker delta.

Keys as kohya's (:mod:`.kohya`) with the prefix ``lycoris`` (what ``create_lycoris_from_weights``
looks for; ``lora_unet`` for ComfyUI and A1111): a conv layer with a kernel larger than 1 has
``lora_up`` ``(O, r, 1, …)``, ``lora_mid`` ``(r, r, *k)`` and ``lora_down`` ``(r, I/g, 1, …)``,
``r = max(r0, r1)`` (the smaller Tucker rank zero-padded); linear and 1×1 layers a plain
LoRA. LyCORIS runs the merged ``ΔW`` with the base convolution's stride, padding, dilation
and groups, so only non-zero padding modes are refused.
"""

from __future__ import annotations

from typing import Any

from .._host import DeltaHost
from . import kohya
from ._layer import LowRankLayer, from_host, refuse_geometry

__all__ = ["check", "layers", "write"]

NAME = "lycoris"
PREFIX = "lycoris"


def check(name: str, host: DeltaHost) -> None:
    """Raise ``ValueError`` naming the layer if a LyCORIS LoCon cannot reproduce it exactly."""
    refuse_geometry(name, host, "LyCORIS LoCon", groups=True, dilation=True, kinds=("linear", "conv"))


def layers(entries: list[tuple[str, DeltaHost]]) -> list[LowRankLayer]:
    """The LoCon-Tucker form of convs with a kernel larger than 1, the LoRA form of the rest."""
    return [
        from_host(name, host, tucker=host.kind == "conv" and any(k > 1 for k in host.weight.shape[2:]))
        for name, host in entries
    ]


def write(path: str, entries: list[LowRankLayer], *, prefix: str | None = None, **_: Any) -> list[str]:
    """Write ``entries`` to the safetensors file ``path``; returns the files written."""
    return kohya.write(
        path, entries, prefix=PREFIX if prefix is None else prefix, network_module="lycoris.kohya"
    )
