"""Plug-in check: a quickstart-pytorch-shaped app gains compression from two lines.

tests/apps/quickstart is Flower's quickstart-pytorch shape (train/evaluate functions
reading ``msg.content["arrays"].to_torch_state_dict()`` and replying
``ArrayRecord(model.state_dict())``, a BatchNorm layer so int64 buffers exist); qfl only
wraps its FedAvg in ``Compressed`` and adds ``mods=[compression_mod]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

APP = Path(__file__).parent / "apps" / "quickstart"


@pytest.mark.integration
def test_quickstart_app_runs_compressed_in_the_simulation_engine(tmp_path):
    from qfl.simulations.superlink import LocalFederation

    out = tmp_path / "result.json"
    with LocalFederation(simulation=True, num_supernodes=3) as fed:
        run = fed.run_app(
            APP,
            {"num-server-rounds": 3, "result-path": str(out)},
            timeout=600,
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
        )
    assert run.ok, run.log[-4000:]
    result = json.loads(out.read_text())
    losses = [result["eval"][str(r)]["eval_loss"] for r in (1, 2, 3)]
    assert losses[-1] < losses[0]
    assert result["dropped"] == 0 and result["resyncs"] == 3  # everyone once, at first contact
    assert result["uplink"] < result["uplink_full"] / 4  # top-5% of 4-bit values, small tensors raw
    assert result["downlink"] < result["downlink_full"]
    # The user's app never saw compressed arrays: its train/evaluate ran unchanged.
    assert all("qfl.uplink-bytes" in m for m in result["train"].values())
