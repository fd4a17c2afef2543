"""Levels coded at a fixed width chosen per block (wire format 2's ``LEVELS_BUCKETED``).

Scaled levels use few of their bits almost everywhere: ``qsgd(255, bucket=512)`` on
Gaussian data has |levels| up to ~40 in a typical bucket, 6 magnitude bits where the
format-wide fixed width spends 9, and a real update's grid(8) levels are mostly 0 or
+-1 outside a few blocks. Elias-omega codes both compactly but at ~3 ns per level.
Here each block of levels (the blob states the block size; the functions below call it
``bucket``) states its width ``w`` (the bit length of its largest |level|, one byte per
block) and every level takes ``w + 1`` bits: a sign bit, then ``w`` magnitude bits (a
block of zeros takes none). Every block starts on a byte boundary, so blocks code and
decode independently (in parallel) at offsets the widths alone determine, and a group
of 8 levels of width <= 8 is exactly ``w + 1`` bytes: one 64-bit word, no bit loop.

Decoding refuses (``ERR_RANGE``) magnitudes above the operator's maximum and negative
zeros (the encoder never writes them, so each level has exactly one code).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..compress import runtime
from ..compress.runtime import twin
from ._bitio import BYTE_SCRATCH, ERR_RANGE, OK, byte_sum
from ._elias import BLOCK as ELIAS_BLOCK

#: Buckets per parallel work item.
_BUCKETS = 1 << 8


@nb.njit(inline="always", cache=True)
def _elias_floor(v):
    """At most what a level ``v`` costs in QSGD's Elias coding, its gap beyond 1 bit
    aside (:func:`elias_gap_bits`): 0 for a zero, else a gap (>= 1 bit), a sign and
    omega(|v|), whose length steps up by 2, 3, 1 and 4 bits at 2, 4, 8 and 16 (further
    steps are left out: five tests vectorise cheaply, and the bound only needs to be
    low). ``v`` is clamped to [-16, 16] first, so |v| never overflows its type."""
    a = max(-16, min(16, v))
    a = a if a >= 0 else -a
    return np.uint8(3 * (a >= 1) + 2 * (a >= 2) + 3 * (a >= 4) + (a >= 8) + 4 * (a >= 16))


#: Most elements per work item of the planning passes; the Elias block, so that items
#: of the gap pass are exactly its blocks.
_SPAN = ELIAS_BLOCK


@nb.njit(inline="always", cache=True)
def _top(seg):
    """Largest |level| of ``seg``, from its max and min in its own type (no overflow,
    vectorises at the levels' width)."""
    hi = seg[0]
    lo = seg[0]
    for j in range(seg.size):
        hi = max(hi, seg[j])
        lo = min(lo, seg[j])
    return max(np.int64(hi), -np.int64(lo))


@nb.njit(inline="always", cache=True)
def _bit_length(t):
    """Bit length of 0 <= t < 2**32 by halving (``math.frexp`` is a libm call: a third of
    the planning pass)."""
    w = 0
    for k in (16, 8, 4, 2, 1):
        if t >> k:
            t >>= k
            w += k
    return w + (t > 0)


@twin
def _scan(levels, bucket, per, widths, elias):
    """Per bucket: the bit length of its largest |level|; per work item of ``per`` buckets:
    :func:`_elias_floor` summed over its levels. Each bound is stored as a byte into a
    small scratch and summed from there: narrow stores let LLVM vectorise at byte width,
    where a sum accumulated in the loop runs at 64 bits (numba widens small integers),
    eight times slower."""
    n = levels.size
    for it in nb.prange(elias.size):
        b0 = it * per
        b1 = min(b0 + per, widths.size)
        for b in range(b0, b1):
            widths[b] = _bit_length(_top(levels[b * bucket : min(b * bucket + bucket, n)]))
        scratch = np.empty(BYTE_SCRATCH, np.uint8)
        f = np.int64(0)
        lo = b0 * bucket
        hi = min(b1 * bucket, n)
        while lo < hi:
            seg = levels[lo : min(lo + BYTE_SCRATCH, hi)]
            for j in range(seg.size):
                scratch[j] = _elias_floor(seg[j])
            f += byte_sum(scratch, seg.size)
            lo += seg.size
        elias[it] = f


@twin
def _gaps(levels, out):
    """Per Elias block: what its gaps cost beyond 1 bit each, as far as the three levels
    before each level show (after a zero: gap >= 2, omega >= 3 bits; after three zeros:
    gap >= 4, omega >= 6). Shifted views instead of ``seg[j - k]`` keep the reads at
    unit stride; bytes summed as in :func:`_scan`."""
    n = levels.size
    for b in nb.prange(out.size):
        seg = levels[b * ELIAS_BLOCK : min(b * ELIAS_BLOCK + ELIAS_BLOCK, n)]
        t = np.int64(0)
        for j in range(1, min(3, seg.size)):
            t += 2 * np.int64((seg[j] != 0) & (seg[j - 1] == 0))
        scratch = np.empty(BYTE_SCRATCH, np.uint8)
        lo = 3
        while lo < seg.size:
            hi = min(lo + BYTE_SCRATCH, seg.size)
            v, p1, p2, p3 = seg[lo:hi], seg[lo - 1 : hi - 1], seg[lo - 2 : hi - 2], seg[lo - 3 : hi - 3]
            for j in range(v.size):
                after1 = (v[j] != 0) & (p1[j] == 0)
                scratch[j] = np.uint8(2 * after1 + 3 * (after1 & (p2[j] == 0) & (p3[j] == 0)))
            t += byte_sum(scratch, v.size)
            lo = hi
        out[b] = t


def elias_gap_bits(levels: np.ndarray) -> int:
    """Lower bound on what the gaps of the Elias coding of ``levels`` cost beyond one
    bit each: added to :func:`bucketed_plan`'s bound when that alone leaves Elias a
    chance (for sparse levels it is far too low without: a real update's grid(8)
    levels, 2.5 bits per level against Elias' 3.0; with the gaps, 3.03)."""
    out = np.zeros((levels.size + ELIAS_BLOCK - 1) // ELIAS_BLOCK, np.int64)
    _gaps(levels.size, levels, out)
    return int(out.sum())


@nb.njit(inline="always", cache=True)
def _code(v, w):
    a = abs(np.int64(v))
    return np.uint64(a) | (np.uint64(v < 0) << np.uint64(w))


@nb.njit(inline="always", cache=True)
def _encode_groups(seg, w1, out):
    """Whole groups of 8 codes of ``w1`` <= 8 bits, each group ``w1`` bytes. Called with
    a literal ``w1``: after inlining, LLVM folds every shift and unrolls the loops
    (unsigned indices: no negative-index fix-ups in the way)."""
    w = w1 - 1
    for g in range(seg.size // 8):
        q = np.uint64(8 * g)
        acc = np.uint64(0)
        for j in range(8):
            acc = (acc << np.uint64(w1)) | _code(seg[q + np.uint64(j)], w)
        p = np.uint64(g * w1)
        for k in range(w1):
            out[p + np.uint64(k)] = np.uint8((acc >> np.uint64(8 * (w1 - 1 - k))) & np.uint64(0xFF))


@nb.njit(inline="always", cache=True)
def _encode_bucket(seg, w, out):
    w1 = w + 1
    if w1 > 8:
        acc = np.uint64(0)
        nacc = 0
        p = 0
        for i in range(seg.size):
            acc = (acc << np.uint64(w1)) | _code(seg[i], w)
            nacc += w1
            while nacc >= 8:
                nacc -= 8
                out[p] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
                p += 1
        if nacc:
            out[p] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
        return
    if w1 == 2:
        _encode_groups(seg, 2, out)
    elif w1 == 3:
        _encode_groups(seg, 3, out)
    elif w1 == 4:
        _encode_groups(seg, 4, out)
    elif w1 == 5:
        _encode_groups(seg, 5, out)
    elif w1 == 6:
        _encode_groups(seg, 6, out)
    elif w1 == 7:
        _encode_groups(seg, 7, out)
    else:
        _encode_groups(seg, 8, out)
    whole = seg.size - seg.size % 8
    rest = seg.size - whole
    if rest:  # a last partial group: its codes from the top of the word, bytes as needed
        p = whole // 8 * w1
        acc = np.uint64(0)
        for j in range(rest):
            acc = (acc << np.uint64(w1)) | _code(seg[whole + j], w)
        acc <<= np.uint64(w1 * (8 - rest))
        for k in range((rest * w1 + 7) // 8):
            out[p + k] = np.uint8((acc >> np.uint64(8 * (w1 - 1 - k))) & np.uint64(0xFF))


@twin
def _encode(levels, bucket, widths, offsets, out):
    n = levels.size
    for c in nb.prange((widths.size + _BUCKETS - 1) // _BUCKETS):
        for b in range(c * _BUCKETS, min(c * _BUCKETS + _BUCKETS, widths.size)):
            w = np.int64(widths[b])
            if w:
                _encode_bucket(levels[b * bucket : min(b * bucket + bucket, n)], w, out[offsets[b] : offsets[b + 1]])


@nb.njit(inline="always", cache=True)
def _put_level(code, w, max_level, seg, i):
    """Store the level of one ``w + 1``-bit code; 1 if it is invalid (a magnitude above
    ``max_level`` or a negative zero), else 0. Branch-free."""
    a = np.int64(code & ((np.uint64(1) << np.uint64(w)) - np.uint64(1)))
    neg = np.int64(code >> np.uint64(w))
    seg[i] = (a ^ -neg) + neg
    return np.int64(a > max_level) | (neg & np.int64(a == 0))


@nb.njit(inline="always", cache=True)
def _lanes(v, w1):
    """``v`` in each of the 8 ``w1``-bit lanes of a group's word."""
    r = np.uint64(0)
    for j in range(8):
        r |= np.uint64(v) << np.uint64(w1 * j)
    return r


@nb.njit(inline="always", cache=True)
def _decode_groups(data, w1, max_level, seg):
    """Inverse of ``_encode_groups`` (also called with a literal ``w1``); 1 if any code
    is invalid. Unsigned indices: numba then needs no negative-index fix-up, which
    would keep LLVM from merging the byte loads. Validity is tested once per group, on
    all 8 lanes of its word at once (SWAR), not per level: a third less time. A negative
    zero is a lane equal to its sign bit alone, found by the exact "any zero lane" test
    on the word XOR the sign bits; a magnitude above ``max_level`` carries into its sign
    bit when ``2**w - 1 - max_level`` is added to it (sign bits cleared first, so no
    carry crosses a lane), a test skipped when no ``w``-bit magnitude can exceed it."""
    w = w1 - 1
    mask = (np.uint64(1) << np.uint64(w1)) - np.uint64(1)
    amask = (np.uint64(1) << np.uint64(w)) - np.uint64(1)
    lows = _lanes(1, w1)
    signs = _lanes(np.uint64(1) << np.uint64(w), w1)
    mags = _lanes(amask, w1)
    room = np.int64(amask) - np.int64(max_level)
    check_range = room > 0
    over = _lanes(room if check_range else 0, w1)
    bad = np.uint64(0)
    for g in range(seg.size // 8):
        p = np.uint64(g * w1)
        acc = np.uint64(0)
        for k in range(w1):
            acc = (acc << np.uint64(8)) | np.uint64(data[p + np.uint64(k)])
        q = np.uint64(8 * g)
        for j in range(8):
            code = (acc >> np.uint64(w1 * (7 - j))) & mask
            a = np.int64(code & amask)
            neg = np.int64(code >> np.uint64(w))
            seg[q + np.uint64(j)] = (a ^ -neg) + neg
        y = acc ^ signs
        bad |= (y - lows) & ~y & signs
        if check_range:
            bad |= ((acc & mags) + over) & signs
    return np.int64(bad != np.uint64(0))


@nb.njit(inline="always", cache=True)
def _decode_bucket(data, w, max_level, seg):
    w1 = w + 1
    mask = (np.uint64(1) << np.uint64(w1)) - np.uint64(1)
    bad = np.int64(0)
    if w1 > 8:
        acc = np.uint64(0)
        nacc = 0
        p = 0
        for i in range(seg.size):
            while nacc < w1:
                acc = (acc << np.uint64(8)) | np.uint64(data[p])
                p += 1
                nacc += 8
            nacc -= w1
            bad |= _put_level((acc >> np.uint64(nacc)) & mask, w, max_level, seg, i)
        return bad
    if w1 == 2:
        bad = _decode_groups(data, 2, max_level, seg)
    elif w1 == 3:
        bad = _decode_groups(data, 3, max_level, seg)
    elif w1 == 4:
        bad = _decode_groups(data, 4, max_level, seg)
    elif w1 == 5:
        bad = _decode_groups(data, 5, max_level, seg)
    elif w1 == 6:
        bad = _decode_groups(data, 6, max_level, seg)
    elif w1 == 7:
        bad = _decode_groups(data, 7, max_level, seg)
    else:
        bad = _decode_groups(data, 8, max_level, seg)
    whole = seg.size - seg.size % 8
    rest = seg.size - whole
    if rest:
        p = whole // 8 * w1
        nbytes = (rest * w1 + 7) // 8
        acc = np.uint64(0)
        for k in range(nbytes):
            acc = (acc << np.uint64(8)) | np.uint64(data[p + k])
        acc <<= np.uint64(8 * (w1 - nbytes))
        for j in range(rest):
            bad |= _put_level((acc >> np.uint64(w1 * (7 - j))) & mask, w, max_level, seg, whole + j)
    return bad


@twin
def _decode(data, bucket, widths, offsets, max_level, out, bad):
    n = out.size
    for c in nb.prange(bad.size):
        worst = np.int64(0)
        for b in range(c * _BUCKETS, min(c * _BUCKETS + _BUCKETS, widths.size)):
            seg = out[b * bucket : min(b * bucket + bucket, n)]
            w = np.int64(widths[b])
            if w:
                worst |= _decode_bucket(data[offsets[b] : offsets[b + 1]], w, max_level, seg)
            else:
                seg[:] = 0
        bad[c] = worst


def bucketed_plan(levels: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(widths, byte offsets, Elias bound) of the bucketed coding of ``levels``: its size
    in bytes is ``len(widths) + offsets[-1]``; the Elias coding of the same levels takes
    at least the bound's bits."""
    n = levels.size
    nbk = (n + bucket - 1) // bucket
    per = max(1, _SPAN // bucket)  # buckets per work item
    widths = np.empty(nbk, np.uint8)
    elias = np.empty((nbk + per - 1) // per, np.int64)
    _scan(n, levels, bucket, per, widths, elias)
    return widths, bucketed_offsets(widths, n, bucket), int(elias.sum())


def bucketed_encode(
    levels: np.ndarray, bucket: int, widths: np.ndarray, offsets: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """The codes of every bucket, concatenated (``widths``/``offsets`` from :func:`bucketed_plan`),
    into ``out`` (every one of its ``offsets[-1]`` bytes written) or a new buffer."""
    if out is None:
        out = runtime.empty(int(offsets[-1]), np.uint8)
    _encode(levels.size, levels, bucket, widths, offsets, out)
    return out


@nb.njit(cache=True)
def _offsets(widths, n, bucket, out):
    out[0] = 0
    for b in range(widths.size):
        size = min(bucket, n - b * bucket)
        w = np.int64(widths[b])
        out[b + 1] = out[b] + ((size * (w + 1) + 7) // 8 if w else 0)


def bucketed_offsets(widths: np.ndarray, n: int, bucket: int) -> np.ndarray:
    """Byte offset of each bucket's codes (one more entry than buckets), from the widths."""
    offsets = np.empty(widths.size + 1, np.int64)
    _offsets(widths, n, bucket, offsets)
    return offsets


def bucketed_decode(
    data: np.ndarray, bucket: int, widths: np.ndarray, offsets: np.ndarray, max_level: int, out: np.ndarray
) -> int:
    """Inverse of :func:`bucketed_encode` into ``out``; returns a status code. ``data``
    must hold exactly ``offsets[-1]`` bytes and every width must be at most the bit
    length of ``max_level`` (the caller checks both)."""
    bad = np.zeros((widths.size + _BUCKETS - 1) // _BUCKETS, np.int64)
    _decode(out.size, data, bucket, widths, offsets, max_level, out, bad)
    return ERR_RANGE if bad.any() else OK
