"""``Compressed``: wrap any Flower strategy so both directions travel compressed."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..codec import apply_delta
from ..records import Tensors, record_bytes, to_record, to_tensors
from ..replica import REPLY_KEY
from ..wire import WireFormatError
from .protocol import ServerProtocol, Traffic, TrafficLog, with_traffic


class Compressed(ServerProtocol, Strategy):
    """Compress the model on the downlink and the updates on the uplink of any strategy.

    The wrapper delegates sampling, configuration and aggregation to ``strategy``
    (FedAvg, FedAvgM, FedAdam, FedProx, FedTrimmedAvg, ...): it only rewrites the
    model in outgoing messages and rebuilds ordinary ArrayRecords (server model +
    decoded client delta) from incoming replies, so the inner strategy runs unchanged.
    Clients need :func:`qfl.clients.compression_mod`; the settings travel in each
    message's ConfigRecord.

    Parameters
    ----------
    strategy : Strategy
        The strategy to wrap.
    uplink : str or Operator, optional
        Pipeline for client updates, e.g. ``"topk(0.01) | qsgd(levels=16)"``. None
        sends updates in full precision (losslessly).
    downlink : str or Operator, optional
        Pipeline for the model, optionally prefixed by a mode: ``"delta | qsgd(256)"``
        (stateful: compressed difference to the clients' replica, server-side error
        feedback, versioned, resync when needed) or ``"model | grid(8)"`` (stateless:
        the model itself quantized, as in AsyLPG). Without a prefix: ``model``. None
        sends the model losslessly.
    error_feedback : bool (default: True)
        Clients keep the uplink residual (error memory) and add it to the next update.
        Needed for biased compressors (top-k, sign); harmful for unbiased ones with a
        variance factor of 1 or more (a warning says so).
    min_elements : int (default: 1024)
        Tensors smaller than this pass through losslessly (biases, norm layers).
    uplink_overrides, downlink_overrides : mapping of str to str or Operator, optional
        Per tensor-name (fnmatch pattern) pipelines that replace the default.
    downlink_initial : str or Operator, optional
        Delta mode: compress the first model with this (e.g. ``"grid(8)"``) to make the
        clients' first replica; error feedback sends the difference later. Clients that
        join later resync from this checkpoint plus the steps since, when cheaper than
        the replica in full. None: the first replica is the model, losslessly.
    history : int (default: 16)
        Delta mode: downlink versions kept; a client further behind gets a resync.
    seed : int (default: 0)
        Seeds server-side compression and, per round and client, client-side compression.
    limits : qfl.wire.Limits
        Decoder limits for client replies.
    max_update_norm : float, optional
        Replies whose decoded update has a larger l2 norm are dropped.
    """

    def __init__(self, strategy: Strategy, **compression: Any) -> None:
        ServerProtocol.__init__(self, **compression)
        self.strategy = strategy
        self._base: Tensors | None = None  # the model the current training round started from
        self._full_bytes = 0  # what plain Flower sends for that model

    # ------------------------------------------------------------------ summary
    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's summary."""
        log(INFO, "\t├──> qfl compression:")
        log(INFO, "\t│\t├── uplink: %s (error feedback: %s)", self.uplink.op, self.error_feedback)
        log(INFO, "\t│\t├── downlink: %s | %s", self.downlink.mode, self.downlink.policy.op)
        log(INFO, "\t│\t└── tensors below %d elements pass through", self.uplink.min_elements)
        self.strategy.summary()

    # ----------------------------------------------------------------- downlink
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Let the inner strategy configure, then compress the model in its messages."""
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        model = to_tensors(arrays)
        self._base, self._full_bytes = model, record_bytes(arrays)
        return self.compress_messages(server_round, self.traffic.at(server_round, "train"), messages, model,
                                      self._full_bytes)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Evaluation messages carry the model too: compressed the same way."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        if not messages:  # e.g. fraction_evaluate=0: nothing to send, nothing to count
            return messages
        return self.compress_messages(server_round, self.traffic.at(server_round, "evaluate"), messages,
                                      to_tensors(arrays), record_bytes(arrays))

    # ------------------------------------------------------------------- uplink
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every reply into server model + delta, then aggregate with the inner strategy."""
        traffic = self.traffic.at(server_round, "train")
        if self._base is None:
            raise RuntimeError("aggregate_train called before configure_train")
        rebuilt = []
        for msg in replies:
            traffic.replies += 1
            if msg.has_error():
                traffic.failures += 1
                self.downlink.forget(self.node_of(msg))
                rebuilt.append(msg)  # the inner strategy logs and skips failures
                continue
            traffic.uplink += sum(record_bytes(r) for r in msg.content.array_records.values())
            traffic.uplink_full += self.full_uplink(msg, self._full_bytes)
            try:
                rebuilt.append(self.rebuild(msg, self._base))
                self.record_state(traffic, msg)
            except (WireFormatError, ValueError) as exc:
                traffic.dropped += 1
                self.downlink.forget(msg.metadata.src_node_id)
                log(WARNING, "qfl: dropped the reply of node %s in round %s: %s",
                    msg.metadata.src_node_id, server_round, exc)
        if traffic.missing:
            log(WARNING, "qfl: %d of %d nodes did not reply in round %s", traffic.missing, traffic.messages,
                server_round)
        arrays, metrics = self.strategy.aggregate_train(server_round, rebuilt)
        return arrays, with_traffic(metrics, traffic)

    def rebuild(self, msg: Message, base: Tensors) -> Message:
        """A reply with its compressed delta replaced by ``base + delta`` (ordinary arrays),
        what the inner strategy aggregates; raises like :meth:`decode_update`."""
        akey, delta = self.decode_update(msg, base)
        new = RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY})
        new[akey] = to_record({k: apply_delta(base[k], delta[k]) for k in base})
        return Message(content=new, metadata=msg.metadata)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record what clients report about their replica, then let the inner strategy aggregate."""
        replies = list(replies)
        if not replies and (server_round, "evaluate") not in self.traffic.rounds:
            return self.strategy.aggregate_evaluate(server_round, replies)  # no evaluation this round
        traffic = self.traffic.at(server_round, "evaluate")
        cleaned = []
        for msg in replies:
            traffic.replies += 1
            if msg.has_error():
                traffic.failures += 1
                self.downlink.forget(self.node_of(msg))
                cleaned.append(msg)
            else:
                self.record_state(traffic, msg)
                cleaned.append(self.strip(msg))
        metrics = self.strategy.aggregate_evaluate(server_round, cleaned)
        return with_traffic(metrics, traffic)


__all__ = ["Compressed", "Traffic", "TrafficLog"]
