"""What each role spends, measured in the process where it is spent.

Not part of qfl, nor of a user's app: the benchmark's instruments, kept out of
``client_app.py``/``server_app.py``'s user code so that qfl stays two lines there.

Client: two mods around ``compression_mod``. ``outer_clock`` (listed before it) and
``inner_clock`` (after it) stamp the time, so that for a train message

* ``qfl-in-s``: from the outer to the inner stamp -- the downlink decoded and the
  model rebuilt by ``compression_mod`` (plain Flower: its pass-through);
* ``app-s``: the user's train function;
* ``qfl-out-s``: from the function's return to the outer stamp -- the update
  compressed with error memory and encoded;

and ``rss-mb``/``peak-rss-mb``, the client process's resident set now and at its
peak, are added to the reply's MetricRecord (finite numbers, as the server requires).

Server: :class:`Measured`, a strategy around the one the app runs (plain FedAvg or
``Compressed``) that times ``configure_train`` to the end of ``aggregate_train``
(the round's wall time) and ``aggregate_train`` alone (decode + validate + aggregate),
counts the bytes of every ``Array`` in the messages and replies it passes (what crosses
the wire, the same count for both), notes the server process's memory after every
round (and, for qfl, the bytes and node records its downlink keeps:
``ServerDownlink.state_size``), and which nodes it sampled for the first time or again
after skipping rounds.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

MB = 1 << 20

#: Stamps of the train message in flight (one at a time per process: a Ray actor or a
#: ClientApp process handles one message after the other).
_STAMPS: dict[str, float] = {}

#: The per-reply figures ``outer_clock`` adds, as :class:`Measured` reads them back.
CLIENT_KEYS = ("train-s", "app-s", "qfl-in-s", "qfl-out-s", "rss-mb", "peak-rss-mb")


def rss() -> int:
    """This process's resident set, bytes."""
    return psutil.Process().memory_info().rss


def commit(where: Path) -> str:
    """The short commit of the checkout ``where`` lies in ("unknown" outside git): what a
    benchmark's figures were measured on, printed with them."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except OSError:
        return "unknown"
    return proc.stdout.strip() or "unknown"


def peak_rss() -> int:
    """This process's peak resident set, bytes.

    Linux reports ``ru_maxrss`` in KiB and updates it lazily: right after the resident set
    grew it can read below the current one, which is then the peak.
    """
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss())


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".")[0] == "train"


def outer_clock(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """List first: times ``compression_mod`` around the user's function (see the module docstring)."""
    if not _is_train(msg):
        return call_next(msg, context)
    _STAMPS.clear()
    start = time.perf_counter()
    reply = call_next(msg, context)
    end = time.perf_counter()
    if reply.has_error() or not reply.has_content() or "app-end" not in _STAMPS:
        return reply  # refused before or by the user's function: nothing to time
    records = reply.content.metric_records
    if len(records) != 1:
        raise ValueError(f"outer_clock needs the reply to carry one MetricRecord, found {list(records)}")
    key, metrics = next(iter(records.items()))
    figures = {
        "qfl-in-s": _STAMPS["app-start"] - start,
        "app-s": _STAMPS["app-end"] - _STAMPS["app-start"],
        "qfl-out-s": end - _STAMPS["app-end"],
        "rss-mb": rss() / MB,
        "peak-rss-mb": peak_rss() / MB,
    }
    content = RecordDict(dict(reply.content.items()))
    content[key] = MetricRecord({**dict(metrics), **figures})
    reply.content = content
    return reply


def inner_clock(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """List last: stamps the user's function's start and return for :func:`outer_clock`."""
    _STAMPS["app-start"] = time.perf_counter()
    reply = call_next(msg, context)
    _STAMPS["app-end"] = time.perf_counter()
    return reply


def payload_bytes(msg: Message) -> int:
    """Bytes of every Array a message carries (qfl's blobs or Flower's serialized tensors)."""
    if msg.has_error() or not msg.has_content():
        return 0
    return sum(len(a.data) for record in msg.content.array_records.values() for a in record.values())


class Measured(Strategy):
    """``strategy`` unchanged, with every train round timed and counted in :attr:`rounds`."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.rounds: dict[int, dict] = {}
        self._last_round: dict[int, int] = {}  # node id -> last round it was sampled

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        start = time.perf_counter()
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        self.rounds[server_round] = {
            "start": start,
            "configure_s": time.perf_counter() - start,
            "messages": len(messages),
            "down_bytes": sum(payload_bytes(m) for m in messages),
            "first_contacts": sum(n not in self._last_round for n in nodes),
            "returning": sum(self._last_round.get(n, server_round - 1) < server_round - 1 for n in nodes),
        }
        self._last_round.update(dict.fromkeys(nodes, server_round))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        row = self.rounds[server_round]
        row["replies"] = len(replies)
        row["errors"] = sum(r.has_error() for r in replies)
        row["up_bytes"] = sum(payload_bytes(r) for r in replies)
        row["clients"] = [
            {k: float(m[k]) for k in CLIENT_KEYS if k in m}
            for r in replies
            if not r.has_error()
            for m in r.content.metric_records.values()
        ]
        start = time.perf_counter()
        out = self.strategy.aggregate_train(server_round, replies)
        end = time.perf_counter()
        row.update(
            aggregate_s=end - start,
            wall_s=end - row.pop("start"),
            server_rss_mb=rss() / MB,
            server_peak_rss_mb=peak_rss() / MB,
        )
        # qfl's own server state apart from the process's memory, which in Flower's
        # simulation engine also holds every node's context (qfl's client state).
        downlink = getattr(self.strategy, "downlink", None)
        if downlink is not None:
            size = downlink.state_size()
            row["server_state_bytes"] = sum(v for k, v in size.items() if k.endswith("_bytes"))
            row["server_state_nodes"] = size["nodes"]
        return out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
