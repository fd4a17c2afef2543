"""The wire format: real bits, exact round trips, and hostile input rejected cleanly."""

from __future__ import annotations

import math
import random
import warnings

import numpy as np
import pytest
import torch
from expected import container_bytes

import qfl
from qfl import wire
from qfl.compress.quantizers import level_dtype
from qfl.wire import Limits, WireFormatError, decode, decode_all, encode, fuzz_inputs
from qfl.wire import _bits as B
from qfl.wire.fuzz_inputs import content_of, frame
from qfl.wire.layout import SEGMENT, checksum

SPECS = [s for s in fuzz_inputs.SPECS if s not in fuzz_inputs.EDGE_SPECS]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(), (0,), (1,), (1000,), (3, 4, 5, 6)]


# ------------------------------------------------------------------- Elias-omega
def omega_reference(v: int) -> str:
    """Elias-omega code as a bit string, straight from the definition."""
    code = "0"
    while v > 1:
        b = bin(v)[2:]
        code = b + code
        v = len(b) - 1
    return code


def test_omega_code_lengths_and_bits_match_the_definition():
    assert [len(omega_reference(v)) for v in (1, 2, 3, 4, 7, 8, 15, 16, 100)] == [1, 3, 3, 6, 6, 7, 7, 11, 13]
    values = list(range(1, 5000)) + [2**k + d for k in range(12, 43) for d in (-1, 0, 1)]
    lengths = B.omega_lengths(np.array(values))
    for v, n in zip(values, lengths):
        ref = omega_reference(v)
        code, length = B.omega_code_slow(v)
        assert n == length == len(ref)
        assert format(code, f"0{length}b") == ref


def test_elias_level_stream_round_trip_and_exact_length():
    rng = np.random.default_rng(0)
    for n, density, s in [(1, 1.0, 3), (1000, 0.1, 7), (200_000, 0.5, 2**20), (70_000, 0.001, 100), (5, 0.0, 3)]:
        lv = np.where(rng.random(n) < density, rng.integers(-s, s + 1, n), 0).astype(np.int32)
        blocks = B.elias_block_bits(lv)
        # Length from the definition: gap, sign, level per nonzero, gaps restarting per block.
        expected = 0
        for b in range(0, n, B.BLOCK):
            nz = np.flatnonzero(lv[b : b + B.BLOCK])
            gaps = np.diff(np.concatenate([[-1], nz]))
            expected += sum(len(omega_reference(int(g))) for g in gaps) + len(nz)
            expected += sum(len(omega_reference(abs(int(v)))) for v in lv[b : b + B.BLOCK][nz])
        assert int(blocks.sum()) == expected
        buf = B.elias_encode(lv, blocks)
        assert buf.size == (expected + 7) // 8
        padded = np.zeros(buf.size + 8, np.uint8)
        padded[: buf.size] = buf
        out = np.zeros(n, np.int32)
        assert B.elias_decode(padded, blocks, n, s, out) == B.OK
        assert np.array_equal(out, lv)


def test_elias_block_bounds_of_int8_levels_are_the_exact_per_level_sums():
    """The encoder sizes each block's scratch from these (bound + nonzeros): the int8
    path's byte-width sums must equal the per-level definition, -128 and block and
    scratch-round edges included (an undercount would write past the scratch)."""
    from qfl.wire import _elias as E

    rng = np.random.default_rng(5)
    for n in (1, E.BYTE_SCRATCH - 1, E.BYTE_SCRATCH + 1, 2 * E.BLOCK + 3 * E.BYTE_SCRATCH + 7):
        for density in (0.0, 0.01, 0.5, 1.0):
            lv = np.where(rng.random(n) < density, rng.integers(-128, 128, n), 0).astype(np.int8)
            lv[rng.integers(0, n, 3)] = -128
            a = np.abs(lv.astype(np.int64))
            bits = np.where(a > 0, 2 + np.array([len(omega_reference(int(v))) if v else 0 for v in a]), 0)
            starts = np.arange(0, n, E.BLOCK)
            lower, nonzero = E._block_bounds(lv, E.OMEGA_BY_BITS)
            assert lower.tolist() == np.add.reduceat(bits, starts).tolist()
            assert nonzero.tolist() == np.add.reduceat(a > 0, starts).tolist()


@pytest.mark.parametrize("width", range(1, 14))
def test_fixed_width_levels_decode_as_their_bits_say_on_any_stream(width):
    """unpack_fixed reads value i from bits [i*width, (i+1)*width), MSB first, minus the
    offset, and reports ERR_RANGE exactly when one exceeds max_abs: on streams pack_fixed
    wrote and on random bytes, every group length and tail (numpy's unpackbits as the
    reference)."""
    rng = np.random.default_rng(width)
    offset = (1 << width) // 2 - 1 if width > 1 else 0
    max_abs = max(offset, 0)
    for n in (0, 1, 7, 8, 9, 63, 1000, 8 * 8192 + 13):  # 8192 groups: a parallel work item
        values = rng.integers(-max_abs, max_abs + 1, n)
        packed = B.pack_fixed(values, offset, width)
        assert packed.size == (n * width + 7) // 8
        for stream in (packed, rng.integers(0, 256, packed.size, dtype=np.uint8)):
            padded = np.concatenate([stream, rng.integers(0, 256, 8, dtype=np.uint8)])  # slack: any bytes
            bits = np.unpackbits(stream)[: n * width].reshape(n, width).astype(np.int64)
            expected = bits @ (1 << np.arange(width - 1, -1, -1)) - offset
            if stream is packed:
                assert np.array_equal(expected, values)
            out = np.zeros(n, level_dtype(max(max_abs, 1)))  # what the decoder allocates
            status = B.unpack_fixed(padded if width != 8 else stream, n, offset, width, max_abs, out)
            in_range = np.abs(expected) <= max_abs
            assert np.array_equal(out[in_range], expected[in_range])
            assert status == (B.OK if in_range.all() else B.ERR_RANGE)


def test_rice_round_trip():
    rng = np.random.default_rng(1)
    for n, k in [(10, 0), (10, 10), (1_000_000, 1000), (100, 1)]:
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        for r in (0, 3, 9):
            bits = B.rice_bits(idx, r)
            buf = B.rice_encode(idx, r, bits)
            padded = np.concatenate([buf, np.zeros(8, np.uint8)])
            out = np.empty(k, np.int64)
            assert B.rice_decode(padded, bits, r, k, n, out) == B.OK
            assert np.array_equal(out, idx)


def _rice_decode_bitwise(padded, nbits, r, k, n):
    """The Rice decoder read one bit at a time: the status and indices qfl's windowed
    decoder must give on every stream, well-formed or not."""
    bits = np.unpackbits(padded)
    pos, last, out = 0, -1, []
    for _ in range(k):
        q = 0
        while True:
            if pos >= nbits:
                return B.ERR_OVERRUN, out
            bit = bits[pos]
            pos += 1
            if bit == 0:
                break
            q += 1
            if (q << r) >= n:
                return B.ERR_RANGE, out
        if pos + r > nbits:
            return B.ERR_OVERRUN, out
        rem = int("".join(map(str, bits[pos : pos + r])) or "0", 2)
        pos += r
        idx = last + 1 + ((q << r) | rem)
        if idx >= n:
            return B.ERR_RANGE, out
        out.append(idx)
        last = idx
    return (B.OK if pos == nbits else B.ERR_TRAILING), out


def test_rice_decode_gives_the_bitwise_status_on_any_stream():
    """Valid streams, truncated or overlong declared lengths, too small ranges, long unary
    runs (a whole 64-bit window of ones and more) and random bytes."""
    rng = np.random.default_rng(7)
    cases = []
    for n, k, r in [(5000, 300, 3), (100, 100, 0), (1 << 20, 40, 2), (300, 3, 0), (64, 1, 0)]:
        idx = np.sort(rng.choice(n, k, replace=False)).astype(np.int64)
        bits = B.rice_bits(idx, r)
        buf = B.rice_encode(idx, r, bits)
        for nbits in (bits, bits - 1, bits + 3, bits // 2, max(bits - 70, 0)):
            for nn in (n, max(n // 3, 1), idx[-1] + 1, 0):
                cases.append((buf, nbits, r, k, nn))
    for _ in range(300):
        buf = rng.integers(0, 256, int(rng.integers(1, 40)), dtype=np.uint8)
        if rng.random() < 0.5:
            buf[: int(rng.integers(0, buf.size + 1))] = 0xFF  # runs of ones across windows
        r = int(rng.integers(0, 6))
        cases.append(
            (buf, int(rng.integers(0, buf.size * 8 + 1)), r, int(rng.integers(1, 30)), int(rng.integers(0, 5000)))
        )
    for buf, nbits, r, k, n in cases:
        padded = np.concatenate([buf, np.zeros(8, np.uint8)])
        out = np.full(k, -1, np.int64)
        status, expected = _rice_decode_bitwise(padded, nbits, r, k, n)
        assert B.rice_decode(padded, nbits, r, k, n, out) == status, (nbits, r, k, n)
        if status == B.OK:
            assert out.tolist() == expected


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_operator_dtype_shape(spec, dtype):
    op = qfl.parse(spec)
    for shape in SHAPES:
        x = torch.randn(shape).to(dtype)
        p = op.compress(x, torch.Generator().manual_seed(3))
        blob = encode(p)
        q = decode(blob)
        assert q.op == p.op and q.shape == p.shape and q.dtype == p.dtype
        assert torch.equal(q.decompress(), p.decompress())


@pytest.mark.parametrize(
    "x",
    [
        torch.arange(12).reshape(3, 4),
        torch.tensor([True, False, True]),
        torch.randint(-100, 100, (5,), dtype=torch.int8),
        torch.tensor(7),
    ],
)
def test_non_float_round_trip(x):
    q = decode(encode(qfl.parse("qsgd(4)").compress(x)))
    assert torch.equal(q.decompress(), x)


def test_blobs_concatenate():
    x = torch.randn(100)
    payloads = [qfl.parse(s).compress(x) for s in ("qsgd(4)", "topk(0.1)", "identity")]
    blob = b"".join(encode(p) for p in payloads)
    out = decode_all(blob)
    assert [p.op for p in out] == [p.op for p in payloads]
    assert decode_all(b"") == []
    with pytest.raises(WireFormatError, match="trailing"):
        decode(blob)


@pytest.mark.parametrize("n", [10, 100_000, 3_000_000])  # a bytearray copied, a bytes in place, huge pages
def test_raw_values_decode_in_place_from_bytes_and_copied_from_mutable_buffers(n):
    x = torch.randn(n)
    blob = encode(qfl.parse("identity").compress(x))
    assert type(blob) is bytes and torch.equal(decode(blob).decompress(), x)
    buf = bytearray(blob)
    from_bytes, from_bytearray = decode(blob).decompress(), decode(buf).decompress()
    start = len(blob) - 4 * n  # the values end the blob
    assert from_bytes.data_ptr() == np.frombuffer(blob, np.uint8)[start:].ctypes.data  # a view: no pass
    buf[start:] = bytes(4 * n)  # a receiver's mutable buffer changes later: its decoded values do not
    assert torch.equal(from_bytearray, x) and torch.equal(from_bytes, x)
    # Compressing a decoded view again hands the kernels an aligned copy.
    if from_bytes.data_ptr() % 4:
        for spec in ("identity", "qsgd(16)", "fp16"):
            again = qfl.parse(spec).compress(from_bytes, torch.Generator().manual_seed(0))
            assert torch.equal(decode(encode(again)).decompress(), again.decompress())
        assert qfl.parse("identity").compress(from_bytes).body.values.data_ptr() % 4 == 0
    # Values a sparsifier kept are copied: a view of a few of them would hold the whole message.
    sparse = encode(qfl.parse("randk(0.5)").compress(x, torch.Generator().manual_seed(0)))
    kept = decode(sparse).body.values.values.data_ptr()
    base = np.frombuffer(sparse, np.uint8).ctypes.data
    assert not base <= kept < base + len(sparse)


@pytest.mark.parametrize("warn_always", [False, True])
def test_values_read_in_place_never_surface_torch_s_read_only_warning(warn_always):
    """torch warns about a tensor over read-only memory (once per process, or every time
    under ``torch.set_warn_always``); the decoder's in-place values must not show it to
    the user, whichever way torch is set and however often it decodes."""
    blob = encode(qfl.parse("identity").compress(torch.randn(32)))
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(warn_always)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(3):
                decode(blob).decompress()
    finally:
        torch.set_warn_always(before)


# ------------------------------------------------------------------ real bits
def test_sizes_are_bits_not_containers():
    x = torch.randn(100_000)
    n = x.numel()
    header = 48
    assert len(encode(qfl.parse("grid(8)").compress(x))) <= n + header
    assert len(encode(qfl.parse("grid(4)").compress(x))) <= n // 2 + header
    assert len(encode(qfl.parse("grid(2)").compress(x))) <= n // 4 + header
    assert len(encode(qfl.parse("sign").compress(x))) <= n // 8 + header
    assert len(encode(qfl.parse("fp16").compress(x))) <= 2 * n + header
    # rand-k: values only (the seed regenerates positions).
    assert len(encode(qfl.parse("randk(0.01)").compress(x))) <= 4 * 1000 + header
    # top-k positions: close to the entropy log2(C(n, k)) bits, far below 32-bit indices.
    k = 1000
    entropy_bits = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    topk_bytes = len(encode(qfl.parse("topk(0.01)").compress(x)))
    assert topk_bytes - 4 * k <= 1.05 * entropy_bits / 8 + header


def test_qsgd_sqrt_d_levels_within_paper_bound():
    """QSGD, Corollary 3.3: with s = sqrt(d), expected code length <= 2.8 d + 32 bits.

    Counts the whole blob, header included, for Gaussian input and for the heavier tails
    of real model updates. (A flat vector, all |v_i| equal, puts every level at exactly 1
    and costs 3 bits per element: gap, sign and level codes of one bit each.)"""
    d = 10_000
    s = int(math.sqrt(d))
    op = qfl.parse(f"qsgd({s})")
    laplace = torch.distributions.Laplace(0.0, 1.0)
    for draw in (lambda g: torch.randn(d, generator=g), lambda g: laplace.sample((d,))):
        torch.manual_seed(0)
        sizes = [
            8 * len(encode(op.compress(draw(torch.Generator().manual_seed(i)), torch.Generator().manual_seed(i))))
            for i in range(30)
        ]
        assert sum(sizes) / len(sizes) <= 2.8 * d + 32


def test_qsgd_picks_the_smaller_of_elias_and_fixed_width():
    x = torch.randn(10_000)
    dense = encode(qfl.parse("qsgd(200, bucket=16)").compress(x))  # many large levels: fixed width wins
    sparse = encode(qfl.parse("qsgd(2)").compress(x))  # mostly zeros: Elias wins
    width = (2 * 200).bit_length()
    assert len(dense) <= 10_000 * width / 8 + 4 * 625 + 40
    assert len(sparse) < 10_000 * 3 / 8


# -------------------------------------------------------------- hostile input
def valid_blobs():
    torch.manual_seed(0)
    out = []
    for spec in SPECS:
        x = torch.randn(300)
        out.append((spec, encode(qfl.parse(spec).compress(x))))
    out.append(("int", encode(qfl.parse("identity").compress(torch.arange(40)))))
    return out


@pytest.mark.parametrize("spec,blob", valid_blobs())
def test_every_truncation_raises_wire_format_error(spec, blob):
    for cut in range(len(blob)):
        with pytest.raises(WireFormatError):
            decode(blob[:cut])


@pytest.mark.parametrize("spec,blob", valid_blobs())
def test_random_byte_flips_raise_wire_format_error(spec, blob):
    rnd = random.Random(spec)
    for _ in range(200):
        b = bytearray(blob)
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(len(b))
            b[i] ^= rnd.randint(1, 255)
        with pytest.raises(WireFormatError):
            decode(bytes(b))


@pytest.mark.parametrize("spec,blob", valid_blobs())
def test_parser_behind_the_checksum_only_raises_wire_format_error(spec, blob):
    """Flip and cut content under a recomputed checksum: the parser itself must hold."""
    rnd = random.Random("parser" + spec)
    content = content_of(blob)
    limits = Limits(max_elements=1 << 20)
    for trial in range(300):
        c = bytearray(content)
        if trial % 3 == 0:
            c = c[: rnd.randrange(len(c) + 1)]
        else:
            for _ in range(rnd.randint(1, 4)):
                if c:
                    c[rnd.randrange(len(c))] = rnd.randrange(256)
        try:
            p = decode(frame(bytes(c)), limits)
        except WireFormatError:
            continue
        # Whatever decodes is a well-formed payload that decompresses to its shape.
        y = p.decompress()
        assert tuple(y.shape) == p.shape


def test_unknown_version_bad_magic_and_checksum_messages():
    blob = bytearray(encode(qfl.parse("qsgd(4)").compress(torch.randn(10))))
    with pytest.raises(WireFormatError, match="version 9"):
        decode(bytes(blob[:2]) + b"\x09" + bytes(blob[3:]))
    with pytest.raises(WireFormatError, match="magic"):
        decode(b"XX" + bytes(blob[2:]))
    blob[-1] ^= 1
    with pytest.raises(WireFormatError, match="checksum"):
        decode(bytes(blob))
    with pytest.raises(WireFormatError, match="truncated"):
        decode(b"")


def test_oversized_declarations_are_refused_before_allocation():
    blob = encode(qfl.parse("qsgd(4)").compress(torch.randn(1000)))
    with pytest.raises(WireFormatError, match="exceeds the allowed maximum 999|max_elements=999"):
        decode(blob, Limits(max_elements=999))
    # A tiny blob that declares a 2^40-element tensor: refused by the default limit.
    content = bytearray(content_of(encode(qfl.parse("identity").compress(torch.zeros(1)))))
    # content: n_ops, op id, nfields, dtype, ndim, dim(varint 1) ...
    assert content[:5] == bytes([1, 1, 0, 1, 1])
    forged = bytes(content[:5]) + bytes([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]) + bytes(content[6:])
    with pytest.raises(WireFormatError, match="exceeds the allowed maximum|above the limit"):
        decode(frame(forged))


def test_declared_counts_must_match_the_operator():
    # A top-k blob whose kept count disagrees with ratio * n is refused.
    p = qfl.parse("topk(k=5)").compress(torch.randn(100))
    content = bytearray(content_of(encode(p)))
    forged = frame(bytes(content).replace(bytes([7, 2, 0, 1, 10]), bytes([7, 2, 0, 1, 12]), 1))
    with pytest.raises(WireFormatError):
        decode(forged)


def test_stype_names_the_version():
    assert wire.STYPE == "qfl/v3"


@pytest.mark.parametrize("n", [0, 5, SEGMENT, 5 * SEGMENT + 3])
@pytest.mark.parametrize("parallel", [False, True])
def test_checksum_is_xxh3_of_the_segment_digests(n, parallel, monkeypatch):
    import xxhash

    from qfl.wire import _buffer

    monkeypatch.setattr(_buffer, "_threads", lambda nbytes: 2 if parallel else 1)
    content = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    segments = [content[i : i + SEGMENT] for i in range(0, n, SEGMENT)]
    expected = xxhash.xxh3_64_digest(b"".join(xxhash.xxh3_64_digest(s)[::-1] for s in segments))[::-1]
    assert checksum(content) == expected
    # The encoder checksums while it writes, over the same segments.
    x = torch.from_numpy(np.frombuffer(content, np.uint8).copy())
    blob = encode(qfl.parse("identity").compress(x))
    assert blob[len(blob) - len(content_of(blob)) - 8 :][:8] == checksum(content_of(blob))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("parallel", [False, True])
def test_fill_writes_every_piece_and_checksums_what_the_blob_holds(seed, parallel, monkeypatch):
    """Pieces large and small, across segment boundaries, around bytes a coder already
    wrote: the blob holds each piece at its offset and the digest is the blob's."""
    from qfl.wire import _buffer

    monkeypatch.setattr(_buffer, "_threads", lambda nbytes: 2 if parallel else 1)
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3 * SEGMENT, 6 * SEGMENT))
    cuts = np.sort(rng.choice(np.arange(1, n), int(rng.integers(1, 9)), replace=False))
    bounds = [0, *cuts.tolist(), n]
    want = rng.integers(0, 256, n, dtype=np.uint8)
    content = np.full(n, 0xA5, np.uint8)
    pieces = []
    for lo, hi in zip(bounds, bounds[1:]):
        if rng.random() < 0.25:  # written in place by a coder before fill
            content[lo:hi] = want[lo:hi]
        else:
            pieces.append((lo, want[lo:hi].copy()))
    assert _buffer.fill(content, pieces) == checksum(want.tobytes())
    assert np.array_equal(content, want)
    big = [(o, a) for o, a in pieces if a.size >= _buffer._PIECE]
    if len(big) > 1:
        with pytest.raises(ValueError, match="offset order"):
            _buffer.fill(content, big[::-1])


def test_a_forked_child_checksums_with_threads_of_its_own(monkeypatch):
    import multiprocessing

    from qfl.wire import _buffer

    monkeypatch.setattr(_buffer, "_threads", lambda nbytes: 2)
    content = bytes(range(256)) * (5 * SEGMENT // 256)
    expected = checksum(content)  # starts this process's workers, which a fork does not copy
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(checksum, (content,)).get(timeout=120) == expected


# ------------------------------------------------------ Elias coder: every code path
def expected_block_bits(lv: np.ndarray) -> np.ndarray:
    """Per-block stream length from the definition (omega lengths checked above)."""
    out = []
    for b in range(0, lv.size, B.BLOCK):
        blk = lv[b : b + B.BLOCK].astype(np.int64)
        nz = np.flatnonzero(blk)
        gaps = np.diff(np.concatenate([[-1], nz]))
        bits = int(B.omega_lengths(gaps).sum()) + nz.size if nz.size else 0
        bits += int(B.omega_lengths(np.abs(blk[nz])).sum()) if nz.size else 0
        out.append(bits)
    return np.array(out, np.int64)


def test_elias_blocks_of_mixed_density_round_trip(kernel_mode):
    # Blocks coded apart (dense: branch-free loop; sparse: skipping loop; empty) are
    # shifted into one stream at arbitrary bit offsets; codes of every length decode
    # (one-lookup triples, 16-bit codes, longer ones).
    rng = np.random.default_rng(11)
    for _trial in range(12):
        n = int(rng.integers(1, 4 * B.BLOCK + 100))
        s = int(rng.choice([1, 3, 127, 3000, 2**20, 2**30]))
        dt = np.int8 if s <= 127 else (np.int16 if s < 2**15 else np.int32)
        lv = np.zeros(n, dt)
        for b in range(0, n, B.BLOCK):
            m = min(B.BLOCK, n - b)
            density = rng.choice([0.0, 1e-5, 1e-3, 0.05, 0.7, 1.0])
            lv[b : b + m] = np.where(rng.random(m) < density, rng.integers(-s, s + 1, m), 0)
        expected = expected_block_bits(lv)
        assert np.array_equal(B.elias_block_bits(lv), expected)
        assert B.elias_size_lower_bound(lv) <= expected.sum()
        total = int(expected.sum())
        assert B.elias_encode_if_smaller(lv, total) is None  # not strictly smaller
        bits, stream = B.elias_encode_if_smaller(lv, total + 1)
        assert np.array_equal(bits, expected) and stream.size == (total + 7) // 8
        assert np.array_equal(stream, B.elias_encode(lv, expected))
        padded = np.concatenate([stream, np.zeros(8, np.uint8)])
        out = np.full(n, 9, dt)  # the decoder must clear what it does not set
        assert B.elias_decode(padded, bits, n, s, out) == B.OK
        assert np.array_equal(out, lv)
        if total:  # a level above the declared maximum is caught, wherever it sits in a lookup
            top = int(np.abs(lv.astype(np.int64)).max())
            assert B.elias_decode(padded, bits, n, top - 1, np.zeros(n, dt)) == B.ERR_RANGE
        if total:  # a wrong declared length is caught
            short = bits.copy()
            short[np.flatnonzero(short)[0]] -= 1
            assert B.elias_decode(padded, short, n, s, np.zeros(n, dt)) != B.OK


def test_levels_coding_choice_trades_bytes_for_speed_by_fixed_shares(kernel_mode):
    # Block widths replace the fixed width only when they save more than 1/8 of its bits,
    # Elias replaces either for grid levels only when it saves more than 1/4 (for QSGD's
    # whenever it is smaller: test_qsgd_sqrt_d_levels_within_paper_bound). Dense Gaussian grid(8)
    # levels: blocks would save ~11%, so fixed width; heavy-tailed ones: Elias (~1 bit).
    torch.manual_seed(5)
    for x, expect in ((torch.randn(300_000), "fixed"), (torch.randn(300_000) ** 9, "elias")):
        p = qfl.parse("grid(8)").compress(x)
        lv = p.body.levels.numpy()
        fixed = 8 * lv.size
        widths, offsets, _ = B.bucketed_plan(lv, wire.layout.WIDTH_BLOCK)
        blocks = 8 * (1 + widths.size + int(offsets[-1]))
        elias = int(B.elias_block_bits(lv).sum())
        best = blocks if 8 * blocks < 7 * fixed else fixed
        choice = "elias" if elias < 3 * best // 4 else ("blocks" if best == blocks else "fixed")
        assert choice == expect
        blob = encode(p)
        expected = {"fixed": fixed, "elias": elias, "blocks": blocks}[choice] // 8
        assert expected < len(blob) < expected + 100 + 3 * (lv.size // B.BLOCK + 1)
        assert torch.equal(decode(blob).decompress(), p.decompress())


def test_fixed_width_levels_out_of_range_are_refused():
    # grid(8) levels travel as bytes level + 127; byte 255 (level 128) is invalid.
    p = qfl.parse("grid(8)").compress(torch.randn(1000))
    content = bytearray(content_of(encode(p)))
    packed = p.body.levels.numpy().astype(np.int64) + 127
    at = bytes(content).find(packed.astype(np.uint8).tobytes())
    assert at > 0
    content[at + 10] = 255
    with pytest.raises(WireFormatError, match="outside the declared range"):
        decode(frame(bytes(content)))
    for width_spec in ("grid(4)", "qsgd(5, norm=max)"):  # other widths: parallel/serial unpacking
        q = qfl.parse(width_spec).compress(torch.randn(300_000) * torch.rand(300_000))
        assert torch.equal(decode(encode(q)).decompress(), q.decompress())


# ------------------------------------------------------------------- the container
def container_blobs() -> dict[str, bytes | list[bytes]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=g)
    return {
        "conv.weight": encode(qfl.parse("topk(0.1) | qsgd(16)").compress(x, g)),
        "conv.bias": encode(qfl.parse("identity").compress(x[:7])),
        "fc.wéight": [encode(qfl.parse(s).compress(x, g)) for s in ("qsgd(4)", "topk(0.2)")],  # a chain
        "empty": b"",
    }


def entry(name: bytes, data: bytes) -> bytes:
    return wire.layout.varint(len(name)) + name + wire.layout.varint(len(data)) + data


def container(count: int, *entries: bytes) -> bytes:
    return wire.CONTAINER_MAGIC + bytes([1]) + wire.layout.varint(count) + b"".join(entries)


def test_container_round_trips_names_order_and_chains():
    blobs = container_blobs()
    data = wire.pack(blobs)
    views = wire.unpack(data)
    joined = {k: b"".join(v) if isinstance(v, list) else v for k, v in blobs.items()}
    assert list(views) == list(blobs) and {k: bytes(v) for k, v in views.items()} == joined
    decoded = wire.decode_container(data, Limits())
    assert [len(ps) for ps in decoded.values()] == [1, 1, 2, 0]
    assert decoded["conv.bias"][0].decompress().tolist() == decode(blobs["conv.bias"]).decompress().tolist()
    assert len(data) == container_bytes({k: len(b) for k, b in joined.items()})
    assert wire.unpack(wire.pack({})) == {} and wire.decode_container(wire.pack({}), Limits()) == {}


def test_container_names_must_be_what_the_receiver_holds():
    data = wire.pack(container_blobs())
    names = list(container_blobs())
    assert list(wire.unpack(data, names)) == names
    with pytest.raises(WireFormatError, match=r"missing \['empty'\]: the container carries 3 of the 4"):
        wire.unpack(wire.pack({k: v for k, v in container_blobs().items() if k != "empty"}), names)
    with pytest.raises(WireFormatError, match=r"unexpected \['conv.bias'\]: not one of the 2 tensors"):
        wire.unpack(data, ["conv.weight", "fc.wéight"])
    limits = {k: Limits() for k in names}
    limits["conv.weight"] = Limits(max_elements=299)  # each tensor within its own limits
    with pytest.raises(WireFormatError, match="tensor 'conv.weight': .*exceeds the allowed maximum 299"):
        wire.decode_container(data, limits)


HOSTILE_CONTAINERS = {
    "duplicate names": (container(2, entry(b"a", b""), entry(b"a", b"")), "'a' appears twice"),
    "empty name": (container(1, entry(b"", b"x")), "entry 0 of the container has 0 bytes, not 1 to 4096"),
    "invalid UTF-8": (container(1, entry(b"\xff\xfe", b"")), "not valid UTF-8"),
    "name too long": (container(1, entry(b"n" * 4097, b"")), "has 4097 bytes, not 1 to 4096"),
    "count beyond the bytes": (container(2**40, entry(b"a", b"")), "count = 1099511627776 exceeds 1, the most 3 bytes"),
    "count above the entries": (container(2, entry(b"a", b"")), "count = 2 exceeds 1, the most 3 bytes can hold"),
    "entries short of the count": (container(2, entry(b"a", b""), b"\x05bc"), "truncated container: name of entry 1"),
    "length beyond the bytes": (container(1, b"\x01a\x09xy"), "data of 'a' declares 9 bytes, 2 left"),
    "trailing bytes": (container(1, entry(b"a", b"")) + b"\0", "1 unexpected trailing bytes"),
    "long varint": (container(1) + b"\x81\x80\x00a\x00", "not in its shortest form"),
    "65-bit varint": (container(1) + b"\xff" * 10 + b"\x01", "longer than 64 bits"),
    "bad magic": (b"QF\x01\x00", "not a qfl container: magic b'QF'"),
    "bad version": (b"QC\x03\x00", "unsupported qfl container version 3"),
    "too short": (b"Q", "truncated container: magic"),
    "garbage entry": (container(1, entry(b"a", b"not a blob")), "tensor 'a': not a qfl payload"),
}


@pytest.mark.parametrize("name", list(HOSTILE_CONTAINERS))
def test_hostile_containers_raise_a_clear_wire_format_error(name):
    data, reason = HOSTILE_CONTAINERS[name]
    with pytest.raises(WireFormatError, match=reason.replace("[", r"\[")):
        wire.decode_container(data, Limits())


def test_every_truncated_container_is_refused():
    data = wire.pack(container_blobs())
    for cut in range(len(data)):
        with pytest.raises(WireFormatError):
            wire.decode_container(data[:cut], Limits())


def test_a_containers_tensors_share_max_total_elements():
    blob = encode(qfl.parse("identity").compress(torch.zeros(100)))
    data = wire.pack({f"t{i}": blob for i in range(5)})
    assert len(wire.decode_container(data, Limits(max_total_elements=500))) == 5
    with pytest.raises(WireFormatError, match="tensor 't4': .*the tensors before it took 400 of the 499 elements"):
        wire.decode_container(data, Limits(max_total_elements=499))
    # Per-tensor limits (a receiver that knows the shapes) bound each tensor alone.
    assert len(wire.decode_container(data, {f"t{i}": Limits(max_total_elements=100) for i in range(5)})) == 5


def lossless_payloads() -> dict:
    """A model's message as the client's mod builds it: small lossless tensors of two dtypes,
    a scalar, a counter, one too large to group, a lone float64 one and a compressed one."""
    g = torch.Generator().manual_seed(5)
    ident = qfl.parse("identity")
    return {
        "conv.weight": qfl.parse("topk(0.1) | qsgd(16)").compress(torch.randn(400, generator=g), g),
        "bn.weight": ident.compress(torch.randn(16, generator=g)),
        "bn.bias": ident.compress(torch.randn(16, generator=g)),
        "bn.num_batches_tracked": ident.compress(torch.tensor(7)),
        "scale": ident.compress(torch.tensor(0.5)),
        "half.a": ident.compress(torch.randn(3, 2, generator=g).to(torch.bfloat16)),
        "big": ident.compress(torch.randn(wire.container.GROUP_MAX_ELEMENTS + 1, generator=g)),
        "half.b": ident.compress(torch.randn(5, generator=g).to(torch.bfloat16)),
        "double": ident.compress(torch.randn(4, generator=g, dtype=torch.float64)),
        "fc.bias": ident.compress(torch.randn(10, generator=g)),
    }


def test_small_lossless_tensors_share_one_blob_and_decode_as_sent():
    payloads = lossless_payloads()
    grouped = wire.group_payloads(payloads)
    groups = {id(v): v for v in grouped.values() if isinstance(v, wire.Group)}
    # Per dtype, in order: float32 (bn.weight, bn.bias, scale, fc.bias) and bfloat16 (half.a, half.b);
    # the counter, the lone float64, the large one and the compressed one travel alone.
    assert sorted([m for m, _ in g.members] for g in groups.values()) == [
        ["bn.weight", "bn.bias", "scale", "fc.bias"],
        ["half.a", "half.b"],
    ]
    data = wire.pack({k: v if isinstance(v, wire.Group) else encode(v) for k, v in grouped.items()})
    assert data[2] == 2  # a version 2 container: older readers refuse it by its version
    alone = wire.pack({k: encode(v) for k, v in payloads.items()})
    assert alone[2] == 1 and len(data) < len(alone)
    decoded = wire.decode_container(data, {k: Limits(max_elements=p.numel) for k, p in payloads.items()})
    # A group comes where its first member came, its members together.
    assert list(decoded) == [
        "conv.weight", "bn.weight", "bn.bias", "scale", "fc.bias", "bn.num_batches_tracked",
        "half.a", "half.b", "big", "double",
    ]  # fmt: skip
    for k, p in payloads.items():
        (q,) = decoded[k]
        assert (q.op, q.shape, q.dtype) == (p.op, p.shape, p.dtype)
        assert torch.equal(q.decompress(), p.decompress()), k
    # What pack writes is what unpack reads, group included.
    assert wire.pack({k: v if isinstance(v, wire.Group) else bytes(v) for k, v in wire.unpack(data).items()}) == data
    # The records layer groups what it is given and sums the same.
    from qfl.clients.records import decode_record, encode_record

    record = encode_record(payloads)
    assert bytes(record["qfl"].data) == data
    assert list(decode_record(record)) == list(decoded)


def test_one_tensor_of_its_dtype_travels_alone_and_the_container_stays_version_1():
    payloads = {k: p for k, p in lossless_payloads().items() if k in ("conv.weight", "bn.weight", "half.a", "double")}
    grouped = wire.group_payloads(payloads)
    assert grouped == payloads
    assert wire.pack({k: encode(p) for k, p in grouped.items()})[2] == 1


def group(members: list[tuple[bytes, tuple[int, ...]]], data: bytes, count: int | None = None) -> bytes:
    v = wire.layout.varint
    body = b"".join(v(len(n)) + n + v(len(shape)) + b"".join(v(d) for d in shape) for n, shape in members)
    return b"\0" + v(len(members) if count is None else count) + body + v(len(data)) + data


def container2(count: int, *entries: bytes) -> bytes:
    return wire.CONTAINER_MAGIC + bytes([2]) + wire.layout.varint(count) + b"".join(entries)


_IDENT = qfl.parse("identity")
_TEN = encode(_IDENT.compress(torch.arange(10.0)))
HOSTILE_GROUPS = {
    "no members": (container2(1, group([], _TEN)), "group 0 declares 0 members"),
    "members beyond the bytes": (
        container2(1, group([(b"a", (10,))], _TEN, count=2**30)),
        "declares 1073741824 members",
    ),
    "a member twice": (container2(1, group([(b"a", (5,)), (b"a", (5,))], _TEN)), "'a' appears twice"),
    "a member also a tensor": (
        container2(2, entry(b"a", _TEN), group([(b"a", (5,)), (b"b", (5,))], _TEN)),
        "'a' appears twice",
    ),
    "shapes short of the blob": (
        container2(1, group([(b"a", (4,)), (b"b", (5,))], _TEN)),
        "the group of 'a' and 1 more: dimension = 10 exceeds the allowed maximum 9",
    ),
    "shapes beyond the blob": (
        container2(1, group([(b"a", (6,)), (b"b", (5,))], _TEN)),
        r"must carry one identity payload of shape \(11,\), found \[\('identity', \(10,\)\)\]",
    ),
    "a compressed blob": (
        container2(1, group([(b"a", (5,)), (b"b", (5,))], encode(qfl.parse("qsgd(4)").compress(torch.arange(10.0))))),
        "must carry one identity payload",
    ),
    "two blobs": (container2(1, group([(b"a", (10,)), (b"b", (10,))], _TEN + _TEN)), "must carry one identity payload"),
    "a 2-D blob": (
        container2(1, group([(b"a", (5,)), (b"b", (5,))], encode(_IDENT.compress(torch.zeros(2, 5))))),
        "ndim 2 exceeds the limit 1",
    ),
    "ndim beyond the bytes": (container2(1, b"\0\x01\x01a\x7f"), "truncated container: 'a' declares 127 dimensions"),
    "a member beyond max_elements": (
        container2(1, group([(b"a", (2**40,)), (b"b", (5,))], _TEN)),
        r"'a': declared shape \(1099511627776,\) has 1099511627776 elements, above the limit",
    ),
    "a member beyond max_ndim": (container2(1, group([(b"a", (1,) * 33), (b"b", (9,))], _TEN)), "ndim 33 exceeds"),
    "version 2 without a group": (container2(1, entry(b"a", _TEN)), "a version 2 container without a group"),
    "a group in version 1": (container(1, group([(b"a", (5,)), (b"b", (5,))], _TEN)), "has 0 bytes, not 1 to 4096"),
}


@pytest.mark.parametrize("name", list(HOSTILE_GROUPS))
def test_hostile_groups_raise_a_clear_wire_format_error(name):
    data, reason = HOSTILE_GROUPS[name]
    with pytest.raises(WireFormatError, match=reason):
        wire.decode_container(data, Limits())


def test_a_group_stays_within_its_members_limits_and_the_shared_budget():
    data = container2(1, group([(b"a", (4,)), (b"b", (6,))], _TEN))
    ok = wire.decode_container(data, {"a": Limits(max_elements=4), "b": Limits(max_elements=6)})
    assert [p[0].decompress().tolist() for p in ok.values()] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    with pytest.raises(
        WireFormatError, match=r"tensor 'b': declared shape \(6,\) has 6 elements, above the limit max_elements=5"
    ):
        wire.decode_container(data, {"a": Limits(max_elements=4), "b": Limits(max_elements=5)})
    with pytest.raises(WireFormatError, match=r"unexpected \['b'\]"):
        wire.decode_container(data, {"a": Limits()})
    with pytest.raises(WireFormatError, match="declares 10 elements, above what is left \\(9\\)"):
        wire.decode_container(data, Limits(max_total_elements=9))
    # Every prefix of a grouped container is refused.
    full = wire.pack(
        {k: v if isinstance(v, wire.Group) else encode(v) for k, v in wire.group_payloads(lossless_payloads()).items()}
    )
    for cut in range(len(full)):
        with pytest.raises(WireFormatError):
            wire.decode_container(full[:cut], Limits())


def test_pack_refuses_a_group_its_members_do_not_map_to():
    grouped = wire.group_payloads(lossless_payloads())
    g = grouped["bn.weight"]
    with pytest.raises(ValueError, match="must each map to the group, once"):
        wire.pack({"bn.weight": g, "bn.bias": g})  # scale and fc.bias missing


def test_pack_refuses_names_it_cannot_write():
    for bad in ("", "n" * 4097):
        with pytest.raises(ValueError, match="1 to 4096 bytes"):
            wire.pack({bad: b""})


# ---------------------------------------------------- levels at a fixed width per bucket
def test_bucketed_levels_round_trip_at_the_defined_size(kernel_mode):
    # Buckets of every width (zero buckets take no bytes), sizes that do and do not fill
    # whole 8-level groups, a short last bucket, every level dtype.
    rng = np.random.default_rng(7)
    for s, dt in ((127, np.int8), (255, np.int16), (3000, np.int16), (2**30, np.int32)):
        for bucket in (1, 7, 8, 100, 512):
            n = int(rng.integers(1, 40 * bucket))
            tops = rng.choice([0, 1, 2, 5, 40, s], size=(n + bucket - 1) // bucket)
            lv = (rng.integers(-(2**31), 2**31, n) % (np.repeat(tops, bucket)[:n] + 1)).astype(dt)
            lv *= rng.choice([-1, 1], n).astype(dt)
            widths, offsets, elias_bound = B.bucketed_plan(lv, bucket)
            exact = int(B.elias_block_bits(lv).sum())
            assert elias_bound <= exact
            per_bucket = [lv[i : i + bucket] for i in range(0, n, bucket)]
            expected_w = [int(np.abs(b.astype(np.int64)).max()).bit_length() for b in per_bucket]
            assert widths.tolist() == expected_w
            expected_bytes = [(b.size * (w + 1) + 7) // 8 if w else 0 for b, w in zip(per_bucket, expected_w)]
            assert np.array_equal(np.diff(offsets), expected_bytes)
            assert np.array_equal(B.bucketed_offsets(widths, n, bucket), offsets)
            data = B.bucketed_encode(lv, bucket, widths, offsets)
            out = np.full(n, 9, dt)  # the decoder must write every element
            assert B.bucketed_decode(data, bucket, widths, offsets, s, out) == B.OK
            assert np.array_equal(out, lv)
            top = int(np.abs(lv.astype(np.int64)).max())
            if top:  # a magnitude above the declared maximum is caught
                assert B.bucketed_decode(data, bucket, widths, offsets, top - 1, out) == B.ERR_RANGE


@pytest.mark.parametrize(
    "spec",
    [
        "grid(8)",
        "grid(3)",
        "qsgd(levels=255, bucket=512)",
        "qsgd(levels=16)",
        "topk(0.05) | qsgd(levels=7, bucket=64)",
        "identity",
        "fp16",
        "bernoulli(0.2)",
    ],
)
def test_the_encoder_writes_every_byte_of_the_blob(spec, kernel_mode, monkeypatch):
    # Coded sections are written by their coder straight into the blob's uninitialised
    # memory: the same blob whatever that memory held before. Sizes beyond a huge page
    # and beyond Blob's in-place threshold, with a last partial group.
    from qfl.wire import _buffer, format

    x = torch.randn(3 * 1024 * 1024 + 13, generator=torch.Generator().manual_seed(3)) * torch.rand(3 * 1024 * 1024 + 13)
    payload = qfl.parse(spec).compress(x, torch.Generator().manual_seed(4))
    blobs = []
    for junk in (0x00, 0xA5, 0xFF):

        class Dirty(_buffer.Blob):
            def __init__(self, n: int, junk: int = junk) -> None:
                super().__init__(n)
                self.view[:] = junk

        monkeypatch.setattr(format, "Blob", Dirty)
        blobs.append(encode(payload))
    assert blobs[0] == blobs[1] == blobs[2]
    assert torch.equal(decode(blobs[0]).decompress(), payload.decompress())


def test_bucketed_plan_and_gaps_bound_elias_from_below():
    # Dense levels: a gap (>= 1 bit), a sign and omega(|level|) per nonzero, counted up to
    # |level| 16, where the first five steps of the omega length are; the level after the
    # one zero has a gap of 2 (omega: 3 bits, 2 more).
    lv = np.arange(-40000, 40001, dtype=np.int32)
    nonzero = np.abs(lv[lv != 0].astype(np.int64))
    bound = B.bucketed_plan(lv, 1000)[2]
    assert bound == int((2 + B.omega_lengths(np.minimum(nonzero, 16))).sum())
    assert B.elias_gap_bits(lv) == 2
    # Sparse levels: gaps of 5 cost omega(5) = 6 bits, 5 more than the plan counts (the
    # look-back starts afresh in each Elias block, where it loses a little).
    lv = np.zeros(300_000, np.int8)
    lv[3::5] = 1
    bound = B.bucketed_plan(lv, 64)[2] + B.elias_gap_bits(lv)
    assert 7.99 * lv.sum() <= bound <= int(B.elias_block_bits(lv).sum())


def test_bucketed_levels_refuse_negative_zero_and_wide_buckets():
    lv = np.zeros(64, np.int16)
    lv[1] = 9  # bucket 0: width 4, its first level is 0
    widths, offsets, _ = B.bucketed_plan(lv, 32)
    data = B.bucketed_encode(lv, 32, widths, offsets)
    data[0] |= 0x80  # the sign bit of a zero level: -0 has no valid code
    assert B.bucketed_decode(data, 32, widths, offsets, 255, np.empty(64, np.int16)) == B.ERR_RANGE
    p = qfl.parse("qsgd(255, bucket=512)").compress(torch.randn(4096))
    content = bytearray(content_of(encode(p)))
    scales = p.body.scales.numpy().tobytes()
    mode_at = bytes(content).find(scales) + len(scales)  # the levels coding follows the scales
    assert content[mode_at] == 2  # LEVELS_BUCKETED
    assert content[mode_at + 1] == wire.layout.WIDTH_BLOCK  # block size, a one-byte varint
    widths_at = mode_at + 2
    content[widths_at] = 9  # levels up to 255 have at most 8 bits
    with pytest.raises(WireFormatError, match="block width"):
        decode(frame(bytes(content)))
    content[widths_at - 1] = 0  # a block of no levels
    with pytest.raises(WireFormatError, match="width block"):
        decode(frame(bytes(content)))


def _bucket_reference(data: bytes, size: int, w: int, max_level: int) -> tuple[list[int], bool]:
    """One block's levels and validity, read bit by bit: ``w + 1`` bits per level, sign first."""
    bits = "".join(f"{b:08b}" for b in data)
    levels, ok = [], True
    for i in range(size):
        code = bits[i * (w + 1) : (i + 1) * (w + 1)]
        neg, a = code[0] == "1", int(code[1:], 2)
        ok &= a <= max_level and not (neg and a == 0)
        levels.append(-a if neg else a)
    return levels, ok


def test_bucketed_decoder_agrees_with_a_bitwise_reader_on_any_bytes(kernel_mode):
    # Random bytes as the codes of blocks of every width, with maxima at, below and above
    # what a width can hold: the decoder's levels and its verdict (a negative zero or a
    # magnitude beyond the maximum anywhere is an error) are the bitwise reader's. Blocks
    # of 8-level groups and a partial group; invalid codes in every lane.
    rng = np.random.default_rng(11)
    for w in range(1, 12):
        for max_level in sorted({1, (1 << w) - 1, max(1, (1 << w) - 2), (1 << w) // 2 + 1, 300, 2**20}):
            for size in (8, 24, 64, 61):
                for trial in range(12):
                    nbytes = (size * (w + 1) + 7) // 8
                    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
                    if trial % 3 == 0:  # mostly valid: small magnitudes, then one bad lane or none
                        lv = rng.integers(-min(max_level, (1 << w) - 1), min(max_level, (1 << w) - 1) + 1, size)
                        lv[0] = min(max_level, (1 << w) - 1)  # the block's width stays w
                        widths = np.array([w], np.uint8)
                        offsets = np.array([0, nbytes], np.int64)
                        raw = B.bucketed_encode(lv.astype(np.int32), size, widths, offsets)
                        if trial % 2:
                            lane = int(rng.integers(size))
                            bits = [int(c) for c in "".join(f"{b:08b}" for b in raw)]
                            bits[lane * (w + 1) : (lane + 1) * (w + 1)] = [1] + [0] * w  # a negative zero
                            raw = np.packbits(np.array(bits, np.uint8))
                    expected, ok = _bucket_reference(raw.tobytes(), size, w, max_level)
                    out = np.full(size, 7, np.int32)
                    status = B.bucketed_decode(
                        raw, size, np.array([w], np.uint8), np.array([0, nbytes], np.int64), max_level, out
                    )
                    assert status == (B.OK if ok else B.ERR_RANGE), (w, max_level, size, raw.tobytes())
                    if ok:
                        assert out.tolist() == expected


def test_bucketed_qsgd_takes_fewer_bits_than_the_fixed_width():
    # qsgd(255, bucket=512) on Gaussian data: |levels| ~ 11 |x| / sigma, so a bucket needs
    # 6-7 magnitude bits where the format-wide fixed width spends 9.
    torch.manual_seed(2)
    x = torch.randn(100_000)
    p = qfl.parse("qsgd(255, bucket=512)").compress(x)
    blob = encode(p)
    assert 8 * len(blob) < 7.5 * x.numel()
    assert torch.equal(decode(blob).decompress(), p.decompress())


def test_one_limits_bound_what_the_whole_container_declares():
    """A zero-initialised bias quantizes to a few bytes: at first contact it is read within
    the message's budget (64 declared elements per byte of the container), which still
    refuses a small message declaring a large tensor."""
    g = torch.Generator().manual_seed(5)
    op = qfl.parse("grid(8)")
    model = {"w": torch.randn(100_000, generator=g), "in_proj_bias": torch.zeros(5000)}
    data = wire.pack({k: encode(op.compress(v, g)) for k, v in model.items()})
    assert len(encode(op.compress(model["in_proj_bias"]))) * 64 < 5000  # alone it would exceed 64 per byte
    decoded = wire.decode_container(data, Limits(max_expansion=64))
    assert {k: ps[0].numel for k, ps in decoded.items()} == {"w": 100_000, "in_proj_bias": 5000}
    small = wire.pack({"in_proj_bias": encode(op.compress(torch.zeros(50_000)))})
    with pytest.raises(WireFormatError, match=r"tensor 'in_proj_bias': .* a \d+-byte container may declare"):
        wire.decode_container(small, Limits(max_expansion=64))


def test_operator_headers_seen_before_decode_to_the_same_operators_and_the_cache_stays_bounded():
    # Headers are looked up by their bytes once parsed; a header differing in any
    # parameter is parsed anew, and no stream of distinct headers grows the cache past
    # its bound.
    from qfl.wire import format as F

    F._OPS_SEEN.clear()
    F._OP_LENGTHS.clear()
    x = torch.randn(300, generator=torch.Generator().manual_seed(3))
    for spec in ["qsgd(4)", "qsgd(4, norm=max, bucket=7)", "topk(0.1) | grid(4)", "randk(0.2) | sign", "fp16"]:
        op = qfl.parse(spec)
        blob = encode(op.compress(x, torch.Generator().manual_seed(0)))
        first, again = decode(blob), decode(blob)
        assert first.op == again.op == op
        assert torch.equal(first.decompress(), again.decompress())
    assert F._OPS_SEEN
    # Content cut anywhere, its headers cached at every length: refused, never a payload.
    content = content_of(encode(qfl.parse("topk(0.1) | qsgd(4, norm=max, bucket=7)").compress(x)))
    for cut in range(len(content)):
        with pytest.raises(WireFormatError):
            decode(frame(content[:cut]))
    for levels in range(1, 2 * F._OPS_SEEN_MAX):
        op = qfl.parse(f"qsgd({levels}, bucket=64)")
        assert decode(encode(op.compress(x, torch.Generator().manual_seed(levels)))).op == op
        assert len(F._OPS_SEEN) <= F._OPS_SEEN_MAX
