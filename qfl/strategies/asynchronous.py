"""Asynchronous compressed federated learning on Flower's Grid.

Both Qsparse-local-SGD (Basu et al.) and AsyLPG (Yu, Wu, Huang) come with asynchronous
versions: workers synchronise on their own schedule and the server applies each
compressed update when it arrives, as long as it is not too stale. This strategy does
that with ``grid.push_messages`` / ``grid.pull_messages`` (no round barrier):

* it keeps up to ``concurrency`` clients busy, handing each idle node the current model
  (compressed exactly as in :class:`Compressed`: the node's downlink replica may be
  several versions old, it then receives the chain of steps since its version);
* each reply is decoded and checked like a synchronous one, then added into one running
  sum (a sparse update at its kept positions only); every ``buffer_size`` updates
  (FedBuff, Nguyen et al. 2022; 1 = apply at once, FedAsync) the server model moves by
  ``server_lr * sum_i n_i (1 + s_i)^-a delta_i / sum_i n_i``, where s_i is the number of
  server versions since client i's model was sent (staleness) and n_i its example
  count (the polynomial staleness weight of FedAsync, Xie et al. 2019);
* updates with staleness above ``max_staleness`` are rejected (counted, not applied);
  failed replies and clients silent for longer than ``message_timeout`` free their slot.

State is bounded: at most ``concurrency`` jobs, one model-sized sum however large
``buffer_size`` (not one decoded update per buffered reply: server memory O(model), as
the synchronous server's streaming aggregation, :mod:`qfl.strategies.aggregate`), plus
the downlink's bounded history.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from ..clients.records import record_bytes, to_record, to_tensors
from ..codec import MAX_VALUE, Deltas, Tensors, apply_delta, dense, is_float, norm
from .aggregate import WeightedMean
from .compressed import compression_settings
from .replies import beyond_range, full_uplink
from .server import ServerProtocol, without_mod
from .traffic import with_traffic


@dataclass
class _Job:
    node: int
    version: int  # server version of the model it was sent
    sent: float  # time.monotonic() at dispatch


@dataclass
class AsyncStats:
    """Counts of one asynchronous run."""

    dispatched: int = 0
    accepted: int = 0
    applied: int = 0
    stale: int = 0
    failed: int = 0
    dropped: int = 0
    timed_out: int = 0
    staleness_sum: int = 0


class AsyncCompressed(ServerProtocol):
    """Asynchronous strategy with compressed uplink and downlink (see module docstring).

    Parameters
    ----------
    concurrency : int
        Clients kept busy at once (M).
    buffer_size : int
        Updates aggregated per server step (K).
    max_staleness : int
        Updates computed on a model more than this many versions old are rejected (tau).
    staleness_exponent : float
        a in the weight (1 + s)^-a; 0 ignores staleness.
    server_lr : float
        Step size of the server update.
    message_timeout : float
        Seconds after which a silent client's slot is freed (also the messages' TTL).
    poll_interval : float
        Pause between pulls when nothing arrived.
    seed : int
        Seeds client selection and compression.
    max_unusable : int or None
        The run stops with a RuntimeError naming the last problem when this many replies
        in a row (failures, dropped replies and clients timed out) brought no usable
        update: otherwise it would wait forever for ``num_updates`` (or end at
        ``max_time`` with the model unchanged). None keeps waiting.
    **compression
        As for :class:`Compressed` (uplink, downlink, error_feedback, min_elements, ...).
    """

    def __init__(
        self,
        *,
        concurrency: int = 4,
        buffer_size: int = 1,
        max_staleness: int = 8,
        staleness_exponent: float = 0.5,
        server_lr: float = 1.0,
        message_timeout: float = 600.0,
        poll_interval: float = 0.05,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        seed: int = 0,
        max_unusable: int | None = 100,
        **compression: Any,
    ) -> None:
        super().__init__(**compression_settings("AsyncCompressed()", {**compression, "seed": seed}))
        if concurrency < 1 or buffer_size < 1 or max_staleness < 0:
            raise ValueError(
                "concurrency and buffer_size must be >= 1 and max_staleness >= 0, got "
                f"{concurrency}, {buffer_size}, {max_staleness}"
            )
        if max_unusable is not None and max_unusable < 1:
            raise ValueError(f"max_unusable must be >= 1 or None, got {max_unusable}")
        self.max_unusable = max_unusable
        self._unusable = 0  # replies in a row without a usable update
        self.concurrency, self.buffer_size, self.max_staleness = concurrency, buffer_size, max_staleness
        self.staleness_exponent, self.server_lr = staleness_exponent, server_lr
        self.message_timeout, self.poll_interval = message_timeout, poll_interval
        self.weighted_by_key, self.arrayrecord_key, self.configrecord_key = (
            weighted_by_key,
            arrayrecord_key,
            configrecord_key,
        )
        self.rng = random.Random(seed)
        self.stats = AsyncStats()
        self.version = 0
        self.jobs: dict[str, _Job] = {}  # message id -> job
        # The buffered updates: sum_i n_i (1 + s_i)^-a delta_i (None when empty), how many,
        # sum_i n_i, and the newest value of each tensor that carries values (counters).
        self._sum: WeightedMean | None = None
        self.buffered = 0
        self._examples = 0.0
        self._newest: dict[str, torch.Tensor] = {}
        # Nodes whose replies showed no compression_mod since the last reply that did, and
        # how many nodes a dispatch last saw: see _misconfigured.
        self._unmodded: dict[int, str] = {}
        self._pool = 0

    def summary(self) -> None:
        """Log the settings."""
        log(
            INFO,
            "\t├──> qfl asynchronous: %d clients busy, buffer %d, max staleness %d, weight (1+s)^-%g",
            self.concurrency,
            self.buffer_size,
            self.max_staleness,
            self.staleness_exponent,
        )
        log(INFO, "\t├── uplink: %s (error feedback: %s)", self.uplink.op, self.error_feedback)
        log(INFO, "\t└── downlink: %s | %s", self.downlink.mode, self.downlink.policy.op)

    # -------------------------------------------------------------------- run
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_updates: int,
        *,
        train_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        evaluate_every: int = 1,
        max_time: float | None = None,
    ) -> Result:
        """Run until ``num_updates`` server versions were applied (or ``max_time`` seconds).

        ``evaluate_fn(version, arrays)`` runs on version 0 and every ``evaluate_every``
        versions, like Flower's centralised evaluation. Returns a Flower ``Result``
        whose per-"round" entries are server versions.
        """
        self.summary()
        result = Result()
        model = to_tensors(initial_arrays)
        full_bytes = record_bytes(initial_arrays)
        config = dict(train_config or {})
        started = time.monotonic()
        if evaluate_fn is not None and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        last_evaluated = 0
        while self.version < num_updates and (max_time is None or time.monotonic() - started < max_time):
            self._dispatch(grid, model, full_bytes, config)
            replies = list(grid.pull_messages(list(self.jobs))) if self.jobs else []
            for reply in replies:
                if self.version >= num_updates:
                    break  # done: later replies arrived too late to matter
                model = self._receive(reply, model, full_bytes)
            self._expire()
            if self.version - last_evaluated >= evaluate_every or (self.version >= num_updates > last_evaluated):
                last_evaluated = self.version
                arrays = to_record(model)
                result.arrays = arrays
                result.train_metrics_clientapp[self.version] = self._metrics()
                if evaluate_fn is not None and (res := evaluate_fn(self.version, arrays)) is not None:
                    result.evaluate_metrics_serverapp[self.version] = res
            if not replies:
                time.sleep(self.poll_interval)
        result.arrays = to_record(model)
        log(INFO, "qfl async: %d versions in %.1f s; %s", self.version, time.monotonic() - started, self.stats)
        return result

    def _dispatch(self, grid: Grid, model: Tensors, full_bytes: int, config: dict) -> None:
        busy = {job.node for job in self.jobs.values()}
        nodes = list(grid.get_node_ids())
        self._pool = len(nodes)
        idle = [n for n in nodes if n not in busy]
        self.rng.shuffle(idle)
        chosen = idle[: max(0, self.concurrency - len(self.jobs))]
        if not chosen:
            return
        cfg = ConfigRecord({**config, "server-round": self.version})
        # The model itself goes in compress_messages; an empty record marks its key.
        content = RecordDict({self.arrayrecord_key: ArrayRecord(), self.configrecord_key: cfg})
        messages = [
            Message(
                content=content,
                dst_node_id=n,
                message_type=MessageType.TRAIN,
                group_id=str(self.version),
                ttl=self.message_timeout,
            )
            for n in chosen
        ]
        self.compress_messages(self.version, self.traffic.at(self.version, "train"), messages, model, full_bytes)
        now = time.monotonic()
        for msg_id, msg in zip(grid.push_messages(messages), messages, strict=True):
            self.jobs[msg_id] = _Job(msg.metadata.dst_node_id, self.version, now)
            self.stats.dispatched += 1

    def _receive(self, reply: Message, model: Tensors, full_bytes: int) -> Tensors:
        job = self.jobs.pop(reply.metadata.reply_to_message_id, None)
        if job is None:
            return model  # a reply we stopped waiting for
        traffic = self.traffic.at(self.version, "train")
        traffic.replies += 1
        if reply.has_error():
            self.stats.failed += 1
            traffic.failures += 1
            self.downlink.forget(job.node)
            log(WARNING, "qfl async: node %s failed: %s", job.node, reply.error.reason)
            if (why := without_mod(reply)) is not None:
                self._misconfigured(job.node, why)
            self._no_update(f"node {job.node} failed: {reply.error.reason}")
            return model
        traffic.uplink += sum(record_bytes(r) for r in reply.content.array_records.values())
        traffic.uplink_full += full_uplink(reply, full_bytes)
        why = without_mod(reply)
        modded = why is None
        if modded:
            self._unmodded.clear()
        else:
            self._misconfigured(job.node, why)
        staleness = self.version - job.version
        if staleness > self.max_staleness:
            if modded:  # a trained update, late: the clients work
                self._unusable = 0
            else:
                self._no_update(f"node {job.node} replied without qfl's record")
            self.stats.stale += 1
            self.strip(reply)  # its replica report is still good news for the downlink
            log(
                INFO,
                "qfl async: rejected an update of staleness %d (> %d) from node %s",
                staleness,
                self.max_staleness,
                job.node,
            )
            return model
        try:
            _, delta, info = self.decode_update(reply, model, sparse=True)
            # The model the update makes, checked one tensor at a time without building it
            # (as the synchronous server does): a model-sized copy per reply for nothing.
            bad = beyond_range(model, delta)
            if bad is not None:
                raise ValueError(f"the update takes {bad} beyond {MAX_VALUE:.3g}")
        except (ValueError, TypeError, OverflowError) as exc:  # WireFormatError, ProtocolError, ...
            self.stats.dropped += 1
            self._drop(traffic, reply, exc, self.version)
            self._no_update(f"the reply of node {job.node} was dropped: {exc}")
            return model
        if not self.screen(traffic, [(reply, norm(delta))], self.version):
            self.stats.dropped += 1
            self._no_update(f"the update of node {job.node} failed the norm checks (UpdateGuard, clipping)")
            return model
        self._unusable = 0
        self.acknowledge(reply, info)
        traffic.client_state_bytes = max(traffic.client_state_bytes, info.state_bytes)
        n = _examples(reply, self.weighted_by_key)
        self._buffer(model, delta, n * (1 + staleness) ** -self.staleness_exponent, n)
        self.stats.staleness_sum += staleness
        self.stats.accepted += 1
        if self.buffered < self.buffer_size:
            return model
        model = self._step(model)
        self.version += 1
        self.stats.applied += 1
        return model

    def _buffer(self, model: Tensors, delta: Deltas, weight: float, examples: float) -> None:
        """Add one accepted update into the running sum, with its staleness-weighted weight."""
        if self._sum is None:
            # Its round factors go unused: each update is added with its own weight, and the
            # total of the examples, known only when the buffer is full, divides in _step.
            self._sum = WeightedMean(model, [1.0])
        self._sum.add_update(delta, weight)
        self._newest.update({k: dense(d) for k, d in delta.items() if not (is_float(model[k]) and is_float(d))})
        self.buffered += 1
        self._examples += examples

    def _step(self, model: Tensors) -> Tensors:
        """The next model, ``model + server_lr * sum_i n_i (1 + s_i)^-a delta_i / sum_i n_i``;
        a tensor that carries values (a counter) takes the newest reply's. Empties the buffer."""
        assert self._sum is not None
        scale = self.server_lr / self._examples
        new = {}
        for k, t in model.items():
            if k in self._newest:
                new[k] = apply_delta(t, self._newest[k])
            else:
                new[k] = apply_delta(t, torch.from_numpy(self._sum.sums[k] * scale).reshape(t.shape))
        self._sum, self.buffered, self._examples, self._newest = None, 0, 0.0, {}
        return new

    def _misconfigured(self, node: int, reason: str) -> None:
        """Stop the run when every node that could be busy showed no ``compression_mod``.

        Without it no reply is ever usable: the run would wait for ``num_updates`` that
        never come (or end at ``max_time`` with the initial model). As in a synchronous
        round none of whose replies could be used, that is a MisconfigurationError, here
        once as many distinct nodes as can be busy at once (``concurrency``, at most the
        nodes connected) replied so since the last reply that carried qfl's record. A few
        such nodes among working ones are dropped and logged.
        """
        self._unmodded[node] = reason
        if len(self._unmodded) >= max(1, min(self.concurrency, self._pool)):
            self.check_misconfigured(self.version, "train", list(self._unmodded.values()), usable=0)

    def _no_update(self, problem: str) -> None:
        """Count a reply (or a silence) that brought no usable update; stop the run at
        ``max_unusable`` in a row, when nothing suggests the next one will."""
        self._unusable += 1
        if self.max_unusable is not None and self._unusable >= self.max_unusable:
            raise RuntimeError(
                f"qfl async: the last {self._unusable} replies (or timeouts) brought no usable update "
                f"({self.stats.failed} failed, {self.stats.dropped} dropped, {self.stats.timed_out} timed out "
                f"in the run; the last: {problem}). Fix the ClientApp or the clients' settings, or pass "
                "AsyncCompressed(max_unusable=None) to keep waiting."
            )

    def _expire(self) -> None:
        now = time.monotonic()
        for mid, job in list(self.jobs.items()):
            if now - job.sent > self.message_timeout:
                del self.jobs[mid]
                self.stats.timed_out += 1
                self.downlink.forget(job.node)
                log(WARNING, "qfl async: node %s did not answer within %.0f s", job.node, self.message_timeout)
                self._no_update(f"node {job.node} did not answer within {self.message_timeout:.0f} s")

    def _metrics(self) -> MetricRecord:
        s = self.stats
        metrics = MetricRecord(
            {
                "qfl.applied": s.applied,
                "qfl.stale": s.stale,
                "qfl.failed": s.failed,
                "qfl.timed-out": s.timed_out,
                "qfl.mean-staleness": s.staleness_sum / max(1, s.accepted),
            }
        )
        return with_traffic(metrics, self.traffic.total())

    def state_size(self) -> dict[str, int]:
        """Bounded server state: jobs in flight, buffered updates and the bytes of their one
        sum, downlink history."""
        held = sum(a.nbytes for a in self._sum.sums.values()) if self._sum is not None else 0
        return {"jobs": len(self.jobs), "buffered": self.buffered, "buffer_bytes": held, **self.downlink.state_size()}


def _examples(reply: Message, key: str) -> float:
    for record in reply.content.metric_records.values():
        if key in record and not isinstance(record[key], list):
            return float(record[key])
    return 1.0
