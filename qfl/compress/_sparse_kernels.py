"""Compiled sparsification kernels: top-k selection, rand-k subsets, Bernoulli keeping,
scattering back.

The same rules as :mod:`qfl.compress._kernels` (counter-based randomness, slices in
inner loops, one body per kernel through :func:`qfl.compress.runtime.twin`); split
from it to keep each module readable.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from ._kernels import ABS_MASK, CHUNK, GOLDEN_GAMMA, NONFINITE_KEY, count_nonfinite, mix64, uniform
from .runtime import parallel_slot, twin

# ------------------------------------------------------------------------ top-k
#: Elements sampled to guess the top-k threshold.
_SAMPLE = 1 << 14


@nb.njit(cache=True)
def _abs_key(v):
    """Order-preserving uint32 key of |v| for float32 v (the IEEE bits without sign)."""
    return np.uint32(np.float32(v).view(np.uint32) & ABS_MASK)


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
        off = np.int64(mix64(np.uint64(s + 1) * GOLDEN_GAMMA) % np.uint64(stride))
        sample[s] = keys[s * stride + off] & ABS_MASK
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
            if (seg[j] & ABS_MASK) >= t:
                if c < cap:
                    cidx[c] = lo + j
                c += 1
        lo = hi
    return c


@nb.njit(inline="always", cache=True)
def _digit_histogram(keys, shift, width, prefix, parts):
    """Histogram of the ``width``-bit digit ``(key >> shift)`` of the keys whose bits above
    it equal ``prefix`` (``key`` = ``keys[i] & ABS_MASK``, 31 bits), counted in ``parts``
    slices (in parallel in a parallel variant) and summed: exact counts, whatever the split."""
    n = keys.size
    per = (n + parts - 1) // parts
    every = shift + width == 31  # the first digit: no bits above it to match
    top = np.uint32(shift + width)
    digit = np.uint32((1 << width) - 1)
    hist = np.zeros((parts, 1 << width), np.int64)
    for c in nb.prange(parts):
        seg = keys[c * per : min(c * per + per, n)]
        h = hist[c]
        for i in range(seg.size):
            key = seg[i] & ABS_MASK
            if every or np.int64(key >> top) == prefix:
                h[np.int64((key >> np.uint32(shift)) & digit)] += 1
    return hist.sum(axis=0) if parts > 1 else hist[0]


#: The full radix select counts its histograms in slices of at least this many keys (at
#: most 8 slices, split over the threads): each slice has a histogram to zero and sum.
_SLICE = 1 << 17
#: Radix digits of 16 bits (two histogram passes) from this many keys on, 11 bits (three)
#: below: a 16-bit histogram is 512 KB to zero and scan per pass and slice, which on
#: tensors of a few thousand elements cost 0.8 ms a call -- most of a ResNet's top-k time.
#: Measured per select (2 cores): 590K keys 0.8 vs 1.5 ms; 2.4M and 39M keys unchanged.
_WIDE_DIGITS = 1 << 20
#: The same for the sampled path's candidates, whose histograms are one slice each.
_WIDE_CANDIDATES = 1 << 17


@nb.njit(inline="always", cache=True)
def _radix_select(keys, k, parts, digit):
    """(t, ties, nonfinite): the k-th largest key (``keys[i] & ABS_MASK``, 0 < k <= size)
    by a most-significant-digit-first radix select, how many keys equal to t belong to
    the top k, and how many keys are NaN/Inf (counted from the first histogram, whose
    digit boundary falls on NONFINITE_KEY for digits of up to 23 bits). ``parts``: the
    slices each histogram is counted in (1 where nothing runs in parallel); ``digit``: bits
    per histogram (at most 23)."""
    need = np.int64(k)
    prefix = np.int64(0)
    nonfinite = np.int64(0)
    top = 31
    while top > 0:
        width = min(digit, top)
        shift = top - width
        hist = _digit_histogram(keys, shift, width, prefix, parts)
        if top == 31:
            nonfinite = hist[NONFINITE_KEY >> shift :].sum()
        b, above = _pick_bin(hist, need)
        prefix = (prefix << width) | b
        need -= above
        top = shift
    return np.uint32(prefix), need, nonfinite


@twin
def _topk_radix(x, k, idx, vals):
    """Exact top-k over all of x by a radix select (two or three histogram passes, then a
    counting and a taking pass; parallel in the parallel variant); the fallback of
    ``topk_select``. Returns the number of
    non-finite elements."""
    n = x.size
    thresh, ties_needed, bad = _radix_select(
        x.view(np.uint32), k, min(8, max(1, n // _SLICE)), 16 if n >= _WIDE_DIGITS else 11
    )
    nchunks = (n + CHUNK - 1) // CHUNK
    n_gt = np.zeros(nchunks, np.int64)
    n_eq = np.zeros(nchunks, np.int64)
    for c in nb.prange(nchunks):
        seg = x[c * CHUNK : min(c * CHUNK + CHUNK, n)].view(np.uint32)
        g = 0
        e = 0
        for i in range(seg.size):
            key = seg[i] & ABS_MASK
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
                    ckeys[j] = keys[cidx[j]] & ABS_MASK
                    worst = max(worst, ckeys[j])
                t2, ties, _ = _radix_select(ckeys, k, 1, 16 if c >= _WIDE_CANDIDATES else 11)
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
        cnt += (
            np.int64(c0)
            + np.int64(c1)
            + np.int64(c2)
            + np.int64(c3)
            + np.int64(c4)
            + np.int64(c5)
            + np.int64(c6)
            + np.int64(c7)
        )
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
        sums[c], cnts[c] = _sum_abs_clipped_seg(x[c * _BIG : min(c * _BIG + _BIG, x.size)], lam)


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
    seg = x[lo : min(lo + CHUNK, x.size)]
    m = 0
    for j in range(seg.size):
        # uniform >= 0, so p = 0 never keeps: no branch, and the loop vectorises.
        m += uniform(seed, lo + j) < _keep_prob(seg[j], p_const, lam)
    return m


@nb.njit(inline="always", cache=True)
def _keep_fill(x, p_const, lam, seed, c, q, idx, vals):
    lo = c * CHUNK
    seg = x[lo : min(lo + CHUNK, x.size)]
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
