"""Tests for qfl.simulations.report: numbers, verdicts, files and loader errors.

The fixture results are made up with round numbers so every factor is exact:
fedavg sends 1 MB per round each way and reaches the 79% target (80% final minus
one point) at round 3 with 3 MB each way.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qfl.simulations import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"num-clients": 100, "fraction-train": 0.1, "partition": "dirichlet", "alpha": 0.5,
          "local-steps": 5, "num-server-rounds": 4, "model": "cnn", "seed": 0}


def make_result(label, accs, up, down, *, method=None, wall=10.0, is_async=None, config=None, full=1_000_000):
    """A result file dict: round 0 (no bytes) plus one round per further accuracy, constant bytes per round."""
    rounds = []
    for i, acc in enumerate(accs):
        rounds.append({
            "round": i, "accuracy": acc, "loss": 2.0 - acc,
            "uplink_bytes": 0 if i == 0 else up, "downlink_bytes": 0 if i == 0 else down,
            "uplink_full_bytes": 0 if i == 0 else full, "downlink_full_bytes": 0 if i == 0 else full,
            "wall_time": i * wall,
        })
    out = {"label": label, "method": method or label, "uplink": "topk(ratio=0.01) | qsgd(levels=7)",
           "downlink": "delta | topk(ratio=0.05)", "error_feedback": True,
           "config": dict(CONFIG if config is None else config), "model_parameters": 225034, "rounds": rounds}
    if is_async is not None:
        out["async"] = is_async
    return out


def write_dir(directory: Path, results) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for res in results:
        (directory / f"{res['label']}.json").write_text(json.dumps(res))
    return directory


MAIN = [
    make_result("fedavg", [0.10, 0.60, 0.70, 0.79, 0.80], 1_000_000, 1_000_000),
    # 100x / 10x fewer in total; reaches 79% at round 2.
    make_result("qsparse", [0.10, 0.65, 0.79, 0.80, 0.81], 10_000, 100_000),
    # async twin: 4 server versions of 2.5 s to reach the target, vs 20 s for qsparse.
    make_result("qsparse_async", [0.10, 0.50, 0.60, 0.70, 0.80], 10_000, 100_000, is_async=True, wall=2.5),
    make_result("qsgd4", [0.10, 0.50, 0.70, 0.75, 0.795], 125_000, 1_000_000),
    make_result("qsgd8", [0.10, 0.40, 0.50, 0.60, 0.70], 250_000, 1_000_000),
    # reaches exactly 0.79 at round 3: the float tolerance matters.
    make_result("qesgd", [0.10, 0.60, 0.72, 0.79, 0.798], 500_000, 500_000),
]


@pytest.fixture(scope="module")
def main_report(tmp_path_factory):
    d = write_dir(tmp_path_factory.mktemp("results"), MAIN)
    md = R.write_report(d)
    return d, md, md.read_text()


@pytest.fixture(scope="module")
def comp(main_report):
    return R.compare(R.load_results(main_report[0]))


def test_factors_are_exact(comp):
    q = comp.row("qsparse")
    assert q.uplink_factor == 100.0
    assert q.downlink_factor == 10.0
    assert q.total_factor == 8_000_000 / 440_000
    assert comp.row("qsgd4").uplink_factor == 8.0
    assert comp.row("qsgd4").downlink_factor == 1.0
    assert comp.row("qesgd").total_factor == 2.0
    base = comp.base
    assert (base.uplink_factor, base.downlink_factor, base.uplink_to_target_factor) == (1.0, 1.0, 1.0)


def test_target_and_rounds_reached(comp):
    assert comp.baseline == "fedavg"
    assert comp.target == pytest.approx(0.79)
    assert comp.base.round_reached == 3
    assert comp.row("qsparse").round_reached == 2
    assert comp.row("qsgd4").round_reached == 4
    assert comp.row("qesgd").round_reached == 3
    never = comp.row("qsgd8")
    assert not never.reached
    assert never.round_reached is None and never.uplink_to_target is None
    assert never.uplink_to_target_factor is None and never.time_to_target is None


def test_bytes_to_target_are_cumulative(comp):
    assert (comp.base.uplink_to_target, comp.base.downlink_to_target) == (3_000_000, 3_000_000)
    q = comp.row("qsparse")
    assert (q.uplink_to_target, q.downlink_to_target) == (20_000, 200_000)
    assert (q.uplink_to_target_factor, q.downlink_to_target_factor) == (150.0, 15.0)
    assert q.total_to_target_factor == 6_000_000 / 220_000
    a = comp.row("qsparse_async")
    assert (a.uplink_to_target, a.downlink_to_target) == (40_000, 400_000)
    assert a.uplink_to_target_factor == 75.0
    assert comp.row("qsgd4").uplink_to_target == 500_000
    assert comp.row("qsgd4").downlink_to_target_factor == 0.75
    assert (q.time_to_target, a.time_to_target, q.wall_time) == (20.0, 10.0, 40.0)


def test_row_order_baseline_then_uplink_to_target(comp):
    assert [r.label for r in comp.rows] == ["fedavg", "qsparse", "qsparse_async", "qsgd4", "qesgd", "qsgd8"]


def test_reached_at_round_zero(tmp_path):
    lucky = make_result("lucky", [0.85, 0.86], 10, 10, method="custom")
    d = write_dir(tmp_path, [MAIN[0], lucky])
    c = R.compare(R.load_results(d))
    row = c.row("lucky")
    assert row.reached and row.round_reached == 0
    assert (row.uplink_to_target, row.downlink_to_target) == (0, 0)
    assert math.isinf(row.uplink_to_target_factor) and math.isinf(row.downlink_to_target_factor)
    md = R.render_markdown(c)
    assert "`lucky` (round 0)" in md
    assert '**PASS** — `lucky` needs ∞× fewer uplink bytes' in md
    R.write_csv(c, tmp_path / "s.csv")
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "s.csv").open())}
    assert rows["lucky"]["uplink_to_target_factor"] == "inf"
    assert rows["lucky"]["round_reached"] == "0"


def test_main_table_and_setting(main_report):
    _, _, md = main_report
    assert "| dataset | Fashion-MNIST |" in md
    assert "| partitioning | dirichlet, α = 0.5 |" in md
    assert "| model parameters | 225,034 |" in md
    assert "All 6 result files share this setting" in md
    results = md.split("## Results")[1]
    row = next(line for line in results.splitlines() if line.startswith("| `qsparse` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["`qsparse`", "81.00%", "81.00%", "40.0 KB", "400 KB", "100×", "10.0×", "yes", "2",
                     "20.0 KB", "200 KB", "150×", "15.0×", "40.0 s"]
    row = next(line for line in results.splitlines() if line.startswith("| `qsgd8` |"))
    assert row.count("—") == 5  # round, two bytes-to-target, two factors
    # spec strings keep their pipes, escaped so the table does not split
    assert r"`topk(ratio=0.01) \| qsgd(levels=7)`" in md
    assert "| `fedavg` | 4,000,000 | 4,000,000 | 3,000,000 | 3,000,000 | 4,000,000 | 4,000,000 |" in md


def test_findings_and_goals_pass(main_report):
    md = main_report[2]
    assert "- Target accuracy: **79.00%** (`fedavg` final 80.00% − 1 pp)" in md
    assert "- 4 of 5 other runs reach the target: `qsparse` (round 2), `qsparse_async` (round 4)" in md
    assert "- Not reached: `qsgd8` (best 70.00%)." in md
    assert "Best by total bytes to target (uplink + downlink): `qsparse` — 220 KB vs 6.00 MB for `fedavg`" in md
    assert ('- Goal "≥100× fewer uplink bytes than fedavg": **PASS** — `qsparse` needs 150× fewer uplink '
            "bytes to reach the target.") in md
    assert ('- Goal "≥10× fewer downlink bytes than fedavg": **PASS** — `qsparse` needs 15.0× fewer '
            "downlink bytes to reach the target.") in md
    assert "- Runs meeting both goals: `qsparse`." in md


def test_goals_fail(tmp_path):
    # 50x fewer uplink bytes (FAIL), 20x fewer downlink bytes (PASS) to the same target
    half = make_result("qsparse_sign", [0.10, 0.60, 0.70, 0.79, 0.80], 20_000, 50_000)
    c = R.compare([R.parse_result(MAIN[0]), R.parse_result(half)])
    lines = R.finding_lines(c)
    assert '- Goal "≥100× fewer uplink bytes than fedavg": **FAIL** — `qsparse_sign` needs 50.0× fewer ' \
           "uplink bytes to reach the target." in lines
    assert '- Goal "≥10× fewer downlink bytes than fedavg": **PASS** — `qsparse_sign` needs 20.0× fewer ' \
           "downlink bytes to reach the target." in lines
    assert "- No run meets both goals." in lines

    nobody = make_result("qsgd8", [0.1, 0.2, 0.3, 0.4, 0.5], 1, 1)
    lines = R.finding_lines(R.compare([R.parse_result(MAIN[0]), R.parse_result(nobody)]))
    assert "- None of the 1 other runs reaches the target." in lines
    assert sum("**FAIL** — no run other than the baseline reaches the target" in x for x in lines) == 2


def test_claims_present_papers(main_report):
    md = main_report[2]
    claims = md.split("## Paper claims vs this run")[1].split("##")[0]
    lines = [x for x in claims.splitlines() if x.startswith("- ")]
    assert len(lines) == 3
    qsgd, qsparse, qesgd = lines
    assert qsgd.startswith("- **QSGD (Alistarh et al., 2017)** — claim: 4-bit and 8-bit QSGD reach")
    assert "`qsgd4` 79.50% (-0.50 pp, within 1 pp), 8.00× fewer uplink bytes" in qsgd
    assert "`qsgd8` 70.00% (-10.00 pp, not within 1 pp)" in qsgd
    assert qsgd.endswith("Verdict: **partly holds** (1 of 2 runs).")
    assert qsparse.startswith("- **Qsparse-local-SGD (Basu et al., 2019)**")
    assert "local-steps = 5" in qsparse
    assert "`qsparse` at round 2 with 150× fewer uplink, 15.0× fewer downlink and 27.3× fewer total bytes" in qsparse
    assert "`qsparse_async` at round 4 with 75.0× fewer uplink" in qsparse
    assert "Verdict: **holds**" in qsparse
    assert qesgd.startswith("- **Quantized Epoch-SGD (Zhao, Gao, Li, 2019)** — claim, as reconstructed from the "
                            "abstract only")
    assert "`qesgd` final 79.80% (-0.20 pp, within 1 pp), 2.00× fewer total bytes" in qesgd
    assert "Verdict: **holds**" in qesgd
    assert "AsyLPG" not in md


def test_claims_asylpg_and_absent_papers():
    dq = make_result("double_quant", [0.1, 0.6, 0.7, 0.79, 0.80], 250_000, 250_000)  # 4x fewer in total
    sdq = make_result("sdq", [0.1, 0.6, 0.7, 0.79, 0.80], 100_000, 100_000, method="sparse_double_quant")
    c = R.compare([R.parse_result(x) for x in (MAIN[0], dq, sdq)])
    lines = R.claim_lines(c)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("- **AsyLPG double quantization (Yu, Wu, Huang, 2019)** — claim: 6–19× fewer bits")
    assert "`double_quant` 4.00× fewer (+0.00 pp, within 1 pp)" in line
    assert "`sdq` 10.0× fewer (+0.00 pp, within 1 pp)" in line
    assert "Verdict: **partly holds** (1 of 2 runs)" in line
    ef = make_result("ef_signsgd", [0.1, 0.8], 1, 1)
    assert R.claim_lines(R.compare([R.parse_result(x) for x in (MAIN[0], ef)])) == [
        "- None of the four papers' methods is in these results."]


def test_async_table(main_report):
    md = main_report[2]
    section = md.split("## Asynchronous vs synchronous")[1].split("##")[0]
    assert "| `qsparse_async` | `qsparse` | 10.0 s | 20.0 s | 2.00× | 80.00% | 81.00% | 440 KB | 220 KB |" in section


def test_config_difference_note(tmp_path):
    other = make_result("qsgd4", [0.1, 0.8], 1, 1, config={**CONFIG, "seed": 1, "uplink": "qsgd(levels=7)"})
    md = R.render_markdown(R.compare([R.parse_result(MAIN[0]), R.parse_result(other)]))
    assert "> **Note:** the 2 result files differ in more than the method: `seed` (0: fedavg; 1: qsgd4)." in md
    assert "`uplink`" not in md.split("> **Note:**")[1].split("\n")[0]
    # where files live is not part of the setting
    moved = make_result("qsgd4", [0.1, 0.8], 1, 1, config={**CONFIG, "results-dir": "/elsewhere"})
    md = R.render_markdown(R.compare([R.parse_result(MAIN[0]), R.parse_result(moved)]))
    assert "> **Note:**" not in md and "All 2 result files share this setting" in md


def test_setting_reads_the_runner_config_keys():
    cfg = {"num_clients": 20, "fraction_train": 0.5, "partitioning": "pathological", "classes_per_client": 2,
           "alpha": 0.5, "local_steps": 20, "num_server_rounds": 20, "model": "cnn", "seed": 42}
    md = R.render_markdown(R.compare([R.parse_result(make_result("fedavg", [0.1, 0.8], 1, 1, config=cfg))]))
    for line in ("| clients | 20 |", "| fraction of clients per round | 0.5 |",
                 "| partitioning | pathological, 2 classes per client |", "| local steps | 20 |",
                 "| rounds | 20 |", "| seed | 42 |"):
        assert line in md


def test_summary_csv(main_report):
    d, _, _ = main_report
    with (d / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["label"] for r in rows] == ["fedavg", "qsparse", "qsparse_async", "qsgd4", "qesgd", "qsgd8"]
    q = rows[1]
    assert q["uplink_bytes"] == "40000" and q["downlink_bytes"] == "400000"
    assert q["uplink_factor"] == "100.0" and q["downlink_factor"] == "10.0"
    assert q["uplink_bytes_to_target"] == "20000" and q["downlink_bytes_to_target"] == "200000"
    assert q["uplink_to_target_factor"] == "150.0" and q["downlink_to_target_factor"] == "15.0"
    assert q["reached_target"] == "true" and q["round_reached"] == "2" and q["target_accuracy"] == "0.79"
    assert q["uplink_full_bytes"] == "4000000" and q["time_to_target"] == "20.0"
    assert rows[0]["baseline"] == "true" and rows[2]["async"] == "true"
    miss = rows[-1]
    assert miss["reached_target"] == "false" and miss["round_reached"] == "" and miss["uplink_to_target_factor"] == ""


def test_pngs_written_and_linked(main_report):
    d, md_path, md = main_report
    assert md_path == d / "report.md"
    for name in ("accuracy_vs_uplink.png", "accuracy_vs_downlink.png", "accuracy_per_round.png",
                 "accuracy_vs_time.png"):
        data = (d / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 20_000
        assert f"]({name})" in md


def test_no_time_plot_without_wall_time(tmp_path):
    results = [make_result("fedavg", [0.1, 0.8], 10, 10), make_result("qsgd4", [0.1, 0.8], 1, 1)]
    for res in results:
        for r in res["rounds"]:
            del r["wall_time"]
    written = R.plot_report(R.compare([R.parse_result(x) for x in results]), tmp_path)
    assert sorted(written) == ["accuracy_per_round.png", "accuracy_vs_downlink.png", "accuracy_vs_uplink.png"]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("label"), r"broken\.json: field 'label' is missing"),
    (lambda r: r["rounds"][2].pop("uplink_bytes"), r"broken\.json: field 'rounds\[2\]\.uplink_bytes' is missing"),
    (lambda r: r["rounds"][1].update(downlink_bytes=-5),
     r"broken\.json: field 'rounds\[1\]\.downlink_bytes' must be a non-negative integer, got -5"),
    (lambda r: r["rounds"][1].update(accuracy=80.0), r"broken\.json: field 'rounds\[1\]\.accuracy' must lie in"),
    (lambda r: r["rounds"][3].update(round=1), r"broken\.json: field 'rounds\[3\]\.round' must increase"),
    (lambda r: r.update(rounds=[]), r"broken\.json: field 'rounds' must be a non-empty list"),
    (lambda r: r.update(config=[1]), r"broken\.json: field 'config' must be an object"),
    (lambda r: r.update({"async": "yes"}), r"broken\.json: field 'async' must be true or false"),
])
def test_loader_names_file_and_field(tmp_path, mutate, message):
    res = json.loads(json.dumps(MAIN[1]))
    mutate(res)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(res))
    with pytest.raises(ValueError, match=message):
        R.load_result(path)


def test_loader_rejects_bad_json_duplicates_and_missing_baseline(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: not valid JSON"):
        R.load_results(tmp_path / "a")
    d = write_dir(tmp_path / "b", [MAIN[0]])
    (d / "copy.json").write_text(json.dumps(MAIN[0]))
    with pytest.raises(ValueError, match=r"fedavg\.json: label 'fedavg' is already used by .*copy\.json"):
        R.load_results(d)
    with pytest.raises(ValueError, match=r"no result files"):
        R.load_results(write_dir(tmp_path / "c", []))
    with pytest.raises(ValueError, match=r"no result has label or method 'fedavg'.*labels: qsgd4"):
        R.compare([R.parse_result(MAIN[3])])


def test_loader_accepts_the_protocol_health_fields():
    """Deployment results carry per-round protocol counts and the runtime; both are optional."""
    res = json.loads(json.dumps(MAIN[1]))
    for r in res["rounds"]:
        r.update(messages=3, replies=3, resyncs=3 if r["round"] == 1 else 0, dropped=0, failures=0)
    res["runtime"] = {"qfl": "/somewhere/qfl", "flwr": "1.41.0"}
    parsed = R.parse_result(res)
    assert [r.resyncs for r in parsed.rounds] == [0, 3, 0, 0, 0]
    assert {r.dropped for r in parsed.rounds} == {r.failures for r in parsed.rounds} == {0}
    assert R.parse_result(MAIN[1]).rounds[1].resyncs is None  # older files have no such fields
    res["rounds"][1]["failures"] = -1
    with pytest.raises(ValueError, match=r"rounds\[1\]\.failures' must be a non-negative integer"):
        R.parse_result(res, "x.json")


def test_baseline_by_method_and_integral_floats():
    base = make_result("fedavg-run", [0.1, 0.8], 1000, 1000, method="fedavg")
    base["rounds"][1]["uplink_bytes"] = 1e3
    c = R.compare([R.parse_result(base), R.parse_result(make_result("qsgd4", [0.1, 0.8], 10, 100))])
    assert c.baseline == "fedavg-run"
    assert c.row("qsgd4").uplink_factor == 100.0 and c.row("qsgd4").downlink_factor == 10.0


def test_human_bytes():
    assert [R.human_bytes(n) for n in (0, 999, 1000, 12_345, 100_000, 999_999, 3_200_000_000)] == [
        "0 B", "999 B", "1.00 KB", "12.3 KB", "100 KB", "1.00 MB", "3.20 GB"]
    assert R.human_bytes(None) == "—"


def test_cli(tmp_path, capsys):
    d = write_dir(tmp_path / "res", MAIN[:2])
    out = tmp_path / "out" / "r.md"
    assert R.main([str(d), "-o", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.is_file() and (out.parent / "summary.csv").is_file()
    assert R.main([str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_import_is_light():
    heavy = ("torch", "flwr", "matplotlib")
    # Only what this module adds counts: the parent packages are not ours.
    code = ("import sys, qfl.simulations; before = set(sys.modules); "
            "import qfl.simulations.report; new = set(sys.modules) - before; "
            f"print(','.join(m for m in {heavy!r} if m in new))")
    root = str(Path(R.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "", f"heavy modules imported at top level: {out.stdout}"


def test_robustness_line_recomputes_the_verdicts_against_a_smoothed_baseline():
    # fedavg's last round dips to 0.80: the target is 0.79 and the compressed run, which
    # peaks at 0.815, reaches it. Averaged over the last 5 evaluations fedavg has 0.834,
    # the target 0.824, and the same run never gets there.
    base = make_result("fedavg", [0.10, 0.70, 0.83, 0.84, 0.85, 0.85, 0.80], 1_000_000, 1_000_000)
    run = make_result("qsparse_sign", [0.10, 0.50, 0.60, 0.70, 0.79, 0.815, 0.81], 10_000, 100_000)
    c = R.compare([R.parse_result(base), R.parse_result(run)])
    lines = R.finding_lines(c)
    assert "- 1 of 1 other runs reach the target: `qsparse_sign` (round 4)." in lines
    assert lines[-1] == ("- Robustness: averaged over its last 5 evaluations `fedavg` has 83.40% (final 80.00%); "
                         "against that target, 82.40%, no other run reaches it, and neither goal is met.")
    smooth = R.compare([R.parse_result(base), R.parse_result(run)], baseline_window=5)
    assert smooth.target == pytest.approx(0.824) and not smooth.row("qsparse_sign").reached
    assert R.robustness_lines(smooth) == []  # already smoothed: nothing to add
    with pytest.raises(ValueError, match="baseline_window"):
        R.compare([R.parse_result(base)], baseline_window=0)
    # With a run that does reach the smoothed target, its factors and verdicts are given.
    good = make_result("qsgd8", [0.10, 0.70, 0.83, 0.84, 0.85, 0.85, 0.84], 250_000, 1_000_000)
    lines = R.finding_lines(R.compare([R.parse_result(base), R.parse_result(run), R.parse_result(good)]))
    assert "1 of 2 other runs reach it (`qsgd8` round 2); the best, `qsgd8`, needs 4.00× fewer uplink and 1.00× fewer " \
           "downlink bytes (uplink goal **FAIL**, downlink goal **FAIL**)." in lines[-1]
