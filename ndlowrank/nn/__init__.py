"""PyTorch adapters: Tucker-form deltas on the layers people fine-tune.

The only part of ndlowrank that imports torch at module level. Everything here builds on
the array-API core (:func:`ndlowrank.tucker_delta`, :func:`ndlowrank.sthosvd`).
"""

from .bypass import find_bypassed_adapters
from .delta import TuckerDelta
from .io import adapter_state_dict, load_adapters, save_adapters
from .layers import (
    PATHS,
    ConvAdapter,
    EmbeddingAdapter,
    LinearAdapter,
    TransposedLinearAdapter,
    TuckerAdapter,
    supported_layers,
)
from .model import (
    add_adapters,
    iter_adapters,
    mark_only_adapters_trainable,
    merge_adapters,
    remove_adapters,
    unmerge_adapters,
)
from .parameters import ParameterAdapter
from .truncate import TruncationReport, truncate_adapters

__all__ = [
    "PATHS",
    "ConvAdapter",
    "EmbeddingAdapter",
    "LinearAdapter",
    "ParameterAdapter",
    "TransposedLinearAdapter",
    "TruncationReport",
    "TuckerAdapter",
    "TuckerDelta",
    "adapter_state_dict",
    "add_adapters",
    "find_bypassed_adapters",
    "iter_adapters",
    "load_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapters",
    "save_adapters",
    "supported_layers",
    "truncate_adapters",
    "unmerge_adapters",
]
