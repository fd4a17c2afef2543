"""Error memory (error feedback), as pure functions.

Following GRACE's split, the compressor knows nothing about memory and memory knows
nothing about the compressor's internals: ``compensate`` adds what earlier rounds
failed to send, ``update`` keeps what this round fails to send. Biased compressors
(top-k, sign, damped Q∘top-k) only converge with it (Stich et al. 2018; Karimireddy et
al. 2019; Basu et al. 2019), and the downlink replica on the server plays the same role.

Invariant, per call: ``sent + new_memory == memory + delta``. The memory is kept in
float32 (float64 for float64 tensors) whatever the tensor dtype, so half-precision
models do not lose the residual to rounding; the identity holds up to rounding
``(memory + delta) - sent`` in that precision and adding it back, i.e. elementwise
|error| <= 2^-23 (|memory + delta| + |sent|) for float32 (``sent`` can exceed
``memory + delta`` by far: unbiased sparsifiers send x / p).
"""

from __future__ import annotations

import torch

from .compress import Operator, Payload
from .compress.base import add, subtract


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision in which the residual of a tensor of ``dtype`` is accumulated."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compensate(delta: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
    """``delta + memory`` in memory precision (no memory yet: just ``delta``)."""
    corrected = delta.to(memory_dtype(delta.dtype))
    if memory is None:
        return corrected
    if memory.shape != delta.shape:
        raise ValueError(
            f"error memory of shape {tuple(memory.shape)} does not match an update of shape {tuple(delta.shape)}"
        )
    return add(corrected, memory.to(corrected.device, corrected.dtype))


def update(corrected: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """The new residual: what was meant (``corrected``) minus what was sent."""
    return subtract(corrected, sent.to(corrected.device, corrected.dtype))


def compress_with_memory(
    op: Operator,
    delta: torch.Tensor,
    memory: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> tuple[Payload, torch.Tensor, torch.Tensor]:
    """Compress ``delta + memory``; return (payload, what the receiver rebuilds, new memory).

    The second element is exactly what ``decompress`` yields on the other side (same
    code, same input), so the memory tracks the receiver's view bit for bit.
    """
    corrected = compensate(delta, memory)
    payload = op.compress(corrected, generator)
    sent = payload.decompress()
    return payload, sent, update(corrected, sent)
