"""All of a message's blobs in one byte string: the container that travels as one Flower Array.

Flower (>= 1.38) ships each Array of a message as separate content-addressed objects
(an ``Array`` and its ``ArrayChunk``), each named by a 64-hex SHA-256 id in its parent,
in its own header, in the message's object tree and in the SuperLink's list of objects
to push: about 450 bytes per Array on the Fleet API, whatever its size. One Array per
tensor cost a 13-tensor CNN ~5.4 KB per message next to a ~4 KB top-1% update, so qfl
puts every tensor's blobs of a message into one container, one Array
(``benchmarks/flower_overhead.py`` has the figures)::

    b"QC" | version u8 | count varint | count x entry
    entry = name-length varint | name (UTF-8) | data-length varint | data

``data`` is what one tensor's Array used to carry: one or more self-delimiting blobs of
:mod:`qfl.wire.format` (several for a replica caught up over several versions).

:func:`unpack` checks everything before it allocates: the count against the bytes
present (an entry takes at least 3), every length against the bytes left, each name
non-empty, at most :data:`MAX_NAME` bytes of valid UTF-8, unique and, when the receiver
says which tensors it holds, one of them, all of them present, and no trailing bytes.
:func:`decode_container` then decodes each entry within its limits; with one
:class:`Limits` for every entry, the entries also share its ``max_total_elements``, as
the blobs of one ``decode_all`` do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence

from ..compress import Payload
from .format import decode_all
from .layout import Limits, WireFormatError, varint

CONTAINER_MAGIC = b"QC"
CONTAINER_VERSION = 1
#: Longest tensor name accepted, in bytes of UTF-8.
MAX_NAME = 4096
#: Fewest bytes an entry can take: a one-byte name and two one-byte lengths.
_MIN_ENTRY = 3


def pack(blobs: Mapping[str, bytes | Sequence[bytes]]) -> bytes:
    """One container holding, per tensor name, its blob (or blobs, sent in sequence)."""
    parts = [CONTAINER_MAGIC, bytes([CONTAINER_VERSION]), varint(len(blobs))]
    for name, data in blobs.items():
        raw = name.encode()
        if not 0 < len(raw) <= MAX_NAME:
            raise ValueError(f"tensor name {name!r} must be 1 to {MAX_NAME} bytes of UTF-8")
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else sum(map(len, data))
        parts += [varint(len(raw)), raw, varint(size)]
        parts += [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return b"".join(parts)


class _Cursor:
    """Bounds-checked reads over a container; every failure is a WireFormatError."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n > self.left():
            raise WireFormatError(f"truncated container: {what} needs {n} bytes, {self.left()} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def varint(self, what: str) -> int:
        """An unsigned LEB128 of at most 64 bits, in its shortest form."""
        v, shift = 0, 0
        while True:
            byte = self.take(1, what)[0]
            v |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise WireFormatError(f"container {what}: varint longer than 64 bits")
        if shift and not byte:  # the encoder writes no trailing zero groups: one container, one encoding
            raise WireFormatError(f"container {what}: varint is not in its shortest form")
        return v


def unpack(data: bytes | bytearray | memoryview, names: Collection[str] | None = None) -> dict[str, memoryview]:
    """Each tensor's bytes in a container (views into ``data``, in the sender's order).

    ``names``: the tensors the receiver holds; then the container must carry exactly
    those (an unknown name is refused when it is read, missing ones at the end). Raises
    WireFormatError saying what is wrong.
    """
    cur = _Cursor(memoryview(data).cast("B"))
    magic = bytes(cur.take(2, "magic"))
    if magic != CONTAINER_MAGIC:
        raise WireFormatError(f"not a qfl container: magic {magic!r}, expected {CONTAINER_MAGIC!r}")
    version = cur.take(1, "version")[0]
    if version != CONTAINER_VERSION:
        raise WireFormatError(f"unsupported qfl container version {version} (this build reads {CONTAINER_VERSION})")
    count = cur.varint("tensor count")
    if count > cur.left() // _MIN_ENTRY:
        raise WireFormatError(
            f"container tensor count = {count} exceeds {cur.left() // _MIN_ENTRY}, the most {cur.left()} bytes can hold"
        )
    out: dict[str, memoryview] = {}
    for i in range(count):
        size = cur.varint(f"name length of entry {i}")
        if not 0 < size <= MAX_NAME:
            raise WireFormatError(f"the name of entry {i} of the container has {size} bytes, not 1 to {MAX_NAME}")
        try:
            name = bytes(cur.take(size, f"name of entry {i}")).decode()
        except UnicodeDecodeError:
            raise WireFormatError(f"the name of entry {i} of the container is not valid UTF-8") from None
        if name in out:
            raise WireFormatError(f"tensor {name!r} appears twice in the container")
        if names is not None and name not in names:
            raise WireFormatError(f"unexpected {[name]}: not one of the {len(names)} tensors the receiver holds")
        size = cur.varint(f"data length of {name!r}")
        if size > cur.left():
            raise WireFormatError(f"truncated container: data of {name!r} declares {size} bytes, {cur.left()} left")
        out[name] = cur.take(size, "")
    if cur.left():
        raise WireFormatError(f"{cur.left()} unexpected trailing bytes after the container's {count} tensors")
    if names is not None and len(out) != len(names):
        missing = sorted(n for n in names if n not in out)
        raise WireFormatError(f"missing {missing}: the container carries {len(out)} of the {len(names)} tensors")
    return out


def decode_container(
    data: bytes | bytearray | memoryview, limits: Limits | Mapping[str, Limits]
) -> dict[str, list[Payload]]:
    """Each tensor's payloads in a container, in order (see :func:`unpack`).

    With a mapping, the container must carry exactly its names and each tensor is
    decoded within its own limits (a receiver that knows the shapes). With one
    ``Limits``, any names are accepted and all tensors share one budget of declared
    elements, ``max_expansion`` per byte of the whole container within
    ``max_total_elements``: what bounds the receiver's memory is what the message
    declares in all, and one tensor may legitimately take far fewer bytes than its
    elements (a zero-initialised bias quantized to a few bytes) when the message as a
    whole does not. Raises WireFormatError naming the tensor.
    """
    per_name = isinstance(limits, Mapping)
    entries = unpack(data, limits if per_name else None)
    budget = None if per_name else limits.budget(len(data))
    total = budget
    out: dict[str, list[Payload]] = {}
    for name, blob in entries.items():
        own = limits[name] if per_name else dataclasses.replace(limits, max_total_elements=budget, max_expansion=None)
        try:
            out[name] = decode_all(blob, own)
        except WireFormatError as exc:
            used = 0 if per_name else total - budget
            shared = (
                f" (the tensors before it took {used} of the {total} elements a {len(data)}-byte container may "
                f"declare: max_total_elements={limits.max_total_elements}, max_expansion={limits.max_expansion})"
                if not per_name and "max_total_elements" in str(exc)
                else ""
            )
            raise WireFormatError(f"tensor {name!r}: {exc}{shared}") from None
        if budget is not None:
            budget -= sum(p.numel for p in out[name])
    return out
