"""Kernels of the raw-value path (identity and the float16/bfloat16 casts): the checks,
which are all the work of that path besides the copies and casts themselves.

They run parallel for large inputs when the cores are free (:func:`.runtime.use_parallel`),
unlike the memory-bound passes of :mod:`._kernels`, which stay serial: here a check is
half of what identity costs its sender, and the cast it guards is a parallel torch copy.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._kernels import count_nonfinite
from .runtime import twin

#: Elements per parallel task.
CHUNK = 1 << 16


def _tasks(n: int) -> int:
    return max(1, -(-n // CHUNK))


@twin
def _nonfinite_counts(x, out):
    for c in nb.prange(out.size):
        out[c] = count_nonfinite(x[c * CHUNK : c * CHUNK + CHUNK])


def nonfinite_count(x: np.ndarray) -> int:
    """Number of NaN/Inf elements of float32 ``x``."""
    out = np.zeros(_tasks(x.size), np.int64)
    _nonfinite_counts(x.size, x, out)
    return int(out.sum())


@nb.njit(inline="always", cache=True)
def _max_half_key(bits):
    m = np.uint16(0)
    for i in range(bits.size):
        m = max(m, bits[i] & np.uint16(0x7FFF))
    return m


@twin
def _max_half_keys(bits, out):
    for c in nb.prange(out.size):
        out[c] = _max_half_key(bits[c * CHUNK : c * CHUNK + CHUNK])


def max_abs_half_key(bits: np.ndarray) -> int:
    """``max |y|`` of float16 or bfloat16 values given as their uint16 bits, as bits
    (NaN > Inf > finite, as for float32: >= 0x7C00 is not finite in float16, >= 0x7F80
    in bfloat16)."""
    out = np.zeros(_tasks(bits.size), np.uint16)
    _max_half_keys(bits.size, bits, out)
    return int(out.max())
