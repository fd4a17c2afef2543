"""The result file of one run: written by the ServerApp, read by the comparison.

One schema, declared once as frozen dataclasses. :meth:`RunResult.to_json` is what the
ServerApp writes to ``<results-dir>/<label>.json``; :meth:`RunResult.from_json` is what
the report reads, and it checks every field against the same declarations, naming the
file and the field that is wrong: a file written by another version, edited by hand or
truncated must fail loudly, not drop a method from a comparison.

Only the standard library here: the report imports this on machines without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ClientTraffic:
    """One sampled client in one round: what it received and sent (for the link model)."""

    partition: int | None  # None: the node did not say
    downlink_bytes: int
    uplink_bytes: int
    replied: bool


@dataclass(frozen=True)
class RoundRecord:
    """One evaluated round (a server version for asynchronous runs).

    Byte and protocol counts are those since the previous record. ``accuracy`` is a
    fraction in [0, 1] (a percentage would make every target 100 times too easy).
    """

    round: int
    accuracy: float
    loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    uplink_full_bytes: int | None = None
    downlink_full_bytes: int | None = None
    wall_time: float | None = None
    messages: int | None = None
    replies: int | None = None
    resyncs: int | None = None
    dropped: int | None = None
    failures: int | None = None
    #: Why clients were resynced so far (cumulative), by reason.
    resync_reasons: dict[str, int] | None = None
    #: What the server's downlink keeps (``ServerDownlink.state_size``).
    server_state: dict[str, int] | None = None
    #: The largest ``context.state`` a reply reported since the previous record.
    client_state_bytes: int | None = None
    server_rss_mb: float | None = None
    #: Per sampled client, in partition order (synchronous runs).
    clients: tuple[ClientTraffic, ...] = ()


@dataclass(frozen=True)
class RunResult:
    """One method trained with one seed; ``config`` is its whole run config."""

    label: str
    method: str
    seed: int
    uplink: str
    downlink: str
    error_feedback: bool
    config: dict[str, Any]
    model_parameters: int | None
    rounds: tuple[RoundRecord, ...]
    is_async: bool = False
    #: Where the code came from (qfl path, flwr version, git commit when known).
    runtime: dict[str, Any] = field(default_factory=dict)
    #: The file it was read from, for error messages (not written).
    source: str = field(default="<memory>", compare=False)

    # ------------------------------------------------------------------ writing
    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``async`` is a keyword in Python, a key on disk)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["async"] = out.pop("is_async")
        return out

    def save(self, path: str | Path) -> Path:
        """Write the file (indented: result files are committed and diffed)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ reading
    @staticmethod
    def from_json(obj: Any, source: str = "<memory>") -> RunResult:
        """Validate a decoded file; ValueError naming ``source`` and the field."""
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: a result file holds a JSON object, got {type(obj).__name__}")
        obj = dict(obj)
        if "async" in obj:
            obj["is_async"] = obj.pop("async")
        run = _build(RunResult, obj, source, "")
        if not run.rounds:
            raise ValueError(f"{source}: field 'rounds' is empty")
        for i, (a, b) in enumerate(zip(run.rounds, run.rounds[1:]), start=1):
            if b.round <= a.round:
                raise ValueError(f"{source}: field 'rounds[{i}].round' must increase, got {b.round} after {a.round}")
        return dataclasses.replace(run, source=source)

    @staticmethod
    def load(path: str | Path) -> RunResult:
        """Read and validate one result file."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return RunResult.from_json(obj, source=str(path))


# ---------------------------------------------------------------------- validation
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type, obj: Any, source: str, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``obj``, checking every field's type."""
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: field {where or 'top level'!r} must be an object, got {type(obj).__name__}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        at = f"{where}.{f.name}" if where else f.name
        if f.name not in obj:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{source}: field {at!r} is missing")
            continue
        values[f.name] = _value(hints[f.name], obj[f.name], source, at)
    unknown = sorted(set(obj) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(
            f"{source}: unknown field(s) {', '.join(repr(f'{where}.{k}' if where else k) for k in unknown)}"
        )
    out = cls(**values)
    if cls is RoundRecord and not 0.0 <= out.accuracy <= 1.0:
        raise ValueError(f"{source}: field {where + '.accuracy'!r} must be a fraction in [0, 1], got {out.accuracy}")
    return out


def _value(hint: Any, v: Any, source: str, at: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _value(hint, v, source, at)
    if dataclasses.is_dataclass(hint):
        return _build(hint, v, source, at)
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"{source}: field {at!r} must be a list, got {type(v).__name__}")
        return tuple(_value(args[0], x, source, f"{at}[{i}]") for i, x in enumerate(v))
    if origin is dict or hint is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{source}: field {at!r} must be an object, got {type(v).__name__}")
        if args and args[1] is not Any:
            return {k: _value(args[1], x, source, f"{at}.{k}") for k, x in v.items()}
        return dict(v)
    if hint is bool:
        if not isinstance(v, bool):
            raise ValueError(f"{source}: field {at!r} must be true or false, got {v!r}")
        return v
    if hint is int:
        # JSON writers may emit 1e6 for 1000000: integral floats pass.
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v) or v < 0:
            raise ValueError(f"{source}: field {at!r} must be a non-negative integer, got {v!r}")
        return int(v)
    if hint is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{source}: field {at!r} must be a number, got {v!r}")
        return float(v)
    if hint is str:
        if not isinstance(v, str):
            raise ValueError(f"{source}: field {at!r} must be a string, got {v!r}")
        return v
    raise TypeError(f"no validator for {hint!r} ({at})")  # pragma: no cover - a schema bug, not a file's


#: The runner's record of what produced a directory of results (code, machine, command).
MANIFEST = "run.json"


def load_results(directory: str | Path) -> list[RunResult]:
    """Every result file of a comparison: ``<dir>/*.json`` and ``<dir>/seed-*/*.json``
    (but the :data:`MANIFEST`).

    Every matching file must be a result: skipping a broken one would silently drop
    a method (or a seed) from the comparison.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    paths = sorted(p for p in [*directory.glob("*.json"), *directory.glob("seed-*/*.json")] if p.name != MANIFEST)
    if not paths:
        raise ValueError(f"{directory}: no result files (*.json or seed-*/*.json)")
    results = [RunResult.load(p) for p in paths]
    seen: dict[tuple[str, int], str] = {}
    for r in results:
        key = (r.label, r.seed)
        if key in seen:
            raise ValueError(f"{r.source}: label {r.label!r} with seed {r.seed} is already in {seen[key]}")
        seen[key] = r.source
    return results


def runs_by_label(results: list[RunResult]) -> Mapping[str, dict[int, RunResult]]:
    """label -> seed -> result."""
    out: dict[str, dict[int, RunResult]] = {}
    for r in results:
        out.setdefault(r.label, {})[r.seed] = r
    return out
