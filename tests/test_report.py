"""The evidence protocol: result schema, multi-seed comparison, verdicts, report files.

The fixture results are made up with round numbers so every figure is exact: fedavg
sends 1 MB per round each way; its last five accuracies average 80% on seed 1 and 82%
on seed 2, so the targets are 79% and 81%.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from qfl.simulations import compare as C
from qfl.simulations import report as R
from qfl.simulations.links import parse_links
from qfl.simulations.results import MANIFEST, ClientTraffic, RoundRecord, RunResult, load_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {
    "dataset": "fashion-mnist",
    "num-clients": 4,
    "fraction-train": 0.5,
    "partitioning": "dirichlet",
    "alpha": 0.5,
    "local-steps": 10,
    "batch-size": 32,
    "lr": 0.0,
    "model": "",
    "test-samples": 10000,
    "links": "slow: share=0.25, up=1, down=1, latency=0, step=0; fast: up=8, down=8, latency=0, step=0",
}


def run(label, seed, accs, up, down, *, method=None, is_async=False, clients=True):
    """A result: round 0 (no bytes) plus one round per further accuracy, constant bytes per round.

    With ``clients``, each round records partition 0 (slow, 1 Mbit/s) and partition 1 (fast)
    each moving half the bytes: the slow one sets the round's time, (up + down) / 2 * 8 / 1e6 s.
    """
    rounds = []
    for i, acc in enumerate(accs):
        u, d = (0, 0) if i == 0 else (up, down)
        traffic = (
            (ClientTraffic(0, d // 2, u // 2, True), ClientTraffic(1, d // 2, u // 2, True)) if clients and i else ()
        )
        rounds.append(
            RoundRecord(
                round=i,
                accuracy=acc,
                loss=2.0 - acc,
                uplink_bytes=u,
                downlink_bytes=d,
                wall_time=10.0 * i,
                messages=2 if i else 0,
                replies=2 if i else 0,
                clients=traffic,
            )
        )
    return RunResult(
        label=label,
        method=method or label,
        seed=seed,
        uplink="topk(ratio=0.01)",
        downlink="delta | topk(ratio=0.05)",
        error_feedback=True,
        config=dict(CONFIG),
        model_parameters=222490,
        rounds=tuple(rounds),
        is_async=is_async,
    )


MB = 1_000_000
FEDAVG = {1: [0.1, 0.5, 0.7, 0.79, 0.80, 0.80, 0.81, 0.80], 2: [0.1, 0.6, 0.81, 0.82, 0.82, 0.82, 0.82, 0.82]}
RESULTS = [
    run("fedavg", 1, FEDAVG[1], MB, MB),
    run("fedavg", 2, FEDAVG[2], MB, MB),
    # reaches 79% at round 3 (seed 1) and 81% at round 4 (seed 2) with 5 KB / 50 KB per round:
    # 200x / 20x fewer on seed 1 (3 MB vs 15 KB), 100x / 10x on seed 2 (2 MB vs 20 KB: round 2 vs 4).
    run("qsparse", 1, [0.1, 0.6, 0.7, 0.79, 0.80, 0.80, 0.80, 0.80, 0.81], 5_000, 50_000),
    run("qsparse", 2, [0.1, 0.6, 0.7, 0.80, 0.81, 0.81, 0.81, 0.81, 0.82], 5_000, 50_000),
    # reaches on seed 1 only, and ends 2 and 4 pp under fedavg
    run("qsgd8", 1, [0.1, 0.79, 0.78, 0.78, 0.78, 0.78, 0.78, 0.78], 250_000, MB),
    run("qsgd8", 2, [0.1, 0.78, 0.78, 0.78, 0.78, 0.78, 0.78, 0.78], 250_000, MB),
]


def write(directory: Path, results=RESULTS) -> Path:
    for r in results:
        (directory / f"seed-{r.seed}").mkdir(parents=True, exist_ok=True)
        r.save(directory / f"seed-{r.seed}" / f"{r.label}.json")
    return directory


@pytest.fixture(scope="module")
def comp():
    return C.compare(RESULTS, goals=C.parse_goals("uplink=100,downlink=10"))


# ------------------------------------------------------------------------- schema
def test_result_file_roundtrip_and_loader(tmp_path):
    d = write(tmp_path)
    (d / MANIFEST).write_text(json.dumps({"commit": "abc"}))  # not a result
    loaded = load_results(d)
    assert sorted((r.label, r.seed) for r in loaded) == sorted((r.label, r.seed) for r in RESULTS)
    assert {(r.label, r.seed): r for r in loaded}[("qsparse", 2)] == RESULTS[3]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda o: o["rounds"][1].update(accuracy=81.0), "rounds[1].accuracy' must be a fraction"),
        (lambda o: o["rounds"][1].update(uplink_bytes=-1), "rounds[1].uplink_bytes' must be a non-negative integer"),
        (lambda o: o["rounds"][1]["clients"][0].update(replied="yes"), "rounds[1].clients[0].replied' must be true"),
        (lambda o: o.pop("seed"), "field 'seed' is missing"),
        (lambda o: o.update(extra=1), "unknown field(s) 'extra'"),
        (lambda o: o["rounds"].reverse(), "must increase"),
        (lambda o: o.update(rounds=[]), "'rounds' is empty"),
    ],
)
def test_loader_names_file_and_field(tmp_path, mutate, message):
    obj = RESULTS[0].to_json()
    obj = json.loads(json.dumps(obj))
    mutate(obj)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(ValueError) as exc:
        RunResult.load(path)
    assert str(path) in str(exc.value) and message in str(exc.value)


def test_duplicate_label_and_seed_is_refused(tmp_path):
    RESULTS[0].save(tmp_path / "a.json")
    RESULTS[0].save(tmp_path / "b.json")
    with pytest.raises(ValueError, match="already in"):
        load_results(tmp_path)


# ------------------------------------------------------------------------- numbers
def test_targets_are_the_smoothed_baseline_per_seed(comp):
    assert [r.target for r in comp.base.rows] == pytest.approx([0.79, 0.81])


def test_bytes_and_factors_to_target_per_seed(comp):
    q = comp.method("qsparse")
    s1, s2 = q.rows
    assert (s1.round_reached, s1.uplink_to_target, s1.downlink_to_target) == (3, 15_000, 150_000)
    assert (s2.round_reached, s2.uplink_to_target) == (4, 20_000)
    base1, base2 = comp.base.rows
    assert (base1.round_reached, base2.round_reached) == (3, 2)
    assert s1.uplink_to_target_factor == pytest.approx(3 * MB / 15_000)
    assert s2.uplink_to_target_factor == pytest.approx(2 * MB / 20_000)
    assert s2.downlink_to_target_factor == pytest.approx(2 * MB / 200_000)
    stat = q.stat("uplink_to_target_factor")
    assert stat.mean == pytest.approx(150) and stat.std == pytest.approx(math.sqrt(2) * 50)
    assert q.reached_all


def test_accuracy_gap_is_at_the_baselines_rounds(comp):
    q = comp.method("qsparse")
    # rounds 3..7 of seed 1: 0.79, 0.80, 0.80, 0.80, 0.80 -> 0.798 vs fedavg's 0.80
    assert q.rows[0].smoothed_at_baseline_rounds == pytest.approx(0.798)
    assert q.rows[0].gap == pytest.approx(-0.002)
    assert q.rows[0].smoothed_accuracy == pytest.approx(0.802)  # its own last five (8 rounds)


def test_a_method_reaches_only_if_every_seed_does(comp):
    q8 = comp.method("qsgd8")
    assert q8.reached_seeds == 1 and not q8.reached_all
    assert comp.methods[0].is_baseline and comp.methods[1].label == "qsparse"  # reached before missed


def test_simulated_time_from_the_link_model(comp):
    q = comp.method("qsparse").rows[0]
    per_round = (5_000 // 2 + 50_000 // 2) * 8 / 1e6  # the slow client (1 Mbit/s both ways)
    assert q.time_to_target == pytest.approx(3 * per_round)
    base = comp.base.rows[0]
    assert q.time_to_target_speedup == pytest.approx(base.time_to_target / q.time_to_target)


# ------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize(
    "values, threshold, verdict",
    [
        ((120.0, 130.0, 125.0), 100, "holds"),
        ((60.0, 70.0, 65.0), 100, "does not hold"),
        ((90.0, 110.0, 130.0), 100, "inconclusive"),  # 110 ± 20 straddles 100
        ((-0.004, -0.006), -0.01, "holds"),
    ],
)
def test_verdict_from_mean_and_spread(values, threshold, verdict):
    assert C.Stat(values, len(values)).verdict(threshold) == verdict


def test_a_figure_missing_on_a_seed_cannot_hold():
    assert C.Stat((200.0,), 2).verdict(100) == "inconclusive"


def test_goals(comp):
    up, down = comp.goals
    q = comp.method("qsparse")
    assert C.goal_verdict(q, up) == "INCONCLUSIVE"  # 150 ± 70.7: straddles 100
    assert C.goal_verdict(q, down) == "INCONCLUSIVE"  # 15 ± 7.07
    assert C.goal_verdict(comp.method("qsgd8"), down) == "FAIL"
    assert C.recommended(comp) is None
    relaxed = C.compare(RESULTS, goals=C.parse_goals("uplink=50"))
    assert C.recommended(relaxed).label == "qsparse"
    with pytest.raises(ValueError, match="DIRECTION=FACTOR"):
        C.parse_goals("sideways=3")


def test_claims_come_from_the_presets(comp):
    judged = {cr.method.label: cr for cr in C.judge_claims(comp)}
    assert judged["qsparse"].claim.paper.startswith("Qsparse-local-SGD")
    assert judged["qsparse"].verdict == "holds"  # >= 10x uplink to target on both seeds
    # qsgd8 ends at 78% vs 80% / 82%: -2 and -4 pp, beyond 1 pp on both seeds
    assert judged["qsgd8"].verdict == "does not hold"


# ------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    d = write(tmp_path_factory.mktemp("results"))
    (d / MANIFEST).write_text(
        json.dumps(
            {
                "command": "python -m qfl.simulations.runner --seeds 1,2",
                "commit": "0123456789abcdef",
                "dirty": False,
                "flwr": "1.41.0",
                "torch": "2.13.0",
                "cpus": 2,
                "machine": "x86_64",
                "memory_gb": 24,
                "seconds": 600,
                "load_average_start": [0.1],
                "load_average_end": [0.2],
            }
        )
    )
    md = R.write_report(d, goals=C.parse_goals("uplink=100,downlink=10"))
    return d, md.read_text()


def test_markdown_report(report_dir):
    _, md = report_dir
    assert "commit `0123456789`" in md and "Seeds: 1, 2" in md
    assert "seed 1: 79.00%" in md and "seed 2: 81.00%" in md
    assert "| `qsparse` | " in md and "150× ± 70.7" in md and "2/2" in md
    assert "`qsgd8` (1/2)" in md
    assert "**Qsparse-local-SGD (Basu et al., 2019)**" in md and "Verdict: **holds**" in md
    assert "No method meets every goal on every seed" in md


def test_summary_csv_one_row_per_label_and_seed(report_dir):
    d, _ = report_dir
    rows = list(csv.DictReader((d / "summary.csv").open()))
    assert [(r["label"], r["seed"]) for r in rows] == [
        ("fedavg", "1"),
        ("fedavg", "2"),
        ("qsparse", "1"),
        ("qsparse", "2"),
        ("qsgd8", "1"),
        ("qsgd8", "2"),
    ]
    q = rows[2]
    assert int(q["uplink_bytes_to_target"]) == 15_000 and float(q["smoothed_accuracy"]) == pytest.approx(0.802)
    assert {"uplink_to_target_factor", "downlink_to_target_factor", "reached_target", "target_accuracy"} <= set(q)


def test_pngs_written_and_linked(report_dir):
    d, md = report_dir
    for name in (
        "accuracy_vs_uplink.png",
        "accuracy_vs_downlink.png",
        "accuracy_per_round.png",
        "accuracy_vs_time.png",
    ):
        assert (d / name).read_bytes()[:8] == PNG_MAGIC
        assert f"({name})" in md


def test_cli(tmp_path, capsys):
    d = write(tmp_path / "r")
    assert R.main([str(d), "--no-plots", "--goals", "uplink=100"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert R.main([str(tmp_path / "missing")]) == 2


def test_link_spec_errors():
    assert str(parse_links(CONFIG["links"])) == CONFIG["links"]
    for bad, message in (
        ("slow: up=1, down=1, latency=0", "missing step"),
        ("slow: up=1, down=1, latency=0, step=0; fast: up=2, down=2, latency=0, step=0", "needs a share"),
        ("a: share=2, up=1, down=1, latency=0, step=0; b: up=1, down=1, latency=0, step=0", "add up"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_links(bad)


def test_import_is_light():
    # Only what these modules add counts: the parent packages are not theirs.
    code = (
        "import sys, qfl.simulations; before = set(sys.modules); "
        "import qfl.simulations.report, qfl.simulations.compare; new = set(sys.modules) - before; "
        "print(sorted(m for m in ('torch', 'flwr', 'matplotlib') if m in new))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
