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
from .compress.base import add, add_, numpy_ok, subtract, subtract_
from .compress.payload import Levels, Part, Raw, Signs, Sparse


def memory_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision in which the residual of a tensor of ``dtype`` is accumulated."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compensate(delta: torch.Tensor, memory: torch.Tensor | None, owned: bool = False) -> torch.Tensor:
    """``delta + memory`` in memory precision (no memory yet: just ``delta``); added into
    ``delta`` itself when the caller hands it over (``owned``), or into its cast when
    casting made a copy."""
    corrected = delta.to(memory_dtype(delta.dtype))
    if memory is None:
        return corrected
    if memory.shape != delta.shape:
        raise ValueError(
            f"error memory of shape {tuple(memory.shape)} does not match an update of shape {tuple(delta.shape)}"
        )
    memory = memory.to(corrected.device, corrected.dtype)
    if owned or corrected is not delta:
        return add_(corrected, memory)
    return add(corrected, memory)


def update(corrected: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """The new residual: what was meant (``corrected``) minus what was sent."""
    return subtract(corrected, sent.to(corrected.device, corrected.dtype))


def compress_with_memory(
    op: Operator,
    delta: torch.Tensor,
    memory: torch.Tensor | None,
    generator: torch.Generator | None = None,
    keep_sent: bool = True,
    owned: bool = False,
) -> tuple[Payload, torch.Tensor | None, torch.Tensor]:
    """Compress ``delta + memory``; return (payload, what the receiver rebuilds, new memory).

    The second element is exactly what ``decompress`` yields on the other side (same
    code, same input), so the memory tracks the receiver's view bit for bit.

    Without ``keep_sent`` the second element is None, and a sparse payload's new memory
    is ``delta + memory`` changed at the kept positions only (:func:`sparse_update`):
    the dense rebuild, a model-sized tensor of zeros, and a second model-sized result
    are never made; a dense payload's rebuild is subtracted in place when ``delta +
    memory`` is this call's own. ``owned``: the caller hands ``delta`` over, so the
    memory is added into it and it may become the new memory.
    """
    corrected = compensate(delta, memory, owned)
    writable = owned or corrected is not delta  # handed over, or a tensor compensate made
    payload = op.compress(corrected, generator)
    if not keep_sent:
        new = sparse_update(corrected, payload, writable)
        if new is not None:
            return payload, None, new
    sent = payload.decompress()
    if keep_sent or not writable or _holds(payload, sent, corrected):
        return payload, sent if keep_sent else None, update(corrected, sent)
    return payload, None, subtract_(corrected, sent.to(corrected.device, corrected.dtype))


def _holds(payload: Payload, sent: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether the payload or its rebuild lies in ``t``'s memory (``t`` cannot be written)."""
    return _overlap(sent, t) or _shares_memory(payload.body, t)


def sparse_update(corrected: torch.Tensor, payload: Payload, owned: bool) -> torch.Tensor | None:
    """``update(corrected, payload.decompress())`` for a sparse payload, bit for bit, in
    O(kept) beyond one copy of ``corrected`` (none when ``owned``: it is written in
    place); None when the payload is dense or ``corrected`` cannot be written as a flat
    numpy array.

    Away from the kept positions ``corrected - 0`` is ``corrected`` exactly; at them it
    is the same IEEE subtraction of the same values: ``decompress()`` equals
    ``decompress_sparse()`` scattered into zeros (``Operator.decompress_sparse``). The
    dense way makes two model-sized tensors per message, the rebuild and the result, on
    fresh pages whose faults cost a large model's client more than the compression.
    """
    if not (numpy_ok(corrected) and corrected.is_contiguous()):
        return None
    sparse = payload.decompress_sparse()
    if sparse is None:
        return None
    positions, values = sparse
    if not owned or _shares_memory(payload.body, corrected):
        corrected = corrected.clone()
    flat = corrected.numpy().reshape(-1)
    index = positions.numpy()
    flat[index] -= values.to(corrected.dtype).numpy()
    return corrected


def _shares_memory(part: Part, t: torch.Tensor) -> bool:
    """Whether any tensor of a payload body lies in ``t``'s memory (then ``t`` cannot be
    written): the operators' bodies are fresh, but a body may hold its input's values."""
    if isinstance(part, Sparse):
        held = [] if part.indices is None else [part.indices]
        return any(_overlap(h, t) for h in held) or _shares_memory(part.values, t)
    names = {Raw: ("values",), Levels: ("scales", "levels"), Signs: ("negative",)}[type(part)]
    return any(_overlap(getattr(part, name), t) for name in names)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the storages of ``a`` and ``b`` overlap in memory (views made through numpy
    have storages of their own over the same bytes)."""
    sa, sb = a.untyped_storage(), b.untyped_storage()
    start_a, start_b = sa.data_ptr(), sb.data_ptr()
    return start_a < start_b + sb.nbytes() and start_b < start_a + sa.nbytes()
