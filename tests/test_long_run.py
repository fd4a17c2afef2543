"""A long run in Flower's simulation engine: bounded memory, replicas never diverge.

200 rounds of the qsparse preset (top-k | damped QSGD uplink with error memory; delta
downlink with server-side error feedback, from an 8-bit checkpoint, history 16) on 50
simulated SuperNodes, 10% of them per round, through ``qfl.simulations.runner`` (a
local SuperLink in simulation mode running the real Flower App). The ServerApp logs,
per round, what its downlink keeps, the largest client state reported by a reply, its
own resident memory, and why clients were resynced.
"""

from __future__ import annotations

import json
import math

import pytest

ROUNDS, CLIENTS, PER_ROUND, HISTORY = 200, 50, 5, 16
LOGREG_BYTES = (784 * 10 + 10) * 4


@pytest.mark.slow
def test_200_rounds_of_partial_participation_keep_memory_bounded_and_replicas_exact(tmp_path):
    from qfl.simulations.runner import run_methods

    common = {
        "num-server-rounds": ROUNDS,
        "num-clients": CLIENTS,
        "fraction-train": PER_ROUND / CLIENTS,
        "model": "logreg",
        "local-steps": 1,
        "batch-size": 16,
        "max-client-samples": 64,
        "test-samples": 200,
        "partitioning": "iid",
        "seed": 1,
    }
    status = run_methods(["qsparse"], common, tmp_path, timeout=1800)
    log = tmp_path / "run.log"
    assert status == {"qsparse": True}, log.read_text()[-5000:] if log.exists() else status
    result = json.loads((tmp_path / "qsparse.json").read_text())
    rows = result["rounds"]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    # These fields only exist in this checkout: the Flower processes imported this qfl.
    assert all("server_state" in r and "client_state_bytes" in r for r in rows)
    trained = rows[1:]

    # No reply was dropped, failed (a client whose rebuilt replica had another digest
    # than the server's record fails with an error reply) or went missing, and no
    # client was resynced for any reason but first contact or being away longer than
    # the history (the server acknowledged every replica digest it got).
    assert sum(r["dropped"] + r["failures"] for r in trained) == 0
    assert sum(r["messages"] for r in trained) == sum(r["replies"] for r in trained) == ROUNDS * PER_ROUND
    reasons = trained[-1]["resync_reasons"]
    assert reasons["lost"] == 0 and reasons["behind"] == 0
    assert sum(r["resyncs"] for r in trained) == reasons["new"]
    # Every client is seen at some point; ~(1 - 0.1)^16 = 18.5% of later participations
    # come after more than 16 versions away: between 50 and 50 + 950 * 0.35 resyncs.
    assert CLIENTS <= reasons["new"] <= CLIENTS + 0.35 * (ROUNDS * PER_ROUND - CLIENTS)

    # Server: bounded by the history, whatever the number of rounds.
    states = [r["server_state"] for r in trained]
    assert max(s["steps"] for s in states) == HISTORY and max(s["digests"] for s in states) == HISTORY + 1
    assert all(s["replica_bytes"] == LOGREG_BYTES for s in states)
    assert max(s["nodes"] for s in states) <= CLIENTS
    early = max(s["step_bytes"] + s["checkpoint_bytes"] + s["offer_bytes"] for s in states[HISTORY:100])
    late = max(s["step_bytes"] + s["checkpoint_bytes"] + s["offer_bytes"] for s in states[100:])
    assert late <= 1.5 * early
    rss = [r["server_rss_mb"] for r in trained if r["server_rss_mb"] is not None]
    if rss:
        assert max(rss[100:]) - max(rss[20:100]) < 64  # no growth with rounds (allocator noise aside)

    # Clients: the replica and the error memory, the same size every round.
    client = [r["client_state_bytes"] for r in trained]
    replica_and_memory = LOGREG_BYTES + 784 * 10 * 4  # the bias (10 values) passes through: no residual
    assert min(client) == max(client) and replica_and_memory <= max(client) <= replica_and_memory + 3 * 256
    assert not math.isnan(trained[-1]["accuracy"]) and trained[-1]["accuracy"] > 0.3
