"""Bit-level primitives, compiled: Elias-omega codes and tables, the MSB-first bit
writer and reader, and the decoders' status codes.

Readers work on a copy of the input padded with 8 zero bytes (so refilling a 64-bit
window never leaves the buffer) and take the *declared* bit length as a hard bound:
every code is checked against it and a violation returns a negative status instead of
reading on. The coders built on these are in ``_elias`` (integer levels) and ``_bits``
(fixed-width values, Rice-coded positions).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

# Status codes returned by decoders (Python maps them to WireFormatError messages).
OK = 0
ERR_OVERRUN = -1  # a code runs past the declared bit length
ERR_CODE = -2  # an Elias/unary code is longer than any valid value
ERR_RANGE = -3  # a decoded position or value is outside the declared range
ERR_TRAILING = -4  # a stream does not end exactly at its declared length

U1 = np.uint64(1)
TABLE_BITS = 16  # codes of at most this many bits decode with one table lookup
TABLE_VALUES = 1 << 12  # values below this encode with one table lookup


#: Elements per round of the byte scratches whose bounds :func:`byte_sum` adds up (a
#: few KB: they stay in L1 between the loop that writes them and the sum).
BYTE_SCRATCH = 1 << 12
_BYTES_TO_TOP = np.uint64(0x0101010101010101)
_S56 = np.uint64(56)


@nb.njit(inline="always", cache=True)
def byte_sum(scratch, m):
    """Sum of ``scratch[:m]``, bytes of at most 31 each: eight at a time, as the top byte
    of one multiply (their sum stays below 256)."""
    whole = m - m % 8
    t = np.int64(0)
    words = scratch[:whole].view(np.uint64)
    for k in range(words.size):
        t += np.int64((words[k] * _BYTES_TO_TOP) >> _S56)
    for j in range(whole, m):
        t += np.int64(scratch[j])
    return t


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
    enc_code = np.empty(TABLE_VALUES, np.int64)
    enc_len = np.zeros(TABLE_VALUES, np.int64)
    dec_value = np.zeros(1 << TABLE_BITS, np.int64)
    dec_len = np.zeros(1 << TABLE_BITS, np.int64)  # 0: code longer than the table
    for v in range(1, TABLE_VALUES):
        code, length = omega_code_slow(v)
        enc_code[v] = code
        enc_len[v] = length
        if length <= TABLE_BITS:
            lo = code << (TABLE_BITS - length)
            for t in range(1 << (TABLE_BITS - length)):
                dec_value[lo + t] = v
                dec_len[lo + t] = length
    return enc_code, enc_len, dec_value, dec_len


ENC_CODE, ENC_LEN, DEC_VALUE, DEC_LEN = _build_tables()


@nb.njit(inline="always", cache=True)
def omega_code(v, enc_code, enc_len):
    """(code, length) of the omega code of v, from the table when v is small."""
    if v < TABLE_VALUES:
        return enc_code[v], enc_len[v]
    return omega_code_slow(v)


@nb.njit(inline="always", cache=True)
def omega_length(v, enc_len):
    """Bit length of the Elias-omega code of v >= 1."""
    if v < TABLE_VALUES:
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
def put_bits(buf, p, acc, nacc, v, nbits):
    """Append the low ``nbits`` (<= 32) bits of v."""
    acc = (acc << np.uint64(nbits)) | (np.uint64(v) & ((U1 << np.uint64(nbits)) - U1))
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
def put_long(buf, p, acc, nacc, v, nbits):
    """Append up to 64 bits, in two halves when needed."""
    if nbits > 32:
        p, acc, nacc = put_bits(buf, p, acc, nacc, np.int64(v) >> (nbits - 32), 32)
        nbits -= 32
    return put_bits(buf, p, acc, nacc, v, nbits)


@nb.njit(inline="always", cache=True)
def finish_bits(buf, p, acc, nacc):
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
def refill(buf, w, nw, bp):
    while nw <= 56:
        w |= np.uint64(buf[bp]) << np.uint64(56 - nw)
        bp += 1
        nw += 8
    return w, nw, bp


@nb.njit(inline="always", cache=True)
def reader_at(buf, pos):
    """A reader positioned at bit ``pos``."""
    bp = pos >> 3
    w, nw, bp = refill(buf, np.uint64(0), 0, bp)
    skip = pos & 7
    return w << np.uint64(skip), nw - skip, bp


@intrinsic
def _ctlz(typingctx, x):
    """LLVM's count-leading-zeros of a uint64 (64 for 0): one instruction where a loop
    would test bit by bit."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctlz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.int64(types.uint64), codegen


@nb.njit(inline="always", cache=True)
def leading_ones(w):
    """Number of leading one bits of the window ``w`` (at most its valid bits: the bits
    below them are zero)."""
    return _ctlz(~w)


@nb.njit(inline="always", cache=True)
def peek_bits(w, nbits):
    return np.int64(w >> np.uint64(64 - nbits))


@nb.njit(inline="always", cache=True)
def get_omega(buf, w, nw, bp, pos, end, dec_value, dec_len):
    """Decode one Elias-omega code; returns (value, w, nw, bp, pos, status)."""
    w, nw, bp = refill(buf, w, nw, bp)
    t = peek_bits(w, TABLE_BITS)
    length = dec_len[t]
    if length > 0:
        if pos + length > end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        return dec_value[t], w << np.uint64(length), nw - length, bp, pos + length, OK
    v = np.int64(1)
    while True:
        w, nw, bp = refill(buf, w, nw, bp)
        if pos >= end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        if peek_bits(w, 1) == 0:
            return v, w << U1, nw - 1, bp, pos + 1, OK
        n = v + 1
        if n > 56:
            return 0, w, nw, bp, pos, ERR_CODE
        if pos + n > end:
            return 0, w, nw, bp, pos, ERR_OVERRUN
        v = peek_bits(w, n)
        w = w << np.uint64(n)
        nw -= n
        pos += n
