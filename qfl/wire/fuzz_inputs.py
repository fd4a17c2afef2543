"""What the wire fuzzer feeds the decoder: framed content, seeds, hostile blobs, mutants.

The inputs and their layout (the mode byte, see "Input layout" in :mod:`qfl.wire.fuzz`)
live here; the contract they are checked against, the memory and time watchdogs and the
drivers are in :mod:`qfl.wire.fuzz`. Tests build inputs from these pieces directly.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

import torch

from .container import Group, group_payloads, pack
from .format import encode, unframe
from .layout import DIGEST_BYTES, MAGIC, VERSION, Limits, checksum, varint

#: Limits the fuzzer decodes with: small enough that an input declaring the maximum
#: costs milliseconds, large enough to cover several Elias blocks (65,536 elements each).
FUZZ_LIMITS = Limits(max_elements=1 << 18, max_ndim=8, max_total_elements=1 << 20)

#: Specs at the edges of their parameter ranges (widest levels, one-value buckets, the
#: coarsest grid, a sign after a dense top-k, k-of-n rand-k): in :data:`SPECS`, and left out
#: of the wire tests' ordinary round trips (``tests/test_wire.py``).
EDGE_SPECS = frozenset(
    {"qsgd(1073741824)", "qsgd(2, bucket=1)", "grid(2)", "topk(0.9) | sign", "randk(k=5) | qsgd(7, bucket=3)"}
)
#: One spec of every operator and chain shape, and the edge ones.
SPECS = (
    "identity",
    "fp16",
    "bf16",
    "qsgd(16)",
    "qsgd(3, norm=max, bucket=32)",
    "qsgd(255, bucket=64)",  # levels at a width per bucket
    "qsgd(5000)",
    "qsgd(1073741824)",
    "qsgd(2, bucket=1)",
    "grid(8)",
    "grid(3, bucket=7)",
    "grid(16)",
    "grid(2)",
    "sign",
    "topk(0.1)",
    "topk(k=3)",
    "randk(0.1)",
    "randk(0.2, unbiased=true)",
    "bernoulli(0.1)",
    "bernoulli(budget=0.1)",
    "signtopk(0.1)",
    "topk(0.1) | qsgd(4, damped=true)",
    "bernoulli(budget=0.05) | grid(4)",
    "randk(0.3) | fp16",
    "topk(0.2) | bf16",
    "topk(0.9) | sign",
    "randk(k=5) | qsgd(7, bucket=3)",
)


# ----------------------------------------------------------------------- framing
def frame(content: bytes) -> bytes:
    """A blob with a valid header, length and checksum around arbitrary content."""
    return MAGIC + bytes([VERSION]) + varint(len(content) + DIGEST_BYTES) + checksum(content) + content


def content_of(blob: bytes) -> bytes:
    """The content of one well-formed blob (inverse of :func:`frame`)."""
    return bytes(unframe(memoryview(blob))[0])


def to_blob(data: bytes) -> bytes:
    """The bytes an input stands for (see "Input layout" in the module docstring)."""
    if not data:
        return b""
    return frame(data[1:]) if data[0] % 2 == 0 else data[1:]


def as_content_input(content: bytes) -> bytes:
    return b"\x00" + content


def as_raw_input(blob: bytes) -> bytes:
    return b"\x01" + blob


# ------------------------------------------------------------------------ corpus
def seed_corpus(seed: int = 0) -> list[bytes]:
    """Valid blobs of every operator, dtype and a few shapes, as fuzz inputs."""
    import qfl  # the operators (qfl.parse); imported late: qfl imports this package

    g = torch.Generator().manual_seed(seed)
    out: list[bytes] = []
    shapes = [(), (0,), (1,), (7,), (300,), (3, 5, 4), (70_000,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    for i, spec in enumerate(SPECS):
        op = qfl.parse(spec)
        for j, shape in enumerate(shapes):
            if shape == (70_000,) and i % 3:
                continue  # a few multi-block Elias streams are enough
            dtype = dtypes[(i + j) % len(dtypes)]
            x = torch.randn(shape, generator=g).to(dtype)
            if j % 2:
                x = x * (torch.rand(shape, generator=g) < 0.1)  # sparse levels: Elias coding
            blob = encode(op.compress(x, g))
            out.append(as_content_input(content_of(blob)))
    for x in (
        torch.arange(40),
        torch.tensor([True, False, True]),
        torch.randint(-9, 9, (6,), dtype=torch.int8),
        torch.tensor(7, dtype=torch.int16),
        torch.arange(5, dtype=torch.int32),
        torch.arange(3, dtype=torch.uint8),
    ):
        out.append(as_content_input(content_of(encode(qfl.parse("identity").compress(x)))))
    # Raw inputs: concatenations (catch-up chains) and a corrupted checksum.
    x = torch.randn(100, generator=g)
    chain = b"".join(encode(qfl.parse(s).compress(x, g)) for s in ("qsgd(4)", "topk(0.1)", "identity"))
    out.append(as_raw_input(chain))
    out.append(as_raw_input(b""))
    bad = bytearray(encode(qfl.parse("grid(4)").compress(x, g)))
    bad[-1] ^= 1
    out.append(as_raw_input(bytes(bad)))
    # Containers: a message's tensors by name, one of them a chain, and an empty one.
    small = {f"layer{i}.weight": encode(qfl.parse(s).compress(x[: 10 * (i + 1)], g)) for i, s in enumerate(SPECS[:4])}
    out.append(as_raw_input(pack({**small, "chain": [chain[: len(chain) // 3], chain[len(chain) // 3 :]]})))
    out.append(as_raw_input(pack({"ünïcode.näme": encode(qfl.parse("topk(0.1)").compress(x, g))})))
    out.append(as_raw_input(pack({})))
    # A group: small lossless tensors of one dtype in one blob, beside a compressed one.
    lossless = {
        f"bn{i}.{k}": qfl.parse("identity").compress(x[i : i + 3 + i].reshape(-1, 1)) for i in range(3) for k in "wb"
    }
    grouped = group_payloads({**lossless, "conv": qfl.parse("topk(0.1)").compress(x, g)})
    out.append(as_raw_input(pack({k: v if isinstance(v, Group) else encode(v) for k, v in grouped.items()})))
    return out


def hostile_inputs(limits: Limits = FUZZ_LIMITS) -> dict[str, bytes]:
    """Hand-made blobs that declare the most work for the fewest bytes.

    Each declares ``limits.max_elements`` (or more) elements with a near-empty body:
    all-zero Elias level streams, rand-k over the maximum, inflated dimension varints,
    Elias block lengths or Rice stream lengths far beyond the bytes present, and
    chains of maximal zero blobs. Used to measure the decoder's memory (see the tests).
    """
    import qfl

    n = limits.max_elements
    out: dict[str, bytes] = {}

    def blob_of(spec: str, x: torch.Tensor) -> bytes:
        return encode(qfl.parse(spec).compress(x, torch.Generator().manual_seed(0)))

    zeros = torch.zeros(n)
    out["qsgd-zeros-at-limit"] = blob_of("qsgd(1073741824)", zeros)  # int32 levels, Elias coded
    out["grid-zeros-at-limit"] = blob_of("grid(16, bucket=1)", zeros)  # one scale per element
    out["randk-at-limit"] = blob_of("randk(1.0)", zeros)
    out["topk-at-limit"] = blob_of("topk(1.0)", zeros)
    out["sign-at-limit"] = blob_of("sign", zeros)
    out["bernoulli-empty-at-limit"] = blob_of("bernoulli(0.5) | qsgd(1073741824)", torch.zeros(n))
    out["float64-identity-at-limit"] = blob_of("identity", torch.zeros(n // 8, dtype=torch.float64))
    # A dimension varint far beyond the limit, and ten dimensions whose product is.
    head = bytes([1, 1, 0, 1])  # one op: identity, no fields; dtype float32
    out["dimension-2^62"] = frame(head + bytes([1]) + varint(1 << 62) + bytes([1]))
    out["product-overflow"] = frame(head + bytes([8]) + varint(n) * 8 + bytes([1]))
    # QSGD header, then Elias block lengths claiming every remaining bit, many times over.
    op = bytes([4, 4, 1]) + varint((1 << 30) << 1) + bytes([5]) + varint(2) + b"l2" + bytes([0, 3])
    nblk = -(-n // (1 << 16))
    pad = bytes(1 << 16)
    remaining = 8 * (4 * nblk + len(pad))
    elias = (
        bytes([1])
        + op
        + bytes([1, 1])
        + varint(n)
        + struct.pack("<f", 1.0)
        + bytes([1])
        + b"".join(varint4(remaining) for _ in range(nblk))
        + pad
    )
    out["elias-block-lengths-overflow"] = frame(elias)
    # Top-k with a Rice stream length far beyond the blob.
    topk = bytes([1, 7, 2, 0, 1]) + varint(1 << 1) + bytes([1, 1]) + varint(n) + varint(1)  # topk(k=1), kept 1
    out["rice-length-overflow"] = frame(topk + bytes([1, 0]) + varint(1 << 40) + bytes(64))
    # A chain of maximal zero blobs: the per-array budget (max_total_elements) stops it.
    zero_blob = blob_of("qsgd(4)", zeros)
    out["chain-of-maximal-blobs"] = zero_blob * (limits.max_total_elements // n + 2)
    # Maximal zero blobs, each with bytes enough for its own max_expansion, as the tensors
    # of one container: together they exceed max_total_elements, which they share.
    scaled = blob_of("qsgd(4, bucket=2048)", zeros)
    out["container-of-maximal-blobs"] = pack({f"t{i}": scaled for i in range(limits.max_total_elements // n + 2)})
    return out


def varint4(v: int) -> bytes:
    """``v`` as a varint padded to exactly 4 bytes (v < 2**28)."""
    assert v < 1 << 28
    return bytes([(v & 0x7F) | 0x80, ((v >> 7) & 0x7F) | 0x80, ((v >> 14) & 0x7F) | 0x80, (v >> 21) & 0x7F])


# ----------------------------------------------------------------------- mutation
_INTERESTING = (
    0x00,
    0x01,
    0x02,
    0x03,
    0x07,
    0x08,
    0x0F,
    0x10,
    0x1F,
    0x20,
    0x3F,
    0x40,
    0x7E,
    0x7F,
    0x80,
    0x81,
    0xFE,
    0xFF,
)


def mutate(data: bytes, rnd: random.Random, corpus: Sequence[bytes]) -> bytes:
    """One to four structure-aware mutations of an input (mode byte kept mostly)."""
    b = bytearray(data or b"\x00")
    for _ in range(rnd.randint(1, 4)):
        body = len(b) - 1
        choice = rnd.randrange(12)
        if choice == 0 and body:  # flip a bit
            i = 1 + rnd.randrange(body)
            b[i] ^= 1 << rnd.randrange(8)
        elif choice == 1 and body:  # an interesting byte
            b[1 + rnd.randrange(body)] = rnd.choice(_INTERESTING)
        elif choice == 2 and body:  # a random byte
            b[1 + rnd.randrange(body)] = rnd.randrange(256)
        elif choice == 3 and body:  # truncate
            del b[1 + rnd.randrange(body) :]
        elif choice == 4 and body:  # delete a run
            i = 1 + rnd.randrange(body)
            del b[i : i + rnd.randint(1, 8)]
        elif choice == 5:  # insert bytes
            i = 1 + rnd.randrange(body + 1)
            b[i:i] = bytes(rnd.choice(_INTERESTING) for _ in range(rnd.randint(1, 8)))
        elif choice == 6 and body:  # a varint field replaced by a big value
            i = 1 + rnd.randrange(body)
            j = i
            while j < len(b) and b[j] & 0x80 and j - i < 10:
                j += 1
            b[i : j + 1] = varint(
                rnd.choice(
                    [
                        0,
                        1,
                        2,
                        63,
                        64,
                        127,
                        128,
                        255,
                        256,
                        65535,
                        65536,
                        1 << 20,
                        1 << 28,
                        (1 << 31) - 1,
                        1 << 32,
                        (1 << 63) - 1,
                        1 << 63,
                        (1 << 64) - 1,
                        1 << 70,
                    ]
                )
            )
        elif choice == 7 and body:  # add or subtract a little from a byte
            i = 1 + rnd.randrange(body)
            b[i] = (b[i] + rnd.choice([-2, -1, 1, 2])) % 256
        elif choice == 8 and corpus:  # splice with another input
            other = rnd.choice(corpus)
            i = 1 + rnd.randrange(body + 1)
            j = 1 + rnd.randrange(max(len(other) - 1, 1))
            b[i:] = other[j:]
        elif choice == 9 and body:  # duplicate a chunk
            i = 1 + rnd.randrange(body)
            chunk = b[i : i + rnd.randint(1, 32)]
            b[i:i] = chunk
        elif choice == 10:  # switch between content and raw mode (raw mode: reframe the content)
            if b[0] % 2 == 0:
                b = bytearray(as_raw_input(frame(bytes(b[1:]))))
            else:
                b[0] = 0
        elif choice == 11 and body >= 4:  # overwrite a little-endian u32 / f32 with an edge value
            i = 1 + rnd.randrange(body - 3)
            b[i : i + 4] = struct.pack(
                "<I",
                rnd.choice([0, 1, 0x7F800000, 0x7FC00000, 0xFF800000, 0x80000000, 0xFFFFFFFF, 0x00000001, 0x7F7FFFFF]),
            )
    return bytes(b)
