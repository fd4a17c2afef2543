"""Levels coded at a fixed width chosen per bucket (wire format 2's ``LEVELS_BUCKETED``).

Bucketed QSGD scales every bucket by its own norm, so most buckets use only a few low
bits: ``qsgd(255, bucket=512)`` on Gaussian data has |levels| up to ~40 in a typical
bucket, 6 magnitude bits where the format-wide fixed width spends 9, and Elias-omega
(8.3 bits per level there) costs ~3 ns per level to code. Here each bucket states its
width ``w`` (the bit length of its largest |level|, one byte per bucket) and every
level takes ``w + 1`` bits: a sign bit, then ``w`` magnitude bits (a bucket of zeros
takes none). Every bucket starts on a byte boundary, so buckets code and decode
independently (in parallel) at offsets the widths alone determine, and a group of 8
levels of width <= 8 is exactly ``w + 1`` bytes: one 64-bit word, no bit-by-bit loop.

Decoding refuses magnitudes above the operator's maximum and negative zeros (the
encoder never writes them, so each level has exactly one code).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..compress.runtime import twin
from ._bitio import ERR_CODE, ERR_RANGE, OK  # statuses: OK = 0, errors < 0

#: Buckets per parallel work item.
_BUCKETS = 1 << 8


@nb.njit(inline="always", cache=True)
def _bit_length(m):
    w = 0
    while m:
        m >>= 1
        w += 1
    return w


@nb.njit(cache=True)
def _plan(levels, bucket, widths, offsets):
    """Per bucket: the bit length of its largest |level| (``widths``) and where its
    codes start (``offsets``, bytes, one more entry than buckets). Serial: one
    vectorised pass, memory-bound."""
    n = levels.size
    offsets[0] = 0
    for b in range(widths.size):
        seg = levels[b * bucket : min(b * bucket + bucket, n)]
        m = np.int32(0)
        for i in range(seg.size):
            m = max(m, abs(np.int32(seg[i])))
        w = _bit_length(m)
        widths[b] = w
        offsets[b + 1] = offsets[b] + ((seg.size * (w + 1) + 7) // 8 if w else 0)


@nb.njit(inline="always", cache=True)
def _code(v, w):
    a = abs(np.int64(v))
    return np.uint64(a) | (np.uint64(v < 0) << np.uint64(w))


@nb.njit(inline="always", cache=True)
def _encode_bucket(seg, w, out):
    w1 = w + 1
    if w1 <= 8:  # 8 codes fill exactly w1 bytes of one word
        whole = seg.size - seg.size % 8
        p = 0
        for g in range(0, whole, 8):
            acc = np.uint64(0)
            for j in range(8):
                acc = (acc << np.uint64(w1)) | _code(seg[g + j], w)
            for k in range(w1):
                out[p + k] = np.uint8((acc >> np.uint64(8 * (w1 - 1 - k))) & np.uint64(0xFF))
            p += w1
        rest = seg.size - whole
        if rest:
            acc = np.uint64(0)
            for j in range(rest):
                acc = (acc << np.uint64(w1)) | _code(seg[whole + j], w)
            acc <<= np.uint64(w1 * (8 - rest))
            for k in range((rest * w1 + 7) // 8):
                out[p + k] = np.uint8((acc >> np.uint64(8 * (w1 - 1 - k))) & np.uint64(0xFF))
        return
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


@twin
def _encode(levels, bucket, widths, offsets, out):
    n = levels.size
    for c in nb.prange((widths.size + _BUCKETS - 1) // _BUCKETS):
        for b in range(c * _BUCKETS, min(c * _BUCKETS + _BUCKETS, widths.size)):
            w = np.int64(widths[b])
            if w:
                _encode_bucket(levels[b * bucket : min(b * bucket + bucket, n)], w, out[offsets[b] : offsets[b + 1]])


@nb.njit(inline="always", cache=True)
def _level(code, w, max_level):
    """(level, status) of one ``w + 1``-bit code."""
    a = np.int64(code & ((np.uint64(1) << np.uint64(w)) - np.uint64(1)))
    negative = (code >> np.uint64(w)) != 0
    status = ERR_RANGE if a > max_level else (ERR_CODE if negative and a == 0 else OK)
    return (-a if negative else a), status


@nb.njit(inline="always", cache=True)
def _decode_bucket(data, w, max_level, seg):
    w1 = w + 1
    mask = (np.uint64(1) << np.uint64(w1)) - np.uint64(1)
    status = OK
    if w1 <= 8:
        whole = seg.size - seg.size % 8
        p = 0
        for g in range(0, whole, 8):
            acc = np.uint64(0)
            for k in range(w1):
                acc = (acc << np.uint64(8)) | np.uint64(data[p + k])
            p += w1
            for j in range(8):
                v, s = _level((acc >> np.uint64(w1 * (7 - j))) & mask, w, max_level)
                seg[g + j] = v
                status = min(status, s)
        rest = seg.size - whole
        if rest:
            acc = np.uint64(0)
            nbytes = (rest * w1 + 7) // 8
            for k in range(nbytes):
                acc = (acc << np.uint64(8)) | np.uint64(data[p + k])
            acc <<= np.uint64(8 * (w1 - nbytes))
            for j in range(rest):
                v, s = _level((acc >> np.uint64(w1 * (7 - j))) & mask, w, max_level)
                seg[whole + j] = v
                status = min(status, s)
        return status
    acc = np.uint64(0)
    nacc = 0
    p = 0
    for i in range(seg.size):
        while nacc < w1:
            acc = (acc << np.uint64(8)) | np.uint64(data[p])
            p += 1
            nacc += 8
        nacc -= w1
        v, s = _level((acc >> np.uint64(nacc)) & mask, w, max_level)
        seg[i] = v
        status = min(status, s)
    return status


@twin
def _decode(data, bucket, widths, offsets, max_level, out, status):
    n = out.size
    for c in nb.prange(status.size):
        worst = OK
        for b in range(c * _BUCKETS, min(c * _BUCKETS + _BUCKETS, widths.size)):
            seg = out[b * bucket : min(b * bucket + bucket, n)]
            w = np.int64(widths[b])
            if w:
                s = _decode_bucket(data[offsets[b] : offsets[b + 1]], w, max_level, seg)
                worst = min(worst, s)
            else:
                seg[:] = 0
        status[c] = worst


def bucketed_plan(levels: np.ndarray, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """(widths, byte offsets) of the bucketed coding of ``levels``: its size in bytes is
    ``len(widths) + offsets[-1]``."""
    nbk = (levels.size + bucket - 1) // bucket
    widths = np.empty(nbk, np.uint8)
    offsets = np.empty(nbk + 1, np.int64)
    _plan(levels, bucket, widths, offsets)
    return widths, offsets


def bucketed_encode(levels: np.ndarray, bucket: int, widths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The codes of every bucket, concatenated (``widths``/``offsets`` from :func:`bucketed_plan`)."""
    out = np.empty(int(offsets[-1]), np.uint8)
    _encode(levels.size, levels, bucket, widths, offsets, out)
    return out


def bucketed_offsets(widths: np.ndarray, n: int, bucket: int) -> np.ndarray:
    """Byte offset of each bucket's codes (one more entry than buckets), from the widths."""
    sizes = np.full(widths.size, bucket, np.int64)
    if widths.size:
        sizes[-1] = n - bucket * (widths.size - 1)
    w = widths.astype(np.int64)
    offsets = np.zeros(widths.size + 1, np.int64)
    np.cumsum(np.where(w > 0, (sizes * (w + 1) + 7) // 8, 0), out=offsets[1:])
    return offsets


def bucketed_decode(
    data: np.ndarray, bucket: int, widths: np.ndarray, offsets: np.ndarray, max_level: int, out: np.ndarray
) -> int:
    """Inverse of :func:`bucketed_encode` into ``out``; returns a status code. ``data``
    must hold exactly ``offsets[-1]`` bytes and every width must be at most the bit
    length of ``max_level`` (the caller checks both)."""
    status = np.zeros((widths.size + _BUCKETS - 1) // _BUCKETS, np.int64)
    _decode(out.size, data, bucket, widths, offsets, max_level, out, status)
    return int(status.min()) if status.size else OK
