"""Kernels of the raw-value path (identity and the float16/bfloat16 casts): the checks,
which are all the work of that path besides the copies and casts themselves.

They run parallel for large inputs when the cores are free (:func:`.runtime.use_parallel`),
unlike the memory-bound passes of :mod:`._kernels`, which stay serial: here a check is
half of what identity costs its sender, and the cast it guards is a parallel torch copy.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._kernels import _max_key
from .runtime import twin

#: Elements per parallel task.
CHUNK = 1 << 16


def _tasks(n: int) -> int:
    return max(1, -(-n // CHUNK))


@twin
def _max_keys(keys, out):
    for c in nb.prange(out.size):
        out[c] = _max_key(keys[c * CHUNK : c * CHUNK + CHUNK])


def max_abs_key(x: np.ndarray) -> int:
    """``max |x|`` of float32 ``x`` as its IEEE bits (>= 0x7F800000: NaN or Inf present)."""
    out = np.zeros(_tasks(x.size), np.uint32)
    _max_keys(x.size, x.view(np.uint32), out)
    return int(out.max())


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
