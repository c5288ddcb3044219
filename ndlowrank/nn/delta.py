"""``TuckerDelta``: a trainable Tucker-form weight delta as an ``nn.Module``."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_scale, check_seed
from ..delta import TuckerDelta as ArrayTuckerDelta
from ..delta import tucker_delta
from ..tenalg import _mode_product, _product_order
from ..tucker import TuckerTensor

__all__ = ["TuckerDelta", "fold_into_core", "layer_seed", "mode_products", "trailing_mode_products"]


def mode_products(x: torch.Tensor, matrices: Sequence[torch.Tensor], modes: Sequence[int]) -> torch.Tensor:
    """``x ×_{modes[0]} matrices[0] ×_{modes[1]} matrices[1] …`` with torch calls only.

    Computes what :func:`ndlowrank.multi_mode_product` does (the same products in the same
    order, so the same rounding) for validated torch tensors of one dtype, without the
    array-API namespace lookups: forward passes use it, so ``torch.compile`` traces plain
    torch calls.
    """
    by_mode = dict(zip(modes, matrices, strict=True))
    steps = [(mode, int(matrix.shape[0]), int(matrix.shape[1])) for mode, matrix in by_mode.items()]
    for mode, _, _ in _product_order(steps):
        x = _mode_product(x, by_mode[mode], mode, xp=torch)
    return x


def fold_into_core(
    core: torch.Tensor, factors: Sequence[torch.Tensor], modes: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same delta with the square factors of ``modes`` folded into the core: ``(G ×_n K_n …, factors with K_n = I)``."""
    folded = list(factors)
    if not modes:
        return core, folded
    core = mode_products(core, [factors[n] for n in modes], modes)
    for n in modes:
        folded[n] = torch.eye(factors[n].shape[0], dtype=factors[n].dtype, device=factors[n].device)
    return core, folded


def trailing_mode_products(x: torch.Tensor, matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` times ``matrices[i]`` (shape ``(J_i, I_i)``) along its last ``len(matrices)`` modes, in order.

    The same value as :func:`mode_products` over those modes, with the fewest torch calls: the
    last mode is one ``F.linear``, the one before it one broadcast matrix product from the
    left, and earlier modes a matrix product on a reshaped view. A forward pass pays per call
    (and per autograd node), which on small layers costs more than the arithmetic.
    """
    count = len(matrices)
    for i, matrix in enumerate(matrices):
        mode = x.ndim - count + i
        if mode == x.ndim - 1:
            x = F.linear(x, matrix)
        elif mode == x.ndim - 2:
            x = torch.matmul(matrix, x)
        else:
            lead, rest = x.shape[:mode], x.shape[mode + 1 :]
            x = torch.matmul(matrix, x.reshape(*lead, x.shape[mode], -1)).reshape(
                *lead, matrix.shape[0], *rest
            )
    return x


def layer_seed(seed: int | None, name: str = "") -> int:
    """A per-layer seed: derived from ``seed`` and the layer's name, or from torch's RNG.

    With ``seed=None`` the draw comes from ``torch``'s global generator, so
    ``torch.manual_seed`` makes adapter inits reproducible, as PyTorch users expect.
    """
    seed = check_seed(seed, generator=False)
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    entropy = [seed, zlib.crc32(name.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


class TuckerDelta(nn.Module):
    """A weight delta ``ΔW = scale · core ×_0 factors[0] … ×_{N-1} factors[N-1]`` with trainable parts.

    ``core`` and every factor are :class:`torch.nn.Parameter`. Called with no argument,
    the module returns ``ΔW``; called with a weight ``W`` it returns ``W + ΔW``, so the
    same module works as a parametrization
    (``torch.nn.utils.parametrize.register_parametrization(layer, "weight", delta)``).

    Parameters
    ----------
    shape : sequence of int
        Shape of the weight the delta changes.
    ranks : int or sequence of int
        Multilinear ranks, ``1 <= ranks[n] <= shape[n]``.
    init : str, default "zero_core"
        A random init of :func:`ndlowrank.tucker_delta` (``"zero_core"``, ``"zero_factor"``,
        ``"orthogonal"``); every one starts at ``ΔW = 0``. Use :meth:`from_tucker` for a
        given start (such as a weight's principal part).
    scale : float, default 1.0
        Plain multiplier of the delta.
    dtype, device : optional
        Of the parameters; float32 on the default device if omitted.
    seed : int, optional
        The same seed gives the same numbers as ``ndlowrank.tucker_delta(..., seed=seed)``
        on any backend. Without it, the draw is seeded from torch's global generator.

    Examples
    --------
    >>> import torch
    >>> from ndlowrank import nn as nlnn
    >>> delta = nlnn.TuckerDelta((16, 8, 3, 3), (4, 4, 3, 3), seed=0)
    >>> delta().shape, float(delta().detach().abs().max())
    (torch.Size([16, 8, 3, 3]), 0.0)
    >>> delta
    TuckerDelta(shape=(16, 8, 3, 3), ranks=(4, 4, 3, 3), n_params=258, scale=1.0)
    >>> delta.fix_square_modes([2, 3])  # the 3 × 3 spatial factors, as a conv adapter holds them
    >>> delta, [p.shape for p in delta.trainable_parameters()]
    (TuckerDelta(shape=(16, 8, 3, 3), ranks=(4, 4, 3, 3), n_params=258, scale=1.0, fixed_modes=(2, 3)), [torch.Size([4, 4, 3, 3]), torch.Size([16, 4]), torch.Size([8, 4])])
    """

    fixed_modes: tuple[int, ...] = ()
    """Modes whose square factor is held at the identity and does not train (see :meth:`fix_square_modes`)."""

    def __init__(
        self,
        shape: Sequence[int],
        ranks: int | Sequence[int],
        *,
        init: str = "zero_core",
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
        device: Any = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        seed = layer_seed(None) if seed is None else seed
        start = tucker_delta(
            shape,
            ranks,
            init=init,
            scale=scale,
            backend="torch",
            device=device,
            dtype=dtype or torch.float32,
            seed=seed,
        )
        self._adopt(start.core, start.factors, start.scale)

    def _adopt(self, core: torch.Tensor, factors: Sequence[torch.Tensor], scale: float) -> None:
        """Take ``core`` and ``factors`` as new parameters (held modes stay held where still square: see :meth:`fix_square_modes`)."""
        self.core = nn.Parameter(core.detach().clone())
        self.factors = nn.ParameterList([nn.Parameter(f.detach().clone()) for f in factors])
        self.scale = check_scale(scale)
        held, self.fixed_modes = self.fixed_modes, ()
        self.fix_square_modes(held)

    @torch.no_grad()
    def fix_square_modes(self, modes: Sequence[int]) -> None:
        """Hold the square factors of ``modes`` (rank equal to the mode's size) at the identity, out of training.

        A square factor ``K_n`` does not compress its mode: the core times it (``G ×_n K_n``)
        spans the same deltas as the core alone. So the core takes it over (``ΔW`` is
        unchanged) and the factor stays the identity with ``requires_grad=False``:
        :meth:`requires_grad_` and :meth:`trainable_parameters` leave it out, and only the
        core and the other factors train (on a conv kernel with full spatial ranks this is
        the Tucker-2 form, which compresses the two channel modes only). Modes whose factor
        is not square are skipped.
        """
        fixed = [n for n in modes if self.factors[n].shape[0] == self.factors[n].shape[1]]
        if not fixed:
            return
        core, factors = fold_into_core(self.core, list(self.factors), fixed)
        self.core.copy_(core)
        for n in fixed:
            self.factors[n].copy_(factors[n])
            self.factors[n].requires_grad_(False)
        self.fixed_modes = tuple(sorted({*self.fixed_modes, *fixed}))

    def release_modes(self, modes: Sequence[int]) -> None:
        """Let the factors of ``modes`` that :meth:`fix_square_modes` holds train again (``ΔW`` is unchanged).

        They start from the identity and take the core's ``requires_grad``. Modes not held are skipped.
        """
        released = [n for n in modes if n in self.fixed_modes]
        for n in released:
            self.factors[n].requires_grad_(self.core.requires_grad)
        self.fixed_modes = tuple(n for n in self.fixed_modes if n not in released)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The core and the factors that train: every one but those :meth:`fix_square_modes` holds."""
        return [self.core, *(f for n, f in enumerate(self.factors) if n not in self.fixed_modes)]

    def requires_grad_(self, requires_grad: bool = True) -> TuckerDelta:
        """Set ``requires_grad`` of :meth:`trainable_parameters`; factors held at the identity stay frozen."""
        for parameter in self.trainable_parameters():
            parameter.requires_grad_(requires_grad)
        return self

    @classmethod
    def from_tucker(cls, tucker: TuckerTensor, *, scale: float | None = None) -> TuckerDelta:
        """Build the module from a :class:`ndlowrank.TuckerTensor` (or ``TuckerDelta``) of torch tensors.

        ``scale`` defaults to the input's own scale (1 for a plain ``TuckerTensor``).
        The tensors are copied into new parameters.
        """
        if not isinstance(tucker, TuckerTensor):
            raise TypeError(f"tucker must be an ndlowrank.TuckerTensor, got {type(tucker).__name__}")
        if not isinstance(tucker.core, torch.Tensor):
            raise TypeError("tucker must hold torch tensors; build it with backend='torch'")
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._adopt(tucker.core, tucker.factors, getattr(tucker, "scale", 1.0) if scale is None else scale)
        return module

    def to_tucker(self) -> TuckerTensor:
        """The delta as a :class:`ndlowrank.TuckerDelta` whose tensors are this module's parameters."""
        return ArrayTuckerDelta(self.core, list(self.factors), scale=self.scale)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the weight the delta changes."""
        return tuple(int(f.shape[0]) for f in self.factors)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Multilinear ranks."""
        return tuple(int(s) for s in self.core.shape)

    @property
    def n_params(self) -> int:
        """Stored numbers: ``prod(ranks) + sum(I_n r_n)`` (the factors held at the identity included)."""
        return self.core.numel() + sum(f.numel() for f in self.factors)

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``ΔW`` (differentiable), optionally computed in ``dtype``."""
        core: torch.Tensor = self.core
        factors: list[torch.Tensor] = list(self.factors)
        if dtype is not None and dtype != core.dtype:
            core, factors = core.to(dtype), [f.to(dtype) for f in factors]
        return self.scale * mode_products(core, factors, range(len(factors)))

    def forward(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``ΔW``, or ``weight + ΔW`` when a weight is given (the parametrization form)."""
        if weight is None:
            return self.delta()
        if tuple(weight.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)} but this delta has shape {self.shape}")
        return weight + self.delta(weight.dtype)

    def extra_repr(self) -> str:
        held = f", fixed_modes={self.fixed_modes}" if self.fixed_modes else ""
        return f"shape={self.shape}, ranks={self.ranks}, n_params={self.n_params}, scale={self.scale}{held}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
