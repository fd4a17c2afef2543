"""ServerApp: the inner strategy, wrapped in ``Compressed`` or not, then a JSON summary.

The summary holds the final model, the clients' evaluation losses per round and qfl's
per-round traffic, so a test can compare runs instead of trusting exit codes.
"""

import json
from dataclasses import asdict
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg

from qfl.clients.records import to_tensors
from qfl.strategies import Compressed

from .task import tiny_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    nodes = int(cfg["num-nodes"])
    common = {"min_train_nodes": nodes, "min_evaluate_nodes": nodes, "min_available_nodes": nodes}
    inner_name = str(cfg["inner"])
    if inner_name == "fedavg":
        inner = FedAvg(**common)
    elif inner_name == "fedadam":
        inner = FedAdam(eta=0.05, eta_l=0.1, **common)
    else:
        raise ValueError(f"inner must be 'fedavg' or 'fedadam', got {inner_name!r}")
    strategy = inner
    if bool(cfg["wrap"]):
        strategy = Compressed(
            inner,
            uplink=str(cfg["uplink"]) or None,
            downlink=str(cfg["downlink"]) or None,
            error_feedback=bool(cfg["error-feedback"]),
            min_elements=int(cfg["min-elements"]),
            seed=int(cfg["seed"]),
        )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(tiny_model().state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["lr"]), "local-steps": int(cfg["local-steps"])}),
    )
    traffic = getattr(strategy, "traffic", None)
    summary = {
        "final": {k: t.double().flatten().tolist() for k, t in to_tensors(result.arrays).items()},
        "dtypes": {k: str(t.dtype) for k, t in to_tensors(result.arrays).items()},
        "eval_loss": {str(r): float(m["eval_loss"]) for r, m in result.evaluate_metrics_clientapp.items()},
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "traffic": None
        if traffic is None
        else {f"{r}/{phase}": asdict(t) for (r, phase), t in sorted(traffic.rounds.items())},
    }
    path = str(cfg["result-path"])
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary), encoding="utf-8")
        tmp.replace(path)
