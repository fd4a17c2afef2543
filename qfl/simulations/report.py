"""Turn the experiment runner's result files into a Markdown report with plots.

The runner writes one JSON file per method (``<out>/<label>.json``), all trained on
the same partitions and seeds.  Every number in the report is derived from those
files here, never typed in by hand, so a rerun with other settings gives a report
that is still true; the verdicts ("PASS", "holds") are computed the same way.

Why the comparison is made on *bytes to reach a target* and not only on totals: a
compressor that saves 100x per round but needs 50x more rounds saves 2x, and totals
over a fixed number of rounds hide that.  The target is the baseline's final
accuracy minus ``target_drop`` (one percentage point by default), the usual
"no accuracy loss" tolerance; bytes are counted up to and including the first
evaluated round at or above it.

This module is imported by the runner and by CI on machines without a display and
must stay cheap to import: only the standard library and numpy at top level, no
``flwr`` or ``torch`` at all, matplotlib only inside the plotting functions and
only through the Agg canvas (no pyplot, so no global backend switch in a process
that also draws elsewhere).

Command line::

    python -m qfl.simulations.report RESULT_DIR [-o REPORT.md] [--baseline fedavg] [--target-drop 0.01]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

__all__ = [
    "ASYLPG_FACTOR_RANGE",
    "DOWNLINK_GOAL",
    "LARGE_SAVINGS",
    "PLOT_DPI",
    "UPLINK_GOAL",
    "Comparison",
    "MethodSummary",
    "ResultFile",
    "RoundEntry",
    "RoundRecord",
    "RunResult",
    "claim_lines",
    "compare",
    "finding_lines",
    "human_bytes",
    "load_result",
    "load_results",
    "main",
    "parse_result",
    "plot_report",
    "render_markdown",
    "write_csv",
    "write_report",
]

#: Project goal: at least this many times fewer uplink bytes (to the target) than the baseline.
UPLINK_GOAL = 100.0
#: Project goal: at least this many times fewer downlink bytes (to the target) than the baseline.
DOWNLINK_GOAL = 10.0
#: Qsparse-local-SGD claims "large" savings; an uplink factor this big is counted as large.
LARGE_SAVINGS = 10.0
#: AsyLPG reports 6-19x fewer transmitted bits; reaching the lower end counts as holding.
ASYLPG_FACTOR_RANGE = (6.0, 19.0)
#: Resolution of the PNG plots.
PLOT_DPI = 150

# Accuracies are stored as floats that went through JSON; 0.8 - 0.01 need not equal
# a stored 0.79, and a run that hits the target exactly must count as reaching it.
_TOL = 1e-9
_DASH = "—"

# Config keys that describe the method (or only where files live), not the shared
# setting, so they may differ between files without making the comparison unfair.
# Keys are compared after lower-casing and mapping "_" to "-".
_METHOD_KEYS = frozenset({
    "method", "preset", "label", "name", "uplink", "downlink", "error-feedback", "async",
    "out", "out-dir", "output", "output-dir", "result-dir", "results-dir", "result-file", "data-dir",
})
_METHOD_KEY_PREFIXES = ("uplink-", "downlink-", "async-", "method-", "preset-")


# --------------------------------------------------------------------------- #
# On-disk schema and its parsed form
# --------------------------------------------------------------------------- #
class _RoundRequired(TypedDict):
    round: int
    accuracy: float | None
    uplink_bytes: int
    downlink_bytes: int


class RoundEntry(_RoundRequired, total=False):
    """One entry of ``rounds`` as the runner writes it (bytes are per round)."""

    loss: float | None
    uplink_full_bytes: int | None
    downlink_full_bytes: int | None
    wall_time: float | None
    # Protocol health (counts per round): messages sent, replies received, full-model
    # resyncs, refused replies, error replies.
    messages: int
    replies: int
    resyncs: int
    dropped: int
    failures: int


class _ResultRequired(TypedDict):
    label: str
    method: str
    rounds: list[RoundEntry]


# Functional syntax because "async" is a keyword and cannot be a class-syntax key.
_ResultOptional = TypedDict("_ResultOptional", {
    "uplink": "str | None",
    "downlink": "str | None",
    "error_feedback": bool,
    "config": "dict[str, Any]",
    "model_parameters": "int | None",
    "async": bool,
    "runtime": "dict[str, Any]",
}, total=False)


class ResultFile(_ResultRequired, _ResultOptional):
    """One result file as the runner writes it; the keys the runner may omit are optional."""


@dataclass(frozen=True)
class RoundRecord:
    """One evaluated (or, for async runs, one server-version) step, validated.

    ``accuracy`` may be None for a step that was not evaluated: its bytes still
    count towards the cumulative totals, so dropping the step would undercount.
    """

    round: int
    accuracy: float | None
    loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    uplink_full_bytes: int | None = None
    downlink_full_bytes: int | None = None
    wall_time: float | None = None
    resyncs: int | None = None
    dropped: int | None = None
    failures: int | None = None


@dataclass(frozen=True)
class RunResult:
    """A validated result file; ``source`` names the file in later error messages."""

    label: str
    method: str
    uplink: str
    downlink: str
    error_feedback: bool
    config: Mapping[str, Any]
    model_parameters: int | None
    rounds: tuple[RoundRecord, ...]
    is_async: bool = False
    source: str = "<memory>"


def _fail(source: str, field: str, problem: str) -> None:
    raise ValueError(f"{source}: field {field!r} {problem}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _count(obj: Mapping[str, Any], key: str, field: str, source: str, required: bool) -> int | None:
    """A byte or parameter count: JSON writers sometimes emit 1e6 for 1000000, so integral floats pass."""
    if key not in obj:
        if required:
            _fail(source, field, "is missing")
        return None
    v = obj[key]
    if v is None and not required:
        return None
    if not _is_number(v) or not math.isfinite(v) or v < 0 or float(v) != int(v):
        _fail(source, field, f"must be a non-negative integer, got {v!r}")
    return int(v)


def _real(obj: Mapping[str, Any], key: str, field: str, source: str, *, lo: float | None = None,
          hi: float | None = None, finite: bool = True) -> float | None:
    v = obj.get(key)
    if v is None:
        return None
    if not _is_number(v) or (finite and not math.isfinite(v)):
        _fail(source, field, f"must be a number or null, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        _fail(source, field, f"must lie in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return float(v)


def _text(obj: Mapping[str, Any], key: str, source: str, required: bool) -> str:
    if key not in obj or obj[key] is None:
        if required:
            _fail(source, key, "is missing")
        return ""
    v = obj[key]
    if not isinstance(v, str) or (required and not v.strip()):
        _fail(source, key, f"must be a non-empty string, got {v!r}" if required else f"must be a string, got {v!r}")
    return v


def _flag(obj: Mapping[str, Any], key: str, source: str) -> bool:
    v = obj.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        _fail(source, key, f"must be true or false, got {v!r}")
    return v


def parse_result(obj: Any, source: str = "<memory>") -> RunResult:
    """Validate one decoded result file.

    Accuracies must be fractions in [0, 1]: a runner writing percentages would
    otherwise make every method "reach" a target 100 times too small.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: a result file must hold a JSON object, got {type(obj).__name__}")
    label = _text(obj, "label", source, required=True)
    method = _text(obj, "method", source, required=True)
    uplink = _text(obj, "uplink", source, required=False)
    downlink = _text(obj, "downlink", source, required=False)
    error_feedback = _flag(obj, "error_feedback", source)
    is_async = _flag(obj, "async", source)
    config = obj.get("config", {})
    if config is None:
        config = {}
    if not isinstance(config, dict):
        _fail(source, "config", f"must be an object, got {type(config).__name__}")
    model_parameters = _count(obj, "model_parameters", "model_parameters", source, required=False)

    if "rounds" not in obj:
        _fail(source, "rounds", "is missing")
    raw_rounds = obj["rounds"]
    if not isinstance(raw_rounds, list) or not raw_rounds:
        _fail(source, "rounds", "must be a non-empty list")
    rounds: list[RoundRecord] = []
    for i, entry in enumerate(raw_rounds):
        at = f"rounds[{i}]"
        if not isinstance(entry, dict):
            _fail(source, at, f"must be an object, got {type(entry).__name__}")
        number = _count(entry, "round", f"{at}.round", source, required=True)
        if rounds and number <= rounds[-1].round:
            _fail(source, f"{at}.round", f"must increase from entry to entry, got {number} after {rounds[-1].round}")
        if "accuracy" not in entry:
            _fail(source, f"{at}.accuracy", "is missing")
        rounds.append(RoundRecord(
            round=number,
            accuracy=_real(entry, "accuracy", f"{at}.accuracy", source, lo=0.0, hi=1.0),
            loss=_real(entry, "loss", f"{at}.loss", source, finite=False),
            uplink_bytes=_count(entry, "uplink_bytes", f"{at}.uplink_bytes", source, required=True),
            downlink_bytes=_count(entry, "downlink_bytes", f"{at}.downlink_bytes", source, required=True),
            uplink_full_bytes=_count(entry, "uplink_full_bytes", f"{at}.uplink_full_bytes", source, required=False),
            downlink_full_bytes=_count(entry, "downlink_full_bytes", f"{at}.downlink_full_bytes", source,
                                       required=False),
            wall_time=_real(entry, "wall_time", f"{at}.wall_time", source, lo=0.0),
            **{key: _count(entry, key, f"{at}.{key}", source, required=False)
               for key in ("resyncs", "dropped", "failures")},
        ))
    if all(r.accuracy is None for r in rounds):
        _fail(source, "rounds", "has no entry with an accuracy")
    return RunResult(label=label, method=method, uplink=uplink, downlink=downlink,
                     error_feedback=error_feedback, config=config, model_parameters=model_parameters,
                     rounds=tuple(rounds), is_async=is_async, source=source)


def load_result(path: str | Path) -> RunResult:
    """Read and validate one result file; every error names the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return parse_result(obj, source=str(path))


def load_results(result_dir: str | Path, pattern: str = "*.json") -> list[RunResult]:
    """All result files of one experiment, in file-name order.

    Every file matching ``pattern`` must be a result: silently skipping a broken
    one would drop a method from the comparison without anyone noticing.
    """
    result_dir = Path(result_dir)
    if not result_dir.is_dir():
        raise ValueError(f"{result_dir}: not a directory")
    paths = sorted(p for p in result_dir.glob(pattern) if p.is_file())
    if not paths:
        raise ValueError(f"{result_dir}: no result files ({pattern})")
    results = [load_result(p) for p in paths]
    seen: dict[str, str] = {}
    for r in results:
        if r.label in seen:
            raise ValueError(f"{r.source}: label {r.label!r} is already used by {seen[r.label]}")
        seen[r.label] = r.source
    return results


# --------------------------------------------------------------------------- #
# Numbers
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class MethodSummary:
    """One row of the comparison.  Factors are baseline / this run ("x fewer").

    A factor is ``inf`` when this run needs 0 bytes and the baseline more, and
    None when it is undefined (missing data, target not reached, or 0 / 0).
    """

    label: str
    method: str
    is_async: bool
    is_baseline: bool
    final_accuracy: float
    best_accuracy: float
    uplink_bytes: int
    downlink_bytes: int
    uplink_full_bytes: int | None
    downlink_full_bytes: int | None
    uplink_factor: float | None
    downlink_factor: float | None
    total_factor: float | None
    reached: bool
    round_reached: int | None
    uplink_to_target: int | None
    downlink_to_target: int | None
    uplink_to_target_factor: float | None
    downlink_to_target_factor: float | None
    total_to_target_factor: float | None
    wall_time: float | None
    time_to_target: float | None

    @property
    def total_bytes(self) -> int:
        return self.uplink_bytes + self.downlink_bytes

    @property
    def total_to_target(self) -> int | None:
        if self.uplink_to_target is None or self.downlink_to_target is None:
            return None
        return self.uplink_to_target + self.downlink_to_target


@dataclass(frozen=True)
class Comparison:
    """Everything the report shows, computed once; rows are in report order."""

    rows: tuple[MethodSummary, ...]
    results: Mapping[str, RunResult]
    baseline: str
    target: float
    target_drop: float
    #: The baseline accuracy the target is taken from is the mean of its last this-many
    #: evaluations (1: its final accuracy).
    baseline_window: int = 1

    def row(self, label: str) -> MethodSummary:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(label)

    @property
    def base(self) -> MethodSummary:
        return self.row(self.baseline)


def _factor(base: float | None, value: float | None) -> float | None:
    if base is None or value is None:
        return None
    if value == 0:
        return math.inf if base > 0 else None
    return float(base) / float(value)


def _pick_baseline(results: Sequence[RunResult], name: str) -> RunResult:
    """The baseline by label, else the one run of that method (a sync one before async)."""
    for r in results:
        if r.label == name:
            return r
    same = [r for r in results if r.method == name]
    sync = [r for r in same if not r.is_async] or same
    if len(sync) == 1:
        return sync[0]
    labels = ", ".join(sorted(r.label for r in results))
    if not sync:
        raise ValueError(f"no result has label or method {name!r} to serve as the baseline; labels: {labels}")
    raise ValueError(f"several results have method {name!r} ({', '.join(r.label for r in sync)}); "
                     f"pass the baseline's label instead")


def _cumulative(rounds: Sequence[RoundRecord]) -> tuple[np.ndarray, np.ndarray]:
    up = np.cumsum([r.uplink_bytes for r in rounds], dtype=np.int64)
    down = np.cumsum([r.downlink_bytes for r in rounds], dtype=np.int64)
    return up, down


def _first_reach(result: RunResult, target: float) -> int | None:
    """Index into ``rounds`` of the first evaluated step at or above ``target``."""
    for i, r in enumerate(result.rounds):
        if r.accuracy is not None and r.accuracy >= target - _TOL:
            return i
    return None


def _sum_optional(values: Iterable[int | None]) -> int | None:
    values = list(values)
    if any(v is None for v in values):
        return None
    return int(sum(values))  # type: ignore[arg-type]


def _summarize(result: RunResult, target: float, base: MethodSummary | None, is_baseline: bool) -> MethodSummary:
    accs = [r.accuracy for r in result.rounds if r.accuracy is not None]
    up, down = _cumulative(result.rounds)
    idx = _first_reach(result, target)
    walls = [r.wall_time for r in result.rounds if r.wall_time is not None]
    up_tt = int(up[idx]) if idx is not None else None
    down_tt = int(down[idx]) if idx is not None else None
    total_up, total_down = int(up[-1]), int(down[-1])

    def vs(attr: str, mine: float | None) -> float | None:
        return _factor(getattr(base, attr), mine) if base is not None else None

    tot_tt = None if up_tt is None else up_tt + down_tt  # type: ignore[operator]
    return MethodSummary(
        label=result.label, method=result.method, is_async=result.is_async, is_baseline=is_baseline,
        final_accuracy=float(accs[-1]), best_accuracy=float(max(accs)),
        uplink_bytes=total_up, downlink_bytes=total_down,
        uplink_full_bytes=_sum_optional(r.uplink_full_bytes for r in result.rounds),
        downlink_full_bytes=_sum_optional(r.downlink_full_bytes for r in result.rounds),
        uplink_factor=vs("uplink_bytes", total_up), downlink_factor=vs("downlink_bytes", total_down),
        total_factor=vs("total_bytes", total_up + total_down),
        reached=idx is not None, round_reached=result.rounds[idx].round if idx is not None else None,
        uplink_to_target=up_tt, downlink_to_target=down_tt,
        uplink_to_target_factor=vs("uplink_to_target", up_tt) if up_tt is not None else None,
        downlink_to_target_factor=vs("downlink_to_target", down_tt) if down_tt is not None else None,
        total_to_target_factor=vs("total_to_target", tot_tt) if tot_tt is not None else None,
        wall_time=max(walls) if walls else None,
        time_to_target=result.rounds[idx].wall_time if idx is not None else None,
    )


def compare(results: Sequence[RunResult], baseline: str = "fedavg", target_drop: float = 0.01,
            baseline_window: int = 1) -> Comparison:
    """Compute every row against the baseline.

    The target is the baseline's accuracy minus ``target_drop``, the accuracy being
    the mean of its last ``baseline_window`` evaluations (1: the final one).
    Rows: baseline first, then runs that reach the target by uplink bytes to
    target (the scarce direction in federated learning), then the others by label.
    """
    if not (isinstance(target_drop, (int, float)) and math.isfinite(target_drop) and target_drop >= 0):
        raise ValueError(f"target_drop must be a finite number >= 0, got {target_drop!r}")
    if isinstance(baseline_window, bool) or not isinstance(baseline_window, int) or baseline_window < 1:
        raise ValueError(f"baseline_window must be an integer >= 1, got {baseline_window!r}")
    if not results:
        raise ValueError("no results to compare")
    labels = [r.label for r in results]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    base_result = _pick_baseline(results, baseline)
    base_accs = [r.accuracy for r in base_result.rounds if r.accuracy is not None][-baseline_window:]
    target = float(np.mean(base_accs)) - float(target_drop)
    base_row = _summarize(base_result, target, None, is_baseline=True)
    # The baseline against itself: every defined factor is 1 (0 / 0 stays undefined).
    base_row = _summarize(base_result, target, base_row, is_baseline=True)
    others = [_summarize(r, target, base_row, is_baseline=False) for r in results if r is not base_result]
    reached = sorted((r for r in others if r.reached), key=lambda r: (r.uplink_to_target, r.label))
    missed = sorted((r for r in others if not r.reached), key=lambda r: r.label)
    return Comparison(rows=(base_row, *reached, *missed), results={r.label: r for r in results},
                      baseline=base_result.label, target=target, target_drop=float(target_drop),
                      baseline_window=baseline_window)


# --------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------- #
def human_bytes(n: float | None) -> str:
    """Decimal units (1 KB = 1000 B), three significant digits; the exact counts are in the CSV."""
    if n is None:
        return _DASH
    n = float(n)
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000.0
        shown = float(f"{n:.3g}")
        if shown < 1000 or unit == "PB":
            return f"{shown:.{max(0, 2 - int(math.floor(math.log10(shown))))}f} {unit}"
    raise AssertionError("unreachable")


def _fmt_factor(f: float | None) -> str:
    if f is None:
        return _DASH
    if math.isinf(f):
        return "∞×"
    if f >= 100:
        return f"{f:,.0f}×"
    if f >= 10:
        return f"{f:.1f}×"
    return f"{f:.2f}×"


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{100 * x:.2f}%"


def _pp(x: float) -> str:
    v = 100 * x
    return f"{0.0 if abs(v) < 0.005 else v:+.2f} pp"  # no "-0.00" from float noise


def _duration(s: float | None) -> str:
    if s is None:
        return _DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _show(v: Any) -> str:
    if v is None:
        return _DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return str(v)


def _cell(text: Any) -> str:
    """Table-safe text: spec strings contain '|', which would split a Markdown cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code(label: str) -> str:
    return f"`{label}`"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _tol_pp(drop: float) -> str:
    return f"{100 * drop:g} pp"


# --------------------------------------------------------------------------- #
# Setting
# --------------------------------------------------------------------------- #
def _norm(config: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).lower().replace("_", "-"): v for k, v in config.items()}


def _lookup(config: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return None


def _is_method_key(key: str) -> bool:
    return key in _METHOD_KEYS or key.startswith(_METHOD_KEY_PREFIXES)


def _config_differences(comparison: Comparison) -> list[str]:
    """Setting keys whose values are not the same in every file, each with who has what."""
    configs = {label: _norm(r.config) for label, r in comparison.results.items()}
    keys = sorted({k for c in configs.values() for k in c if not _is_method_key(k)})
    out = []
    for key in keys:
        groups: dict[str, list[str]] = {}
        for label in (row.label for row in comparison.rows):
            v = configs[label].get(key)
            shown = "(absent)" if key not in configs[label] else json.dumps(v, sort_keys=True, default=str)
            groups.setdefault(shown, []).append(label)
        if len(groups) > 1:
            parts = "; ".join(f"{v}: {', '.join(labels)}" for v, labels in groups.items())
            out.append(f"`{key}` ({parts})")
    params = {r.model_parameters for r in comparison.results.values()}
    if len(params) > 1:
        out.append("model parameter count (" + "; ".join(
            f"{_show(r.model_parameters)}: {r.label}" for r in comparison.results.values()) + ")")
    return out


def _setting_lines(comparison: Comparison) -> list[str]:
    base = comparison.results[comparison.baseline]
    cfg = _norm(base.config)
    partition = _lookup(cfg, "partition", "partitioning", "partitioner", "partition-scheme", "partition-by")
    alpha = _lookup(cfg, "alpha", "dirichlet-alpha")
    classes = _lookup(cfg, "classes-per-client", "classes-per-partition")
    if partition is not None and str(partition).lower() == "pathological" and classes is not None:
        partitioning = f"{partition}, {_show(classes)} classes per client"
    elif partition is not None and alpha is not None and str(partition).lower() != "iid":
        partitioning = f"{partition}, α = {_show(alpha)}"
    elif partition is not None:
        partitioning = str(partition)
    else:
        partitioning = f"α = {_show(alpha)}" if alpha is not None else _DASH
    steps = _lookup(cfg, "local-steps")
    if steps is None and _lookup(cfg, "local-epochs") is not None:
        steps_text = f"{_show(cfg['local-epochs'])} epochs"
    else:
        steps_text = _show(steps)
    rounds = _lookup(cfg, "num-server-rounds", "num-rounds", "rounds")
    rounds_text = _show(rounds) if rounds is not None else f"{base.rounds[-1].round} (last round in the baseline file)"
    b = comparison.base
    rows = [
        ("dataset", _show(_lookup(cfg, "dataset") or "Fashion-MNIST")),
        ("clients", _show(_lookup(cfg, "num-clients", "num-supernodes", "num-partitions", "clients"))),
        ("fraction of clients per round", _show(_lookup(cfg, "fraction-train", "fraction-fit", "fraction"))),
        ("partitioning", partitioning),
        ("local steps", steps_text),
        ("rounds", rounds_text),
        ("model", _show(_lookup(cfg, "model"))),
        ("model parameters", _show(base.model_parameters)),
        ("seed", _show(_lookup(cfg, "seed"))),
        ("baseline", _code(comparison.baseline)),
        ("target accuracy", f"{_pct(comparison.target)} (baseline final {_pct(b.final_accuracy)} "
                            f"− {_tol_pp(comparison.target_drop)})"),
    ]
    lines = _table(("setting", "value"), rows)
    diffs = _config_differences(comparison)
    lines.append("")
    if diffs:
        lines.append(f"> **Note:** the {len(comparison.results)} result files differ in more than the method: "
                     + "; ".join(diffs) + ". The comparison is not like for like in these respects.")
    else:
        lines.append(f"All {len(comparison.results)} result files share this setting; only the method differs.")
    return lines


# --------------------------------------------------------------------------- #
# Tables
# --------------------------------------------------------------------------- #
def _reached_text(row: MethodSummary) -> str:
    return "yes" if row.reached else "no"


def _main_table(comparison: Comparison) -> list[str]:
    header = ("run", "final acc", "best acc", "uplink", "downlink", "uplink × fewer", "downlink × fewer",
              "target reached", "round", "uplink to target", "downlink to target",
              "uplink-to-target × fewer", "downlink-to-target × fewer", "wall time")
    rows = []
    for r in comparison.rows:
        name = _code(r.label) + (" (baseline)" if r.is_baseline else "") + (" (async)" if r.is_async else "")
        rows.append((name, _pct(r.final_accuracy), _pct(r.best_accuracy), human_bytes(r.uplink_bytes),
                     human_bytes(r.downlink_bytes), _fmt_factor(r.uplink_factor), _fmt_factor(r.downlink_factor),
                     _reached_text(r), _show(r.round_reached), human_bytes(r.uplink_to_target),
                     human_bytes(r.downlink_to_target), _fmt_factor(r.uplink_to_target_factor),
                     _fmt_factor(r.downlink_to_target_factor), _duration(r.wall_time)))
    return _table(header, rows)


def _exact_table(comparison: Comparison) -> list[str]:
    header = ("run", "uplink B", "downlink B", "uplink to target B", "downlink to target B",
              "plain Flower uplink B", "plain Flower downlink B")
    rows = [(_code(r.label), _show_int(r.uplink_bytes), _show_int(r.downlink_bytes), _show_int(r.uplink_to_target),
             _show_int(r.downlink_to_target), _show_int(r.uplink_full_bytes), _show_int(r.downlink_full_bytes))
            for r in comparison.rows]
    return _table(header, rows)


def _show_int(n: int | None) -> str:
    return _DASH if n is None else f"{n:,}"


def _methods_table(comparison: Comparison) -> list[str]:
    rows = []
    for row in comparison.rows:
        r = comparison.results[row.label]
        rows.append((_code(r.label), r.method, f"`{r.uplink}`" if r.uplink else _DASH,
                     f"`{r.downlink}`" if r.downlink else _DASH, _show(r.error_feedback), _show(r.is_async)))
    return _table(("run", "method", "uplink", "downlink", "error feedback", "async"), rows)


def _sync_counterpart(comparison: Comparison, row: MethodSummary) -> MethodSummary | None:
    """The synchronous run of the same method: ``x_async`` pairs with ``x``."""
    method = row.method[: -len("_async")] if row.method.endswith("_async") else row.method
    candidates = [r for r in comparison.rows if not r.is_async and r.method == method]
    if not candidates:
        return None
    return next((r for r in candidates if r.label == method), candidates[0])


def _async_table(comparison: Comparison) -> list[str]:
    rows = []
    for a in (r for r in comparison.rows if r.is_async):
        s = _sync_counterpart(comparison, a)
        rows.append((_code(a.label), _code(s.label) if s else _DASH, _duration(a.time_to_target),
                     _duration(s.time_to_target) if s else _DASH,
                     _fmt_factor(_factor(s.time_to_target, a.time_to_target)) if s else _DASH,
                     _pct(a.final_accuracy), _pct(s.final_accuracy) if s else _DASH,
                     human_bytes(a.total_to_target), human_bytes(s.total_to_target) if s else _DASH))
    return _table(("async run", "sync run", "async time to target", "sync time to target",
                   "async speed-up", "async final acc", "sync final acc",
                   "async bytes to target", "sync bytes to target"), rows)


# --------------------------------------------------------------------------- #
# Findings and claims
# --------------------------------------------------------------------------- #
def _best(comparison: Comparison) -> MethodSummary | None:
    """The non-baseline run reaching the target with the fewest bytes (uplink + downlink)."""
    reached = [r for r in comparison.rows if r.reached and not r.is_baseline]
    if not reached:
        return None
    return min(reached, key=lambda r: (r.total_to_target, r.label))


def _meets(factor: float | None, goal: float) -> bool:
    return factor is not None and factor >= goal - _TOL


def finding_lines(comparison: Comparison) -> list[str]:
    """The "what this run shows" bullets, every statement computed from the rows."""
    base = comparison.base
    bl = _code(comparison.baseline)
    others = [r for r in comparison.rows if not r.is_baseline]
    hit = [r for r in others if r.reached]
    miss = [r for r in others if not r.reached]
    lines = [f"- Target accuracy: **{_pct(comparison.target)}** ({bl} final {_pct(base.final_accuracy)} "
             f"− {_tol_pp(comparison.target_drop)}); {bl} itself reaches it at round {base.round_reached}."]
    if hit:
        lines.append(f"- {len(hit)} of {len(others)} other runs reach the target: "
                     + ", ".join(f"{_code(r.label)} (round {r.round_reached})" for r in hit) + ".")
    else:
        lines.append(f"- None of the {len(others)} other runs reaches the target.")
    if miss:
        lines.append("- Not reached: " + ", ".join(f"{_code(r.label)} (best {_pct(r.best_accuracy)})"
                                                   for r in miss) + ".")
    best = _best(comparison)
    goal_up = f"≥{UPLINK_GOAL:g}× fewer uplink bytes than {comparison.baseline}"
    goal_down = f"≥{DOWNLINK_GOAL:g}× fewer downlink bytes than {comparison.baseline}"
    if best is None:
        lines.append("- No best method: no run other than the baseline reaches the target.")
        lines.append(f"- Goal \"{goal_up}\": **FAIL** — no run other than the baseline reaches the target.")
        lines.append(f"- Goal \"{goal_down}\": **FAIL** — no run other than the baseline reaches the target.")
        return lines
    lines.append(f"- Best by total bytes to target (uplink + downlink): {_code(best.label)} — "
                 f"{human_bytes(best.total_to_target)} vs {human_bytes(base.total_to_target)} for {bl} "
                 f"({_fmt_factor(best.total_to_target_factor)} fewer), reached at round {best.round_reached}.")
    for goal, factor, threshold, direction in (
            (goal_up, best.uplink_to_target_factor, UPLINK_GOAL, "uplink"),
            (goal_down, best.downlink_to_target_factor, DOWNLINK_GOAL, "downlink")):
        verdict = "PASS" if _meets(factor, threshold) else "FAIL"
        lines.append(f"- Goal \"{goal}\": **{verdict}** — {_code(best.label)} needs "
                     f"{_fmt_factor(factor)} fewer {direction} bytes to reach the target.")
    both = [r for r in hit if _meets(r.uplink_to_target_factor, UPLINK_GOAL)
            and _meets(r.downlink_to_target_factor, DOWNLINK_GOAL)]
    if both:
        lines.append("- Runs meeting both goals: " + ", ".join(_code(r.label) for r in both) + ".")
    else:
        lines.append("- No run meets both goals.")
    return lines + robustness_lines(comparison)


#: Evaluations the robustness check averages the baseline's accuracy over.
ROBUSTNESS_WINDOW = 5


def robustness_lines(comparison: Comparison, window: int = ROBUSTNESS_WINDOW) -> list[str]:
    """The same verdicts against a target from the mean of the baseline's last ``window``
    evaluations: a final round that happens to dip (or peak) moves the target by as
    much as a method's whole margin, and this says whether the conclusions survive it."""
    if comparison.baseline_window != 1:
        return []
    base_accs = [r.accuracy for r in comparison.results[comparison.baseline].rounds if r.accuracy is not None]
    if len(base_accs) < window:
        return []
    other = compare(list(comparison.results.values()), comparison.baseline, comparison.target_drop, window)
    hit = [r for r in other.rows if r.reached and not r.is_baseline]
    text = (f"- Robustness: averaged over its last {window} evaluations {_code(comparison.baseline)} has "
            f"{_pct(other.target + other.target_drop)} (final {_pct(comparison.base.final_accuracy)}); against "
            f"that target, {_pct(other.target)}, ")
    if not hit:
        return [text + "no other run reaches it, and neither goal is met."]
    others = len(other.rows) - 1
    text += (f"{len(hit)} of {others} other runs reach it ("
             + ", ".join(f"{_code(r.label)} round {r.round_reached}" for r in hit) + ")")
    best = _best(other)
    assert best is not None
    verdicts = ["PASS" if _meets(best.uplink_to_target_factor, UPLINK_GOAL) else "FAIL",
                "PASS" if _meets(best.downlink_to_target_factor, DOWNLINK_GOAL) else "FAIL"]
    return [text + f"; the best, {_code(best.label)}, needs {_fmt_factor(best.uplink_to_target_factor)} fewer "
            f"uplink and {_fmt_factor(best.downlink_to_target_factor)} fewer downlink bytes (uplink goal "
            f"**{verdicts[0]}**, downlink goal **{verdicts[1]}**)."]


def _verdict(ok: Sequence[bool]) -> str:
    if all(ok):
        return "**holds**"
    if not any(ok):
        return "**does not hold**"
    return f"**partly holds** ({sum(ok)} of {len(ok)} runs)"


def _runs_of(comparison: Comparison, methods: Sequence[str]) -> list[MethodSummary]:
    return [r for r in comparison.rows if r.method in methods and not r.is_baseline]


def _gap(comparison: Comparison, row: MethodSummary) -> tuple[float, bool, str]:
    gap = row.final_accuracy - comparison.base.final_accuracy
    ok = gap >= -comparison.target_drop - _TOL
    return gap, ok, f"{_pp(gap)}, {'within' if ok else 'not within'} {_tol_pp(comparison.target_drop)}"


def _claim_qsgd(c: Comparison, runs: list[MethodSummary]) -> str:
    parts, ok = [], []
    for r in runs:
        _, good, text = _gap(c, r)
        ok.append(good)
        parts.append(f"{_code(r.label)} {_pct(r.final_accuracy)} ({text}), "
                     f"{_fmt_factor(r.uplink_factor)} fewer uplink bytes")
    return ("- **QSGD (Alistarh et al., 2017)** — claim: 4-bit and 8-bit QSGD reach full-precision accuracy. "
            f"This run, final accuracy vs {_pct(c.base.final_accuracy)} for {_code(c.baseline)}: "
            + "; ".join(parts) + f". Verdict: {_verdict(ok)}.")


def _claim_qsparse(c: Comparison, runs: list[MethodSummary]) -> str:
    steps = sorted({_show(_lookup(_norm(c.results[r.label].config), "local-steps")) for r in runs})
    parts, ok = [], []
    for r in runs:
        if not r.reached:
            ok.append(False)
            parts.append(f"{_code(r.label)} does not reach it (best {_pct(r.best_accuracy)})")
            continue
        ok.append(_meets(r.uplink_to_target_factor, LARGE_SAVINGS))
        parts.append(f"{_code(r.label)} at round {r.round_reached} with {_fmt_factor(r.uplink_to_target_factor)} "
                     f"fewer uplink, {_fmt_factor(r.downlink_to_target_factor)} fewer downlink and "
                     f"{_fmt_factor(r.total_to_target_factor)} fewer total bytes than {_code(c.baseline)}")
    return ("- **Qsparse-local-SGD (Basu et al., 2019)** — claim: large savings in bits to reach a target "
            f"accuracy, with local steps (here local-steps = {', '.join(steps)}). "
            f"This run, bytes to reach {_pct(c.target)}: " + "; ".join(parts)
            + f". Verdict: {_verdict(ok)} (large = ≥{LARGE_SAVINGS:g}× fewer uplink bytes to target).")


def _claim_asylpg(c: Comparison, runs: list[MethodSummary]) -> str:
    lo, hi = ASYLPG_FACTOR_RANGE
    parts, ok = [], []
    for r in runs:
        _, good, text = _gap(c, r)
        ok.append(good and _meets(r.total_factor, lo))
        parts.append(f"{_code(r.label)} {_fmt_factor(r.total_factor)} fewer ({text})")
    return (f"- **AsyLPG double quantization (Yu, Wu, Huang, 2019)** — claim: {lo:g}–{hi:g}× fewer bits "
            "transmitted without accuracy loss. This run, total bytes (uplink + downlink) over the whole run "
            f"vs {_code(c.baseline)}: " + "; ".join(parts)
            + f". Verdict: {_verdict(ok)} (holds = ≥{lo:g}× fewer and within {_tol_pp(c.target_drop)}).")


def _claim_qesgd(c: Comparison, runs: list[MethodSummary]) -> str:
    parts, ok = [], []
    for r in runs:
        _, good, text = _gap(c, r)
        ok.append(good and r.total_factor is not None and r.total_factor > 1)
        parts.append(f"{_code(r.label)} final {_pct(r.final_accuracy)} ({text}), "
                     f"{_fmt_factor(r.total_factor)} fewer total bytes")
    return ("- **Quantized Epoch-SGD (Zhao, Gao, Li, 2019)** — claim, as reconstructed from the abstract only: "
            "near full-precision accuracy at lower communication. "
            f"This run vs {_code(c.baseline)}: " + "; ".join(parts) + f". Verdict: {_verdict(ok)}.")


# paper -> (methods that implement it, line builder); async variants test the same claim.
_PAPERS = (
    (("qsgd4", "qsgd8"), _claim_qsgd),
    (("qsparse", "qsparse_sign", "qsparse_async", "qsparse_sign_async"), _claim_qsparse),
    (("double_quant", "sparse_double_quant", "acc_double_quant", "double_quant_async"), _claim_asylpg),
    (("qesgd",), _claim_qesgd),
)


def claim_lines(comparison: Comparison) -> list[str]:
    """One line per paper whose methods are in the results; papers without runs are left out."""
    lines = []
    for methods, build in _PAPERS:
        runs = _runs_of(comparison, methods)
        if runs:
            lines.append(build(comparison, runs))
    return lines or ["- None of the four papers' methods is in these results."]


# --------------------------------------------------------------------------- #
# Plots
# --------------------------------------------------------------------------- #
def _styles(comparison: Comparison) -> dict[str, dict[str, Any]]:
    """Stable colours per run (report order) so the same run looks alike in every plot."""
    from matplotlib import colormaps

    others = [r for r in comparison.rows if not r.is_baseline]
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    styles = {comparison.baseline: dict(color="black", linewidth=2.0, linestyle="-")}
    for i, r in enumerate(others):
        styles[r.label] = dict(color=cmap(i % cmap.N), linewidth=1.4, linestyle="-." if r.is_async else "-")
    return styles


def _new_axes(title: str, xlabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def _finish(fig, ax, comparison: Comparison, path: Path) -> Path:
    ax.axhline(100 * comparison.target, color="grey", linestyle="--", linewidth=1.0,
               label=f"target {_pct(comparison.target)}")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
    return path


def _series(comparison: Comparison, x_of) -> Iterable[tuple[MethodSummary, list[float], list[float]]]:
    for row in comparison.rows:
        result = comparison.results[row.label]
        up, down = _cumulative(result.rounds)
        xs, ys = [], []
        for i, r in enumerate(result.rounds):
            x = x_of(r, int(up[i]), int(down[i]))
            if r.accuracy is not None and x is not None:
                xs.append(float(x))
                ys.append(100.0 * r.accuracy)
        yield row, xs, ys


def _line_plot(comparison: Comparison, path: Path, title: str, xlabel: str, x_of, log_x: bool = False) -> Path:
    fig, ax = _new_axes(title, xlabel)
    styles = _styles(comparison)
    drawn = False
    for row, xs, ys in _series(comparison, x_of):
        if xs:
            ax.plot(xs, ys, marker="o", markersize=2.5, label=row.label, **styles[row.label])
            drawn = True
    if log_x and drawn:
        ax.set_xscale("log")
    return _finish(fig, ax, comparison, path)


def plot_report(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write the PNGs; returns file name -> path for the ones written.

    Cumulative-bytes plots use a log axis because the methods differ by orders
    of magnitude; the initial evaluation (0 bytes) has no place on it and is left
    out there, but kept in the per-round and time plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, direction, pick in (("accuracy_vs_uplink.png", "uplink", lambda r, u, d: u or None),
                                  ("accuracy_vs_downlink.png", "downlink", lambda r, u, d: d or None)):
        written[name] = _line_plot(comparison, out_dir / name, f"Accuracy vs cumulative {direction} bytes",
                                   f"cumulative {direction} bytes (log scale)", pick, log_x=True)
    written["accuracy_per_round.png"] = _line_plot(
        comparison, out_dir / "accuracy_per_round.png", "Accuracy per round",
        "round (server version for async runs)", lambda r, u, d: r.round)
    if any(r.wall_time is not None for res in comparison.results.values() for r in res.rounds):
        written["accuracy_vs_time.png"] = _line_plot(
            comparison, out_dir / "accuracy_vs_time.png", "Accuracy vs wall-clock time",
            "wall-clock time since start (s)", lambda r, u, d: r.wall_time)
    return written


# --------------------------------------------------------------------------- #
# CSV, Markdown, entry points
# --------------------------------------------------------------------------- #
_CSV_FIELDS = (
    "label", "method", "async", "baseline", "final_accuracy", "best_accuracy", "uplink_bytes", "downlink_bytes",
    "uplink_full_bytes", "downlink_full_bytes", "uplink_factor", "downlink_factor", "total_factor",
    "target_accuracy", "reached_target", "round_reached", "uplink_bytes_to_target", "downlink_bytes_to_target",
    "uplink_to_target_factor", "downlink_to_target_factor", "total_to_target_factor", "wall_time",
    "time_to_target",
)


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def write_csv(comparison: Comparison, path: str | Path) -> Path:
    """Exact numbers (bytes as integers, factors at full precision) for anyone re-plotting them."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(_CSV_FIELDS)
        for r in comparison.rows:
            values = (r.label, r.method, r.is_async, r.is_baseline, r.final_accuracy, r.best_accuracy,
                      r.uplink_bytes, r.downlink_bytes, r.uplink_full_bytes, r.downlink_full_bytes,
                      r.uplink_factor, r.downlink_factor, r.total_factor, comparison.target, r.reached,
                      r.round_reached, r.uplink_to_target, r.downlink_to_target, r.uplink_to_target_factor,
                      r.downlink_to_target_factor, r.total_to_target_factor, r.wall_time, r.time_to_target)
            w.writerow([_csv_value(v) for v in values])
    return path


def render_markdown(comparison: Comparison, plots: Mapping[str, Path] | None = None,
                    csv_name: str | None = "summary.csv") -> str:
    """The report text; ``plots`` (file name -> path) are linked by file name, next to the Markdown."""
    lines = ["# qfl experiment report", "", "## Setting", ""]
    lines += _setting_lines(comparison)
    lines += ["", "## Runs", ""] + _methods_table(comparison)
    lines += ["", "## Results", "",
              "Bytes are summed over the whole run and, for \"to target\", up to and including the first round "
              f"at or above the target ({_pct(comparison.target)}); 1 KB = 1000 B. \"× fewer\" is "
              f"{_code(comparison.baseline)}'s bytes divided by the run's. Rows: baseline first, then by uplink "
              "bytes to target.", ""]
    lines += _main_table(comparison)
    lines += ["", "Exact byte counts:", ""] + _exact_table(comparison)
    if csv_name:
        lines += ["", f"The same numbers, unrounded: [`{csv_name}`]({csv_name})."]
    lines += ["", "## What this run shows", ""] + finding_lines(comparison)
    lines += ["", "## Paper claims vs this run", ""] + claim_lines(comparison)
    if any(r.is_async for r in comparison.rows):
        lines += ["", "## Asynchronous vs synchronous", "",
                  "Wall-clock time to reach the target; an async run's rounds are server versions.", ""]
        lines += _async_table(comparison)
    if plots:
        lines += ["", "## Plots", ""]
        for name in plots:
            lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def write_report(result_dir: str | Path, out_md: str | Path | None = None, baseline: str = "fedavg",
                 target_drop: float = 0.01, *, plots: bool = True) -> Path:
    """Load every result in ``result_dir`` and write the Markdown, ``summary.csv`` and the PNGs beside it."""
    results = load_results(result_dir)
    comparison = compare(results, baseline=baseline, target_drop=target_drop)
    out_md = Path(out_md) if out_md is not None else Path(result_dir) / "report.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_csv(comparison, out_md.parent / "summary.csv")
    pngs = plot_report(comparison, out_md.parent) if plots else None
    out_md.write_text(render_markdown(comparison, pngs), encoding="utf-8")
    return out_md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qfl.simulations.report",
                                     description="Markdown report (tables, CSV, PNG plots) from qfl result files.")
    parser.add_argument("result_dir", type=Path, help="directory holding one <label>.json per run")
    parser.add_argument("-o", "--out", type=Path, default=None, help="Markdown file (default RESULT_DIR/report.md)")
    parser.add_argument("--baseline", default="fedavg", help="label or method of the baseline (default fedavg)")
    parser.add_argument("--target-drop", type=float, default=0.01,
                        help="target = baseline final accuracy minus this (default 0.01, one point)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.result_dir, args.out, baseline=args.baseline, target_drop=args.target_drop,
                            plots=not args.no_plots)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
