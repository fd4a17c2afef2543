"""Bit-level codes, compiled: Elias-omega, Rice, fixed-width packing.

All streams are MSB-first. Writers first compute exact bit lengths, so buffers are
allocated once at their final size. Readers work on a copy of the input padded with
8 zero bytes (so refilling a 64-bit window never leaves the buffer) and take the
*declared* bit length as a hard bound: every code is checked against it and a
violation returns a negative status instead of reading on. Decoders never loop more
often than the declared element count allows, so corrupted input cannot hang them.

Integer levels are coded in blocks of ``BLOCK`` elements with gap coding restarted at
each block boundary, and the blocks' bit lengths go into the header: encoding and
decoding then run block-parallel while the stream stays one contiguous bit string.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

#: Elements per independently coded block of an Elias level stream.
BLOCK = 1 << 16

# Status codes returned by decoders (Python maps them to WireFormatError messages).
OK = 0
ERR_OVERRUN = -1  # a code runs past the declared bit length
ERR_CODE = -2  # an Elias/unary code is longer than any valid value
ERR_RANGE = -3  # a decoded position or value is outside the declared range
ERR_TRAILING = -4  # a stream does not end exactly at its declared length

_U1 = np.uint64(1)
_TABLE_BITS = 16  # codes of at most this many bits decode with one table lookup
_TABLE_VALUES = 1 << 12  # values below this encode with one table lookup


@nb.njit(inline="always", cache=True)
def bit_length(v):
    """Number of significant bits of 1 <= v < 2**53 (exact via the float exponent)."""
    return math.frexp(np.float64(v))[1]


@nb.njit(cache=True)
def omega_code_slow(v):
    """(code, length) of the Elias-omega code of 1 <= v < 2**44, as one integer.

    Groups are prepended as they are computed, so building from the terminating zero
    upwards yields the whole code (at most 56 bits for such v) in one word.
    """
    code = np.int64(0)
    length = 1
    while v > 1:
        b = bit_length(v)
        code |= np.int64(v) << length
        length += b
        v = b - 1
    return code, length


@nb.njit(cache=True)
def _build_tables():
    enc_code = np.empty(_TABLE_VALUES, np.int64)
    enc_len = np.zeros(_TABLE_VALUES, np.int64)
    dec_value = np.zeros(1 << _TABLE_BITS, np.int64)
    dec_len = np.zeros(1 << _TABLE_BITS, np.int64)  # 0: code longer than the table
    for v in range(1, _TABLE_VALUES):
        code, length = omega_code_slow(v)
        enc_code[v] = code
        enc_len[v] = length
        if length <= _TABLE_BITS:
            lo = code << (_TABLE_BITS - length)
            for t in range(1 << (_TABLE_BITS - length)):
                dec_value[lo + t] = v
                dec_len[lo + t] = length
    return enc_code, enc_len, dec_value, dec_len


ENC_CODE, ENC_LEN, DEC_VALUE, DEC_LEN = _build_tables()


@nb.njit(inline="always", cache=True)
def omega_code(v, enc_code, enc_len):
    """(code, length) of the omega code of v, from the table when v is small."""
    if v < _TABLE_VALUES:
        return enc_code[v], enc_len[v]
    return omega_code_slow(v)


@nb.njit(inline="always", cache=True)
def omega_length(v, enc_len):
    """Bit length of the Elias-omega code of v >= 1."""
    if v < _TABLE_VALUES:
        return enc_len[v]
    total = 1
    while v > 1:
        b = bit_length(v)
        total += b
        v = b - 1
    return total


@nb.njit(cache=True)
def _omega_lengths(values, enc_len):
    out = np.empty(values.size, np.int64)
    for i in range(values.size):
        out[i] = omega_length(np.int64(values[i]), enc_len)
    return out


def omega_lengths(values: np.ndarray) -> np.ndarray:
    """Code length of each value >= 1: for tests and size estimates."""
    return _omega_lengths(np.ascontiguousarray(values, np.int64), ENC_LEN)


# ----------------------------------------------------------------------------- writer
# Writer state (p, acc, nacc): next byte, accumulator, live bits (< 32 between calls).
# A writer starting at bit offset o begins at byte o // 8 with o % 8 zero bits already
# "live", stores every byte it completes, and hands back its last partial byte (the
# tail) instead of storing it. Parallel blocks then never store the same byte: a byte
# shared by two blocks is stored by the later one and OR-ed with the earlier one's tail.


@nb.njit(inline="always", cache=True)
def _put(buf, p, acc, nacc, v, nbits):
    """Append the low ``nbits`` (<= 32) bits of v."""
    acc = (acc << np.uint64(nbits)) | (np.uint64(v) & ((_U1 << np.uint64(nbits)) - _U1))
    nacc += nbits
    if nacc >= 32:
        nacc -= 32
        w = acc >> np.uint64(nacc)
        buf[p] = np.uint8((w >> np.uint64(24)) & np.uint64(0xFF))
        buf[p + 1] = np.uint8((w >> np.uint64(16)) & np.uint64(0xFF))
        buf[p + 2] = np.uint8((w >> np.uint64(8)) & np.uint64(0xFF))
        buf[p + 3] = np.uint8(w & np.uint64(0xFF))
        p += 4
    return p, acc, nacc


@nb.njit(inline="always", cache=True)
def _put_long(buf, p, acc, nacc, v, nbits):
    """Append up to 64 bits, in two halves when needed."""
    if nbits > 32:
        p, acc, nacc = _put(buf, p, acc, nacc, np.int64(v) >> (nbits - 32), 32)
        nbits -= 32
    return _put(buf, p, acc, nacc, v, nbits)


@nb.njit(inline="always", cache=True)
def _finish(buf, p, acc, nacc):
    """Store the remaining whole bytes; return (tail byte, its index)."""
    while nacc >= 8:
        nacc -= 8
        buf[p] = np.uint8((acc >> np.uint64(nacc)) & np.uint64(0xFF))
        p += 1
    tail = np.uint8(0)
    if nacc > 0:
        tail = np.uint8((acc << np.uint64(8 - nacc)) & np.uint64(0xFF))
    return tail, p


# ----------------------------------------------------------------------------- reader
# Reader state (w, nw, bp, pos): window (MSB-aligned), valid bits in it, next byte to
# load, logical bit position. The window is refilled to > 56 bits before each code.


@nb.njit(inline="always", cache=True)
def _refill(buf, w, nw, bp):
    while nw <= 56:
        w |= np.uint64(buf[bp]) << np.uint64(56 - nw)
        bp += 1
        nw += 8
    return w, nw, bp


@nb.njit(inline="always", cache=True)
def _reader_at(buf, pos):
    """A reader positioned at bit ``pos``."""
    bp = pos >> 3
    w, nw, bp = _refill(buf, np.uint64(0), 0, bp)
    skip = pos & 7
    return w << np.uint64(skip), nw - skip, bp


@nb.njit(inline="always", cache=True)
def _peek(w, nbits):
    return np.int64(w >> np.uint64(64 - nbits))


@nb.njit(inline="always", cache=True)
def _get_omega(buf, w, nw, bp, pos, end, dec_value, dec_len):
    """Decode one Elias-omega code; returns (value, w, nw, bp, pos, status)."""
    w, nw, bp = _refill(buf, w, nw, bp)
    t = _peek(w, _TABLE_BITS)
    length = dec_len[t]
    if length > 0:
        if pos + length > end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        return dec_value[t], w << np.uint64(length), nw - length, bp, pos + length, OK
    v = np.int64(1)
    while True:
        w, nw, bp = _refill(buf, w, nw, bp)
        if pos >= end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        if _peek(w, 1) == 0:
            return v, w << _U1, nw - 1, bp, pos + 1, OK
        n = v + 1
        if n > 56:
            return 0, w, nw, bp, pos, ERR_CODE
        if pos + n > end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        v = _peek(w, n)
        w = w << np.uint64(n)
        nw -= n
        pos += n


# --------------------------------------------------------------- Elias level streams


@nb.njit(parallel=True, cache=True)
def _elias_block_bits(levels, enc_len):
    n = levels.size
    nblk = (n + BLOCK - 1) // BLOCK
    out = np.zeros(nblk, np.int64)
    for b in nb.prange(nblk):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        last = lo - 1
        t = 0
        for i in range(lo, hi):
            lv = np.int64(levels[i])
            if lv != 0:
                t += omega_length(i - last, enc_len) + 1 + omega_length(abs(lv), enc_len)
                last = i
        out[b] = t
    return out


@nb.njit(parallel=True, cache=True)
def _elias_encode(levels, block_bits, enc_code, enc_len):
    n = levels.size
    nblk = block_bits.size
    offsets = np.zeros(nblk + 1, np.int64)
    for b in range(nblk):
        offsets[b + 1] = offsets[b] + block_bits[b]
    buf = np.zeros((offsets[nblk] + 7) // 8 + 8, np.uint8)
    tails = np.zeros(nblk, np.uint8)
    tail_at = np.zeros(nblk, np.int64)
    for b in nb.prange(nblk):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        p = offsets[b] >> 3
        acc = np.uint64(0)
        nacc = offsets[b] & 7
        last = lo - 1
        for i in range(lo, hi):
            lv = np.int64(levels[i])
            if lv != 0:
                code, length = omega_code(i - last, enc_code, enc_len)
                p, acc, nacc = _put_long(buf, p, acc, nacc, code, length)
                code, length = omega_code(abs(lv), enc_code, enc_len)
                p, acc, nacc = _put_long(buf, p, acc, nacc, (code | (np.int64(1) << length)) if lv < 0 else code, length + 1)
                last = i
        tails[b], tail_at[b] = _finish(buf, p, acc, nacc)
    for b in range(nblk):
        buf[tail_at[b]] |= tails[b]
    return buf[: (offsets[nblk] + 7) // 8]


@nb.njit(parallel=True, cache=True)
def _elias_decode(padded, block_bits, n, max_level, out, dec_value, dec_len):
    nblk = block_bits.size
    offsets = np.zeros(nblk + 1, np.int64)
    for b in range(nblk):
        offsets[b + 1] = offsets[b] + block_bits[b]
    status = np.zeros(nblk, np.int64)
    for b in nb.prange(nblk):
        lo = b * BLOCK
        hi = min(lo + BLOCK, n)
        pos = offsets[b]
        end = offsets[b + 1]
        w, nw, bp = _reader_at(padded, pos)
        i = lo - 1
        st = OK
        while pos < end:
            gap, w, nw, bp, pos, st = _get_omega(padded, w, nw, bp, pos, end, dec_value, dec_len)
            if st != OK:
                break
            i += gap
            if i >= hi:
                st = ERR_RANGE
                break
            if pos >= end:
                st = ERR_OVERRUN
                break
            neg = _peek(w, 1)
            w = w << _U1
            nw -= 1
            pos += 1
            mag, w, nw, bp, pos, st = _get_omega(padded, w, nw, bp, pos, end, dec_value, dec_len)
            if st != OK:
                break
            if mag > max_level:
                st = ERR_RANGE
                break
            out[i] = -mag if neg == 1 else mag
        if st == OK and pos != end:
            st = ERR_TRAILING
        status[b] = st
    for b in range(nblk):
        if status[b] != OK:
            return status[b]
    return OK


def elias_block_bits(levels: np.ndarray) -> np.ndarray:
    """Bit length of each block's (gap, sign, |level|) stream over the nonzero levels."""
    return _elias_block_bits(levels, ENC_LEN)


def elias_encode(levels: np.ndarray, block_bits: np.ndarray) -> np.ndarray:
    """QSGD's Elias coding (Alistarh et al., Sec. 3.2) of signed integer levels.

    Per nonzero: omega(gap to the previous nonzero in the block, >= 1), a sign bit
    (1 = negative), omega(|level|). Zeros cost nothing but the gaps around them.
    """
    return _elias_encode(levels, block_bits, ENC_CODE, ENC_LEN)


def elias_decode(padded: np.ndarray, block_bits: np.ndarray, n: int, max_level: int, out: np.ndarray) -> int:
    """Inverse of elias_encode into ``out`` (zeroed, length n); returns a status code.

    Every block must end exactly at its declared bit length and every level must be
    within ``max_level`` in magnitude.
    """
    return _elias_decode(padded, block_bits, n, max_level, out, DEC_VALUE, DEC_LEN)


# ----------------------------------------------------------------- fixed-width codes


@nb.njit(parallel=True, cache=True)
def pack_fixed(values, offset, width):
    """Pack ``values + offset`` (each in [0, 2**width)) into ``width`` bits each.

    Groups of 8 values fill exactly ``width`` bytes, so groups pack in parallel.
    """
    n = values.size
    buf = np.zeros((n * width + 7) // 8, np.uint8)
    if width == 8:
        for i in nb.prange(n):
            buf[i] = np.uint8(np.int64(values[i]) + offset)
        return buf
    ngroups = (n + 7) // 8
    for g in nb.prange(ngroups):
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
    return buf


@nb.njit(parallel=True, cache=True)
def unpack_fixed(padded, n, offset, width, max_abs, out):
    """Inverse of pack_fixed; returns ERR_RANGE if any value exceeds ``max_abs``."""
    ngroups = (n + 7) // 8
    bad = np.zeros(ngroups, np.bool_)
    for g in nb.prange(ngroups):
        w, nw, bp = _reader_at(padded, g * 8 * width)
        for j in range(g * 8, min(g * 8 + 8, n)):
            w, nw, bp = _refill(padded, w, nw, bp)
            v = _peek(w, width) - offset
            w = w << np.uint64(width)
            nw -= width
            if v > max_abs or v < -max_abs:
                bad[g] = True
            out[j] = v
    for g in range(ngroups):
        if bad[g]:
            return ERR_RANGE
    return OK


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
            p, acc, nacc = _put(buf, p, acc, nacc, (np.int64(1) << step) - 1, step)
            q -= step
        p, acc, nacc = _put_long(buf, p, acc, nacc, g & ((np.int64(1) << r) - 1), r + 1)
        last = indices[i]
    tail, tp = _finish(buf, p, acc, nacc)
    buf[tp] |= tail
    return buf[: (nbits + 7) // 8]


@nb.njit(cache=True)
def rice_decode(padded, nbits, r, k, n, out):
    """Inverse of rice_encode for k indices in [0, n); returns a status code."""
    pos = 0
    w, nw, bp = _reader_at(padded, 0)
    last = -1
    for i in range(k):
        q = 0
        while True:
            w, nw, bp = _refill(padded, w, nw, bp)
            if pos >= nbits:
                return ERR_OVERRUN
            bit = _peek(w, 1)
            w = w << _U1
            nw -= 1
            pos += 1
            if bit == 0:
                break
            q += 1
            if (q << r) >= n:
                return ERR_RANGE
        if pos + r > nbits:
            return ERR_OVERRUN
        rem = 0
        if r > 0:
            w, nw, bp = _refill(padded, w, nw, bp)
            rem = _peek(w, r)
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
