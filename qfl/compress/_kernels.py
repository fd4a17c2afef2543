"""Compiled CPU kernels behind the operators.

Why numba: the operators must beat established peers (bitsandbytes blockwise-8,
fedlab's QSGD/top-k) on 10M-element tensors. Plain torch needs ~8 full passes and a
72 ms ``torch.rand`` for stochastic rounding; these kernels fuse the passes and draw
their randomness from a counter-based generator, so every element's random number
depends only on ``(seed, index)``. That makes the result independent of the thread
count and lets chunks run in parallel without sharing generator state.

Every kernel takes flat, contiguous numpy arrays; the operators do the torch plumbing.
"""

from __future__ import annotations

import numba as nb
import numpy as np

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


@nb.njit(parallel=True, cache=True)
def bucket_norms(x, bucket, use_max):
    """Per-bucket l2 norm (``use_max=False``) or max-abs, as float32 rounded up.

    Large buckets are split into CHUNK-sized partials reduced in a fixed order, so the
    result is bit-identical for any number of threads.
    """
    n = x.size
    nbk = (n + bucket - 1) // bucket
    cpb = (bucket + CHUNK - 1) // CHUNK  # chunks per bucket
    parts = np.zeros(nbk * cpb, np.float64)
    for j in nb.prange(nbk * cpb):
        b = j // cpb
        lo = b * bucket + (j % cpb) * CHUNK
        hi = min(lo + CHUNK, (b + 1) * bucket, n)
        acc = 0.0
        if use_max:
            for i in range(lo, hi):
                a = abs(np.float64(x[i]))
                if a > acc:
                    acc = a
        else:
            for i in range(lo, hi):
                v = np.float64(x[i])
                acc += v * v
        parts[j] = acc
    out = np.empty(nbk, np.float32)
    for b in range(nbk):
        acc = 0.0
        for j in range(b * cpb, (b + 1) * cpb):
            if use_max:
                if parts[j] > acc:
                    acc = parts[j]
            else:
                acc += parts[j]
        out[b] = _rounded_up_f32(acc if use_max else np.sqrt(acc))
    return out


@nb.njit(parallel=True, cache=True)
def count_nonfinite(x):
    """Number of NaN/Inf elements, in one parallel pass (no temporary mask)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    bad = np.zeros(nchunks, np.int64)
    for c in nb.prange(nchunks):
        m = 0
        for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
            if not np.isfinite(x[i]):
                m += 1
        bad[c] = m
    return bad.sum()


@nb.njit(parallel=True, cache=True)
def stochastic_levels(x, norms, bucket, s, signed_grid, seed, out):
    """Unbiased stochastic rounding of ``x / norm * s`` to integers.

    QSGD (``signed_grid=False``) rounds the magnitude and keeps the sign apart, levels
    in [-s, s]. The AsyLPG grid (``signed_grid=True``) rounds the signed value down or
    up, also in [-s, s]. Both are unbiased: E[level] = x / norm * s.
    Work is split in CHUNK ranges walked bucket by bucket, so the per-bucket factor is
    computed once per bucket, not once per element.
    """
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in nb.prange(nchunks):
        hi = min(c * CHUNK + CHUNK, n)
        i = c * CHUNK
        while i < hi:
            b = i // bucket
            end = min(hi, (b + 1) * bucket)
            nrm = np.float64(norms[b])
            if nrm == 0.0:
                for j in range(i, end):
                    out[j] = 0
                i = end
                continue
            f = s / nrm
            if signed_grid:
                for j in range(i, end):
                    lv = np.int64(np.floor(np.float64(x[j]) * f + uniform(seed, j)))
                    out[j] = max(-s, min(s, lv))
            else:
                for j in range(i, end):
                    v = np.float64(x[j])
                    lv = min(s, np.int64(abs(v) * f + uniform(seed, j)))
                    out[j] = -lv if v < 0.0 else lv
            i = end


@nb.njit(parallel=True, cache=True)
def dequantize_levels(levels, factors, bucket, out):
    """``out[i] = levels[i] * factors[i // bucket]`` (factor = norm / s, damping folded in)."""
    n = levels.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in nb.prange(nchunks):
        hi = min(c * CHUNK + CHUNK, n)
        i = c * CHUNK
        while i < hi:
            b = i // bucket
            end = min(hi, (b + 1) * bucket)
            f = factors[b]
            for j in range(i, end):
                out[j] = np.float32(np.float64(levels[j]) * f)
            i = end


@nb.njit(cache=True)
def _abs_key(v):
    """Order-preserving uint32 key of |v| for float32 v (the IEEE bits without sign)."""
    return np.uint32(np.float32(v).view(np.uint32) & np.uint32(0x7FFFFFFF))


#: Parallel partitions for histograms: one 64K-bin histogram each, so keep them few.
_HIST_PARTS = 8


@nb.njit(parallel=True, cache=True)
def _histogram(x, shift, match, match_shift):
    """Histogram of 16-bit digit ``(key >> shift) & 0xFFFF`` of the keys ``k`` with
    ``k >> match_shift == match`` (``match = -1``: all keys)."""
    n = x.size
    per = (n + _HIST_PARTS - 1) // _HIST_PARTS
    hist = np.zeros((_HIST_PARTS, 1 << 16), np.int64)
    for c in nb.prange(_HIST_PARTS):
        for i in range(c * per, min(c * per + per, n)):
            k = _abs_key(x[i])
            if match >= 0 and np.int64(k >> np.uint32(match_shift)) != match:
                continue
            hist[c, np.int64((k >> np.uint32(shift)) & np.uint32(0xFFFF))] += 1
    return hist.sum(axis=0)


@nb.njit(cache=True)
def _pick_bin(hist, need):
    """Highest bin b with count(bins > b) < need <= count(bins >= b); returns (b, count above)."""
    above = 0
    for b in range(hist.size - 1, -1, -1):
        if above + hist[b] >= need:
            return b, above
        above += hist[b]
    return 0, above


@nb.njit(parallel=True, cache=True)
def topk_indices(x, k):
    """Exact top-k by magnitude via two-level radix select; ties go to lower indices.

    Three parallel passes over ``x`` and no sort of the full tensor, which is what makes
    top-1% of 10M elements ~10x cheaper than ``torch.topk``. Indices come out sorted.
    """
    n = x.size
    out = np.empty(k, np.int64)
    if k == 0:
        return out
    hi_hist = _histogram(x, 16, -1, 0)
    hi_bin, above_hi = _pick_bin(hi_hist, k)
    lo_hist = _histogram(x, 0, hi_bin, 16)
    lo_bin, above_lo = _pick_bin(lo_hist, k - above_hi)
    thresh = np.uint32((hi_bin << 16) | lo_bin)
    ties_needed = k - above_hi - above_lo
    nchunks = (n + CHUNK - 1) // CHUNK
    n_gt = np.zeros(nchunks, np.int64)
    n_eq = np.zeros(nchunks, np.int64)
    for c in nb.prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        g = 0
        e = 0
        for i in range(lo, hi):
            key = _abs_key(x[i])
            if key > thresh:
                g += 1
            elif key == thresh:
                e += 1
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
                out[p] = i
                p += 1
            elif key == thresh:
                if tie_rank < ties_needed:
                    out[p] = i
                    p += 1
                tie_rank += 1
    return out


@nb.njit(cache=True)
def random_subset(n, k, seed):
    """Uniform k-subset of range(n), sorted, by Floyd's algorithm: O(k) draws.

    A pure function of (n, k, seed): sender and receiver regenerate the same indices, so
    rand-k never sends them. Part of the wire format: changing it needs a new version.
    """
    taken = np.zeros(n, np.bool_)
    out = np.empty(k, np.int64)
    c = 0
    for j in range(n - k, n):
        t = np.int64(uniform(seed, c) * (j + 1))
        if t > j:
            t = j
        if taken[t]:
            t = j
        taken[t] = True
        out[c] = t
        c += 1
    out.sort()
    return out


@nb.njit(parallel=True, cache=True)
def _sum_abs_clipped(x, lam):
    """(sum of |x_i| where lam*|x_i| < 1, count where lam*|x_i| >= 1)."""
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    sums = np.zeros(nchunks, np.float64)
    cnts = np.zeros(nchunks, np.int64)
    for c in nb.prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        s = 0.0
        m = 0
        for i in range(lo, hi):
            a = abs(np.float64(x[i]))
            if lam * a >= 1.0:
                m += 1
            else:
                s += a
        sums[c] = s
        cnts[c] = m
    return sums.sum(), cnts.sum()


@nb.njit(cache=True)
def magnitude_lambda(x, budget):
    """lambda with sum_i min(1, lambda*|x_i|) = budget (Wangni et al., 2018).

    Fixed-point iteration: clip the coordinates that would get p_i >= 1, spread the
    remaining budget over the rest proportionally to |x_i|. The clipped set only grows,
    so it terminates in at most n steps; in practice 2-4.
    """
    total, _ = _sum_abs_clipped(x, 0.0)
    if total == 0.0:
        return 0.0
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


@nb.njit(parallel=True, cache=True)
def bernoulli_keep(x, p_const, lam, seed):
    """Keep i with probability p_i (p_const if > 0, else min(1, lam*|x_i|)); sorted indices.

    Returns kept indices and ``x_i / p_i`` for them: the unbiased Sparse-AsyLPG /
    Wangni et al. sparsifier.
    """
    n = x.size
    nchunks = (n + CHUNK - 1) // CHUNK
    counts = np.zeros(nchunks, np.int64)
    keep = np.zeros(n, np.bool_)
    for c in nb.prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        m = 0
        for i in range(lo, hi):
            p = p_const if p_const > 0.0 else min(1.0, lam * abs(np.float64(x[i])))
            if p > 0.0 and uniform(seed, i) < p:
                keep[i] = True
                m += 1
        counts[c] = m
    starts = np.zeros(nchunks, np.int64)
    total = 0
    for c in range(nchunks):
        starts[c] = total
        total += counts[c]
    idx = np.empty(total, np.int64)
    vals = np.empty(total, np.float32)
    for c in nb.prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        q = starts[c]
        for i in range(lo, hi):
            if keep[i]:
                p = p_const if p_const > 0.0 else min(1.0, lam * abs(np.float64(x[i])))
                idx[q] = i
                vals[q] = np.float32(np.float64(x[i]) / p)
                q += 1
    return idx, vals
