"""The server's whole ``aggregate_train`` per reply, in one process: qfl against plain Flower.

``benchmarks/e2e.py`` times ``aggregate_train`` inside Flower's simulation engine, where
the clients' processes share the two cores with the server: one reading per round,
+-40% from round to round on a small model. This script times the same call where
nothing else runs, over many rounds, so that a change to the server's per-reply costs
shows in one run. Its messages go through Flower's own serialisation
(``tests/fakes.py``'s ``FakeGrid``: every message deflated and inflated as on the wire)
to ``compression_mod`` ClientApps, as in a deployment.

Clients: each applies its own real update -- ``--steps`` local SGD steps of the model
(``tests/apps/bigmodel``'s models and synthetic data, as ``scale.py`` and ``e2e.py``)
computed once -- to the model it receives, so that every round carries update-shaped
values without training time in the loop. The server: ``Compressed(FedAvgMomentum)``
with ``presets.recommended`` (what ``e2e.py`` runs), and Flower's own ``FedAvg`` on the
uncompressed replies of the same clients; with ``--ungrouped`` also qfl with every tensor
in its own blob (no group blobs for the small lossless tensors: qfl before 3d8b470). The
runs' rounds are interleaved, so that a shared machine slowing down mid-run slows all.

Printed per model: ms per round of ``aggregate_train`` (median of the rounds after the
first, which pays one-off costs), ms per reply, ms per 10M parameters per reply against
the 50 ms goal of issue 13 (PASS/FAIL), and the ratio to plain FedAvg of the same run.
The load average is printed at start and end; above 1 per core the run is not a verdict::

    PYTHONPATH=. python benchmarks/aggregate.py [--models 'resnet18(width=32),resnet18'] [--clients 3] [--ungrouped]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

from qfl.clients import compression_mod
from qfl.strategies import Compressed, FedAvgMomentum, presets
from qfl.wire import container

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "apps" / "bigmodel"))
from bigmodel.measure import commit  # noqa: E402
from bigmodel.models import build, parse_model, split_models, train_steps  # noqa: E402
from fakes import FakeGrid  # noqa: E402

#: Issue 13's goal: server decode+aggregate per 10M parameters per reply.
SERVER_LIMIT_MS = 50.0


def updates_of(name: str, start: dict[str, torch.Tensor], clients: int, steps: int, batch: int, seq: int, seed: int):
    """Each client's real update (its model after ``steps`` steps minus the start), once."""
    family = parse_model(name)[0]
    model = build(name)
    out = []
    for c in range(clients):
        model.load_state_dict(start)
        train_steps(name, model, steps, 1 if family == "gpt2" else batch, seq, seed + c)
        trained = model.state_dict()
        out.append({k: (trained[k] - start[k]) if start[k].is_floating_point() else 1 for k in start})
    return out


def client_app(updates: list[dict], compressed: bool) -> ClientApp:
    """Node i adds update i to the model it receives (a counter, +1), as training would."""
    app = ClientApp(mods=[compression_mod] if compressed else [])

    @app.train()
    def train(msg: Message, context) -> Message:
        update = updates[int(context.node_config["partition-id"])]
        out = {}
        for k, a in msg.content["arrays"].items():
            x = torch.from_numpy(a.numpy())
            out[k] = Array((x + update[k]).to(x.dtype).numpy())
        metrics = MetricRecord({"num-examples": 32, "train_loss": 1.0})
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)

    return app


@contextlib.contextmanager
def ungrouped(active: bool):
    """While active, clients send every tensor as its own blob, as qfl did before small
    lossless tensors shared a group blob (``qfl.wire.container.GROUP_MAX_ELEMENTS``)."""
    saved = container.GROUP_MAX_ELEMENTS
    container.GROUP_MAX_ELEMENTS = 0 if active else saved
    try:
        yield
    finally:
        container.GROUP_MAX_ELEMENTS = saved


def time_rounds(runs: dict[str, tuple], start: ArrayRecord, rounds: int) -> dict[str, list[float]]:
    """Seconds of each round's ``aggregate_train`` per run (the replies built beforehand),
    the runs' rounds interleaved: a machine that slows down mid-benchmark slows them all."""
    arrays = dict.fromkeys(runs, start)
    out: dict[str, list[float]] = {mode: [] for mode in runs}
    for rnd in range(1, rounds + 1):
        for mode, (strategy, grid) in runs.items():
            with ungrouped(mode == "qfl-ungrouped"):
                replies = grid.send_and_receive(strategy.configure_train(rnd, arrays[mode], ConfigRecord(), grid))
            t0 = time.perf_counter()
            new, _ = strategy.aggregate_train(rnd, replies)
            out[mode].append(time.perf_counter() - t0)
            if new is None:
                raise RuntimeError(f"{mode}, round {rnd}: no aggregate (every reply dropped?)")
            arrays[mode] = new
    return out


def run_model(name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = build(name)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in start.values())
    updates = updates_of(name, start, args.clients, args.steps, args.batch, args.seq, args.seed)
    sampling = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_available_nodes": args.clients}
    # e2e.py's default run (3 rounds, 20 steps): both benchmarks compress with the same setting.
    setting = presets.recommended(3, args.clients, 20)
    modes = ["plain", "qfl"] + (["qfl-ungrouped"] if args.ungrouped else [])
    runs = {}
    for mode in modes:
        if mode == "plain":
            strategy = FedAvg(**sampling)
        else:
            inner = FedAvgMomentum(server_momentum=setting.server_momentum, **sampling)
            strategy = Compressed(inner, **setting.compression())
        runs[mode] = (strategy, FakeGrid(client_app(updates, mode != "plain"), args.clients))
    times = time_rounds(runs, ArrayRecord(start), args.rounds)
    return {"params": params, "tensors": len(start), "times": times, "compression": setting.compression()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18(width=32),resnet18", help="comma-separated, e.g. 'mlp(hidden=512)'")
    ap.add_argument("--clients", type=int, default=3, help="replies per round")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per strategy (the first is not counted)")
    ap.add_argument("--steps", type=int, default=5, help="local steps of each client's update")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=32, help="tokens per step, GPT-2 shape")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--ungrouped", action="store_true", help="also qfl with every tensor in its own blob (no group blobs)"
    )
    args = ap.parse_args(argv)
    try:
        models = split_models(args.models)
    except ValueError as exc:
        ap.error(f"--models: {exc}")
    if min(args.clients, args.steps, args.batch, args.seq) < 1 or args.rounds < 2:
        ap.error("--clients, --steps, --batch and --seq must be positive, --rounds at least 2")
    # Flower logs two lines per round at INFO; qfl's warnings (a dropped reply) stay visible.
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    print(
        f"# qfl in-process aggregate benchmark, commit {commit(ROOT)}, {platform.machine()} {cores} CPUs, "
        f"torch {torch.__version__}, {args.clients} replies per round, {args.rounds} rounds"
    )
    print(f"# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    results = {m: run_model(m, args) for m in models}
    load_end = os.getloadavg()
    print(f"\n{'model':24} {'params':>12} {'tensors':>7} {'run':>13} {'ms/round':>9} {'ms/reply':>9} {'ms/10M':>7}")
    goals = []
    for m, r in results.items():
        per = {}
        for mode, times in r["times"].items():
            ms = 1e3 * statistics.median(times[1:])
            per[mode] = ms / args.clients / (r["params"] / 1e7)
            print(
                f"{m:24} {r['params']:12,} {r['tensors']:7} {mode:>13} {ms:9.1f} {ms / args.clients:9.2f} "
                f"{per[mode]:7.1f}"
            )
        print(f"{'':24} qfl / plain FedAvg: {per['qfl'] / per['plain']:.2f}x; qfl: {r['compression']}")
        if "qfl-ungrouped" in per:
            print(f"{'':24} qfl / qfl without group blobs: {per['qfl'] / per['qfl-ungrouped']:.2f}x")
        goals.append((f"{m}: aggregate_train, ms per 10M parameters per reply", per["qfl"], SERVER_LIMIT_MS))
    quiet = max(load_start[0], load_end[0]) <= cores
    print(f"\n# load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print("goals (median round after the first)" + ("" if quiet else " -- NOT A VERDICT: load above 1 per core") + ":")
    for label, value, limit in goals:
        verdict = "PASS" if value <= limit else "FAIL"
        print(f"  {label}: {value:.3g} = {value / limit:.2f}x the {limit:g} limit -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
