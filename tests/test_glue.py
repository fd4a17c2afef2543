"""The Flower glue as a user meets it: the wrapper's signature, the subclassing factory for
strategies that override start(), loud misconfiguration, and hostile clients under the
default settings."""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from fakes import FakeGrid
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from test_robustness import (
    Ordered,
    attack_mod,
    honest_app,
    initial,
    poisoned,
    snapshots,
)
from test_strategy import Capture

from qfl.clients.records import blob_array, to_tensors
from qfl.compress import IDENTITY, Payload, Raw
from qfl.strategies import (
    DEFAULT_GUARD,
    Compressed,
    MisconfigurationError,
    UpdateGuard,
    compressed,
)
from qfl.wire import encode

UPLINK = "topk(0.1) | qsgd(16)"
DOWNLINK = "delta | qsgd(256)"


# ------------------------------------------------------------------ the wrapper
def test_compressed_has_an_explicit_signature():
    params = inspect.signature(Compressed).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert {"uplink", "downlink", "error_feedback", "guard", "limits", "seed"} <= params.keys()
    for name in params:
        if name != "strategy":
            assert f"{name} :" in Compressed.__doc__ or f"{name}," in Compressed.__doc__, name
    with pytest.raises(TypeError):
        Compressed(FedAvg(), uplnk="topk(0.1)")


class WithExtras(FedAvg):
    def set_save_path_and_run_dir(self, path: Path, run_dir: str) -> None:
        self.save_path = path / run_dir


def test_unknown_attributes_come_from_the_inner_strategy_and_copies_work(tmp_path):
    strategy = Compressed(WithExtras(fraction_train=0.3), uplink=UPLINK)
    assert strategy.fraction_train == 0.3 and strategy.weighted_by_key == "num-examples"
    strategy.set_save_path_and_run_dir(tmp_path, "run")
    assert strategy.save_path == tmp_path / "run"
    with pytest.raises(AttributeError, match="no_such_thing"):
        strategy.no_such_thing  # noqa: B018
    for clone in (copy.deepcopy(strategy), pickle.loads(pickle.dumps(strategy))):
        assert clone.fraction_train == 0.3 and str(clone.uplink.op) == str(strategy.uplink.op)


def test_legacy_strategies_are_refused_at_construction():
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    with pytest.raises(TypeError, match="legacy flwr.server.strategy"):
        Compressed(LegacyFedAvg())
    with pytest.raises(TypeError, match="legacy flwr.server.strategy"):
        compressed(LegacyFedAvg)
    with pytest.raises(TypeError, match="compressed\\(\\) takes a strategy class"):
        compressed(FedAvg())
    with pytest.raises(TypeError, match="Strategy"):
        Compressed(object())


# ------------------------------------------------- a strategy that overrides start()
class CustomFedAvg(FedAvg):
    """Shaped like Flower's advanced-pytorch example: its own start() loop that saves a
    checkpoint whenever accuracy improves and a results file after every round."""

    def set_save_path_and_run_dir(self, path: Path, run_dir: str) -> None:
        self.save_path = path / run_dir
        self.save_path.mkdir(parents=True)
        self.best_loss = math.inf

    def _store_results(self, tag: str, server_round: int, metrics: MetricRecord) -> None:
        file = self.save_path / "results.json"
        results = json.loads(file.read_text()) if file.exists() else {}
        results.setdefault(tag, {})[str(server_round)] = dict(metrics)
        file.write_text(json.dumps(results))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        result, arrays = Result(), initial_arrays
        for current_round in range(1, num_rounds + 1):
            replies = grid.send_and_receive(
                self.configure_train(current_round, arrays, train_config or ConfigRecord(), grid), timeout=timeout
            )
            agg_arrays, agg_metrics = self.aggregate_train(current_round, replies)
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if agg_metrics is not None:
                result.train_metrics_clientapp[current_round] = agg_metrics
                self._store_results("train", current_round, agg_metrics)
            replies = grid.send_and_receive(
                self.configure_evaluate(current_round, arrays, evaluate_config or ConfigRecord(), grid), timeout=timeout
            )
            metrics = self.aggregate_evaluate(current_round, replies)
            if metrics is not None:
                result.evaluate_metrics_clientapp[current_round] = metrics
                self._store_results("evaluate", current_round, metrics)
                if metrics["eval_loss"] < self.best_loss:
                    self.best_loss = metrics["eval_loss"]
                    torch.save(arrays.to_torch_state_dict(), self.save_path / f"model_round{current_round}.pt")
        return result


@pytest.mark.parametrize("spelling", ["factory", "wrapper"])
def test_a_custom_start_keeps_its_checkpoints_and_results_with_two_changed_lines(tmp_path, spelling):
    grid = FakeGrid(honest_app(), 3)
    # The user's ServerApp, with qfl: one import and this line changed (either spelling).
    if spelling == "factory":
        strategy = compressed(CustomFedAvg, uplink=UPLINK, downlink=DOWNLINK, seed=5)(
            fraction_train=1.0, fraction_evaluate=1.0
        )
    else:
        strategy = Compressed(
            CustomFedAvg(fraction_train=1.0, fraction_evaluate=1.0), uplink=UPLINK, downlink=DOWNLINK, seed=5
        )
    strategy.set_save_path_and_run_dir(tmp_path, "run")
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=3)

    assert isinstance(strategy, CustomFedAvg) and type(strategy).__name__ == "CompressedCustomFedAvg"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sorted(results["train"]) == sorted(results["evaluate"]) == ["1", "2", "3"]
    assert list((tmp_path / "run").glob("model_round*.pt"))
    assert all(a.stype == "qfl/v3" for m in grid.sent for a in m.content["arrays"].values())
    total = strategy.traffic.total()
    assert total.uplink < total.uplink_full / 3 and total.dropped == total.failures == 0
    assert results["train"]["3"]["qfl.uplink-bytes"] > 0  # qfl's counts reach the user's results file
    # The same training as the wrapper around plain FedAvg (up to the order FedAvg sums replies in).
    reference = Compressed(
        FedAvg(fraction_train=1.0, fraction_evaluate=1.0), uplink=UPLINK, downlink=DOWNLINK, seed=5
    ).start(grid=FakeGrid(honest_app(), 3), initial_arrays=initial(), num_rounds=3)
    mine, theirs = to_tensors(result.arrays), to_tensors(reference.arrays)
    assert all(torch.allclose(mine[k].double(), theirs[k].double(), atol=1e-6) for k in mine)


def test_wrapping_a_strategy_that_overrides_start_adopts_it():
    inner = CustomFedAvg(fraction_train=0.3)
    strategy = Compressed(inner, uplink=UPLINK)
    assert isinstance(strategy, CustomFedAvg) and not isinstance(strategy, Compressed)
    assert type(strategy).start is CustomFedAvg.start and strategy.fraction_train == 0.3
    assert str(strategy.uplink.op) == str(Compressed(FedAvg(), uplink=UPLINK).uplink.op)
    with pytest.raises(TypeError):
        Compressed(inner, uplnk=UPLINK)


# ------------------------------------------------------------ loud misconfiguration
def test_a_forgotten_mod_stops_the_run_after_round_one_naming_the_fix():
    grid = FakeGrid(honest_app(mods=()), 3)
    with pytest.raises(MisconfigurationError, match="ClientApp lacks compression_mod.*mods=\\[compression_mod"):
        Compressed(FedAvg(fraction_evaluate=0.0), uplink=UPLINK).start(
            grid=grid, initial_arrays=initial(), num_rounds=5
        )
    assert len(grid.sent) == 3  # one round, not five of an untrained model


def test_some_nodes_without_the_mod_are_named_and_the_others_train():
    grid = FakeGrid(honest_app(), 4)
    grid.apps[grid.node_ids[3]] = honest_app(mods=())
    with Capture() as log:
        result = Compressed(FedAvg(fraction_evaluate=0.0), uplink=UPLINK).start(
            grid=grid, initial_arrays=initial(), num_rounds=2
        )
    assert result.train_metrics_clientapp[2]["qfl.failures"] == 1
    assert sum("lacks compression_mod" in line for line in log.lines) == 2


def test_the_mod_warns_once_per_node_when_the_strategy_is_not_wrapped():
    grid = FakeGrid(honest_app(), 3)
    with Capture() as log:
        FedAvg(fraction_evaluate=1.0).start(grid=grid, initial_arrays=initial(), num_rounds=2)
    warnings = [line for line in log.lines if "without qfl settings" in line]
    assert len(warnings) == 3 and "qfl.strategies.Compressed" in warnings[0]


# ------------------------------------------------------------------ hostile clients
HONEST = 3


def hostile_run(rewrite, rounds: int = 3, **kwargs):
    grid = FakeGrid(honest_app(), HONEST + 1)
    grid.apps[grid.node_ids[HONEST]] = honest_app(mods=(attack_mod(rewrite), honest_app.__defaults__[0][0]))
    strategy = Compressed(
        Ordered(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=HONEST + 1),
        uplink=UPLINK,
        downlink=DOWNLINK,
        min_elements=200,
        seed=3,
        **kwargs,
    )
    models: dict = {}
    with Capture() as log:
        result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=rounds, evaluate_fn=snapshots(models))
    return strategy, result, models, log


def honest_models(rounds: int = 3) -> dict:
    strategy = Compressed(
        Ordered(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=HONEST),
        uplink=UPLINK,
        downlink=DOWNLINK,
        min_elements=200,
        seed=3,
    )
    models: dict = {}
    strategy.start(
        grid=FakeGrid(honest_app(), HONEST), initial_arrays=initial(), num_rounds=rounds, evaluate_fn=snapshots(models)
    )
    return models


def huge_values(arrays: ArrayRecord, content: RecordDict) -> None:
    arrays["0.bias"] = blob_array(encode(Payload(IDENTITY, (64,), torch.float32, Raw(torch.full((64,), 3e38)))))


@pytest.mark.parametrize("scale,reason", [(1e30, "values beyond"), (1e4, "UpdateGuard.median_factor")])
def test_a_poisoner_is_dropped_by_default_and_the_model_is_the_honest_one(scale, reason):
    assert DEFAULT_GUARD.median_factor == 10.0
    _, result, models, log = hostile_run(poisoned(scale))
    reference = honest_models()
    for r in range(4):
        assert all(torch.equal(models[r][k], reference[r][k]) for k in models[r]), r
    assert all(result.train_metrics_clientapp[r]["qfl.dropped"] == 1 for r in (1, 2, 3))
    assert sum(reason in line for line in log.lines) == 3


def test_two_clients_one_poisoned_the_lower_median_keeps_it_out():
    grid = FakeGrid(honest_app(), 2)
    grid.apps[grid.node_ids[1]] = honest_app(mods=(attack_mod(poisoned(1e6)), honest_app.__defaults__[0][0]))
    strategy = Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), uplink=UPLINK, min_elements=200)
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert result.train_metrics_clientapp[1]["qfl.guarded"] == 1


@pytest.mark.parametrize("guard", [DEFAULT_GUARD, None])
def test_huge_kept_values_never_reach_the_model_nor_crash_a_later_round(guard):
    _, result, models, _ = hostile_run(huge_values, guard=guard)
    assert sorted(models) == [0, 1, 2, 3]
    for r in (1, 2, 3):
        assert result.train_metrics_clientapp[r]["qfl.dropped"] == 1
        assert all(
            bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6
            for t in models[r].values()
            if t.is_floating_point()
        )


def extra_array_record(arrays, content):
    content["more"] = ArrayRecord({"x": blob_array(b"")})


def extra_metric_record(arrays, content):
    content["more-metrics"] = MetricRecord({"a": 1.0})


def extra_config_record(arrays, content):
    content["note"] = ConfigRecord({"a": 1})


def bad_weight(value):
    def rewrite(arrays, content):
        key = next(iter(content.metric_records))
        metrics = MetricRecord(dict(content[key]))
        metrics["num-examples"] = value
        content[key] = metrics

    return rewrite


def info_field(key, value):
    def rewrite(arrays, content):
        info = ConfigRecord(dict(content["qfl"]))
        info[key] = value
        content["qfl"] = info

    return rewrite


TAMPERED = {
    "extra-array-record": (extra_array_record, "expected 1 ArrayRecord"),
    "extra-metric-record": (extra_metric_record, "expected one MetricRecord"),
    "extra-config-record": (extra_config_record, "unexpected ConfigRecord"),
    "weight-nan": (bad_weight(math.nan), "not finite"),
    "weight-negative": (bad_weight(-5), "positive"),
    "weight-list": (bad_weight([1.0, 2.0]), "positive"),
    "version-list": (info_field("qfl.version", [1, 2]), "'qfl.version' must be an integer"),
    "version-inf": (info_field("qfl.version", math.inf), "'qfl.version' must be an integer"),
    "version-bool": (info_field("qfl.version", True), "'qfl.version' must be an integer"),
    "digest-str": (info_field("qfl.digest", "abc"), "'qfl.digest' must be an integer"),
    "state-bytes-float": (info_field("qfl.state-bytes", 1.5), "'qfl.state-bytes' must be an integer"),
    "full-bytes-huge": (info_field("qfl.full-bytes", 2**63 - 1 + 0.0), "'qfl.full-bytes' must be an integer"),
    "kind-evaluate": (info_field("qfl.kind", "report"), "a report does not"),
    "unknown-field": (info_field("qfl.owner", "me"), "unexpected fields"),
}


@pytest.mark.parametrize("name", list(TAMPERED))
def test_tampered_replies_are_dropped_and_the_run_goes_on(name):
    rewrite, reason = TAMPERED[name]
    strategy, result, models, log = hostile_run(rewrite, rounds=2)
    assert sorted(models) == [0, 1, 2]
    assert [result.train_metrics_clientapp[r]["qfl.dropped"] for r in (1, 2)] == [1, 1]
    assert strategy.strategy.aggregated[2] == FakeGrid(honest_app(), HONEST).node_ids
    assert any("dropped the reply" in line and reason in line for line in log.lines), reason


def test_the_guard_is_settable_in_code_and_in_the_run_config():
    from qfl.simulations.server_app import make_strategy
    from qfl.simulations.settings import Settings

    strategy = Compressed(FedAvg(), guard=None)
    assert strategy.guard is None
    strategy.guard = UpdateGuard(max_update_norm=3.0)
    assert strategy.protocol.guard.max_update_norm == 3.0
    s = Settings.from_run_config({"method": "qsparse", "norm-guard": 5.0, "max-update-norm": 100.0})
    assert make_strategy(s).guard == UpdateGuard(5.0, 100.0)
    s = Settings.from_run_config({"method": "custom", "norm-guard": 0.0})
    assert make_strategy(s).guard is None
    for key, value in (("norm-guard", 0.5), ("norm-guard", -1.0), ("max-update-norm", math.nan)):
        with pytest.raises(ValueError, match=key):
            Settings.from_run_config({key: value})
    with pytest.raises(ValueError, match="median_factor"):
        UpdateGuard(median_factor=0.5)


def test_compression_mod_beside_secaggplus_mod_refuses_with_the_reason():
    from flwr.app import Context
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    from qfl.clients.mod import SECAGG_CONFIGS, SECAGG_REASON, compression_mod

    assert SECAGG_CONFIGS == RECORD_KEY_CONFIGS
    msg = Message(
        content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "setup"})}), dst_node_id=1, message_type="train"
    )
    called = []
    reply = compression_mod(
        msg,
        Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}),
        lambda m, c: called.append(m),
    )
    assert reply.has_error() and reply.error.reason == SECAGG_REASON and not called
    assert "SecAggPlusWorkflow" in SECAGG_REASON and "legacy" in SECAGG_REASON


def test_presets_take_a_guard():
    from qfl.strategies.presets import build

    assert build("qsparse").guard == DEFAULT_GUARD
    assert build("qsparse", guard=UpdateGuard(max_update_norm=5.0)).guard.max_update_norm == 5.0
    assert build("fedavg", guard=None).guard is None


@pytest.mark.parametrize(
    "key,value",
    [
        ("alpha", -1.0),
        ("alpha", 0.0),
        ("lr", math.nan),
        ("lr", -0.1),
        ("classes-per-client", 0),
        ("momentum", math.inf),
        ("round-timeout", 0.0),
        ("max-client-samples", -3),
        ("staleness-exponent", -1.0),
    ],
)
def test_run_config_values_are_range_checked_naming_the_key(key, value):
    from qfl.simulations.settings import Settings

    with pytest.raises(ValueError, match=key):
        Settings.from_run_config({key: value})
