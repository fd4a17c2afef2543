"""Sparsifiers: top-k, rand-k, and the unbiased Bernoulli sparsifier.

A sparsifier keeps some positions and hands their values to the next operator of a
chain (a quantizer, a cast, sign) or sends them raw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import _sparse_kernels as K
from .base import Operator, Properties, ValueOperator, as_numpy_f32, draw_seed, raise_nonfinite
from .payload import Part, Payload, Raw, Sparse


class Sparsifier(Operator):
    """Selects positions; ``inner`` (if any) compresses the kept values."""

    def select(
        self, x: torch.Tensor, generator: torch.Generator | None
    ) -> tuple[torch.Tensor | None, int | None, torch.Tensor]:
        """(indices or None, seed or None, kept values) for a flat CPU tensor."""
        raise NotImplementedError

    def positions(self, part: Sparse, n: int) -> torch.Tensor:
        """Sorted kept positions of a payload (regenerated when only a seed was sent)."""
        assert part.indices is not None
        return part.indices

    def expected_count(self, n: int) -> int | None:
        """How many positions a valid payload keeps, when that is fixed by (op, n)."""
        return None

    def is_projection(self) -> bool:
        """Whether kept values pass unchanged and the rest become zero, so x - S(x) is
        orthogonal to S(x): then an unbiased quantizer of variance factor beta < 1 on the
        kept values keeps the composition a contraction without damping (see Chain)."""
        return False

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None, inner: ValueOperator | None = None) -> Part:
        indices, seed, values = self.select(x, generator)
        vpart = inner._compress(values, generator) if inner is not None else Raw(values)
        return Sparse(indices, seed, vpart)

    def decompress_sparse(
        self, payload: Payload, inner: ValueOperator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        part, n = payload.body, payload.numel
        assert isinstance(part, Sparse)
        k = part.count
        values = inner._decompress(part.values, k) if inner is not None else _raw_values(part.values)
        idx = self.positions(part, n).to(torch.int64).contiguous() if k else torch.zeros(0, dtype=torch.int64)
        if idx.numel() != values.numel() or not _increasing_within(idx.numpy(), n):
            raise IndexError(f"sparse payload positions are not strictly increasing within {n} elements")
        return idx, values.to(payload.dtype)

    def _decompress(self, part: Part, n: int, inner: ValueOperator | None = None) -> torch.Tensor:
        assert isinstance(part, Sparse)
        k = part.count
        values = inner._decompress(part.values, k) if inner is not None else _raw_values(part.values)
        # float64 values (a float64 tensor's raw kept values) stay float64: through float32
        # they would no longer be what decompress_sparse gives and the server sums.
        wide = values.dtype == torch.float64
        out = np.empty(n, np.float64 if wide else np.float32)
        idx = self.positions(part, n) if k else torch.zeros(0, dtype=torch.int64)
        vals = values.to(torch.float64 if wide else torch.float32).contiguous().numpy()
        # Zeros and kept values in one pass over a numpy-allocated buffer (no zero-fill, then
        # scatter, over a torch allocation).
        if idx.numel() != vals.size or K.scatter(idx.to(torch.int64).contiguous().numpy(), vals, out) != 0:
            raise IndexError(f"sparse payload positions out of range for {n} elements")
        return torch.from_numpy(out)


def _increasing_within(idx: np.ndarray, n: int) -> bool:
    """Positions strictly increasing in [0, n): each names one element, so sums over them are exact."""
    return idx.size == 0 or (idx[0] >= 0 and idx[-1] < n and bool((idx[1:] > idx[:-1]).all()))


def _raw_values(part: Part) -> torch.Tensor:
    assert isinstance(part, Raw)
    return part.values


def _count(ratio: float | None, k: int | None, n: int) -> int:
    """Kept elements for n: exactly k, or ceil(ratio * n) (at least one of a non-empty tensor)."""
    if k is not None:
        return min(k, n)
    assert ratio is not None
    return min(n, max(1 if n else 0, math.ceil(ratio * n - 1e-9)))


def _check_amount(name: str, ratio: float | None, k: int | None) -> None:
    if (ratio is None) == (k is None):
        raise ValueError(
            f"{name} needs exactly one of ratio (0 < ratio <= 1) or k (k >= 1), got ratio={ratio!r}, k={k!r}"
        )
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ValueError(f"{name} ratio must be in (0, 1], got {ratio!r}")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{name} k must be a positive integer, got {k!r}")


def _normalise_amount(obj: Operator) -> None:
    """``topk(0.01)`` means a ratio, ``topk(100)`` a count: literal types decide."""
    ratio = obj.ratio
    if isinstance(ratio, int) and not isinstance(ratio, bool) and obj.k is None and ratio > 1:
        object.__setattr__(obj, "k", ratio)
        object.__setattr__(obj, "ratio", None)
    elif isinstance(ratio, int) and not isinstance(ratio, bool):
        object.__setattr__(obj, "ratio", float(ratio))


@dataclass(frozen=True)
class TopK(Sparsifier):
    """Keep the k largest magnitudes (ties: lowest index), drop the rest.

    Biased; ||x - C(x)||^2 <= (1 - k/n) ||x||^2 deterministically: a contraction, the
    compressor of Qsparse-local-SGD (Basu et al., 2019) with error memory.
    """

    ratio: float | None = None
    k: int | None = None

    name: ClassVar[str] = "topk"
    positional: ClassVar[tuple[str, ...]] = ("ratio",)
    checks_finite: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _normalise_amount(self)
        _check_amount(self.name, self.ratio, self.k)

    def expected_count(self, n: int) -> int:
        return _count(self.ratio, self.k, n)

    def select(self, x: torch.Tensor, generator: torch.Generator | None):
        k = self.expected_count(x.numel())
        idx, vals, nonfinite = K.topk_select(as_numpy_f32(x), k)
        if nonfinite:  # NaN/Inf have the largest keys: the selection pass sees them
            raise_nonfinite(x)
        idx = torch.from_numpy(idx)
        return idx, None, torch.from_numpy(vals) if x.dtype == torch.float32 else x[idx]

    def properties(self, n: int) -> Properties:
        return Properties(unbiased=False, contraction=self.expected_count(n) / n if n else 1.0)

    def is_projection(self) -> bool:
        return True


@dataclass(frozen=True)
class RandK(Sparsifier):
    """Keep k positions drawn uniformly without replacement.

    Only a 64-bit seed is sent: the receiver regenerates the same positions from it
    (derived from ``seed`` and one draw from the caller's generator, so it changes every
    call). ``unbiased=False`` is a contraction with factor k/n in expectation (for error
    memory); ``unbiased=True`` rescales by n/k, variance factor n/k - 1.
    """

    ratio: float | None = None
    k: int | None = None
    seed: int = 0
    unbiased: bool = False

    name: ClassVar[str] = "randk"
    positional: ClassVar[tuple[str, ...]] = ("ratio",)

    def __post_init__(self) -> None:
        _normalise_amount(self)
        _check_amount(self.name, self.ratio, self.k)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"randk seed must be an integer in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.unbiased, bool):
            raise ValueError(f"randk unbiased must be true or false, got {self.unbiased!r}")

    def expected_count(self, n: int) -> int:
        return _count(self.ratio, self.k, n)

    def select(self, x: torch.Tensor, generator: torch.Generator | None):
        n = x.numel()
        k = self.expected_count(n)
        call_seed = int(K.mix64(np.uint64(self.seed) ^ draw_seed(generator)))
        positions = K.random_subset(n, k, np.uint64(call_seed))
        idx = torch.from_numpy(positions)
        # numpy's gather: torch's indexing starts a parallel region (which stalls on busy cores).
        values = torch.from_numpy(x.numpy()[positions]) if x.dtype == torch.float32 else x[idx]
        if self.unbiased and k:
            values = values.to(torch.float32) * (n / k)
        return None, call_seed, values

    def positions(self, part: Sparse, n: int) -> torch.Tensor:
        assert part.seed is not None
        return torch.from_numpy(K.random_subset(n, part.count, np.uint64(part.seed)))

    def properties(self, n: int) -> Properties:
        k = self.expected_count(n)
        if not n:
            return Properties(unbiased=True, variance=0.0)
        if self.unbiased:
            return Properties(unbiased=True, variance=n / k - 1.0)
        return Properties(unbiased=False, contraction=k / n)

    def is_projection(self) -> bool:
        return not self.unbiased


@dataclass(frozen=True)
class Bernoulli(Sparsifier):
    """Unbiased random sparsification: keep x_i with probability p_i, send x_i / p_i.

    ``p`` keeps every element with the same probability. ``budget`` (a fraction of n)
    uses magnitude-proportional p_i = min(1, lambda |x_i|) with sum p_i = budget * n, the
    variance-optimal choice of Wangni et al. (2018) that Sparse-AsyLPG (Yu, Wu, Huang,
    2019) quantizes afterwards. Expected kept count <= budget * n (or p * n). Variance:
    sum x_i^2 (1/p_i - 1), i.e. factor 1/p - 1 for constant p.
    """

    p: float | None = None
    budget: float | None = None

    name: ClassVar[str] = "bernoulli"
    positional: ClassVar[tuple[str, ...]] = ("p",)

    def __post_init__(self) -> None:
        if (self.p is None) == (self.budget is None):
            raise ValueError(f"bernoulli needs exactly one of p or budget, got p={self.p!r}, budget={self.budget!r}")
        for key in ("p", "budget"):
            v = getattr(self, key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                    raise ValueError(f"bernoulli {key} must be in (0, 1], got {v!r}")
                object.__setattr__(self, key, float(v))

    def select(self, x: torch.Tensor, generator: torch.Generator | None):
        v = as_numpy_f32(x)
        seed = draw_seed(generator)
        if self.p is not None:
            idx, vals = K.bernoulli_keep(v, self.p, 0.0, seed)
        else:
            lam = K.magnitude_lambda(v, self.budget * v.size)
            idx, vals = K.bernoulli_keep(v, 0.0, lam, seed)
        return torch.from_numpy(idx), None, torch.from_numpy(vals)

    def properties(self, n: int) -> Properties:
        if self.p is not None:
            return Properties(unbiased=True, variance=1.0 / self.p - 1.0)
        # With clipped set C and the rest R: variance = ||x_R||_1^2 / (K - |C|) - ||x_R||^2
        # <= ((n - |C|) / (K - |C|) - 1) ||x||^2 <= (1/budget - 1) ||x||^2 for K = budget n.
        return Properties(unbiased=True, variance=1.0 / self.budget - 1.0)
