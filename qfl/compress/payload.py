"""What an operator produces: a structured, byte-free description of a compressed tensor.

A payload is the contract between the math (``qfl.compress``) and the bytes
(``qfl.wire``): it holds exactly what must cross the wire and nothing the receiver
can recompute (rand-k indices, bucket sizes, level counts come from the operator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch

if TYPE_CHECKING:
    from .base import Operator


@dataclass(frozen=True, eq=False)
class Raw:
    """Values sent as they are, in ``values.dtype`` (lossless for that dtype).

    Neither side copies them when it need not: identity's payload holds the compressed
    tensor itself, and a decoded dense payload views the blob's bytes (read-only).
    """

    values: torch.Tensor


@dataclass(frozen=True, eq=False)
class Levels:
    """Signed integer levels with one float32 scale per bucket (QSGD, AsyLPG grid)."""

    scales: torch.Tensor
    levels: torch.Tensor


@dataclass(frozen=True, eq=False)
class Signs:
    """One scale and a sign per element (scaled sign, sign-top-k)."""

    scale: float
    negative: torch.Tensor


@dataclass(frozen=True, eq=False)
class Sparse:
    """Kept positions and their values; ``indices`` is None when ``seed`` regenerates them."""

    indices: torch.Tensor | None
    seed: int | None
    values: Part

    @property
    def count(self) -> int:
        """Number of kept elements."""
        return _part_length(self.values)


Part = Union[Raw, Levels, Signs, Sparse]  # noqa: UP007 - a runtime alias: X | Y of classes needs 3.10's types.UnionType, isinstance works on both


def _part_length(part: Part) -> int:
    if isinstance(part, Raw):
        return part.values.numel()
    if isinstance(part, Levels):
        return part.levels.numel()
    if isinstance(part, Signs):
        return part.negative.numel()
    return part.count


@dataclass(frozen=True, eq=False)
class Payload:
    """A compressed tensor: the operator that made it, the original shape and dtype, the body.

    ``device`` is where ``decompress`` puts the result; it is not sent (decoded
    payloads live on the CPU).
    """

    op: Operator
    shape: tuple[int, ...]
    dtype: torch.dtype
    body: Part
    device: torch.device = torch.device("cpu")

    @property
    def numel(self) -> int:
        """Element count of the original tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def decompress(self) -> torch.Tensor:
        """Rebuild the (approximate) tensor; shorthand for ``self.op.decompress(self)``."""
        return self.op.decompress(self)

    def decompress_sparse(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions, values)`` when the payload is sparse, else None (``Operator.decompress_sparse``)."""
        return self.op.decompress_sparse(self)
