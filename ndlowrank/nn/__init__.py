"""PyTorch adapters: Tucker-form deltas on the layers people fine-tune.

The only part of ndlowrank that imports torch at module level. Everything here builds on
the array-API core (:func:`ndlowrank.tucker_delta`, :func:`ndlowrank.sthosvd`).
"""

from .bypass import find_bypassed_adapters
from .delta import TuckerDelta
from .interop import combine_adapters, convert_adapters, export_adapters, import_adapters
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
from .manage import AdaptersDisabled, disable_adapters, enable_adapters, set_adapter_scale
from .model import (
    add_adapters,
    iter_adapters,
    mark_only_adapters_trainable,
    merge_adapters,
    remove_adapters,
    unmerge_adapters,
)
from .modules_to_save import TrainedCopy, iter_trained_copies
from .named import active_adapters, adapter_names, add_weighted_adapter, delete_adapter, set_active_adapter
from .parameters import ParameterAdapter
from .targets import select_targets
from .truncate import TruncationReport, truncate_adapters

__all__ = [
    "PATHS",
    "AdaptersDisabled",
    "ConvAdapter",
    "EmbeddingAdapter",
    "LinearAdapter",
    "ParameterAdapter",
    "TrainedCopy",
    "TransposedLinearAdapter",
    "TruncationReport",
    "TuckerAdapter",
    "TuckerDelta",
    "active_adapters",
    "adapter_names",
    "adapter_state_dict",
    "add_adapters",
    "add_weighted_adapter",
    "combine_adapters",
    "convert_adapters",
    "delete_adapter",
    "disable_adapters",
    "enable_adapters",
    "export_adapters",
    "find_bypassed_adapters",
    "import_adapters",
    "iter_adapters",
    "iter_trained_copies",
    "load_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapters",
    "save_adapters",
    "select_targets",
    "set_active_adapter",
    "set_adapter_scale",
    "supported_layers",
    "truncate_adapters",
    "unmerge_adapters",
]
