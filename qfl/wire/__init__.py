"""Payloads to bytes and back: real bit-level coding with a validated, versioned header.

``encode(payload) -> bytes`` and ``decode(bytes) -> payload``. Levels are bit-packed at
one width, at a width per block, or Elias-omega coded (QSGD's coding of gaps and
levels), a slower coding only when it saves a set share of the bytes (see
``format._Encoder.levels``); sparse
positions are Rice-coded gaps or a bitmap, whichever is smaller; rand-k sends only its
seed. Decoding raises :class:`WireFormatError` for anything that is not a valid blob,
after checking sizes against :class:`Limits` and before allocating.

What belongs here: turning a :class:`qfl.compress.Payload` into bytes and back, and
nothing that knows about Flower records, strategies or training. A new operator's coding
goes here together with its bound in ``tests/expected.py``; ``fuzz`` drives the decoder.
"""

import numpy as np

from ._bits import BLOCK as ELIAS_BLOCK
from ._bits import bucketed_decode, bucketed_encode, bucketed_plan, elias_gap_bits, omega_lengths
from .format import decode, decode_all, encode
from .layout import DEFAULT_LIMITS, MAGIC, VERSION, Limits, WireFormatError


def warm_other_kernels() -> None:
    """Call the coder kernels that encoding and decoding payloads never reach (the omega
    length table the tests check), so that ``python -m qfl warm`` caches them too."""
    omega_lengths(np.arange(1, 10))


def warm_level_coders() -> None:
    """Code levels per bucket in every level dtype, in the variant (serial or parallel)
    the caller forces: which coding an operator's payload gets depends on its data, so
    the operators alone may not reach these."""
    for dtype, top in ((np.int8, 127), (np.int16, 300), (np.int32, 70000)):
        levels = (np.arange(3000) % (2 * top + 1) - top).astype(dtype)
        widths, offsets, _ = bucketed_plan(levels, 100)
        data = bucketed_encode(levels, 100, widths, offsets)
        bucketed_decode(data, 100, widths, offsets, top, np.empty_like(levels))
        elias_gap_bits(levels)


#: ``Array.stype`` of a Flower Array whose ``data`` is one or more qfl blobs.
STYPE = f"qfl/v{VERSION}"

__all__ = [
    "DEFAULT_LIMITS",
    "ELIAS_BLOCK",
    "MAGIC",
    "STYPE",
    "VERSION",
    "Limits",
    "WireFormatError",
    "decode",
    "decode_all",
    "encode",
    "warm_level_coders",
    "warm_other_kernels",
]
