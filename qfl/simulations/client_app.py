"""The simulation's ClientApp: the reference torch client on its partition of the workload.

Partition and node identity come from the node config (``partition-id``,
``num-partitions``: set by the simulation engine, or by ``--node-config`` on a real
SuperNode); everything else from the run config. The data of a partition is cached
per process: Ray actors serve many messages, while a deployment's ClientApp process
serves one and pays the (~0.1 s) load.

Set ``QFL_CLIENT_TRACE=<file>`` in the environment of the SuperNodes (or of the
simulation) to have every train message append one JSON line to that file: process,
node, partition, the downlink replica and the error memory found in ``context.state``.
It shows where the code runs and that client state survives between messages even
though a deployment runs every message in a fresh ClientApp process.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict

import qfl

from ..clients import compression_mod, make_client_app
from ..clients.state import held_memory, replica_info
from .models import build_model
from .settings import Settings


def _settings(context: Context) -> Settings:
    return Settings.from_run_config(dict(context.run_config))


def _partition(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError(
            "node config needs 'partition-id' and 'num-partitions' "
            '(flower-supernode --node-config "partition-id=0 num-partitions=N")'
        )
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


@functools.lru_cache(maxsize=4)
def _data(pid: int, n: int, s: Settings):
    return s.workload.client_data(s, pid, n)


def model_fn(context: Context):
    """Every client builds the same architecture; weights come from the server."""
    s = _settings(context)
    return build_model(s.model_name, s.seed)


def data_fn(context: Context):
    """(train x, train y, validation x, validation y) of this node's partition."""
    s = _settings(context)
    pid, n = _partition(context)
    return _data(pid, n, s)


def slowdown(context: Context, seconds: float) -> None:
    """Emulate a slower device: a ``slow-clients`` fraction of partitions (the highest
    ids) take ``slow-factor`` times as long; used to show what asynchrony buys."""
    s = _settings(context)
    pid, n = _partition(context)
    if s.slow_factor > 1 and pid >= n - round(s.slow_clients * n):
        time.sleep(seconds * (s.slow_factor - 1))


#: Environment variable naming the trace file (see the module docstring).
TRACE_ENV = "QFL_CLIENT_TRACE"


def trace(context: Context, memory) -> None:
    """Append this train message's view of the client state to ``$QFL_CLIENT_TRACE``.

    ``memory`` is the error memory the message found (the client's earlier rounds);
    the replica is the one ``compression_mod`` decoded this message into, which it keeps
    in ``context.state`` only once the message went through.
    """
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    held = replica_info(context.state)
    line = {
        "time": time.time(),
        "pid": os.getpid(),
        "node_id": context.node_id,
        "partition_id": context.node_config.get("partition-id"),
        "replica_version": held[0] if held else None,
        "replica_digest": held[1] if held else None,
        "memory_norm": float(torch.sqrt(sum((t.double() ** 2).sum() for t in memory.values()))) if memory else None,
        "qfl": str(Path(qfl.__file__).parent),
    }
    # One write of one line to a file opened for appending: lines of concurrent
    # ClientApps do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def trace_mod(msg: Message, context: Context, call_next) -> Message:
    """Outside ``compression_mod``: trace a train message once it went through (opt-in)."""
    if not os.environ.get(TRACE_ENV) or msg.metadata.message_type.split(".")[0] != MessageType.TRAIN:
        return call_next(msg, context)
    memory = held_memory(context.state)
    reply = call_next(msg, context)
    if not reply.has_error():
        trace(context, memory)
    return reply


# Local training reads local-steps, local-epochs, batch-size, lr, momentum from the run
# config (and a server-sent ConfigRecord may override lr, as Quantized Epoch-SGD does).
app = make_client_app(model_fn, data_fn, on_trained=slowdown, mods=(trace_mod, compression_mod))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Say which partition this node trains on (the server orders nodes by it)."""
    pid, n = _partition(context)
    return Message(RecordDict({"partition": MetricRecord({"partition-id": pid, "num-partitions": n})}), reply_to=msg)
