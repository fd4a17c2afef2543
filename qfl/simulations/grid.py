"""A Grid that lists nodes in partition order: seeded sampling then means the same clients.

Flower's strategies sample with ``random.sample(list(grid.get_node_ids()), k)``. Node
ids are drawn at random when nodes register and the SuperLink lists them in an order
of its own (in a deployment, the order in which SuperNodes happened to connect), so
even with ``random`` seeded, two runs could train different partitions in the same
round: a comparison then measures the luck of the draw as much as the method. Listed
by partition, a seeded ``random`` gives every run the same schedule of partitions;
replies, handed back in partition order rather than in order of arrival, are then
aggregated in the same order too, so that a rerun with the same seed sends the same
bytes and ends with the same model.

A seeded ``random`` alone is not enough: anything else in the ServerApp's process that
draws from the global ``random`` (the simulation engine's threads, a node that was slow
to answer and is listed later) shifts the draws. With ``seed`` given, the grid reseeds
``random`` from (seed, exchange count) each time the nodes are listed, so the sample of
round r depends on the seed and r only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from logging import WARNING

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from ..clients.records import record_bytes
from .results import ClientTraffic

#: The reply's MetricRecord key and entry the simulation ClientApp's query handler sets.
PARTITION_RECORD, PARTITION_ID = "partition", "partition-id"


class PartitionOrderedGrid(Grid):
    """Delegates to ``grid``; :meth:`get_node_ids` lists nodes by their partition id.

    Each node is asked its partition once, with a query message (the simulation
    ClientApp answers it, see ``qfl.simulations.client_app.query``); nodes that do not
    answer within ``timeout`` seconds, or answer without a partition, come last, by id,
    and are not asked again.
    """

    def __init__(self, grid: Grid, timeout: float = 120.0, seed: int | None = None) -> None:
        self.grid = grid
        self.timeout = timeout
        self.seed = seed
        #: send_and_receive calls so far (partition queries excepted): the round's sampling key.
        self.exchanges = 0
        #: node id -> partition id (None: asked, no answer).
        self.partitions: dict[int, int | None] = {}
        #: What each train/evaluate message carried since :meth:`take_traffic` (for the link model).
        self.traffic: list[ClientTraffic] = []

    # ------------------------------------------------------------------ ordering
    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes, ordered by (partition id, node id)."""
        ids = list(self.grid.get_node_ids())
        new = [n for n in ids if n not in self.partitions]
        if new:
            self._ask(new)
        if self.seed is not None:  # Flower samples from what this returns, with the global random
            random.seed(f"qfl-sampling:{self.seed}:{self.exchanges}")
        return sorted(ids, key=self._rank)

    def _rank(self, node: int) -> tuple[float, int]:
        partition = self.partitions.get(node)
        return (math.inf if partition is None else partition, node)

    def _ask(self, nodes: list[int]) -> None:
        self.partitions.update(dict.fromkeys(nodes))
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            record = None if reply.has_error() else reply.content.metric_records.get(PARTITION_RECORD)
            value = record.get(PARTITION_ID) if record is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and node in self.partitions:
                self.partitions[node] = value
            else:
                log(
                    WARNING,
                    "qfl: node %s did not say its partition (%s); it is sampled after the others",
                    node,
                    reply.error.reason if reply.has_error() else "no partition-id in the reply",
                )

    # ---------------------------------------------------------------- delegation
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The replies in partition order (floating-point sums depend on the order).

        Notes the array bytes each node received and sent back: a synchronous round
        lasts as long as its slowest client's download, training and upload, which the
        report's link model computes from these.
        """
        messages = list(messages)
        self.exchanges += 1
        down = {m.metadata.dst_node_id: _array_bytes(m) for m in messages}
        replies = sorted(
            self.grid.send_and_receive(messages, timeout=timeout), key=lambda m: self._rank(m.metadata.src_node_id)
        )
        up = {m.metadata.src_node_id: _array_bytes(m) for m in replies if not m.has_error()}
        for node in sorted(down, key=self._rank):
            self.traffic.append(
                ClientTraffic(
                    partition=self.partitions.get(node),
                    downlink_bytes=down[node],
                    uplink_bytes=up.get(node, 0),
                    replied=node in up,
                )
            )
        return replies

    def take_traffic(self) -> tuple[ClientTraffic, ...]:
        """The per-client traffic noted since the last call."""
        out, self.traffic = tuple(self.traffic), []
        return out


def _array_bytes(msg: Message) -> int:
    return sum(record_bytes(r) for r in msg.content.array_records.values()) if msg.has_content() else 0
