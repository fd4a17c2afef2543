"""Reading a client's reply: every field it carries parsed and checked in one place, each
blob decoded within the size of the tensor it stands for, before anything reaches a strategy.

Raises ValueError (:class:`qfl.wire.WireFormatError`, :class:`qfl.protocol.ProtocolError`)
naming what is wrong; the server drops and counts such a reply (:mod:`.server`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from ..clients.records import decode_record
from ..codec import (
    MAX_VALUE,
    Delta,
    Deltas,
    Model,
    Run,
    SparseDelta,
    Tensors,
    Update,
    apply_delta,
    check_against,
    concatenated,
    decode_delta,
    gather,
    is_float,
    layout_of,
    numpy_ok,
    out_of_range,
)
from ..protocol import REPLY_KEY, ProtocolError, ReplyInfo
from ..spec import Policy
from ..wire import Limits
from ._kernels import dense_beyond, sparse_beyond


def reply_info(msg: Message, kind: str) -> ReplyInfo:
    """The reply's qfl record, parsed; ProtocolError if absent, malformed or of another kind."""
    record = msg.content.get(REPLY_KEY) if REPLY_KEY in msg.content else None
    if not isinstance(record, ConfigRecord):
        raise ProtocolError("the reply carries no qfl record: is compression_mod attached to the ClientApp?")
    info = ReplyInfo.from_config(record)
    if info.kind != kind:
        raise ProtocolError(f"a {info.kind!r} reply where an {kind!r} was expected")
    return info


def decode_update(
    msg: Message, base: Tensors, uplink: Policy, limits: Limits, weight_key: str | None, sparse: bool = False
) -> tuple[str, Deltas, ReplyInfo]:
    """(ArrayRecord key, decoded delta, reply info) of a train reply, after every check.

    With ``sparse``, a tensor whose payload is sparse comes back as a
    :class:`~qfl.codec.SparseDelta` (what the streaming aggregation sums), else dense.

    Raises ValueError (WireFormatError, ProtocolError) with the reason for a reply
    that must not reach aggregation: a malformed qfl record, other records than one
    model and one MetricRecord, undecodable blobs, another operator or shape than
    configured, other tensors than the model's, NaN/Inf.
    """
    info = reply_info(msg, "update")
    check_records(msg.content, arrays=1, weight_key=weight_key)
    akey = next(iter(msg.content.array_records))
    # The container must carry exactly the model's tensors, each decoded with its own size
    # as the limit: a blob declaring more (a hostile "size far beyond the model") is
    # refused before anything is allocated.
    payloads = decode_record(msg.content[akey], {k: tensor_limits(limits, t) for k, t in base.items()})
    delta = Update()
    for name in base:  # the model's order (a group's members travel together)
        ps = payloads[name]
        if len(ps) != 1:
            raise ValueError(f"{name}: {len(ps)} payloads, expected 1")
        check_against(name, ps[0], base[name], uplink)
        delta[name] = decode_delta(ps[0]) if sparse else ps[0].decompress()
    bad = out_of_range(delta)
    if bad is not None:
        raise ValueError(f"the update of {bad} contains NaN, Inf or values beyond {MAX_VALUE:.3g}")
    return akey, delta, info


def tensor_limits(limits: Limits, tensor) -> Limits:
    """Decoder limits for a reply's payload standing for ``tensor``: its own size."""
    return _limits_of(limits, tensor.numel())


@functools.lru_cache(maxsize=4096)
def _limits_of(limits: Limits, n: int) -> Limits:
    """Cached: building a Limits (its checks) cost ~20 us, per tensor per reply, and a
    model has a few distinct sizes."""
    return Limits(
        max_elements=min(limits.max_elements, n),
        max_ndim=limits.max_ndim,
        max_total_elements=min(limits.max_total_elements, n),
        max_expansion=None,
    )


def full_uplink(msg: Message, model_bytes: int) -> int:
    """What plain Flower would have carried up for this reply.

    The client's mod reports the size of the ArrayRecord the user's code returned;
    the server's model is no measure of it when the inner strategy widens dtypes
    (FedAdam and FedYogi keep float64). Replies without a valid report count
    ``model_bytes``.
    """
    try:
        size = reply_info(msg, "update").full_bytes
    except ValueError:
        size = None
    return size if size is not None else model_bytes


def check_records(content: RecordDict, arrays: int, weight_key: str | None = None) -> None:
    """A reply must carry ``arrays`` ArrayRecords, one MetricRecord of finite numbers (with a
    positive ``weight_key``, the inner strategy's weight) and no ConfigRecord but qfl's:
    anything more could reach the inner strategy unchecked (and make it end the run)."""
    if len(content.array_records) != arrays:
        raise ValueError(f"expected {arrays} ArrayRecord(s) in the reply, found {list(content.array_records)}")
    if len(content.metric_records) != 1:
        raise ValueError(f"expected one MetricRecord in the reply, found {list(content.metric_records)}")
    others = [k for k in content.config_records if k != REPLY_KEY]
    if others:
        raise ValueError(f"unexpected ConfigRecord(s) {others} in the reply")
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise ValueError(f"metric {key!r} is not finite")
    if weight_key is not None:
        weight = metrics.get(weight_key)
        if isinstance(weight, list) or weight is None or weight <= 0:
            raise ValueError(f"the weight {weight_key!r} must be a positive number, got {weight!r}")


def beyond_range(base: Tensors, delta: Deltas) -> str | None:
    """The first tensor the update takes to NaN, Inf or beyond MAX_VALUE (one rebuilt tensor
    at a time; a sparse update's at its kept positions, the others keep the model's values;
    float32/float64 updates of the model's dtype by a compiled pass that builds nothing), or None.

    An :class:`~qfl.codec.Update`'s runs are checked one compiled pass each, against the
    model's tensors concatenated (a copy of ~100 small tensors, one call); only when
    something fails are the tensors checked one by one, to name the first."""
    runs, rest = layout_of(delta)
    if runs:
        if not any(_run_beyond(base, delta, r) for r in runs) and not any(_beyond(base[k], delta[k]) for k in rest):
            return None
    for k, t in base.items():
        if _beyond(t, delta[k]):
            return k
    return None


def _beyond(t: torch.Tensor, d: Delta) -> bool:
    """Whether the update ``d`` takes the model's tensor ``t`` beyond range."""
    if not is_float(t):  # the rebuilt tensor is not a float one (a counter): nothing to check
        return False
    flat = t.detach().reshape(-1)
    if isinstance(d, SparseDelta):
        if _compiled(flat, d.values):  # one pass, no gathered copy
            return sparse_beyond(flat.numpy(), d.indices.numpy(), d.values.numpy(), MAX_VALUE)
        touched = apply_delta(gather(t, d.indices), d.values)
    else:
        if _compiled(flat, d):  # one pass, nothing rebuilt
            return dense_beyond(flat.numpy(), d.detach().reshape(-1).numpy(), MAX_VALUE) > 0
        touched = apply_delta(t, d)
    return out_of_range({"": touched}) is not None


def _run_beyond(base: Tensors, delta: Deltas, run: Run) -> bool:
    """:func:`_beyond` for every member of ``run`` at once: one compiled pass over the
    model's members concatenated (kept by a :class:`~qfl.codec.Model` for the round's
    replies) when each is of the run's dtype, else one by one."""
    dtype = torch.float64 if run.values.dtype == np.float64 else torch.float32
    model = base.concatenated(run.names, dtype) if isinstance(base, Model) else concatenated(base, run.names, dtype)
    if model is not None:
        return dense_beyond(model, run.values, MAX_VALUE) > 0
    return any(_beyond(base[k], delta[k]) for k in run.names)


def _compiled(base: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the compiled checks apply: CPU float32/float64 values of the model's dtype
    (their sum is then apply_delta's, in that dtype)."""
    return (
        base.dtype == values.dtype
        and base.dtype in (torch.float32, torch.float64)
        and numpy_ok(base)
        and numpy_ok(values)
    )
