"""What a client keeps in ``context.state`` between messages: replica, error memory, session.

``context.state`` is the only place that outlives a message: in a deployment each
message runs in a fresh ClientApp process, so module globals would be lost. The mod
reads everything first and writes only once a message went through, so a message that
fails leaves the state as it was.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from ..codec import Tensors
from ..replica import Held
from .records import consume_to_record, to_views

_REPLICA, _REPLICA_META, _MEMORY, _SESSION = "qfl.replica", "qfl.replica-meta", "qfl.memory", "qfl.held-session"
_WARNED = "qfl.warned"


def _int(record: ConfigRecord, key: str) -> int | None:
    v = record.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def session_of(state: RecordDict) -> int | None:
    """The strategy instance whose replica and memory the state holds."""
    held = state.get(_SESSION)
    return _int(held, "id") if isinstance(held, ConfigRecord) else None


def load_replica(state: RecordDict) -> tuple[Tensors | None, int]:
    """(replica, version) from a client's context state, (None, -1) if none.

    The replica is read-only views of the state's bytes (:func:`to_views`): every use
    builds new tensors from it, and a copy would cost a large model's client a model.
    """
    info = replica_info(state)
    if info is None or _REPLICA not in state:
        return None, -1
    return to_views(state[_REPLICA]), info[0]


def held(state: RecordDict, session: int) -> Held | None:
    """The replica held for ``session`` (another strategy's does not count)."""
    replica, version = load_replica(state)
    return None if replica is None or session_of(state) != session else (replica, version)


def replica_info(state: RecordDict) -> tuple[int, int] | None:
    """(version, digest) of the held replica, without loading it."""
    meta = state.get(_REPLICA_META)
    if not isinstance(meta, ConfigRecord):
        return None
    version, dig = _int(meta, "version"), _int(meta, "digest")
    return None if version is None or dig is None else (version, dig)


def held_memory(state: RecordDict) -> Tensors | None:
    """The uplink error memory a client holds (None if none), as read-only views (see :func:`load_replica`)."""
    return to_views(state[_MEMORY]) if _MEMORY in state else None


def commit(
    state: RecordDict,
    session: int,
    replica: tuple[ArrayRecord, int, int] | None,
    memory: Tensors | None,
    keep_memory: bool,
) -> None:
    """Write what a message that went through leaves behind.

    ``replica`` is (ordinary record of the model, version, digest) to hold from now on,
    or None to keep the one held; its Arrays are shared, not copied (their bytes are
    immutable). ``memory`` replaces the error memory when ``keep_memory`` (an empty or
    None memory removes it); the dict is emptied as it is written: the caller is done
    with it, and holding it beside its copy would be a model of memory. A new
    ``session`` first drops what another strategy left.
    """
    if session_of(state) != session:
        for key in (_REPLICA, _REPLICA_META, _MEMORY):
            if key in state:
                del state[key]
        state[_SESSION] = ConfigRecord({"id": session})
    if replica is not None:
        record, version, dig = replica
        state[_REPLICA] = ArrayRecord(dict(record.items()))
        state[_REPLICA_META] = ConfigRecord({"version": version, "digest": dig})
    if keep_memory:
        if memory:
            state[_MEMORY] = consume_to_record(memory)
        elif _MEMORY in state:
            del state[_MEMORY]


def warn_once(state: RecordDict, what: str) -> bool:
    """True the first time ``what`` happens on this node (and remembers it)."""
    seen = state.get(_WARNED)
    if isinstance(seen, ConfigRecord) and what in seen:
        return False
    record = ConfigRecord(dict(seen)) if isinstance(seen, ConfigRecord) else ConfigRecord()
    record[what] = True
    state[_WARNED] = record
    return True


__all__ = ["commit", "held", "held_memory", "load_replica", "replica_info", "session_of", "warn_once"]
