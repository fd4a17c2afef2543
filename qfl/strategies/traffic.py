"""Bytes and reply counts per round and phase: what qfl reports next to the inner strategy's metrics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flwr.app import MetricRecord


@dataclass
class Traffic:
    """Bytes of one round and phase. ``*_full`` is what plain Flower would have sent.

    ``resyncs`` counts messages that carried a full model (first contact, or a replica
    the server could not vouch for), ``dropped`` replies that were refused (undecodable
    or invalid; ``guarded``: of those, the ones the :class:`UpdateGuard` or a clipping
    bound refused), ``failures`` error replies (the node failed, went away or could not
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
    guarded: int = 0
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
            "qfl.guarded": self.guarded,
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


def with_traffic(metrics: MetricRecord | None, traffic: Traffic) -> MetricRecord:
    """A copy of ``metrics`` with the round's ``qfl.*`` byte counts added."""
    out = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
    out.update(traffic.metrics())
    return out
