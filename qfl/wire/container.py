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
    group = 0 | members varint | members x (name-length varint | name | ndim varint | ndim x dim varint)
            | data-length varint | data                                    (version 2 only)

``data`` of an entry is what one tensor's Array used to carry: one or more
self-delimiting blobs of :mod:`qfl.wire.format` (several for a replica caught up over
several versions). A **group** (version 2; :func:`pack` writes version 1 when it has
none, so that older readers still read those) is several small tensors sent losslessly
in ONE blob: an identity payload of their values concatenated in member order, shape
``(sum of their element counts,)``. Decoding a blob costs ~50 us of fixed Python (header,
checksum, limits) whatever its size, and a ResNet's normalisation layers and biases are
most of its tensors: 61 of ResNet-18(width=32)'s 122 are float tensors of under 256
elements, 2.1 ms of decoding per message as separate blobs, 1.1 ms as one group
(``benchmarks/container_decode.py``). :func:`group_payloads`
chooses the members (identity payloads of at most :data:`GROUP_MAX_ELEMENTS` elements,
per dtype, in the order they come); the receiver gets each member back as its own
identity payload, a view of the group's values.

:func:`unpack` checks everything before it allocates: the count against the bytes
present (an entry takes at least 3), every length against the bytes left, each name
non-empty, at most :data:`MAX_NAME` bytes of valid UTF-8, unique and, when the receiver
says which tensors it holds, one of them, all of them present, and no trailing bytes.
:func:`decode_container` then decodes each entry within its limits (a group member's
declared shape within that member's limits, the group's blob exactly one identity
payload of the members' element count); with one :class:`Limits` for every entry, the
entries also share its ``max_total_elements``, as the blobs of one ``decode_all`` do.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch

from ..compress import Identity, Payload, Raw
from .format import decode_all, encode
from .layout import Limits, WireFormatError, varint

CONTAINER_MAGIC = b"QC"
#: The version :func:`pack` writes when the container has a group (1 otherwise).
CONTAINER_VERSION = 2
#: Longest tensor name accepted, in bytes of UTF-8.
MAX_NAME = 4096
#: Fewest bytes an entry can take: a one-byte name and two one-byte lengths.
_MIN_ENTRY = 3
#: Largest tensor (element count) :func:`group_payloads` puts into a group: up to here a
#: blob's fixed decoding cost is comparable to moving its values (~50 us, ~256 KB).
GROUP_MAX_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """Small tensors sent losslessly in one blob: each member's (name, shape), in order,
    and ``data``, one wire blob of an identity payload of their values concatenated."""

    members: tuple[tuple[str, tuple[int, ...]], ...]
    data: bytes | bytearray | memoryview

    @staticmethod
    def of(payloads: Mapping[str, Payload]) -> Group:
        """The group of identity payloads of one dtype (in the mapping's order)."""
        flat = torch.cat([p.body.values.reshape(-1) for p in payloads.values()])
        first = next(iter(payloads.values()))
        data = encode(Payload(first.op, (flat.numel(),), first.dtype, Raw(flat)))
        return Group(tuple((k, tuple(p.shape)) for k, p in payloads.items()), data)

    def decode(self, limits: Limits | Mapping[str, Limits], budget: int | None = None) -> dict[str, list[Payload]]:
        """The members as identity payloads viewing the one decoded blob; every declared
        shape is checked against its member's limits (and the total against ``budget``,
        what is left of a container's shared one) before the blob is decoded."""
        sizes = []
        for name, shape in self.members:
            own = limits[name] if isinstance(limits, Mapping) else limits
            if len(shape) > own.max_ndim:
                raise WireFormatError(f"tensor {name!r}: ndim {len(shape)} exceeds the limit {own.max_ndim}")
            n = math.prod(shape)
            if n > own.max_elements:
                raise WireFormatError(
                    f"tensor {name!r}: declared shape {shape} has {n} elements, "
                    f"above the limit max_elements={own.max_elements}"
                )
            sizes.append(n)
        total = sum(sizes)
        label = f"the group of {self.members[0][0]!r} and {len(sizes) - 1} more"
        if budget is not None and total > budget:
            raise WireFormatError(
                f"{label} declares {total} elements, above what is left ({budget}) of the container's limits"
            )
        try:
            payloads = decode_all(self.data, Limits(max_elements=total, max_ndim=1, max_total_elements=total))
        except WireFormatError as exc:
            raise WireFormatError(f"{label}: {exc}") from None
        if len(payloads) != 1 or not isinstance(payloads[0].op, Identity) or payloads[0].shape != (total,):
            raise WireFormatError(
                f"{label} must carry one identity payload of shape "
                f"({total},), found {[(str(p.op), p.shape) for p in payloads]}"
            )
        whole = payloads[0]
        flat, out, at = whole.body.values, {}, 0
        for (name, shape), n in zip(self.members, sizes, strict=True):
            out[name] = [Payload(whole.op, shape, whole.dtype, Raw(flat[at : at + n].view(shape)))]
            at += n
        return out


def groupable(p: object) -> bool:
    """Whether a payload may share a group's blob: a small dense identity payload on the CPU."""
    return (
        isinstance(p, Payload)
        and isinstance(p.op, Identity)
        and isinstance(p.body, Raw)
        and p.body.values.dtype == p.dtype
        and p.body.values.device.type == "cpu"
        and 0 < p.numel <= GROUP_MAX_ELEMENTS
    )


def group_payloads(payloads: Mapping[str, object]) -> dict[str, object]:
    """``payloads`` with every dtype's small identity payloads (two or more) replaced by one
    :class:`Group`, each member's name mapped to it: what :func:`pack` writes as a group."""
    by_dtype: dict[torch.dtype, dict[str, Payload]] = {}
    for k, p in payloads.items():
        if groupable(p):
            by_dtype.setdefault(p.dtype, {})[k] = p
    out = dict(payloads)
    for members in by_dtype.values():
        if len(members) > 1:
            group = Group.of(members)
            for k in members:
                out[k] = group
    return out


def pack(blobs: Mapping[str, bytes | Sequence[bytes] | Group]) -> bytes:
    """One container holding, per tensor name, its blob (or blobs, sent in sequence); a
    :class:`Group` (mapped to from each of its members' names) is written once, where its
    first member comes."""
    groups = {id(g): g for g in blobs.values() if isinstance(g, Group)}
    for group in groups.values():
        names = [m for m, _ in group.members]
        if not names or len(set(names)) != len(names) or any(blobs.get(m) is not group for m in names):
            raise ValueError(f"a group's members {names[:8]} must each map to the group, once")
    count = len(blobs) - sum(len(g.members) - 1 for g in groups.values())
    parts = [CONTAINER_MAGIC, bytes([CONTAINER_VERSION if groups else 1]), varint(count)]
    for name, data in blobs.items():
        if isinstance(data, Group):
            if name != data.members[0][0]:
                continue  # written at its first member
            parts += [varint(0), varint(len(data.members))]
            for member, shape in data.members:
                parts += [_name_bytes(member), varint(len(shape)), *(varint(d) for d in shape)]
            parts += [varint(len(data.data)), data.data]
            continue
        parts.append(_name_bytes(name))
        size = len(data) if isinstance(data, (bytes, bytearray, memoryview)) else sum(map(len, data))
        parts += [varint(size)]
        parts += [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return b"".join(parts)


def _name_bytes(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) <= MAX_NAME:
        raise ValueError(f"tensor name {name!r} must be 1 to {MAX_NAME} bytes of UTF-8")
    return varint(len(raw)) + raw


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
        v, shift, data, pos = 0, 0, self.data, self.pos
        while True:
            if pos >= len(data):  # indexed, not sliced: names and shapes are read a byte at a time
                raise WireFormatError(f"truncated container: {what} needs 1 bytes, 0 left")
            byte = data[pos]
            pos = self.pos = pos + 1
            v |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 63:
                raise WireFormatError(f"container {what}: varint longer than 64 bits")
        if shift and not byte:  # the encoder writes no trailing zero groups: one container, one encoding
            raise WireFormatError(f"container {what}: varint is not in its shortest form")
        return v


def unpack(data: bytes | bytearray | memoryview, names: Collection[str] | None = None) -> dict[str, memoryview | Group]:
    """Each tensor's bytes in a container (views into ``data``, in the container's order);
    a group's members each map to their :class:`Group`.

    ``names``: the tensors the receiver holds; then the container must carry exactly
    those (an unknown name is refused when it is read, missing ones at the end). Raises
    WireFormatError saying what is wrong.
    """
    cur = _Cursor(memoryview(data).cast("B"))
    magic = bytes(cur.take(2, "magic"))
    if magic != CONTAINER_MAGIC:
        raise WireFormatError(f"not a qfl container: magic {magic!r}, expected {CONTAINER_MAGIC!r}")
    version = cur.take(1, "version")[0]
    if version not in (1, CONTAINER_VERSION):
        raise WireFormatError(
            f"unsupported qfl container version {version} (this build reads 1 to {CONTAINER_VERSION})"
        )
    count = cur.varint("tensor count")
    if count > cur.left() // _MIN_ENTRY:
        raise WireFormatError(
            f"container tensor count = {count} exceeds {cur.left() // _MIN_ENTRY}, the most {cur.left()} bytes can hold"
        )
    out: dict[str, memoryview | Group] = {}

    def name_of(what: str) -> str:
        size = cur.varint(f"name length of {what}")
        if not 0 < size <= MAX_NAME:
            raise WireFormatError(f"the name of {what} of the container has {size} bytes, not 1 to {MAX_NAME}")
        try:
            name = bytes(cur.take(size, f"name of {what}")).decode()
        except UnicodeDecodeError:
            raise WireFormatError(f"the name of {what} of the container is not valid UTF-8") from None
        if name in out:
            raise WireFormatError(f"tensor {name!r} appears twice in the container")
        if names is not None and name not in names:
            raise WireFormatError(f"unexpected {[name]}: not one of the {len(names)} tensors the receiver holds")
        return name

    for i in range(count):
        if version > 1 and cur.left() and cur.data[cur.pos] == 0:  # a group
            cur.pos += 1
            size = cur.varint(f"member count of group {i}")
            if not 0 < size <= cur.left() // _MIN_ENTRY:
                raise WireFormatError(
                    f"group {i} declares {size} members, not 1 to {cur.left() // _MIN_ENTRY} (the bytes left)"
                )
            members = []
            for j in range(size):
                name = name_of(f"member {j} of group {i}")
                ndim = cur.varint(f"ndim of {name!r}")
                if ndim > cur.left():
                    raise WireFormatError(f"truncated container: {name!r} declares {ndim} dimensions")
                members.append((name, tuple(cur.varint(f"a dimension of {name!r}") for _ in range(ndim))))
                out[name] = None  # type: ignore[assignment]  # taken, for the duplicate test; set below
            size = cur.varint(f"data length of group {i}")
            if size > cur.left():
                raise WireFormatError(
                    f"truncated container: data of group {i} declares {size} bytes, {cur.left()} left"
                )
            group = Group(tuple(members), cur.take(size, ""))
            for name, _ in members:
                out[name] = group
            continue
        name = name_of(f"entry {i}")
        size = cur.varint(f"data length of {name!r}")
        if size > cur.left():
            raise WireFormatError(f"truncated container: data of {name!r} declares {size} bytes, {cur.left()} left")
        out[name] = cur.take(size, "")
    if cur.left():
        raise WireFormatError(f"{cur.left()} unexpected trailing bytes after the container's {count} entries")
    if version > 1 and not any(isinstance(v, Group) for v in out.values()):
        # pack writes version 1 then: one container, one encoding
        raise WireFormatError(f"a version {version} container without a group (version 1 carries only tensors)")
    if names is not None and len(out) != len(names):
        missing = sorted(n for n in names if n not in out)
        raise WireFormatError(f"missing {missing}: the container carries {len(out)} of the {len(names)} tensors")
    return out


def decode_container(
    data: bytes | bytearray | memoryview, limits: Limits | Mapping[str, Limits]
) -> dict[str, list[Payload]]:
    """Each tensor's payloads in a container, in order (see :func:`unpack` and :func:`decoded`)."""
    return dict(decoded(data, limits))


def decoded(
    data: bytes | bytearray | memoryview, limits: Limits | Mapping[str, Limits]
) -> Iterator[tuple[str, list[Payload]]]:
    """Each tensor's payloads in a container, one entry decoded at a time (a group's members
    together), so that a caller summing them holds one entry's decoded values at once.

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
    for name, blob in entries.items():
        if isinstance(blob, Group):
            if name != blob.members[0][0]:
                continue  # decoded with its first member
            out = blob.decode(limits, budget)
            if budget is not None:
                budget -= sum(p.numel for ps in out.values() for p in ps)
            yield from out.items()
            continue
        own = limits[name] if per_name else dataclasses.replace(limits, max_total_elements=budget, max_expansion=None)
        try:
            payloads = decode_all(blob, own)
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
            budget -= sum(p.numel for p in payloads)
        yield name, payloads
