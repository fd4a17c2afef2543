"""The server half of the qfl protocol, shared by the synchronous and asynchronous strategies.

It owns the uplink policy, the downlink (:class:`qfl.replica.ServerDownlink`), the byte
accounting and the checks every reply must pass. Strategies decide *when* to send and
*how* to aggregate; this class decides *what* goes on the wire and what comes back.

Clients are untrusted. A reply reaches the inner strategy only if its qfl record parses
(:mod:`qfl.protocol`), it carries exactly the records the inner strategy expects, every
blob decodes within the model's own sizes with the configured operator, the update is
finite, the model it rebuilds is finite, and the :class:`UpdateGuard` accepts its norm.
Anything else is dropped, logged and counted (``qfl.dropped``), never raised.

:class:`ServerProtocol` is the state (replicas, message destinations, guard norms, the
round's base model and clipping norm, traffic) and the methods that keep it in step; what
needs none of it lives beside it: :mod:`.replies` (reading one reply), :mod:`.guard`,
:mod:`.traffic`, :mod:`.aggregate` (summing the replies of linear strategies).
"""

from __future__ import annotations

import secrets
import statistics
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from logging import ERROR, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore import log

from ..clients.records import (
    encode_record,
    record_bytes,
    tensor_views,
    to_record,
    to_views,
)
from ..codec import MAX_VALUE, Deltas, Model, Tensors, apply_delta, norm, out_of_range
from ..protocol import (
    CLIPPING_NORM,
    REPLY_KEY,
    ReplyInfo,
    Settings,
    read_float,
)
from ..replica import Offer, ServerDownlink
from ..spec import Policy, parse_downlink
from ..wire import STYPE, Limits
from .guard import UpdateGuard
from .replies import beyond_range, check_records, decode_update, full_uplink, reply_info, tensor_limits
from .traffic import Traffic, TrafficLog, with_traffic


class MisconfigurationError(RuntimeError):
    """The run cannot train as configured (a ClientApp without ``compression_mod``, mods in an order
    that reads qfl's blobs); raised after a round whose replies all show it."""


class CompositionError(TypeError):
    """qfl wrapped with or inside a Flower component in an order that cannot keep its guarantee."""


#: Message ids remembered to attribute the SuperLink's error replies (a few rounds' worth).
_REMEMBERED = 65536


#: ``finish_train``'s default: the aggregate's range is not known yet and is checked there.
UNCHECKED = object()


class ServerProtocol:
    """Compression settings and state of one strategy.

    Takes every one of :class:`Compressed`'s settings, by name: their types, defaults and
    meaning are documented once, in ``Compressed``'s signature (``compressed()`` fills in
    the defaults from it).
    """

    def __init__(
        self,
        *,
        uplink,
        downlink,
        error_feedback,
        min_elements,
        uplink_overrides,
        downlink_overrides,
        downlink_initial,
        history,
        seed,
        limits,
        guard,
    ) -> None:
        if not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be a bool, got {error_feedback!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
            raise ValueError(f"seed must be an integer in [0, 2^62), got {seed!r}")
        if not isinstance(limits, Limits):
            raise TypeError(f"limits must be a qfl.wire.Limits, got {type(limits).__name__}")
        self.uplink = Policy.build(uplink, min_elements, uplink_overrides)
        mode, down_op = parse_downlink(downlink)
        initial = None if downlink_initial is None else Policy.build(downlink_initial, min_elements)
        self.downlink = ServerDownlink(
            mode, Policy.build(down_op, min_elements, downlink_overrides), history, seed, initial
        )
        self.error_feedback = error_feedback
        self.seed = seed
        self.limits = limits
        self._accepted_norms: deque[float] = deque(maxlen=1)
        self.guard = guard
        self.traffic = TrafficLog()
        # Names this strategy's client state (replica, error memory): a second strategy
        # in the same run, or a new run on long-lived nodes, must not inherit it.
        self.session = secrets.randbits(62)
        self._warned = False
        self._pushed: list[Message] = []  # sent messages whose ids the Grid has yet to set
        self._destinations: OrderedDict[str, int] = OrderedDict()  # message id -> node id (recent ones)
        self._base: Tensors | None = None  # the model the current training round started from
        self._full_bytes = 0  # what plain Flower sends for that model
        self._clip: float | None = None  # client-side DP clipping norm of the current training round
        self._pending: int | None = None  # a train round configured whose replies have not come back
        self._aggregated = 0  # train rounds whose replies reached qfl
        #: Accepted updates decoded in the first pass, kept for :mod:`.aggregate` (by id of
        #: the passed message) within one model's bytes; the rest are decoded again there.
        self.held: dict[int, Deltas] = {}
        #: MetricRecord key the inner strategy weighs replies by (FedAvg's ``weighted_by_key``).
        self.weight_key: str | None = None

    @property
    def base(self) -> Tensors | None:
        """The model the current training round started from (None outside a training round)."""
        return self._base

    def end_train_round(self) -> None:
        """Forget the round's base once its replies are aggregated: it is the model before
        the new one, which nothing else holds by then (a large model's server kept it to
        the next round)."""
        self._base = None

    @property
    def guard(self) -> UpdateGuard | None:
        """The :class:`UpdateGuard` screening decoded updates (None: off)."""
        return self._guard

    @guard.setter
    def guard(self, guard: UpdateGuard | None) -> None:
        if guard is not None and not isinstance(guard, UpdateGuard):
            raise TypeError(f"guard must be an UpdateGuard or None, got {type(guard).__name__}")
        self._guard = guard
        self._accepted_norms = deque(self._accepted_norms, maxlen=guard.window if guard is not None else 1)

    # ----------------------------------------------------------------- downlink
    def settings(self, key: str, tag: int) -> Settings:
        """What every client needs (uplink policy, memory, seed); ``tag`` (the round, or
        the server version in async mode) varies the client's randomness."""
        return Settings(key, self.uplink, self.error_feedback, self.seed, tag, self.session)

    def compress_messages(
        self, tag: int, traffic: Traffic, messages: list[Message], model: Tensors, full_bytes: int
    ) -> list[Message]:
        """Put the downlink payload for each destination into each message.

        The content is replaced, never mutated (Flower's FedAvg shares one RecordDict
        between all its messages), and built once per distinct payload.
        """
        if not messages:
            return messages
        self._note_destinations(messages)
        self._warn_once(model)
        self.downlink.update(model)
        built: dict[tuple[int, int], RecordDict] = {}
        records: dict[int, ArrayRecord] = {}
        for msg in messages:
            offer = self.downlink.offer(msg.metadata.dst_node_id)
            key = (id(msg.content), id(offer))
            if key not in built:
                if id(offer) not in records:
                    records[id(offer)] = encode_blobs(offer.blobs)
                built[key] = self._content(msg.content, offer, records[id(offer)], tag)
            msg.content = built[key]
            traffic.downlink += record_bytes(records[id(offer)])
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

    def _content(self, content: RecordDict, offer: Offer, record: ArrayRecord, tag: int) -> RecordDict:
        akey = model_key(content)
        ckeys = list(content.config_records.keys())
        ckey = ckeys[0] if len(ckeys) == 1 else "config"
        if len(ckeys) > 1:
            raise ValueError(f"qfl expects at most one ConfigRecord in a message, found {ckeys}")
        cfg = ConfigRecord(dict(content[ckey])) if ckey in content else ConfigRecord()
        cfg.update({**self.settings(akey, tag).to_config(), **offer.header.to_config()})
        new = RecordDict(dict(content.items()))
        new[akey] = record
        new[ckey] = cfg
        return new

    def _warn_once(self, model: Tensors) -> None:
        """Warn once per direction when error memory runs on an operator with no convergence guarantee.

        Error feedback needs a contraction (top-k, sign, a damped quantizer, or top-k with a
        quantizer fine enough, :meth:`qfl.compress.chain.Chain.properties`) or an unbiased
        operator with variance factor below 1; otherwise the memory can grow without bound.
        The client's memory is the uplink's; the downlink's is the distance between the
        server model and the clients' replica, which "delta" and "anchor" modes send from.
        """
        if self._warned:
            return
        self._warned = True
        checks = [("uplink", self.uplink, "error_feedback=False")] if self.error_feedback else []
        if self.downlink.mode != "model":
            checks.append(("downlink", self.downlink.policy, "a finer quantizer (norm=max, smaller buckets)"))
        for direction, policy, remedy in checks:
            for name, t in model.items():
                op = policy.operator_for(name, t)
                props = op.properties(t.numel())
                if props.contraction is None and not (props.unbiased and (props.variance or 0.0) < 1.0):
                    log(
                        WARNING,
                        "qfl: %s error memory with %s on %s has no convergence guarantee (%s) and can "
                        "diverge; use a contraction (top-k, sign, damped, or top-k with a quantizer of "
                        "variance factor < 1), or %s",
                        direction,
                        op,
                        name,
                        f"variance factor {props.variance:.3g} >= 1" if props.unbiased else "not a contraction",
                        remedy,
                    )
                    break

    # ------------------------------------------------------------ one sync round
    def configure(
        self, phase: str, server_round: int, arrays: ArrayRecord, messages: Iterable[Message]
    ) -> list[Message]:
        """The inner strategy's messages of a round with the model replaced by the downlink payload."""
        messages = list(messages)
        if phase == "evaluate" and not messages:  # e.g. fraction_evaluate=0: nothing to send, nothing to count
            return messages
        # Views of the current model's bytes: read only, and the caller holds the record anyway.
        model, full = to_views(arrays), record_bytes(arrays)
        if phase == "train":
            if self._pending is not None and not self._aggregated:
                raise MisconfigurationError(
                    f"qfl: the replies of round {self._pending} never reached Compressed.aggregate_train: a wrapper "
                    "around Compressed skipped aggregation (Flower's DifferentialPrivacyClientSide* wrappers do when "
                    "any client fails). If every client failed, check the ClientApp's mods: compression_mod must come "
                    "first, e.g. mods=[compression_mod, fixedclipping_mod]. Wrapped the other way round, "
                    "Compressed(DifferentialPrivacyClientSide...(FedAvg(...), ...)), qfl reports the clients' errors."
                )
            self._pending = server_round
            self._base, self._full_bytes = Model(model), full
            self._clip = self._clipping_norm(messages)
        return self.compress_messages(server_round, self.traffic.at(server_round, phase), messages, model, full)

    @staticmethod
    def _clipping_norm(messages: list[Message]) -> float | None:
        """The client-side DP clipping norm the messages carry (Flower's DP wrappers put it in the config)."""
        norms = set()
        for msg in messages:
            for record in msg.content.config_records.values():
                if CLIPPING_NORM in record:
                    norms.add(read_float(record, CLIPPING_NORM))
        return min(norms) if norms else None

    def train_replies(self, server_round: int, replies: Iterable[Message], rebuild: bool = True) -> list[Message]:
        """The replies the inner strategy may aggregate: ordinary ArrayRecords (server model +
        decoded delta) for the ones that pass every check; error replies pass on (the inner
        strategy logs and skips them), everything else is dropped here.

        With ``rebuild=False`` the accepted replies keep their compressed ArrayRecord (only
        qfl's record is stripped): :mod:`qfl.strategies.aggregate` decodes them again one
        at a time, so that no more than one decoded update is held at once. Every check,
        drop and count is the same either way.

        Raises MisconfigurationError when no reply could be used and some came back
        without qfl's compression (see :meth:`check_misconfigured`).
        """
        traffic = self.traffic.at(server_round, "train")
        if self._base is None:
            raise RuntimeError("aggregate_train called before configure_train")
        base = self._base
        self._pending, self._aggregated = None, self._aggregated + 1
        passed, candidates, unmodded = [], [], []
        self.held, room = {}, sum(t.nbytes for t in base.values())
        for msg in self._without_errors(replies, traffic, passed, unmodded):
            traffic.uplink += sum(record_bytes(r) for r in msg.content.array_records.values())
            traffic.uplink_full += full_uplink(msg, self._full_bytes)
            if (why := without_mod(msg)) is not None:
                unmodded.append(why)
            try:
                akey, delta, info = self.decode_update(msg, base, sparse=not rebuild)
                # Without rebuilding, only the verdict on the model the update makes is kept,
                # and the update itself while the held ones fit in one model's bytes: the
                # guard needs every norm of the round before it accepts any update.
                verdict, keep = None, delta
                if not rebuild:
                    verdict, size = beyond_range(base, delta), sum(d.nbytes for d in delta.values())
                    keep, room = (delta, room - size) if size <= room else (None, room)
                candidates.append((msg, akey, keep, verdict, info, norm(delta)))
            except (ValueError, TypeError, OverflowError, IndexError) as exc:  # WireFormatError, ProtocolError, ...
                self._drop(traffic, msg, exc, server_round)
        for msg, akey, delta, bad, info, _n in self.screen(traffic, candidates, server_round):
            if rebuild:
                rebuilt = {k: apply_delta(base[k], delta[k]) for k in base}
                bad = out_of_range(rebuilt)
            if bad is not None:  # a bounded update, yet the model it makes is not
                self._drop(traffic, msg, ValueError(f"the update takes {bad} beyond {MAX_VALUE:.3g}"), server_round)
                continue
            self.acknowledge(msg, info)
            traffic.client_state_bytes = max(traffic.client_state_bytes, info.state_bytes)
            new = RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY})
            if rebuild:
                new[akey] = to_record(rebuilt)
            passed.append(Message(content=new, metadata=msg.metadata))
            if not rebuild and delta is not None:
                self.held[id(passed[-1])] = delta
        if traffic.missing:
            log(
                WARNING,
                "qfl: %d of %d nodes did not reply in round %s",
                traffic.missing,
                traffic.messages,
                server_round,
            )
        self.check_misconfigured(server_round, "train", unmodded, sum(not m.has_error() for m in passed))
        return passed

    def _without_errors(
        self, replies: Iterable[Message], traffic: Traffic, passed: list[Message], unmodded: list[str]
    ) -> Iterator[Message]:
        """The replies that carry content; every reply counted. An error reply goes on to the
        inner strategy as it is (``passed``), counted, its node's replica forgotten (it may
        not hold what was sent), and a reason that names qfl's payload type is noted as a
        client without the mod."""
        for msg in replies:
            traffic.replies += 1
            if not msg.has_error():
                yield msg
                continue
            passed.append(msg)
            traffic.failures += 1
            self.downlink.forget(self.node_of(msg))
            if (why := without_mod(msg)) is not None:
                unmodded.append(why)

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Evaluate replies without qfl's record, after acknowledging the replica each reports."""
        traffic = self.traffic.at(server_round, "evaluate")
        passed, unmodded = [], []
        for msg in self._without_errors(replies, traffic, passed, unmodded):
            if (why := without_mod(msg)) is not None:
                unmodded.append(why)
            try:
                info = reply_info(msg, "report")
                check_records(msg.content, arrays=0, weight_key=self.weight_key)
            except ValueError as exc:
                self._drop(traffic, msg, exc, server_round)
                continue
            self.acknowledge(msg, info)
            traffic.client_state_bytes = max(traffic.client_state_bytes, info.state_bytes)
            passed.append(
                Message(
                    content=RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY}), metadata=msg.metadata
                )
            )
        self.check_misconfigured(server_round, "evaluate", unmodded, sum(not m.has_error() for m in passed))
        return passed

    def check_misconfigured(self, server_round: int, phase: str, unmodded: list[str], usable: int) -> None:
        """Stop the run when a round's replies show clients that do not speak qfl and none could be used.

        A ClientApp without ``compression_mod`` (or with a mod before it that reads the
        model) fails on qfl's blobs, naming their stype, or answers without qfl's record.
        Then every round would end without an update and the run would "succeed" with
        an untrained model. A few such nodes among working ones are dropped and logged.
        """
        if not unmodded:
            return
        text = (
            f"{len(unmodded)} {phase} replies of round {server_round} came back without qfl's compression "
            f"(e.g. {unmodded[0]!r}). The ClientApp lacks compression_mod, or a mod that reads the model "
            "(fixedclipping_mod, adaptiveclipping_mod, ...) runs before it. Add it first in the ClientApp's "
            "mods: `from qfl.clients import compression_mod` and `ClientApp(..., mods=[compression_mod, ...])`."
        )
        if usable == 0:
            raise MisconfigurationError(f"qfl: {text}")
        log(WARNING, "qfl: %s Their replies are dropped.", text)

    def finish_train(
        self,
        arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
        traffic: Traffic,
        tensors: Mapping[str, np.ndarray] | None = None,
        beyond: str | None | object = UNCHECKED,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """The inner strategy's aggregate, refused if not finite (the model then stays as it
        was); ``tensors``, the same aggregate as arrays when the caller built it, is checked
        instead of deserialising ``arrays`` again; ``beyond``, the check's verdict when the
        caller computed it while writing the model (the first tensor beyond range, or None)."""
        if arrays is not None:
            if beyond is UNCHECKED:
                try:
                    given = tensor_views(tensors) if tensors is not None else None
                    beyond = out_of_range(given if given is not None else to_views(arrays))
                except ValueError:
                    beyond = None  # not a plain model: nothing qfl can check
            if beyond is not None:
                log(
                    ERROR,
                    "qfl: the aggregated model has NaN, Inf or values beyond %.3g in %s; keeping the previous model",
                    MAX_VALUE,
                    beyond,
                )
                arrays = None
        return arrays, with_traffic(metrics, traffic)

    def _drop(self, traffic: Traffic, msg: Message, exc: Exception, server_round: int | None = None) -> None:
        traffic.dropped += 1
        self.downlink.forget(msg.metadata.src_node_id)
        where = "" if server_round is None else f" in round {server_round}"
        log(WARNING, "qfl: dropped the reply of node %s%s: %s", msg.metadata.src_node_id, where, exc)

    # ------------------------------------------------------------------- uplink
    def decode_update(self, msg: Message, base: Tensors, sparse: bool = False) -> tuple[str, Deltas, ReplyInfo]:
        """:func:`.replies.decode_update` with this strategy's uplink policy, limits and weight."""
        return decode_update(msg, base, self.uplink, self.limits, self.weight_key, sparse)

    def limits_for(self, tensor) -> Limits:
        """Decoder limits for a reply's payload standing for ``tensor``: its own size."""
        return tensor_limits(self.limits, tensor)

    def screen(self, traffic: Traffic, candidates: list, server_round: int | None = None) -> list:
        """The candidates (tuples whose last item is the update's norm) the guard and the
        round's clipping norm accept; the others are dropped and counted."""
        if self.guard is None and self._clip is None:
            return candidates
        reference = None
        if self.guard is not None and self.guard.median_factor is not None:
            pool = [*self._accepted_norms, *(c[-1] for c in candidates)]
            if len(pool) >= 2 and (low := statistics.median_low(pool)) > 0:
                reference = low
        out = []
        for cand in candidates:
            msg, n = cand[0], cand[-1]
            reason = None
            if self._clip is not None and n > self._clip:
                reason = f"update norm {n:.4g} exceeds the round's clipping norm {self._clip:.4g}"
            elif self.guard is not None and self.guard.max_update_norm is not None and n > self.guard.max_update_norm:
                reason = f"update norm {n:.4g} exceeds max_update_norm={self.guard.max_update_norm:.4g}"
            elif reference is not None and n > self.guard.median_factor * reference:
                reason = (
                    f"update norm {n:.4g} exceeds {self.guard.median_factor:g} x the median norm "
                    f"{reference:.4g} (UpdateGuard.median_factor)"
                )
            if reason is None:
                out.append(cand)
            else:
                traffic.guarded += 1
                self._drop(traffic, msg, ValueError(reason), server_round)
        self._accepted_norms.extend(c[-1] for c in out)
        return out

    def acknowledge(self, msg: Message, info: ReplyInfo) -> None:
        """Record the replica a client reports (delta/anchor modes)."""
        if info.replica is not None:
            version, dig = info.replica
            if not self.downlink.acknowledge(msg.metadata.src_node_id, version, dig):
                log(
                    WARNING,
                    "qfl: node %s reports replica version %s with an unknown digest; it will be resynced",
                    msg.metadata.src_node_id,
                    version,
                )

    def strip(self, msg: Message) -> Message:
        """The reply without qfl's record (after acknowledging the replica it reports, if it parses)."""
        if REPLY_KEY not in msg.content:
            return msg
        try:
            info = ReplyInfo.from_config(msg.content[REPLY_KEY])
        except (ValueError, TypeError):
            info = None
        if info is not None:
            self.acknowledge(msg, info)
        return Message(
            content=RecordDict({k: v for k, v in msg.content.items() if k != REPLY_KEY}), metadata=msg.metadata
        )


def without_mod(msg: Message) -> str | None:
    """Why a reply shows a client without ``compression_mod``, or None: an error naming qfl's
    payload type (the client could not read qfl's blobs), or content without qfl's record."""
    if msg.has_error():
        reason = msg.error.reason or ""
        return reason if STYPE in reason else None
    return None if REPLY_KEY in msg.content else "a reply without qfl's record"


def encode_blobs(blobs: Mapping[str, bytes]) -> ArrayRecord:
    """The ArrayRecord carrying an offer's blobs (one qfl Array: their container)."""
    return encode_record(dict(blobs))


def model_key(content: RecordDict) -> str:
    """The key of the single ArrayRecord (the model) of a message."""
    keys = list(content.array_records.keys())
    if len(keys) != 1:
        raise ValueError(f"qfl expects exactly one ArrayRecord (the model) in a message, found {keys}")
    return keys[0]
