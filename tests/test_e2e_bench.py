"""benchmarks/e2e.py at tiny sizes: every figure it reports is there and plausible.

The benchmark runs tests/apps/bigmodel (qfl in its two places) as plain Flower and with
qfl in Flower's simulation engine, for shrunk ResNet-18 and GPT-2 shapes and for many
clients at 5% participation. Timings are only checked to be measured (positive): speed
goals are the benchmark's printed ratios, never thresholds in a test. Bytes are checked
against what they must be: plain Flower sends the model in every message, qfl less, and
the bytes the app counts on the wire equal the strategy's own accounting.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest

from qfl.simulations import superlink
from qfl.simulations.superlink import list_tagged_processes

sys.path.insert(0, str(Path(__file__).parent / "apps" / "bigmodel"))
from bigmodel.models import build, parse_model, resnet18, split_models

pytestmark = pytest.mark.integration

E2E = Path(__file__).parents[1] / "benchmarks" / "e2e.py"
#: The models of the tiny run: one by its family's name, one with sizes of its own, which
#: must reach the app (and Flower's run config on the way) intact.
MODELS = ("resnet18", "gpt2(layers=1, heads=4, width=16)")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("e2e_benchmark", E2E)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(results, printed text, JSON written) of one ``--tiny --many`` run, and the federations it started."""
    feds = []

    class Recorded(superlink.LocalFederation):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            feds.append(self)

    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    mp = pytest.MonkeyPatch()
    mp.setattr(superlink, "LocalFederation", Recorded)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            results = _load_benchmark().main(["--tiny", "--many", "--models", ",".join(MODELS), "--out", str(out)])
    finally:
        mp.undo()
    return results, text.getvalue(), json.loads(out.read_text()), feds


def _check_run(run: dict, clients: int, rounds: int) -> None:
    assert run["params"] > 0 and run["model_bytes"] >= 4 * run["params"]
    assert run["server_peak_rss_mb"] > 0
    assert len(run["rounds"]) == rounds
    for row in run["rounds"]:
        assert row["replies"] == row["messages"] == clients and row["errors"] == 0
        assert row["up_bytes"] > 0 and row["down_bytes"] > 0
        assert row["wall_s"] > row["aggregate_s"] > 0
        assert row["server_rss_mb"] > 0 and row["server_peak_rss_mb"] >= row["server_rss_mb"]
        assert len(row["clients"]) == clients
        for c in row["clients"]:
            assert c["app-s"] >= c["train-s"] > 0
            assert c["qfl-in-s"] >= 0 and c["qfl-out-s"] >= 0
            assert c["peak-rss-mb"] >= c["rss-mb"] > 0


def _check_bytes(plain: dict, ours: dict) -> None:
    """Plain Flower sends at least the model per message; qfl less both ways, as it counts itself."""
    for row in plain["rounds"]:
        assert row["down_bytes"] >= row["messages"] * plain["model_bytes"]
        assert row["up_bytes"] >= row["replies"] * plain["model_bytes"]
    for r, (p, q) in enumerate(zip(plain["rounds"], ours["rounds"], strict=True), 1):
        assert 0 < q["up_bytes"] < p["up_bytes"] and 0 < q["down_bytes"] < p["down_bytes"]
        assert ours["traffic"][str(r)]["uplink"] == q["up_bytes"]
        assert ours["traffic"][str(r)]["downlink"] == q["down_bytes"]
        assert ours["traffic"][str(r)]["uplink_full"] <= p["up_bytes"]


def test_tiny_models_report_every_figure(tiny):
    results, text, written, _ = tiny
    assert written["goals"] == results["goals"]
    for name in MODELS:
        runs = results["models"][name]["runs"]
        assert runs["plain"]["plain"] and not runs["qfl"]["plain"]
        params = sum(p.numel() for p in build(name, tiny=True).parameters())
        assert runs["plain"]["params"] == runs["qfl"]["params"] == params
        for run in runs.values():
            _check_run(run, clients=2, rounds=1)
        _check_bytes(runs["plain"], runs["qfl"])
        assert runs["qfl"]["compression"]["uplink"].startswith("topk(")  # presets.recommended
        for figures in results["models"][name]["summary"].values():
            assert all(math.isfinite(v) and v >= 0 for v in figures.values())
    goals = {g["goal"]: g for g in results["goals"]}
    assert len(goals) == 3  # ResNet-18: client and server; GPT-2: server
    for goal in goals.values():
        assert goal["value"] > 0 and goal["pass"] == (goal["value"] <= goal["limit"])
        assert goal["goal"] in text
    for name in MODELS:  # beside the absolute goal, plain Flower's own figure of the same run
        plain = results["models"][name]["summary"]["plain"]["aggregate_ms_per_10m"]
        assert f"({name}: plain Flower's aggregate_train in the same run: {plain:.3g} ms" in text
    assert "NOT A VERDICT: --tiny" in text and not results["load"]["verdict"]
    assert "load average at start" in text and "load average at end" in text


@pytest.mark.unit
def test_model_names_take_sizes_and_refuse_what_they_do_not_know():
    assert parse_model("gpt2") == ("gpt2", {})
    assert parse_model(" gpt2(layers=24, width=1024, heads=16) ") == (
        "gpt2",
        {"layers": 24, "width": 1024, "heads": 16},
    )
    assert split_models("resnet18(width=96), gpt2(layers=2,width=64,heads=4),mlp") == [
        "resnet18(width=96)",
        "gpt2(layers=2,width=64,heads=4)",
        "mlp",
    ]
    wide = sum(p.numel() for p in build("resnet18(width=16)").parameters())
    assert wide == sum(p.numel() for p in resnet18(width=16).parameters())
    assert sum(p.numel() for p in build("gpt2(vocab=100, layers=1)", tiny=True).parameters()) < sum(
        p.numel() for p in build("gpt2", tiny=True).parameters()
    )
    for bad, says in (
        ("bert", "unknown model 'bert'"),
        ("gpt2(depth=3)", "takes each of vocab, width"),
        ("gpt2(layers=0)", "layers must be a positive integer"),
        ("gpt2(layers=2.5)", "layers must be a positive integer"),
        ("gpt2(layers=True)", "layers must be a positive integer"),
        ("gpt2(layers=2, layers=3)", "at most once"),
        ("gpt2(12)", "sizes are keywords"),
        ("gpt2(layers=", "expected a family name"),
        ("os.system('x')", "expected a family name"),
    ):
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_model(bad)
    with pytest.raises(ValueError, match="multiple of heads"):
        build("gpt2(width=100, heads=3)")
    with pytest.raises(ValueError, match="unknown model"):
        split_models("resnet18,vgg16")
    with pytest.raises(SystemExit):  # the benchmark's own parser says what --models takes
        _load_benchmark().main(["--models", "gpt2(layers=-1)"])


def test_tiny_many_clients_keep_replicas_right(tiny):
    results, text, _, _ = tiny
    runs = results["many"]["runs"]
    for run in runs.values():
        _check_run(run, clients=2, rounds=2)
        assert run["nodes"] == 40
    _check_bytes(runs["plain"], runs["qfl"])
    ours = runs["qfl"]
    first = sum(r["first_contacts"] for r in ours["rounds"])
    assert first >= 2 and ours["total"]["resyncs"] == first
    assert ours["total"]["dropped"] == ours["total"]["failures"] == 0
    assert results["checks"] and all(c["pass"] for c in results["checks"])
    assert "qfl per client per round" in text and "server RSS (qfl)" in text
    # The strategy's own state and the contexts the engine holds, apart.
    memory = results["many"]["memory"]
    assert all(r["server_state_bytes"] > 0 and r["server_state_nodes"] > 0 for r in ours["rounds"])
    assert "server_state_bytes" not in runs["plain"]["rounds"][0]
    assert memory["contacted"] == first and memory["client_state_kb"] * 1024 == ours["total"]["client_state_bytes"]
    assert memory["client_state_kb"] * 1024 >= ours["model_bytes"]  # the replica at least
    assert memory["nodes"][1] <= first
    assert "contexts Flower's simulation engine keeps" in text


def test_no_process_left_behind(tiny):
    feds = tiny[3]
    assert feds
    assert not {f.tag: list_tagged_processes(f.tag) for f in feds if list_tagged_processes(f.tag)}


def test_the_in_process_aggregate_benchmark_reports_both_servers_per_model():
    """benchmarks/aggregate.py on two tiny models: a row per server, the ratio between them
    and a verdict line per model (its figures are the benchmark's, not the test's)."""
    spec = importlib.util.spec_from_file_location("aggregate_benchmark", E2E.parent / "aggregate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    models = ["mlp(inputs=16, hidden=8)", "resnet18(width=4)"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        args = ["--models", ",".join(models), "--rounds", "2", "--clients", "2", "--steps", "1", "--ungrouped"]
        assert module.main(args) == 0
    out = text.getvalue()
    for name in models:
        assert re.search(
            rf"{re.escape(name)}: aggregate_train, ms per 10M parameters per reply: [\d.e+]+ = [\d.]+x", out
        )
    assert out.count("qfl / plain FedAvg:") == 2 and out.count("qfl / qfl without group blobs:") == 2
    for mode in ("plain", "qfl", "qfl-ungrouped"):
        assert len(re.findall(rf"^\S.* {mode}\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M)) == 2
    with pytest.raises(SystemExit):
        module.main(["--models", "vgg16"])


def test_the_container_decode_benchmark_compares_both_layouts():
    """benchmarks/container_decode.py: a line per layout and their ratio (its figures are the benchmark's)."""
    spec = importlib.util.spec_from_file_location("container_decode", E2E.parent / "container_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert module.main(["--model", "resnet18(width=4)", "--repeats", "2"]) == 0
    out = text.getvalue()
    assert re.search(r"one blob per tensor: [\d.]+ ms per container, [\d,]+ bytes", out)
    assert re.search(r"one group blob: [\d.]+ ms per container, [\d,]+ bytes", out)
    assert re.search(r"one group / one blob per tensor: [\d.]+x the time", out)


def test_the_scale_benchmark_runs_the_servers_per_reply_path(monkeypatch):
    """benchmarks/scale.py on two tiny models: a row per reply and the goals per model; its
    server side is the real one, so a reply the server's checks refuse ends the run."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", E2E.parent / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    models = ["mlp(inputs=16, hidden=8)", "resnet18(width=4)"]
    args = ["--models", ",".join(models), "--clients", "2", "--steps", "1", "--batch", "2"]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert module.main(args) == 0
    out = text.getvalue()
    for name in models:
        goal = rf"{re.escape(name)}: server decode\+aggregate, ms per 10M parameters per reply: [\d.e+]+"
        assert re.search(goal, out)
        rows = [line.split() for line in out.splitlines() if line.startswith(name + " ")]
        assert len(rows) == 2 and all(int(row[-5].replace(",", "")) > 0 for row in rows)  # bytes per reply
    assert re.search(r"resnet18\(width=4\): client compress\+encode / 1 steps' training: [\d.e+-]+ = [\d.]+x", out)
    monkeypatch.setattr(module, "out_of_range", lambda update: next(iter(update)))
    with pytest.raises(RuntimeError, match="would drop this reply"), contextlib.redirect_stdout(io.StringIO()):
        module.main(args)


def test_the_codec_benchmark_selects_specs_with_commas(monkeypatch):
    """benchmarks/codec.py --ops: a spec with a comma inside its parentheses is one pattern
    (it used to be split in two and crash as a regex), beside names and regexes."""
    spec = importlib.util.spec_from_file_location("codec_benchmark", E2E.parent / "codec.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    specs = module.our_specs(10_000)
    names = [name for name, _ in specs]

    def kept(ops):
        return [name for name, _ in module.selected(specs, ops)]

    assert kept("qsgd(255, bucket=512)") == ["qsgd(255, bucket=512)"]
    assert kept("qsgd(16, norm=max)") == ["qsgd(16, norm=max)"]  # not every row with "qsgd(16"
    assert kept("qsgd(255, bucket=512),grid(8)") == [n for n in names if n in ("qsgd(255, bucket=512)", "grid(8)")]
    assert kept("^fp16$, identity") == [n for n in names if n in ("fp16", "identity")]
    assert kept("no such operator") == []
