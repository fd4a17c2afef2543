"""Compiled CPU kernels behind the operators.

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
  pages: a fresh 40 MB buffer then costs ~3 ms of page faults instead of ~15 ms.
* Whether a call runs parallel, on which threading layer and where compiled kernels
  are cached is process policy, decided in :mod:`qfl.compress.runtime`.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .runtime import parallel_slot, twin

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0  # 2**-53

#: Elements per parallel work chunk; large enough to amortise scheduling.
CHUNK = 1 << 16
_ABS = np.uint32(0x7FFFFFFF)
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
    return np.float64(mix64(seed + np.uint64(i + 1) * _GOLDEN) >> _S11) * _TWO_M53


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
        m = max(m, keys[i] & _ABS)
    return m


@nb.njit(inline="always", cache=True)
def _sum_sq(xs):
    """sum(x^2) in float64 over eight interleaved accumulators (fixed order: the same
    result on every run and thread count, and a loop LLVM can vectorise)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    m = xs.size - xs.size % 8
    for i in range(0, m, 8):
        v0 = np.float64(xs[i])
        v1 = np.float64(xs[i + 1])
        v2 = np.float64(xs[i + 2])
        v3 = np.float64(xs[i + 3])
        v4 = np.float64(xs[i + 4])
        v5 = np.float64(xs[i + 5])
        v6 = np.float64(xs[i + 6])
        v7 = np.float64(xs[i + 7])
        a0 += v0 * v0
        a1 += v1 * v1
        a2 += v2 * v2
        a3 += v3 * v3
        a4 += v4 * v4
        a5 += v5 * v5
        a6 += v6 * v6
        a7 += v7 * v7
    t = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, xs.size):
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
    keys = x.view(np.uint32)
    for b in range(nbk):
        lo = b * bucket
        hi = min(lo + bucket, n)
        if use_max:
            out[b] = np.uint32(_max_key(keys[lo:hi])).view(np.float32)
        else:
            out[b] = _rounded_up_f32(np.sqrt(_sum_sq(x[lo:hi])))
    return out


@nb.njit(cache=True)
def count_nonfinite(x):
    """Number of NaN/Inf elements of float32 ``x``: one serial vectorised pass, no mask."""
    keys = x.view(np.uint32)
    m = 0
    for i in range(keys.size):
        m += (keys[i] & NONFINITE_KEY) == NONFINITE_KEY
    return m


@nb.njit(cache=True)
def max_abs_key(x):
    """``max |x|`` of float32 ``x`` as its IEEE bits (>= NONFINITE_KEY: NaN or Inf present)."""
    return _max_key(x.view(np.uint32))


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
def _grid_round(xs, out, f, s, seed, base):
    for j in range(xs.size):
        lv = np.int64(np.floor(np.float64(xs[j]) * f + uniform(seed, base + j)))
        out[j] = max(-s, min(s, lv))


@nb.njit(inline="always", cache=True)
def _qsgd_round(xs, out, f, s, seed, base):
    for j in range(xs.size):
        v = np.float64(xs[j])
        lv = min(s, np.int64(abs(v) * f + uniform(seed, base + j)))
        out[j] = -lv if v < 0.0 else lv


@nb.njit(inline="always", cache=True)
def _levels_chunk(x, norms, bucket, s, signed_grid, seed, out, c):
    hi = min(c * CHUNK + CHUNK, x.size)
    i = c * CHUNK
    while i < hi:
        b = i // bucket
        end = min(hi, (b + 1) * bucket)
        nrm = np.float64(norms[b])
        seg = out[i:end]
        if nrm == 0.0:
            seg[:] = 0
        elif signed_grid:
            _grid_round(x[i:end], seg, s / nrm, s, seed, i)
        else:
            _qsgd_round(x[i:end], seg, s / nrm, s, seed, i)
        i = end


@twin
def _levels(x, norms, bucket, s, signed_grid, seed, out):
    for c in nb.prange((x.size + CHUNK - 1) // CHUNK):
        _levels_chunk(x, norms, bucket, s, signed_grid, seed, out, c)


def stochastic_levels(x, norms, bucket, s, signed_grid, seed, out):
    """Unbiased stochastic rounding of ``x / norm * s`` to integers, into ``out``.

    QSGD (``signed_grid=False``) rounds the magnitude and keeps the sign apart, levels
    in [-s, s]. The AsyLPG grid (``signed_grid=True``) rounds the signed value down or
    up, also in [-s, s]. Both are unbiased: E[level] = x / norm * s.
    Work is split in CHUNK ranges walked bucket by bucket, so the per-bucket factor is
    computed once per bucket, not once per element; chunks run in parallel for large x.
    """
    _levels(x.size, x, norms, bucket, s, signed_grid, seed, out)


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


# ------------------------------------------------------------------------ top-k
#: Elements sampled to guess the top-k threshold.
_SAMPLE = 1 << 14


@nb.njit(cache=True)
def _abs_key(v):
    """Order-preserving uint32 key of |v| for float32 v (the IEEE bits without sign)."""
    return np.uint32(np.float32(v).view(np.uint32) & _ABS)


@nb.njit(cache=True)
def _pick_bin(hist, need):
    """Highest bin b with count(bins > b) < need <= count(bins >= b); returns (b, count above)."""
    above = 0
    for b in range(hist.size - 1, -1, -1):
        if above + hist[b] >= need:
            return b, above
        above += hist[b]
    return 0, above


@nb.njit(cache=True)
def _threshold(keys, k):
    """(t, ties): the k-th largest of ``keys`` (uint32, k <= size) by a two-level radix
    select, and how many keys equal to t belong to the top k."""
    hist = np.zeros(1 << 16, np.int64)
    for i in range(keys.size):
        hist[keys[i] >> 16] += 1
    hi_bin, above_hi = _pick_bin(hist, k)
    hist[:] = 0
    for i in range(keys.size):
        key = keys[i]
        if np.int64(key >> 16) == hi_bin:
            hist[key & 0xFFFF] += 1
    lo_bin, above_lo = _pick_bin(hist, k - above_hi)
    return np.uint32((hi_bin << 16) | lo_bin), k - above_hi - above_lo


@nb.njit(cache=True)
def _take(x, keys, positions, k, t, ties, idx, vals):
    """Write the top k of ``positions`` (sorted; their keys in ``keys``): every key > t and
    the first ``ties`` keys == t, in position order."""
    q = 0
    tie_rank = 0
    for j in range(positions.size):
        key = keys[j]
        if key > t or (key == t and tie_rank < ties):
            idx[q] = positions[j]
            vals[q] = x[positions[j]]
            q += 1
        if key == t:
            tie_rank += 1


@nb.njit(cache=True)
def _sample_threshold(keys, k):
    """A key that about 1.25 k + 4 sqrt(k n / m) elements reach, from a deterministic
    sample of m keys (one per stride, at a hashed offset), or 0 if the sample says nothing."""
    n = keys.size
    m = _SAMPLE
    stride = n // m
    sample = np.empty(m, np.uint32)
    for s in range(m):
        off = np.int64(mix64(np.uint64(s + 1) * _GOLDEN) % np.uint64(stride))
        sample[s] = keys[s * stride + off] & _ABS
    sample.sort()
    expected = m * (k / n)  # sample points expected above the true threshold
    rank = int(1.25 * expected + 4.0 * np.sqrt(expected) + 8.0)
    if rank >= m:
        return np.uint32(0)
    return sample[m - rank]


@nb.njit(cache=True)
def _candidates(keys, t, cap, cidx):
    """Positions with key >= t, in order, into ``cidx`` (up to cap); returns their count."""
    c = 0
    n = keys.size
    lo = 0
    while lo < n:
        hi = min(lo + CHUNK, n)
        seg = keys[lo:hi]
        for j in range(seg.size):
            if (seg[j] & _ABS) >= t:
                if c < cap:
                    cidx[c] = lo + j
                c += 1
        lo = hi
    return c


@nb.njit(inline="always", cache=True)
def _histogram(x, shift, match, match_shift):
    """Histogram of 16-bit digit ``(key >> shift) & 0xFFFF`` of the keys ``k`` with
    ``k >> match_shift == match`` (``match = -1``: all keys)."""
    n = x.size
    parts = 8
    per = (n + parts - 1) // parts
    hist = np.zeros((parts, 1 << 16), np.int64)
    for c in nb.prange(parts):
        seg = x[c * per:min(c * per + per, n)]
        h = hist[c]
        for i in range(seg.size):
            k = _abs_key(seg[i])
            if match >= 0 and np.int64(k >> np.uint32(match_shift)) != match:
                continue
            h[np.int64((k >> np.uint32(shift)) & np.uint32(0xFFFF))] += 1
    return hist.sum(axis=0)


@twin
def _topk_radix(x, k, idx, vals):
    """Exact top-k over all of x by a two-level radix select (three passes, parallel
    in the parallel variant); the fallback of ``topk_select``. Returns the number of
    non-finite elements."""
    n = x.size
    hi_hist = _histogram(x, 16, -1, 0)
    bad = hi_hist[NONFINITE_KEY >> 16:].sum()
    hi_bin, above_hi = _pick_bin(hi_hist, k)
    lo_hist = _histogram(x, 0, hi_bin, 16)
    lo_bin, above_lo = _pick_bin(lo_hist, k - above_hi)
    thresh = np.uint32((hi_bin << 16) | lo_bin)
    ties_needed = k - above_hi - above_lo
    nchunks = (n + CHUNK - 1) // CHUNK
    n_gt = np.zeros(nchunks, np.int64)
    n_eq = np.zeros(nchunks, np.int64)
    for c in nb.prange(nchunks):
        seg = x[c * CHUNK:min(c * CHUNK + CHUNK, n)].view(np.uint32)
        g = 0
        e = 0
        for i in range(seg.size):
            key = seg[i] & _ABS
            g += key > thresh
            e += key == thresh
        n_gt[c] = g
        n_eq[c] = e
    # Chunk c takes the ties ranked [eq_before, eq_before + n_eq) globally, up to ties_needed.
    start = np.zeros(nchunks, np.int64)
    eq_before = np.zeros(nchunks, np.int64)
    pos = 0
    eqs = 0
    for c in range(nchunks):
        start[c] = pos
        eq_before[c] = eqs
        take = min(n_eq[c], max(0, ties_needed - eqs))
        pos += n_gt[c] + take
        eqs += n_eq[c]
    for c in nb.prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        p = start[c]
        tie_rank = eq_before[c]
        for i in range(lo, hi):
            key = _abs_key(x[i])
            if key > thresh:
                idx[p] = i
                vals[p] = x[i]
                p += 1
            elif key == thresh:
                if tie_rank < ties_needed:
                    idx[p] = i
                    vals[p] = x[i]
                    p += 1
                tie_rank += 1
    return bad


def topk_select(x, k):
    """Exact top-k of float32 ``x`` by magnitude; ties go to lower indices.

    Returns ``(indices, values, nonfinite)``: indices sorted, ``values = x[indices]``, and
    whether x holds NaN/Inf (then the selection is meaningless and the caller refuses it).

    A deterministic sample of 16K keys gives a threshold that ~1.25 k elements reach;
    one serial pass collects them, and an exact radix select among those candidates
    picks the top k. Whenever the sample misleads (fewer than k candidates, or far too
    many, e.g. with massive ties), or k is a large fraction of n, an exact radix select
    over all of x runs instead, so the result never depends on the sample. NaN/Inf have
    the largest keys: when present they are always candidates (or the fallback's
    histogram counts them).
    """
    idx = np.empty(k, np.int64)
    vals = np.empty(k, np.float32)
    if k == 0:
        return idx, vals, count_nonfinite(x) > 0
    status = _topk_sampled(x, k, idx, vals)
    if status >= 0:
        return idx, vals, status > 0
    return idx, vals, _topk_radix(x.size, x, k, idx, vals) > 0


@nb.njit(cache=True)
def _topk_sampled(x, k, idx, vals):
    """The sampled path of :func:`topk_select`: 1 if done and x holds NaN/Inf, 0 if done
    and finite, -1 if the sample misled (or x is too small to sample) and nothing is
    written."""
    n = x.size
    keys = x.view(np.uint32)
    if n >= 64 * _SAMPLE and 4 * k <= n:
        t = _sample_threshold(keys, k)
        if t > 0:
            cap = 3 * k + 4096
            cidx = np.empty(cap, np.int64)
            c = _candidates(keys, t, cap, cidx)
            if k <= c <= cap:
                cidx = cidx[:c]
                ckeys = np.empty(c, np.uint32)
                worst = np.uint32(0)
                for j in range(c):
                    ckeys[j] = keys[cidx[j]] & _ABS
                    worst = max(worst, ckeys[j])
                t2, ties = _threshold(ckeys, k)
                _take(x, ckeys, cidx, k, t2, ties, idx, vals)
                return 1 if worst >= NONFINITE_KEY else 0
    return -1


# ------------------------------------------------------------------- scattering
@nb.njit(cache=True)
def scatter(idx, vals, out):
    """``out[:] = 0; out[idx] = vals`` in a single pass over ``out`` when ``idx`` is
    strictly increasing (every payload's positions are), else zero-fill then scatter
    (a later duplicate wins). Returns -1 if an index is out of range (``out`` is then
    unspecified), else 0."""
    n = out.size
    k = idx.size
    ordered = True
    for j in range(k):
        p = idx[j]
        if p < 0 or p >= n:
            return -1
        if j and p <= idx[j - 1]:
            ordered = False
    if not ordered:
        out[:] = 0
        for j in range(k):
            out[idx[j]] = vals[j]
        return 0
    start = 0
    for j in range(k):
        p = idx[j]
        out[start:p] = 0
        out[p] = vals[j]
        start = p + 1
    out[start:] = 0
    return 0


# -------------------------------------------------------------------- rand-k
@nb.njit(cache=True)
def random_subset(n, k, seed):
    """Uniform k-subset of range(n), sorted, by Floyd's algorithm: O(k) draws.

    A pure function of (n, k, seed): sender and receiver regenerate the same indices, so
    rand-k never sends them. Part of the wire format: changing it needs a new version.
    (Membership lives in a bitset, which stays in cache, and is read back in order
    instead of sorting: the same subset, faster.)
    """
    words = np.zeros((n + 63) >> 6, np.uint64)
    for j in range(n - k, n):
        t = np.int64(uniform(seed, j - (n - k)) * (j + 1))
        if t > j:
            t = j
        bit = np.uint64(1) << np.uint64(t & 63)
        if words[t >> 6] & bit:
            t = j
            bit = np.uint64(1) << np.uint64(t & 63)
        words[t >> 6] |= bit
    out = np.empty(k, np.int64)
    c = 0
    for w in range(words.size):
        word = words[w]
        while word:
            low = word & (~word + np.uint64(1))  # lowest set bit
            out[c] = (w << 6) + _ctz64(low)
            c += 1
            word ^= low
    return out


@nb.njit(inline="always", cache=True)
def _ctz64(single_bit):
    """Index of the only set bit of a power of two (exact through the float exponent)."""
    return np.int64(math.frexp(np.float64(single_bit))[1]) - 1


# ------------------------------------------------------------------ Bernoulli
@nb.njit(inline="always", cache=True)
def _sum_abs_clipped_seg(x, lam):
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    cnt = 0
    n = x.size
    m = n - n % 8
    for i in range(0, m, 8):
        v0 = abs(np.float64(x[i]))
        v1 = abs(np.float64(x[i + 1]))
        v2 = abs(np.float64(x[i + 2]))
        v3 = abs(np.float64(x[i + 3]))
        v4 = abs(np.float64(x[i + 4]))
        v5 = abs(np.float64(x[i + 5]))
        v6 = abs(np.float64(x[i + 6]))
        v7 = abs(np.float64(x[i + 7]))
        c0 = lam * v0 >= 1.0
        c1 = lam * v1 >= 1.0
        c2 = lam * v2 >= 1.0
        c3 = lam * v3 >= 1.0
        c4 = lam * v4 >= 1.0
        c5 = lam * v5 >= 1.0
        c6 = lam * v6 >= 1.0
        c7 = lam * v7 >= 1.0
        a0 += 0.0 if c0 else v0
        a1 += 0.0 if c1 else v1
        a2 += 0.0 if c2 else v2
        a3 += 0.0 if c3 else v3
        a4 += 0.0 if c4 else v4
        a5 += 0.0 if c5 else v5
        a6 += 0.0 if c6 else v6
        a7 += 0.0 if c7 else v7
        cnt += (np.int64(c0) + np.int64(c1) + np.int64(c2) + np.int64(c3)
                + np.int64(c4) + np.int64(c5) + np.int64(c6) + np.int64(c7))
    total = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    for i in range(m, n):
        a = abs(np.float64(x[i]))
        if lam * a >= 1.0:
            cnt += 1
        else:
            total += a
    return total, cnt


_BIG = 16 * CHUNK


@twin
def _sum_abs_clipped_chunks(x, lam, sums, cnts):
    for c in nb.prange(sums.size):
        sums[c], cnts[c] = _sum_abs_clipped_seg(x[c * _BIG:min(c * _BIG + _BIG, x.size)], lam)


def _sum_abs_clipped(x, lam):
    """(sum of |x_i| where lam*|x_i| < 1, count where lam*|x_i| >= 1).

    Per-chunk partials (eight interleaved float64 accumulators each, so the loop
    vectorises) are added in chunk order: the same result for any thread count.
    """
    nchunks = (x.size + _BIG - 1) // _BIG
    sums = np.zeros(nchunks, np.float64)
    cnts = np.zeros(nchunks, np.int64)
    _sum_abs_clipped_chunks(x.size, x, lam, sums, cnts)
    total = 0.0
    for v in sums:
        total += float(v)
    return total, int(cnts.sum())


def magnitude_lambda(x, budget):
    """lambda with sum_i min(1, lambda*|x_i|) = budget (Wangni et al., 2018).

    Fixed-point iteration: clip the coordinates that would get p_i >= 1, spread the
    remaining budget over the rest proportionally to |x_i|. The clipped set only grows,
    so it terminates in at most n steps; in practice 2-4. A NaN/Inf in x makes the
    result NaN/Inf (the caller checks).
    """
    total, _ = _sum_abs_clipped(x, 0.0)
    if total == 0.0 or not np.isfinite(total):
        return total
    lam = budget / total
    for _ in range(x.size + 1):
        rest, clipped = _sum_abs_clipped(x, lam)
        if rest == 0.0 or clipped >= budget:
            return lam
        new = (budget - clipped) / rest
        if new <= lam:
            return lam
        lam = new
    return lam


@nb.njit(inline="always", cache=True)
def _keep_prob(v, p_const, lam):
    return p_const if p_const > 0.0 else min(1.0, lam * abs(np.float64(v)))


@nb.njit(inline="always", cache=True)
def _keep_count(x, p_const, lam, seed, c):
    lo = c * CHUNK
    seg = x[lo:min(lo + CHUNK, x.size)]
    m = 0
    for j in range(seg.size):
        # uniform >= 0, so p = 0 never keeps: no branch, and the loop vectorises.
        m += uniform(seed, lo + j) < _keep_prob(seg[j], p_const, lam)
    return m


@nb.njit(inline="always", cache=True)
def _keep_fill(x, p_const, lam, seed, c, q, idx, vals):
    lo = c * CHUNK
    seg = x[lo:min(lo + CHUNK, x.size)]
    for j in range(seg.size):
        p = _keep_prob(seg[j], p_const, lam)
        if uniform(seed, lo + j) < p:
            idx[q] = lo + j
            vals[q] = np.float32(np.float64(seg[j]) / p)
            q += 1


@twin
def _keep(x, p_const, lam, seed, counts, starts, idx, vals, fill):
    for c in nb.prange(counts.size):
        if fill:
            _keep_fill(x, p_const, lam, seed, c, starts[c], idx, vals)
        else:
            counts[c] = _keep_count(x, p_const, lam, seed, c)


def bernoulli_keep(x, p_const, lam, seed):
    """Keep i with probability p_i (p_const if > 0, else min(1, lam*|x_i|)); sorted indices.

    Returns kept indices and ``x_i / p_i`` for them: the unbiased Sparse-AsyLPG /
    Wangni et al. sparsifier. Two passes (count, then fill) draw the same
    counter-based uniforms, so no n-sized mask is needed.
    """
    nchunks = (x.size + CHUNK - 1) // CHUNK
    counts = np.zeros(nchunks, np.int64)
    with parallel_slot(x.size) as parallel:
        kernel = _keep.variant(parallel)
        idx = np.empty(0, np.int64)
        vals = np.empty(0, np.float32)
        kernel(x, float(p_const), float(lam), seed, counts, counts, idx, vals, False)
        starts = np.zeros(nchunks, np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        total = int(counts.sum())
        idx = np.empty(total, np.int64)
        vals = np.empty(total, np.float32)
        kernel(x, float(p_const), float(lam), seed, counts, starts, idx, vals, True)
    return idx, vals
