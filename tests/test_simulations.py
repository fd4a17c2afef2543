"""The simulation app: its run config, presets in Flower's simulation engine, the runner."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from qfl.simulations.runner import parse_set, run_methods, write_app
from qfl.simulations.settings import Settings
from qfl.strategies.presets import ASYNC_PRESETS, PRESETS

ROOT = Path(__file__).resolve().parent.parent
TINY = {"num-server-rounds": 2, "num-clients": 4, "fraction-train": 0.5, "local-steps": 2, "model": "mlp",
        "max-client-samples": 80, "test-samples": 300, "partitioning": "iid", "min-elements": 100}


def test_pyproject_run_config_is_the_settings_defaults():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = {f.name.replace("_", "-"): f.default for f in dataclasses.fields(Settings)}
    assert config == defaults
    generated = tomllib.loads((write_app(ROOT / "build" / "app-check") / "pyproject.toml").read_text())
    assert generated["tool"]["flwr"]["app"]["config"] == defaults
    assert generated["tool"]["flwr"]["app"]["components"] == \
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]


@pytest.mark.parametrize("config,message", [
    ({"method": "qsparce"}, "unknown 'qsparce'"), ({"method": "fedavg,fedavg"}, "twice"),
    ({"partitioning": "shards"}, "partitioning"), ({"fraction-train": 0.0}, "fraction-train"),
    ({"num-clients": "many"}, "num-clients"), ({"method": "fedavg,qsgd8", "label": "x"}, "label"),
    ({"local-steps": 0, "local-epochs": 0}, "local-steps"), ({"error-feedback": 1}, "error-feedback"),
])
def test_bad_run_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_run_config(config)


@pytest.mark.parametrize("method", [*PRESETS, *ASYNC_PRESETS, "custom"])
def test_every_method_honours_min_elements(method):
    from qfl.simulations.server_app import make_strategy

    strategy = make_strategy(Settings.from_run_config({"method": method, "min-elements": 256}))
    assert strategy.uplink.min_elements == strategy.downlink.policy.min_elements == 256


def test_async_plan_matches_the_synchronous_work():
    s = Settings.from_run_config({"num-clients": 20, "fraction-train": 0.5, "num-server-rounds": 10})
    concurrency, buffer, versions, every = s.async_plan()
    assert (concurrency, buffer) == (10, 5)
    assert versions * buffer == 10 * 10 and every == 2


def test_parse_set():
    assert parse_set(["a=1", "b=0.5", "c=true", "d=dirichlet", "e='x y'"]) == \
        {"a": 1, "b": 0.5, "c": True, "d": "dirichlet", "e": "x y"}
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["nokey"])


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


@pytest.mark.slow
def test_every_preset_runs_in_the_simulation_engine(tmp_path, capsys):
    methods = [*PRESETS, *ASYNC_PRESETS]
    status = run_methods(methods, TINY, tmp_path, timeout=300)
    assert status == dict.fromkeys(methods, True), (tmp_path / "run.log").read_text()[-3000:] \
        if (tmp_path / "run.log").exists() else status
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


@pytest.mark.slow
def test_runner_cli_writes_results_and_report(tmp_path):
    from qfl.simulations.runner import main

    args = ["--methods", "fedavg,qsparse", "--rounds", "2", "--clients", "4", "--local-steps", "2",
            "--out", str(tmp_path)] + [x for k, v in TINY.items() if k not in
                                        ("num-server-rounds", "num-clients", "local-steps")
                                        for x in ("--set", f"{k}={v}")]
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert "`qsparse`" in report and "accuracy_vs_uplink.png" in report
    assert (tmp_path / "accuracy_vs_uplink.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_same_run_in_the_simulation_engine(tmp_path):
    # Two separate simulations (other node ids, other arrival orders) with the same seed:
    # the same partitions train in each round, their replies are aggregated in the same
    # order, so the bytes and the accuracies are identical; another seed differs.
    config = {**TINY, "num-server-rounds": 3, "fraction-train": 0.5}
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert run_methods(["qsparse"], {**config, "seed": seed}, tmp_path / name, timeout=300) == {"qsparse": True}
        rows = json.loads((tmp_path / name / "qsparse.json").read_text())["rounds"]
        runs[name] = [{k: r[k] for k in ("accuracy", "loss", "uplink_bytes", "downlink_bytes", "resyncs")}
                      for r in rows]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
