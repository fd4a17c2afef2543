"""quickstart-pytorch's ServerApp; the only qfl change is wrapping FedAvg in ``Compressed``."""

import json

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from qfl.strategies import Compressed

from .task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    strategy = Compressed(
        FedAvg(fraction_train=float(cfg["fraction-train"])),
        uplink="topk(0.05) | qsgd(levels=15, bucket=512)",
        downlink="delta | qsgd(levels=63, bucket=512)",
        min_elements=256,
    )
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]), train_config=ConfigRecord({"lr": float(cfg["lr"])}))
    if cfg["result-path"]:
        total = strategy.traffic.total()
        with open(str(cfg["result-path"]), "w") as f:
            json.dump({"eval": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
                       "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
                       "uplink": total.uplink, "uplink_full": total.uplink_full,
                       "downlink": total.downlink, "downlink_full": total.downlink_full,
                       "dropped": total.dropped, "resyncs": total.resyncs}, f)
