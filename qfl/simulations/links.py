"""A link model: what a round would take on real networks, from the bytes each client moved.

Bytes are what compression saves, but what a user waits for is time. A synchronous
round lasts as long as its slowest sampled client takes to download the model, run its
local steps and upload its update, so a few clients on a slow link set the pace of
everyone. This module turns the per-client bytes a run recorded into that simulated
wall-clock time, for heterogeneous profiles::

    slow: share=0.25, up=1, down=4, latency=50, step=0.05; fast: up=50, down=100, latency=20, step=0.05

``up``/``down`` are Mbit/s, ``latency`` milliseconds (paid once per direction), ``step``
seconds per local step of the device; ``share`` is the fraction of clients with the
profile (the last profile takes what is left). Partitions are assigned to profiles in
order: the first ``share * N`` partition ids get the first profile, and so on. Training
is unaffected: the model is applied to the recorded bytes afterwards, so the same run
can be judged under several link models.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .results import ClientTraffic

_KEYS = {"share", "up", "down", "latency", "step"}


@dataclass(frozen=True)
class LinkProfile:
    """One kind of client device and connection."""

    name: str
    share: float | None
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float
    step_s: float

    def seconds(self, downlink_bytes: int, uplink_bytes: int, local_steps: int) -> float:
        """Download, train, upload: one client's part of a round."""
        return (
            2 * self.latency_ms / 1000
            + downlink_bytes * 8 / (self.downlink_mbps * 1e6)
            + local_steps * self.step_s
            + uplink_bytes * 8 / (self.uplink_mbps * 1e6)
        )


@dataclass(frozen=True)
class LinkModel:
    """Profiles in assignment order (see the module docstring)."""

    profiles: tuple[LinkProfile, ...]

    def __str__(self) -> str:
        return "; ".join(
            f"{p.name}: "
            + ", ".join(
                [
                    *([f"share={p.share:g}"] if p.share is not None else []),
                    f"up={p.uplink_mbps:g}",
                    f"down={p.downlink_mbps:g}",
                    f"latency={p.latency_ms:g}",
                    f"step={p.step_s:g}",
                ]
            )
            for p in self.profiles
        )

    def profile_of(self, partition: int | None, num_clients: int) -> LinkProfile:
        """The profile of a partition (a node that did not say its partition gets the last one)."""
        if partition is None:
            return self.profiles[-1]
        start = 0
        for p in self.profiles[:-1]:
            end = start + round((p.share or 0.0) * num_clients)
            if start <= partition < end:
                return p
            start = end
        return self.profiles[-1]

    def round_seconds(self, clients: Iterable[ClientTraffic], num_clients: int, local_steps: int) -> float:
        """A synchronous round: its slowest client (0 for a round without clients)."""
        return max(
            (
                self.profile_of(c.partition, num_clients).seconds(c.downlink_bytes, c.uplink_bytes, local_steps)
                for c in clients
            ),
            default=0.0,
        )

    def counts(self, num_clients: int) -> dict[str, int]:
        """Clients per profile."""
        out = {p.name: 0 for p in self.profiles}
        for i in range(num_clients):
            out[self.profile_of(i, num_clients).name] += 1
        return out


def parse_links(text: str) -> LinkModel:
    """Parse a link spec (module docstring); ValueError naming the bad part."""
    profiles = []
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise ValueError("a link model needs at least one profile, e.g. 'all: up=10, down=50, latency=20, step=0.05'")
    for i, part in enumerate(parts):
        name, sep, body = part.partition(":")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise ValueError(f"link profile {part.strip()!r}: expected 'name: key=value, ...'")
        values: dict[str, float] = {}
        for item in body.split(","):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or key not in _KEYS or key in values:
                raise ValueError(
                    f"link profile {name!r}: bad or repeated setting {item.strip()!r} "
                    f"(keys: {', '.join(sorted(_KEYS))})"
                )
            try:
                values[key] = float(raw)
            except ValueError:
                raise ValueError(f"link profile {name!r}: {key} must be a number, got {raw.strip()!r}") from None
            if not math.isfinite(values[key]) or values[key] < 0:
                raise ValueError(f"link profile {name!r}: {key} must be a finite number >= 0")
        missing = {"up", "down", "latency", "step"} - values.keys()
        if missing:
            raise ValueError(f"link profile {name!r}: missing {', '.join(sorted(missing))}")
        if values["up"] <= 0 or values["down"] <= 0:
            raise ValueError(f"link profile {name!r}: up and down must be positive (Mbit/s)")
        last = i == len(parts) - 1
        if not last and "share" not in values:
            raise ValueError(f"link profile {name!r}: every profile but the last needs a share")
        profiles.append(
            LinkProfile(name, values.get("share"), values["up"], values["down"], values["latency"], values["step"])
        )
    shares = sum(p.share or 0.0 for p in profiles[:-1])
    if shares > 1 + 1e-9 or (profiles[-1].share is not None and abs(shares + profiles[-1].share - 1) > 1e-9):
        raise ValueError(f"link profile shares must add up to at most 1 (the last takes the rest), got {text!r}")
    if len({p.name for p in profiles}) != len(profiles):
        raise ValueError("link profile names must be distinct")
    return LinkModel(tuple(profiles))


def time_series(
    rounds: Sequence[Sequence[ClientTraffic]], model: LinkModel, num_clients: int, local_steps: int
) -> list[float]:
    """Cumulative simulated seconds after each record."""
    out, total = [], 0.0
    for clients in rounds:
        total += model.round_seconds(clients, num_clients, local_steps)
        out.append(total)
    return out
