"""Aggregating train replies one at a time: server memory O(model), not O(clients x model).

Flower's FedAvg family averages the replies' arrays first (``aggregate_arrayrecords``:
factors ``w_i / sum(w)``, then ``value * factor`` summed in reply order) and only then
applies its server optimiser (FedAvgM's momentum, FedAdam's moments, FedAvgMomentum).
Handing such a strategy every decoded reply holds one dense model per client. For the
classes in :data:`LINEAR`, qfl decodes each accepted reply again, tensor by tensor, and
adds it into one running sum with Flower's arithmetic in Flower's order; the inner
strategy then gets ONE reply carrying that average, of weight 1. Its own factor is
``1 / 1 = 1.0``, and multiplying by 1.0 is exact, so the model it returns is
bit-identical to the per-reply path (tests/test_aggregate.py compares the two). Train
metrics are aggregated by the strategy's own ``train_metrics_aggr_fn`` over the real
replies (their MetricRecords only: the arrays are still compressed), so they are
unchanged too. What differs: Flower's log line "Received 1 results" counts the averaged
reply, and each accepted update is decoded twice (once for the :class:`UpdateGuard`'s
norms, which must all be known before any update is accepted, once to add it; figures
in benchmarks/SCALE.md).

Every other strategy keeps the per-reply path, because it needs all replies at once:
Krum, MultiKrum and Bulyan compare them pairwise, FedTrimmedAvg and FedMedian sort them
element-wise, a differential-privacy wrapper clips each one, and a class qfl does not
know, a FedAvg subclass included, may override ``aggregate_train`` or what it calls.
A FedAvg subclass that keeps its base's aggregation (one that only overrides
``start()``, say) can say so with ``qfl_linear = True`` in its own class body; an
inherited value does not count, so a subclass of it decides again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from ..clients.records import record_blobs
from ..codec import Tensors, apply_delta
from ..wire import decode_all
from .momentum import FedAvgMomentum
from .server import ServerProtocol

#: Strategy classes (exact classes, not their subclasses) whose ``aggregate_train`` is
#: FedAvg's weighted average followed by a server step on that average alone.
LINEAR: frozenset[type] = frozenset({FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgMomentum})

Aggregate = Callable[[int, Iterable[Message]], tuple[ArrayRecord | None, MetricRecord | None]]


def is_linear(kind: type) -> bool:
    """Whether replies to a strategy of class ``kind`` may be summed before it sees them."""
    return kind in LINEAR or (vars(kind).get("qfl_linear") is True and issubclass(kind, FedAvg))


class WeightedMean:
    """Flower's ``aggregate_arrayrecords`` fed one tensor at a time (same factors, same
    operations, same order), so that the sum is the only dense model held."""

    def __init__(self, weights: list[float]) -> None:
        total = sum(weights)
        self.factors = [w / total for w in weights]
        self.sums: dict[str, np.ndarray] = {}

    def add(self, key: str, value: np.ndarray, factor: float) -> None:
        if key not in self.sums:
            self.sums[key] = value * factor
        else:
            self.sums[key] += value * factor

    def record(self) -> ArrayRecord:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in self.sums.items()})


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
        passed = [*(m for m in passed if m.has_error()), mean_reply(protocol, accepted, key)]
    arrays, inner_metrics = aggregate(server_round, passed)
    return protocol.finish_train(
        arrays, metrics if accepted else inner_metrics, protocol.traffic.at(server_round, "train")
    )


def mean_reply(protocol: ServerProtocol, accepted: list[Message], key: str) -> Message:
    """One reply holding the weighted mean of the accepted (still compressed) replies,
    each decoded again tensor by tensor and rebuilt on the round's model."""
    base: Tensors = protocol.base
    weights = [next(iter(m.content.metric_records.values()))[key] for m in accepted]
    mean = WeightedMean(weights)
    for msg, factor in zip(accepted, mean.factors, strict=True):
        blobs = record_blobs(next(iter(msg.content.array_records.values())), base)
        for name, t in base.items():
            # The reply passed every check with these very bytes: decoding is deterministic.
            delta = decode_all(blobs[name], protocol.limits_for(t))[0].decompress()
            mean.add(name, apply_delta(t, delta).numpy(), factor)
    first = accepted[0].content
    content = RecordDict(
        {
            next(iter(first.array_records)): mean.record(),
            # Its weight cancels (w / w = 1.0): 1, which no sum of huge weights can overflow.
            next(iter(first.metric_records)): MetricRecord({key: 1}),
        }
    )
    return Message(content=content, metadata=accepted[0].metadata)
