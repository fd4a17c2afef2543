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

import functools
import io
import math
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType

from ..codec import Tensors
from ..compress import Payload
from ..wire import (
    DEFAULT_LIMITS,
    STYPE,
    Blob,
    Group,
    Limits,
    WireFormatError,
    decode_container,
    decoded,
    encode,
    group_payloads,
    pack,
    unpack,
)

#: Key of the one Array in a compressed ArrayRecord (the model's own keys are inside it).
CONTAINER_KEY = "qfl"


def to_tensors(record: ArrayRecord) -> Tensors:
    """Ordinary (numpy-serialised) ArrayRecord -> CPU tensors, keys in order.

    Raises ValueError naming the key when an Array is not an ordinary numpy array (for
    instance a qfl blob handed to code that expected a plain model).
    """
    return {key: torch.from_numpy(np.array(a, order="C")) for key, a in numpy_views(record).items()}


def _header_bytes(data: bytes) -> bytes | None:
    """The bytes of the .npy header ``data`` starts with, as its preamble states their
    length (version 1.x: 2 bytes, later: 4); None if it states none. Only a cache key:
    what numpy parsed is used only for these very bytes."""
    if len(data) < 12 or data[:6] != np.lib.format.MAGIC_PREFIX:
        return None
    end = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    return bytes(data[:end]) if end <= len(data) else None


def _read_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """(shape, fortran order, dtype, data offset, element count) by numpy's own .npy
    header reader (the count as numpy's int64 product: what ``np.frombuffer`` is asked for)."""
    head = io.BytesIO(data)
    version = np.lib.format.read_magic(head)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = reader(head)
    return shape, fortran, dtype, head.tell(), int(np.prod(shape, dtype=np.int64))


#: A model's headers repeat every round and every message; numpy's reader
#: (``ast.literal_eval``) costs ~20 us each, 2.6 ms for a ResNet's 122 tensors.
_seen_header = functools.lru_cache(maxsize=4096)(_read_header)


def _npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int, int]:
    """:func:`_read_header`, once per distinct header's bytes (:func:`_header_bytes`) when the
    preamble states where the header ends."""
    key = _header_bytes(data)
    if key is not None:
        parsed = _seen_header(key)
        if parsed[3] == len(key):
            return parsed
    return _read_header(data)


def _npy_view(arr: Array) -> np.ndarray:
    """The numpy array an ordinary Array serialises, as a read-only view of its bytes.

    ``Array.numpy()`` copies (``np.load`` of a BytesIO); here numpy's own .npy header
    reader finds dtype, shape and offset and ``np.frombuffer`` refuses data shorter
    than the header declares.
    """
    data = arr.data
    shape, fortran, dtype, offset, count = _npy_header(data)
    if dtype.hasobject:
        raise ValueError("object arrays are not numbers")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if not dtype.isnative:  # torch reads native byte order only: a copy then
        flat = flat.astype(dtype.newbyteorder("="))
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def numpy_views(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Ordinary ArrayRecord -> read-only numpy arrays sharing its bytes (no copy).

    For what is read but never written in place: a client's replica and error memory in
    ``context.state`` and the model its training returned, the server's current model.
    Each is a model of memory that ``Array.numpy()`` would duplicate, and a large model's
    client runs out of memory on such copies. An array keeps its Array's bytes alive.
    Raises ValueError naming the key for anything but a whole ordinary numpy array.
    """
    out: dict[str, np.ndarray] = {}
    for key, arr in record.items():
        if arr.stype == STYPE:
            raise ValueError(f"array {key!r} is a compressed qfl payload, not an ordinary array")
        try:
            out[key] = _npy_view(arr)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"array {key!r} cannot be read as a numpy array: {exc}") from None
    return out


def tensor_views(arrays: Mapping[str, np.ndarray]) -> Tensors:
    """Numpy arrays, read-only ones included, as CPU tensors sharing their memory (read-only
    by contract: writing into one is an error of the caller; torch cannot mark them so,
    hence its warning silenced)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(a) for key, a in arrays.items()}


def to_views(record: ArrayRecord) -> Tensors:
    """:func:`numpy_views` as CPU tensors (see :func:`tensor_views`)."""
    return tensor_views(numpy_views(record))


def numpy_array(a: np.ndarray) -> Array:
    """Flower's ``Array(a)``: the same .npy bytes (numpy's own header writer), one copy.

    Flower's constructor goes through ``np.save`` into a BytesIO (chunked ``tobytes``,
    writes, ``getvalue``): three copies, 42 ms for 11M float32 on this machine (quiet)
    against 10 ms here (:class:`qfl.wire.Blob`: written once into the final ``bytes``,
    on huge pages), paid by the server every round and by a client every message. A
    non C-contiguous array is stored C-ordered (the same values).
    """
    if a.dtype.hasobject:
        raise ValueError("object arrays cannot be sent (Flower refuses pickled arrays)")
    out, finish = new_array(a.dtype, a.shape)
    out[...] = a
    return finish()


def new_array(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.ndarray, Callable[[], Array]]:
    """(a writable C-ordered array, ``finish``): the array lives in the .npy bytes of the
    Flower Array ``finish()`` returns, so a kernel computing a model writes it straight
    into what Flower ships, with no copy after (the server's momentum step does). The
    array must not be written after ``finish``."""
    dtype, shape = np.dtype(dtype), tuple(int(d) for d in shape)
    header = _npy_header_of(dtype, shape)
    size = math.prod(shape) * dtype.itemsize
    blob = Blob(header.size + size)  # the bytes Flower ships, written once in place
    blob.view[: header.size] = header
    out = blob.view[header.size :].view(dtype).reshape(shape)

    def finish() -> Array:
        return Array(dtype=_name_of(dtype), shape=shape, stype=SType.NUMPY, data=blob.finish())

    return out, finish


@functools.lru_cache(maxsize=64)
def _name_of(dtype: np.dtype) -> str:
    """``str(dtype)``, what Flower's ``Array(ndarray)`` records (~10 us per call, per tensor
    per round on a server, for a handful of dtypes)."""
    return str(dtype)


@functools.lru_cache(maxsize=4096)
def _npy_header_of(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """The .npy header numpy's writer gives a C-ordered array of ``dtype`` and ``shape``
    (read only). A model's tensors repeat every round; the writer (a dict's repr, padding)
    costs more than copying a small tensor's values."""
    head = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    try:
        np.lib.format.write_array_header_1_0(head, header)
    except ValueError:  # a header beyond 64 KiB: format 2.0, as np.save does
        head = io.BytesIO()
        np.lib.format.write_array_header_2_0(head, header)
    return np.frombuffer(head.getvalue(), np.uint8)


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ArrayRecord holding these very Arrays. ``ArrayRecord(dict)`` builds a new Array
    for each one (Flower's ``from_array_dict``): ~10 us per tensor that a model of
    many small tensors pays every round; item assignment keeps Flower's checks of each
    key and value."""
    record = ArrayRecord()
    for k, a in arrays.items():
        record[k] = a
    return record


def numpy_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays -> ordinary ArrayRecord, each through :func:`numpy_array`."""
    return array_record({k: numpy_array(a) for k, a in arrays.items()})


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """CPU tensors -> ordinary ArrayRecord (what Flower strategies and user code expect)."""
    return numpy_record({k: t.detach().cpu().numpy() for k, t in tensors.items()})


def consume_to_record(tensors: MutableMapping[str, torch.Tensor]) -> ArrayRecord:
    """:func:`to_record`, emptying ``tensors`` as it goes: each tensor is released once its
    Array holds a copy, so a large model is never held twice over (a client's replica and
    error memory are written this way at the end of a message)."""
    out = {}
    for k in list(tensors):
        t = tensors.pop(k)
        out[k] = numpy_array(t.detach().cpu().numpy())
        del t
    return array_record(out)


def blob_array(data: bytes) -> Array:
    """One Flower Array carrying qfl bytes unchanged (shape (n,): Flower's size mods need a length)."""
    return Array(dtype="uint8", shape=(len(data),), stype=STYPE, data=data)


def encode_record(payloads: Mapping[str, Payload | list[Payload] | bytes]) -> ArrayRecord:
    """Payloads (or pre-encoded blobs, or lists of payloads sent in sequence) per tensor -> the
    ArrayRecord of one container Array; small lossless payloads of one dtype share one blob
    (:func:`qfl.wire.container.group_payloads`)."""
    blobs: dict[str, bytes | list[bytes] | Group] = {}
    for key, p in group_payloads(payloads).items():
        if isinstance(p, (bytes, Group)):
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


def record_blobs(record: ArrayRecord, names: Collection[str] | None = None) -> dict[str, memoryview | Group]:
    """Each tensor's bytes in a compressed record, or the :class:`~qfl.wire.container.Group` it
    travels in (:func:`qfl.wire.unpack`: exactly ``names`` if given)."""
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


def decoded_record(record: ArrayRecord, limits: Mapping[str, Limits]) -> Iterator[tuple[str, list[Payload]]]:
    """:func:`decode_record`, one container entry at a time (:func:`qfl.wire.decoded`)."""
    return decoded(container_of(record), limits)


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of array data a record puts on the wire (a compressed record: its container)."""
    return sum(len(a.data) for a in record.values())


def state_bytes(state: RecordDict) -> int:
    """Bytes of array data a client keeps in ``context.state`` (replica, error memory, ...)."""
    return sum(record_bytes(r) for r in state.array_records.values())
