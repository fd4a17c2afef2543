"""A user's ServerApp: FedAvg, or with qfl the recommended setting wrapped around FedAvgM.

The only qfl line is ``Compressed(...)`` around the strategy (``plain = true`` runs plain
Flower's FedAvg instead); :class:`~bigmodel.measure.Measured` around either is the
benchmark's instrument. The ServerApp writes what it measured to ``result-path``
(JSON; what ``benchmarks/e2e.py`` prints).

Compression: ``presets.recommended(num-server-rounds, clients per round, local-steps)``, as a user
would choose it; ``uplink``/``downlink`` (non-empty) replace that setting's uplink or
downlink spec (a replaced downlink starts from the full-precision model).
"""

import json
from dataclasses import asdict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from qfl.strategies import Compressed, FedAvgMomentum, presets

from .measure import Measured, peak_rss, rss
from .models import build

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    fraction, num_rounds = float(cfg["fraction-train"]), int(cfg["num-server-rounds"])
    nodes = len(list(grid.get_node_ids()))
    sampling = {"fraction_train": fraction, "fraction_evaluate": 0.0}  # train rounds only
    if cfg["plain"]:
        strategy, compression = FedAvg(**sampling), None
    else:
        setting = presets.recommended(num_rounds, max(int(fraction * nodes), 2), int(cfg["local-steps"]))
        compression = setting.compression()
        if cfg["uplink"]:
            compression["uplink"] = str(cfg["uplink"])
        if cfg["downlink"]:
            compression.update(downlink=str(cfg["downlink"]), downlink_initial=None)
        strategy = Compressed(FedAvgMomentum(server_momentum=setting.server_momentum, **sampling), **compression)
    measured = Measured(strategy)
    model = build(str(cfg["model"]), bool(cfg["tiny"]))
    state = model.state_dict()
    rss_model = rss()
    measured.start(
        grid=grid,
        initial_arrays=ArrayRecord(state),
        num_rounds=num_rounds,
        train_config=ConfigRecord({"lr": float(cfg["lr"])}),
    )
    if not cfg["result-path"]:
        return
    out = {
        "model": str(cfg["model"]),
        "tiny": bool(cfg["tiny"]),
        "plain": bool(cfg["plain"]),
        "nodes": nodes,
        "params": sum(p.numel() for p in model.parameters()),
        "model_bytes": sum(v.numel() * v.element_size() for v in state.values()),
        "compression": compression,
        "server_rss_mb_with_model": rss_model / (1 << 20),
        "server_peak_rss_mb": peak_rss() / (1 << 20),
        "rounds": measured.rounds,
    }
    if not cfg["plain"]:
        out["traffic"] = {r: asdict(t) for (r, phase), t in strategy.traffic.rounds.items() if phase == "train"}
        out["total"] = asdict(strategy.traffic.total())
        out["resyncs"] = dict(strategy.downlink.resyncs) if strategy.downlink is not None else {}
    with open(str(cfg["result-path"]), "w") as f:
        json.dump(out, f)
