"""Tests for local Flower federations: qfl.simulations.superlink and the harness tools/qfl_deploy.

The ``integration`` and ``slow`` tests start real SuperLink (and SuperNode)
processes from the venv of the running interpreter and run ``tests/apps/probe``
on them; run them with every supported flwr, e.g.::

    .venv/bin/python    -m pytest tests/test_launch.py -m "not unit" -x -q
    .venv139/bin/python -m pytest tests/test_launch.py -m "not unit" -x -q

Every test that starts processes checks afterwards that none of them (nor
their children: superexec, serverapp, clientapp, simulation, Ray) is left.
"""

from __future__ import annotations

import http.client
import importlib.metadata
import json
import shutil
import socket
import ssl
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from flwr.common.config import parse_config_args

from qfl.simulations import flower_cli, superlink
from qfl.simulations.superlink import FederationError, RunFailedError, free_ports, list_tagged_processes
from qfl_deploy.federation import LoopbackFederation, write_supernode_keys, write_tls_files

PROBE = Path(__file__).parent / "apps" / "probe"
BIN_DIR = str(Path(sys.executable).parent)


def per_round_gain(partitions: list[int]) -> float:
    """FedAvg gain of the probe app per round for the given partition ids."""
    return sum((p + 1) ** 2 for p in partitions) / sum(p + 1 for p in partitions)


def _alive(pid: int, cmdline: str | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, still has ``cmdline``."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return cmdline is None or " ".join(proc.cmdline()) == cmdline
    except psutil.Error:
        return False


@pytest.fixture
def federations(tmp_path):
    """Factory for LocalFederations that are always stopped and checked.

    Yields ``make(**kwargs)``; ``make.seen`` collects PIDs observed while the
    test ran so the teardown can prove they are all gone.
    """
    feds: list[LoopbackFederation] = []
    seen: dict[int, str] = {}

    def make(**kwargs) -> LoopbackFederation:
        fed = LoopbackFederation(flwr_home=tmp_path / f"fed{len(feds)}", **kwargs)
        feds.append(fed)
        return fed

    def snapshot() -> None:
        for fed in feds:
            seen.update(fed.pids())

    make.snapshot = snapshot  # type: ignore[attr-defined]
    yield make
    for fed in feds:
        fed.stop()
    left = {fed.tag: list_tagged_processes(fed.tag) for fed in feds}
    assert not any(left.values()), f"processes left behind: {left}"
    still = {pid: cmd for pid, cmd in seen.items() if _alive(pid, cmd)}
    assert not still, f"processes seen during the test still alive: {still}"


def _check_run(res, fed: LoopbackFederation) -> None:
    assert res.ok, (
        f"run failed: rc={res.returncode} timed_out={res.timed_out} "
        f"status={res.status}\n{res.log[-3000:]}\n{fed.dump_logs()}"
    )


def _read_result(path: Path) -> dict:
    assert path.is_file(), f"ServerApp wrote no result file {path}"
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------
# Fast unit tests
# ---------------------------------------------------------------------------


def test_free_ports_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert all(0 < port < 65536 for port in ports)


def test_config_files_roundtrip_through_flwr_parser(tmp_path):
    """Every --*-config reaches Flower as a TOML file: any string survives, quotes included."""
    fed = LoopbackFederation(2, flwr_home=tmp_path)
    cfg = {"partition-id": 3, "lr": 0.01, "flag": False, "path": "/tmp/a b", "q": 'x"y', "r": "it's", "f": 2.0}
    path = fed.config_file("node", cfg)
    assert path.endswith(".toml") and Path(path).is_relative_to(fed.log_dir)
    assert parse_config_args([path]) == cfg


def test_executables_and_transport_match_interpreter():
    for name in ("flwr", "flower-superlink", "flower-supernode"):
        assert superlink.flwr_executable(name).startswith(BIN_DIR)
    with pytest.raises(FileNotFoundError):
        superlink.flwr_executable("no-such-flower-tool")
    major, minor = (int(x) for x in importlib.metadata.version("flwr").split(".")[:2])
    expected = "grpc-rere" if (major, minor) < (1, 40) else "http"
    assert superlink.fleet_transport() == expected


def test_tls_files_handshake(tmp_path):
    files = write_tls_files(tmp_path)
    for p in (files.ca_cert, files.server_cert, files.server_key):
        assert p.is_file()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))
    for hostname in ("localhost", "127.0.0.1"):
        with socket.socket() as lsock:
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(1)
            port = lsock.getsockname()[1]

            def serve(lsock=lsock):
                conn, _ = lsock.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

            th = threading.Thread(target=serve, daemon=True)
            th.start()
            with socket.create_connection(("127.0.0.1", port)) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=hostname) as tls:
                    assert tls.version() is not None
                    tls.sendall(b"x")
            th.join(5)


def test_supernode_keys_are_flwr_loadable(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    keys = write_supernode_keys(tmp_path, "node")
    priv = load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    pub = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_legacy_federations_detection():
    has = flower_cli.has_legacy_federations
    assert not has((PROBE / "pyproject.toml").read_bytes())
    legacy = (
        '[tool.flwr.app]\npublisher = "x"\n\n[tool.flwr.federations]\ndefault = "a"\n\n'
        '[tool.flwr.federations.a]\naddress = "h:1"\n\n[tool.flwr.app.config]\nk = 1\n'
    )
    assert has(legacy.encode())
    stripped = flower_cli.strip_legacy_federations(legacy)
    assert not has(stripped.encode())
    assert stripped == '[tool.flwr.app]\npublisher = "x"\n\n[tool.flwr.app.config]\nk = 1\n'


def test_commands_without_starting(tmp_path):
    fed = LoopbackFederation(3, simulation=True, flwr_home=tmp_path)
    fed.control_port = fed.fleet_port = 4242
    argv = fed.run_command(PROBE, {"num-server-rounds": 1})
    assert argv[:4] == [superlink.flwr_executable("flwr"), "run", str(PROBE), "qfl-local"]
    assert parse_config_args([argv[argv.index("--run-config") + 1]]) == {"num-server-rounds": 1}
    federation = parse_config_args([argv[argv.index("--federation-config") + 1]])
    assert federation == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    assert "--stream" in argv
    sl = fed.superlink_command()
    assert "--simulation" in sl and "--disable-runtime-dependency-installation" in sl
    with pytest.raises(ValueError):
        LoopbackFederation(2, supernode_auth=True)  # auth needs TLS


# ---------------------------------------------------------------------------
# Slow end-to-end tests
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_simulation_run_completes_and_keeps_app_pristine(federations, tmp_path):
    # A copy of the probe app with a legacy [tool.flwr.federations] section:
    # `flwr run` would comment it out in place; run_app must not let it.
    app = tmp_path / "probe-legacy"
    shutil.copytree(PROBE, app, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = app / "pyproject.toml"
    pyproject.write_text(
        pyproject.read_text() + '\n[tool.flwr.federations.legacy]\naddress = "127.0.0.1:1"\ninsecure = true\n'
    )
    before = pyproject.read_bytes()

    fed = federations(num_supernodes=2, simulation=True)
    with fed:
        out = tmp_path / "result.json"
        res = fed.run_app(app, {"result-path": str(out)}, timeout=240)
        federations.snapshot()
        _check_run(res, fed)
        assert "--simulation" in fed.superlink.argv
        assert fed.superlink.argv[0].startswith(BIN_DIR)

    assert pyproject.read_bytes() == before
    result = _read_result(out)
    assert result["num-rounds"] == 2
    assert [m["replies"] for m in result["train-metrics"].values()] == [2, 2]
    assert result["final-mean"] == pytest.approx(2 * per_round_gain([0, 1]), rel=1e-5)
    assert res.status["status"] == "finished:completed"


@pytest.mark.slow
def test_deployment_insecure_two_supernodes(federations, tmp_path):
    fed = federations(num_supernodes=2)
    with fed:
        assert all(n.is_running() and n.node_id for n in fed.supernodes)
        federations.snapshot()
        for pid, cmd in fed.pids().items():
            if "flower-" in cmd or "flwr-" in cmd:
                assert BIN_DIR in cmd, (pid, cmd)
        out = tmp_path / "result.json"
        res = fed.run_app(PROBE, {"result-path": str(out)}, timeout=240)
        federations.snapshot()
        _check_run(res, fed)
        result = _read_result(out)
        assert set(result["node-ids"]) == {n.node_id for n in fed.supernodes}
        assert [m["replies"] for m in result["train-metrics"].values()] == [2, 2]
        assert [m["replies"] for m in result["evaluate-metrics"].values()] == [2, 2]
        assert result["final-mean"] == pytest.approx(2 * per_round_gain([0, 1]), rel=1e-5)
        inbound, outbound = res.traffic
        assert inbound > 0 and outbound > 0

        # A failing ServerApp: the CLI may still exit 0, the run status tells.
        bad = fed.run_app(PROBE, {"min-nodes": "oops"}, timeout=120)
        assert not bad.ok
        with pytest.raises(RunFailedError):
            bad.check()
        if bad.status is not None:
            assert bad.status["status"] == "finished:failed", bad.status

        # A run that exceeds its timeout is killed and stopped on the SuperLink.
        t0 = time.monotonic()
        slow = fed.run_app(PROBE, {"train-delay": 120.0, "fraction-evaluate": 0.0}, timeout=10)
        assert slow.timed_out and not slow.ok
        assert time.monotonic() - t0 < 60
        assert slow.run_id is not None
        status = fed.wait_run_finished(slow.run_id, timeout=30)
        assert status["status"] == "finished:stopped", status
        federations.snapshot()


@pytest.mark.slow
def test_tls_and_supernode_auth(federations, tmp_path):
    fed = federations(num_supernodes=2, tls=True, supernode_auth=True)
    with fed:
        # Everything on the SuperLink port is TLS, verifiable with our CA only.
        ctx = ssl.create_default_context(cafile=str(fed.tls_files.ca_cert))
        with urllib.request.urlopen(f"https://{fed.address}/health", context=ctx) as r:
            assert r.status == 200
        with pytest.raises((OSError, http.client.HTTPException)):  # refused, reset or garbled
            urllib.request.urlopen(f"http://{fed.address}/health", timeout=5).read()
        assert "--enable-supernode-auth" in fed.superlink.argv

        # A SuperNode whose key was never registered is refused.
        intruder = fed.add_supernode(register=False, wait=False)
        assert fed.wait_refused(intruder, timeout=60) == 1
        assert "No SuperNode found with the given public key" in fed.superlink.log_text()
        online = [n for n in fed.list_supernodes() if n["status"] == "online"]
        assert {int(n["node-id"]) for n in online} == {n.node_id for n in fed.supernodes[:2]}

        out = tmp_path / "result.json"
        res = fed.run_app(PROBE, {"result-path": str(out), "fraction-evaluate": 0.0}, timeout=240)
        federations.snapshot()
        _check_run(res, fed)
        result = _read_result(out)
        assert set(result["node-ids"]) == {n.node_id for n in fed.supernodes[:2]}
        assert [m["replies"] for m in result["train-metrics"].values()] == [2, 2]

        # Restarting an authenticated SuperNode keeps its registered identity.
        old_id = fed.supernodes[1].node_id
        fed.restart_supernode(1)
        assert fed.supernodes[1].node_id == old_id


@pytest.mark.slow
def test_supernode_restart_mid_run(federations, tmp_path):
    fed = federations(num_supernodes=2)
    with fed:
        node = fed.supernodes[0]
        old_pid, old_id = node.process.pid, node.node_id
        out = tmp_path / "result.json"
        box: dict = {}
        runner = threading.Thread(
            target=lambda: box.setdefault(
                "res",
                fed.run_app(
                    PROBE,
                    {
                        "result-path": str(out),
                        "train-delay": 4.0,
                        "fraction-evaluate": 0.0,
                        "round-timeout": 30.0,
                    },
                    timeout=240,
                ),
            )
        )
        runner.start()
        try:
            # Round 1 reached SuperNode 0: its ClientApp is sleeping in train().
            node.process.wait_for_log("Start `flwr-clientapp`", timeout=120)
            federations.snapshot()
            fed.restart_supernode(0)
        finally:
            runner.join(300)
        assert not runner.is_alive()
        res = box["res"]
        federations.snapshot()
        _check_run(res, fed)
        assert node.process.pid != old_pid and node.node_id != old_id
        assert not _alive(old_pid)
        result = _read_result(out)
        replies = [m["replies"] for m in result["train-metrics"].values()]
        # Round 1 lost the restarted node's reply; round 2 used the new node.
        assert replies == [1, 2], replies
        assert set(result["node-ids"]) == {n.node_id for n in fed.supernodes}
        assert old_id not in result["node-ids"]
        expected = per_round_gain([1]) + per_round_gain([0, 1])
        assert result["final-mean"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_failed_start_cleans_up(tmp_path):
    """A SuperLink that cannot start raises and leaves nothing running."""
    fed = LoopbackFederation(
        1,
        flwr_home=tmp_path,
        superlink_args=["--no-such-flag"],
        startup_timeout=30,
    )
    with pytest.raises(FederationError, match="SuperLink exited"):
        with fed:
            pass
    assert not list_tagged_processes(fed.tag)
    assert (tmp_path / "tmp" / "superlink.log").is_file()
