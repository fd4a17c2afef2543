"""``compression_mod``: the client half of qfl, as a Flower mod.

Attach it with ``ClientApp(mods=[compression_mod, ...])``, first in the list. The
user's train and evaluate functions stay untouched: they receive an ordinary
ArrayRecord under the usual key and return one. In between, the mod rebuilds the model
from the downlink payload (and the replica it keeps), and turns the returned model into
a compressed delta with error memory.

The server is a peer like any other: every qfl field is parsed by :mod:`qfl.protocol`,
every blob is decoded with limits set by what the client already holds, and anything
that does not parse becomes an error reply naming the reason, with the client's
``context.state`` exactly as it was. The server resyncs the node after an error reply.

Composition with Flower's other mods:

* client-side differential privacy (``fixedclipping_mod``, ``adaptiveclipping_mod``):
  put ``compression_mod`` *first* (outermost). The clipping mod then clips what the
  user's code returned, and this mod keeps the bound on what actually travels: when the
  message's config carries ``clipping_norm``, the decoded compressed update (error
  memory included) is scaled until its l2 norm is within it; what that leaves out stays
  in the error memory. In the other order the clipping mod would read qfl blobs; it
  fails on every client and the server stops the run naming the order that works.
* SecAgg+ (``secaggplus_mod``): refused with an error reply, see
  :data:`SECAGG_REASON`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import CodeType

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..codec import Tensors, compress_model, model_delta, nonfinite, norm
from ..memory import compensate
from ..protocol import (
    CLIPPING_NORM,
    FULL,
    REPLY_KEY,
    DownlinkHeader,
    ReplyInfo,
    Settings,
    is_qfl_config,
    read_float,
    strip,
)
from ..replica import DownlinkError, client_model
from ..wire import STYPE, Limits
from . import state as held_state
from .records import (
    decode_record,
    encode_record,
    record_bytes,
    state_bytes,
    to_record,
    to_views,
)

#: ConfigRecord key of Flower's SecAgg+ stages (``secaggplus_constants.RECORD_KEY_CONFIGS``).
SECAGG_CONFIGS = "secaggplus_configs"
SECAGG_REASON = (
    "qfl cannot run beside secaggplus_mod: Flower's SecAgg+ (flwr 1.39-1.41) only drives legacy "
    "flwr.server.strategy strategies through SecAggPlusWorkflow, which qfl's Compressed does not wrap, and it "
    "masks the float vectors of the legacy FitRes, not qfl's encoded bytes. Use SecAgg+ without qfl, or qfl "
    "without SecAgg+."
)
#: Decoder limits when the client holds nothing to measure a message against (first
#: contact, a resync, model mode): at most 64 declared elements per byte of the message, all
#: tensors together (one zero-initialised bias may quantize to a few bytes; the whole model
#: takes 1/4 to 1 byte per element), so a 16 KB message cannot make the client allocate
#: more than 1M elements.
FIRST_CONTACT = Limits(max_expansion=64)
#: Rescaling attempts before the mod sends a zero update to keep a clipping bound.
_CLIP_TRIES = 8
_MARGIN = 0.999  # a decoded update is rebuilt in float32 on the server: stay clear of the bound

Mod = Callable[[Message, Context, ClientAppCallable], Message]


def make_compression_mod(first_contact: Limits = FIRST_CONTACT) -> Mod:
    """A :func:`compression_mod` decoding first-contact messages with ``first_contact`` limits.

    Messages to a client holding a replica are bounded by the replica (each tensor's own
    size); ``first_contact`` bounds the rest. Raise ``max_expansion`` only for a model
    whose first downlink is sparser than 64 elements per byte.
    """

    def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        return _run(msg, context, call_next, first_contact)

    compression_mod.__doc__ = _run.__doc__
    return compression_mod


def _run(msg: Message, context: Context, call_next: ClientAppCallable, first_contact: Limits) -> Message:
    """Decode the downlink, run the user's function, compress its update.

    Messages without qfl settings pass through untouched (with one warning per node, for
    train and evaluate messages: the server's strategy is not wrapped in ``Compressed``).
    """
    if not msg.has_content():
        return call_next(msg, context)
    if SECAGG_CONFIGS in msg.content.config_records:
        return _error(msg, SECAGG_REASON)
    located = next(((k, r) for k, r in msg.content.config_records.items() if is_qfl_config(r)), None)
    if located is None:
        _warn_uncompressed(msg, context)
        return call_next(msg, context)
    ckey, cfg = located
    outer = _outer_reader()
    if outer is not None:
        return _error(
            msg,
            f"compression_mod runs inside {outer}, which would read qfl's {STYPE} payloads instead of "
            f"the model: list compression_mod first, e.g. ClientApp(..., mods=[compression_mod, {outer}])",
        )
    try:
        header, settings = DownlinkHeader.from_config(cfg), Settings.from_config(cfg)
        clip = read_float(cfg, CLIPPING_NORM, 0.0) if CLIPPING_NORM in cfg else None
        if clip is not None and clip <= 0.0:
            raise ValueError(f"{CLIPPING_NORM} must be positive, got {clip}")
        akey = settings.key
        if list(msg.content.array_records) != [akey]:
            raise DownlinkError(
                f"the message must carry exactly one ArrayRecord, {akey!r}; it carries "
                f"{list(msg.content.array_records)}"
            )
        holding = held_state.held(context.state, settings.session)
        arrays = decode_record(msg.content[akey], _limits(header, holding, first_contact))
        start, replica = client_model(arrays, header, holding if header.base != FULL else None)
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:  # ProtocolError, WireFormatError, ...
        return _error(msg, f"qfl could not rebuild the model from the downlink: {exc}")

    # The model is serialised once: the user's record, the replica written to the state
    # and ``start`` (read-only views) share its bytes. A large model's client would
    # otherwise hold it three times over while the user's function trains.
    model = to_record(start)
    keeps_replica = replica is not None
    del start, replica, holding
    start = to_views(model)
    received = msg.content
    user = RecordDict(dict(received.items()))
    user[akey] = ArrayRecord(dict(model.items()))
    user[ckey] = ConfigRecord(strip(cfg))
    msg.content = user
    del user
    reply = call_next(msg, context)
    msg.content = received  # what mods outside this one handed in
    if reply.has_error() or not reply.has_content():
        return reply

    content = RecordDict(dict(reply.content.items()))
    memory, full_bytes = None, None
    if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
        try:
            rkey, encoded, memory, full_bytes = _compress_reply(reply.content, start, settings, clip, context)
        except (ValueError, TypeError) as exc:
            return _error(msg, f"qfl could not compress the update: {exc}")
        content[rkey] = encoded
    del start
    kept = (model, header.version, header.digest) if keeps_replica else None
    held_state.commit(
        context.state, settings.session, kept, memory, keep_memory=full_bytes is not None and settings.error_feedback
    )
    info = ReplyInfo(
        "update" if full_bytes is not None else "report",
        state_bytes(context.state),
        held_state.replica_info(context.state) if header.mode != "model" else None,
        full_bytes,
    )
    content[REPLY_KEY] = ConfigRecord(info.to_config())
    reply.content = content
    return reply


compression_mod = make_compression_mod()
compression_mod.__doc__ = """Flower mod: the client half of qfl (see the module docstring); first-contact
messages are decoded with :data:`FIRST_CONTACT` limits (:func:`make_compression_mod` for others)."""


def _model_readers() -> dict[CodeType, str]:
    """Flower's mods that read the model's arrays (the DP mods), by code object."""
    try:
        from flwr.clientapp import mod as flower_mods
    except ImportError:  # an older Flower without them: nothing to look for
        return {}
    out = {}
    for name in ("fixedclipping_mod", "adaptiveclipping_mod"):
        fn = getattr(flower_mods, name, None)
        if fn is not None:
            out[fn.__code__] = name
    local = getattr(flower_mods, "LocalDpMod", None)
    if local is not None:
        out[local.__call__.__code__] = "LocalDpMod"
    return out


_READERS = _model_readers()


def _outer_reader() -> str | None:
    """The name of a model-reading Flower mod that called this one, if any.

    Mods run outermost first; one listed before compression_mod would be handed qfl's
    blobs and fail on every client. The call stack says whether one is outside us.
    """
    frame = sys._getframe(1)
    while frame is not None:
        name = _READERS.get(frame.f_code)
        if name is not None:
            return name
        frame = frame.f_back
    return None


def _limits(header: DownlinkHeader, holding, first_contact: Limits) -> Limits | dict[str, Limits]:
    """Per tensor of the replica, its own size (times the steps announced) when the message
    builds on it: the message must then carry exactly the replica's tensors. Otherwise
    ``first_contact`` for the whole message."""
    if holding is None or header.mode == "model" or header.base == FULL:
        return first_contact
    return {
        k: Limits(
            max_elements=t.numel(),
            max_ndim=first_contact.max_ndim,
            max_total_elements=t.numel() * max(1, header.steps),
            max_expansion=None,
        )
        for k, t in holding[0].items()
    }


def _warn_uncompressed(msg: Message, context: Context) -> None:
    kind = msg.metadata.message_type.split(".")[0]
    if kind in (MessageType.TRAIN, MessageType.EVALUATE) and held_state.warn_once(context.state, "uncompressed"):
        log(
            logging.WARNING,
            "qfl: compression_mod received a %s message without qfl settings, so it travels "
            "uncompressed: wrap the ServerApp's strategy in qfl.strategies.Compressed (this warning shows once per "
            "node)",
            kind,
        )


def _compress_reply(
    content: RecordDict, start: Tensors, settings: Settings, clip: float | None, context: Context
) -> tuple[str, ArrayRecord, Tensors | None, int]:
    """(key, compressed record, new error memory, bytes of the uncompressed record) of a train reply."""
    records = list(content.array_records.items())
    if len(records) != 1:
        raise ValueError(f"the train reply must carry exactly one ArrayRecord (the model), found {len(records)}")
    rkey, record = records[0]
    trained = to_views(record)  # read, never written: the record's bytes, not a copy of them
    if trained.keys() != start.keys():
        missing, extra = sorted(start.keys() - trained.keys()), sorted(trained.keys() - start.keys())
        raise ValueError(
            f"the returned model's tensors differ from the received ones (missing {missing}, unexpected {extra})"
        )
    for k, t in trained.items():
        if t.shape != start[k].shape:
            raise ValueError(f"{k}: returned shape {tuple(t.shape)}, received {tuple(start[k].shape)}")
    # One tensor at a time, dropping the trained copy as its delta exists: two model-sized
    # dicts at once cost a large model's client a model of memory.
    delta = {k: model_delta(trained.pop(k), start[k]) for k in list(start)}
    bad = nonfinite(delta)
    if bad is not None:
        raise ValueError(f"training produced NaN or Inf in {bad}")
    memory = _load_memory(context, delta, settings) if settings.error_feedback else None
    generator = _generator(settings, context)
    if clip is None:
        payloads, _, new_memory = compress_model(
            delta, settings.uplink, generator, memory, keep_sent=False, consume=True
        )
    else:
        payloads, new_memory = _clipped(delta, settings, generator, memory, clip)
    return rkey, encode_record(payloads), new_memory if settings.error_feedback else None, record_bytes(record)


def _clipped(
    delta: Tensors, settings: Settings, generator: torch.Generator, memory: Tensors | None, clip: float
) -> tuple[dict, Tensors | None]:
    """Payloads whose decoded update has l2 norm <= ``clip``, and the error memory that goes with them.

    What a clipping mod bounded is the user's update; what the server aggregates is the
    decoded compressed update plus error memory, which can be longer (a quantizer's
    noise, a residual of earlier rounds). So the compressed input is scaled down until
    the decoded update fits; after :data:`_CLIP_TRIES` attempts a zero update is sent.
    With error feedback the part left out stays in the memory (it is sent later, within
    the bound of that later round).
    """
    corrected = {
        k: compensate(d, None if memory is None else memory.get(k)) if d.is_floating_point() else d
        for k, d in delta.items()
    }
    scale = 1.0
    for attempt in range(_CLIP_TRIES + 1):
        if attempt == _CLIP_TRIES:
            scale = 0.0
        scaled = {k: (c * scale if c.is_floating_point() else c) for k, c in corrected.items()}
        payloads, sent, _ = compress_model(scaled, settings.uplink, generator)
        n = norm(sent)
        if n <= clip * _MARGIN:
            break
        scale *= clip * _MARGIN / n
    new_memory = (
        {k: corrected[k] - sent[k].to(corrected[k].dtype) for k in corrected if corrected[k].is_floating_point()}
        if memory is not None
        else None
    )
    return payloads, new_memory


def _load_memory(context: Context, delta: Tensors, settings: Settings) -> dict[str, torch.Tensor]:
    """The error memory of earlier rounds; empty if none, of another session, or of another model."""
    memory = held_state.held_memory(context.state)
    if memory is None or held_state.session_of(context.state) != settings.session:
        return {}
    if any(k not in delta or memory[k].shape != delta[k].shape for k in memory):
        log(logging.WARNING, "qfl: error memory does not match the model any more; starting afresh")
        return {}
    return memory


def _generator(settings: Settings, context: Context) -> torch.Generator:
    """Per (run seed, round, client) randomness: reproducible runs, independent clients."""
    client = context.node_config.get("partition-id", context.node_id)
    client = client if isinstance(client, int) and not isinstance(client, bool) else context.node_id
    seed = (settings.seed * 1_000_003 + settings.round) * 1_000_003 + int(client)
    return torch.Generator().manual_seed(seed % (2**63))


def _error(msg: Message, reason: str) -> Message:
    log(logging.ERROR, "%s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
