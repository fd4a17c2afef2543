"""Payloads to bytes and back: real bit-level coding with a validated, versioned header.

``encode(payload) -> bytes`` and ``decode(bytes) -> payload``. Levels are bit-packed
or Elias-omega coded (QSGD's coding of gaps and levels), whichever is smaller; sparse
positions are Rice-coded gaps or a bitmap, whichever is smaller; rand-k sends only its
seed. Decoding raises :class:`WireFormatError` for anything that is not a valid blob,
after checking sizes against :class:`Limits` and before allocating.

What belongs here: turning a :class:`qfl.compress.Payload` into bytes and back, and
nothing that knows about Flower records, strategies or training. A new operator's coding
goes here together with its bound in ``tests/expected.py``; ``fuzz`` drives the decoder.
"""

from .format import decode, decode_all, encode
from .layout import DEFAULT_LIMITS, MAGIC, VERSION, Limits, WireFormatError

#: ``Array.stype`` of a Flower Array whose ``data`` is one or more qfl blobs.
STYPE = f"qfl/v{VERSION}"

__all__ = ["DEFAULT_LIMITS", "MAGIC", "STYPE", "VERSION", "Limits", "WireFormatError", "decode", "decode_all", "encode"]
