"""PyTorch adapters: Tucker-form deltas on the layers people fine-tune.

The only part of ndlowrank that imports torch at module level. Everything here builds on
the array-API core (:func:`ndlowrank.tucker_delta`, :func:`ndlowrank.sthosvd`).
"""

from .delta import TuckerDelta
from .interop import combine_adapters, convert_adapters, export_adapters, import_adapters
from .io import adapter_state_dict, load_adapters, save_adapters
from .layers import PATHS, ConvAdapter, EmbeddingAdapter, LinearAdapter, TuckerAdapter, supported_layers
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
    "TruncationReport",
    "TuckerAdapter",
    "TuckerDelta",
    "adapter_state_dict",
    "add_adapters",
    "combine_adapters",
    "convert_adapters",
    "export_adapters",
    "import_adapters",
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
