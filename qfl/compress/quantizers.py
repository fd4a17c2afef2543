"""Value operators: QSGD, the AsyLPG low-precision grid, scaled sign, and casts."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from . import _kernels as K
from . import _raw_kernels as R
from . import runtime
from .base import Properties, ValueOperator, as_numpy_f32, draw_seed, empty_tensor, raise_nonfinite
from .payload import Levels, Part, Raw, Signs

#: Largest number of QSGD levels; keeps every Elias code within one 64-bit word.
MAX_LEVELS = 1 << 30


@functools.lru_cache(maxsize=64)
def level_dtype(max_level: int) -> np.dtype:
    """Narrowest signed integer type holding levels in [-max_level, max_level] (cached:
    ``np.iinfo`` costs ~5 us, per blob decoded and per tensor compressed)."""
    for dt in (np.int8, np.int16, np.int32):
        if max_level <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"max level {max_level} does not fit in int32")


def _check_bucket(bucket: int | None) -> None:
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
        raise ValueError(f"bucket must be a positive integer or None, got {bucket!r}")


def _quantize(
    x: torch.Tensor, s: int, bucket: int | None, use_max: bool, signed_grid: bool, generator: torch.Generator | None
) -> Levels:
    v = as_numpy_f32(x)
    b = min(bucket or v.size, v.size) or 1  # a bucket beyond the tensor is the whole tensor
    levels = runtime.empty(v.size, level_dtype(s))
    norms = K.stochastic_levels(v, b, s, use_max, signed_grid, draw_seed(generator), levels)
    if not np.isfinite(norms).all():  # the norms double as the NaN/Inf check
        raise_nonfinite(x)
    return Levels(torch.from_numpy(norms), torch.from_numpy(levels))


def _dequantize(part: Part, n: int, s: int, bucket: int | None, damping: float = 1.0) -> torch.Tensor:
    assert isinstance(part, Levels)
    factors = part.scales.numpy().astype(np.float64) * (damping / s)
    out = runtime.empty(n, np.float32)
    K.dequantize_levels(part.levels.numpy(), factors, min(bucket or n, n) or 1, out)
    return torch.from_numpy(out)


@dataclass(frozen=True)
class QSGD(ValueOperator):
    """QSGD stochastic quantization (Alistarh et al., 2017).

    Each bucket of ``bucket`` consecutive elements (the whole tensor if None) is
    scaled by its l2 norm (or max-abs with ``norm="max"``) and every magnitude is
    rounded stochastically to one of ``levels + 1`` points {0, 1/s, ..., 1}, so
    E[Q(v)] = v. Variance per bucket of n elements: E||Q(v) - v||^2 <= beta ||v||^2 with
    beta = min(n/s^2, sqrt(n)/s) for the l2 norm (Lemma 3.1) and
    min(n/(4 s^2), sqrt(n)/s) for max-abs.

    ``damped=True`` returns Q(v) / (1 + beta), the biased contraction that Qsparse-local-SGD
    composes with top-k (Basu et al., 2019, Lemma 1): then
    E||v - C(v)||^2 <= (1 - 1/(1 + beta)) ||v||^2.
    """

    levels: int
    norm: str = "l2"
    bucket: int | None = None
    damped: bool = False

    name: ClassVar[str] = "qsgd"
    positional: ClassVar[tuple[str, ...]] = ("levels",)
    checks_finite: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or not 1 <= self.levels <= MAX_LEVELS:
            raise ValueError(f"qsgd levels must be an integer in [1, {MAX_LEVELS}], got {self.levels!r}")
        if self.norm not in ("l2", "max"):
            raise ValueError(f"qsgd norm must be 'l2' or 'max', got {self.norm!r}")
        _check_bucket(self.bucket)
        if not isinstance(self.damped, bool):
            raise ValueError(f"qsgd damped must be true or false, got {self.damped!r}")

    def beta(self, n: int) -> float:
        """Variance factor for a vector of n elements (the largest bucket decides)."""
        m = min(self.bucket or n, n)
        if m == 0:
            return 0.0
        s = self.levels
        dense = m / (4 * s * s) if self.norm == "max" else m / (s * s)
        return min(dense, math.sqrt(m) / s)

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        return _quantize(x, self.levels, self.bucket, self.norm == "max", False, generator)

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        damping = 1.0 / (1.0 + self.beta(n)) if self.damped else 1.0
        return _dequantize(part, n, self.levels, self.bucket, damping)

    def properties(self, n: int) -> Properties:
        beta = self.beta(n)
        if self.damped:
            return Properties(unbiased=False, contraction=1.0 / (1.0 + beta))
        return Properties(unbiased=True, variance=beta)


@dataclass(frozen=True)
class Grid(ValueOperator):
    """AsyLPG's b-bit low-precision grid (Yu, Wu, Huang, 2019).

    The grid is {-M, ..., M} * delta with M = 2^(b-1) - 1 and delta = ||x||_inf / M per
    bucket, so nothing is ever clipped; each value rounds to one of its two grid
    neighbours with probabilities that make it unbiased. The same operator quantizes
    gradients (uplink) and the model itself (stateless downlink). Variance per bucket of
    n elements: sum delta^2 p(1-p) <= min(n/(4 M^2), sqrt(n)/M) ||x||^2.
    """

    bits: int
    bucket: int | None = None

    name: ClassVar[str] = "grid"
    positional: ClassVar[tuple[str, ...]] = ("bits",)
    checks_finite: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"grid bits must be an integer in [2, 16], got {self.bits!r}")
        _check_bucket(self.bucket)

    @property
    def max_level(self) -> int:
        """M = 2^(bits-1) - 1: the grid is symmetric, so one of the 2^bits codes is unused."""
        return (1 << (self.bits - 1)) - 1

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        return _quantize(x, self.max_level, self.bucket, True, True, generator)

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        return _dequantize(part, n, self.max_level, self.bucket)

    def properties(self, n: int) -> Properties:
        m = min(self.bucket or n, n)
        big_m = self.max_level
        var = min(m / (4 * big_m * big_m), math.sqrt(m) / big_m) if m else 0.0
        return Properties(unbiased=True, variance=var)


@dataclass(frozen=True)
class Sign(ValueOperator):
    """Scaled sign, C(x) = ||x||_1 / n * sign(x) (Karimireddy et al., 2019).

    Biased; exactly ||x - C(x)||^2 = ||x||^2 - ||x||_1^2 / n, a contraction with
    factor ||x||_1^2 / (n ||x||^2) >= 1/n. After top-k this is sign-top-k.
    """

    name: ClassVar[str] = "sign"

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        v = as_numpy_f32(x)
        n = v.size
        negative = np.empty(n, np.bool_)
        total = K.abs_sum_and_signs(v, negative)  # one serial pass (torch's reductions
        scale = float(np.float32(total / n)) if n else 0.0  # stall on busy machines)
        return Signs(scale, torch.from_numpy(negative))

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        assert isinstance(part, Signs)
        out = np.empty(n, np.float32)
        K.fill_signs(part.negative.contiguous().numpy(), np.float32(part.scale), out)
        return torch.from_numpy(out)

    def properties(self, n: int) -> Properties:
        return Properties(unbiased=False, contraction=1.0 / n if n else 1.0)


@dataclass(frozen=True)
class _Cast(ValueOperator):
    """Deterministic round-to-nearest cast; refuses values the format would turn into Inf."""

    target: ClassVar[torch.dtype]
    unit_roundoff: ClassVar[float]
    #: Bits of Inf in the target format (with the sign bit clear): NaN's are above.
    inf_bits: ClassVar[int]
    checks_finite: ClassVar[bool] = True

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        y = _empty_like_dtype(x.numel(), self.target).copy_(x)
        # One check, on the cast values (half the bytes of float32 input): NaN and Inf
        # stay NaN and Inf, and a finite value beyond the format's range becomes Inf.
        if R.max_abs_half_key(y.view(torch.int16).numpy().view(np.uint16)) >= self.inf_bits:
            if not bool(torch.isfinite(x).all()):
                raise_nonfinite(x)
            big = float(x.abs().max())
            hint = "use bf16 or a quantizer instead" if self.target == torch.float16 else "use a quantizer instead"
            raise ValueError(
                f"{self.name} cannot represent values of magnitude {big:.6g} (max "
                f"{torch.finfo(self.target).max:.6g}); {hint}"
            )
        return Raw(y)

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        assert isinstance(part, Raw)
        return empty_tensor(part.values.numel()).copy_(part.values)

    def properties(self, n: int) -> Properties:
        # Relative error per element <= u, so ||x - C(x)||^2 <= u^2 ||x||^2 (normal range).
        return Properties(unbiased=False, contraction=1.0 - self.unit_roundoff**2)


def _empty_like_dtype(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised n-element tensor of a 16-bit float dtype, numpy-allocated."""
    if dtype == torch.float16:
        return empty_tensor(n, np.float16)
    return empty_tensor(n, np.int16).view(dtype)  # bfloat16: numpy has no such dtype


@dataclass(frozen=True)
class FP16(_Cast):
    """IEEE half precision: 2 bytes per value, relative error <= 2^-11."""

    name: ClassVar[str] = "fp16"
    target: ClassVar[torch.dtype] = torch.float16
    unit_roundoff: ClassVar[float] = 2.0**-11
    inf_bits: ClassVar[int] = 0x7C00


@dataclass(frozen=True)
class BF16(_Cast):
    """bfloat16: 2 bytes per value, float32's range, relative error <= 2^-8."""

    name: ClassVar[str] = "bf16"
    target: ClassVar[torch.dtype] = torch.bfloat16
    unit_roundoff: ClassVar[float] = 2.0**-8
    inf_bits: ClassVar[int] = 0x7F80
