"""Compressed in Flower's simulation engine: FedAvg and FedAdam inside, plain Flower beside.

tests/apps/engine runs qfl's reference ClientApp (with compression_mod) on 4 virtual
SuperNodes; its ServerApp runs the inner strategy alone or wrapped in ``Compressed``.
All runs share one SuperLink started with runtime dependency installation off and a
private FLWR_HOME (qfl.simulations.superlink), every node trains every round, and the
clients' training is seeded per (round, partition), so runs are comparable:

* identity (no specs) gives plain FedAvg's model to float tolerance;
* FedAvg and FedAdam with both directions compressed and client error memory lower the
  loss, every reply is decoded, and the bytes per message are what the specs imply
  (lossless resync at first contact, exact; compressed payloads within the wire
  format's fixed-width bound).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from expected import blob_bound, container_bytes, identity_bytes

from qfl.clients.records import record_bytes, to_record
from qfl.compress import IDENTITY
from qfl.simulations.superlink import LocalFederation
from qfl.spec import Policy, parse_downlink

pytestmark = pytest.mark.integration

APP = Path(__file__).parent / "apps" / "engine"
NODES, ROUNDS, MIN_ELEMENTS = 4, 3, 200
UPLINK = "topk(0.1) | qsgd(levels=15, bucket=512)"
DOWNLINK = "delta | topk(0.25) | qsgd(levels=15)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every configuration once on one simulation SuperLink; name -> summary."""
    tmp = tmp_path_factory.mktemp("engine")
    configs = {
        "plain": {"inner": "fedavg", "wrap": False},
        "identity": {"inner": "fedavg", "wrap": True},
        "fedavg": {"inner": "fedavg", "wrap": True, "uplink": UPLINK, "downlink": DOWNLINK},
        "fedadam": {"inner": "fedadam", "wrap": True, "uplink": UPLINK, "downlink": DOWNLINK},
    }
    out = {}
    with LocalFederation(simulation=True, num_supernodes=NODES) as fed:
        for name, cfg in configs.items():
            path = tmp / f"{name}.json"
            run = fed.run_app(
                APP,
                {
                    **cfg,
                    "num-nodes": NODES,
                    "num-server-rounds": ROUNDS,
                    "min-elements": MIN_ELEMENTS,
                    "result-path": str(path),
                },
                timeout=600,
            )
            assert run.ok, f"{name}: {run.log[-4000:]}"
            out[name] = json.loads(path.read_text())
    return out


def final(summary: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in summary["final"].items()}


def test_identity_spec_equals_plain_fedavg(runs):
    plain, wrapped = runs["plain"], runs["identity"]
    assert plain["dtypes"] == wrapped["dtypes"]
    a, b = final(plain), final(wrapped)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    assert plain["eval_loss"] == pytest.approx(wrapped["eval_loss"], rel=1e-5)
    # Lossless both ways: qfl's identity blobs are the raw bytes and a header no bigger than numpy's.
    for key, t in wrapped["traffic"].items():
        assert t["messages"] == t["replies"] == NODES and t["dropped"] == t["failures"] == 0, key
        assert 0 < t["downlink"] <= t["downlink_full"], key
        if key.endswith("/train"):
            assert 0 < t["uplink"] <= t["uplink_full"], key


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_both_directions_compressed_learn_and_send_what_the_specs_imply(runs, name):
    summary = runs[name]
    losses = [summary["eval_loss"][str(r)] for r in range(1, ROUNDS + 1)]
    assert losses[-1] < losses[0], losses
    model = tiny_model().state_dict()
    up = Policy.build(UPLINK, MIN_ELEMENTS)
    mode, down_op = parse_downlink(DOWNLINK)
    down = Policy.build(down_op, MIN_ELEMENTS)
    assert mode == "delta"
    compressed = [k for k, t in model.items() if up.operator_for(k, t) != IDENTITY]
    assert compressed, "the specs must compress some tensors of the model"
    full = record_bytes(to_record(model))
    resync = container_bytes({k: identity_bytes(t) for k, t in model.items()})
    up_max = container_bytes({k: blob_bound(up.operator_for(k, t), t) for k, t in model.items()})
    down_max = container_bytes({k: blob_bound(down.operator_for(k, t), t) for k, t in model.items()})
    raw = sum(identity_bytes(t) for k, t in model.items() if k not in compressed)  # what is never compressed
    for key, t in summary["traffic"].items():
        rnd, phase = key.split("/")
        assert t["messages"] == t["replies"] == NODES, key
        assert t["dropped"] == t["failures"] == 0, key
        # Plain Flower's downlink is the server model: float64 once FedAdam has aggregated.
        if (int(rnd), phase) == (1, "train"):  # first contact: everyone gets the model losslessly
            assert t["downlink_full"] == NODES * full
            assert t["resyncs"] == NODES and t["downlink"] == NODES * resync
        else:  # then compressed steps against the replica, which every client holds
            assert t["downlink_full"] >= NODES * full
            assert t["resyncs"] == 0, key
            assert t["downlink"] <= NODES * down_max < NODES * full / 2, key
        if phase == "train":
            assert t["uplink_full"] == NODES * full
            assert NODES * raw < t["uplink"]
            assert t["uplink"] <= NODES * up_max < NODES * full / 3, key
    # The round's MetricRecord reports the same bytes the strategy counted.
    for rnd, metrics in summary["train"].items():
        assert metrics["qfl.uplink-bytes"] == summary["traffic"][f"{rnd}/train"]["uplink"]
        assert metrics["qfl.downlink-bytes"] == summary["traffic"][f"{rnd}/train"]["downlink"]
