"""ServerApp of the probe app: FedAvg for a few rounds, then a JSON summary.

The summary (written to run-config ``result-path`` if non-empty) lets a test
assert that the run really completed instead of trusting exit codes/logs.
"""

import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

app = ServerApp()


def _aggregate_and_count(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted-average metrics (FedAvg default) plus the number of replies."""
    metrics = aggregate_metricrecords(records, weighting_key)
    metrics["replies"] = len(records)
    return metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg and write the result file."""
    cfg = context.run_config
    num_rounds = int(cfg["num-server-rounds"])
    min_nodes = int(cfg["min-nodes"])
    dim = int(cfg["dim"])

    strategy = FedAvg(
        fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_train_nodes=min_nodes,
        min_evaluate_nodes=min_nodes,
        min_available_nodes=min_nodes,
        train_metrics_aggr_fn=_aggregate_and_count,
        evaluate_metrics_aggr_fn=_aggregate_and_count,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(dim, dtype=np.float32)]),
        num_rounds=num_rounds,
        timeout=float(cfg["round-timeout"]),
    )

    final = result.arrays.to_numpy_ndarrays()[0]
    summary = {
        "run-id": context.run_id,
        "num-rounds": num_rounds,
        "final-mean": float(np.mean(final)),
        "train-metrics": {str(rnd): dict(rec) for rnd, rec in result.train_metrics_clientapp.items()},
        "evaluate-metrics": {str(rnd): dict(rec) for rnd, rec in result.evaluate_metrics_clientapp.items()},
        "node-ids": sorted(int(n) for n in grid.get_node_ids()),
        "serverapp-pid": os.getpid(),
    }
    path = str(cfg.get("result-path", ""))
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        tmp.replace(path)
