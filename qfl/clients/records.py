"""Between Flower records and tensors: ordinary arrays and qfl blobs (both sides of the wire use it).

A compressed tensor travels as ``Array(dtype="uint8", shape=(n,), stype="qfl/v2",
data=blob)`` under the tensor's own name, so a compressed ArrayRecord has the same keys
as the model it stands for, and byte counts are ``len(Array.data)``: the bytes that
actually cross the wire.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from ..codec import Tensors
from ..compress import Payload
from ..wire import DEFAULT_LIMITS, STYPE, Limits, WireFormatError, decode_all, encode


def _contiguous(a: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping 0-d arrays 0-d (``np.ascontiguousarray`` would make them 1-d)."""
    return a if a.flags.c_contiguous else a.copy(order="C")


def to_tensors(record: ArrayRecord) -> Tensors:
    """Ordinary (numpy-serialised) ArrayRecord -> CPU tensors, keys in order.

    Raises ValueError naming the key when an Array is not an ordinary numpy array (for
    instance a qfl blob handed to code that expected a plain model).
    """
    out: Tensors = {}
    for key, arr in record.items():
        if arr.stype == STYPE:
            raise ValueError(f"array {key!r} is a compressed qfl payload, not an ordinary array")
        try:
            out[key] = torch.from_numpy(_contiguous(arr.numpy()))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"array {key!r} cannot be read as a numpy array: {exc}") from None
    return out


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """CPU tensors -> ordinary ArrayRecord (what Flower strategies and user code expect)."""
    return ArrayRecord({k: Array(_contiguous(t.detach().cpu().numpy())) for k, t in tensors.items()})


def blob_array(data: bytes) -> Array:
    """One Flower Array carrying qfl blobs unchanged (shape (n,): Flower's size mods need a length)."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def encode_record(payloads: Mapping[str, Payload | list[Payload] | bytes]) -> ArrayRecord:
    """Payloads (or pre-encoded blobs, or lists of payloads sent in sequence) -> ArrayRecord."""
    out = {}
    for key, p in payloads.items():
        if isinstance(p, bytes):
            out[key] = blob_array(p)
        elif isinstance(p, list):
            out[key] = blob_array(b"".join(encode(q) for q in p))
        else:
            out[key] = blob_array(encode(p))
    return ArrayRecord(out)


def decode_record(
    record: ArrayRecord, limits: Limits | Mapping[str, Limits] = DEFAULT_LIMITS
) -> dict[str, list[Payload]]:
    """ArrayRecord of qfl blobs -> payloads per key (a key may carry several, in order).

    ``limits`` may differ per key (a mapping): a server that knows the model decodes
    each reply tensor with that tensor's size as its limit. Raises WireFormatError
    naming the key for anything that is not a valid qfl array.
    """
    out: dict[str, list[Payload]] = {}
    for key, arr in record.items():
        if arr.stype != STYPE:
            raise WireFormatError(f"array {key!r} has stype {arr.stype!r}, expected {STYPE!r}")
        try:
            out[key] = decode_all(arr.data, limits[key] if isinstance(limits, Mapping) else limits)
        except WireFormatError as exc:
            raise WireFormatError(f"array {key!r}: {exc}") from None
    return out


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts on the wire."""
    return sum(len(a.data) for a in record.values())


def state_bytes(state: RecordDict) -> int:
    """Bytes of array data a client keeps in ``context.state`` (replica, error memory, ...)."""
    return sum(record_bytes(r) for r in state.array_records.values())
