"""The simulation's ServerApp: one method, centrally evaluated, results to JSON.

The method is a preset (``method = "qsparse"``) or ``method = "custom"`` with raw
``uplink``/``downlink`` specs. After every round the server evaluates the global model
on the Fashion-MNIST test set and appends a progress line (accuracy, loss, bytes per
direction, wall time; messages, replies, resyncs and their reasons, dropped and failed
replies; the server's downlink state, the largest client state, the ServerApp's resident
memory) to
``<results-dir>/<label>.progress.jsonl``; at the end it writes
``<results-dir>/<label>.json`` in the schema ``qfl.simulations.report`` reads.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import random
import time
import traceback
from pathlib import Path

import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

import qfl

from ..clients import evaluate
from ..strategies import AsyncCompressed, Compressed, UpdateGuard
from ..strategies.presets import ASYNC_PRESETS, build, server_strategy
from .grid import PartitionOrderedGrid
from .models import build_model, count_parameters
from .results import RoundRecord, RunResult
from .settings import Settings

app = ServerApp()


def flwr_version() -> str:
    """The installed flwr's version."""
    return importlib.metadata.version("flwr")


def method_settings(s: Settings, method: str) -> Settings:
    """The settings of one method's run: ``num_server_rounds`` becomes the rounds it trains
    (``rounds-factor`` applied, once)."""
    return dataclasses.replace(s, method=method, num_server_rounds=s.rounds_of(method))


def make_strategy(s: Settings) -> Compressed | AsyncCompressed:
    """The strategy of one method's run (:func:`method_settings`), with the update guard
    the run config sets (``norm-guard``, ``max-update-norm``)."""
    strategy = _strategy(s)
    strategy.guard = UpdateGuard.from_config(s.norm_guard, s.max_update_norm)
    return strategy


def _strategy(s: Settings) -> Compressed | AsyncCompressed:
    if s.method in ASYNC_PRESETS:
        concurrency, buffer, _, _ = s.async_plan()
        return ASYNC_PRESETS[s.method](
            concurrency=concurrency,
            buffer_size=buffer,
            max_staleness=s.max_staleness,
            staleness_exponent=s.staleness_exponent,
            seed=s.seed,
            min_elements=s.min_elements,
        )
    inner = s.fedavg_kwargs()
    if s.method == "custom":
        server = server_strategy(s.server_momentum, s.server_lr, **inner)
        return Compressed(
            server,
            uplink=s.uplink or None,
            downlink=s.downlink or None,
            downlink_initial=s.downlink_initial or None,
            error_feedback=s.error_feedback,
            min_elements=s.min_elements,
            seed=s.seed,
        )
    if s.method == "qesgd":
        return build(s.method, lr=s.learning_rate, seed=s.seed, min_elements=s.min_elements, **inner)
    if s.method == "recommended":  # k follows the run's length and local work (presets.recommended)
        if s.local_steps < 1:
            raise ValueError(
                "method 'recommended' sizes top-k by the local steps per round: set local-steps "
                "(local-epochs x batches per epoch) instead of local-epochs"
            )
        return build(
            s.method,
            num_rounds=s.num_server_rounds,  # this method's own rounds: main() applied rounds-factor
            clients_per_round=s.clients_per_round,
            local_steps=s.local_steps,
            seed=s.seed,
            min_elements=s.min_elements,
            **inner,
        )
    return build(s.method, seed=s.seed, min_elements=s.min_elements, **inner)


def results_dir(s: Settings) -> Path:
    """Where results go: the run config's ``results-dir``, else ``$QFL_RESULTS_DIR``, else ./results."""
    path = Path(s.results_dir or os.environ.get("QFL_RESULTS_DIR", "results")).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


BYTE_COUNTS = ("uplink", "downlink", "uplink_full", "downlink_full")
PROTOCOL_COUNTS = ("messages", "replies", "resyncs", "dropped", "failures")


class Recorder:
    """Centralised evaluation after each round, and the round records of the result file."""

    def __init__(
        self, s: Settings, strategy: Compressed | AsyncCompressed, out: Path, grid: PartitionOrderedGrid | None = None
    ) -> None:
        self.s, self.strategy, self.out, self.grid = s, strategy, out, grid
        # Bytes per direction, and the protocol's health: messages sent, replies received,
        # full-model resyncs, refused replies, error replies.
        self.counted = dict.fromkeys(BYTE_COUNTS + PROTOCOL_COUNTS, 0)
        self.last_round = -1
        self.model = build_model(s.model_name, s.seed)
        self.x, self.y = s.workload.test_data(s)
        self.rows: list[RoundRecord] = []
        self.started = time.perf_counter()
        self.progress = out / f"{s.name}.progress.jsonl"
        self.progress.write_text("")
        if grid is not None:
            grid.take_traffic()  # a previous method's last messages are not this one's

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self.model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(self.model, self.x, self.y)
        total = self.strategy.traffic.total()
        counts = {}
        for key, before in self.counted.items():  # counts since the previous evaluation
            counts[f"{key}_bytes" if key in BYTE_COUNTS else key] = getattr(total, key) - before
            self.counted[key] = getattr(total, key)
        row = RoundRecord(
            round=server_round,
            accuracy=acc,
            loss=loss if math.isfinite(loss) else None,
            wall_time=time.perf_counter() - self.started,
            **counts,
            # Memory and resyncs: why clients were resynced (cumulative), what the
            # server's downlink keeps, the largest client state replies reported since
            # the previous evaluation, the ServerApp's resident memory.
            resync_reasons=dict(self.strategy.downlink.resyncs),
            server_state=self.strategy.downlink.state_size(),
            client_state_bytes=max(
                (
                    t.client_state_bytes
                    for (r, _), t in self.strategy.traffic.rounds.items()
                    if self.last_round < r <= server_round
                ),
                default=0,
            ),
            server_rss_mb=round(psutil.Process().memory_info().rss / 2**20, 1),
            clients=self.grid.take_traffic() if self.grid is not None else (),
        )
        self.last_round = server_round
        self.rows.append(row)
        with self.progress.open("a") as f:
            f.write(
                json.dumps(
                    {
                        "label": self.s.name,
                        "round": row.round,
                        "accuracy": acc,
                        "uplink_bytes": row.uplink_bytes,
                        "downlink_bytes": row.downlink_bytes,
                        "wall_time": row.wall_time,
                    }
                )
                + "\n"
            )
        log(
            20,
            "[%s] round %d: test accuracy %.4f, uplink %d B, downlink %d B",
            self.s.name,
            server_round,
            acc,
            row.uplink_bytes,
            row.downlink_bytes,
        )
        return MetricRecord({"accuracy": acc, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run each listed method for ``num-server-rounds`` rounds, writing one result file each.

    Methods run one after the other on the same SuperNodes (each strategy namespaces
    its client state), which saves a simulation start per method. A method that fails
    is logged to ``<label>.error.txt`` and the others still run; the run then fails.
    """
    s = Settings.from_run_config(dict(context.run_config))
    log(20, "qfl %s from %s (flwr %s, pid %d)", qfl.__version__, Path(qfl.__file__).parent, flwr_version(), os.getpid())
    # The same partitions sampled every run with this seed, whatever the node ids and timing.
    grid = PartitionOrderedGrid(grid, timeout=s.round_timeout, seed=s.seed)
    failed = []
    for method in s.methods:
        one = method_settings(s, method)
        try:
            run_method(grid, one)
        except Exception:
            failed.append(one.name)
            (results_dir(one) / f"{one.name}.error.txt").write_text(traceback.format_exc())
            log(40, "[%s] failed:\n%s", one.name, traceback.format_exc())
    if failed:
        raise RuntimeError(f"methods failed: {', '.join(failed)} (see their .error.txt files)")


def run_method(grid: Grid, s: Settings) -> Path:
    """Run one method and write its result file; returns the file's path."""
    torch.manual_seed(s.seed)
    random.seed(s.seed)  # Flower's strategies sample nodes with the random module
    if isinstance(grid, PartitionOrderedGrid):
        grid.exchanges = 0  # every method of the comparison trains the same partitions in round r
    strategy = make_strategy(s)
    out = results_dir(s)
    (out / f"{s.name}.error.txt").unlink(missing_ok=True)
    recorder = Recorder(s, strategy, out, grid if isinstance(grid, PartitionOrderedGrid) else None)
    initial = ArrayRecord(build_model(s.model_name, s.seed).state_dict())
    train_config = ConfigRecord({"lr": s.learning_rate, "local-steps": s.local_steps})
    if isinstance(strategy, AsyncCompressed):
        strategy.message_timeout = s.round_timeout
        _, _, versions, every = s.async_plan()
        strategy.start(
            grid, initial, num_updates=versions, train_config=train_config, evaluate_fn=recorder, evaluate_every=every
        )
    else:
        strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=s.num_server_rounds,
            timeout=s.round_timeout,
            train_config=train_config,
            evaluate_fn=recorder,
        )
    return write_result(s, strategy, recorder, out)


def write_result(s: Settings, strategy: Compressed | AsyncCompressed, recorder: Recorder, out: Path) -> Path:
    """The run's result file (schema: :class:`qfl.simulations.results.RunResult`); returns its path."""
    result = RunResult(
        label=s.name,
        method=s.method,
        seed=s.seed,
        uplink=str(strategy.uplink.op),
        downlink=f"{strategy.downlink.mode} | {strategy.downlink.policy.op}",
        error_feedback=strategy.error_feedback,
        config={k.replace("_", "-"): v for k, v in vars(s).items()},
        model_parameters=count_parameters(recorder.model),
        rounds=tuple(recorder.rows),
        is_async=isinstance(strategy, AsyncCompressed),
        # Which code ran the server (a deployment imports qfl from the SuperLink's environment).
        runtime={"qfl": str(Path(qfl.__file__).parent), "flwr": flwr_version()},
    )
    return result.save(out / f"{s.name}.json")
