"""What a spec implies for the bytes on the wire, computed from the spec alone.

The wire format chooses Elias-omega over fixed-width levels and Rice-coded gaps over a
position bitmap only when they are smaller, so the fixed-width layout is an upper bound
that holds for every input: a test asserting ``bytes <= blob_bound(op, t)`` checks the
format's promise, not a measured figure. Lossless (identity) blobs are exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from qfl.compress import IDENTITY, QSGD, Chain, Grid, Operator, RandK, Sparsifier
from qfl.wire import Group, encode
from qfl.wire.layout import varint

#: Magic, version, length, checksum, operator ids and parameters, dtype and shape: at most this.
HEADER_MAX = 64


def identity_bytes(t: torch.Tensor) -> int:
    """The exact size of a tensor sent losslessly (raw bytes and qfl's header)."""
    return len(encode(IDENTITY.compress(t)))


def container_bytes(sizes: Mapping[str, int | Group]) -> int:
    """The size of the container of a message whose tensors' blobs take ``sizes`` bytes:
    magic, version and count, then per tensor its name and the two lengths; a tensor that
    travels in a :class:`~qfl.wire.Group` (given for each of its members) adds its name
    and shape, and the group its marker, member count and blob once. Exact for exact
    sizes, an upper bound for upper bounds."""
    groups = {id(g): g for g in sizes.values() if isinstance(g, Group)}
    alone = {k: n for k, n in sizes.items() if not isinstance(n, Group)}
    total = 3 + len(varint(len(alone) + len(groups)))
    total += sum(len(varint(len(k.encode()))) + len(k.encode()) + len(varint(n)) + n for k, n in alone.items())
    for g in groups.values():
        total += 1 + len(varint(len(g.members))) + len(varint(len(g.data))) + len(g.data)
        for name, shape in g.members:
            raw = name.encode()
            total += len(varint(len(raw))) + len(raw) + len(varint(len(shape))) + sum(len(varint(d)) for d in shape)
    return total


def blob_bound(op: Operator, t: torch.Tensor) -> int:
    """Largest blob ``op`` may produce for ``t``: header, positions as a bitmap (rand-k: a
    seed), levels at fixed width with a float32 scale per bucket, other values raw."""
    if op == IDENTITY:
        return identity_bytes(t)
    n = t.numel()
    sparsifier, value = (
        (op.sparsifier, op.value)
        if isinstance(op, Chain)
        else ((op, None) if isinstance(op, Sparsifier) else (None, op))
    )
    m, body = n, 0
    if sparsifier is not None:
        m = sparsifier.expected_count(n)
        body += 8 if isinstance(sparsifier, RandK) else 1 + math.ceil(n / 8)
    if isinstance(value, (QSGD, Grid)):
        max_level = value.levels if isinstance(value, QSGD) else value.max_level
        bucket = getattr(value, "bucket", None) or m
        body += 4 * math.ceil(m / bucket) + 1 + math.ceil(m * int(2 * max_level).bit_length() / 8)
    elif value is None:
        body += 1 + m * t.element_size()
    else:
        raise NotImplementedError(f"no bound for {value}")
    return HEADER_MAX + body
