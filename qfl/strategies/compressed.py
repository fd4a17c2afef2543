"""``Compressed``: wrap any Flower strategy so both directions travel compressed."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from ..codec import apply_delta, check_against, nonfinite, norm
from ..compress import Operator
from ..records import Tensors, decode_record, record_bytes, to_record, to_tensors
from ..replica import DIGEST, REPLY_KEY, VERSION, Offer, ServerDownlink
from ..spec import Policy, parse_downlink
from ..wire import DEFAULT_LIMITS, STYPE, Limits, WireFormatError


@dataclass
class Traffic:
    """Bytes of one round and phase. ``*_full`` is what plain Flower would have sent."""

    downlink: int = 0
    downlink_full: int = 0
    uplink: int = 0
    uplink_full: int = 0
    messages: int = 0
    replies: int = 0
    resyncs: int = 0
    dropped: int = 0

    def metrics(self) -> dict[str, int]:
        """MetricRecord entries, keys prefixed ``qfl.``."""
        return {
            "qfl.downlink-bytes": self.downlink,
            "qfl.downlink-full-bytes": self.downlink_full,
            "qfl.uplink-bytes": self.uplink,
            "qfl.uplink-full-bytes": self.uplink_full,
            "qfl.resyncs": self.resyncs,
            "qfl.dropped": self.dropped,
        }


@dataclass
class TrafficLog:
    """Per (round, phase) traffic, accumulated over a run."""

    rounds: dict[tuple[int, str], Traffic] = field(default_factory=dict)

    def at(self, server_round: int, phase: str) -> Traffic:
        """The entry of one round and phase ("train" or "evaluate")."""
        return self.rounds.setdefault((server_round, phase), Traffic())

    def total(self) -> Traffic:
        """Sum over all rounds and phases."""
        out = Traffic()
        for t in self.rounds.values():
            for k, v in asdict(t).items():
                setattr(out, k, getattr(out, k) + v)
        return out


class Compressed(Strategy):
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

    def __init__(
        self,
        strategy: Strategy,
        *,
        uplink: str | Operator | None = None,
        downlink: str | Operator | None = None,
        error_feedback: bool = True,
        min_elements: int = 1024,
        uplink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_initial: str | Operator | None = None,
        history: int = 16,
        seed: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        max_update_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.strategy = strategy
        self.uplink = Policy.build(uplink, min_elements, uplink_overrides)
        mode, down_op = parse_downlink(downlink)
        initial = None if downlink_initial is None else Policy.build(downlink_initial, min_elements)
        self.downlink = ServerDownlink(mode, Policy.build(down_op, min_elements, downlink_overrides), history, seed,
                                       initial)
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)
        self.limits = limits
        self.max_update_norm = max_update_norm
        self.traffic = TrafficLog()
        # Names this strategy's client state (replica, error memory): a second strategy
        # in the same run, or a new run on long-lived nodes, must not inherit it.
        self.session = secrets.randbits(62)
        self._base: Tensors | None = None  # the model the current training round started from
        self._full_bytes = 0  # what plain Flower sends for that model
        self._warned = False

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
        return self._compress_messages(server_round, "train", messages, model, arrays)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Evaluation messages carry the model too: compressed the same way."""
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        return self._compress_messages(server_round, "evaluate", messages, to_tensors(arrays), arrays)

    def client_fields(self, server_round: int) -> dict:
        """ConfigRecord entries every client needs (uplink policy, memory, seed)."""
        return {
            **self.uplink.to_config("qfl.uplink"),
            "qfl.error-feedback": self.error_feedback,
            "qfl.seed": self.seed,
            "qfl.round": server_round,
            "qfl.session": self.session,
        }

    def _compress_messages(self, server_round: int, phase: str, messages: list[Message], model: Tensors,
                           arrays: ArrayRecord) -> list[Message]:
        traffic = self.traffic.at(server_round, phase)
        if not messages:
            return messages
        self._warn_once(model)
        self.downlink.update(model)
        full = record_bytes(arrays)
        common = self.client_fields(server_round)
        built: dict[tuple[int, int], RecordDict] = {}
        for msg in messages:
            offer = self.downlink.offer(msg.metadata.dst_node_id)
            key = (id(msg.content), id(offer))
            if key not in built:
                built[key] = self._content(msg.content, offer, common)
            # Replace (never mutate) the content: the inner strategy shares one RecordDict.
            msg.content = built[key]
            traffic.downlink += record_bytes(offer.record)
            traffic.downlink_full += full
            traffic.messages += 1
            traffic.resyncs += offer.kind == "full"
        return messages

    def _content(self, content: RecordDict, offer: Offer, common: dict) -> RecordDict:
        akey = _model_key(content)
        ckeys = list(content.config_records.keys())
        ckey = ckeys[0] if len(ckeys) == 1 else "config"
        if len(ckeys) > 1:
            raise ValueError(f"qfl expects at most one ConfigRecord in a message, found {ckeys}")
        cfg = ConfigRecord(dict(content[ckey])) if ckey in content else ConfigRecord()
        cfg.update({**common, **offer.fields, "qfl.key": akey})
        new = RecordDict({k: v for k, v in content.items()})
        new[akey] = offer.record
        new[ckey] = cfg
        return new

    def _warn_once(self, model: Tensors) -> None:
        if self._warned or not self.error_feedback:
            return
        self._warned = True
        for name, t in model.items():
            props = self.uplink.operator_for(name, t).properties(t.numel())
            if props.unbiased and (props.variance or 0.0) >= 1.0:
                log(WARNING, "qfl: error feedback with %s on %s (variance factor %.3g >= 1) can diverge; "
                    "use error_feedback=False for unbiased compressors or a contraction (top-k, sign, damped)",
                    self.uplink.operator_for(name, t), name, props.variance)
                return

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
                self.downlink.forget(msg.metadata.src_node_id)
                rebuilt.append(msg)  # the inner strategy logs and skips failures
                continue
            traffic.uplink += sum(record_bytes(r) for r in msg.content.array_records.values())
            traffic.uplink_full += self._full_bytes
            try:
                rebuilt.append(self.rebuild(msg, self._base))
            except (WireFormatError, ValueError) as exc:
                traffic.dropped += 1
                self.downlink.forget(msg.metadata.src_node_id)
                log(WARNING, "qfl: dropped the reply of node %s in round %s: %s",
                    msg.metadata.src_node_id, server_round, exc)
        arrays, metrics = self.strategy.aggregate_train(server_round, rebuilt)
        return arrays, _with_traffic(metrics, traffic)

    def rebuild(self, msg: Message, base: Tensors) -> Message:
        """A reply with its compressed delta replaced by ``base + delta`` (ordinary arrays).

        Raises WireFormatError or ValueError (with the reason) for a reply that must
        not reach aggregation: undecodable, another operator or shape than configured,
        other tensors than the model's, NaN/Inf, or an update norm above the limit.
        """
        content = msg.content
        info = content.get(REPLY_KEY)
        if not isinstance(info, ConfigRecord):
            raise ValueError("the reply carries no qfl record: is compression_mod attached to the ClientApp?")
        keys = [k for k, r in content.array_records.items() if any(a.stype == STYPE for a in r.values())]
        if len(keys) != 1:
            raise ValueError(f"expected exactly one compressed ArrayRecord in the reply, found {len(keys)}")
        akey = keys[0]
        payloads = decode_record(content[akey], self.limits)
        if payloads.keys() != base.keys():
            missing, extra = sorted(base.keys() - payloads.keys()), sorted(payloads.keys() - base.keys())
            raise ValueError(f"the reply's tensors differ from the model's (missing {missing}, unexpected {extra})")
        delta = {}
        for name, ps in payloads.items():
            if len(ps) != 1:
                raise ValueError(f"{name}: {len(ps)} payloads, expected 1")
            check_against(name, ps[0], base[name], self.uplink)
            delta[name] = ps[0].decompress()
        bad = nonfinite(delta)
        if bad is not None:
            raise ValueError(f"the update of {bad} contains NaN or Inf")
        if self.max_update_norm is not None and (n := norm(delta)) > self.max_update_norm:
            raise ValueError(f"update norm {n:.4g} exceeds max_update_norm={self.max_update_norm:.4g}")
        self._acknowledge(msg, info)
        new = RecordDict({k: v for k, v in content.items() if k != REPLY_KEY})
        new[akey] = to_record({k: apply_delta(base[k], delta[k]) for k in base})
        return Message(content=new, metadata=msg.metadata)

    def _acknowledge(self, msg: Message, info: ConfigRecord) -> None:
        if VERSION in info and DIGEST in info:
            ok = self.downlink.acknowledge(msg.metadata.src_node_id, int(info[VERSION]), int(info[DIGEST]))
            if not ok:
                log(WARNING, "qfl: node %s reports replica version %s with an unknown digest; it will be resynced",
                    msg.metadata.src_node_id, info[VERSION])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record what clients report about their replica, then let the inner strategy aggregate."""
        traffic = self.traffic.at(server_round, "evaluate")
        cleaned = []
        for msg in replies:
            traffic.replies += 1
            if msg.has_error():
                self.downlink.forget(msg.metadata.src_node_id)
                cleaned.append(msg)
                continue
            info = msg.content.get(REPLY_KEY)
            if isinstance(info, ConfigRecord):
                self._acknowledge(msg, info)
                new = RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY})
                msg = Message(content=new, metadata=msg.metadata)
            cleaned.append(msg)
        metrics = self.strategy.aggregate_evaluate(server_round, cleaned)
        return _with_traffic(metrics, traffic)


def _model_key(content: RecordDict) -> str:
    keys = list(content.array_records.keys())
    if len(keys) != 1:
        raise ValueError(f"qfl expects exactly one ArrayRecord (the model) in a message, found {keys}")
    return keys[0]


def _with_traffic(metrics: MetricRecord | None, traffic: Traffic) -> MetricRecord:
    out = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
    out.update(traffic.metrics())
    return out


__all__ = ["Compressed", "Traffic", "TrafficLog"]
