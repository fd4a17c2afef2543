"""Render a comparison (:mod:`qfl.simulations.compare`) as Markdown, CSV and plots.

The Markdown (formatting and sections) is here; the CSV and the plots are written by
:mod:`qfl.simulations.exports`.

Every number in the report is computed from the result files, never typed in, so a
rerun with other settings or seeds gives a report that is still true; the verdicts
come from :mod:`qfl.simulations.compare` and the claims from the presets.

Cheap to import (standard library and numpy; matplotlib only inside the plotting
functions, through the Agg canvas, so no global backend switch).

Command line::

    python -m qfl.simulations.report RESULT_DIR [-o REPORT.md] [--baseline fedavg] [--goals uplink=100,downlink=10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .compare import (
    Comparison,
    Goal,
    best,
    compare,
    goal_verdict,
    judge_claims,
    parse_goals,
    recommended,
)
from .exports import CSV_FIELDS, PLOT_DPI, plot_report, write_csv
from .results import MANIFEST, load_results

__all__ = [
    "CSV_FIELDS",
    "PLOT_DPI",
    "human_bytes",
    "main",
    "plot_report",
    "render_markdown",
    "write_csv",
    "write_report",
]

_DASH = "—"


# ---------------------------------------------------------------------- formatting
def human_bytes(n: float | None) -> str:
    """Decimal units (1 KB = 1000 B), three significant digits; the exact counts are in the CSV."""
    if n is None:
        return _DASH
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def _x(f: float | None) -> str:
    if f is None:
        return _DASH
    if math.isinf(f):
        return "∞"
    return f"{f:.3g}×"


def _pct(x: float | None) -> str:
    return _DASH if x is None else f"{100 * x:.2f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def _seconds(s: float | None) -> str:
    if s is None:
        return _DASH
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _code(label: str) -> str:
    return f"`{label}`"


#: How a spread is written for each value format: in pp for accuracies, bare for factors.
_SPREAD = {
    _pct: lambda s: f"{100 * s:.2f} pp",
    _pp: lambda s: f"{100 * s:.2f} pp",
    _x: lambda s: f"{s:.3g}",
    _seconds: _seconds,
}


def _mean_std(stat, fmt) -> str:
    """ "mean ± std" over the seeds where defined, with how many seeds that is."""
    if not stat.values:
        return _DASH
    same = max(stat.values) == min(stat.values)
    spread = _SPREAD.get(fmt, lambda s: f"{s:.3g}")
    text = fmt(stat.mean) if same else f"{fmt(stat.mean)} ± {spread(stat.std)}"
    return text if stat.defined else f"{text} ({len(stat.values)}/{stat.seeds} seeds)"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


# ---------------------------------------------------------------------- sections
def _config(c: Comparison) -> Mapping[str, Any]:
    return next(iter(c.results[c.baseline].values())).config


def setting_lines(c: Comparison, manifest: Mapping[str, Any] | None = None) -> list[str]:
    cfg = _config(c)
    base = c.base
    rounds = {m.label: max(r.rounds for r in m.rows) for m in c.methods}
    longer = {label: r for label, r in rounds.items() if r != rounds[c.baseline]}
    lines = [
        f"- Dataset **{cfg.get('dataset', 'fashion-mnist')}**, model `{cfg.get('model') or 'default'}` "
        f"({next(iter(c.results[c.baseline].values())).model_parameters:,} parameters), "
        f"{cfg.get('num-clients')} clients, {cfg.get('fraction-train')} of them per round, "
        f"{cfg.get('local-steps')} local steps of batch {cfg.get('batch-size')} at lr "
        f"{cfg.get('lr') or 'the dataset default'}"
        + (
            f", partitioning {cfg.get('partitioning')} (α = {cfg.get('alpha')})"
            if cfg.get("dataset", "fashion-mnist") == "fashion-mnist"
            else ", one client per speaking role"
        )
        + ".",
        f"- Seeds: {', '.join(map(str, c.seeds))}. Central test set: {cfg.get('test-samples')} samples at most "
        "(the whole test split when it is smaller).",
        f"- Rounds: {rounds[c.baseline]} for the baseline {_code(c.baseline)}"
        + (
            f"; {', '.join(f'{_code(k)} {v}' for k, v in longer.items())} (more rounds to reach the target: "
            "what is compared is bytes to target)"
            if longer
            else ""
        )
        + ".",
        f"- Target, per seed: {_code(c.baseline)}'s mean accuracy over its last {c.window} evaluations − "
        f"{100 * c.drop:g} pp ({', '.join(f'seed {r.seed}: {_pct(r.target)}' for r in base.rows)}).",
    ]
    if c.links is not None:
        counts = c.links.counts(int(cfg.get("num-clients", 1)))
        lines.append(
            f"- Link model for the simulated time: `{c.links}` ("
            + ", ".join(f"{n} {name}" for name, n in counts.items())
            + " clients)."
        )
    if manifest:
        commit = manifest.get("commit")
        lines.append(
            f"- Produced by `{manifest.get('command', '?')}` from "
            + (
                f"commit `{commit[:10]}`" + (" with uncommitted changes" if manifest.get("dirty") else "")
                if commit
                else "a checkout without git information"
            )
            + f", flwr {manifest.get('flwr')}, torch {manifest.get('torch')}, on {manifest.get('cpus')} "
            f"CPUs ({manifest.get('machine')}, {manifest.get('memory_gb')} GB), in "
            f"{_seconds(manifest.get('seconds'))} (load average {manifest.get('load_average_start')} at "
            f"the start, {manifest.get('load_average_end')} at the end)."
        )
    return lines


def runs_table(c: Comparison) -> list[str]:
    rows = []
    for m in c.methods:
        r = next(iter(c.results[m.label].values()))
        rows.append(
            (
                _code(m.label),
                r.method,
                f"`{r.uplink}`",
                f"`{r.downlink}`",
                "yes" if r.error_feedback else "no",
                "async" if r.is_async else "sync",
            )
        )
    return _table(("run", "method", "uplink", "downlink", "error memory", "mode"), rows)


def main_table(c: Comparison) -> list[str]:
    rows = []
    for m in c.methods:
        reach = f"{m.reached_seeds}/{len(m.rows)}"
        rows.append(
            (
                _code(m.label),
                _mean_std(m.stat("smoothed_at_baseline_rounds"), _pct),
                _DASH if m.is_baseline else _mean_std(m.stat("gap"), _pp),
                reach,
                _mean_std(m.stat("round_reached"), lambda v: f"{v:.0f}"),
                _mean_std(m.stat("uplink_to_target_factor"), _x),
                _mean_std(m.stat("downlink_to_target_factor"), _x),
                _mean_std(m.stat("total_to_target_factor"), _x),
                _mean_std(m.stat("time_to_target"), _seconds),
                _mean_std(m.stat("time_to_target_speedup"), _x),
            )
        )
    return _table(
        (
            "run",
            "accuracy (smoothed, baseline rounds)",
            "vs baseline",
            "reached (seeds)",
            "round reached",
            "uplink × fewer to target",
            "downlink × fewer to target",
            "total × fewer to target",
            "simulated time to target",
            "time speed-up",
        ),
        rows,
    )


def seed_table(c: Comparison) -> list[str]:
    rows = []
    for m in c.methods:
        for r in m.rows:
            rows.append(
                (
                    _code(m.label),
                    r.seed,
                    _pct(r.smoothed_at_baseline_rounds),
                    _pct(r.target),
                    _DASH if r.round_reached is None else r.round_reached,
                    human_bytes(r.uplink_to_target),
                    human_bytes(r.downlink_to_target),
                    _x(r.uplink_to_target_factor),
                    _x(r.downlink_to_target_factor),
                    _seconds(r.time_to_target),
                    _pct(r.best_accuracy),
                )
            )
    return _table(
        (
            "run",
            "seed",
            "accuracy (smoothed)",
            "target",
            "round reached",
            "uplink to target",
            "downlink to target",
            "uplink × fewer",
            "downlink × fewer",
            "simulated time",
            "best",
        ),
        rows,
    )


def finding_lines(c: Comparison) -> list[str]:
    others = [m for m in c.methods if not m.is_baseline]
    hit = [m for m in others if m.reached_all]
    lines = [
        f"- {len(hit)} of {len(others)} methods reach the target on every seed"
        + (": " + ", ".join(_code(m.label) for m in hit) if hit else "")
        + "."
    ]
    partial = [m for m in others if 0 < m.reached_seeds < len(m.rows)]
    if partial:
        lines.append(
            "- On some seeds only: "
            + ", ".join(f"{_code(m.label)} ({m.reached_seeds}/{len(m.rows)})" for m in partial)
            + "."
        )
    b = best(c)
    if b is not None:
        lines.append(
            f"- Fewest total bytes to target: {_code(b.label)}, "
            f"{_mean_std(b.stat('total_to_target_factor'), _x)} fewer than {_code(c.baseline)}."
        )
    for goal in c.goals:
        verdicts = {m.label: goal_verdict(m, goal) for m in others}
        passing = [label for label, v in verdicts.items() if v == "PASS"]
        lines.append(
            f'- Goal "{goal}": '
            + (("**PASS** for " + ", ".join(map(_code, passing))) if passing else "**no method passes**")
            + "; "
            + ", ".join(f"{_code(label)} {v}" for label, v in verdicts.items() if label not in passing)
            + "."
        )
    rec = recommended(c)
    if c.goals:
        if rec is None:
            lines.append("- No method meets every goal on every seed: nothing to recommend from this evidence.")
        else:
            lines.append(
                f"- **Recommended**: {_code(rec.label)} (meets every goal on every seed; shortest "
                f"simulated time to target among those: {_mean_std(rec.stat('time_to_target'), _seconds)}"
                f" vs {_mean_std(c.base.stat('time_to_target'), _seconds)} for {_code(c.baseline)})."
            )
    return lines


def claim_lines(c: Comparison) -> list[str]:
    results = judge_claims(c)
    if not results:
        return ["- None of the four papers' methods is in these results."]
    lines = []
    for cr in results:
        detail = "; ".join(f"{what}: {verdict}" for what, verdict in cr.checks)
        m = cr.method
        lines.append(
            f"- **{cr.claim.paper}**, {_code(m.label)} — claim: {cr.claim.statement}. Here: accuracy "
            f"{_mean_std(m.stat('gap'), _pp)} vs {_code(c.baseline)}, "
            f"{_mean_std(m.stat('total_factor'), _x)} fewer total bytes at equal rounds, uplink to target "
            f"{_mean_std(m.stat('uplink_to_target_factor'), _x)} fewer ({m.reached_seeds}/{len(m.rows)} "
            f"seeds reach it). {detail}. Verdict: **{cr.verdict}**."
        )
    return lines


def async_lines(c: Comparison) -> list[str]:
    rows = []
    for m in c.methods:
        if not m.is_async:
            continue
        sync = next(
            (s for s in c.methods if not s.is_async and m.method.startswith(s.method) and m.method != s.method), None
        )
        rows.append(
            (
                _code(m.label),
                _code(sync.label) if sync else _DASH,
                _mean_std(m.stat("wall_time_to_target"), _seconds),
                _mean_std(sync.stat("wall_time_to_target"), _seconds) if sync else _DASH,
            )
        )
    if not rows:
        return []
    return [
        "",
        "## Asynchronous vs synchronous",
        "",
        "Measured wall-clock time to the target.",
        "",
        *_table(("async run", "sync run", "async time to target", "sync time to target"), rows),
    ]


# ---------------------------------------------------------------------- Markdown
def render_markdown(
    c: Comparison,
    plots: Mapping[str, Path] | None = None,
    manifest: Mapping[str, Any] | None = None,
    csv_name: str | None = "summary.csv",
) -> str:
    """The report text; ``plots`` (file name -> path) are linked by file name, next to the Markdown."""
    n = len(c.seeds)
    lines = [
        "# qfl experiment report",
        "",
        "## Setting",
        "",
        *setting_lines(c, manifest),
        "",
        "## Runs",
        "",
        *runs_table(c),
        "",
        "## Results",
        "",
        f"Over {n} seed{'s' if n > 1 else ''}: mean ± sample standard deviation (a figure defined on only "
        "some seeds says on how many). Accuracy is the mean of the last "
        f"{c.window} evaluations up to the baseline's last round. \"× fewer\" is {_code(c.baseline)}'s bytes "
        "to the target divided by the method's, on the same seed; bytes to target count up to and including "
        "the first evaluation at or above the seed's target. 1 KB = 1000 B.",
        "",
        *main_table(c),
        "",
        "Per seed:",
        "",
        *seed_table(c),
    ]
    if csv_name:
        lines += ["", f"Unrounded, one row per method and seed: [`{csv_name}`]({csv_name})."]
    lines += [
        "",
        "## What this shows",
        "",
        *finding_lines(c),
        "",
        "## Paper claims",
        "",
        'Verdicts from the seed mean ± std: "holds" when the whole spread clears the threshold, '
        '"does not hold" when none of it does, "inconclusive" when it straddles it.',
        "",
        *claim_lines(c),
        *async_lines(c),
    ]
    if plots:
        lines += ["", "## Plots", ""]
        for name in plots:
            lines += [f"![{name[:-4].replace('_', ' ')}]({name})", ""]
        lines.pop()
    return "\n".join(lines) + "\n"


def write_report(
    result_dir: str | Path,
    out_md: str | Path | None = None,
    baseline: str = "fedavg",
    goals: Sequence[Goal] = (),
    *,
    plots: bool = True,
    links: str | None = "",
) -> Path:
    """Load every result under ``result_dir`` and write the Markdown, ``summary.csv`` and the PNGs beside it."""
    result_dir = Path(result_dir)
    c = compare(load_results(result_dir), baseline=baseline, goals=goals, links=links)
    out_md = Path(out_md) if out_md is not None else result_dir / "report.md"
    out_md.parent.mkdir(parents=True, exist_ok=True)
    write_csv(c, out_md.parent / "summary.csv")
    manifest_path = result_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    pngs = plot_report(c, out_md.parent) if plots else None
    out_md.write_text(render_markdown(c, pngs, manifest), encoding="utf-8")
    return out_md


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qfl.simulations.report",
        description="Markdown report (tables, CSV, PNG plots) from qfl result files.",
    )
    parser.add_argument("result_dir", type=Path, help="directory holding <label>.json or seed-*/<label>.json files")
    parser.add_argument("-o", "--out", type=Path, default=None, help="Markdown file (default RESULT_DIR/report.md)")
    parser.add_argument("--baseline", default="fedavg", help="label or method of the baseline (default fedavg)")
    parser.add_argument("--goals", default="", help="e.g. uplink=100,downlink=10: x fewer bytes to target")
    parser.add_argument("--links", default="", help="link model spec (default: the one in the run config)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        path = write_report(
            args.result_dir,
            args.out,
            baseline=args.baseline,
            goals=parse_goals(args.goals),
            plots=not args.no_plots,
            links=args.links,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
