"""The simulation app as a real deployment: SuperLink and SuperNodes as processes.

Every test starts ``flower-superlink`` and ``flower-supernode`` processes of the
interpreter's own flwr, so the suite proves the transport it runs under: flwr 1.39
(SuperNodes speak gRPC-rere to a separate Fleet port) or flwr 1.41 (HTTP on the
SuperLink's single port); tools/test.sh runs this file under both::

    .venv/bin/python    -m pytest tests/test_deploy.py -q -s --durations=0
    .venv139/bin/python -m pytest tests/test_deploy.py -q -s --durations=0

The app is compressed both ways with error feedback (top-5% + 4-bit QSGD up, delta
top-20% + 4-bit QSGD down) on a small Fashion-MNIST task. Each test checks the
protocol from the per-round counts of the result file (every reply decoded, full
models only at first contact or after a lost state), the bytes against what the
specs imply and against Flower's own Fleet API counters, and, through the
``QFL_CLIENT_TRACE`` file the ClientApps append to, that replica and error memory
survive in ``context.state`` although every message runs in a fresh process.

Every Flower process of a test carries a marker in its environment; after the
test (also on failure) any still alive is killed by PID and the test fails.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import tomli_w
from expected import container_bytes, identity_bytes

import qfl
from qfl.clients.records import record_bytes, to_record
from qfl.compress import IDENTITY
from qfl.simulations.client_app import TRACE_ENV
from qfl.simulations.models import build_model
from qfl.simulations.server_app import flwr_version
from qfl.simulations.superlink import fleet_transport, list_tagged_processes
from qfl.spec import Policy
from qfl_deploy.deploy import FLOWER_RUN_FILE, restart_after, run_deployment

pytestmark = pytest.mark.slow

UPLINK = "topk(0.05) | qsgd(levels=15, bucket=512)"
DOWNLINK = "delta | topk(0.2) | qsgd(levels=15)"
MODEL = "cnn"
#: The run config shared by all tests: small data, compressed both ways, every client every round.
CONFIG = {
    "method": "custom",
    "uplink": UPLINK,
    "downlink": DOWNLINK,
    "error-feedback": True,
    "model": MODEL,
    "seed": 42,
    "partitioning": "iid",
    "max-client-samples": 200,
    "test-samples": 500,
    "local-steps": 10,
    "batch-size": 32,
    "lr": 0.05,
    "fraction-train": 1.0,
    "round-timeout": 120.0,
    "min-elements": 1024,
}
MARK_ENV = "QFL_TEST_DEPLOY_MARK"
#: Flower's own bytes per message beyond qfl's payload (protobuf metadata, object tree,
#: object headers and ids, the SuperLink's list of objects to push, the start-up query).
#: qfl sends one container Array per message, so this does not grow with the tensors:
#: measured 1.9-2.5 KB per message on both transports (benchmarks/flower_overhead.py
#: breaks it down), where one Array per tensor cost 7-9 KB for the CNN's 13 tensors.
FLOWER_OVERHEAD_PER_MESSAGE = 4096
QFL_DIR = str(Path(qfl.__file__).parent)
DEPLOY_SCRIPT = str(Path(__file__).parents[1] / "tools" / "deploy.py")


# --------------------------------------------------------------------------- helpers
def marked_processes(mark: str) -> dict[int, str]:
    """Live processes whose environment carries ``MARK_ENV=mark`` (every Flower process of a test)."""
    return list_tagged_processes(mark, var=MARK_ENV)


@pytest.fixture
def mark():
    """A marker for this test's processes; afterwards none may be left (they are killed if so)."""
    value = uuid.uuid4().hex
    yield value
    left = marked_processes(value)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind (killed now): {left}"


def run_cli(args: list[str], env: dict[str, str], timeout: float, interrupt_when=None) -> tuple[int, str]:
    """Run ``python tools/deploy.py`` and return (exit code, output).

    ``interrupt_when()`` is polled while it runs; once true the script gets SIGINT
    (Ctrl-C). The script is killed if it outlives ``timeout``.
    """
    argv = [sys.executable, DEPLOY_SCRIPT, *args]
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    try:
        interrupted = False
        while proc.poll() is None and time.monotonic() < deadline:
            if interrupt_when is not None and not interrupted and interrupt_when():
                proc.send_signal(signal.SIGINT)
                interrupted = True
            time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
        out = proc.communicate()[0]
        assert proc.returncode is not None
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def cli_args(out: Path, nodes: int, rounds: int, *extra: str) -> list[str]:
    # Flower's run-config syntax: values are TOML literals (strings quoted).
    sets = [
        a
        for k, v in CONFIG.items()
        if k != "method"
        for a in ("--set", f"{k}={tomli_w.dumps({k: v}).split('=', 1)[1].strip()}")
    ]
    return [
        "--methods",
        CONFIG["method"],
        "--nodes",
        str(nodes),
        "--rounds",
        str(rounds),
        *sets,
        "--out",
        str(out),
        "--no-report",
        *extra,
    ]


def read_trace(path: Path) -> dict[int, list[dict]]:
    """Trace lines per partition, in time order."""
    lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    by_partition = defaultdict(list)
    for line in sorted(lines, key=lambda x: x["time"]):
        by_partition[int(line["partition_id"])].append(line)
    return dict(by_partition)


def model_sizes() -> dict[str, int]:
    """Byte counts implied by the model and the specs (see the checks below)."""
    state = build_model(MODEL, CONFIG["seed"]).state_dict()
    up = Policy.build(UPLINK, CONFIG["min-elements"])
    down = Policy.build(DOWNLINK.split("|", 1)[1], CONFIG["min-elements"])
    small = [k for k, t in state.items() if up.operator_for(k, t) is IDENTITY]
    large = {k: t.numel() for k, t in state.items() if k not in small}
    assert small and large and all(down.operator_for(k, state[k]) is not IDENTITY for k in large)

    def bound(ratio: float, bucket: int | None) -> int:
        # <= 16 bits per kept entry (index gap + 4-bit level + sign), a float per bucket, a header.
        total = 0
        for n in large.values():
            kept = math.ceil(ratio * n)
            total += 2 * kept + 4 * math.ceil(kept / (bucket or kept)) + 64
        return total

    identity = {k: identity_bytes(t) for k, t in state.items()}
    # The container of a message: every tensor's name and lengths (up to 1 MB: 3 bytes each).
    framing = container_bytes(dict.fromkeys(state, (1 << 20) - 1)) - len(state) * ((1 << 20) - 1)
    return {
        "full": record_bytes(to_record(state)),  # plain Flower: the numpy-serialised model
        "resync": container_bytes(identity),  # every tensor losslessly, with qfl's header, in one container
        "small": sum(identity[k] for k in small),
        "uplink_max": framing + sum(identity[k] for k in small) + bound(0.05, 512),
        "downlink_max": framing + sum(identity[k] for k in small) + bound(0.2, None),
        "elements": sum(t.numel() for t in state.values()),
    }


def check_learning(result: dict) -> None:
    rows = result["rounds"]
    assert rows[0]["round"] == 0 and rows[-1]["round"] == result["config"]["num-server-rounds"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    assert result["runtime"]["qfl"] == QFL_DIR  # the ServerApp ran this checkout's qfl
    assert result["runtime"]["flwr"] == flwr_version()


def check_clean_protocol(result: dict, nodes: int) -> None:
    """Every reply decoded against the model the server sent; full models only at first contact."""
    rows = result["rounds"][1:]
    assert [r["messages"] for r in rows] == [nodes] * len(rows)
    assert [r["replies"] for r in rows] == [nodes] * len(rows)
    assert [r["dropped"] for r in rows] == [0] * len(rows)
    assert [r["failures"] for r in rows] == [0] * len(rows)
    assert [r["resyncs"] for r in rows] == [nodes] + [0] * (len(rows) - 1)


def check_bytes(result: dict, sizes: dict[str, int]) -> dict[str, float]:
    """Payload bytes as the specs imply; returns the per-message figures for the report."""
    rows = result["rounds"][1:]
    first, later = rows[0], [r for r in rows[1:] if r["resyncs"] == 0 and r["failures"] == 0]
    # First contact is a lossless resync for everyone: exactly the identity blobs of every tensor.
    assert first["resyncs"] == first["messages"]
    assert first["downlink_bytes"] == first["messages"] * sizes["resync"]
    assert sizes["resync"] <= sizes["full"]  # qfl's headers are no bigger than numpy's
    up_per_reply, down_per_msg = [], []
    for r in rows:
        ok = r["replies"] - r["failures"] - r["dropped"]
        assert r["uplink_full_bytes"] == ok * sizes["full"]
        assert r["downlink_full_bytes"] == r["messages"] * sizes["full"]
        if ok:
            per = r["uplink_bytes"] / ok
            up_per_reply.append(per)
            # The small tensors travel losslessly (their identity blobs are in every reply); the
            # compressed ones at most 16 bits per kept entry.
            assert sizes["small"] < per <= sizes["uplink_max"], (per, sizes)
            assert per < 0.05 * sizes["full"]
    for r in later:
        per = r["downlink_bytes"] / r["messages"]
        down_per_msg.append(per)
        assert sizes["small"] < per <= sizes["downlink_max"], (per, sizes)
    return {
        "uplink_per_reply": sum(up_per_reply) / len(up_per_reply),
        "downlink_delta_per_message": sum(down_per_msg) / len(down_per_msg) if down_per_msg else float("nan"),
        "full": sizes["full"],
    }


def check_flower_counters(record: dict, result: dict) -> dict[str, float]:
    """Flower's Fleet API counters cover qfl's payloads plus a bounded per-message overhead."""
    nt = record["network_traffic"]
    assert nt is not None, record
    inbound, outbound = int(nt["inbound-bytes"]), int(nt["outbound-bytes"])
    rows = result["rounds"][1:]
    up = sum(r["uplink_bytes"] for r in rows)
    down = sum(r["downlink_bytes"] for r in rows)
    replies = sum(r["replies"] for r in rows)
    messages = sum(r["messages"] for r in rows)
    assert record["qfl"]["uplink_bytes"] == up and record["qfl"]["downlink_bytes"] == down
    assert up <= inbound <= up + replies * FLOWER_OVERHEAD_PER_MESSAGE, (inbound, up, replies)
    # qfl counts a message when it is sent; one that failed (lost with a SuperNode that
    # restarted) or got no reply (still in flight when an asynchronous run ended) may never
    # have been pulled: each may leave out up to the largest round's downlink.
    unanswered = sum(r["messages"] - r["replies"] + r["failures"] for r in rows)
    lost = min(down, unanswered * max(r["downlink_bytes"] for r in rows))
    assert down - lost <= outbound <= down + messages * FLOWER_OVERHEAD_PER_MESSAGE, (outbound, down, lost, messages)
    return {
        "inbound": inbound,
        "qfl_uplink": up,
        "inbound_ratio": inbound / up,
        "inbound_overhead_per_reply": (inbound - up) / replies,
        "outbound": outbound,
        "qfl_downlink": down,
        "outbound_ratio": outbound / down,
        "outbound_overhead_per_message": (outbound - down) / messages,
    }


def check_state_survives(trace: dict[int, list[dict]], rounds: int, nodes: int) -> None:
    """Each message ran in a fresh process, yet replica and error memory carried over."""
    assert sorted(trace) == list(range(nodes)), trace.keys()
    pids = [line["pid"] for lines in trace.values() for line in lines]
    assert len(set(pids)) == len(pids) == rounds * nodes  # one ClientApp process per message
    for lines in trace.values():
        assert all(line["qfl"] == QFL_DIR for line in lines)  # ClientApps ran this checkout's qfl
        assert len({line["node_id"] for line in lines}) == 1
        assert [line["replica_version"] for line in lines] == list(range(1, rounds + 1))
        assert lines[0]["memory_norm"] is None  # no memory before the first update
        assert all(line["memory_norm"] is not None and line["memory_norm"] > 0 for line in lines[1:])
    for version in range(1, rounds + 1):  # every client decoded the same replica
        assert len({lines[version - 1]["replica_digest"] for lines in trace.values()}) == 1


def report(name: str, **figures) -> None:
    text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[deploy] {name} flwr {flwr_version()} ({fleet_transport()}): {text}", flush=True)


# --------------------------------------------------------------------------- tests
def test_script_deploys_compressed_app(tmp_path, mark):
    """``python tools/deploy.py``: 3 SuperNodes, 3 rounds, compressed both ways."""
    nodes, rounds = 3, 3
    out, trace = tmp_path / "out", tmp_path / "trace.jsonl"
    t0 = time.monotonic()
    code, output = run_cli(
        cli_args(out, nodes, rounds, "--show-commands"), {MARK_ENV: mark, TRACE_ENV: str(trace)}, timeout=900
    )
    wall = time.monotonic() - t0
    assert code == 0, output
    result = json.loads((out / "custom.json").read_text())
    record = json.loads((out / FLOWER_RUN_FILE).read_text())
    assert record["ok"] and record["status"] == "finished:completed"
    assert record["transport"] == fleet_transport() and not record["tls"] and not record["auth"]
    supernodes = [c for c in record["commands"] if "flower-supernode" in c]
    assert len(supernodes) == nodes and all("--node-config" in c for c in supernodes)
    assert [n["node_config"] for n in record["supernodes"]] == [
        {"partition-id": i, "num-partitions": nodes} for i in range(nodes)
    ]
    # every --set reached the run: the result records the run config it ran with
    assert all(result["config"][k] == v for k, v in CONFIG.items() if k != "method"), result["config"]
    check_learning(result)
    check_clean_protocol(result, nodes)
    check_state_survives(read_trace(trace), rounds, nodes)
    sizes = model_sizes()
    bytes_ = check_bytes(result, sizes)
    flower = check_flower_counters(record, result)
    assert "qfl: uplink" in output and "Flower Fleet API: inbound" in output
    report(
        "script",
        wall_s=round(wall, 1),
        run_s=record["run_seconds"],
        uplink_per_reply_pct=100 * bytes_["uplink_per_reply"] / sizes["full"],
        downlink_delta_pct=100 * bytes_["downlink_delta_per_message"] / sizes["full"],
        **flower,
    )


def test_tls_auth_refuses_unknown_supernodes(tmp_path, mark):
    """TLS + SuperNode auth: an unregistered and a keyless SuperNode are refused while the
    registered ones run; one of them restarts mid-run (same identity, state lost) and is resynced."""
    # Five rounds: the restarted SuperNode's round-2 message may be lost without an error
    # reply (it times out), so its failure can come in round 3 and its resync in round 4.
    nodes, rounds = 2, 5
    out, trace = tmp_path / "out", tmp_path / "trace.jsonl"
    seen: dict = {}
    restart = restart_after(1, 1, "custom")

    def during(fed, out_dir, done):
        assert fed.tls_files is not None and "--enable-supernode-auth" in fed.superlink.argv
        registered = {n.node_id for n in fed.supernodes}
        seen["ids"] = registered
        intruder = fed.add_supernode(register=False, wait=False)  # a key the SuperLink does not know
        seen["intruder_rc"] = fed.wait_refused(intruder, timeout=90)
        keyless = fed.add_supernode(key=False, wait=False)  # no key at all: a throwaway one
        seen["keyless_rc"] = fed.wait_refused(keyless, timeout=90)
        # The unknown key is refused at activation; the keyless SuperNode tries to register
        # itself, which auth forbids (only `flwr supernode register` may add keys).
        seen["unknown_key_refused"] = "No SuperNode found with the given public key" in fed.superlink.log_text()
        seen["online"] = {int(n["node-id"]) for n in fed.list_supernodes() if n["status"] == "online"}
        restart(fed, out_dir, done)
        seen["after_restart"] = fed.supernodes[1].node_id

    t0 = time.monotonic()
    dep = run_deployment(
        ["custom"],
        {**CONFIG, "num-server-rounds": rounds},
        out,
        nodes=nodes,
        tls=True,
        auth=True,
        timeout=900,
        during=during,
        env={MARK_ENV: mark, TRACE_ENV: str(trace)},
    )
    wall = time.monotonic() - t0
    assert dep.ok, (dep.errors, dep.run.log[-3000:])
    assert seen["intruder_rc"] == 1 and seen["keyless_rc"] == 1 and seen["unknown_key_refused"]
    assert seen["online"] == seen["ids"]  # only the registered SuperNodes ever came online
    assert seen["after_restart"] in seen["ids"]  # the restarted SuperNode kept its registered identity
    record = dep.record
    assert record["tls"] and record["auth"] and record["status"] == "finished:completed"
    assert all("--root-certificates" in c for c in record["commands"] if "flower-supernode" in c)
    result = json.loads((out / "custom.json").read_text())
    check_learning(result)
    rows = result["rounds"][1:]
    # The restarted SuperNode lost its replica: one failed reply (the SuperLink's error for
    # its lost message, or the delta it could not apply; a message lost without an error
    # reply only times out), then a full model, then it trains on. Nothing else fails.
    assert sum(r["failures"] for r in rows) == 1, rows
    assert sum(r["resyncs"] for r in rows) == nodes + 1, rows
    assert rows[0]["resyncs"] == nodes and all(r["dropped"] == 0 for r in rows)
    assert rows[-1]["replies"] == nodes and rows[-1]["failures"] == 0 and rows[-1]["resyncs"] == 0
    lines = read_trace(trace)
    assert sorted(lines) == [0, 1]  # the refused SuperNodes never ran a ClientApp
    victim = lines[1]
    assert len({line["node_id"] for line in victim}) == 1
    after = [line for line in victim if line["time"] > victim[0]["time"] and line["memory_norm"] is None]
    assert after, victim  # after the restart it started from an empty state (no error memory) ...
    assert after[0]["replica_version"] > 1  # ... with a resynced replica
    check_bytes(result, model_sizes())
    flower = check_flower_counters(record, result)
    report("tls+auth", wall_s=round(wall, 1), run_s=record["run_seconds"], **flower)


def test_restarted_supernode_is_resynced(tmp_path, mark):
    """Insecure: a SuperNode restarted after round 1 comes back as a new node and gets a full model."""
    nodes, rounds = 2, 4
    out, trace = tmp_path / "out", tmp_path / "trace.jsonl"
    t0 = time.monotonic()
    dep = run_deployment(
        ["custom"],
        {**CONFIG, "num-server-rounds": rounds},
        out,
        nodes=nodes,
        timeout=900,
        during=restart_after(0, 1, "custom"),
        env={MARK_ENV: mark, TRACE_ENV: str(trace)},
    )
    wall = time.monotonic() - t0
    assert dep.ok, (dep.errors, dep.run.log[-3000:])
    result = json.loads((out / "custom.json").read_text())
    check_learning(result)
    rows = result["rounds"][1:]
    assert dep.record["supernodes"][0]["starts"] == 2
    assert sum(r["resyncs"] for r in rows) == nodes + 1, rows  # the new node once, nobody else again
    assert sum(r["failures"] for r in rows) <= 1, rows  # at most the message the old process had
    assert all(r["dropped"] == 0 for r in rows)
    assert rows[-1]["replies"] == nodes and rows[-1]["failures"] == 0
    lines = read_trace(trace)[0]
    ids = [line["node_id"] for line in lines]
    assert len(set(ids)) == 2, ids  # a new node id after the restart
    new = [line for line in lines if line["node_id"] == ids[-1]]
    assert new[0]["memory_norm"] is None and new[0]["replica_version"] > 1  # empty state, resynced replica
    assert all(line["memory_norm"] is not None for line in new[1:])  # then its memory carries over again
    check_bytes(result, model_sizes())
    flower = check_flower_counters(dep.record, result)
    report("restart", wall_s=round(wall, 1), run_s=dep.record["run_seconds"], **flower)


def test_asynchronous_method_in_a_deployment(tmp_path, mark):
    """AsyncCompressed over a real SuperLink: push/pull instead of rounds, each message in
    a fresh ClientApp process, replicas several versions old caught up by chains of steps."""
    nodes, rounds = 3, 3
    out, trace = tmp_path / "out", tmp_path / "trace.jsonl"
    config = {k: v for k, v in CONFIG.items() if k not in ("method", "uplink", "downlink")}
    t0 = time.monotonic()
    dep = run_deployment(
        ["qsparse_sign_async"],
        {**config, "num-server-rounds": rounds},
        out,
        nodes=nodes,
        timeout=900,
        env={MARK_ENV: mark, TRACE_ENV: str(trace)},
    )
    wall = time.monotonic() - t0
    assert dep.ok, (dep.errors, dep.run.log[-3000:])
    result = json.loads((out / "qsparse_sign_async.json").read_text())
    assert result["async"] is True
    rows = result["rounds"]
    assert rows[0]["round"] == 0 and rows[-1]["round"] > rounds  # server versions, more than the sync rounds
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, [r["loss"] for r in rows]
    trained = rows[1:]
    # Every reply decoded, none refused; a node that trained on an older version got the
    # chain of steps since, so no replica ever disagreed with the server's record (a
    # disagreement is an error reply: a failure).
    assert sum(r["dropped"] + r["failures"] for r in trained) == 0, trained
    assert sum(r["resyncs"] for r in trained) == nodes  # first contact only
    assert sum(r["uplink_bytes"] for r in trained) < 0.05 * sum(r["uplink_full_bytes"] for r in trained)
    lines = read_trace(trace)
    assert sorted(lines) == list(range(nodes))
    pids = [line["pid"] for node in lines.values() for line in node]
    assert len(set(pids)) == len(pids)  # one ClientApp process per message
    for node in lines.values():
        versions = [line["replica_version"] for line in node]
        assert versions == sorted(versions) and versions[-1] > versions[0], versions  # it caught up
        assert all(line["memory_norm"] is not None for line in node[1:])  # error memory carried over
    flower = check_flower_counters(dep.record, result)
    report("async", wall_s=round(wall, 1), run_s=dep.record["run_seconds"], versions=rows[-1]["round"], **flower)


def test_ctrl_c_stops_every_process(tmp_path, mark):
    """Ctrl-C while the app runs: the script stops every Flower process it started and exits 130."""
    out = tmp_path / "out"
    seen: dict[int, str] = {}

    def running() -> bool:  # once a round has begun on the SuperNodes
        seen.update(marked_processes(mark))
        progress = out / "custom.progress.jsonl"
        return (
            progress.exists()
            and bool(progress.read_text().strip())
            and any("flwr-clientapp" in c or "flower-superexec" in c for c in seen.values())
        )

    t0 = time.monotonic()
    code, output = run_cli(cli_args(out, 2, 20), {MARK_ENV: mark}, timeout=600, interrupt_when=running)
    wall = time.monotonic() - t0
    assert code == 130, output
    assert "interrupted" in output
    assert any("flower-superlink" in c for c in seen.values()) and any("flower-supernode" in c for c in seen.values())
    still = {pid: cmd for pid, cmd in seen.items() if pid in marked_processes(mark)}
    assert not still, still
    report("ctrl-c", wall_s=round(wall, 1), processes_seen=len(seen))
