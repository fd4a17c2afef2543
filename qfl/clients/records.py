"""Between Flower records and tensors: ordinary arrays and qfl containers (both sides of the wire use it).

A compressed ArrayRecord carries ONE Array, ``Array(dtype="uint8", shape=(n,),
stype="qfl/v3", data=container)`` under :data:`CONTAINER_KEY`: the container
(:mod:`qfl.wire.container`) holds each tensor's name and blobs. Flower ships every Array
as its own content-addressed objects, ~450 bytes each on the Fleet API whatever their
size, so one Array per message instead of one per tensor is what keeps Flower's bytes
close to qfl's. Byte counts are ``len(Array.data)``: the bytes that actually cross the
wire, tensor names and lengths included. Every compressed record is read through
:func:`container_of`: one Array, of qfl's stype, whose container then parses.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from ..codec import Tensors
from ..compress import Payload
from ..wire import DEFAULT_LIMITS, STYPE, Limits, WireFormatError, decode_container, encode, pack, unpack

#: Key of the one Array in a compressed ArrayRecord (the model's own keys are inside it).
CONTAINER_KEY = "qfl"


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
    """One Flower Array carrying qfl bytes unchanged (shape (n,): Flower's size mods need a length)."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def encode_record(payloads: Mapping[str, Payload | list[Payload] | bytes]) -> ArrayRecord:
    """Payloads (or pre-encoded blobs, or lists of payloads sent in sequence) per tensor -> the
    ArrayRecord of one container Array."""
    blobs: dict[str, bytes | list[bytes]] = {}
    for key, p in payloads.items():
        if isinstance(p, bytes):
            blobs[key] = p
        elif isinstance(p, list):
            blobs[key] = [encode(q) for q in p]
        else:
            blobs[key] = encode(p)
    return ArrayRecord({CONTAINER_KEY: blob_array(pack(blobs))})


def container_of(record: ArrayRecord) -> memoryview:
    """The container a compressed record carries; WireFormatError unless it is exactly one qfl Array."""
    keys = list(record.keys())
    if keys != [CONTAINER_KEY]:
        raise WireFormatError(
            f"a compressed record carries one Array, {CONTAINER_KEY!r} (a qfl container), found {keys[:8]}"
            + (
                ": an uncompressed model, or one Array per tensor as older qfl versions sent"
                if keys and CONTAINER_KEY not in keys
                else ""
            )
        )
    arr = record[CONTAINER_KEY]
    if arr.stype != STYPE:
        raise WireFormatError(f"array {CONTAINER_KEY!r} has stype {arr.stype!r}, expected {STYPE!r}")
    return memoryview(arr.data)


def record_blobs(record: ArrayRecord, names: Collection[str] | None = None) -> dict[str, memoryview]:
    """Each tensor's bytes in a compressed record (:func:`qfl.wire.unpack`: exactly ``names`` if given)."""
    return unpack(container_of(record), names)


def decode_record(
    record: ArrayRecord, limits: Limits | Mapping[str, Limits] = DEFAULT_LIMITS
) -> dict[str, list[Payload]]:
    """Compressed record -> payloads per tensor (a tensor may carry several, in order).

    ``limits`` may differ per tensor (a mapping): a receiver that knows the model decodes
    each tensor with that tensor's size as its limit, and the record must carry exactly
    its tensors. Raises WireFormatError naming the tensor for anything that is not valid.
    """
    return decode_container(container_of(record), limits)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts on the wire (a compressed record: its container)."""
    return sum(len(a.data) for a in record.values())


def state_bytes(state: RecordDict) -> int:
    """Bytes of array data a client keeps in ``context.state`` (replica, error memory, ...)."""
    return sum(record_bytes(r) for r in state.array_records.values())
