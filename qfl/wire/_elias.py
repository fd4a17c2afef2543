"""QSGD's Elias coding of integer levels (Alistarh et al., Sec. 3.2), compiled.

Per nonzero level: omega(gap to the previous nonzero in the block), a sign bit,
omega(|level|). Levels are coded in blocks of ``BLOCK`` elements with gap coding
restarted at each block boundary, and the blocks' bit lengths go into the header:
encoding and decoding then run block-parallel while the stream stays one contiguous bit
string. Parallel or serial is chosen per call (``qfl.compress.runtime.parallel_slot``);
the bytes never depend on it. Decoders never loop more often than the declared element
count allows, so corrupted input cannot hang them.

Why one module of ~600 lines: the encoder and the decoder share the hot-loop tables
built here at import (GAP/SM codes, TRIPLE, PAIR) and their layout (_FAST_BITS, the
block size); the numba kernels inline each other's helpers, and the block-parallel
encoder's three steps (bound, code, shift into place) only make sense together. Split
apart, a change to one table layout would have to be made in two files in step.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ..compress import runtime
from ..compress.runtime import twin
from ._bitio import (
    BYTE_SCRATCH,
    DEC_LEN,
    DEC_VALUE,
    ERR_OVERRUN,
    ERR_RANGE,
    OK,
    TABLE_BITS,
    TABLE_VALUES,
    U1,
    bit_length,
    byte_sum,
    get_omega,
    omega_code_slow,
    omega_length,
    peek_bits,
    reader_at,
    refill,
)

#: Elements per independently coded block of an Elias level stream.
BLOCK = 1 << 16

# --------------------------------------------------------------- Elias level streams
# Hot-loop tables, compact so that they stay in L1:
#   GAP_LEN/GAP_CODE[g]     omega code of a gap 0 < g < TABLE_VALUES
#   SM_LEN/SM_CODE[v + off] sign bit + omega code of a level 0 < |v| < TABLE_VALUES
#   TRIPLE[t]               the whole (gap, sign, |level|) triple that the next
#                           _FAST_BITS bits of a stream start with, if it fits in them
#   OMEGA_BY_BITS[b]        omega length of any value of bit length b
#
# Encoding runs in three steps (see ``elias_encode_if_smaller``): a vectorised pass
# bounds each block's length from below (and so, via gaps <= block size, from above);
# blocks are then coded in parallel into disjoint scratch regions of that upper-bound
# size, which yields their exact lengths; finally the blocks are shifted into place in
# one contiguous stream. No separate exact-length pass, and the coding loops need no
# bounds checks.
_FAST_BITS = 12
_SM_OFF = TABLE_VALUES - 1
#: Blocks with more nonzeros than BLOCK / _DENSE are coded by the branch-free loop.
_DENSE = 16


@nb.njit(cache=True)
def _build_fast_tables():
    gap_code = np.zeros(TABLE_VALUES, np.int32)
    gap_len = np.zeros(TABLE_VALUES, np.uint8)
    sm_code = np.zeros(2 * TABLE_VALUES - 1, np.int32)
    sm_len = np.zeros(2 * TABLE_VALUES - 1, np.uint8)
    for v in range(1, TABLE_VALUES):
        code, length = omega_code_slow(v)
        gap_code[v] = code
        gap_len[v] = length
        sm_code[_SM_OFF + v] = code
        sm_code[_SM_OFF - v] = code | (np.int64(1) << length)
        sm_len[_SM_OFF + v] = length + 1
        sm_len[_SM_OFF - v] = length + 1
    # Fields of a TRIPLE entry: length (5 bits, 0 = does not fit), sign (1), gap (12), |level| (12).
    triple = np.zeros(1 << _FAST_BITS, np.int32)
    for g in range(1, TABLE_VALUES):
        gl = np.int64(gap_len[g])
        if gl + 2 > _FAST_BITS:
            continue
        for m in range(1, TABLE_VALUES):
            ml = np.int64(sm_len[_SM_OFF + m])
            total = gl + ml
            if total > _FAST_BITS:
                continue
            for neg in range(2):
                code = (np.int64(gap_code[g]) << ml) | sm_code[_SM_OFF - m if neg else _SM_OFF + m]
                lo = code << (_FAST_BITS - total)
                entry = total | (neg << 5) | (g << 6) | (m << 18)
                for t in range(1 << (_FAST_BITS - total)):
                    triple[lo + t] = entry
    by_bits = np.zeros(64, np.int64)
    for b in range(1, 54):
        total = 1
        v = b  # omega(v) depends on bit_length(v) only: groups of b, bit_length(b - 1), ... bits
        while v > 1:
            total += v
            v = bit_length(v - 1)
        by_bits[b] = total
    return gap_code, gap_len, sm_code, sm_len, triple, by_bits


GAP_CODE, GAP_LEN, SM_CODE, SM_LEN, TRIPLE, OMEGA_BY_BITS = _build_fast_tables()


@nb.njit(cache=True)
def _build_pair_table(triple):
    """PAIR[t]: the one or two whole triples that the next _FAST_BITS bits start with.

    Fields: total length (4 bits, 0 = not even one triple fits), sign 1, sign 2 (1 bit
    each), gap 1, |level| 1, gap 2, |level| 2 (6 bits each; a triple that fits in 12 bits
    has gap and level below 16). A lone triple repeats itself as the second with gap 0,
    so decoding always writes two values (the second one twice over the same element).
    """
    pair = np.zeros(1 << _FAST_BITS, np.int32)
    for t in range(1 << _FAST_BITS):
        e = triple[t]
        l1 = e & 31
        if l1 == 0:
            continue
        neg1 = (e >> 5) & 1
        g1 = (e >> 6) & 0xFFF
        m1 = e >> 18
        rest = (t << l1) & ((1 << _FAST_BITS) - 1)  # the following bits, zero-padded
        e2 = triple[rest]
        l2 = e2 & 31
        if l2 != 0 and l1 + l2 <= _FAST_BITS:
            pair[t] = (
                (l1 + l2)
                | (neg1 << 4)
                | (((e2 >> 5) & 1) << 5)
                | (g1 << 6)
                | (m1 << 12)
                | (((e2 >> 6) & 0xFFF) << 18)
                | ((e2 >> 18) << 24)
            )
        else:
            pair[t] = l1 | (neg1 << 4) | (neg1 << 5) | (g1 << 6) | (m1 << 12) | (m1 << 24)
    return pair


PAIR = _build_pair_table(TRIPLE)
#: One omega code of at most TABLE_BITS bits per lookup: (value << 5) | length, 0 if longer.
SINGLE = ((DEC_VALUE << 5) | DEC_LEN).astype(np.int32)


@nb.njit(inline="always", cache=True)
def _store_be64(buf, p, w):
    """Store w big-endian at byte p (LLVM merges this into one movbe)."""
    u = np.uint64(p)
    buf[u] = np.uint8(w >> np.uint64(56))
    buf[u + np.uint64(1)] = np.uint8((w >> np.uint64(48)) & np.uint64(0xFF))
    buf[u + np.uint64(2)] = np.uint8((w >> np.uint64(40)) & np.uint64(0xFF))
    buf[u + np.uint64(3)] = np.uint8((w >> np.uint64(32)) & np.uint64(0xFF))
    buf[u + np.uint64(4)] = np.uint8((w >> np.uint64(24)) & np.uint64(0xFF))
    buf[u + np.uint64(5)] = np.uint8((w >> np.uint64(16)) & np.uint64(0xFF))
    buf[u + np.uint64(6)] = np.uint8((w >> np.uint64(8)) & np.uint64(0xFF))
    buf[u + np.uint64(7)] = np.uint8(w & np.uint64(0xFF))


@nb.njit(inline="always", cache=True)
def _load_be64(buf, byte):
    """The 8 bytes at ``byte`` as a big-endian word (LLVM merges this into one movbe)."""
    u = np.uint64(byte)
    return (
        (np.uint64(buf[u]) << np.uint64(56))
        | (np.uint64(buf[u + np.uint64(1)]) << np.uint64(48))
        | (np.uint64(buf[u + np.uint64(2)]) << np.uint64(40))
        | (np.uint64(buf[u + np.uint64(3)]) << np.uint64(32))
        | (np.uint64(buf[u + np.uint64(4)]) << np.uint64(24))
        | (np.uint64(buf[u + np.uint64(5)]) << np.uint64(16))
        | (np.uint64(buf[u + np.uint64(6)]) << np.uint64(8))
        | np.uint64(buf[u + np.uint64(7)])
    )


@nb.njit(inline="always", cache=True)
def _load_be32(buf, byte):
    """The 4 bytes at ``byte`` as a big-endian value in the low half of a word."""
    u = np.uint64(byte)
    return (
        (np.uint64(buf[u]) << np.uint64(24))
        | (np.uint64(buf[u + np.uint64(1)]) << np.uint64(16))
        | (np.uint64(buf[u + np.uint64(2)]) << np.uint64(8))
        | np.uint64(buf[u + np.uint64(3)])
    )


@nb.njit(inline="always", cache=True)
def _put8(buf, p, acc, nacc, code, length):
    """Append ``length`` <= 56 bits (``code`` has no higher bits; length 0 is a no-op).

    Stores the whole accumulator as one word every time, so there is no branch; the
    buffer must have 8 bytes of room past the last whole byte. Fewer than 8 bits stay
    in the accumulator between calls."""
    acc = (acc << np.uint64(length)) | np.uint64(code)
    nacc += length
    _store_be64(buf, p, (acc << np.uint64(63 - nacc)) << U1)
    return p + (nacc >> 3), acc, nacc & 7


@nb.njit(inline="always", cache=True)
def _flush(buf, p, p0, acc, nacc):
    """Store the bits left in the accumulator; the block's length in bits from byte p0."""
    if nacc:
        _store_be64(buf, p, acc << np.uint64(64 - nacc))
    return 8 * (p - p0) + nacc


@nb.njit(inline="always", cache=True)
def _put_slow_triple(buf, p, acc, nacc, g, lv):
    code, length = omega_code_slow(g)
    p, acc, nacc = _put8(buf, p, acc, nacc, code, length)
    code, length = omega_code_slow(abs(lv))
    if lv < 0:
        code |= np.int64(1) << length
    return _put8(buf, p, acc, nacc, code, length + 1)


@nb.njit(cache=True)
def _encode_dense(blk, buf, p, gap_code, gap_len, sm_code, sm_len):
    """Code one block with a branch-free loop (zeros are zero-length puts); returns bits."""
    p0, acc, nacc, last = p, np.uint64(0), 0, -1
    for i in range(blk.size):
        lv = np.int64(blk[i])
        nz = lv != 0
        g = i - last
        if nz & ((g >= TABLE_VALUES) | (lv >= TABLE_VALUES) | (lv <= -TABLE_VALUES)):
            p, acc, nacc = _put_slow_triple(buf, p, acc, nacc, g, lv)
            last = i
            continue
        gi = np.uint64(min(g, TABLE_VALUES - 1))
        vi = np.uint64(max(min(lv, TABLE_VALUES - 1), 1 - TABLE_VALUES) + _SM_OFF)
        ml = np.int64(sm_len[vi])
        code = (np.uint64(gap_code[gi]) << np.uint64(ml)) | np.uint64(sm_code[vi])
        length = np.int64(gap_len[gi]) + ml
        p, acc, nacc = _put8(buf, p, acc, nacc, code if nz else np.uint64(0), length if nz else 0)
        last = i if nz else last
    return _flush(buf, p, p0, acc, nacc)


@nb.njit(cache=True)
def _encode_sparse(blk, buf, p, gap_code, gap_len, sm_code, sm_len):
    """Code one mostly-zero block: a predictable branch skips the zeros; returns bits."""
    p0, acc, nacc, last = p, np.uint64(0), 0, -1
    for i in range(blk.size):
        lv = np.int64(blk[i])
        if lv == 0:
            continue
        g = i - last
        last = i
        if g < TABLE_VALUES and -TABLE_VALUES < lv < TABLE_VALUES:
            vi = np.uint64(lv + _SM_OFF)
            ml = np.int64(sm_len[vi])
            code = (np.uint64(gap_code[g]) << np.uint64(ml)) | np.uint64(sm_code[vi])
            p, acc, nacc = _put8(buf, p, acc, nacc, code, np.int64(gap_len[g]) + ml)
        else:
            p, acc, nacc = _put_slow_triple(buf, p, acc, nacc, g, lv)
    return _flush(buf, p, p0, acc, nacc)


@nb.njit(inline="always", cache=True)
def _lb8(blk, bound, nonzero):
    """(lower bound, nonzeros) of an int8 block: 2 + omega(|v|) bits per nonzero, as a
    sum of threshold tests (omega length steps at powers of two). Each level's bound
    (<= 16) and nonzero flag are stored as bytes into the scratches ``bound`` and
    ``nonzero`` and summed from there: computed and stored at byte width, the loop
    vectorises 32 levels per AVX2 instruction, where int32 sums ran ten times slower
    (1M levels: 1.35 -> 0.14 ms)."""
    t = np.int64(0)
    nz = np.int64(0)
    lo = 0
    while lo < blk.size:
        seg = blk[lo : min(lo + BYTE_SCRATCH, blk.size)]
        for i in range(seg.size):
            v = seg[i]
            a = np.uint8(v if v >= 0 else -v)  # |-128| is 128 as a byte
            bound[i] = (
                np.uint8(3) * np.uint8(a >= 1)
                + np.uint8(2) * np.uint8(a >= 2)
                + np.uint8(3) * np.uint8(a >= 4)
                + np.uint8(a >= 8)
                + np.uint8(4) * np.uint8(a >= 16)
                + np.uint8(a >= 32)
                + np.uint8(a >= 64)
                + np.uint8(a >= 128)
            )
            nonzero[i] = np.uint8(a != 0)
        t += byte_sum(bound, seg.size)
        nz += byte_sum(nonzero, seg.size)
        lo += seg.size
    return t, nz


@nb.njit(inline="always", cache=True)
def _lb_any(blk, by_bits):
    """(lower bound, nonzeros) of a block of any integer type, via the float64 exponent."""
    t = 0
    nz = 0
    for i in range(blk.size):
        a = abs(np.int64(blk[i]))
        b = max(np.int64(np.float64(a).view(np.uint64) >> np.uint64(52)) - 1022, 0)
        nonzero = a != 0
        t += (2 + by_bits[np.uint64(b)]) if nonzero else 0
        nz += nonzero
    return t, nz


@nb.njit(cache=True)
def _block_bounds(levels, by_bits):
    """Per block: (lower bound on its Elias bits, number of nonzeros). Serial: memory-bound."""
    n = levels.size
    nblk = (n + BLOCK - 1) // BLOCK
    lower = np.empty(nblk, np.int64)
    nonzero = np.empty(nblk, np.int64)
    scratch = np.empty(2 * BYTE_SCRATCH, np.uint8)
    for b in range(nblk):
        blk = levels[b * BLOCK : min(b * BLOCK + BLOCK, n)]
        if levels.itemsize == 1:
            lower[b], nonzero[b] = _lb8(blk, scratch[:BYTE_SCRATCH], scratch[BYTE_SCRATCH:])
        else:
            lower[b], nonzero[b] = _lb_any(blk, by_bits)
    return lower, nonzero


@nb.njit(inline="always", cache=True)
def _encode_block(levels, b, starts, nonzero, scratch, bits, gap_code, gap_len, sm_code, sm_len):
    blk = levels[b * BLOCK : min(b * BLOCK + BLOCK, levels.size)]
    if nonzero[b] * _DENSE > blk.size:
        bits[b] = _encode_dense(blk, scratch, starts[b], gap_code, gap_len, sm_code, sm_len)
    elif nonzero[b]:
        bits[b] = _encode_sparse(blk, scratch, starts[b], gap_code, gap_len, sm_code, sm_len)


@twin
def _encode_blocks(levels, starts, nonzero, scratch, bits, gap_code, gap_len, sm_code, sm_len):
    for b in nb.prange(bits.size):
        _encode_block(levels, b, starts, nonzero, scratch, bits, gap_code, gap_len, sm_code, sm_len)


@nb.njit(inline="always", cache=True)
def _byte_at(src, s0, k):
    """Bits [k, k + 8) of the MSB-first bit string starting at byte s0 of src."""
    j = np.uint64(s0 + (k >> 3))
    sh = np.uint64(k & 7)
    return np.uint8(
        ((np.uint64(src[j]) << sh) | (np.uint64(src[j + np.uint64(1)]) >> (np.uint64(8) - sh))) & np.uint64(0xFF)
    )


@nb.njit(inline="always", cache=True)
def _copy_whole_bytes(scratch, s0, o, nbits, out):
    """The bytes of ``out`` that lie wholly inside bits [o, o + nbits), from scratch.

    Every such byte is the same shift of two neighbouring scratch bytes, so eight go at
    a time as one big-endian word (the scratch region has room to read past its end)."""
    d0 = (o + 7) >> 3
    d1 = (o + nbits) >> 3
    if d1 <= d0:
        return
    k = 8 * d0 - o
    src = s0 + (k >> 3)
    sh = np.uint64(k & 7)
    rsh = np.uint64(8) - sh
    d = d0
    while d + 8 <= d1:
        word = (_load_be64(scratch, src) << sh) | (np.uint64(scratch[np.uint64(src + 8)]) >> rsh)
        _store_be64(out, d, word)
        d += 8
        src += 8
    while d < d1:
        out[d] = np.uint8(
            ((np.uint64(scratch[np.uint64(src)]) << sh) | (np.uint64(scratch[np.uint64(src + 1)]) >> rsh))
            & np.uint64(0xFF)
        )
        d += 1
        src += 1


@twin
def _copy_blocks(scratch, starts, offsets, bits, out):
    for b in nb.prange(bits.size):
        _copy_whole_bytes(scratch, starts[b], offsets[b], bits[b], out)


def _concatenate(n, scratch, starts, bits):
    """One stream from the blocks' bit strings: block b's bits land at bit offset
    sum(bits[:b]). Bytes that lie inside one block are copied (in parallel for large
    ``n``); bytes that blocks share (or that end the stream) are OR-ed together
    afterwards."""
    offsets = np.zeros(bits.size + 1, np.int64)
    np.cumsum(bits, out=offsets[1:])
    out = runtime.empty((int(offsets[-1]) + 7) >> 3, np.uint8)
    _copy_blocks(n, scratch, starts, offsets, bits, out)
    _join_partial_bytes(scratch, starts, offsets, bits, out)
    return out


@nb.njit(cache=True)
def _join_partial_bytes(scratch, starts, offsets, bits, out):
    """Partial bytes: where a block starts or ends mid-byte. Clear them, then OR in each
    block's share (its scratch bits past its length are zero)."""
    nblk = bits.size
    for b in range(nblk):
        if bits[b]:
            if offsets[b] & 7:
                out[offsets[b] >> 3] = 0
            if offsets[b + 1] & 7:
                out[offsets[b + 1] >> 3] = 0
    for b in range(nblk):
        o = offsets[b]
        e = offsets[b + 1]
        if not bits[b]:
            continue
        if o & 7:  # head byte: all of this block's bits in it
            out[o >> 3] |= scratch[starts[b]] >> np.uint8(o & 7)
        if e & 7 and not (o & 7 and (e >> 3) == (o >> 3)):  # tail byte, unless it is the head
            d = e >> 3
            out[d] |= _byte_at(scratch, starts[b], 8 * d - o)


@nb.njit(cache=True)
def _scratch_starts(upper):
    """Byte offset of each block's scratch region (upper-bound bits + 8 bytes of room)."""
    starts = np.zeros(upper.size + 1, np.int64)
    for b in range(upper.size):
        starts[b + 1] = starts[b] + (upper[b] + 7) // 8 + 16
    return starts


def _plan(levels: np.ndarray):
    lower, nonzero = _block_bounds(levels, OMEGA_BY_BITS)
    return lower, nonzero


def _encode_with(levels: np.ndarray, lower: np.ndarray, nonzero: np.ndarray):
    # Exact length <= sum over nonzeros of (gap + 2 + sign/level bits) <= block size +
    # nonzeros + lower bound (an omega code of g has at most g + 2 bits).
    sizes = np.minimum(levels.size - np.arange(lower.size, dtype=np.int64) * BLOCK, BLOCK)
    starts = _scratch_starts(sizes + nonzero + lower)
    scratch = runtime.empty(int(starts[-1]) + 8, np.uint8)
    bits = np.zeros(lower.size, np.int64)
    _encode_blocks(levels.size, levels, starts, nonzero, scratch, bits, GAP_CODE, GAP_LEN, SM_CODE, SM_LEN)
    return scratch, starts, bits


def elias_encode_if_smaller(levels: np.ndarray, limit_bits: int):
    """``(block_bits, stream)`` of the Elias coding of ``levels`` if it takes fewer than
    ``limit_bits`` bits, else None (decided from a cheap lower bound when possible)."""
    lower, nonzero = _plan(levels)
    if int(lower.sum()) >= limit_bits:
        return None
    scratch, starts, bits = _encode_with(levels, lower, nonzero)
    if int(bits.sum()) >= limit_bits:
        return None
    return bits, _concatenate(levels.size, scratch, starts, bits)


@twin
def _elias_block_bits(levels, gap_len, sm_len):
    n = levels.size
    nblk = (n + BLOCK - 1) // BLOCK
    out = np.zeros(nblk, np.int64)
    for b in nb.prange(nblk):
        blk = levels[b * BLOCK : min(b * BLOCK + BLOCK, n)]
        last = -1
        t = 0
        for i in range(blk.size):
            lv = np.int64(blk[i])
            if lv != 0:
                g = i - last
                last = i
                if g < TABLE_VALUES and -TABLE_VALUES < lv < TABLE_VALUES:
                    t += np.int64(gap_len[g]) + np.int64(sm_len[lv + _SM_OFF])
                else:
                    t += omega_length(g, gap_len) + 1 + omega_length(abs(lv), gap_len)
        out[b] = t
    return out


@nb.njit(cache=True)
def _slow_triple(padded, pos, end, dec_value, dec_len):
    """Decode one (gap, sign, |level|) triple code by code: (gap, neg, mag, pos, status)."""
    w, nw, bp = reader_at(padded, pos)
    gap, w, nw, bp, pos, st = get_omega(padded, w, nw, bp, pos, end, dec_value, dec_len)
    if st != OK:
        return gap, 0, 0, pos, st
    if pos >= end:
        return gap, 0, 0, pos, ERR_OVERRUN
    w, nw, bp = refill(padded, w, nw, bp)
    neg = peek_bits(w, 1)
    w = w << U1
    pos += 1
    mag, w, nw, bp, pos, st = get_omega(padded, w, nw - 1, bp, pos, end, dec_value, dec_len)
    return gap, neg, mag, pos, st


@nb.njit(cache=True)
def _decode_block(padded, pos, end, max_level, blk, pair, single, dec_value, dec_len):
    """Decode one block's stream into ``blk`` (zeroed here); returns a status."""
    blk[:] = 0
    i = -1
    # Window: w holds nw >= 32 valid bits, MSB-aligned; bp is the next byte to load.
    w = _load_be64(padded, pos >> 3) << np.uint64(pos & 7)
    nw = 64 - (pos & 7)
    bp = (pos >> 3) + 8
    while pos < end:
        if nw < 32:
            w |= _load_be32(padded, bp) << np.uint64(32 - nw)
            nw += 32
            bp += 4
        e = pair[np.int64(w >> np.uint64(64 - _FAST_BITS))]
        length = e & 15
        if length != 0 and pos + length <= end:
            # One or two whole (gap, sign, level) triples in one lookup.
            i1 = i + ((e >> 6) & 63)
            i = i1 + ((e >> 18) & 63)
            m1 = np.int64((e >> 12) & 63)
            m2 = np.int64(e >> 24)
            if i >= blk.size or m1 > max_level or m2 > max_level:
                return ERR_RANGE
            blk[i1] = -m1 if (e >> 4) & 1 else m1
            blk[i] = -m2 if (e >> 5) & 1 else m2
            pos += length
            w <<= np.uint64(length)
            nw -= length
            continue
        else:
            # Code by code with the 16-bit table; anything longer (or an error) goes to
            # the general decoder, from the start of the triple.
            e1 = single[np.int64(w >> np.uint64(64 - TABLE_BITS))]
            l1 = e1 & 31
            w2 = w << np.uint64(l1)
            nw2 = nw - l1
            if nw2 < 17:
                w2 |= _load_be32(padded, bp) << np.uint64(32 - nw2)
                nw2 += 32
                bp += 4
            e2 = single[np.int64((w2 << U1) >> np.uint64(64 - TABLE_BITS))]
            l2 = e2 & 31
            if l1 != 0 and l2 != 0 and pos + l1 + 1 + l2 <= end:
                pos += l1 + 1 + l2
                neg = np.int64(w2 >> np.uint64(63))
                w = w2 << np.uint64(1 + l2)
                nw = nw2 - 1 - l2
                i += e1 >> 5
                mag = np.int64(e2 >> 5)
            else:
                gap, neg, mag, pos, st = _slow_triple(padded, pos, end, dec_value, dec_len)
                if st != OK:
                    return st
                i += gap
                w = _load_be64(padded, pos >> 3) << np.uint64(pos & 7)
                nw = 64 - (pos & 7)
                bp = (pos >> 3) + 8
        if i >= blk.size or mag > max_level:
            return ERR_RANGE
        blk[i] = -mag if neg else mag
    return OK


@twin
def _decode_blocks(padded, offsets, n, max_level, out, status, pair, single, dec_value, dec_len):
    for b in nb.prange(status.size):
        status[b] = _decode_block(
            padded,
            offsets[b],
            offsets[b + 1],
            max_level,
            out[b * BLOCK : min(b * BLOCK + BLOCK, n)],
            pair,
            single,
            dec_value,
            dec_len,
        )


def elias_block_bits(levels: np.ndarray) -> np.ndarray:
    """Bit length of each block's (gap, sign, |level|) stream over the nonzero levels."""
    return _elias_block_bits(levels.size, levels, GAP_LEN, SM_LEN)


def elias_size_lower_bound(levels: np.ndarray) -> int:
    """A cheap lower bound on ``elias_block_bits(levels).sum()``."""
    return int(_plan(levels)[0].sum())


def elias_encode(levels: np.ndarray, block_bits: np.ndarray) -> np.ndarray:
    """QSGD's Elias coding (Alistarh et al., Sec. 3.2) of signed integer levels.

    Per nonzero: omega(gap to the previous nonzero in the block, >= 1), a sign bit
    (1 = negative), omega(|level|). Zeros cost nothing but the gaps around them.
    ``block_bits`` must be ``elias_block_bits(levels)``.
    """
    lower, nonzero = _plan(levels)
    scratch, starts, bits = _encode_with(levels, lower, nonzero)
    if not np.array_equal(bits, block_bits):
        raise ValueError("block_bits do not match the levels")
    return _concatenate(levels.size, scratch, starts, bits)


def elias_decode(padded: np.ndarray, block_bits: np.ndarray, n: int, max_level: int, out: np.ndarray) -> int:
    """Inverse of elias_encode into ``out`` (length n, any content); returns a status code.

    Every block must end exactly at its declared bit length and every level must be
    within ``max_level`` in magnitude. ``padded`` holds the stream and 8 more bytes.
    """
    offsets = np.zeros(block_bits.size + 1, np.int64)
    np.cumsum(block_bits, out=offsets[1:])
    status = np.zeros(block_bits.size, np.int64)
    _decode_blocks(n, padded, offsets, n, max_level, out, status, PAIR, SINGLE, DEC_VALUE, DEC_LEN)
    bad = np.flatnonzero(status)
    return int(status[bad[0]]) if bad.size else OK
