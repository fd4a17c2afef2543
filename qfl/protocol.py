"""What ``Compressed`` and ``compression_mod`` tell each other, as one typed vocabulary.

Every ``qfl.*`` key that crosses the wire is written and read here and nowhere else.
Each message is a frozen dataclass with ``to_config`` (a flat dict of ConfigRecord
values) and ``from_config``, which treats its input as untrusted: a missing key, a
value of the wrong type (a list where an int belongs, a bool passed as an int, a float
that is NaN or infinite) or out of range raises :class:`ProtocolError` naming the key.
Callers turn that into a dropped reply (server) or an error reply with the client's
state untouched (client), never an exception escaping into Flower.

No Flower import: the dicts become ConfigRecords in ``qfl.strategies`` and
``qfl.clients``, which own the conversion to Flower's records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .spec import Policy

#: Prefix of every qfl entry in a message's ConfigRecord; the mod strips them before the user's code runs.
PREFIX = "qfl."
#: Key of the ConfigRecord in which a client's reply reports its qfl state.
REPLY_KEY = "qfl"
#: ``DownlinkHeader.base`` of a message carrying a whole model (a resync, or an epoch's anchor).
FULL = -1
#: Largest integer a field may hold: Flower carries ConfigRecord ints as sint64.
MAX_INT = 2**63 - 1
#: Longest string field accepted (specs, keys): a peer cannot make the receiver parse megabytes.
MAX_STR = 4096
#: Most per-name overrides accepted.
MAX_OVERRIDES = 256

#: Config key in which Flower's client-side DP wrappers send the clipping norm
#: (``KEY_CLIPPING_NORM`` of Flower's differential-privacy module, which moved between
#: flwr 1.39 and 1.41); qfl keeps that bound on what it sends.
CLIPPING_NORM = "clipping_norm"

DOWNLINK_MODES = ("model", "delta", "anchor")
REPLY_KINDS = ("update", "report")

_MODE, _BASE, _VERSION, _DIGEST = "qfl.mode", "qfl.base", "qfl.version", "qfl.digest"
_KEY, _EF, _SEED, _ROUND, _SESSION = "qfl.key", "qfl.error-feedback", "qfl.seed", "qfl.round", "qfl.session"
_UPLINK = "qfl.uplink"
_KIND, _STATE_BYTES, _FULL_BYTES = "qfl.kind", "qfl.state-bytes", "qfl.full-bytes"


class ProtocolError(ValueError):
    """A peer's qfl field is missing, of the wrong type or out of range."""


# ------------------------------------------------------------------ field readers
def _get(config: Mapping[str, Any], key: str) -> Any:
    try:
        return config[key]
    except KeyError:
        raise ProtocolError(f"missing field {key!r}") from None


def read_int(config: Mapping[str, Any], key: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """An integer in ``[lo, hi]``; bools (a subclass of int in Python) are refused."""
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"field {key!r} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} = {v} is outside [{lo}, {hi}]")
    return v


def read_bool(config: Mapping[str, Any], key: str) -> bool:
    v = _get(config, key)
    if not isinstance(v, bool):
        raise ProtocolError(f"field {key!r} must be a bool, got {type(v).__name__}")
    return v


def read_str(config: Mapping[str, Any], key: str, choices: tuple[str, ...] | None = None) -> str:
    v = _get(config, key)
    if not isinstance(v, str) or len(v) > MAX_STR:
        raise ProtocolError(f"field {key!r} must be a string of at most {MAX_STR} characters")
    if choices is not None and v not in choices:
        raise ProtocolError(f"field {key!r} = {v!r} is not one of {choices}")
    return v


def read_float(config: Mapping[str, Any], key: str, lo: float = 0.0, hi: float = math.inf) -> float:
    """A finite number in ``[lo, hi]`` (ints accepted, bools and NaN/Inf refused)."""
    v = _get(config, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProtocolError(f"field {key!r} must be a number, got {type(v).__name__}")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise ProtocolError(f"field {key!r} = {v} is not a finite number in [{lo}, {hi}]")
    return float(v)


def _str_list(config: Mapping[str, Any], key: str) -> list[str]:
    v = config.get(key, [])
    if (
        not isinstance(v, list)
        or len(v) > MAX_OVERRIDES
        or not all(isinstance(s, str) and len(s) <= MAX_STR for s in v)
    ):
        raise ProtocolError(f"field {key!r} must be a list of at most {MAX_OVERRIDES} strings")
    return v


# ------------------------------------------------------------------ server -> client
@dataclass(frozen=True)
class Settings:
    """How a client treats one message: where the model is, how to compress the update.

    ``round`` varies the client's randomness per round (or server version, in async
    mode); ``session`` names the strategy instance, so a client drops the replica and
    error memory another strategy left in its ``context.state``.
    """

    key: str
    uplink: Policy
    error_feedback: bool
    seed: int
    round: int
    session: int

    def to_config(self) -> dict[str, Any]:
        return {
            **self.uplink.to_config(_UPLINK),
            _KEY: self.key,
            _EF: self.error_feedback,
            _SEED: self.seed,
            _ROUND: self.round,
            _SESSION: self.session,
        }

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> Settings:
        patterns, specs = (
            _str_list(config, f"{_UPLINK}.override-patterns"),
            _str_list(config, f"{_UPLINK}.override-specs"),
        )
        if len(patterns) != len(specs):
            raise ProtocolError(f"{len(patterns)} override patterns but {len(specs)} override specs")
        spec = read_str(config, f"{_UPLINK}.spec")
        min_elements = read_int(config, f"{_UPLINK}.min-elements")
        try:
            policy = Policy.build(spec, min_elements, dict(zip(patterns, specs)))
        except ValueError as exc:
            raise ProtocolError(f"uplink policy: {exc}") from None
        return Settings(
            read_str(config, _KEY),
            policy,
            read_bool(config, _EF),
            read_int(config, _SEED),
            read_int(config, _ROUND),
            read_int(config, _SESSION),
        )


@dataclass(frozen=True)
class DownlinkHeader:
    """What the model payload of one message is.

    ``model``: the (compressed) model itself. ``delta``: the steps ``base+1..version``
    to apply to the replica held at ``base``, or with ``base == FULL`` a replica (and
    the steps from it); the result must have digest ``digest`` (:func:`qfl.codec.digest`).
    ``anchor``: the difference to the epoch's anchor at ``version``, preceded by the
    anchor itself when ``base == FULL``.
    """

    mode: str
    version: int
    base: int | None = None
    digest: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in DOWNLINK_MODES:
            raise ProtocolError(f"downlink mode must be one of {DOWNLINK_MODES}, got {self.mode!r}")
        if self.mode != "model" and (self.base is None or self.digest is None):
            raise ProtocolError(f"a {self.mode}-mode header needs a base and a digest")
        if self.base is not None and self.base != FULL and not 0 <= self.base <= self.version:
            raise ProtocolError(f"base version {self.base} is neither {FULL} nor in [0, {self.version}]")

    @property
    def steps(self) -> int:
        """Steps the payload carries per tensor after its base (delta mode, not a resync)."""
        return self.version - self.base if self.base not in (None, FULL) else 0

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {_MODE: self.mode, _VERSION: self.version}
        if self.base is not None:
            out[_BASE] = self.base
        if self.digest is not None:
            out[_DIGEST] = self.digest
        return out

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> DownlinkHeader:
        mode = read_str(config, _MODE, DOWNLINK_MODES)
        version = read_int(config, _VERSION)
        if mode == "model":
            return DownlinkHeader(mode, version)
        return DownlinkHeader(mode, version, read_int(config, _BASE, FULL), read_int(config, _DIGEST, 0, 2**32 - 1))


def is_qfl_config(config: Mapping[str, Any]) -> bool:
    """Whether a ConfigRecord carries qfl settings (the mod must act on the message)."""
    return _MODE in config


def strip(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries the user's code should see: everything but qfl's."""
    return {k: v for k, v in config.items() if not k.startswith(PREFIX)}


# ------------------------------------------------------------------ client -> server
@dataclass(frozen=True)
class ReplyInfo:
    """What a client's reply reports besides its payload.

    ``kind`` is ``update`` for a train reply (its ArrayRecord is the compressed update)
    and ``report`` for an evaluate reply. ``replica`` is the (version, digest) the
    client holds after the message (delta and anchor modes), ``state_bytes`` what it
    keeps in ``context.state``, ``full_bytes`` the size of the ArrayRecord the user's
    code returned, i.e. what plain Flower would have carried up.
    """

    kind: str
    state_bytes: int
    replica: tuple[int, int] | None = None
    full_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in REPLY_KINDS:
            raise ProtocolError(f"reply kind must be one of {REPLY_KINDS}, got {self.kind!r}")
        if (self.kind == "update") != (self.full_bytes is not None):
            raise ProtocolError("an update reports full_bytes, a report does not")

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {_KIND: self.kind, _STATE_BYTES: self.state_bytes}
        if self.replica is not None:
            out[_VERSION], out[_DIGEST] = self.replica
        if self.full_bytes is not None:
            out[_FULL_BYTES] = self.full_bytes
        return out

    @staticmethod
    def from_config(config: Mapping[str, Any]) -> ReplyInfo:
        known = {_KIND, _STATE_BYTES, _VERSION, _DIGEST, _FULL_BYTES}
        extra = sorted(set(config) - known)
        if extra:
            raise ProtocolError(f"unexpected fields {extra}")
        if (_VERSION in config) != (_DIGEST in config):
            raise ProtocolError(f"{_VERSION!r} and {_DIGEST!r} come together")
        replica = (read_int(config, _VERSION), read_int(config, _DIGEST, 0, 2**32 - 1)) if _VERSION in config else None
        return ReplyInfo(
            read_str(config, _KIND, REPLY_KINDS),
            read_int(config, _STATE_BYTES),
            replica,
            read_int(config, _FULL_BYTES) if _FULL_BYTES in config else None,
        )


__all__ = [
    "CLIPPING_NORM",
    "DOWNLINK_MODES",
    "FULL",
    "PREFIX",
    "REPLY_KEY",
    "DownlinkHeader",
    "ProtocolError",
    "ReplyInfo",
    "Settings",
    "is_qfl_config",
    "read_bool",
    "read_float",
    "read_int",
    "read_str",
    "strip",
]
