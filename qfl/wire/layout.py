"""What the bytes of wire format version 3 mean: ids, codes, tags, and what a decoder accepts.

The numbering here is the format: a blob written by one build is read by another only if
these tables agree, so they change only by adding entries (and a new version for
anything else). The encoder and decoder that use them are in :mod:`qfl.wire.format`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress import BF16, FP16, QSGD, Bernoulli, Grid, Identity, Operator, RandK, Sign, TopK
from ._buffer import SEGMENT as SEGMENT  # the checksum's segment length: part of the format
from ._buffer import digest

MAGIC = b"QF"
#: 2: XXH3-64 checksum (was CRC-32); levels may be coded at a width per block.
#: 3: the checksum is XXH3-64 of the XXH3-64 digests of the content's 1 MiB segments
#: (was XXH3-64 of the content), so that two threads can write and check a large blob.
VERSION = 3
#: Bytes of the checksum that precedes each blob's content.
DIGEST_BYTES = 8


def checksum(content) -> bytes:
    """The checksum a blob carries before its content (little-endian): XXH3-64 over the
    little-endian XXH3-64 digests of the content's ``SEGMENT``-byte segments, the last
    one shorter (an empty content has none). Every check of a blob goes through here."""
    return digest(content)


#: Operator ids of format version 1. Never renumber: add new ids instead.
OP_IDS: dict[type[Operator], int] = {
    Identity: 1,
    FP16: 2,
    BF16: 3,
    QSGD: 4,
    Grid: 5,
    Sign: 6,
    TopK: 7,
    RandK: 8,
    Bernoulli: 9,
}
OPS_BY_ID = {v: k for k, v in OP_IDS.items()}

#: dtype codes of format version 1.
DTYPES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.int16: 7,
    torch.int32: 8,
    torch.int64: 9,
    torch.bool: 10,
}
DTYPES_BY_CODE = {v: k for k, v in DTYPES.items()}
# numpy twins used to move raw bytes (bfloat16 travels as its 16 raw bits).
NUMPY_DTYPES = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.bfloat16: "<u2",
    torch.float64: "<f8",
    torch.uint8: "u1",
    torch.int8: "i1",
    torch.int16: "<i2",
    torch.int32: "<i4",
    torch.int64: "<i8",
    torch.bool: "u1",
}
BITS_VIEW = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}

#: Level codings; LEVELS_BUCKETED (a width per block of levels) is new in version 2.
LEVELS_FIXED, LEVELS_ELIAS, LEVELS_BUCKETED = 0, 1, 2
#: Levels per width of LEVELS_BUCKETED as the encoder writes it (the blob states its own):
#: on a real update's grid(8) levels, blocks of 64/512/4096 took 3.47/3.71/3.99 bits per
#: level, on qsgd(255, bucket=512)'s 6.38/6.91/7.01, one width byte per block included.
WIDTH_BLOCK = 64
INDEX_BITMAP, INDEX_RICE = 0, 1
TAG_NONE, TAG_INT, TAG_FLOAT, TAG_FALSE, TAG_TRUE, TAG_STR = range(6)


class WireFormatError(ValueError):
    """A blob is not a valid qfl payload: truncated, corrupted, oversized or unknown."""


@dataclass(frozen=True)
class Limits:
    """What a decoder is willing to allocate for one blob.

    max_elements
        Largest declared tensor (element count) accepted; 2^28 = 268M elements by
        default (1 GiB of float32). Lower it on servers facing untrusted clients.
    max_ndim
        Largest number of dimensions accepted.
    max_total_elements
        Largest sum of declared element counts over the blobs of one ``decode_all``
        call (a chain of steps in one Array): without it, many tiny blobs that each
        declare ``max_elements`` zeros could make the decoder allocate without bound.
        2^32 by default (17 steps of a 250M-element tensor).
    max_expansion
        Largest number of declared elements per byte received, over one ``decode`` or
        ``decode_all`` call (None: no bound). Without it a 1 KB sparse blob declaring
        64M elements costs 256 MB once decompressed. 4096 by default: top-k keeping one
        element in 1000 stays far below it; a receiver that knows the shapes to expect
        bounds them with ``max_elements`` instead and may lift it.
    """

    max_elements: int = 1 << 28
    max_ndim: int = 32
    max_total_elements: int = 1 << 32
    max_expansion: int | None = 4096

    def __post_init__(self) -> None:
        for name in ("max_elements", "max_ndim", "max_total_elements", "max_expansion"):
            v = getattr(self, name)
            if v is None and name == "max_expansion":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Limits.{name} must be a non-negative integer, got {v!r}")

    def budget(self, nbytes: int) -> int:
        """Elements a call decoding ``nbytes`` may declare in all."""
        if self.max_expansion is None:
            return self.max_total_elements
        return min(self.max_total_elements, self.max_expansion * nbytes)


DEFAULT_LIMITS = Limits()


# =========================================================================== varints
def varint(v: int) -> bytes:
    """Unsigned LEB128: how the format writes lengths, counts and dimensions."""
    out = bytearray()
    while True:
        byte = v & 0x7F
        v >>= 7
        if v:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
