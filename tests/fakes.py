"""An in-process Grid: Flower's message flow without a SuperLink, for fast exact tests.

Every message goes through Flower's own serialisation (``deflate``/``inflate`` of the
RecordDict tree), as it would on the wire, so a test sees exactly the bytes a real
run would carry and no object is shared between server and clients.
"""

from __future__ import annotations

import itertools
import logging
import traceback
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from qfl.clients.records import CONTAINER_KEY, blob_array, record_blobs, record_bytes
from qfl.wire import Group, Limits, encode, pack


def set_task_identity(run_id: int = 1, node_id: int = 0, task_id: int = 1) -> None:
    """Messages read their run and node ids from here (a ServerApp process sets them)."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def blobs_of(record: ArrayRecord) -> dict[str, bytes]:
    """Each tensor's own bytes in a compressed record; a member of a group (small lossless
    tensors sharing one blob) as the blob it would travel in alone -- a container of these
    is what a sender without groups writes, and what tests of hostile peers rewrite."""
    out = {}
    for k, v in record_blobs(record).items():
        if isinstance(v, Group):
            (payload,) = v.decode(Limits())[k]
            out[k] = encode(payload)
        else:
            out[k] = bytes(v)
    return out


def per_tensor(record: ArrayRecord) -> ArrayRecord:
    """A compressed record as one blob Array per tensor: what tests of hostile peers rewrite."""
    return ArrayRecord({k: blob_array(b) for k, b in blobs_of(record).items()})


def contained(arrays: ArrayRecord) -> ArrayRecord:
    """Blob Arrays per tensor (whatever their bytes) as the one container Array that travels."""
    return ArrayRecord({CONTAINER_KEY: blob_array(pack({k: a.data for k, a in arrays.items()}))})


def wire_copy(content: RecordDict) -> RecordDict:
    """A deep copy through Flower's inflatable-object serialisation (what the wire carries)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    return inflate_object_from_contents(content.object_id, contents)


class FakeGrid(Grid):
    """Runs a ClientApp per node in-process; records every message it carries.

    Failure modes, each a map from node id to a callable deciding per message:

    ``fail``
        The node fails: an error reply instead of an answer.
    ``timeout``
        The node runs the message (its state changes) but the reply arrives after the
        round's timeout: the server gets nothing, as from Flower's Grid when a node is
        slow. The late reply is kept in ``late``.
    ``offline``
        The message never reaches the node: no reply, no state change.
    """

    def __init__(
        self,
        app: ClientApp,
        num_nodes: int,
        run_config: dict | None = None,
        node_config: Callable[[int], dict] | None = None,
    ) -> None:
        set_task_identity()
        self.app = app
        #: Per-node ClientApps that replace ``app`` (hostile or broken clients).
        self.apps: dict[int, ClientApp] = {}
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(
                run_id=1,
                node_id=nid,
                node_config=(node_config(i) if node_config else {"partition-id": i, "num-partitions": num_nodes}),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.fail: dict[int, Callable[[Message], bool]] = {}
        self.timeout: dict[int, Callable[[Message], bool]] = {}
        self.offline: dict[int, Callable[[Message], bool]] = {}
        self.late: list[Message] = []
        self._ids = itertools.count()

    # Grid API -----------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover - send_and_receive covers the tests
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.offline and self.offline[node](msg):
                continue
            delivered = Message(content=wire_copy(msg.content), metadata=msg.metadata)
            if node in self.fail and self.fail[node](msg):
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node failed"), reply_to=delivered)
            else:
                try:
                    reply = self.apps.get(node, self.app)(delivered, self.contexts[node])
                except Exception:  # the runtime turns ClientApp exceptions into error replies
                    reply = Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc()),
                        reply_to=delivered,
                    )
            if reply.has_content():
                reply = Message(content=wire_copy(reply.content), metadata=reply.metadata)
            if node in self.timeout and self.timeout[node](msg):
                self.late.append(reply)
                continue
            self.received.append(reply)
            replies.append(reply)
        return replies

    # Accounting ------------------------------------------------------------------------
    @staticmethod
    def array_bytes(messages: Iterable[Message]) -> int:
        """Array data bytes in messages (what qfl counts: len(Array.data))."""
        return sum(record_bytes(r) for m in messages if m.has_content() for r in m.content.array_records.values())


class AsyncFakeGrid(FakeGrid):
    """FakeGrid with push/pull: replies become visible after a per-node number of pulls.

    ``delays[node]`` pulls before a node's reply shows up (out-of-order arrival),
    ``silent`` nodes never answer, ``fail`` works as in FakeGrid.
    """

    def __init__(self, app: ClientApp, num_nodes: int, delays: dict[int, int] | None = None, **kwargs) -> None:
        super().__init__(app, num_nodes, **kwargs)
        self.delays = dict(delays or {})
        self.silent: set[int] = set()
        self.pulls = 0
        self.pending: dict[str, tuple[int, Message]] = {}  # message id -> (visible at pull, reply)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = mid = f"m{next(self._ids)}"
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            ids.append(mid)
            if node in self.silent:
                continue
            reply = self.send_and_receive_one(msg)
            self.pending[mid] = (self.pulls + self.delays.get(node, 0), reply)
        return ids

    def send_and_receive_one(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        delivered = Message(content=wire_copy(msg.content), metadata=msg.metadata)
        if node in self.fail and self.fail[node](msg):
            return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node failed"), reply_to=delivered)
        try:
            reply = self.apps.get(node, self.app)(delivered, self.contexts[node])
        except Exception:
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=traceback.format_exc()), reply_to=delivered
            )
        if reply.has_content():
            reply = Message(content=wire_copy(reply.content), metadata=reply.metadata)
        return reply

    def pull_messages(self, message_ids):
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            if mid in self.pending and self.pending[mid][0] <= self.pulls:
                out.append(self.pending.pop(mid)[1])
        self.received.extend(out)
        return out


class Capture(logging.Handler):
    """Collects Flower's log lines (its logger does not propagate to pytest's)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def __enter__(self) -> Capture:
        logging.getLogger("flwr").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("flwr").removeHandler(self)


__all__ = ["AsyncFakeGrid", "Capture", "FakeGrid", "set_task_identity", "wire_copy"]
