"""The simulation app: its run config, presets in Flower's simulation engine, the runner."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from qfl.simulations.runner import parse_set, run_methods, write_app
from qfl.simulations.settings import Settings
from qfl.strategies.presets import ASYNC_PRESETS, PRESETS

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "num-server-rounds": 2,
    "num-clients": 4,
    "fraction-train": 0.5,
    "local-steps": 2,
    "model": "mlp",
    "max-client-samples": 80,
    "test-samples": 300,
    "partitioning": "iid",
    "min-elements": 100,
}


def test_pyproject_run_config_is_the_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Settings)}
    assert config == defaults
    generated = tomllib.loads((write_app(ROOT / "build" / "app-check") / "pyproject.toml").read_text())
    assert generated["tool"]["flwr"]["app"]["config"] == defaults
    assert (
        generated["tool"]["flwr"]["app"]["components"]
        == tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    )


@pytest.mark.parametrize(
    "config,message",
    [
        ({"method": "qsparce"}, "unknown 'qsparce'"),
        ({"method": "fedavg,fedavg"}, "twice"),
        ({"partitioning": "shards"}, "partitioning"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"num-clients": "many"}, "num-clients"),
        ({"method": "fedavg,qsgd8", "label": "x"}, "label"),
        ({"local-steps": 0, "local-epochs": 0}, "local-steps"),
        ({"error-feedback": 1}, "error-feedback"),
    ],
)
def test_bad_run_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_run_config(config)


@pytest.mark.parametrize("method", [*PRESETS, *ASYNC_PRESETS, "custom"])
def test_every_method_honours_min_elements(method):
    from qfl.simulations.server_app import make_strategy

    strategy = make_strategy(Settings.from_run_config({"method": method, "min-elements": 256}))
    assert strategy.uplink.min_elements == strategy.downlink.policy.min_elements == 256


@pytest.mark.parametrize(
    ("factor", "methods", "ratio"), [(1.5, "recommended", 0.01), (1.0, "", 0.015), (1.5, "qsparse", 0.015)]
)
def test_recommended_gets_the_rounds_its_run_trains(factor, methods, ratio):
    # 30 baseline rounds x 1.5 = 45 rounds of 10 clients: k = 4.5 / 450 (rounds-factor applied once)
    from qfl.simulations.server_app import make_strategy, method_settings

    s = Settings.from_run_config(
        {
            "method": "fedavg,recommended",
            "num-server-rounds": 30,
            "rounds-factor": factor,
            "rounds-factor-methods": methods,
            "num-clients": 20,
            "fraction-train": 0.5,
        }
    )
    one = method_settings(s, "recommended")
    assert one.num_server_rounds == (45 if methods in ("recommended", "") and factor == 1.5 else 30)
    assert make_strategy(one).uplink.op.sparsifier.ratio == ratio
    assert method_settings(s, "fedavg").num_server_rounds == 30


def test_async_plan_matches_the_synchronous_work():
    s = Settings.from_run_config({"num-clients": 20, "fraction-train": 0.5, "num-server-rounds": 10})
    concurrency, buffer, versions, every = s.async_plan()
    assert (concurrency, buffer) == (10, 5)
    assert versions * buffer == 10 * 10 and every == 2


def test_parse_set_is_flowers_run_config_syntax():
    assert parse_set(["a=1", "b=0.5 c=true", 'd="dirichlet"', "e='x y'"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "dirichlet",
        "e": "x y",
    }
    with pytest.raises(ValueError, match="--set"):
        parse_set(["d=dirichlet"])  # a TOML string needs quotes, as with flwr run --run-config
    with pytest.raises(ValueError, match="without spaces"):
        parse_set(["lr = 0.1"])  # Flower's parser alone would drop it silently


def test_dataset_defaults_and_rounds_factor():
    s = Settings.from_run_config({"dataset": "shakespeare", "num-server-rounds": 60, "rounds-factor": 1.5})
    assert (s.model_name, s.learning_rate) == ("char-lstm", 1.0)
    assert (s.rounds_of("fedavg"), s.rounds_of("qsparse")) == (60, 90)
    s = Settings.from_run_config({"num-server-rounds": 10, "rounds-factor": 2, "rounds-factor-methods": "qsparse"})
    assert [s.rounds_of(m) for m in ("fedavg", "qsgd8", "qsparse")] == [10, 10, 20]
    s = Settings.from_run_config({"model": "mlp", "lr": 0.1})
    assert (s.model_name, s.learning_rate) == ("mlp", 0.1)
    with pytest.raises(ValueError, match="dataset"):
        Settings.from_run_config({"dataset": "cifar"})
    with pytest.raises(ValueError, match="rounds-factor"):
        Settings.from_run_config({"rounds-factor": 0.5})
    with pytest.raises(ValueError, match="server-lr"):
        Settings.from_run_config({"server-lr": 0.0})
    with pytest.raises(ValueError, match="links"):
        Settings.from_run_config({"links": "slow: up=1"})


def sampled_partitions(perm: list[int], seed: int, rounds: int = 5) -> list[list[int]]:
    """Partitions Flower's sampler picks per round through PartitionOrderedGrid, on nodes
    whose partitions are the permutation ``perm`` of their ids' order."""
    import random

    from fakes import FakeGrid
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from qfl.simulations.client_app import app
    from qfl.simulations.grid import PartitionOrderedGrid

    inner = FakeGrid(app, len(perm), node_config=lambda i: {"partition-id": perm[i], "num-partitions": len(perm)})
    grid = PartitionOrderedGrid(inner)
    partition_of = {nid: perm[i] for i, nid in enumerate(inner.node_ids)}
    assert [partition_of[n] for n in grid.get_node_ids()] == sorted(perm)
    random.seed(seed)
    return [sorted(partition_of[n] for n in sample_nodes(grid, len(perm), 3)[0]) for _ in range(rounds)]


def test_seeded_sampling_picks_the_same_partitions_whatever_the_node_ids():
    # Node ids are random per run: without the partition order the same seed would
    # sample other partitions in every run.
    a = sampled_partitions([0, 1, 2, 3, 4, 5, 6, 7], seed=3)
    b = sampled_partitions([5, 2, 7, 0, 3, 6, 1, 4], seed=3)
    assert a == b
    assert a != sampled_partitions([0, 1, 2, 3, 4, 5, 6, 7], seed=4)


def test_nodes_that_do_not_say_their_partition_come_last():
    from fakes import FakeGrid
    from flwr.clientapp import ClientApp

    from qfl.simulations.client_app import app
    from qfl.simulations.grid import PartitionOrderedGrid

    inner = FakeGrid(app, 4, node_config=lambda i: {"partition-id": 3 - i, "num-partitions": 4})
    inner.apps[inner.node_ids[3]] = ClientApp()  # no query handler: an error reply
    inner.fail[inner.node_ids[2]] = lambda msg: True
    grid = PartitionOrderedGrid(inner)
    order = list(grid.get_node_ids())
    assert order == [inner.node_ids[1], inner.node_ids[0], inner.node_ids[2], inner.node_ids[3]]
    asked = len(inner.sent)
    assert list(grid.get_node_ids()) == order and len(inner.sent) == asked  # asked once only


@pytest.mark.integration
def test_every_preset_runs_in_the_simulation_engine(tmp_path, capsys):
    methods = [*PRESETS, *ASYNC_PRESETS]
    status = run_methods(methods, TINY, tmp_path, timeout=300)
    assert status == dict.fromkeys(methods, True), (
        (tmp_path / "run.log").read_text()[-3000:] if (tmp_path / "run.log").exists() else status
    )
    printed = capsys.readouterr().out
    for method in methods:
        result = json.loads((tmp_path / f"{method}.json").read_text())
        rows = result["rounds"]
        assert rows[0]["round"] == 0 and len(rows) >= 3, method
        assert f"[{method}] round" in printed
        up = sum(r["uplink_bytes"] for r in rows)
        up_full = sum(r["uplink_full_bytes"] for r in rows)
        assert up > 0 and up_full > 0, method
        if method == "fedavg":
            assert up <= up_full  # lossless, qfl headers are smaller than numpy's
        elif method in ("qsparse", "qsparse_sign", "qsparse_async", "qsparse_sign_async"):
            assert up < up_full / 20, method
        else:
            assert up < up_full / 2, method
        assert result["async"] == (method in ASYNC_PRESETS)
    assert (tmp_path / "report.md").exists() is False  # run_methods writes results only


@pytest.mark.integration
def test_runner_cli_writes_results_and_report(tmp_path):
    from qfl.simulations.runner import main

    args = [
        "--methods",
        "fedavg,qsparse",
        "--seeds",
        "1,2",
        "--rounds",
        "2",
        "--rounds-factor",
        "1.5",
        "--clients",
        "4",
        "--local-steps",
        "2",
        "--goals",
        "uplink=100",
        "--out",
        str(tmp_path),
    ] + [
        x
        for k, v in TINY.items()
        if k not in ("num-server-rounds", "num-clients", "local-steps")
        for x in ("--set", f"{k}={json.dumps(v)}")
    ]
    assert main(args) == 0
    for seed in (1, 2):
        assert len(json.loads((tmp_path / f"seed-{seed}" / "qsparse.json").read_text())["rounds"]) == 4  # 0..3
        assert len(json.loads((tmp_path / f"seed-{seed}" / "fedavg.json").read_text())["rounds"]) == 3
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["failed"] == [] and "--seeds 1,2" in manifest["command"] and manifest["cpus"] >= 1
    report = (tmp_path / "report.md").read_text()
    assert "`qsparse`" in report and "accuracy_vs_uplink.png" in report and "Seeds: 1, 2" in report
    assert (tmp_path / "accuracy_vs_uplink.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: What may differ between two runs of the same config and seed: time, memory, where the code is.
UNREPEATABLE = ("wall_time", "server_rss_mb", "results-dir", "runtime")


def _repeatable(obj):
    """A result file without the fields that measure the machine rather than the run."""
    if isinstance(obj, dict):
        return {k: _repeatable(v) for k, v in obj.items() if k not in UNREPEATABLE}
    if isinstance(obj, list):
        return [_repeatable(v) for v in obj]
    return obj


@pytest.mark.integration
def test_same_seed_same_run_in_the_simulation_engine(tmp_path):
    # Separate simulations (other node ids, other arrival orders, other numbers of
    # clients running at once) with the same seed: the same partitions train in each
    # round, replies are aggregated in the same order, and every figure of the result
    # files is identical, field by field; another seed differs.
    config = {**TINY, "num-server-rounds": 3, "fraction-train": 0.5}
    methods = ["fedavg", "qsparse"]
    files = {}
    for name, seed, parallel in (("a", 7, 1), ("b", 7, 2), ("c", 8, 2)):
        status = run_methods(methods, {**config, "seed": seed}, tmp_path / name, timeout=300, parallel=parallel)
        assert status == dict.fromkeys(methods, True)
        files[name] = {m: _repeatable(json.loads((tmp_path / name / f"{m}.json").read_text())) for m in methods}
    assert files["a"] == files["b"]
    assert files["a"]["qsparse"]["rounds"] != files["c"]["qsparse"]["rounds"]
    assert all(r["clients"] for r in files["a"]["qsparse"]["rounds"][1:])  # per-client bytes for the link model


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries QFL_TEST_RUNNER_MARK=mark."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if (
                proc.pid != os.getpid()
                and proc.environ().get("QFL_TEST_RUNNER_MARK") == mark
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.integration
def test_killed_runner_stops_the_federation_it_started(tmp_path):
    # `kill <runner>` (SIGTERM) must not leave a SuperLink, the simulation and its Ray
    # workers running: they would eat the cores of every later run.
    import signal
    import uuid

    mark = uuid.uuid4().hex
    sets = [
        a
        for k, v in {**TINY, "num-server-rounds": 5000}.items()
        if k not in ("num-clients", "fraction-train")
        for a in ("--set", f"{k}={json.dumps(v)}")
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qfl.simulations.runner",
            "--methods",
            "fedavg",
            "--clients",
            "4",
            "--fraction",
            "0.5",
            "--rounds",
            "5000",
            *sets,
            "--out",
            str(tmp_path),
            "--no-report",
        ],
        env={**os.environ, "QFL_TEST_RUNNER_MARK": mark},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    progress = tmp_path / "seed-42" / "fedavg.progress.jsonl"
    deadline = time.monotonic() + 600
    while not (progress.exists() and progress.read_text().count("\n") >= 2) and proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not start"
        time.sleep(1)
    assert proc.poll() is None, proc.stdout.read()
    assert len(_marked(mark)) > 2  # runner, SuperLink, simulation, workers
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    deadline = time.monotonic() + 60
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _marked(mark)


def test_recommended_refuses_a_run_sized_in_epochs():
    from qfl.simulations.server_app import make_strategy

    s = Settings.from_run_config({"method": "recommended", "local-steps": 0, "local-epochs": 1})
    with pytest.raises(ValueError, match="local-steps"):
        make_strategy(s)
