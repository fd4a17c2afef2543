"""Bit-level codes, compiled: fixed-width packing and Rice-coded positions here;
Elias-coded levels in ``_elias``, levels at a width per bucket in ``_bucketed``, the
bit writer/reader and omega tables in ``_bitio``.
This module is the wire format's one entry point to all of them.

All streams are MSB-first. Rice and fixed-width writers compute exact bit lengths
first, so buffers are allocated once at their final size; the Elias level coder codes
blocks into scratch regions sized by an upper bound and then concatenates them (see
``elias_encode_if_smaller``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..compress import runtime
from ..compress.runtime import twin
from ._bitio import (
    ERR_CODE,
    ERR_OVERRUN,
    ERR_RANGE,
    ERR_TRAILING,
    OK,
    U1,
    finish_bits,
    leading_ones,
    omega_code_slow,
    omega_lengths,
    peek_bits,
    put_bits,
    put_long,
    reader_at,
    refill,
)
from ._bucketed import bucketed_decode, bucketed_encode, bucketed_offsets, bucketed_plan, elias_gap_bits
from ._elias import (
    BLOCK,
    elias_block_bits,
    elias_decode,
    elias_encode,
    elias_encode_if_smaller,
    elias_size_lower_bound,
)

__all__ = [
    "BLOCK",
    "ERR_CODE",
    "ERR_OVERRUN",
    "ERR_RANGE",
    "ERR_TRAILING",
    "OK",
    "bucketed_decode",
    "bucketed_encode",
    "bucketed_offsets",
    "bucketed_plan",
    "elias_block_bits",
    "elias_decode",
    "elias_encode",
    "elias_encode_if_smaller",
    "elias_gap_bits",
    "elias_size_lower_bound",
    "omega_code_slow",
    "omega_lengths",
    "pack_fixed",
    "rice_bits",
    "rice_decode",
    "rice_encode",
    "unpack_fixed",
]


# ----------------------------------------------------------------- fixed-width codes


@nb.njit(cache=True)
def _pack8(values, offset, buf):
    for i in range(values.size):
        buf[i] = np.uint8(np.int64(values[i]) + offset)


#: Groups of 8 values per parallel work item of the fixed-width coders.
_GROUPS = 1 << 13


@nb.njit(inline="always", cache=True)
def _pack_groups(values, offset, width, buf, c):
    n = values.size
    for g in range(c * _GROUPS, min(c * _GROUPS + _GROUPS, (n + 7) // 8)):
        acc = np.uint64(0)
        nacc = 0
        p = g * width
        for j in range(g * 8, min(g * 8 + 8, n)):
            acc = (acc << np.uint64(width)) | np.uint64(np.int64(values[j]) + offset)
            nacc += width
            while nacc >= 8:
                nacc -= 8
                buf[p] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
                p += 1
        if nacc > 0:
            buf[p] = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))


@twin
def _pack(values, offset, width, buf):
    for c in nb.prange(((values.size + 7) // 8 + _GROUPS - 1) // _GROUPS):
        _pack_groups(values, offset, width, buf, c)


def pack_fixed(values: np.ndarray, offset: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Pack ``values + offset`` (each in [0, 2**width)) into ``width`` bits each, into
    ``out`` (every one of its ``ceil(n * width / 8)`` bytes written) or a new buffer.

    Groups of 8 values fill exactly ``width`` bytes, so groups pack in parallel; width 8
    is a plain serial byte copy (memory-bound: one vectorised pass).
    """
    n = values.size
    if width == 8:
        buf = np.empty(n, np.uint8) if out is None else out
        _pack8(values, offset, buf)  # serial
        return buf
    buf = runtime.empty((n * width + 7) // 8, np.uint8) if out is None else out
    _pack(n, values, offset, width, buf)
    return buf


@nb.njit(cache=True)
def _unpack8(buf, n, offset, max_abs, out):
    """Width 8: one pass that stores each byte minus ``offset`` and keeps the bytes'
    min and max; whether any value is beyond ``max_abs`` follows from those two. A
    per-value range test OR-ed into a flag kept LLVM from vectorising at byte width
    (10M levels into int8: 4.4 ms, 0.55 ms like this, on AVX2)."""
    lo = np.uint8(255)
    hi = np.uint8(0)
    for i in range(n):
        b = buf[i]
        lo = min(lo, b)
        hi = max(hi, b)
        out[i] = np.int64(b) - offset
    return n > 0 and ((np.int64(hi) - offset > max_abs) | (np.int64(lo) - offset < -max_abs))


@nb.njit(inline="always", cache=True)
def _unpack_groups(padded, n, offset, width, max_abs, out, c):
    bad = False
    if width <= 8:
        # A group of 8 values is ``width`` bytes: one 64-bit big-endian word holds it
        # (the buffer's 8 bytes of slack cover the last), and each value is a shift and
        # a mask of it, where the bit reader refills and tests per value.
        mask = (np.uint64(1) << np.uint64(width)) - U1
        for g in range(c * _GROUPS, min(c * _GROUPS + _GROUPS, (n + 7) // 8)):
            p = g * width
            w = np.uint64(0)
            for b in range(8):
                w = (w << np.uint64(8)) | np.uint64(padded[p + b])
            if g * 8 + 8 <= n:
                for k in range(8):  # a fixed trip count: unrolled
                    v = np.int64((w >> np.uint64(64 - width * (k + 1))) & mask) - offset
                    bad |= (v > max_abs) | (v < -max_abs)
                    out[g * 8 + k] = v
            else:  # the last, partial group
                for k in range(n - g * 8):
                    v = np.int64((w >> np.uint64(64 - width * (k + 1))) & mask) - offset
                    bad |= (v > max_abs) | (v < -max_abs)
                    out[g * 8 + k] = v
        return bad
    for g in range(c * _GROUPS, min(c * _GROUPS + _GROUPS, (n + 7) // 8)):
        w, nw, bp = reader_at(padded, g * 8 * width)
        for j in range(g * 8, min(g * 8 + 8, n)):
            w, nw, bp = refill(padded, w, nw, bp)
            v = peek_bits(w, width) - offset
            w = w << np.uint64(width)
            nw -= width
            bad |= (v > max_abs) | (v < -max_abs)
            out[j] = v
    return bad


@twin
def _unpack(padded, n, offset, width, max_abs, out, bad):
    for c in nb.prange(bad.size):
        bad[c] = _unpack_groups(padded, n, offset, width, max_abs, out, c)


def unpack_fixed(padded: np.ndarray, n: int, offset: int, width: int, max_abs: int, out: np.ndarray) -> int:
    """Inverse of pack_fixed; returns ERR_RANGE if any value exceeds ``max_abs``.

    ``padded`` holds the packed bytes and 8 more (any value); width 8 needs no slack.
    """
    if width == 8:
        return ERR_RANGE if _unpack8(padded, n, offset, max_abs, out) else OK
    bad = np.zeros(((n + 7) // 8 + _GROUPS - 1) // _GROUPS, np.bool_)
    _unpack(n, padded, n, offset, width, max_abs, out, bad)
    return ERR_RANGE if bad.any() else OK


# ------------------------------------------------------------- Rice-coded positions


@nb.njit(cache=True)
def rice_bits(indices, r):
    """Bit length of the Rice(r) code of the gaps of sorted, distinct indices."""
    t = 0
    last = -1
    for i in range(indices.size):
        g = indices[i] - last - 1
        t += (g >> r) + 1 + r
        last = indices[i]
    return t


@nb.njit(cache=True)
def rice_encode(indices, r, nbits):
    """Rice(r) code of gaps: unary quotient (ones, then a zero), then r remainder bits.

    Gaps of a random k-subset of n are near-geometric, for which Rice with
    r ~ log2(mean gap) is within a few percent of the entropy log2(C(n, k)).
    """
    buf = np.zeros((nbits + 7) // 8 + 8, np.uint8)
    p = 0
    acc = np.uint64(0)
    nacc = 0
    last = -1
    for i in range(indices.size):
        g = indices[i] - last - 1
        q = g >> r
        while q > 0:
            step = min(q, 32)
            p, acc, nacc = put_bits(buf, p, acc, nacc, (np.int64(1) << step) - 1, step)
            q -= step
        p, acc, nacc = put_long(buf, p, acc, nacc, g & ((np.int64(1) << r) - 1), r + 1)
        last = indices[i]
    tail, tp = finish_bits(buf, p, acc, nacc)
    buf[tp] |= tail
    return buf[: (nbits + 7) // 8]


@nb.njit(cache=True)
def rice_decode(padded, nbits, r, k, n, out):
    """Inverse of rice_encode for k indices in [0, n); returns a status code.

    A quotient's unary run is counted a window at a time (count-leading-zeros of the
    inverted window) and, when the whole code is in the window, read with its remainder
    from that one window. Where a run could reach the declared end or the range, it is
    read bit by bit instead, so a malformed stream gets exactly the status the bitwise
    reader gives it (tests/test_wire.py compares them).
    """
    pos = 0
    w, nw, bp = reader_at(padded, 0)
    last = -1
    # The smallest quotient with (q << r) >= n, which no index in [0, n) has.
    qlim = ((n - 1) >> r) + 1 if n > 0 else 0
    for i in range(k):
        w, nw, bp = refill(padded, w, nw, bp)
        ones = leading_ones(w)
        size = ones + 1 + r
        if size <= nw and pos + size <= nbits and ones < qlim:  # the whole code in the window
            rest = (w << np.uint64(ones)) << U1
            q = ones
            rem = np.int64((rest >> np.uint64(63 - r)) >> U1)  # r bits (none for r = 0)
            w = rest << np.uint64(r)
            nw -= size
            pos += size
        else:
            q = 0
            while True:
                w, nw, bp = refill(padded, w, nw, bp)
                ones = leading_ones(w)
                if ones < nw and pos + ones < nbits and q + ones < qlim:  # the run ends in the window
                    q += ones
                    w = (w << np.uint64(ones)) << U1
                    nw -= ones + 1
                    pos += ones + 1
                    break
                if ones == nw and pos + ones <= nbits and q + ones < qlim:  # the whole window is ones
                    q += ones
                    pos += ones
                    w = np.uint64(0)
                    nw = 0
                    continue
                while True:  # near the end or the range: bit by bit, for the exact status
                    w, nw, bp = refill(padded, w, nw, bp)
                    if pos >= nbits:
                        return ERR_OVERRUN
                    bit = peek_bits(w, 1)
                    w = w << U1
                    nw -= 1
                    pos += 1
                    if bit == 0:
                        break
                    q += 1
                    if (q << r) >= n:
                        return ERR_RANGE
                break
            if pos + r > nbits:
                return ERR_OVERRUN
            rem = 0
            if r > 0:
                w, nw, bp = refill(padded, w, nw, bp)
                rem = peek_bits(w, r)
                w = w << np.uint64(r)
                nw -= r
                pos += r
        idx = last + 1 + ((q << r) | rem)
        if idx >= n:
            return ERR_RANGE
        out[i] = idx
        last = idx
    if pos != nbits:
        return ERR_TRAILING
    return OK
