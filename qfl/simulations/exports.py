"""What a report writes beside its Markdown: the per-seed CSV and the PNG plots.

Apart from :mod:`qfl.simulations.report` because neither is text for reading: the CSV
keeps every number unrounded for other tools, and the plots are the one place that
needs matplotlib (imported inside :func:`plot_report`, through the Agg canvas, so no
global backend switch).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from .compare import Comparison, SeedRow

#: Resolution of the PNG plots.
PLOT_DPI = 150

# ---------------------------------------------------------------------- CSV
#: One row per (label, seed); the column names of earlier reports are kept.
CSV_FIELDS = (
    "label",
    "seed",
    "method",
    "async",
    "baseline",
    "final_accuracy",
    "best_accuracy",
    "smoothed_accuracy",
    "smoothed_accuracy_baseline_rounds",
    "uplink_bytes",
    "downlink_bytes",
    "total_factor",
    "target_accuracy",
    "reached_target",
    "round_reached",
    "uplink_bytes_to_target",
    "downlink_bytes_to_target",
    "uplink_to_target_factor",
    "downlink_to_target_factor",
    "total_to_target_factor",
    "simulated_time_to_target",
    "time_to_target_speedup",
    "wall_time",
    "time_to_target",
)


def _csv_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _csv_row(r: SeedRow) -> tuple:
    return (
        r.label,
        r.seed,
        r.method,
        r.is_async,
        r.is_baseline,
        r.final_accuracy,
        r.best_accuracy,
        r.smoothed_accuracy,
        r.smoothed_at_baseline_rounds,
        r.uplink_bytes,
        r.downlink_bytes,
        r.total_factor,
        r.target,
        r.reached,
        r.round_reached,
        r.uplink_to_target,
        r.downlink_to_target,
        r.uplink_to_target_factor,
        r.downlink_to_target_factor,
        r.total_to_target_factor,
        r.time_to_target,
        r.time_to_target_speedup,
        r.wall_time,
        r.wall_time_to_target,
    )


def write_csv(c: Comparison, path: str | Path) -> Path:
    """Exact numbers (bytes as integers, factors at full precision), one row per (label, seed)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for m in c.methods:
            for r in m.rows:
                w.writerow([_csv_value(v) for v in _csv_row(r)])
    return path


# ---------------------------------------------------------------------- plots
def plot_report(c: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Accuracy against cumulative uplink and downlink bytes, rounds and simulated time.

    Each seed is a thin line, the mean over seeds (at equal record index) a thick one;
    byte axes are logarithmic (the methods differ by orders of magnitude), so the
    initial evaluation (0 bytes) is left out there.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .compare import simulated_times

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmap = colormaps["tab10" if len(c.methods) <= 10 else "tab20"]
    colours = {m.label: ("black" if m.is_baseline else cmap(i % cmap.N)) for i, m in enumerate(c.methods)}

    def series(kind: str):
        for m in c.methods:
            curves = []
            for run in c.results[m.label].values():
                ys = [100 * r.accuracy for r in run.rounds]
                if kind == "rounds":
                    xs = [float(r.round) for r in run.rounds]
                elif kind == "time":
                    xs = simulated_times(run, c.links)
                else:
                    xs = list(np.cumsum([getattr(r, f"{kind}_bytes") for r in run.rounds], dtype=float))
                pts = [(x, y) for x, y in zip(xs, ys) if x is not None and (kind in ("rounds", "time") or x > 0)]
                if pts:
                    curves.append(pts)
            if curves:
                yield m, curves

    written = {}
    for name, kind, xlabel, log in (
        ("accuracy_vs_uplink.png", "uplink", "cumulative uplink bytes (log scale)", True),
        ("accuracy_vs_downlink.png", "downlink", "cumulative downlink bytes (log scale)", True),
        ("accuracy_per_round.png", "rounds", "round (server version for async runs)", False),
        ("accuracy_vs_time.png", "time", "simulated time under the link model (s)", False),
    ):
        drawn = list(series(kind))
        if not drawn:
            continue
        fig = Figure(figsize=(8, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for m, curves in drawn:
            for pts in curves:
                ax.plot(*zip(*pts), color=colours[m.label], linewidth=0.6, alpha=0.35)
            n = min(len(p) for p in curves)
            mean = np.mean([[p[i] for i in range(n)] for p in curves], axis=0)
            ax.plot(
                mean[:, 0],
                mean[:, 1],
                color=colours[m.label],
                linewidth=1.8 if m.is_baseline else 1.4,
                label=f"{m.label} (mean of {len(curves)})" if len(curves) > 1 else m.label,
            )
        mean_target = float(np.mean([r.target for r in c.base.rows]))
        ax.axhline(
            100 * mean_target, color="grey", linestyle="--", linewidth=1.0, label=f"target {100 * mean_target:.2f}%"
        )
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(max(0.0, 100 * mean_target - 25), None)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
        path = out_dir / name
        fig.savefig(path, dpi=PLOT_DPI, bbox_inches="tight")
        written[name] = path
    return written
