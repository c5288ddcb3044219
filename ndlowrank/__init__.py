"""ndlowrank: N-dimensional low-rank weight deltas in Tucker form, on any array-API backend.

The core (this namespace) is backend-agnostic: it runs unchanged on numpy, torch,
cupy and any array-API library. PyTorch adapters live in :mod:`ndlowrank.nn`.
"""

from importlib.metadata import PackageNotFoundError, version

from ._backend import available_backends
from .decompose import ToleranceWarning, hooi, hosvd, sthosvd, tucker
from .delta import TuckerDelta, tucker_delta
from .init import INITS
from .nonnegative import non_negative_tucker
from .partial import masked_tucker, partial_tucker
from .random import random_tucker
from .ranks import fraction_ranks, select_ranks, validate_ranks
from .sketch import tucker_sketch
from .tenalg import fold, mode_product, multi_mode_product, tucker_to_tensor, unfold
from .tucker import TuckerTensor, tucker_mode_product

try:
    __version__ = version("ndlowrank")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "INITS",
    "ToleranceWarning",
    "TuckerDelta",
    "TuckerTensor",
    "__version__",
    "available_backends",
    "fold",
    "fraction_ranks",
    "hooi",
    "hosvd",
    "masked_tucker",
    "mode_product",
    "multi_mode_product",
    "non_negative_tucker",
    "partial_tucker",
    "random_tucker",
    "select_ranks",
    "sthosvd",
    "tucker",
    "tucker_delta",
    "tucker_mode_product",
    "tucker_sketch",
    "tucker_to_tensor",
    "unfold",
    "validate_ranks",
]
