"""Payload <-> bytes: the qfl wire format, version 3.

Layout of one blob (all integers little-endian, varints unsigned LEB128)::

    b"QF" | version u8 | length varint | checksum u64 | content (length - 8 bytes)

    content = op-count u8 | ops | dtype u8 | ndim u8 | dims varint* | body
    op      = op-id u8 | field-count u8 | fields (tagged: none/int/float/bool/str)
    body    = the payload's parts, laid out by the operators (see ``_Encoder``)

The length prefix makes blobs self-delimiting, so several can travel in one Flower
``Array`` (a downlink catching a client up over several versions). The checksum turns a
flipped bit anywhere into a clean error instead of a silently wrong model. It is
built on XXH3-64 (xxhash), not zlib's CRC-32 (version 1): CRC-32 read ~1.2 GB/s here and
cost more than all the coding of an 8-bit payload (33 ms per 40 MB per side), XXH3 reads
~15 GB/s, and its 64-bit digest misses a random corruption with odds 2^-64, not 2^-32.
Since version 3 it is XXH3-64 over the digests of 1 MiB segments
(:func:`qfl.wire.layout.checksum`), which two threads compute in half the time. The
decoder checks every declared count against the bytes actually present and against
``Limits`` before it allocates, so a hostile or broken blob costs at most what its
declared (and allowed) shape costs.

The numbering (operator ids, dtype codes, tags), :class:`Limits` and
:class:`WireFormatError` are in :mod:`qfl.wire.layout`; this module is the encoder, the
decoder and the framing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import warnings
from collections.abc import Callable

import numpy as np
import torch

from ..compress import (
    BF16,
    FP16,
    QSGD,
    Chain,
    Grid,
    Identity,
    Levels,
    Operator,
    Part,
    Payload,
    RandK,
    Raw,
    Sign,
    Signs,
    Sparse,
    Sparsifier,
    runtime,
)
from ..compress.quantizers import level_dtype
from . import _bits as B
from ._buffer import Blob, fill
from .layout import (
    BITS_VIEW,
    DEFAULT_LIMITS,
    DIGEST_BYTES,
    DTYPES,
    DTYPES_BY_CODE,
    INDEX_BITMAP,
    INDEX_RICE,
    LEVELS_BUCKETED,
    LEVELS_ELIAS,
    LEVELS_FIXED,
    MAGIC,
    NUMPY_DTYPES,
    OP_IDS,
    OPS_BY_ID,
    TAG_FALSE,
    TAG_FLOAT,
    TAG_INT,
    TAG_NONE,
    TAG_STR,
    TAG_TRUE,
    VERSION,
    WIDTH_BLOCK,
    Limits,
    WireFormatError,
    checksum,
    varint,
)


# =========================================================================== encoding
def _op_bytes(op: Operator) -> bytes:
    fields = dataclasses.fields(op)
    out = bytearray([OP_IDS[type(op)], len(fields)])
    for f in fields:
        v = getattr(op, f.name)
        if v is None:
            out.append(TAG_NONE)
        elif isinstance(v, bool):
            out.append(TAG_TRUE if v else TAG_FALSE)
        elif isinstance(v, int):
            out.append(TAG_INT)
            out += varint((v << 1) ^ (v >> 63) if v < 0 else v << 1)
        elif isinstance(v, float):
            out.append(TAG_FLOAT)
            out += struct.pack("<d", v)
        elif isinstance(v, str):
            raw = v.encode()
            out.append(TAG_STR)
            out += varint(len(raw)) + raw
        else:  # pragma: no cover - operators only have these field types
            raise TypeError(f"cannot encode parameter {f.name}={v!r} of {op}")
    return bytes(out)


def _ops_of(op: Operator) -> tuple[Sparsifier | None, Operator | None]:
    if isinstance(op, Chain):
        return op.sparsifier, op.value
    if isinstance(op, Sparsifier):
        return op, None
    return None, op


def _np_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype in BITS_VIEW:
        t = t.view(BITS_VIEW[t.dtype])
    return t.numpy()


@dataclasses.dataclass(frozen=True)
class _Coded:
    """A section that a coder writes straight into the blob, every one of its ``size``
    bytes: the coded levels are the bulk of a blob, and a buffer of their own would cost
    a fresh allocation (page faults) and a copy into the blob."""

    size: int
    write: Callable[[np.ndarray], object]


class _Encoder:
    """Collects body sections; each method mirrors a ``_Decoder`` method."""

    def __init__(self) -> None:
        self.parts: list[bytes | np.ndarray | _Coded] = []

    def put(self, b: bytes | np.ndarray | _Coded) -> None:
        self.parts.append(b)

    def raw(self, part: Part, m: int) -> None:
        assert isinstance(part, Raw) and part.values.numel() == m
        self.put(bytes([DTYPES[part.values.dtype]]))
        self.put(_np_bytes(part.values))

    def levels(self, part: Part, max_level: int, exact: bool) -> None:
        assert isinstance(part, Levels)
        self.put(part.scales.contiguous().numpy().astype("<f4", copy=False))
        lv = part.levels.contiguous().numpy()
        width = int(2 * max_level).bit_length()
        # Three codings, each slower to code than the one before: fixed width, a width
        # per block of WIDTH_BLOCK levels, Elias. Each is taken only when it saves more
        # than a set share of the bytes of the one it replaces (1/8, then 1/4), so that a
        # few percent of bytes never cost a several-times slower coder (Elias codes ~3 ns
        # per level, the block coder under 1 ns) -- except that ``exact`` (QSGD) takes
        # Elias whenever it is smaller: QSGD's bound on bits sent (Alistarh et al., Thm.
        # 3.4) is a bound on its Elias code. One pass sizes the block coding and bounds
        # Elias from below; Elias is coded only when that bound leaves it a chance.
        bits = lv.size * width
        per_block, elias = None, None
        if lv.size:
            blk = min(WIDTH_BLOCK, lv.size)
            widths, offsets, elias_bound = B.bucketed_plan(lv, blk)
            block_bits = 8 * (len(varint(blk)) + widths.size + int(offsets[-1]))
            if 8 * block_bits < 7 * bits:
                bits, per_block = block_bits, (blk, widths, offsets)
            limit = bits if exact else 3 * bits // 4
            # A second pass bounds what the gaps cost: at most 5 bits per nonzero level,
            # which the first bound counts at >= 3, so it can only rule Elias out when
            # 8/3 of the first bound reaches the limit.
            if 3 * limit <= 8 * elias_bound < 8 * limit:
                elias_bound += B.elias_gap_bits(lv)
            if elias_bound < limit:
                elias = B.elias_encode_if_smaller(lv, limit)
        if elias is not None:
            block_bits, stream = elias
            self.put(bytes([LEVELS_ELIAS]))
            self.put(b"".join(varint(int(b)) for b in block_bits))
            self.put(stream)
        elif per_block is not None:
            blk, widths, offsets = per_block
            self.put(bytes([LEVELS_BUCKETED]) + varint(blk))
            self.put(widths)
            self.put(_Coded(int(offsets[-1]), lambda out: B.bucketed_encode(lv, blk, widths, offsets, out)))
        else:
            self.put(bytes([LEVELS_FIXED]))
            self.put(_Coded((lv.size * width + 7) // 8, lambda out: B.pack_fixed(lv, max_level, width, out)))

    def signs(self, part: Part) -> None:
        assert isinstance(part, Signs)
        self.put(struct.pack("<f", part.scale))
        self.put(np.packbits(part.negative.numpy().astype(np.uint8)))

    def positions(self, idx: np.ndarray, n: int) -> None:
        k = idx.size
        best_r, best_bits = 0, B.rice_bits(idx, 0) if k else 0
        if k:
            mean_gap = max((n - k) / k, 1.0)
            r0 = max(0, int(math.log2(mean_gap * math.log(2))))
            for r in range(max(0, r0 - 1), min(r0 + 3, 48)):
                bits = B.rice_bits(idx, r)
                if bits < best_bits:
                    best_r, best_bits = r, bits
        if n <= best_bits:
            bitmap = np.zeros(n, np.uint8)
            bitmap[idx] = 1
            self.put(bytes([INDEX_BITMAP]))
            self.put(np.packbits(bitmap))
        else:
            self.put(bytes([INDEX_RICE, best_r]) + varint(best_bits))
            self.put(B.rice_encode(idx, best_r, best_bits))


def _value_body(enc: _Encoder, op: Operator | None, part: Part, m: int) -> None:
    if isinstance(op, (QSGD, Grid)):
        enc.levels(part, op.levels if isinstance(op, QSGD) else op.max_level, isinstance(op, QSGD))
    elif isinstance(op, Sign):
        enc.signs(part)
    else:  # identity, casts, or raw values after a sparsifier
        enc.raw(part, m)


def encode(payload: Payload) -> bytes:
    """Serialise a payload to bytes (one self-delimiting blob)."""
    op = payload.op
    sparsifier, value = _ops_of(op)
    ops = [o for o in (sparsifier, value) if o is not None]
    n = payload.numel
    head = bytearray([len(ops)])
    for o in ops:
        head += _op_bytes(o)
    if payload.dtype not in DTYPES:
        raise TypeError(f"dtype {payload.dtype} has no wire code")
    head += bytes([DTYPES[payload.dtype], len(payload.shape)])
    for d in payload.shape:
        head += varint(d)
    enc = _Encoder()
    enc.put(bytes(head))
    body = payload.body
    if sparsifier is not None:
        assert isinstance(body, Sparse)
        k = body.count
        enc.put(varint(k))
        if isinstance(sparsifier, RandK):
            enc.put(struct.pack("<Q", body.seed))
        else:
            enc.positions(body.indices.contiguous().numpy(), n)
        _value_body(enc, value, body.values, k)
    else:
        _value_body(enc, value, body, n)
    return _frame(enc.parts)


def _frame(parts: list[bytes | np.ndarray | _Coded]) -> bytes:
    """The blob of a content given in parts: each part is written once, straight into the
    ``bytes`` that ships (coded sections by their coder, first), and checksummed (right
    after it is copied, for the others; see :mod:`._buffer`)."""
    arrays = [
        p
        if isinstance(p, _Coded)
        else p.reshape(-1).view(np.uint8)
        if isinstance(p, np.ndarray)
        else np.frombuffer(p, np.uint8)
        for p in parts
    ]
    length = DIGEST_BYTES + sum(a.size for a in arrays)
    head = MAGIC + bytes([VERSION]) + varint(length)
    blob = Blob(len(head) + length)
    out = blob.view
    out[: len(head)] = np.frombuffer(head, np.uint8)
    content = out[len(head) + DIGEST_BYTES :]
    pieces, pos = [], 0
    for a in arrays:
        if isinstance(a, _Coded):
            a.write(content[pos : pos + a.size])
        else:
            pieces.append((pos, a))
        pos += a.size
    digest = fill(content, pieces)
    out[len(head) : len(head) + DIGEST_BYTES] = np.frombuffer(digest, np.uint8)
    return blob.finish()


# =========================================================================== decoding
#: Operator headers parsed before, by their bytes. A header is self-delimiting and its
#: operator depends on its bytes alone, so bytes equal to a parsed header parse to the
#: same (immutable) operator. Every tensor of every reply repeats the same few headers;
#: parsing one costs ~7 us of Python (a third of decoding a small tensor), a lookup
#: ~1 us. Emptied when full, so hostile peers' headers cannot grow it.
_OPS_SEEN: dict[bytes, Operator] = {}
#: The header lengths seen per operator id (the lookup's candidate keys).
_OP_LENGTHS: dict[int, frozenset[int]] = {}
_OPS_SEEN_MAX = 256


class _Decoder:
    """Bounds-checked cursor over one blob's content; every failure is a WireFormatError."""

    def __init__(self, data: memoryview, limits: Limits) -> None:
        self.data = data
        self.pos = 0
        self.limits = limits

    def fail(self, what: str) -> WireFormatError:
        return WireFormatError(f"{what} (at content byte {self.pos} of {len(self.data)})")

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        pos = self.pos  # indexed, not sliced: headers are read a byte at a time
        if pos >= len(self.data):
            self.take(1, what)  # raises the truncation error
        self.pos = pos + 1
        return self.data[pos]

    def varint(self, what: str, maximum: int) -> int:
        v, shift = 0, 0
        while True:
            byte = self.u8(what)
            v |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise self.fail(f"{what}: varint longer than 64 bits")
        if v > maximum:
            raise self.fail(f"{what} = {v} exceeds the allowed maximum {maximum}")
        return v

    def array(self, count: int, dtype: str, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(count * itemsize, what), dtype=dtype).copy()

    def values(self, count: int, dtype: str, what: str) -> np.ndarray:
        """Values in place when the blob is immutable (``bytes``: nobody can change them
        under the receiver, and a copy would be a pass over them), else a copy."""
        if not self.data.readonly:
            return self.array(count, dtype, what)
        return np.frombuffer(self.take(count * np.dtype(dtype).itemsize, what), dtype=dtype)

    def padded(self, nbytes: int, what: str) -> np.ndarray:
        """A stream copied into a buffer with 8 zero bytes of slack for 64-bit reads."""
        data = self.take(nbytes, what)  # before allocating: the bytes must be there
        buf = np.empty(nbytes + 8, np.uint8)
        buf[:nbytes] = np.frombuffer(data, np.uint8)
        buf[nbytes:] = 0
        return buf

    # ---------------------------------------------------------------- sections
    def op(self) -> Operator:
        """The operator whose header starts here: from :data:`_OPS_SEEN` when these bytes
        were parsed before, else parsed (and remembered)."""
        start = self.pos
        data = self.data
        for length in _OP_LENGTHS.get(data[start] if start < len(data) else -1, ()):
            op = _OPS_SEEN.get(bytes(data[start : start + length])) if start + length <= len(data) else None
            if op is not None:
                self.pos = start + length
                return op
        op = self._parse_op()
        if len(_OPS_SEEN) >= _OPS_SEEN_MAX:  # bounded whatever peers send
            _OPS_SEEN.clear()
            _OP_LENGTHS.clear()
        _OPS_SEEN[bytes(data[start : self.pos])] = op
        # Replaced, not updated in place: another thread may be iterating the old set.
        _OP_LENGTHS[data[start]] = _OP_LENGTHS.get(data[start], frozenset()) | {self.pos - start}
        return op

    def _parse_op(self) -> Operator:
        op_id = self.u8("operator id")
        cls = OPS_BY_ID.get(op_id)
        if cls is None:
            raise self.fail(f"unknown operator id {op_id}")
        fields = dataclasses.fields(cls)
        count = self.u8("field count")
        if count != len(fields):
            raise self.fail(f"{cls.name} has {len(fields)} parameters, blob declares {count}")
        config = {}
        for f in fields:
            tag = self.u8(f"tag of {cls.name}.{f.name}")
            if tag == TAG_NONE:
                v = None
            elif tag == TAG_INT:
                z = self.varint(f"{cls.name}.{f.name}", 2**64 - 1)
                v = (z >> 1) ^ -(z & 1)
            elif tag == TAG_FLOAT:
                v = struct.unpack("<d", self.take(8, f"{cls.name}.{f.name}"))[0]
            elif tag in (TAG_FALSE, TAG_TRUE):
                v = tag == TAG_TRUE
            elif tag == TAG_STR:
                raw = bytes(self.take(self.varint(f"length of {cls.name}.{f.name}", 64), f.name))
                try:
                    v = raw.decode()
                except UnicodeDecodeError:
                    raise self.fail(f"{cls.name}.{f.name} is not valid UTF-8") from None
            else:
                raise self.fail(f"unknown parameter tag {tag} for {cls.name}.{f.name}")
            config[f.name] = v
        try:
            return cls(**config)
        except (ValueError, TypeError) as exc:
            raise self.fail(f"invalid parameters for {cls.name}: {exc}") from None

    def raw(self, m: int, in_place: bool) -> Raw:
        code = self.u8("raw dtype")
        dtype = DTYPES_BY_CODE.get(code)
        if dtype is None:
            raise self.fail(f"unknown raw dtype code {code}")
        what = "raw values"
        arr = self.values(m, NUMPY_DTYPES[dtype], what) if in_place else self.array(m, NUMPY_DTYPES[dtype], what)
        if dtype == torch.bool and arr.size and arr.max() > 1:
            raise self.fail("boolean values must be bytes 0 or 1")
        t = _tensor(arr)
        if dtype in BITS_VIEW:
            t = t.view(dtype)
        return Raw(t)

    def levels(self, m: int, bucket: int | None, max_level: int) -> Levels:
        b = min(bucket or m, m) or 1
        nb = (m + b - 1) // b
        scales = self.array(nb, "<f4", "bucket scales")
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise self.fail("bucket scales must be finite and non-negative")
        mode = self.u8("levels coding")
        if mode == LEVELS_FIXED:
            width = int(2 * max_level).bit_length()
            nbytes = (m * width + 7) // 8
            if width == 8:  # byte per level: read in place, no slack needed
                buf = np.frombuffer(self.take(nbytes, "fixed-width levels"), np.uint8)
            else:
                buf = self.padded(nbytes, "fixed-width levels")
            out = runtime.empty(m, level_dtype(max_level))  # both decoders write every element
            status = B.unpack_fixed(buf, m, max_level, width, max_level, out)
        elif mode == LEVELS_ELIAS:
            nblk = (m + B.BLOCK - 1) // B.BLOCK
            remaining_bits = 8 * (len(self.data) - self.pos)
            block_bits = np.array([self.varint("block length", remaining_bits) for _ in range(nblk)], np.int64)
            total = int(block_bits.sum())
            if total > 8 * (len(self.data) - self.pos):
                raise self.fail(
                    f"truncated: Elias block lengths add up to {total} bits, {8 * (len(self.data) - self.pos)} left"
                )
            buf = self.padded((total + 7) // 8, "Elias level stream")
            out = runtime.empty(m, level_dtype(max_level))
            status = B.elias_decode(buf, block_bits, m, max_level, out) if m else B.OK
        elif mode == LEVELS_BUCKETED:
            blk = self.varint("width block", max(m, 1))
            if blk < 1:
                raise self.fail("width block must be at least 1 level")
            widths = np.frombuffer(self.take((m + blk - 1) // blk, "block widths"), np.uint8)
            if widths.size and int(widths.max()) > int(max_level).bit_length():
                raise self.fail(f"a block width of {int(widths.max())} bits exceeds the levels' {max_level}")
            offsets = B.bucketed_offsets(widths, m, blk)
            data = np.frombuffer(self.take(int(offsets[-1]), "block-coded levels"), np.uint8)
            out = runtime.empty(m, level_dtype(max_level))  # the decoder writes every element
            status = B.bucketed_decode(data, blk, widths, offsets, max_level, out)
        else:
            raise self.fail(f"unknown levels coding {mode}")
        self.check(status, "levels")
        return Levels(torch.from_numpy(scales), torch.from_numpy(out))

    def signs(self, m: int) -> Signs:
        (scale,) = struct.unpack("<f", self.take(4, "sign scale"))
        if not math.isfinite(scale) or scale < 0:
            raise self.fail("sign scale must be finite and non-negative")
        packed = np.frombuffer(self.take((m + 7) // 8, "sign bits"), np.uint8)
        neg = np.unpackbits(packed, count=m).astype(bool)
        return Signs(scale, torch.from_numpy(neg))

    def positions(self, k: int, n: int) -> torch.Tensor:
        mode = self.u8("index coding")
        if mode == INDEX_BITMAP:
            packed = np.frombuffer(self.take((n + 7) // 8, "index bitmap"), np.uint8)
            idx = np.flatnonzero(np.unpackbits(packed, count=n))
            if idx.size != k:
                raise self.fail(f"index bitmap marks {idx.size} positions, header says {k}")
            return torch.from_numpy(idx.astype(np.int64))
        if mode == INDEX_RICE:
            r = self.u8("rice parameter")
            if r > 47:
                raise self.fail(f"rice parameter {r} out of range")
            nbits = self.varint("index stream length", 8 * (len(self.data) - self.pos))
            if k * (r + 1) > nbits:  # a Rice code takes at least r + 1 bits: check before allocating
                raise self.fail(f"truncated: {k} positions cannot fit in {nbits} bits with rice parameter {r}")
            buf = self.padded((nbits + 7) // 8, "index stream")
            out = np.empty(k, np.int64)
            self.check(B.rice_decode(buf, nbits, r, k, n, out), "indices")
            return torch.from_numpy(out)
        raise self.fail(f"unknown index coding {mode}")

    def check(self, status: int, what: str) -> None:
        messages = {
            B.ERR_OVERRUN: "a code runs past the end of its stream",
            B.ERR_CODE: "an invalid (over-long) code",
            B.ERR_RANGE: "a position or value outside the declared range",
            B.ERR_TRAILING: "a stream does not end where its declared length says",
        }
        if status != B.OK:
            raise self.fail(f"corrupt {what}: {messages.get(status, status)}")


_read_only_seen = False  # torch has warned about a read-only array (under our filter) already


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, also of a read-only view of a blob (torch has no read-only
    tensors and warns about it once per process, unless ``torch.set_warn_always``; the
    values are documented as read-only instead). The warning is silenced the first time
    only: entering ``catch_warnings`` costs more than the rest of a small blob's values."""
    global _read_only_seen
    if arr.flags.writeable or (_read_only_seen and not torch.is_warn_always_enabled()):
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    _read_only_seen = True
    return t


def _value_part(dec: _Decoder, op: Operator | None, m: int, dense: bool = False) -> Part:
    """The values of a blob; raw ones in place only for a dense body (the values kept by
    a sparsifier are few, and a view of them would hold the whole message in memory)."""
    if isinstance(op, QSGD):
        return dec.levels(m, op.bucket, op.levels)
    if isinstance(op, Grid):
        return dec.levels(m, op.bucket, op.max_level)
    if isinstance(op, Sign):
        return dec.signs(m)
    part = dec.raw(m, dense)
    if isinstance(op, FP16) and part.values.dtype != torch.float16:
        raise dec.fail(f"fp16 payload carries {part.values.dtype} values")
    if isinstance(op, BF16) and part.values.dtype != torch.bfloat16:
        raise dec.fail(f"bf16 payload carries {part.values.dtype} values")
    return part


@functools.lru_cache(maxsize=_OPS_SEEN_MAX)
def _composed(ops: Operator | tuple[Operator, Operator]) -> tuple[Operator, Sparsifier | None, Operator | None]:
    """(the operator a blob header's one or two operators form, its sparsifier, its value
    operator); ValueError for a list that forms none. Cached: the headers of a model's
    blobs name the same few operators every message (bounded like :data:`_OPS_SEEN`)."""
    if isinstance(ops, tuple):
        op = Chain.of(ops)
        if not isinstance(op, Chain):
            raise ValueError("a two-operator header must form a chain")
    else:
        op = Chain.of([ops])
    return (op, *_ops_of(op))


def _content(data: memoryview, limits: Limits, allowed: int | None = None) -> Payload:
    """Parse one blob's content; ``allowed`` caps its element count (what is left of
    the ``max_total_elements`` budget of a ``decode_all`` call)."""
    dec = _Decoder(data, limits)
    nops = dec.u8("operator count")
    if nops not in (1, 2):
        raise dec.fail(f"operator count must be 1 or 2, got {nops}")
    try:
        op, sparsifier, value = _composed(dec.op() if nops == 1 else (dec.op(), dec.op()))
    except ValueError as exc:
        if isinstance(exc, WireFormatError):
            raise
        raise dec.fail(str(exc)) from None
    code = dec.u8("dtype")
    dtype = DTYPES_BY_CODE.get(code)
    if dtype is None:
        raise dec.fail(f"unknown dtype code {code}")
    ndim = dec.u8("ndim")
    if ndim > limits.max_ndim:
        raise dec.fail(f"ndim {ndim} exceeds the limit {limits.max_ndim}")
    shape = tuple(dec.varint("dimension", limits.max_elements) for _ in range(ndim))
    n = math.prod(shape)
    if n > limits.max_elements:
        raise dec.fail(f"declared shape {shape} has {n} elements, above the limit max_elements={limits.max_elements}")
    if allowed is not None and n > allowed:
        raise dec.fail(
            f"declared shape {shape} has {n} elements, above what is left ({allowed}) of the limits "
            f"max_total_elements={limits.max_total_elements} and max_expansion={limits.max_expansion} "
            "elements per byte for all blobs of one array"
        )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and not isinstance(op, Identity):
        raise dec.fail(f"{op} cannot apply to dtype {dtype}")
    if sparsifier is not None:
        k = dec.varint("kept count", n)
        expected = sparsifier.expected_count(n)
        if expected is not None and k != expected:
            raise dec.fail(f"{sparsifier} keeps {expected} of {n} elements, blob declares {k}")
        if isinstance(sparsifier, RandK):
            (seed,) = struct.unpack("<Q", dec.take(8, "rand-k seed"))
            body: Part = Sparse(None, seed, _value_part(dec, value, k))
        else:
            idx = dec.positions(k, n)
            body = Sparse(idx, None, _value_part(dec, value, k))
    else:
        body = _value_part(dec, value, n, dense=True)
        if isinstance(op, Identity) and body.values.dtype != dtype:
            raise dec.fail(f"identity payload of {dtype} carries {body.values.dtype} values")
    if dec.pos != len(data):
        raise dec.fail(f"{len(data) - dec.pos} unexpected trailing bytes")
    return Payload(op, shape, dtype, body)


def unframe(view: memoryview, start: int = 0) -> tuple[memoryview, int]:
    """(content of the blob starting at ``start``, offset just past it)."""
    if len(view) - start < 3:
        raise WireFormatError(f"truncated: {len(view) - start} bytes cannot hold a qfl header")
    if bytes(view[start : start + 2]) != MAGIC:
        raise WireFormatError(f"not a qfl payload: magic {bytes(view[start : start + 2])!r}, expected {MAGIC!r}")
    if view[start + 2] != VERSION:
        raise WireFormatError(f"unsupported qfl wire format version {view[start + 2]} (this build reads {VERSION})")
    pos, length, shift = start + 3, 0, 0
    while True:
        if pos >= len(view):
            raise WireFormatError("truncated: blob length field")
        byte = view[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 63:
            raise WireFormatError("corrupt blob length field")
    if length < DIGEST_BYTES or pos + length > len(view):
        raise WireFormatError(f"truncated: blob declares {length} bytes, {len(view) - pos} present")
    content = view[pos + DIGEST_BYTES : pos + length]
    if checksum(content) != bytes(view[pos : pos + DIGEST_BYTES]):
        raise WireFormatError("checksum mismatch: the blob was corrupted in transit or storage")
    return content, pos + length


def decode_all(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> list[Payload]:
    """Decode a concatenation of blobs (possibly empty) into payloads, in order (raw
    values as in :func:`decode`)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    out, pos, budget = [], 0, limits.budget(len(view))
    while pos < len(view):
        content, pos = unframe(view, pos)
        out.append(_content(content, limits, budget))
        budget -= out[-1].numel
    return out


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Payload:
    """Decode exactly one blob; WireFormatError on anything else.

    A dense body of raw values (identity, casts) decoded from an immutable blob
    (``bytes``) is a read-only view into it, not a copy; from a mutable buffer it is a
    copy, since its owner may change the buffer later.
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    content, end = unframe(view, 0)
    if end != len(view):
        raise WireFormatError(f"{len(view) - end} trailing bytes after the blob")
    return _content(content, limits, limits.budget(len(view)))
