"""Whole-model compression: a policy applied tensor by tensor, with optional error memory.

Both ends use these functions, so the sender's view of what it sent (kept in its error
memory or replica) and the receiver's reconstruction come from the same code.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from .compress import Identity, Payload
from .compress.base import FLOAT_DTYPES
from .memory import compress_with_memory, memory_dtype
from .spec import Policy

Tensors = dict[str, torch.Tensor]


def is_float(t: torch.Tensor) -> bool:
    """Float tensors carry deltas; the rest (counters, masks) carry values."""
    return t.dtype in FLOAT_DTYPES


def compress_model(
    tensors: Mapping[str, torch.Tensor],
    policy: Policy,
    generator: torch.Generator | None = None,
    memory: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, Payload], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Compress each tensor with its policy operator.

    With ``memory`` (a dict, possibly empty) error feedback is applied to every tensor
    whose operator is lossy; lossless ones need none. Returns (payloads, what the
    receiver will rebuild, new memory).
    """
    payloads: dict[str, Payload] = {}
    sent: dict[str, torch.Tensor] = {}
    new_memory: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        op = policy.operator_for(name, t)
        if memory is not None and not isinstance(op, Identity):
            payload, rebuilt, new_memory[name] = compress_with_memory(op, t, memory.get(name), generator)
        else:
            payload = op.compress(t, generator)
            rebuilt = payload.decompress()
        payloads[name] = payload
        sent[name] = rebuilt
    return payloads, sent, new_memory


def check_against(name: str, payload: Payload, reference: torch.Tensor, policy: Policy) -> None:
    """Refuse a payload that cannot stand for ``reference`` under ``policy`` (ValueError why).

    Catches a client sending another operator than configured, a different shape, a
    dtype that changed kind, or a declared size unrelated to the model.
    """
    if payload.shape != tuple(reference.shape):
        raise ValueError(f"{name}: shape {payload.shape} does not match the model's {tuple(reference.shape)}")
    if payload.dtype not in FLOAT_DTYPES:
        # A value (counter, mask). The server may hold it as float: FedAvg averages int64
        # buffers into float64, while clients keep their own integer dtype.
        if not isinstance(payload.op, Identity):
            raise ValueError(f"{name}: a {payload.dtype} value must be sent losslessly, not with {payload.op}")
        return
    if not is_float(reference):
        raise ValueError(f"{name}: a float update for the model's {reference.dtype} tensor")
    expected = policy.operator_for(name, reference)
    if payload.op != expected:
        raise ValueError(f"{name}: compressed with {payload.op}, but the configured operator is {expected}")


def apply_delta(base: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``base + update`` for a float update (in memory precision, cast back to base's dtype);
    a non-float update is a value and replaces base (cast to base's dtype)."""
    if not is_float(update) or not is_float(base):
        return update.to(base.dtype).clone()
    work = memory_dtype(base.dtype)
    return (base.to(work) + update.to(work)).to(base.dtype)


def model_delta(trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """What a client sends for one tensor: ``trained - start`` (floats) or the new value."""
    if not is_float(start):
        return trained.to(start.dtype)
    work = memory_dtype(start.dtype)
    return trained.to(work) - start.to(work)


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor with NaN/Inf, or None."""
    for name, t in tensors.items():
        if is_float(t) and t.numel() and not bool(torch.isfinite(t).all()):
            return name
    return None


#: Largest magnitude a model or update value may have (about 1.1e12, far beyond any
#: real weight): below it the float32 sum of the squares of a 2^28-element tensor stays
#: finite, so every l2 norm computed from an accepted update or model (a quantizer's
#: scale, a clipping norm, the update guard) is finite too.
MAX_VALUE = 2.0**40


def out_of_range(tensors: Mapping[str, torch.Tensor], bound: float = MAX_VALUE) -> str | None:
    """Name of the first float tensor with NaN, Inf or a value beyond ``bound``, or None."""
    for name, t in tensors.items():
        if is_float(t) and t.numel() and not bool((t.abs() <= bound).all()):
            return name
    return None


def norm(tensors: Tensors) -> float:
    """Global l2 norm over the float tensors."""
    total = 0.0
    for t in tensors.values():
        if is_float(t):
            total += float(t.double().pow(2).sum())
    return total**0.5


def digest(tensors: Mapping[str, torch.Tensor]) -> int:
    """CRC32 over names, dtypes, shapes and raw bytes: cheap proof two replicas are identical.

    Both sides compute replicas with the same deterministic code, so equal inputs give
    bit-equal tensors and equal digests; any divergence shows up as a mismatch.
    """
    crc = 0
    for key, t in tensors.items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        raw = flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)
        crc = zlib.crc32(f"{key}:{t.dtype}:{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(raw.numpy(), crc)
    return crc
