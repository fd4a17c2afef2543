"""Payloads to bytes and back: real bit-level coding with a validated, versioned header.

``encode(payload) -> bytes`` and ``decode(bytes) -> payload``; ``pack`` and
``decode_container`` put all of a message's blobs, by tensor name, into the one container
it carries (one Flower Array). Levels are bit-packed or Elias-omega coded (QSGD's coding
of gaps and levels), whichever is smaller; sparse positions are Rice-coded gaps or a
bitmap, whichever is smaller; rand-k sends only its seed. Decoding raises
:class:`WireFormatError` for anything that is not a valid blob or container, after
checking sizes against :class:`Limits` and before allocating.

What belongs here: turning a :class:`qfl.compress.Payload` into bytes and back, and
nothing that knows about Flower records, strategies or training. A new operator's coding
goes here together with its bound in ``tests/expected.py``; ``fuzz`` drives the decoder.
"""

import numpy as np

from ._bits import BLOCK as ELIAS_BLOCK
from ._bits import omega_lengths
from .container import CONTAINER_MAGIC, decode_container, pack, unpack
from .format import decode, decode_all, encode
from .layout import DEFAULT_LIMITS, MAGIC, VERSION, Limits, WireFormatError


def warm_other_kernels() -> None:
    """Call the coder kernels that encoding and decoding payloads never reach (the omega
    length table the tests check), so that ``python -m qfl warm`` caches them too."""
    omega_lengths(np.arange(1, 10))


#: ``Array.stype`` of the Flower Array whose ``data`` is a qfl container (:mod:`.container`).
STYPE = f"qfl/v{VERSION}"

__all__ = [
    "CONTAINER_MAGIC",
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
    "encode",
    "pack",
    "unpack",
    "warm_other_kernels",
]
