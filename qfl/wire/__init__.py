"""Payloads to bytes and back: real bit-level coding with a validated, versioned header.

``encode(payload) -> bytes`` and ``decode(bytes) -> payload``; ``pack`` and
``decode_container`` put all of a message's blobs, by tensor name, into the one container
it carries (one Flower Array). Levels are bit-packed at one width, at a width per block,
or Elias-omega coded (QSGD's coding of gaps and levels), a slower coding only when it
saves a set share of the bytes (see ``format._Encoder.levels``); sparse positions are
Rice-coded gaps or a bitmap, whichever is smaller; rand-k sends only its seed. Decoding
raises :class:`WireFormatError` for anything that is not a valid blob or container, after
checking sizes against :class:`Limits` and before allocating.

What belongs here: turning a :class:`qfl.compress.Payload` into bytes and back, and
nothing that knows about Flower records, strategies or training. A new operator's coding
goes here together with its bound in ``tests/expected.py``; ``fuzz`` drives the decoder.
"""

import numpy as np
import torch

from ..compress import QSGD, Grid, Levels, Payload
from ..compress.quantizers import level_dtype
from ._bits import BLOCK as ELIAS_BLOCK
from ._bits import omega_lengths
from ._buffer import Blob
from .container import CONTAINER_MAGIC, Group, decode_container, decoded, group_payloads, pack, unpack
from .format import decode, decode_all, encode
from .layout import DEFAULT_LIMITS, MAGIC, VERSION, Limits, WireFormatError


def warm_other_kernels() -> None:
    """Call the coder kernels that encoding and decoding payloads never reach (the omega
    length table the tests check), so that ``python -m qfl warm`` caches them too."""
    omega_lengths(np.arange(1, 10))


def warm_level_coders() -> None:
    """Every level coding (fixed width, widths per block, Elias, and the gap pass that
    chooses between them) for every level dtype, through ``encode`` and ``decode``, in
    the variant (serial or parallel) the caller forces: which coding a payload gets
    depends on its data, so the operators' own payloads may not reach them all. Going
    through the wire brings the argument types messages bring (read-only views of the
    blob among them)."""
    n = 3000
    i = np.arange(n)
    for op, top in ((Grid(8), 127), (QSGD(300), 300), (QSGD(70000), 70000)):
        patterns = (
            i % (2 * top + 1) - top,  # dense and as wide as allowed: fixed width
            i % 3 + 1,  # narrow: a width per block
            np.where(i % 3 == 2, 1, 0),  # a nonzero in three: the gap pass decides
            np.where(i % 50 == 0, 1, 0),  # sparse: Elias
        )
        for lv in patterns:
            levels = torch.from_numpy(lv.astype(level_dtype(top)))
            payload = Payload(op, (n,), torch.float32, Levels(torch.ones(1), levels))
            decode(encode(payload)).decompress()


#: ``Array.stype`` of the Flower Array whose ``data`` is a qfl container (:mod:`.container`).
STYPE = f"qfl/v{VERSION}"

__all__ = [
    "CONTAINER_MAGIC",
    "Blob",
    "DEFAULT_LIMITS",
    "ELIAS_BLOCK",
    "MAGIC",
    "STYPE",
    "VERSION",
    "Limits",
    "WireFormatError",
    "decode",
    "decode_all",
    "decode_container",
    "decoded",
    "Group",
    "group_payloads",
    "encode",
    "pack",
    "unpack",
    "warm_level_coders",
    "warm_other_kernels",
]
