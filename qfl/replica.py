"""Downlink bookkeeping: what the server sends, and what each client holds.

Two modes.

``model`` (stateless, AsyLPG's quantized model): every message carries the current
model compressed by the downlink policy; nothing is remembered anywhere.

``anchor`` (Quantized Epoch-SGD): at the start of an epoch everyone receives the model
losslessly, the *anchor*; within the epoch every message carries C(w - anchor), one
payload shared by all. A client needs only the anchor, never a chain, so clients that
skip rounds cost nothing extra; one that lacks the anchor gets it with the payload.

``delta`` (stateful, server-side error feedback): the server keeps the *replica* R,
the model every synced client holds, and versions it. A new server model w becomes
version v+1 with R <- R + C(w - R): whatever C fails to send stays in w - R and is
sent later, which is exactly error feedback on the downlink. A client at version u
receives the encoded steps u+1..v (kept for the last ``history`` versions only, so
server memory is bounded); a client whose replica is missing, older than that, or
whose reported digest disagrees gets the replica itself, losslessly (a resync). Steps
are applied with the same code on both ends, and the client checks the digest of the
result, so a replica can never silently drift from the server's record of it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .codec import Tensors, apply_payload, compress_model, digest, model_delta
from .compress import IDENTITY, Payload
from .protocol import FULL, DownlinkHeader
from .spec import Policy
from .wire import encode


@dataclass(frozen=True)
class Offer:
    """One distinct downlink payload: encoded blobs per tensor, and the header saying what they are."""

    blobs: dict[str, bytes]
    header: DownlinkHeader
    kind: str  # "model", "full", "delta" or "current"

    @property
    def nbytes(self) -> int:
        """Bytes of the blobs (the container that carries them adds each tensor's name and length)."""
        return sum(map(len, self.blobs.values()))


class ServerDownlink:
    """Server side of the downlink (see module docstring).

    Parameters
    ----------
    mode : {"model", "delta"}
    policy : Policy
        Operator per tensor for the model (``model``) or for the steps (``delta``).
    history : int
        Delta steps kept, i.e. how far behind a client may be and still catch up
        without a resync.
    seed : int
        Seeds the server's compression randomness (reproducible runs).
    initial : Policy, optional
        Delta mode: the first replica is the *decoded* ``initial`` compression of the
        first model (e.g. an 8-bit grid), not the model itself. The difference is just
        a larger first residual that error feedback sends later, and the encoded first
        replica stays available as a checkpoint: a client without a replica gets it
        plus the chain of steps when that is cheaper than the current replica in full.
    """

    def __init__(
        self, mode: str, policy: Policy, history: int = 16, seed: int = 0, initial: Policy | None = None
    ) -> None:
        if mode not in ("model", "delta", "anchor"):
            raise ValueError(f"downlink mode must be 'model', 'delta' or 'anchor', got {mode!r}")
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.mode = mode
        self.policy = policy
        self.history = history
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.replica: Tensors | None = None
        self._model_digest: int | None = None
        self._steps: OrderedDict[int, dict[str, bytes]] = OrderedDict()  # version -> blob per tensor
        self._digests: OrderedDict[int, int] = OrderedDict()  # version -> replica digest
        self._offers: dict[object, Offer] = {}  # cache for the current version
        self.nodes: dict[int, int] = {}  # node id -> acknowledged replica version
        self._anchor_delta: dict[str, bytes] | None = None  # anchor mode: C(w - anchor) per tensor
        self._reanchor = False
        self.initial = initial
        self._checkpoint: tuple[int, dict[str, bytes]] | None = None  # (version, encoded replica)
        #: Resyncs offered, by reason: "new" (no record of the node: first contact, away
        #: for more than ``history`` versions, or records reset by a new anchor or a
        #: model of another structure), "behind" (a record, but no chain from it) and
        #: "lost" (the server forgot it: it failed, its reply was dropped, or its digest
        #: disagreed, and it has not acknowledged a replica since).
        self.resyncs: dict[str, int] = {"new": 0, "behind": 0, "lost": 0}
        self._lost: dict[int, int] = {}  # forgotten node -> version current when it was forgotten

    # --------------------------------------------------------------- server model
    def update(self, model: Tensors) -> bool:
        """Take the current server model; returns False if it is the one already taken."""
        d = digest(model)
        if d == self._model_digest:
            return False
        self._model_digest = d
        self._offers = {}
        if self.mode == "anchor":
            self._update_anchor(model)
            return True
        self.version += 1
        if self.mode == "model":
            payloads, _, _ = compress_model(model, self.policy, self.generator)
            self._offers["model"] = Offer(
                {k: encode(p) for k, p in payloads.items()}, DownlinkHeader("model", self.version), "model"
            )
            return True
        if (
            self.replica is None
            or self.replica.keys() != model.keys()
            or any(self.replica[k].shape != model[k].shape for k in model)
        ):
            # First model, or its structure changed: everyone starts over with a resync.
            if self.initial is None:
                self.replica = {k: v.detach().clone() for k, v in model.items()}
                self._checkpoint = None
            else:
                payloads, sent, _ = compress_model(model, self.initial, self.generator)
                self.replica = {k: sent[k].to(model[k].dtype) for k in model}
                self._checkpoint = (self.version, {k: encode(p) for k, p in payloads.items()})
            self._steps.clear()
            self._digests.clear()
            self.nodes.clear()
        else:
            # Replica dtypes stay those of the first model: FedAvg turns int64 counters
            # into float64 after aggregating, and clients cast them back on loading anyway.
            target = {k: model[k].to(self.replica[k].dtype) for k in model}
            delta = {k: model_delta(target[k], self.replica[k]) for k in model}
            payloads, _, _ = compress_model(delta, self.policy, self.generator, keep_sent=False)
            self.replica = {k: apply_payload(self.replica[k], payloads[k]) for k in model}
            self._steps[self.version] = {k: encode(p) for k, p in payloads.items()}
            while len(self._steps) > self.history:
                self._steps.popitem(last=False)
            if self._checkpoint is not None and self._checkpoint[0] + 1 not in self._steps:
                self._checkpoint = None  # the chain from it is gone: useless now
        self._digests[self.version] = digest(self.replica)
        while len(self._digests) > self.history + 1:
            self._digests.popitem(last=False)
        self._prune()
        return True

    def _prune(self) -> None:
        """Forget records older than the digests kept: such a node gets a resync anyway,
        and the records stay bounded by the nodes seen within ``history`` versions, not
        by every node that ever took part."""
        oldest = next(iter(self._digests), self.version)
        for table in (self.nodes, self._lost):
            for node in [n for n, v in table.items() if v < oldest]:
                del table[node]

    def new_epoch(self) -> None:
        """Anchor mode: the next model becomes the new anchor (sent losslessly to all)."""
        self._reanchor = True
        self._model_digest = None

    def _update_anchor(self, model: Tensors) -> None:
        if (
            self._reanchor
            or self.replica is None
            or self.replica.keys() != model.keys()
            or any(self.replica[k].shape != model[k].shape for k in model)
        ):
            self._reanchor = False
            self.version += 1
            self.replica = {k: v.detach().clone() for k, v in model.items()}
            self._anchor_delta = None
            self.nodes.clear()
            self._digests.clear()
            self._digests[self.version] = digest(self.replica)
            return
        target = {k: model[k].to(self.replica[k].dtype) for k in model}
        delta = {k: model_delta(target[k], self.replica[k]) for k in model}
        payloads, _, _ = compress_model(delta, self.policy, self.generator)
        self._anchor_delta = {k: encode(p) for k, p in payloads.items()}

    # ------------------------------------------------------------------- offers
    def offer(self, node_id: int) -> Offer:
        """The payload for one node (shared with every node in the same situation)."""
        if self.mode == "model":
            return self._offers["model"]
        if self.mode == "anchor":
            key: object = "current" if self.nodes.get(node_id) == self.version else "full"
            if key == "full":
                self._count_resync(node_id)
            if key not in self._offers:
                self._offers[key] = self._build_anchor(key == "full")
            return self._offers[key]
        have = self.nodes.get(node_id)
        if have is None or have not in self._digests or (have < self.version and have + 1 not in self._steps):
            key: object = "full"
            self._count_resync(node_id)
        else:
            key = have
        if key not in self._offers:
            self._offers[key] = self._build(key)
        return self._offers[key]

    def _count_resync(self, node_id: int) -> None:
        if node_id in self._lost:  # stays "lost" until it acknowledges a replica again
            self.resyncs["lost"] += 1
        else:
            self.resyncs["new" if node_id not in self.nodes else "behind"] += 1

    def _build_anchor(self, with_anchor: bool) -> Offer:
        assert self.replica is not None
        header = DownlinkHeader(
            "anchor", self.version, FULL if with_anchor else self.version, self._digests[self.version]
        )
        blobs = {}
        for k, v in self.replica.items():
            head = encode(IDENTITY.compress(v)) if with_anchor else b""
            blobs[k] = head + (self._anchor_delta[k] if self._anchor_delta is not None else b"")
        kind = "full" if with_anchor else ("delta" if self._anchor_delta is not None else "current")
        return Offer(blobs, header, kind)

    def _build(self, key: object) -> Offer:
        assert self.replica is not None
        if key == "full":
            # A resync: the replica itself, losslessly (identity blobs in the model's own
            # dtypes), or the checkpoint and the steps since, whichever is smaller.
            blobs = {k: encode(IDENTITY.compress(v)) for k, v in self.replica.items()}
            if self._checkpoint is not None:
                version, base = self._checkpoint
                steps = [self._steps[v] for v in range(version + 1, self.version + 1)]
                chained = {k: b"".join([base[k], *(s[k] for s in steps)]) for k in self.replica}
                if sum(map(len, chained.values())) < sum(map(len, blobs.values())):
                    blobs = chained
            return Offer(blobs, DownlinkHeader("delta", self.version, FULL, self._digests[self.version]), "full")
        base = int(key)  # type: ignore[arg-type]
        steps = [self._steps[v] for v in range(base + 1, self.version + 1)]
        blobs = {k: b"".join(s[k] for s in steps) for k in self.replica}
        return Offer(
            blobs,
            DownlinkHeader("delta", self.version, base, self._digests[self.version]),
            "delta" if steps else "current",
        )

    # ----------------------------------------------------------------- clients
    def acknowledge(self, node_id: int, version: int, replica_digest: int) -> bool:
        """A client reports its replica; False (and a resync next time) if it disagrees."""
        if self.mode == "model":
            return True
        if self._digests.get(version) == replica_digest:
            self.nodes[node_id] = version
            self._lost.pop(node_id, None)
            return True
        self.forget(node_id)
        return False

    def forget(self, node_id: int) -> None:
        """Assume nothing about a node's replica (it failed, or replied with nonsense)."""
        if self.mode != "model":
            self.nodes.pop(node_id, None)
            self._lost[node_id] = self.version

    def state_size(self) -> dict[str, int]:
        """What the downlink keeps, for memory accounting.

        Bounded by construction: at most ``history`` encoded steps (and one checkpoint)
        and ``history + 1`` digests, one replica, cached offers for the current version
        only, and two integers per node seen within the last ``history`` versions.
        """
        step_bytes = sum(len(b) for s in self._steps.values() for b in s.values())
        replica_bytes = sum(t.numel() * t.element_size() for t in (self.replica or {}).values())
        checkpoint_bytes = sum(map(len, self._checkpoint[1].values())) if self._checkpoint else 0
        anchor_bytes = sum(map(len, self._anchor_delta.values())) if self._anchor_delta else 0
        offer_bytes = sum(o.nbytes for o in self._offers.values())
        return {
            "steps": len(self._steps),
            "step_bytes": step_bytes,
            "replica_bytes": replica_bytes,
            "checkpoint_bytes": checkpoint_bytes + anchor_bytes,
            "offer_bytes": offer_bytes,
            "offers": len(self._offers),
            "nodes": len(self.nodes) + len(self._lost),
            "digests": len(self._digests),
        }


# ============================================================================ client
#: What a client holds between messages: its replica (or anchor) and that replica's version.
Held = tuple[Tensors, int]


class DownlinkError(ValueError):
    """The client cannot rebuild the model from this message (it needs a resync)."""


def client_model(
    arrays: Mapping[str, list[Payload]], header: DownlinkHeader, held: Held | None
) -> tuple[Tensors, Tensors | None]:
    """(model the message stands for, replica to hold from now on or None to keep ``held``).

    Pure: the caller persists the new replica (at ``header.version``, digest
    ``header.digest``) only once the whole message went through, so a message that
    fails leaves the client's state as it was. Raises DownlinkError with the reason
    when the replica is missing, at an unservable version, or ends up with another
    digest than the server's; the server then resyncs the node.
    """
    if header.mode == "model":
        out = {}
        for k, ps in arrays.items():
            if len(ps) != 1:
                raise DownlinkError(f"{k}: a model-mode message carries {len(ps)} payloads, expected 1")
            out[k] = ps[0].decompress()
        return out, None
    if header.mode == "anchor":
        return _anchor_model(arrays, header, held)
    target = header.version
    if header.base == FULL:
        # A resync: the first payload of each tensor is a base replica, any others are
        # the steps from it (a checkpoint and its chain).
        counts = {len(ps) for ps in arrays.values()}
        if len(counts) != 1 or 0 in counts:
            raise DownlinkError(f"a resync carries {sorted(counts)} payloads per tensor, expected one count >= 1")
        replica = {k: ps[0].decompress() for k, ps in arrays.items()}
        for j in range(1, counts.pop()):
            replica = {k: _step(replica[k], arrays[k][j], k) for k in replica}
    else:
        if held is None:
            raise DownlinkError(f"no replica held (state lost?); version {target} needs a full model")
        replica, have = held
        if not header.base <= have <= target:
            raise DownlinkError(f"replica is at version {have}, this message brings {header.base} -> {target}")
        if replica.keys() != arrays.keys():
            raise DownlinkError("the message's tensors differ from the replica's")
        for k, ps in arrays.items():
            if len(ps) != header.steps:
                raise DownlinkError(f"{k}: {len(ps)} steps for versions {header.base} -> {target}")
        for j in range(have - header.base, header.steps):
            replica = {k: _step(replica[k], arrays[k][j], k) for k in replica}
    if digest(replica) != header.digest:
        raise DownlinkError(f"replica digest after version {target} differs from the server's")
    return replica, replica


def _step(base: torch.Tensor, payload: Payload, name: str) -> torch.Tensor:
    """``base`` plus one decoded step, refused unless the step has the replica's shape."""
    if payload.shape != tuple(base.shape):
        raise DownlinkError(f"{name}: a step of shape {payload.shape} for a replica of shape {tuple(base.shape)}")
    return apply_payload(base, payload)


def _anchor_model(
    arrays: Mapping[str, list[Payload]], header: DownlinkHeader, held: Held | None
) -> tuple[Tensors, Tensors | None]:
    """Anchor mode: anchor (from the message or the state) plus the shared difference."""
    new_anchor = None
    if header.base == FULL:
        anchor = {k: ps[0].decompress() for k, ps in arrays.items() if ps}
        if anchor.keys() != arrays.keys() or digest(anchor) != header.digest:
            raise DownlinkError(f"the anchor of version {header.version} does not match the server's digest")
        new_anchor = anchor
        rest = {k: ps[1:] for k, ps in arrays.items()}
    else:
        if held is None or held[1] != header.base:
            raise DownlinkError(
                f"anchor version {header.base} is needed, the client holds {None if held is None else held[1]}"
            )
        anchor = held[0]
        if anchor.keys() != arrays.keys():
            raise DownlinkError("the message's tensors differ from the anchor's")
        rest = dict(arrays)
    if any(len(ps) > 1 for ps in rest.values()):
        raise DownlinkError("an anchor-mode message carries more than one difference per tensor")
    return {k: _step(anchor[k], rest[k][0], k) if rest[k] else anchor[k] for k in anchor}, new_anchor


__all__ = ["DownlinkError", "Held", "Offer", "ServerDownlink", "client_model"]
