"""The server's passes over a model or a sparse update, compiled: one pass where numpy
makes several, each with numpy's result bit for bit.

FedAvgMomentum's step from the round's summed updates, written in numpy, rebuilds the
average (``base + update``), subtracts it from the model, scales and adds the velocity,
subtracts that from the model and copies the result into Flower's Arrays: five passes
over the model and three model-sized temporaries. The kernel here reads each element
once, writes the velocity in place and the new model straight into the bytes Flower
ships. It does the same IEEE operations in the same order and precision (the strategy
passes the momentum and the rate in the model's dtype, as numpy's weak Python scalars
are), so its result equals numpy's bit for bit (tests/test_aggregate.py).

A dense update is checked in one pass over base and update, without rebuilding the
tensor (numpy: a sum and a check per tensor, ~20 us each on the small tensors that make
up half a ResNet's count). A sparse update (top-k, rand-k: a tenth of the model or less) is checked and summed at
its kept positions. numpy gathers the model's values there, adds, reduces, and scales
the values before ``ufunc.at``: four temporaries per tensor, ~25 ms for two ResNet-18
replies at 10%. Here each is one pass over the kept positions, which the decoder has
checked to be strictly increasing and within the tensor (no bounds are checked here).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..compress._kernels import outside
from ..compress.runtime import twin


@twin
def momentum_step(base, update, current, velocity, momentum, rate, first, bound, out):
    """``new = base + update``; ``v = momentum * v + (current - new)`` (``v = current - new``
    on the first step); ``out = current - rate * v``: flat arrays of one float dtype.
    Returns how many elements of ``out`` are NaN or beyond ``bound`` in magnitude (the
    server's check of the new model, while its values are at hand)."""
    beyond = 0
    for i in nb.prange(out.size):
        step = current[i] - (base[i] + update[i])
        v = step if first else velocity[i] * momentum + step
        velocity[i] = v
        x = current[i] - rate * v
        out[i] = x
        beyond += outside(x, bound)
    return beyond


@nb.njit(cache=True)
def sparse_beyond(base, indices, values, bound):
    """Whether ``base[indices] + values`` (base and values of one float dtype) holds NaN,
    Inf or a magnitude beyond ``bound``: the rebuilt tensor's check at the positions a
    sparse update changes."""
    for i in range(indices.size):
        if outside(base[indices[i]] + values[i], bound):
            return True
    return False


@nb.njit(cache=True)
def dense_beyond(base, update, bound):
    """How many elements of ``base + update`` (flat, one float dtype) are NaN, Inf or beyond
    ``bound`` in magnitude: the rebuilt tensor's check without building it. Counting
    rather than stopping at the first lets the loop vectorise; most tensors pass."""
    beyond = 0
    for i in range(base.size):
        beyond += outside(base[i] + update[i], bound)
    return beyond


@nb.njit(cache=True)
def scatter_add(total, indices, values, factor):
    """``total[indices] += values * factor`` (one float dtype; distinct indices)."""
    for i in range(indices.size):
        total[indices[i]] += values[i] * factor


def warm_kernels() -> None:
    """Reach every kernel here with the argument types aggregation brings -- the model
    read-only (views of its Arrays' bytes) or writable, float32 and float64, updates
    through torch (writable) -- in both variants, for ``python -m qfl warm``."""
    for dtype in (np.float32, np.float64):
        work = np.zeros(3, dtype)
        for current in (np.frombuffer(work.tobytes(), dtype), work.copy()):
            for kernel in (momentum_step.serial, momentum_step.parallel):
                kernel(work, work, current, work.copy(), dtype(0.5), dtype(1.0), True, dtype(1.0), work.copy())
        indices = np.arange(3, dtype=np.int64)
        sparse_beyond(work, indices, work, 1.0)
        dense_beyond(work, work, 1.0)
        scatter_add(work, indices, work, dtype(0.5))
