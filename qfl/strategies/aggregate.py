"""Aggregating train replies one at a time: server memory O(model), not O(clients x model).

Flower's FedAvg family averages the replies' arrays first (``aggregate_arrayrecords``:
factors ``w_i / sum(w)``, then ``value * factor`` summed in reply order) and only then
applies its server optimiser (FedAvgM's momentum, FedAdam's moments, FedAvgMomentum).
Handing such a strategy every decoded reply holds one dense model per client. For the
classes in :data:`LINEAR`, qfl adds each accepted update into one running sum with
Flower's factors and reply order, a sparse update (top-k, rand-k) at its kept positions
only, and hands the inner strategy ONE reply carrying ``base + sum_i f_i * delta_i``, of
weight 1 (its own factor, ``1 / 1 = 1.0``, is exact; FedAvg and FedProx, whose
average of that one reply is the reply itself, are not called: :data:`AVERAGE_ONLY`). Flower's arithmetic,
``sum_i f_i * (base + delta_i)``, scales and adds the base once per reply; the two agree
up to float rounding, and the streaming sum is the closer one to the exact mean
(tests/test_aggregate.py measures both against float64). Per reply this costs the
decode and O(kept) work, not O(model): the server's time no longer grows with the
model's size times the number of clients. Train metrics are aggregated by the
strategy's own ``train_metrics_aggr_fn`` over the real replies (their MetricRecords
only: the arrays are still compressed), so they are unchanged. What differs: Flower's
log line "Received 1 results" counts the averaged reply. The :class:`UpdateGuard` needs
every norm of the round before it accepts any update, so the first pass decodes and
checks all replies and keeps the decoded updates while they fit in one model's bytes;
the others are decoded again here (figures in benchmarks/SCALE.md).

Every other strategy keeps the per-reply path, because it needs all replies at once:
Krum, MultiKrum and Bulyan compare them pairwise, FedTrimmedAvg and FedMedian sort them
element-wise, a differential-privacy wrapper clips each one, and a class qfl does not
know, a FedAvg subclass included, may override ``aggregate_train`` or what it calls.
A FedAvg subclass that keeps its base's aggregation (one that only overrides
``start()``, say) can say so with ``qfl_linear = True`` in its own class body; an
inherited value does not count, so a subclass of it decides again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
from flwr.supercore import log

from ..clients.records import array_record, decoded_record, new_array, numpy_array, numpy_record, numpy_views
from ..codec import (
    Delta,
    Run,
    SparseDelta,
    Tensors,
    apply_delta,
    decode_delta,
    dense,
    is_float,
    layout_of,
    numpy_memory_dtype,
    numpy_ok,
)
from ..memory import memory_dtype
from ._kernels import scatter_add
from .momentum import FedAvgMomentum
from .server import UNCHECKED, ServerProtocol

#: Strategy classes (exact classes, not their subclasses) whose ``aggregate_train`` is
#: FedAvg's weighted average followed by a server step on that average alone.
LINEAR: frozenset[type] = frozenset({FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgMomentum})

#: Of those, the classes whose ``aggregate_train`` is FedAvg's weighted average alone (the
#: proximal term of FedProx is the clients'): given one reply of weight 1, they return its
#: arrays unchanged (each value times 1.0, summed once). qfl hands back that reply's
#: arrays itself and skips the three model-sized copies Flower's average would make
#: (deserialise, scale, serialise); tests/test_aggregate.py checks it bit for bit.
AVERAGE_ONLY: frozenset[type] = frozenset({FedAvg, FedProx})

Aggregate = Callable[[int, Iterable[Message]], tuple[ArrayRecord | None, MetricRecord | None]]


def is_linear(kind: type) -> bool:
    """Whether replies to a strategy of class ``kind`` may be summed before it sees them."""
    return kind in LINEAR or (vars(kind).get("qfl_linear") is True and issubclass(kind, FedAvg))


class WeightedMean:
    """The weighted mean of the replies' models, ``base + sum_i f_i * delta_i`` with Flower's
    factors ``f_i = w_i / sum(w)``, built one reply at a time: the running sum of the
    updates is the only dense model held, and a sparse update is added at its kept
    positions only (O(kept), not O(model), per reply).

    Flower averages the rebuilt models, ``sum_i f_i * (base + delta_i)``. The two agree
    up to float rounding (``sum_i f_i`` is 1 within an ulp); summing the updates alone
    rounds less, since ``base`` is not scaled and added back once per reply
    (tests/test_aggregate.py measures both against a float64 reference). Tensors that
    carry values, not deltas (counters), are averaged with Flower's own arithmetic.
    """

    def __init__(self, base: Tensors, weights: list[float]) -> None:
        total = sum(weights)
        self.base = base
        self.factors = [w / total for w in weights]
        self.sums: dict[str, np.ndarray] = {}
        self.values: set[str] = set()
        #: One flat sum per run of tensors (:class:`~qfl.codec.Run`) whose members' sums
        #: in ``sums`` are views of it, by the run's names.
        self.packed: dict[tuple[str, ...], np.ndarray] = {}

    def add_update(self, update: Mapping[str, Delta], factor: float) -> None:
        """:meth:`add` for every tensor of one reply; an :class:`~qfl.codec.Update`'s runs
        one addition each (the same elementwise arithmetic as :meth:`add`'s)."""
        runs, rest = layout_of(update)
        for run in runs:
            total = self.packed.get(run.names)
            if total is None and self._packable(run):
                total = self.packed[run.names] = np.zeros(run.values.size, run.values.dtype)
                at = 0
                for k in run.names:
                    n = self.base[k].numel()
                    self.sums[k] = total[at : at + n]
                    at += n
            if total is not None and total.dtype == run.values.dtype and total.size == run.values.size:
                total += run.values * factor
            else:  # a layout the first reply did not have: member by member (into views)
                for k in run.names:
                    self.add(k, update[k], factor)
        for k in rest:
            self.add(k, update[k], factor)

    def _packable(self, run: Run) -> bool:
        """Whether a run's members can be summed in one flat array: none summed yet, each a
        float update summed in the run's dtype, the sizes adding up."""
        if any(k in self.sums for k in run.names):
            return False
        members = [self.base[k] for k in run.names]
        return sum(t.numel() for t in members) == run.values.size and all(
            is_float(t) and numpy_memory_dtype(t.dtype) == run.values.dtype for t in members
        )

    def add(self, key: str, delta: Delta, factor: float) -> None:
        t = self.base[key]
        if not (is_float(t) and is_float(delta)):
            value = apply_delta(t, dense(delta)).numpy() * factor
            self.values.add(key)
            if key in self.sums:
                self.sums[key] += value
            else:
                self.sums[key] = value
            return
        total = self.sums.get(key)
        if total is None:
            total = self.sums[key] = np.zeros(t.numel(), numpy_memory_dtype(t.dtype))
        if isinstance(delta, SparseDelta):
            # Positions are strictly increasing and within the tensor (checked when decoded):
            # each is added once, in one compiled pass (numpy's ufunc.at after scaling the
            # values took two, and a temporary).
            values = delta.values.detach().to(memory_dtype(t.dtype)).cpu().numpy()
            scatter_add(total, delta.indices.numpy(), values, total.dtype.type(factor))
        else:
            total += delta.reshape(-1).to(memory_dtype(t.dtype)).numpy() * factor

    def in_order(self) -> None:
        """Put the sums in the base model's order (replies are summed in the order their
        containers carry tensors, where a group's members come together): the mean's
        record and the strategy's model keep the model's order."""
        if list(self.sums) != [k for k in self.base if k in self.sums]:
            self.sums = {k: self.sums[k] for k in self.base if k in self.sums}

    def tensors(self) -> dict[str, np.ndarray]:
        """The mean of every tensor (counters averaged as Flower does)."""
        return {k: self.mean_of(k) for k in self.sums}

    def mean_of(self, key: str) -> np.ndarray:
        """The mean of one tensor."""
        if key in self.values:
            return np.asarray(self.sums[key])
        t = self.base[key]
        if t.dtype in (torch.float32, torch.float64) and numpy_ok(t):
            # apply_delta's addition (the sum is in the model's dtype), without its torch
            # round trip: a normalisation layer's small tensors are most of a ResNet's count.
            return np.add(t.detach().numpy().reshape(-1), self.sums[key]).reshape(tuple(t.shape))
        return apply_delta(t, torch.from_numpy(self.sums[key]).reshape(t.shape)).contiguous().numpy()

    def record(self) -> ArrayRecord:
        """The mean as Flower Arrays, each float tensor's ``base + sum`` written straight into
        its Array's bytes (numpy's add, the same operation as :meth:`mean_of`, without the
        copy :func:`numpy_record` makes of a finished mean)."""
        arrays = {}
        for k, total in self.sums.items():
            t = self.base[k]
            if k in self.values or t.dtype not in (torch.float32, torch.float64):  # sums of these are in their dtype
                arrays[k] = numpy_array(self.mean_of(k))
                continue
            out, finish = new_array(total.dtype, tuple(t.shape))
            np.add(t.detach().reshape(-1).numpy(), total, out=out.reshape(-1))
            arrays[k] = finish()
        return array_record(arrays)

    def numpy_base(self) -> dict[str, np.ndarray | None]:
        """The base tensors as numpy views: None where numpy has no dtype for one, and where
        the sum is of values rather than updates (``base + sum`` is not that tensor's mean:
        :meth:`mean_of` is)."""
        return {
            k: None if t.dtype == torch.bfloat16 or k in self.values else t.detach().numpy()
            for k, t in self.base.items()
        }


def aggregate_round(
    protocol: ServerProtocol, strategy: Strategy, kind: type, aggregate: Aggregate, server_round: int, replies
) -> tuple[ArrayRecord | None, MetricRecord | None]:
    """Check and decode the replies, aggregate them with ``aggregate`` (the inner
    strategy's ``aggregate_train``), streaming when ``kind`` :func:`is_linear`."""
    key = protocol.weight_key
    stream = key is not None and is_linear(kind)
    passed = protocol.train_replies(server_round, replies, rebuild=not stream)
    accepted = [m for m in passed if not m.has_error()] if stream else []
    metrics = None
    if accepted:
        contents = [m.content for m in accepted]
        # What Flower checks before it averages (same ArrayRecord and MetricRecord keys in
        # every reply); every compressed record has the same one key, so it applies as is.
        validate_message_reply_consistency(contents, key, check_arrayrecord=True)
        metrics = strategy.train_metrics_aggr_fn([RecordDict(dict(c.metric_records)) for c in contents], key)
        errors = [m for m in passed if m.has_error()]
        mean = mean_reply(protocol, accepted, key)
        done = _without_inner(strategy, kind, mean)
        if done is not None:
            # What FedAvg.aggregate_train logs, with the real number of replies.
            log(INFO, "aggregate_train: Received %s results and %s failures", len(accepted), len(errors))
            for msg in errors:
                log(INFO, "\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason)
            arrays, held, beyond = done
            traffic = protocol.traffic.at(server_round, "train")
            return protocol.finish_train(arrays, metrics, traffic, held, beyond)
        passed = [*errors, _as_reply(mean.tensors(), accepted[0], key)]
    arrays, inner_metrics = aggregate(server_round, passed)
    return protocol.finish_train(
        arrays, metrics if accepted else inner_metrics, protocol.traffic.at(server_round, "train")
    )


def _without_inner(
    strategy: Strategy, kind: type, mean: WeightedMean
) -> tuple[ArrayRecord, dict[str, np.ndarray], str | None | object] | None:
    """The inner strategy's result on the one averaged reply, as (arrays, the same as numpy
    arrays, the first tensor beyond range or :data:`.server.UNCHECKED`), when qfl can give
    it without Flower's round trip through serialised Arrays: :data:`AVERAGE_ONLY` returns
    the average itself, :class:`FedAvgMomentum` steps from the summed updates, checking
    the new model as it writes it (before its first model, FedAvgM's average alone).
    None for every other strategy."""
    if kind in AVERAGE_ONLY or (kind is FedAvgMomentum and strategy.current_arrays is None):
        arrays = mean.record()
        return arrays, numpy_views(arrays), UNCHECKED
    if kind is FedAvgMomentum:
        new, beyond = strategy.step_updates(mean.numpy_base(), mean.sums, mean.mean_of)
        return strategy.current_arrays, new, beyond
    return None


def mean_reply(protocol: ServerProtocol, accepted: list[Message], key: str) -> WeightedMean:
    """The weighted mean of the accepted (still compressed) replies' models; each update
    held from the first pass or decoded again."""
    base: Tensors = protocol.base
    weights = [next(iter(m.content.metric_records.values()))[key] for m in accepted]
    mean = WeightedMean(base, weights)
    limits = None
    for msg, factor in zip(accepted, mean.factors, strict=True):
        held = protocol.held.pop(id(msg), None)
        if held is not None:
            mean.add_update(held, factor)
            continue
        if limits is None:
            limits = {k: protocol.limits_for(t) for k, t in base.items()}
        # The reply passed every check with these very bytes: decoding is deterministic.
        # One container entry at a time (a group's small tensors together).
        for name, payloads in decoded_record(next(iter(msg.content.array_records.values())), limits):
            mean.add(name, decode_delta(payloads[0]), factor)
    mean.in_order()
    return mean


def _as_reply(tensors: dict[str, np.ndarray], first: Message, key: str) -> Message:
    """One reply carrying the mean, for an inner strategy qfl calls (built only then: its
    Arrays serialise the whole model)."""
    content = RecordDict(
        {
            next(iter(first.content.array_records)): numpy_record(tensors),
            # Its weight cancels (w / w = 1.0): 1, which no sum of huge weights can overflow.
            next(iter(first.content.metric_records)): MetricRecord({key: 1}),
        }
    )
    return Message(content=content, metadata=first.metadata)
