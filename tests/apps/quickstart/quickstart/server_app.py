"""quickstart-pytorch's ServerApp; the only qfl change is wrapping the strategy in ``Compressed``.

Run-config keys beyond quickstart-pytorch's, for tests and benchmarks/quickstart.py:
``uplink``/``downlink`` (qfl specs; ``plain = true`` runs plain Flower without
``Compressed``), ``server-momentum`` (FedAvgMomentum instead of FedAvg when > 0),
``recommended`` (true: ``presets.recommended`` for this run's rounds and clients
instead of the three keys before) and
``test-samples`` (> 0: the server also evaluates on that many Fashion-MNIST test images
after every round).
"""

import json
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from qfl.simulations.data import test_data
from qfl.strategies import Compressed, FedAvgMomentum, presets

from .task import VAL_FRACTION, Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    fraction = float(cfg["fraction-train"])
    num_rounds = int(cfg["num-server-rounds"])
    if cfg["recommended"] and not cfg["plain"]:
        # As a user would: the recommended setting for this run's rounds and clients.
        clients_per_round = max(int(fraction * len(list(grid.get_node_ids()))), 2)
        # local steps: an epoch over the samples task.load_data trains on
        train = (1 - VAL_FRACTION) * int(cfg["max-samples"])
        steps = int(cfg["local-epochs"]) * math.ceil(train / int(cfg["batch-size"]))
        setting = presets.recommended(num_rounds, clients_per_round, local_steps=steps)
        compression, momentum = setting.compression(), setting.server_momentum
    else:
        compression = {"uplink": str(cfg["uplink"]), "downlink": str(cfg["downlink"])}
        momentum = float(cfg["server-momentum"])
    inner = (
        FedAvgMomentum(fraction_train=fraction, server_momentum=momentum)
        if momentum
        else FedAvg(fraction_train=fraction)
    )
    strategy = inner if cfg["plain"] else Compressed(inner, min_elements=256, **compression)
    central = {}
    samples = int(cfg["test-samples"])
    images, labels = test_data(max_samples=samples) if samples else (None, None)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = Net()
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            acc = float((model(images).argmax(1) == labels).float().mean())
        central[server_round] = acc
        return MetricRecord({"central_acc": acc})

    init = Net()
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(init.state_dict()),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
        evaluate_fn=evaluate if samples else None,
    )
    if cfg["result-path"]:
        total = strategy.traffic.total() if isinstance(strategy, Compressed) else None
        with open(str(cfg["result-path"]), "w") as f:
            json.dump(
                {
                    "eval": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
                    "train": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
                    "central": central,
                    "compression": None if cfg["plain"] else {**compression, "server_momentum": momentum},
                    **(
                        {
                            "uplink": total.uplink,
                            "uplink_full": total.uplink_full,
                            "downlink": total.downlink,
                            "downlink_full": total.downlink_full,
                            "dropped": total.dropped,
                            "resyncs": total.resyncs,
                        }
                        if total
                        else {}
                    ),
                },
                f,
            )
