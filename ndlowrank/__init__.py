"""ndlowrank: N-dimensional low-rank weight deltas in Tucker form, on any array-API backend.

The core (this namespace) is backend-agnostic: it runs unchanged on numpy, torch,
cupy and any array-API library. PyTorch adapters live in :mod:`ndlowrank.nn`.
"""

from importlib.metadata import PackageNotFoundError, version

from ._backend import available_backends
from .decompose import ToleranceWarning, hooi, hosvd, sthosvd, tucker
from .delta import TuckerDelta, tucker_delta
from .init import INITS
from .ranks import select_ranks, validate_ranks
from .tenalg import fold, mode_product, multi_mode_product, tucker_to_tensor, unfold
from .tucker import TuckerTensor

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
    "hooi",
    "hosvd",
    "mode_product",
    "multi_mode_product",
    "select_ranks",
    "sthosvd",
    "tucker",
    "tucker_delta",
    "tucker_to_tensor",
    "unfold",
    "validate_ranks",
]
