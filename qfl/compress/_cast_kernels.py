"""Kernels of the raw-value path: the finite check of a float32 tensor and the casts
between float32 and float16/bfloat16, each one pass over the values.

torch's casts are a pass of their own after the finite and overflow check, write into
torch allocations and ran here at ~4 ns per element for float16 -> float32; these fuse
the check into the cast (the largest |x| comes out of the same loop) and split large
tensors over numba's threads. They are written on the IEEE bits, so that LLVM
vectorises them (numba has no float16 type), and round to nearest even exactly as
torch does: ``tests/test_kernels.py`` checks them against torch bit for bit, on every
float16 value and on float32 values around every rounding boundary.

Unlike the memory-bound passes of :mod:`._kernels`, which stay serial, these run
parallel for large inputs when the cores are free (:func:`.runtime.use_parallel`): on
the raw path they are all of the work, and a second core halves it.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._kernels import _max_key
from .runtime import twin

#: Elements per parallel task.
CHUNK = 1 << 16


def chunks(n: int) -> int:
    """Parallel tasks for ``n`` elements (one max per task comes back)."""
    return max(1, -(-n // CHUNK))


@twin
def _max_keys(keys, out):
    for c in nb.prange(out.size):
        out[c] = _max_key(keys[c * CHUNK : c * CHUNK + CHUNK])


def max_abs_key(x: np.ndarray) -> int:
    """``max |x|`` of float32 ``x`` as its IEEE bits (>= 0x7F800000: NaN or Inf present)."""
    out = np.zeros(chunks(x.size), np.uint32)
    _max_keys(x.size, x.view(np.uint32), out)
    return int(out.max())


@nb.njit(inline="always", cache=True)
def _to_f16_seg(x, keys, out):
    m = np.uint32(0)
    for i in range(keys.size):
        a = keys[i] & np.uint32(0x7FFFFFFF)
        m = max(m, a)
        # Normal result: rebias the exponent, add half an ulp minus one plus the kept
        # mantissa's last bit (ties to even), drop 13 bits; a carry makes 65520+ Inf.
        normal = (a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
        # Below 2^-14 the result is subnormal: m * 2^-24 with m = rint(|x| * 2^24).
        tiny = min(abs(x[i]), np.float32(2.0**-14))
        sub = np.uint32(np.rint(tiny * np.float32(2.0**24)))
        if a >= np.uint32(0x47800000):
            o = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
        elif a < np.uint32(0x38800000):
            o = sub
        else:
            o = normal
        out[i] = np.uint16(o | ((keys[i] >> np.uint32(16)) & np.uint32(0x8000)))
    return m


@twin
def _to_f16(x, keys, out, maxes):
    for c in nb.prange(maxes.size):
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, keys.size)
        maxes[c] = _to_f16_seg(x[lo:hi], keys[lo:hi], out[lo:hi])


@nb.njit(inline="always", cache=True)
def _to_bf16_seg(keys, out):
    m = np.uint32(0)
    for i in range(keys.size):
        u = keys[i]
        m = max(m, u & np.uint32(0x7FFFFFFF))
        rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        out[i] = np.uint16(np.uint32(0x7FC0) if nan else rounded)
    return m


@twin
def _to_bf16(keys, out, maxes):
    for c in nb.prange(maxes.size):
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, keys.size)
        maxes[c] = _to_bf16_seg(keys[lo:hi], out[lo:hi])


def to_half(x: np.ndarray, bfloat: bool, out: np.ndarray) -> int:
    """Round float32 ``x`` to float16 (or bfloat16) bits in uint16 ``out``, to nearest
    even, as torch does; returns ``max |x|`` as its IEEE bits, as :func:`max_abs_key`."""
    maxes = np.zeros(chunks(x.size), np.uint32)
    keys = x.view(np.uint32)
    if bfloat:
        _to_bf16(x.size, keys, out, maxes)
    else:
        _to_f16(x.size, x, keys, out, maxes)
    return int(maxes.max())


@nb.njit(inline="always", cache=True)
def _from_f16_seg(h16, out):
    for i in range(h16.size):
        h = np.uint32(h16[i])
        e = h & np.uint32(0x7C00)
        mag = (h & np.uint32(0x7FFF)) << np.uint32(13)
        m = h & np.uint32(0x3FF)
        # Subnormal m * 2^-24: p = floor(log2 m) by comparisons, which vectorise.
        p = np.uint32(0)
        for k in range(1, 10):
            p += np.uint32(m >= np.uint32(1 << k))
        sub = ((p + np.uint32(103)) << np.uint32(23)) | ((m << (np.uint32(23) - p)) & np.uint32(0x7FFFFF))
        if e == np.uint32(0x7C00):  # Inf, or NaN made quiet (as the F16C instructions torch uses do)
            o = mag | np.uint32(0x7F800000) | (np.uint32(0x400000) if m else np.uint32(0))
        elif e == np.uint32(0):
            o = sub if m else np.uint32(0)
        else:
            o = mag + np.uint32(0x38000000)
        out[i] = o | ((h & np.uint32(0x8000)) << np.uint32(16))


@twin
def _from_f16(h, out):
    for c in nb.prange(-(-h.size // CHUNK)):
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, h.size)
        _from_f16_seg(h[lo:hi], out[lo:hi])


@nb.njit(inline="always", cache=True)
def _from_bf16_seg(h, out):
    for i in range(h.size):
        out[i] = np.uint32(h[i]) << np.uint32(16)


@twin
def _from_bf16(h, out):
    for c in nb.prange(-(-h.size // CHUNK)):
        lo, hi = c * CHUNK, min(c * CHUNK + CHUNK, h.size)
        _from_bf16_seg(h[lo:hi], out[lo:hi])


def from_half(h: np.ndarray, bfloat: bool, out: np.ndarray) -> None:
    """float16 (or bfloat16) bits in uint16 ``h`` to float32 bits in uint32 ``out``, exactly."""
    (_from_bf16 if bfloat else _from_f16)(h.size, h, out)
