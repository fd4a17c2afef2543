"""Compare methods over seeds: targets, bytes and time to target, verdicts.

The evidence protocol, computed here and only here:

* **Target, per seed**: the baseline's *smoothed* accuracy (mean of its last
  ``window`` = 5 evaluations) minus ``drop`` (1 pp). A final round that happens to dip or
  peak moves a single evaluation by as much as a method's whole margin; the mean of
  five does not.
* **Bytes to target, per seed**: a method's cumulative bytes up to and including its
  first evaluation at or above that seed's target, against the baseline's own bytes to
  the same target. A method *reaches* the target only if it does on every seed.
* **Accuracy gaps** compare smoothed accuracies at the baseline's number of rounds:
  methods may train longer (``rounds-factor``) to reach the target, not to look better
  at the end.
* **Verdicts** use the seed mean and its spread (± one sample standard deviation):
  "holds" when the whole spread is on the right side of the threshold, "does not hold"
  when it is all on the wrong side, "inconclusive" when it straddles it.

Only numpy and the standard library at import time (the claims come from the presets,
imported when judged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .links import LinkModel, parse_links
from .results import RunResult, runs_by_label

#: Evaluations the smoothed accuracy averages.
WINDOW = 5
#: Target = baseline smoothed accuracy minus this.
DROP = 0.01
# Accuracies went through JSON: a run that hits the target exactly must count.
_TOL = 1e-9
DIRECTIONS = ("uplink", "downlink", "total")


@dataclass(frozen=True)
class Goal:
    """A project goal: at least ``factor`` times fewer ``direction`` bytes to the target."""

    direction: str
    factor: float

    def __str__(self) -> str:
        return f"≥{self.factor:g}× fewer {self.direction} bytes to target"


def parse_goals(text: str) -> tuple[Goal, ...]:
    """``"uplink=100,downlink=10"`` -> goals; ValueError naming the bad item."""
    goals = []
    for item in (t for t in text.split(",") if t.strip()):
        key, eq, raw = item.partition("=")
        key = key.strip()
        try:
            factor = float(raw)
        except ValueError:
            factor = math.nan
        if not eq or key not in DIRECTIONS or not (math.isfinite(factor) and factor > 0):
            raise ValueError(
                f"goal {item.strip()!r}: expected DIRECTION=FACTOR with DIRECTION in "
                f"{', '.join(DIRECTIONS)} and a positive factor"
            )
        goals.append(Goal(key, factor))
    return tuple(goals)


def smoothed(accuracies: Sequence[float], window: int = WINDOW) -> float:
    """Mean of the last ``window`` values."""
    return float(np.mean(accuracies[-window:]))


@dataclass(frozen=True)
class SeedRow:
    """One method on one seed. Factors are baseline / this run ("× fewer")."""

    label: str
    method: str
    seed: int
    is_baseline: bool
    is_async: bool
    rounds: int
    target: float
    final_accuracy: float
    best_accuracy: float
    smoothed_accuracy: float  # at its own end
    smoothed_at_baseline_rounds: float
    uplink_bytes: int
    downlink_bytes: int
    uplink_bytes_equal_rounds: int
    downlink_bytes_equal_rounds: int
    round_reached: int | None
    uplink_to_target: int | None
    downlink_to_target: int | None
    time_to_target: float | None  # simulated under the link model
    wall_time: float | None
    wall_time_to_target: float | None
    uplink_to_target_factor: float | None = None
    downlink_to_target_factor: float | None = None
    total_to_target_factor: float | None = None
    time_to_target_speedup: float | None = None
    total_factor: float | None = None  # whole run, equal rounds
    gap: float = 0.0  # smoothed at baseline rounds minus the baseline's smoothed

    @property
    def reached(self) -> bool:
        return self.round_reached is not None

    @property
    def total_to_target(self) -> int | None:
        return None if self.uplink_to_target is None else self.uplink_to_target + self.downlink_to_target


@dataclass(frozen=True)
class Stat:
    """Mean ± sample std over seeds of one figure (seeds where it is undefined left out)."""

    values: tuple[float, ...]
    seeds: int  # how many seeds there were

    @property
    def defined(self) -> bool:
        return len(self.values) == self.seeds and self.seeds > 0

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else 0.0

    def verdict(self, threshold: float) -> str:
        """ "holds" / "does not hold" / "inconclusive" for "at least ``threshold``"."""
        if not self.values:
            return "does not hold"
        lo, hi = self.mean - self.std, self.mean + self.std
        if lo >= threshold - _TOL and self.defined:
            return "holds"
        if hi < threshold - _TOL:
            return "does not hold"
        return "inconclusive"


@dataclass(frozen=True)
class MethodStats:
    """One method over every seed."""

    label: str
    method: str
    is_baseline: bool
    is_async: bool
    rows: tuple[SeedRow, ...]

    def stat(self, attr: str) -> Stat:
        vals = tuple(float(getattr(r, attr)) for r in self.rows if getattr(r, attr) is not None)
        return Stat(vals, len(self.rows))

    @property
    def reached_seeds(self) -> int:
        return sum(r.reached for r in self.rows)

    @property
    def reached_all(self) -> bool:
        return bool(self.rows) and self.reached_seeds == len(self.rows)


@dataclass(frozen=True)
class Comparison:
    """Everything the report shows, computed once; methods in report order."""

    baseline: str
    seeds: tuple[int, ...]
    methods: tuple[MethodStats, ...]
    results: Mapping[str, Mapping[int, RunResult]]
    drop: float
    window: int
    goals: tuple[Goal, ...]
    links: LinkModel | None

    def method(self, label: str) -> MethodStats:
        for m in self.methods:
            if m.label == label:
                return m
        raise KeyError(label)

    @property
    def base(self) -> MethodStats:
        return self.method(self.baseline)


def _factor(base: float | None, value: float | None) -> float | None:
    if base is None or value is None:
        return None
    if value == 0:
        return math.inf if base > 0 else None
    return float(base) / float(value)


def simulated_times(result: RunResult, links: LinkModel | None) -> list[float | None]:
    """Simulated seconds at each record under the link model (None where it does not apply:
    no model, an async run, or no per-client traffic)."""
    if links is None or result.is_async or not any(r.clients for r in result.rounds):
        return [None] * len(result.rounds)
    steps = int(result.config.get("local-steps", 1) or 1)
    clients = int(result.config.get("num-clients", 1))
    total, out = 0.0, []
    for r in result.rounds:
        total += links.round_seconds(r.clients, clients, steps)
        out.append(total)
    return out


def _seed_row(
    result: RunResult, target: float, baseline_rounds: int, window: int, links: LinkModel | None, is_baseline: bool
) -> SeedRow:
    rounds = result.rounds
    up = np.cumsum([r.uplink_bytes for r in rounds], dtype=np.int64)
    down = np.cumsum([r.downlink_bytes for r in rounds], dtype=np.int64)
    times = simulated_times(result, links)
    accs = [r.accuracy for r in rounds]
    hit = next((i for i, a in enumerate(accs) if a >= target - _TOL), None)
    equal = [i for i, r in enumerate(rounds) if r.round <= baseline_rounds] or [0]
    return SeedRow(
        label=result.label,
        method=result.method,
        seed=result.seed,
        is_baseline=is_baseline,
        is_async=result.is_async,
        rounds=rounds[-1].round,
        target=target,
        final_accuracy=accs[-1],
        best_accuracy=max(accs),
        smoothed_accuracy=smoothed(accs, window),
        smoothed_at_baseline_rounds=smoothed([accs[i] for i in equal], window),
        uplink_bytes=int(up[-1]),
        downlink_bytes=int(down[-1]),
        uplink_bytes_equal_rounds=int(up[equal[-1]]),
        downlink_bytes_equal_rounds=int(down[equal[-1]]),
        round_reached=rounds[hit].round if hit is not None else None,
        uplink_to_target=int(up[hit]) if hit is not None else None,
        downlink_to_target=int(down[hit]) if hit is not None else None,
        time_to_target=times[hit] if hit is not None else None,
        wall_time=rounds[-1].wall_time,
        wall_time_to_target=rounds[hit].wall_time if hit is not None else None,
    )


def _against(row: SeedRow, base: SeedRow) -> SeedRow:
    import dataclasses

    return dataclasses.replace(
        row,
        uplink_to_target_factor=_factor(base.uplink_to_target, row.uplink_to_target),
        downlink_to_target_factor=_factor(base.downlink_to_target, row.downlink_to_target),
        total_to_target_factor=_factor(base.total_to_target, row.total_to_target),
        time_to_target_speedup=_factor(base.time_to_target, row.time_to_target),
        total_factor=_factor(
            base.uplink_bytes_equal_rounds + base.downlink_bytes_equal_rounds,
            row.uplink_bytes_equal_rounds + row.downlink_bytes_equal_rounds,
        ),
        gap=row.smoothed_at_baseline_rounds - base.smoothed_accuracy,
    )


def compare(
    results: Sequence[RunResult],
    baseline: str = "fedavg",
    *,
    drop: float = DROP,
    window: int = WINDOW,
    goals: Sequence[Goal] = (),
    links: str | LinkModel | None = "",
) -> Comparison:
    """Every method against the baseline, seed by seed.

    ``baseline`` is a label (or the method of exactly one label). Seeds are those the
    baseline ran; a method missing a seed is compared on the seeds it has, and the
    report says so. ``links``: a link model, its spec, "" for the one in the
    baseline's run config, None for none.
    """
    if not (isinstance(drop, (int, float)) and math.isfinite(drop) and drop >= 0):
        raise ValueError(f"drop must be a finite number >= 0, got {drop!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    by_label = runs_by_label(list(results))
    if not by_label:
        raise ValueError("no results to compare")
    if baseline not in by_label:
        same = [label for label, runs in by_label.items() if any(r.method == baseline for r in runs.values())]
        if len(same) != 1:
            raise ValueError(
                f"no single result has label or method {baseline!r} to serve as the baseline; "
                f"labels: {', '.join(sorted(by_label))}"
            )
        baseline = same[0]
    base_runs = by_label[baseline]
    seeds = tuple(sorted(base_runs))
    if isinstance(links, str):
        spec = links or next(iter(base_runs.values())).config.get("links", "")
        links = parse_links(spec) if spec else None
    base_rows: dict[int, SeedRow] = {}
    for seed, run in base_runs.items():
        accs = [r.accuracy for r in run.rounds]
        target = smoothed(accs, window) - drop
        row = _seed_row(run, target, run.rounds[-1].round, window, links, True)
        base_rows[seed] = _against(row, row)
    stats = []
    for label, runs in by_label.items():
        rows = []
        for seed in seeds:
            if seed not in runs:
                continue
            b = base_rows[seed]
            rows.append(
                b if label == baseline else _against(_seed_row(runs[seed], b.target, b.rounds, window, links, False), b)
            )
        if rows:
            first = rows[0]
            stats.append(MethodStats(label, first.method, label == baseline, first.is_async, tuple(rows)))
    base = next(m for m in stats if m.is_baseline)
    others = [m for m in stats if not m.is_baseline]
    reached = sorted(
        (m for m in others if m.reached_all), key=lambda m: (-(m.stat("uplink_to_target_factor").mean or 0), m.label)
    )
    missed = sorted((m for m in others if not m.reached_all), key=lambda m: m.label)
    return Comparison(
        baseline=baseline,
        seeds=seeds,
        methods=(base, *reached, *missed),
        results=by_label,
        drop=float(drop),
        window=window,
        goals=tuple(goals),
        links=links,
    )


# ---------------------------------------------------------------------- verdicts
def goal_verdict(m: MethodStats, goal: Goal) -> str:
    """PASS / FAIL / INCONCLUSIVE: reached on every seed with the factor's spread above the goal."""
    stat = m.stat(f"{goal.direction}_to_target_factor")
    if m.reached_seeds == 0:
        return "FAIL"
    verdict = stat.verdict(goal.factor)
    if verdict == "holds" and m.reached_all:
        return "PASS"
    if verdict == "does not hold":
        return "FAIL"
    return "INCONCLUSIVE"


def best(c: Comparison) -> MethodStats | None:
    """The method reaching the target on every seed with the fewest total bytes to it (mean)."""
    ok = [m for m in c.methods if not m.is_baseline and m.reached_all]
    if not ok:
        return None
    return max(ok, key=lambda m: (m.stat("total_to_target_factor").mean or 0.0, m.label))


def recommended(c: Comparison) -> MethodStats | None:
    """What the evidence recommends: among methods meeting every goal (or, without goals,
    reaching the target on every seed), the one with the shortest simulated time to
    target, then the most total bytes saved."""
    ok = [
        m
        for m in c.methods
        if not m.is_baseline and m.reached_all and not m.is_async and all(goal_verdict(m, g) == "PASS" for g in c.goals)
    ]
    if not ok:
        return None

    def key(m: MethodStats) -> tuple[float, float]:
        t = m.stat("time_to_target").mean
        return (t if t is not None else math.inf, -(m.stat("total_to_target_factor").mean or 0.0))

    return min(ok, key=key)


@dataclass(frozen=True)
class ClaimResult:
    """One paper claim judged on one method (over the seeds)."""

    claim: object  # qfl.strategies.claims.Claim
    method: MethodStats
    checks: tuple[tuple[str, str], ...]  # (what, verdict)

    @property
    def verdict(self) -> str:
        verdicts = {v for _, v in self.checks}
        if verdicts == {"holds"}:
            return "holds"
        if "does not hold" in verdicts:
            return "does not hold"
        return "inconclusive"


def judge_claims(c: Comparison) -> list[ClaimResult]:
    """Every paper claim whose methods are in the comparison, judged per method."""
    from ..strategies.claims import CLAIMS

    out = []
    for claim in CLAIMS:
        for m in c.methods:
            if m.is_baseline or m.method not in claim.methods:
                continue
            checks = []
            if claim.within_pp is not None:
                gap = m.stat("gap")
                checks.append((f"ends within {claim.within_pp:g} pp", gap.verdict(-claim.within_pp / 100)))
            if claim.to_target is not None:
                direction, factor = claim.to_target
                if m.reached_seeds == 0:
                    verdict = "does not hold"
                elif not m.reached_all:
                    verdict = "inconclusive"
                else:
                    verdict = m.stat(f"{direction}_to_target_factor").verdict(factor)
                checks.append((f"reaches the target with ≥{factor:g}× fewer {direction} bytes", verdict))
            if claim.total_factor is not None:
                checks.append(
                    (f"≥{claim.total_factor:g}× fewer total bytes", m.stat("total_factor").verdict(claim.total_factor))
                )
            out.append(ClaimResult(claim, m, tuple(checks)))
    return out
