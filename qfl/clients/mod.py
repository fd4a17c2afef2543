"""``compression_mod``: the client half of qfl, as a Flower mod.

Attach it with ``ClientApp(mods=[compression_mod])``. The user's train and evaluate
functions stay untouched: they receive an ordinary ArrayRecord under the usual key and
return one. In between, the mod rebuilds the model from the downlink payload (and the
replica it keeps), and turns the returned model into a compressed delta with error
memory. Everything that must outlive the message lives in ``context.state``: in a
deployment each message runs in a fresh ClientApp process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..codec import compress_model, model_delta, nonfinite
from ..records import Tensors, decode_record, encode_record, record_bytes, state_bytes, to_record, to_tensors
from ..replica import FULL_BYTES, PREFIX, REPLY_KEY, STATE_BYTES, DownlinkError, client_model, drop_replica, replica_info
from ..spec import Policy
from ..wire import WireFormatError

_MEMORY, _SESSION = "qfl.memory", "qfl.session"


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode the downlink, run the user's function, compress its update.

    Messages without qfl settings pass through untouched. Anything that goes wrong on
    the qfl side becomes an error reply with the reason (the server resyncs the node),
    never a crash of the SuperNode.
    """
    if not msg.has_content():
        return call_next(msg, context)
    located = _qfl_config(msg.content)
    if located is None:
        return call_next(msg, context)
    ckey, cfg = located
    fields = dict(cfg)
    _check_session(context, fields)
    try:
        akey = str(fields["qfl.key"])
        if akey not in msg.content.array_records:
            raise DownlinkError(f"the message has no ArrayRecord {akey!r}")
        start = client_model(decode_record(msg.content[akey]), fields, context.state)
        policy = Policy.from_config(fields, "qfl.uplink")
    except (WireFormatError, DownlinkError, ValueError, KeyError) as exc:
        return _error(msg, f"qfl could not rebuild the model from the downlink: {exc}")

    user = RecordDict({k: v for k, v in msg.content.items()})
    user[akey] = to_record(start)
    user[ckey] = ConfigRecord({k: v for k, v in fields.items() if not k.startswith(PREFIX)})
    msg.content = user
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply

    info = ConfigRecord()
    held = replica_info(context.state)
    if fields.get("qfl.mode") in ("delta", "anchor") and held is not None:  # the replica, or the epoch's anchor
        info["qfl.version"], info["qfl.digest"] = held
    content = RecordDict({k: v for k, v in reply.content.items()})
    if msg.metadata.message_type.split(".")[0] == MessageType.TRAIN:
        try:
            rkey, encoded, full_bytes = _compress_reply(reply.content, start, policy, fields, context)
        except ValueError as exc:
            return _error(msg, f"qfl could not compress the update: {exc}")
        content[rkey] = encoded
        info[FULL_BYTES] = full_bytes
    info[STATE_BYTES] = state_bytes(context.state)
    content[REPLY_KEY] = info
    reply.content = content
    return reply


def held_memory(state: RecordDict) -> Tensors | None:
    """The uplink error memory a client holds in its ``context.state`` (None if none)."""
    return to_tensors(state[_MEMORY]) if _MEMORY in state else None


def _check_session(context: Context, fields: Mapping) -> None:
    """Start afresh when messages come from another strategy instance than before."""
    session = fields.get("qfl.session")
    held = context.state.get(_SESSION)
    if held is not None and held.get("id") != session:
        drop_replica(context.state)
        if _MEMORY in context.state:
            del context.state[_MEMORY]
    if held is None or held.get("id") != session:
        context.state[_SESSION] = ConfigRecord({"id": session} if session is not None else {})


def _qfl_config(content: RecordDict) -> tuple[str, ConfigRecord] | None:
    for key, record in content.config_records.items():
        if "qfl.mode" in record:
            return key, record
    return None


def _compress_reply(content: RecordDict, start: Tensors, policy: Policy, fields: Mapping,
                    context: Context) -> tuple[str, ArrayRecord, int]:
    """(key, compressed record, bytes of the uncompressed record) of a train reply."""
    records = list(content.array_records.items())
    if len(records) != 1:
        raise ValueError(f"the train reply must carry exactly one ArrayRecord (the model), found {len(records)}")
    rkey, record = records[0]
    trained = to_tensors(record)
    if trained.keys() != start.keys():
        missing, extra = sorted(start.keys() - trained.keys()), sorted(trained.keys() - start.keys())
        raise ValueError(f"the returned model's tensors differ from the received ones (missing {missing}, "
                         f"unexpected {extra})")
    for k, t in trained.items():
        if t.shape != start[k].shape:
            raise ValueError(f"{k}: returned shape {tuple(t.shape)}, received {tuple(start[k].shape)}")
    delta = {k: model_delta(trained[k], start[k]) for k in start}
    bad = nonfinite(delta)
    if bad is not None:
        raise ValueError(f"training produced NaN or Inf in {bad}")
    memory = _load_memory(context, delta) if fields.get("qfl.error-feedback") else None
    payloads, _, new_memory = compress_model(delta, policy, _generator(fields, context), memory)
    if new_memory:
        context.state[_MEMORY] = to_record(new_memory)
    elif _MEMORY in context.state:
        del context.state[_MEMORY]
    return rkey, encode_record(payloads), record_bytes(record)


def _load_memory(context: Context, delta: Tensors) -> dict[str, torch.Tensor]:
    """The error memory of earlier rounds; reset if the model's tensors changed."""
    if _MEMORY not in context.state:
        return {}
    memory = to_tensors(context.state[_MEMORY])
    if any(k not in delta or memory[k].shape != delta[k].shape for k in memory):
        log(logging.WARNING, "qfl: error memory does not match the model any more; starting afresh")
        return {}
    return memory


def _generator(fields: Mapping, context: Context) -> torch.Generator:
    """Per (run seed, round, client) randomness: reproducible runs, independent clients."""
    client = context.node_config.get("partition-id", context.node_id)
    seed = (int(fields.get("qfl.seed", 0)) * 1_000_003 + int(fields.get("qfl.round", 0))) * 1_000_003 + int(client)
    return torch.Generator().manual_seed(seed % (2**63))


def _error(msg: Message, reason: str) -> Message:
    log(logging.ERROR, "%s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
