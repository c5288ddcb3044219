"""Checks of the JSON metadata that ndlowrank files carry: each field is validated before use.

Shared by the adapter files (:mod:`ndlowrank.nn.io`) and the factors files of the command
line, so a field means the same and is refused the same way in both. Every check raises
``ValueError`` with ``at`` (the file and the entry) and the bad value in the message.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._validation import check_scale

__all__ = ["check_ranks_fit", "int_tuple", "json_object", "number", "scale_field", "string"]


def json_object(text: str, key: str, where: str) -> dict[str, Any]:
    """The JSON object stored under the metadata ``key``; anything else is a ``ValueError`` that says what it is."""
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: its {key!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{where}: its {key!r} metadata must be a JSON object, got {type(header).__name__}")
    return header


def int_tuple(value: Any, field: str, at: str) -> tuple[int, ...]:
    """A non-empty list of positive ints (booleans refused)."""
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        raise ValueError(f"{at}: {field} must be a non-empty list of positive ints, got {value!r}")
    return tuple(value)


def number(value: Any, field: str, at: str) -> float:
    """A finite JSON number (an int too large for a float is refused as not finite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{at}: {field} must be a finite number, got {value!r}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"{at}: {field} must be a finite number, got {value!r}")
    return result


def string(value: Any, field: str, at: str, choices: tuple[str, ...] | None = None) -> str:
    """A string, one of ``choices`` when given."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        expected = f"one of {list(choices)}" if choices is not None else "a string"
        raise ValueError(f"{at}: {field} must be {expected}, got {value!r}")
    return value


def scale_field(value: Any, at: str, *, principal: bool = False) -> float:
    """A delta's ``scale``, by the same rule as everywhere else (:func:`ndlowrank._validation.check_scale`)."""
    try:
        return check_scale(value, principal=principal)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{at}: {exc}") from None


def check_ranks_fit(field: str, ranks: tuple[int, ...], shape: tuple[int, ...], at: str) -> None:
    """One rank per mode, each at most the mode's size."""
    if len(ranks) != len(shape):
        raise ValueError(f"{at}: {field}={list(ranks)} has not one rank per mode of {list(shape)}")
    for n, (rank, size) in enumerate(zip(ranks, shape, strict=True)):
        if rank > size:
            raise ValueError(f"{at}: {field}[{n}]={rank} exceeds dimension {size} of mode {n}")
