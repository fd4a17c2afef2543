"""Compiled CPU kernels behind the operators: randomness, norms, stochastic rounding
and dequantisation (the sparsifiers' kernels are in ``_sparse_kernels``).

Why numba: the operators must beat established peers (bitsandbytes blockwise-8,
fedlab's QSGD/top-k) on 10M-element tensors. Plain torch needs ~8 full passes and a
72 ms ``torch.rand`` for stochastic rounding; these kernels fuse the passes and draw
their randomness from a counter-based generator, so every element's random number
depends only on ``(seed, index)``. That makes the result independent of the thread
count and lets chunks run in parallel without sharing generator state.

Every kernel takes flat, contiguous numpy arrays; the operators do the torch plumbing.

Performance notes (they decide how the loops are written):

* Inner loops run over *slices* (``for j in range(seg.size)``), never over
  ``range(lo, hi)`` on the whole array: numba must handle negative indices, and an
  index it cannot prove non-negative blocks LLVM's vectoriser (3-8x slower loops).
* Memory-bound passes (norms, finite check, scans) are serial: one core already
  streams 40 MB in ~1.5 ms, and every parallel region is a synchronisation point that
  costs far more than that when other processes share the cores. Compute-bound kernels
  (stochastic rounding, dequantisation) stay parallel.
* Big outputs are allocated with numpy (``np.empty``), which asks the kernel for huge
  pages: a fresh 40 MB buffer then costs ~3 ms of page faults instead of ~15 ms. Those a
  parallel variant writes come from ``runtime.empty``, which faults them in from one
  thread first (:func:`.runtime.fault_in` says why).
* Whether a call runs parallel, on which threading layer and where compiled kernels
  are cached is process policy, decided in :mod:`qfl.compress.runtime`.
"""

from __future__ import annotations

import functools

import numba as nb
import numpy as np

from .runtime import twin

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0  # 2**-53
_S32 = np.uint64(32)
_LO32 = np.uint64(0xFFFFFFFF)
_TWO_M32 = 1.0 / 4294967296.0  # 2**-32
_ONE_BITS = np.uint64(0x3FF0000000000000)  # float64 1.0
_S20 = np.uint64(20)

#: Elements per parallel work chunk; large enough to amortise scheduling.
CHUNK = 1 << 16
ABS_MASK = np.uint32(0x7FFFFFFF)
#: |x| keys at or above this are Inf (exactly) or NaN.
NONFINITE_KEY = np.uint32(0x7F800000)


@nb.njit(inline="always", cache=True)
def mix64(z):
    """SplitMix64 finaliser: a bijective 64-bit mixer with full avalanche."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@nb.njit(inline="always", cache=True)
def uniform(seed, i):
    """Uniform float64 in [0, 1) with 53 random bits, a pure function of (seed, i)."""
    return np.float64(mix64(seed + np.uint64(i + 1) * GOLDEN_GAMMA) >> _S11) * _TWO_M53


#: Elements per block of rounding draws: element ``i`` of block ``q = i // 64`` takes
#: the high half of draw ``32 q + i % 64`` if ``i % 64 < 32``, else the low half of draw
#: ``32 q + i % 64 - 32``. Halves of one draw go to elements 32 apart, not to neighbours,
#: so that the rounding loop reads draws and values at unit stride and vectorises.
DRAW_BLOCK = 64
_HALF = DRAW_BLOCK // 2


@nb.njit(inline="always", cache=True)
def _draw(seed, h):
    return mix64(seed + np.uint64(h + 1) * GOLDEN_GAMMA)


@nb.njit(inline="always", cache=True)
def fill_draws(seed, q, bits):
    """The uniforms in [0, 1) of the DRAW_BLOCK elements of block ``q``, 32 random bits
    each (the two halves of one SplitMix64 output per two elements, a pure function of
    (seed, index)), written into the uint64 buffer ``bits`` as the float64 bit patterns
    of ``1 + u``: read them with :func:`_uniform` on its float64 view.

    Stochastic rounding needs no more bits (a rounding probability off by < 2^-32 of
    a level is far below float32's resolution of the result), and the 64-bit mixer's two
    multiplies are the core of the draw. Why bit patterns: ``1 + w 2^-32`` for a 32-bit
    ``w`` is exact in float64, so OR-ing ``w << 20`` under the exponent of 1.0 and
    subtracting 1.0 (exact: Sterbenz) gives ``w 2^-32`` bit for bit -- with integer and
    float instructions every x86-64 vector unit has, where ``float64(w)`` of a uint64 is
    a conversion AVX2 lacks (emulated lane by lane: grid(8)'s rounding of 10M elements
    took 28 ms on an AVX2 machine, 13 ms like this). Written as one unit-stride loop
    over the block's 32 draws, it vectorises.
    """
    lo = bits[:_HALF]
    hi = bits[_HALF:DRAW_BLOCK]
    h0 = q * _HALF
    for k in range(_HALF):
        r = _draw(seed, h0 + k)
        lo[k] = _ONE_BITS | ((r >> _S32) << _S20)
        hi[k] = _ONE_BITS | ((r & _LO32) << _S20)


@nb.njit(inline="always", cache=True)
def _uniform(one_plus_u):
    """The uniform of a :func:`fill_draws` bit pattern read as float64."""
    return one_plus_u - 1.0


@nb.njit(cache=True)
def uniform_at(seed, i):
    """Element i's uniform of :func:`fill_draws`, alone (for tests and references)."""
    q, p = i // DRAW_BLOCK, i % DRAW_BLOCK
    r = _draw(seed, q * _HALF + p % _HALF)
    return np.float64(r >> _S32) * _TWO_M32 if p < _HALF else np.float64(r & _LO32) * _TWO_M32


@nb.njit(cache=True)
def _rounded_up_f32(v):
    """Smallest float32 >= v (v >= 0): scales must never shrink below the true norm."""
    f = np.float32(v)
    if np.float64(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return f


# ------------------------------------------------------------------ reductions
@nb.njit(inline="always", cache=True)
def _max_key(keys):
    """Largest ``bits & 0x7FFFFFFF`` of a uint32 view of float32 values, i.e. the largest
    |x| as an order-preserving integer (NaN > Inf > finite). Integer max vectorises
    without fast-math, unlike a float max."""
    m = np.uint32(0)
    for i in range(keys.size):
        m = max(m, keys[i] & ABS_MASK)
    return m


@nb.njit(cache=True, fastmath={"reassoc"})  # not inlined: numba would drop its flags
def _sum_sq(xs):
    """sum(x^2) in float64. Reassociation lets LLVM split the sum over vector lanes
    (eight interleaved scalar accumulators did not vectorise: 1.3 vs 0.35 ns per element
    in 512-element buckets). The order is fixed by the compiled loop, so the result is
    the same on every run and thread count; float64 keeps it within 1e-13 of exact."""
    t = 0.0
    for i in range(xs.size):
        v = np.float64(xs[i])
        t += v * v
    return t


@nb.njit(cache=True)
def bucket_norms(x, bucket, use_max):
    """Per-bucket l2 norm (``use_max=False``) or max-abs of float32 ``x``, as float32
    rounded up.

    One serial, vectorised pass. A bucket holding NaN or Inf gets a NaN or Inf norm
    (squares of finite float32 values cannot overflow a float64 sum), so checking the
    norms for finiteness checks the input: the operators rely on that instead of a
    separate pass.
    """
    n = x.size
    nbk = (n + bucket - 1) // bucket
    out = np.empty(nbk, np.float32)
    for b in range(nbk):
        out[b] = _norm(x, b * bucket, min(b * bucket + bucket, n), use_max)
    return out


@nb.njit(inline="always", cache=True)
def _norm(x, lo, hi, use_max):
    """l2 norm or max-abs of ``x[lo:hi]`` as float32 rounded up (see :func:`bucket_norms`)."""
    if use_max:
        return np.uint32(_max_key(x[lo:hi].view(np.uint32))).view(np.float32)
    return _rounded_up_f32(np.sqrt(_sum_sq(x[lo:hi])))


@nb.njit(cache=True)
def count_nonfinite(x):
    """Number of NaN/Inf elements of float32 ``x``: one serial vectorised pass, no mask."""
    keys = x.view(np.uint32)
    m = 0
    for i in range(keys.size):
        m += (keys[i] & NONFINITE_KEY) == NONFINITE_KEY
    return m


@nb.njit(inline="always", cache=True)
def outside(v, bound):
    """Whether ``v`` is NaN or beyond ``bound`` in magnitude: NaN fails both comparisons,
    and ``&`` rather than ``and`` leaves no branch, so loops over it vectorise."""
    return not ((-bound <= v) & (v <= bound))


@nb.njit(inline="always", cache=True)
def _outside_chunk(x, bound):
    m = 0
    for i in range(x.size):
        m += outside(x[i], bound)
    return m


@twin
def _outside(x, bound, counts):
    for c in nb.prange(counts.size):
        counts[c] = _outside_chunk(x[c * CHUNK : c * CHUNK + CHUNK], bound)


def count_outside(x: np.ndarray, bound: float) -> int:
    """Number of elements of flat float32/float64 ``x`` that are NaN or beyond ``bound`` in
    magnitude: one pass where numpy's ``min`` and ``max`` make two. The comparison runs
    in ``x``'s own dtype (at full vector width) against the largest value of that dtype
    not above ``bound``, which for float32 ``x`` is the same test as against ``bound``
    itself."""
    counts = np.zeros((x.size + CHUNK - 1) // CHUNK, np.int64)
    _outside(x.size, x, largest_within(x.dtype, bound), counts)
    return int(counts.sum())


@functools.lru_cache(maxsize=64)
def largest_within(dtype: np.dtype, bound: float) -> np.floating:
    """The largest value of float ``dtype`` not above ``bound`` (>= 0): comparing a value
    of that dtype with it is comparing it with ``bound``, without widening. Cached: the
    checks ask it per tensor with the same few dtypes and bounds (~5 us per call)."""
    b = np.dtype(dtype).type(min(bound, float(np.finfo(dtype).max)))
    if float(b) > bound:
        b = np.nextafter(b, b.dtype.type(-np.inf))
    return b


@nb.njit(cache=True)
def abs_sum_and_signs(x, negative):
    """sum |x_i| in float64 (eight interleaved accumulators, fixed order) and
    ``negative[i] = x[i] < 0``, in one serial pass."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    n = x.size
    m = n - n % 8
    for i in range(0, m, 8):
        a0 += abs(np.float64(x[i]))
        a1 += abs(np.float64(x[i + 1]))
        a2 += abs(np.float64(x[i + 2]))
        a3 += abs(np.float64(x[i + 3]))
        a4 += abs(np.float64(x[i + 4]))
        a5 += abs(np.float64(x[i + 5]))
        a6 += abs(np.float64(x[i + 6]))
        a7 += abs(np.float64(x[i + 7]))
    t = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        t += abs(np.float64(x[i]))
    for i in range(n):
        negative[i] = x[i] < 0
    return t


@nb.njit(cache=True)
def fill_signs(negative, scale, out):
    """``out[i] = -scale if negative[i] else scale``."""
    for i in range(out.size):
        out[i] = -scale if negative[i] else scale


# ----------------------------------------------------------- stochastic rounding
@nb.njit(inline="always", cache=True)
def _round_one(v, f, s, u, signed_grid):
    """The level of one value: the grid rounds the signed value, QSGD its magnitude.

    Branch-free and in float64 and int32 only, so that loops over it vectorise on AVX2
    too (int64 min/max and float64 -> int64 conversions are AVX-512 instructions; AVX2
    emulates them lane by lane). The levels are those of truncating to int64 and
    clamping after: truncation is monotonic and the bounds are integers, so clamping the
    float first gives the same integer, which then fits int32 (clamped, the grid's value
    is at most 2s + 1 < 2^16 and QSGD's at most s <= 2^30).
    """
    v = np.float64(v)
    if signed_grid:  # t = v f + u + s + 1 > 0, so truncating is flooring: no floor call
        t = min(max(v * f + u + (s + 1), np.float64(1)), np.float64(2 * s + 1))
        return np.int32(t) - np.int32(s + 1)
    lv = np.int32(min(abs(v) * f + u, np.float64(s)))
    return -lv if v < 0.0 else lv


@nb.njit(inline="always", cache=True)
def _round(xs, us, out, f, s, signed_grid):
    """Levels of ``xs`` with the :func:`fill_draws` bit patterns ``us`` (float64 view)."""
    for j in range(xs.size):
        out[j] = _round_one(xs[j], f, s, _uniform(us[j]), signed_grid)


@nb.njit(inline="always", cache=True)
def _round_block(xs, out, f, s, seed, q, signed_grid, bits):
    """Levels of one whole DRAW_BLOCK inside one bucket: its draws into ``bits`` (in L1),
    then one unit-stride rounding loop over the block, each loop vectorised whole."""
    fill_draws(seed, q, bits)
    _round(xs, bits.view(np.float64), out, f, s, signed_grid)


@nb.njit(inline="always", cache=True)
def _round_piece(x, out, f, s, signed_grid, seed, i, end, bits, filled):
    """Levels of ``x[i:end]``, a piece of one DRAW_BLOCK, with the block's draws in
    ``bits`` (drawn now unless ``filled`` says they are there); returns the block drawn."""
    q = i // DRAW_BLOCK
    if q != filled:
        fill_draws(seed, q, bits)
    us = bits.view(np.float64)[i - q * DRAW_BLOCK : end - q * DRAW_BLOCK]
    if signed_grid:
        _round(x[i:end], us, out[i:end], f, s, True)
    else:
        _round(x[i:end], us, out[i:end], f, s, False)
    return q


@nb.njit(inline="always", cache=True)
def _levels_chunk(x, norms, own_norms, use_max, bucket, s, signed_grid, seed, out, c, u):
    """Levels of chunk ``c`` (chunks start on a DRAW_BLOCK), bucket by bucket: whole
    blocks in one fused loop each, the pieces of blocks a bucket boundary cuts from
    their block's draws (drawn once per block). With ``own_norms`` each bucket's norm is
    computed here, right before its rounding reads the same values from L1."""
    i = c * CHUNK
    hi = min(i + CHUNK, x.size)
    b = i // bucket
    filled = -1
    while i < hi:
        end = min(hi, (b + 1) * bucket)
        if own_norms:  # the whole bucket's norm (the chunk it starts in stores it)
            nrm32 = _norm(x, b * bucket, min(b * bucket + bucket, x.size), use_max)
            if b * bucket >= c * CHUNK:
                norms[b] = nrm32
        else:
            nrm32 = norms[b]
        nrm = np.float64(nrm32)
        b += 1
        if not nrm > 0.0 or nrm == np.inf:  # zero (or, for the caller to refuse, NaN/Inf)
            out[i:end] = 0
            i = end
            continue
        f = s / nrm
        head = min(end, (i + DRAW_BLOCK - 1) // DRAW_BLOCK * DRAW_BLOCK)
        if head > i:
            filled = _round_piece(x, out, f, s, signed_grid, seed, i, head, u, filled)
            i = head
        while i + DRAW_BLOCK <= end:
            if signed_grid:  # two calls: each compiles with the branch folded away
                _round_block(x[i : i + DRAW_BLOCK], out[i : i + DRAW_BLOCK], f, s, seed, i // DRAW_BLOCK, True, u)
            else:
                _round_block(x[i : i + DRAW_BLOCK], out[i : i + DRAW_BLOCK], f, s, seed, i // DRAW_BLOCK, False, u)
            filled = i // DRAW_BLOCK
            i += DRAW_BLOCK
        if end > i:
            filled = _round_piece(x, out, f, s, signed_grid, seed, i, end, u, filled)
            i = end


@twin
def _levels(x, norms, own_norms, use_max, bucket, s, signed_grid, seed, out):
    for c in nb.prange((x.size + CHUNK - 1) // CHUNK):
        u = np.empty(DRAW_BLOCK, np.uint64)
        _levels_chunk(x, norms, own_norms, use_max, bucket, s, signed_grid, seed, out, c, u)


#: Buckets up to this size get their norms in the rounding pass (one read of x, not
#: two); larger ones, the whole tensor among them, in a pass of their own first.
FUSED_BUCKET = 1 << 12


def stochastic_levels(x, bucket, s, use_max, signed_grid, seed, out):
    """Per-bucket norms (see :func:`bucket_norms`) and unbiased stochastic rounding of
    ``x / norm * s`` to integers, into ``out``; returns the norms.

    QSGD (``signed_grid=False``) rounds the magnitude and keeps the sign apart, levels
    in [-s, s]. The AsyLPG grid (``signed_grid=True``) rounds the signed value down or
    up, also in [-s, s]. Both are unbiased: E[level] = x / norm * s. Element i's uniform
    is :func:`uniform_at` ``(seed, i)``, whatever the split of the work; chunks run in
    parallel for large x. A bucket whose norm is not finite gets zero levels: the caller
    checks the norms and refuses such input.
    """
    own = bucket <= FUSED_BUCKET
    nbk = (x.size + bucket - 1) // bucket
    norms = np.empty(nbk, np.float32) if own else bucket_norms(x, bucket, use_max)
    _levels(x.size, x, norms, own, use_max, bucket, s, signed_grid, seed, out)
    return norms


@nb.njit(inline="always", cache=True)
def _scale(levels, out, f):
    for j in range(levels.size):
        out[j] = np.float32(np.float64(levels[j]) * f)


@nb.njit(inline="always", cache=True)
def _dequantize_chunk(levels, factors, bucket, out, c):
    hi = min(c * CHUNK + CHUNK, levels.size)
    i = c * CHUNK
    while i < hi:
        b = i // bucket
        end = min(hi, (b + 1) * bucket)
        _scale(levels[i:end], out[i:end], factors[b])
        i = end


@twin
def _dequantize(levels, factors, bucket, out):
    for c in nb.prange((levels.size + CHUNK - 1) // CHUNK):
        _dequantize_chunk(levels, factors, bucket, out, c)


def dequantize_levels(levels, factors, bucket, out):
    """``out[i] = levels[i] * factors[i // bucket]`` (factor = norm / s, damping folded in)."""
    _dequantize(levels.size, levels, factors, bucket, out)
