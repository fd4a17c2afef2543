"""Whole-model compression: a policy applied tensor by tensor, with optional error memory.

Both ends use these functions, so the sender's view of what it sent (kept in its error
memory or replica) and the receiver's reconstruction come from the same code.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
import xxhash

from .compress import Identity, Payload, Sparse
from .compress._kernels import count_outside
from .compress.base import FLOAT_DTYPES, numpy_ok, subtract
from .memory import compress_with_memory, memory_dtype
from .spec import Policy

Tensors = dict[str, torch.Tensor]


def is_float(t: torch.Tensor | SparseDelta) -> bool:
    """Float tensors carry deltas; the rest (counters, masks) carry values."""
    return t.dtype in FLOAT_DTYPES


@dataclass(frozen=True, eq=False)
class SparseDelta:
    """A decoded sparse update held as its kept positions and values, not as a dense tensor.

    A server that rebuilt every top-k reply densely would write 11M zeros to add 1% of
    them; held like this, a reply is checked and summed in O(kept) (benchmarks/SCALE.md).
    ``indices`` are int64, strictly increasing and within the shape (checked when decoded).
    """

    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return self.indices.nbytes + self.values.nbytes

    def dense(self) -> torch.Tensor:
        """The update as ``Payload.decompress`` rebuilds it."""
        n = 1
        for d in self.shape:
            n *= d
        out = torch.zeros(n, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out.reshape(self.shape)


Delta = Union[torch.Tensor, SparseDelta]  # noqa: UP007 - a runtime alias (see qfl.compress.payload.Part)
Deltas = dict[str, Delta]

#: The dtypes of a :class:`Run`: those numpy holds and the server's compiled checks take.
_RUN_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Run:
    """Consecutive dense updates of one float dtype lying back to back in one buffer, and
    ``values``, all of theirs as one flat array viewing that buffer.

    A group's small lossless tensors arrive in one blob and are decoded as views of it
    (:class:`qfl.wire.Group`): ResNet-18's ~80 normalisation tensors of 122. A server passes
    over every update four times (its values' range, the range of the model it makes,
    its norm, the sum), and each pass over one small tensor costs ~10 us of Python and
    dispatch for ~100 values: over the run it is one call.
    """

    names: tuple[str, ...]
    values: np.ndarray


class Update(dict):
    """A decoded update, tensor name -> :data:`Delta`, that finds its :class:`Run` s once
    for the server's several passes over it. Filled once, then only read (a later change
    would not be seen by :meth:`layout`)."""

    _layout: tuple[tuple[Run, ...], tuple[str, ...]] | None = None

    def layout(self) -> tuple[tuple[Run, ...], tuple[str, ...]]:
        """(the runs, the names of the tensors in none), found on the first call."""
        if self._layout is None:
            self._layout = dense_runs(self)
        return self._layout


class Model(dict):
    """A model, name -> tensor, whose tensors do not change while it is held (the server's
    base of a training round: read-only views of an ArrayRecord's bytes). The range check
    of a :class:`Run` needs the model's members of the run concatenated; this keeps that
    copy for every reply of the round (a few runs at most: beyond :data:`_KEPT_RUNS`
    layouts, which only clients grouping differently would bring, it is made each time)."""

    _concatenated: dict[tuple[tuple[str, ...], torch.dtype], np.ndarray | None] | None = None

    def concatenated(self, names: tuple[str, ...], dtype: torch.dtype) -> np.ndarray | None:
        """:func:`concatenated` of this model, kept."""
        if self._concatenated is None:
            self._concatenated = {}
        kept, key = self._concatenated, (names, dtype)
        if key in kept:
            return kept[key]
        out = concatenated(self, names, dtype)
        if len(kept) < _KEPT_RUNS:
            kept[key] = out
        return out


#: How many run layouts a :class:`Model` keeps concatenated.
_KEPT_RUNS = 4


def concatenated(model: Mapping[str, torch.Tensor], names: tuple[str, ...], dtype: torch.dtype) -> np.ndarray | None:
    """The tensors ``names`` of ``model`` flat and back to back in one numpy array, or None
    unless every one is a CPU tensor of ``dtype`` numpy can view."""
    members = [model[k].detach() for k in names]
    if not all(m.dtype == dtype and numpy_ok(m) for m in members):
        return None
    return np.concatenate([m.numpy().reshape(-1) for m in members])


def layout_of(deltas: Mapping[str, Delta]) -> tuple[tuple[Run, ...], tuple[str, ...]]:
    """An :class:`Update`'s runs and the rest; any other mapping is all rest (no scan: its
    tensors are separate allocations, a rebuilt model's or a client's)."""
    return deltas.layout() if isinstance(deltas, Update) else ((), tuple(deltas))


def dense_runs(deltas: Mapping[str, Delta]) -> tuple[tuple[Run, ...], tuple[str, ...]]:
    """The maximal runs of two or more non-empty, contiguous CPU float32/float64 tensors of
    one dtype that share one storage and follow each other in it with no gap (taken in
    memory order: a group's members lie in the group's order, the mapping has the
    model's, where other tensors come between them), and the names of the tensors in no run.

    Sharing the storage is checked, not only adjacent addresses: the run's view is made
    within that storage, so it covers exactly the members' bytes."""
    runs: list[Run] = []
    rest: list[str] = []
    candidates = []
    for name, t in deltas.items():
        if isinstance(t, torch.Tensor) and t.dtype in _RUN_DTYPES and t.numel() and numpy_ok(t) and t.is_contiguous():
            candidates.append((t.data_ptr(), name, t))
        else:
            rest.append(name)
    names: list[str] = []
    first: torch.Tensor | None = None
    storage = end = 0

    def close() -> None:
        if len(names) >= 2 and first is not None:
            count = (end - first.data_ptr()) // first.element_size()
            view = torch.as_strided(first.detach(), (count,), (1,), first.storage_offset())
            runs.append(Run(tuple(names), view.numpy()))
        else:
            rest.extend(names)
        names.clear()

    for ptr, name, t in sorted(candidates, key=lambda c: c[0]):
        size = t.numel() * t.element_size()
        if first is not None and t.dtype == first.dtype and ptr == end and t.untyped_storage().data_ptr() == storage:
            names.append(name)
            end += size
            continue
        close()
        names.append(name)
        first, storage, end = t, t.untyped_storage().data_ptr(), ptr + size
    close()
    return tuple(runs), tuple(rest)


def decode_delta(payload: Payload) -> Delta:
    """A received update's tensor: sparse when its payload keeps at most a quarter of the
    elements (beyond that, positions and values take more memory than the dense tensor)."""
    body = payload.body
    if payload.dtype in FLOAT_DTYPES and isinstance(body, Sparse) and 4 * body.count <= payload.numel:
        sparse = payload.decompress_sparse()
        if sparse is not None:
            return SparseDelta(payload.shape, *sparse)
    return payload.decompress()


def dense(t: Delta) -> torch.Tensor:
    """``t`` as a dense tensor."""
    return t.dense() if isinstance(t, SparseDelta) else t


def _stored(t: Delta) -> np.ndarray | None:
    """The values a check must see, flat, in numpy (a sparse update's kept ones: its zeros
    pass every check); None for a tensor that carries values, not a float update.

    numpy, not torch: torch's reductions and indexing start a parallel region per call,
    which stalls for milliseconds on a busy machine (a server's usual state), even for
    small tensors; numpy's run in the calling thread.
    """
    v = t.values if isinstance(t, SparseDelta) else t
    if not is_float(v):
        return None
    if v.dtype == torch.bfloat16:  # numpy has no bfloat16
        v = v.float()
    return v.detach().reshape(-1).numpy()


def compress_model(
    tensors: Mapping[str, torch.Tensor],
    policy: Policy,
    generator: torch.Generator | None = None,
    memory: Mapping[str, torch.Tensor] | None = None,
    keep_sent: bool = True,
    consume: bool = False,
) -> tuple[dict[str, Payload], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Compress each tensor with its policy operator.

    With ``memory`` (a dict, possibly empty) error feedback is applied to every tensor
    whose operator is lossy; lossless ones need none. Returns (payloads, what the
    receiver will rebuild, new memory); without ``keep_sent`` the second is empty, so a
    caller that does not need it does not hold a model-sized copy of it (and a sparse
    payload's memory is updated at its kept positions only). With ``consume`` the
    tensors are handed over: each is popped from ``tensors`` (then a dict) once
    compressed, so the update is released as the new memory grows, not held beside all
    of it, and it may become that memory (written in place).
    """
    payloads: dict[str, Payload] = {}
    sent: dict[str, torch.Tensor] = {}
    new_memory: dict[str, torch.Tensor] = {}
    for name in list(tensors):
        t = tensors.pop(name) if consume else tensors[name]  # type: ignore[attr-defined]
        op = policy.operator_for(name, t)
        if memory is not None and not isinstance(op, Identity):
            payload, rebuilt, new_memory[name] = compress_with_memory(
                op, t, memory.get(name), generator, keep_sent, owned=consume
            )
        else:
            payload = op.compress(t, generator)
            rebuilt = payload.decompress() if keep_sent else None
        payloads[name] = payload
        if keep_sent:
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
    if numpy_ok(base) and numpy_ok(update):
        # The same IEEE operations in numpy, which runs them in the calling thread: torch's
        # elementwise kernels start a parallel region per call, slow on a busy server.
        w = numpy_memory_dtype(base.dtype)
        b, u = base.detach().numpy(), update.detach().numpy()
        return torch.from_numpy(
            np.asarray(b.astype(w, copy=False) + u.astype(w, copy=False)).astype(b.dtype, copy=False)
        )
    return (base.to(work) + update.to(work)).to(base.dtype)


def apply_payload(base: torch.Tensor, payload: Payload) -> torch.Tensor:
    """``apply_delta(base, payload.decompress())``, bit for bit, without the dense rebuild
    of a sparse payload: ``base + 0`` (what the rebuild's zeros give: a copy, but for a
    negative zero, which becomes +0) with the kept positions added. A downlink step of a
    large model is mostly zeros; the rebuild wrote them into a model-sized tensor on
    fresh pages for one addition. ``base`` is never written.
    """
    if (
        is_float(base)
        and numpy_ok(base)
        and payload.dtype in (torch.float32, torch.float64, torch.float16)
        and payload.shape == tuple(base.shape)
    ):
        sparse = payload.decompress_sparse()
        if sparse is not None:
            positions, values = sparse
            w = numpy_memory_dtype(base.dtype)
            b = base.detach().numpy().reshape(-1)
            moved = np.add(b.astype(w, copy=False), 0)  # fresh, in the memory precision
            at = positions.numpy()
            moved[at] = b[at].astype(w, copy=False) + values.numpy().astype(w, copy=False)
            return torch.from_numpy(moved.astype(b.dtype, copy=False).reshape(base.shape))
    return apply_delta(base, payload.decompress())


def numpy_memory_dtype(dtype: torch.dtype) -> type:
    """:func:`qfl.memory.memory_dtype` as a numpy type."""
    return np.float64 if memory_dtype(dtype) == torch.float64 else np.float32


def gather(t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)[indices]``, in numpy where it can (torch's indexing starts a parallel region)."""
    flat = t.detach().reshape(-1)
    return torch.from_numpy(flat.numpy()[indices.numpy()]) if numpy_ok(flat) else flat[indices]


def model_delta(trained: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """What a client sends for one tensor: ``trained - start`` (floats) or the new value."""
    if not is_float(start):
        return trained.to(start.dtype)
    work = memory_dtype(start.dtype)
    return subtract(trained.to(work), start.to(work))


def nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor with NaN/Inf, or None: :func:`out_of_range` with the
    largest finite float as the bound (its min/max check, where ``isfinite().all()``
    wrote a model-sized bool tensor first -- 2.2 of a GPT-2 client's 6.8 s of compression)."""
    return out_of_range(tensors, bound=sys.float_info.max)


#: Largest magnitude a model or update value may have (about 1.1e12, far beyond any
#: real weight): below it the float32 sum of the squares of a 2^28-element tensor stays
#: finite, so every l2 norm computed from an accepted update or model (a quantizer's
#: scale, a clipping norm, the update guard) is finite too.
MAX_VALUE = 2.0**40


def out_of_range(tensors: Mapping[str, Delta], bound: float = MAX_VALUE) -> str | None:
    """Name of the first float tensor with NaN, Inf or a value beyond ``bound``, or None.

    An :class:`Update`'s runs are checked one call each; only when something fails are
    the tensors checked one by one, to name the first."""
    runs, rest = layout_of(tensors)
    if runs:
        if not any(values_outside(r.values, bound) for r in runs) and not any(
            values_outside(_stored(tensors[k]), bound) for k in rest
        ):
            return None
    for name, t in tensors.items():
        if values_outside(_stored(t), bound):
            return name
    return None


def values_outside(v: np.ndarray | None, bound: float = MAX_VALUE) -> bool:
    """Whether flat float values ``v`` hold NaN, Inf or a value beyond ``bound`` (None or
    empty: no): :func:`out_of_range`'s test of one tensor, for values already in numpy."""
    if v is None or not v.size:
        return False
    if v.dtype in (np.float32, np.float64):
        return count_outside(v, bound) > 0  # one compiled pass
    # No temporaries (abs, compare, all: three passes, two model-sized allocations);
    # NaN propagates to the minimum and fails the comparison.
    return not (-bound <= float(v.min()) and float(v.max()) <= bound)


def norm(tensors: Mapping[str, Delta]) -> float:
    """Global l2 norm over the float tensors (an :class:`Update`'s runs one sum each)."""
    runs, rest = layout_of(tensors)
    total = 0.0
    for v in [r.values for r in runs] + [_stored(tensors[k]) for k in rest]:
        if v is not None and v.size:
            # In float64: the norm is compared with a clipping bound the client met (which
            # keeps 0.1% below it: the order of the sum does not decide).
            total += float(np.einsum("i,i->", v, v, dtype=np.float64))
    return total**0.5


def digest(tensors: Mapping[str, torch.Tensor]) -> int:
    """32 bits of XXH3-64 over names, dtypes, shapes and raw bytes: cheap proof two replicas
    are identical.

    Both sides compute replicas with the same deterministic code, so equal inputs give
    bit-equal tensors and equal digests; any divergence shows up as a mismatch. XXH3
    (the wire checksum's hash) reads ~15 GB/s here, zlib's CRC-32 ~1.2 GB/s: 0.4 s per
    digest of a GPT-2-sized model, paid by the server per version and the client per
    message. 32 bits because the protocol carries it as such (a ConfigRecord integer).
    """
    h = xxhash.xxh3_64()
    for key, t in tensors.items():
        flat = t.detach().cpu().contiguous().reshape(-1)
        raw = flat.to(torch.uint8) if flat.dtype == torch.bool else flat.view(torch.uint8)
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(raw.numpy())
    return h.intdigest() & 0xFFFFFFFF
