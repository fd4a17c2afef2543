"""The server half of the qfl protocol, shared by the synchronous and asynchronous strategies.

It owns the uplink policy, the downlink (:class:`qfl.replica.ServerDownlink`), the byte
accounting and the checks every reply must pass. Strategies decide *when* to send and
*how* to aggregate; this class decides *what* goes on the wire and what comes back.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from logging import WARNING

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from ..codec import check_against, nonfinite, norm
from ..compress import Operator
from ..records import Tensors, decode_record, record_bytes
from ..replica import DIGEST, FULL_BYTES, REPLY_KEY, STATE_BYTES, VERSION, Offer, ServerDownlink
from ..spec import MIN_ELEMENTS, Policy, parse_downlink
from ..wire import DEFAULT_LIMITS, STYPE, Limits
#: Message ids remembered to attribute the SuperLink's error replies (a few rounds' worth).
_REMEMBERED = 65536


@dataclass
class Traffic:
    """Bytes of one round and phase. ``*_full`` is what plain Flower would have sent.

    ``resyncs`` counts messages that carried a full model (first contact, or a replica
    the server could not vouch for), ``dropped`` replies that were refused (undecodable
    or invalid), ``failures`` error replies (the node failed, went away or could not
    rebuild the model; the server resyncs it next time).
    """

    downlink: int = 0
    downlink_full: int = 0
    uplink: int = 0
    uplink_full: int = 0
    messages: int = 0
    replies: int = 0
    resyncs: int = 0
    dropped: int = 0
    failures: int = 0
    client_state_bytes: int = 0

    @property
    def missing(self) -> int:
        """Messages without a reply (the node timed out or vanished)."""
        return max(self.messages - self.replies, 0)

    def metrics(self) -> dict[str, int]:
        """MetricRecord entries, keys prefixed ``qfl.``.

        Besides the fields: ``qfl.missing``, messages without a reply (the node did not
        answer before the round's timeout), and ``qfl.client-state-bytes``, the largest
        ``context.state`` (replica and error memory) a reply reported.
        """
        return {
            "qfl.downlink-bytes": self.downlink,
            "qfl.downlink-full-bytes": self.downlink_full,
            "qfl.uplink-bytes": self.uplink,
            "qfl.uplink-full-bytes": self.uplink_full,
            "qfl.resyncs": self.resyncs,
            "qfl.dropped": self.dropped,
            "qfl.failures": self.failures,
            "qfl.missing": self.missing,
            "qfl.client-state-bytes": self.client_state_bytes,
        }


@dataclass
class TrafficLog:
    """Per (round, phase) traffic, accumulated over a run."""

    rounds: dict[tuple[int, str], Traffic] = field(default_factory=dict)

    def at(self, server_round: int, phase: str) -> Traffic:
        """The entry of one round and phase ("train" or "evaluate")."""
        return self.rounds.setdefault((server_round, phase), Traffic())

    def total(self) -> Traffic:
        """Sum over all rounds and phases (``client_state_bytes``: the largest)."""
        out = Traffic()
        for t in self.rounds.values():
            for k, v in asdict(t).items():
                setattr(out, k, max(out.client_state_bytes, v) if k == "client_state_bytes" else getattr(out, k) + v)
        return out


class ServerProtocol:
    """Compression settings and state of one strategy (see :class:`Compressed` for the parameters)."""

    def __init__(
        self,
        *,
        uplink: str | Operator | None = None,
        downlink: str | Operator | None = None,
        error_feedback: bool = True,
        min_elements: int = MIN_ELEMENTS,
        uplink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_initial: str | Operator | None = None,
        history: int = 16,
        seed: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        max_update_norm: float | None = None,
    ) -> None:
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
        self._warned = False
        self._pushed: list[Message] = []  # sent messages whose ids the Grid has yet to set
        self._destinations: OrderedDict[str, int] = OrderedDict()  # message id -> node id (recent ones)

    # ----------------------------------------------------------------- downlink
    def client_fields(self, tag: int) -> dict:
        """ConfigRecord entries every client needs (uplink policy, memory, seed); ``tag``
        (the round, or the server version in async mode) varies the client's randomness."""
        return {
            **self.uplink.to_config("qfl.uplink"),
            "qfl.error-feedback": self.error_feedback,
            "qfl.seed": self.seed,
            "qfl.round": tag,
            "qfl.session": self.session,
        }

    def compress_messages(self, tag: int, traffic: Traffic, messages: list[Message], model: Tensors,
                          full_bytes: int) -> list[Message]:
        """Put the downlink payload for each destination into each message.

        The content is replaced, never mutated (Flower's FedAvg shares one RecordDict
        between all its messages), and built once per distinct payload.
        """
        if not messages:
            return messages
        self._note_destinations(messages)
        self._warn_once(model)
        self.downlink.update(model)
        common = self.client_fields(tag)
        built: dict[tuple[int, int], RecordDict] = {}
        for msg in messages:
            offer = self.downlink.offer(msg.metadata.dst_node_id)
            key = (id(msg.content), id(offer))
            if key not in built:
                built[key] = self._content(msg.content, offer, common)
            msg.content = built[key]
            traffic.downlink += record_bytes(offer.record)
            traffic.downlink_full += full_bytes
            traffic.messages += 1
            traffic.resyncs += offer.kind == "full"
        return messages

    def _note_destinations(self, messages: list[Message]) -> None:
        """Remember where messages go: the Grid sets their ids in place when it pushes them."""
        self._collect_ids()
        self._pushed = [*self._pushed, *messages]

    def _collect_ids(self) -> None:
        waiting = []
        for msg in self._pushed:
            if msg.metadata.message_id:
                self._destinations[msg.metadata.message_id] = msg.metadata.dst_node_id
            else:
                waiting.append(msg)
        self._pushed = waiting[-_REMEMBERED:]
        while len(self._destinations) > _REMEMBERED:
            self._destinations.popitem(last=False)

    def node_of(self, reply: Message) -> int:
        """The node a reply is about.

        Error replies the SuperLink makes itself (node unavailable, message expired: a
        SuperNode that stopped or restarted) come from the SuperLink's own node id, so
        look up where the message they answer was sent.
        """
        self._collect_ids()
        return self._destinations.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _content(self, content: RecordDict, offer: Offer, common: dict) -> RecordDict:
        akey = model_key(content)
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
    def decode_update(self, msg: Message, base: Tensors) -> tuple[str, Tensors]:
        """(ArrayRecord key, decoded delta) of a reply, after every check; acknowledges its replica.

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
        record = content[akey]
        if set(record.keys()) != set(base.keys()):
            missing, extra = sorted(base.keys() - record.keys()), sorted(record.keys() - base.keys())
            raise ValueError(f"the reply's tensors differ from the model's (missing {missing}, unexpected {extra})")
        # Each tensor is decoded with its own size as the limit: a blob declaring more
        # (a hostile "size far beyond the model") is refused before anything is allocated.
        payloads = decode_record(record, {k: self.limits_for(t) for k, t in base.items()})
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
        self.acknowledge(msg, info)
        return akey, delta

    def limits_for(self, tensor) -> Limits:
        """Decoder limits for a reply's payload standing for ``tensor``: its own size."""
        n = tensor.numel()
        return Limits(max_elements=min(self.limits.max_elements, n), max_ndim=self.limits.max_ndim,
                      max_total_elements=min(self.limits.max_total_elements, n))

    @staticmethod
    def full_uplink(msg: Message, model_bytes: int) -> int:
        """What plain Flower would have carried up for this reply.

        The client's mod reports the size of the ArrayRecord the user's code returned;
        the server's model is no measure of it when the inner strategy widens dtypes
        (FedAdam and FedYogi keep float64). Replies without the report count
        ``model_bytes``.
        """
        info = msg.content.get(REPLY_KEY) if msg.has_content() else None
        size = info.get(FULL_BYTES) if isinstance(info, ConfigRecord) else None
        return size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else model_bytes

    @staticmethod
    def record_state(traffic: Traffic, msg: Message) -> None:
        """Keep the largest client state (``qfl.state-bytes``) replies report."""
        info = msg.content.get(REPLY_KEY) if msg.has_content() else None
        size = info.get(STATE_BYTES) if isinstance(info, ConfigRecord) else None
        if isinstance(size, int) and not isinstance(size, bool):
            traffic.client_state_bytes = max(traffic.client_state_bytes, size)

    def acknowledge(self, msg: Message, info: ConfigRecord) -> None:
        """Record the replica a client reports (delta/anchor modes)."""
        if VERSION in info and DIGEST in info:
            ok = self.downlink.acknowledge(msg.metadata.src_node_id, int(info[VERSION]), int(info[DIGEST]))
            if not ok:
                log(WARNING, "qfl: node %s reports replica version %s with an unknown digest; it will be resynced",
                    msg.metadata.src_node_id, info[VERSION])

    def strip(self, msg: Message) -> Message:
        """The reply without qfl's record (after acknowledging what it reports)."""
        info = msg.content.get(REPLY_KEY)
        if not isinstance(info, ConfigRecord):
            return msg
        self.acknowledge(msg, info)
        return Message(content=RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY}),
                       metadata=msg.metadata)


def model_key(content: RecordDict) -> str:
    """The key of the single ArrayRecord (the model) of a message."""
    keys = list(content.array_records.keys())
    if len(keys) != 1:
        raise ValueError(f"qfl expects exactly one ArrayRecord (the model) in a message, found {keys}")
    return keys[0]


def with_traffic(metrics: MetricRecord | None, traffic: Traffic) -> MetricRecord:
    """A copy of ``metrics`` with the round's ``qfl.*`` byte counts added."""
    out = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
    out.update(traffic.metrics())
    return out
