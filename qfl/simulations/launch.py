"""Start and stop local Flower federations for tests, scripts and users.

A :class:`LocalFederation` starts, on loopback with free ports and a private
``FLWR_HOME``, either a SuperLink in simulation mode or a SuperLink in
deployment mode plus N ``flower-supernode`` processes (optionally with TLS and
SuperNode authentication), runs Flower Apps on it with ``flwr run`` and stops
every process it caused to exist. It is app-agnostic: nothing here knows about
qfl's strategies.

Quick start::

    from qfl.simulations.launch import LocalFederation

    with LocalFederation(num_supernodes=2) as fed:            # deployment
        res = fed.run_app("examples/app", {"num-server-rounds": 3}, timeout=600)
        res.check()                  # raises RunFailedError (with logs) if not ok
        print(res.status["network-traffic"])      # bytes seen by the Fleet API

    with LocalFederation(num_supernodes=10, simulation=True) as fed:
        fed.run_app("examples/app").check()

Design decisions (the *why*):

* Never let ``flwr`` start things on its own. A connection whose address is the
  ``:local:`` magic value makes ``flwr run`` spawn a detached SuperLink on the
  fixed port 39091 that ``uv sync``-s the app's dependencies into a fresh env
  (downloading CUDA torch). We start ``flower-superlink`` ourselves with
  ``--disable-runtime-dependency-installation`` and write a *named* connection
  with an explicit address into ``$FLWR_HOME/config.toml``.
* Private ``FLWR_HOME`` (temp dir unless given): the CLI connection file, the
  installed FABs and all logs (``$FLWR_HOME/tmp``) stay out of ``~/.flwr`` and
  parallel federations do not see each other. Each SuperNode gets its own
  ``FLWR_HOME`` sub-directory because SuperNodes install FABs into
  ``$FLWR_HOME/apps`` non-atomically. ``FLWR_DISABLE_UPDATE_CHECK=1`` and
  ``FLWR_TELEMETRY_ENABLED=0`` keep the processes off the network.
* Executables come from the directory of ``sys.executable`` and that directory
  is put first on ``PATH``: the SuperLink/SuperNode spawn ``flower-superexec``,
  ``flwr-serverapp``, ``flwr-clientapp`` and ``flwr-simulation`` *by name*, so a
  different ``flwr`` earlier on ``PATH`` would silently mix versions.
* Cleanup by PID, never by name. Every process we start runs in its own session
  (``start_new_session=True``) and carries a unique ``QFL_LAUNCH_TAG`` in its
  environment. Stopping a process signals its group and the descendants
  snapshotted just before; stopping a federation then sweeps ``/proc`` for
  anything still carrying the tag. Groups alone are not enough: the SuperLink
  starts ``flower-superexec`` (parent of ``flwr-serverapp``/``flwr-simulation``)
  in a *new* session, and orphans get re-parented away from the tree.
* ``flwr run`` mutates the app: if ``pyproject.toml`` still has a legacy
  ``[tool.flwr.federations]`` section, it migrates it into
  ``$FLWR_HOME/config.toml`` and rewrites ``pyproject.toml`` with that section
  commented out (``flwr/cli/config_migration.py``, same in 1.39 and 1.41).
  It also fails outright if that section declares no default federation.
  :meth:`LocalFederation.run_app` therefore runs such apps from a temporary
  copy without that section and, as a second line of defence, restores
  ``pyproject.toml`` if it changed anyway.
* Simulation defaults give every virtual client 2 CPUs, i.e. one at a time on
  a 2-core machine; we pass ``--federation-config "num-supernodes=N
  client-resources-num-cpus=1"`` (option names are the ``SimulationConfig``
  proto fields with ``_`` -> ``-``, identical in 1.39 and 1.41).

Differences between flwr 1.39 and 1.41 handled here (checked against the
installed sources; the ``flwr`` CLI package itself is identical in both):

* Fleet transport. 1.39 SuperNodes speak gRPC-rere to a *separate* Fleet gRPC
  server of the SuperLink (``--fleet-api-address``, default ``0.0.0.0:9092``:
  reachable from the network and colliding between federations), so we pin it
  to a free loopback port and point ``flower-supernode --superlink`` at it.
  From 1.40 the Fleet API is HTTP, served on the SuperLink's single
  ``--host/--port`` together with the Control and Runtime APIs;
  ``--fleet-api-address`` is deprecated and SuperNodes must point at that
  port. Detected by feature (``flwr.supernode.fleet_http_connection``), not by
  version string.
* Everything else we use is the same: ``--disable-runtime-dependency-
  installation`` exists on both SuperLinks (SuperNodes never install unless
  ``--allow-runtime-dependency-installation``); SuperNode authentication is
  ``--enable-supernode-auth`` (requires TLS) on the SuperLink plus
  ``flwr supernode register <pubkey> <connection>`` per SuperNode and
  ``--auth-supernode-private-key`` on the SuperNode (EC NIST-curve keys in
  OpenSSH format); ``--auth-list-public-keys`` is rejected by both. An
  unregistered SuperNode is refused at activation: the SuperLink logs
  ``ApiError:2004 ... No SuperNode found with the given public key``, the
  SuperNode logs ``Exit Code: 305`` and exits with status 1.

Traffic counters: the SuperLink accumulates, per run, the protobuf payload
sizes its *Fleet* API handled (PullMessages/PushMessages request+reply sizes
plus the object bytes of PullObject/PushObject; no HTTP/gRPC/TLS framing).
``flwr ls --run-id N --format json`` reports them as ``network-traffic``
(``inbound-bytes`` = from SuperNodes, ``outbound-bytes`` = to SuperNodes);
:meth:`LocalFederation.run_app` puts that record into ``RunResult.status``.
Simulation runs do not go through the Fleet API, so they report 0 bytes, and
ServerApp<->SuperLink (Runtime API) traffic is never counted. The simulation
engine's ``VceMetrics`` only accumulates ClientApp runtime, not bytes.
"""

from __future__ import annotations

import contextlib
import atexit
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "ConfigValue",
    "FederationError",
    "LocalFederation",
    "ManagedProcess",
    "NodeKeys",
    "RunFailedError",
    "RunResult",
    "REFUSED_LOG_RE",
    "SuperNodeHandle",
    "TlsFiles",
    "flwr_executable",
    "flwr_version",
    "fleet_transport",
    "format_config",
    "free_port",
    "free_ports",
    "list_tagged_processes",
    "stop_tagged_processes",
    "write_supernode_keys",
    "write_tls_files",
]

ConfigValue = Union[bool, int, float, str]

#: Environment variable carrying the per-federation tag used for cleanup.
TAG_ENV = "QFL_LAUNCH_TAG"

#: What a SuperNode logs when the SuperLink refuses it (flwr ExitCode 305,
#: SUPERNODE_CONNECTION_ERROR; the process itself exits with status 1).
REFUSED_LOG_RE = re.compile(r"Exit Code: 305")

_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID_RE = re.compile(r"Successfully started run (\d+)")
# Env vars that would make a SuperLink open extra legacy gRPC servers on fixed
# (shared, non-loopback) default ports.
_SCRUBBED_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


# Federations started but not yet stopped (strong references on purpose);
# stopped at interpreter exit so a script that forgets `with`/stop() does not
# leave a SuperLink behind.
_LIVE: set[LocalFederation] = set()


@atexit.register
def _stop_live_federations() -> None:
    for fed in list(_LIVE):
        with contextlib.suppress(Exception):
            fed.stop(grace=2.0)


class FederationError(RuntimeError):
    """A Flower process failed to start or behaved unexpectedly."""


class RunFailedError(FederationError):
    """``flwr run`` failed, timed out, or the run did not complete."""


# ---------------------------------------------------------------------------
# Versions, executables, ports
# ---------------------------------------------------------------------------


def flwr_version() -> str:
    """Return the version of the ``flwr`` installed in this interpreter."""
    return importlib.metadata.version("flwr")


def fleet_transport() -> str:
    """Return the Fleet API transport SuperNodes use: ``"http"`` or ``"grpc-rere"``.

    flwr <= 1.39 SuperNodes talk gRPC-rere to a separate Fleet port of the
    SuperLink; flwr >= 1.40 talk HTTP to the SuperLink's main port.
    """
    if importlib.util.find_spec("flwr.supernode.fleet_http_connection") is not None:
        return "http"
    return "grpc-rere"


def flwr_executable(name: str) -> str:
    """Return the path of Flower executable ``name`` next to ``sys.executable``.

    Raises
    ------
    FileNotFoundError
        If the interpreter's bin directory has no such executable.
    """
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r} not found next to {sys.executable}; is flwr installed "
            "in this interpreter's environment?"
        )
    return str(path)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct TCP ports that are currently free on ``host``.

    All sockets are held open until every port is chosen, so the ports are
    distinct; another process may still grab one before it is used (rare).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port(host: str = "127.0.0.1") -> int:
    """Return one currently free TCP port on ``host``."""
    return free_ports(1, host)[0]


def format_config(config: Mapping[str, ConfigValue]) -> str:
    """Render a flat dict as a Flower ``key=value`` config string.

    Values are TOML literals, as ``--run-config``/``--node-config`` expect:
    ``{"a": 1, "b": "x y", "c": True}`` -> ``a=1 b="x y" c=true``.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"Invalid config key {key!r}")
        parts.append(f"{key}={_toml_value(value)}")
    return " ".join(parts)


def _toml_value(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if text in ("inf", "-inf", "nan"):
            return text
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        if '"' not in value and "\\" not in value and "\n" not in value:
            return f'"{value}"'
        if "'" not in value and "\n" not in value:
            return f"'{value}'"  # TOML literal string: no escapes
        raise ValueError(f"Cannot express {value!r} as a Flower config value")
    raise TypeError(f"Unsupported config value type {type(value).__name__}")


# ---------------------------------------------------------------------------
# TLS and SuperNode keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA and a server certificate signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def write_tls_files(
    directory: str | Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    days: int = 7,
) -> TlsFiles:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` to ``directory``.

    The server certificate's subjectAltName covers ``hosts`` (DNS names and
    IP addresses). Meant for loopback tests only: keys are unencrypted.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(minutes=5)
    not_after = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qfl test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / "ca.key", key_pem(ca_key))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(files.server_key, key_pem(server_key))
    return files


@dataclass(frozen=True)
class NodeKeys:
    """OpenSSH-format EC key pair identifying one SuperNode."""

    private_key: Path
    public_key: Path


def write_supernode_keys(directory: str | Path, name: str) -> NodeKeys:
    """Write an EC P-384 key pair ``<name>`` / ``<name>.pub`` (OpenSSH format).

    This is the format ``flower-supernode --auth-supernode-private-key`` and
    ``flwr supernode register`` expect.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / name, out / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return keys


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


# ---------------------------------------------------------------------------
# Process bookkeeping (Linux /proc; degrades to process groups elsewhere)
# ---------------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """Return the /proc state letter of ``pid`` (``None`` if gone/unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
        return data[data.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return None


def _is_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    state = _proc_state(pid)
    if state is not None:
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()  # no /proc: assume alive if signalable


def list_tagged_processes(tag: str) -> dict[int, str]:
    """Return ``{pid: cmdline}`` of live processes whose environment has our tag.

    Every process a :class:`LocalFederation` starts (and, by inheritance, all
    their descendants: superexec, serverapp, clientapp, simulation, Ray
    workers) carries ``QFL_LAUNCH_TAG=<tag>``. Linux only; returns ``{}``
    where ``/proc`` is unavailable.
    """
    needle = f"{TAG_ENV}={tag}".encode()
    found: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    me = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle not in env.split(b"\0"):
            continue
        if not _is_alive(pid):
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "?"
        found[pid] = cmd.strip()
    return found


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until all ``pids`` are gone (or zombies); return those still alive."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while pending:
        pending = {p for p in pending if _is_alive(p)}
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    return pending


def stop_tagged_processes(tag: str, grace: float = 5.0) -> set[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, every live process with ``tag``.

    Returns the PIDs that were found (for logging).
    """
    found = set(list_tagged_processes(tag))
    if not found:
        return found
    _signal_pids(found, signal.SIGTERM)
    left = _wait_gone(found, grace)
    if left:
        _signal_pids(left, signal.SIGKILL)
        _wait_gone(left, 2.0)
    # Processes started while we were busy (e.g. a ClientApp spawned by a
    # SuperExec that was not dead yet): one last KILL round.
    late = set(list_tagged_processes(tag))
    if late:
        _signal_pids(late, signal.SIGKILL)
        _wait_gone(late, 2.0)
    return found | late


class ManagedProcess:
    """A process started in its own session with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str],
        cwd: str | Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.started_at = time.monotonic()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_fh:
            log_fh.write(f"$ {' '.join(self.argv)}\n".encode())
            log_fh.flush()
            # pylint: disable-next=consider-using-with
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """PID (also the process group and session id)."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, or ``None`` while running."""
        return self.popen.poll()

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern``; raise if the process exits first."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log_text())
            if match:
                return match
            if not self.is_running():
                raise FederationError(
                    f"{self.name} exited with code {self.returncode} before "
                    f"logging {regex.pattern!r}:\n{_tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"{self.name} did not log {regex.pattern!r} within {timeout:.0f}s:"
                    f"\n{_tail(self.log_text())}"
                )
            time.sleep(0.1)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; return the exit code (raises ``TimeoutExpired``)."""
        return self.popen.wait(timeout)

    def stop(self, grace: float = 5.0) -> int | None:
        """Stop the process and everything in its process group.

        SIGTERM first (SuperNodes then deactivate themselves at the SuperLink),
        SIGKILL after ``grace`` seconds. Descendants that left the group are
        handled by :func:`stop_tagged_processes`.
        """
        if self.popen.poll() is None:
            family = _descendants(self.pid)
            _signal_group(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(self.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(5.0)
            # Stragglers: group members that ignored SIGTERM (the group id
            # cannot be reused while members exist) and descendants that had
            # left the group (snapshot taken before the leader died).
            _signal_group(self.pid, signal.SIGKILL)
            left = {p for p in family if _is_alive(p)}
            if left:
                _signal_pids(left, signal.SIGKILL)
                _wait_gone(left, 2.0)
        return self.popen.poll()

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, rc={self.returncode})"


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Federation
# ---------------------------------------------------------------------------


@dataclass
class SuperNodeHandle:
    """One SuperNode slot of a deployment federation (survives restarts)."""

    index: int
    node_config: dict[str, ConfigValue]
    runtime_port: int
    keys: NodeKeys | None = None
    registered: bool = False
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None
    node_id: int | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        """Human-readable name (``supernode-<index>``)."""
        return f"supernode-{self.index}"

    def is_running(self) -> bool:
        """True while the current SuperNode process is alive."""
        return self.process is not None and self.process.is_running()


@dataclass
class RunResult:
    """Outcome of :meth:`LocalFederation.run_app`."""

    command: list[str]
    returncode: int | None
    log: str
    log_path: Path
    duration: float
    timed_out: bool = False
    run_id: int | None = None
    #: ``flwr ls --run-id`` record: ``status`` ("finished:completed" ...),
    #: ``network-traffic`` (bytes), ``compute-time`` ... ``None`` if unknown.
    status: dict | None = None

    @property
    def ok(self) -> bool:
        """True if the CLI succeeded and the run finished as ``completed``."""
        if self.timed_out or self.returncode != 0:
            return False
        if self.status is not None:
            return self.status.get("status") == "finished:completed"
        return True

    @property
    def traffic(self) -> tuple[int, int] | None:
        """``(inbound, outbound)`` Fleet-API bytes as seen by the SuperLink."""
        if not self.status or "network-traffic" not in self.status:
            return None
        nt = self.status["network-traffic"]
        return int(nt["inbound-bytes"]), int(nt["outbound-bytes"])

    def check(self) -> RunResult:
        """Return ``self`` if :attr:`ok`, else raise :class:`RunFailedError`."""
        if not self.ok:
            status = self.status.get("status") if self.status else None
            raise RunFailedError(
                f"flwr run failed (rc={self.returncode}, timed_out={self.timed_out}, "
                f"status={status}); log {self.log_path}:\n{_tail(self.log, 60)}"
            )
        return self


class LocalFederation:
    """A local Flower federation on loopback, started and stopped as a unit.

    Parameters
    ----------
    num_supernodes:
        Deployment: number of ``flower-supernode`` processes started with the
        federation; SuperNode ``i`` gets ``--node-config "partition-id=i
        num-partitions=N"`` plus ``node_config``. Simulation: number of
        simulated SuperNodes (sent with every ``flwr run``).
    simulation:
        Start the SuperLink with ``--simulation`` (no SuperNode processes).
    tls:
        Serve all SuperLink APIs over TLS with a throwaway CA
        (:func:`write_tls_files`); SuperNodes and the CLI trust that CA.
    supernode_auth:
        Enable SuperNode authentication (requires ``tls``). Each SuperNode gets
        its own key pair, registered with ``flwr supernode register`` before
        the SuperNode starts.
    node_config:
        Extra ``--node-config`` entries for every SuperNode.
    client_cpus:
        Simulation only: CPUs reserved per virtual client (flwr default is 2).
    flwr_home:
        ``FLWR_HOME`` for all processes; a fresh temp dir if ``None`` (removed
        on a clean :meth:`stop` unless ``keep_home``). Logs go to
        ``<flwr_home>/tmp``.
    host:
        Loopback address to bind and connect to.
    startup_timeout:
        Seconds to wait for the SuperLink and each SuperNode to come up.
    env:
        Extra environment variables for every process.
    superlink_args, supernode_args:
        Extra command-line arguments appended to every SuperLink/SuperNode.
    connection_name:
        Name of the SuperLink connection written to ``$FLWR_HOME/config.toml``.
    keep_home:
        Never delete ``flwr_home``.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        num_supernodes: int = 2,
        *,
        simulation: bool = False,
        tls: bool = False,
        supernode_auth: bool = False,
        node_config: Mapping[str, ConfigValue] | None = None,
        client_cpus: int = 1,
        flwr_home: str | Path | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        superlink_args: Sequence[str] = (),
        supernode_args: Sequence[str] = (),
        connection_name: str = "qfl-local",
        keep_home: bool = False,
    ) -> None:
        if supernode_auth and not tls:
            raise ValueError("SuperNode authentication requires tls=True (flwr rule)")
        if num_supernodes < 0:
            raise ValueError("num_supernodes must be >= 0")
        if simulation and num_supernodes < 1:
            raise ValueError("simulation needs num_supernodes >= 1")
        self.num_supernodes = num_supernodes
        self.simulation = simulation
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.node_config = dict(node_config or {})
        self.client_cpus = client_cpus
        self.host = host
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.superlink_args = list(superlink_args)
        self.supernode_args = list(supernode_args)
        self.connection_name = connection_name
        self.keep_home = keep_home

        self.tag = uuid.uuid4().hex
        self.flwr_version = flwr_version()
        self.transport = fleet_transport()
        self._own_home = flwr_home is None
        self.flwr_home = Path(
            flwr_home if flwr_home is not None else tempfile.mkdtemp(prefix="qfl-flwr-")
        ).resolve()
        self.log_dir = self.flwr_home / "tmp"

        self.tls_files: TlsFiles | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: list[SuperNodeHandle] = []
        #: Every command this federation ran, in order (argv lists).
        self.commands: list[list[str]] = []
        self.control_port: int | None = None
        self.fleet_port: int | None = None
        self._run_numbers = itertools.count(1)
        self._started = False
        self._stopped = False
        self._failed = False

    # -- addresses ----------------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink Control API (what ``flwr`` talks to)."""
        return f"{self._host_for_url()}:{self.control_port}"

    @property
    def fleet_address(self) -> str:
        """``host:port`` SuperNodes connect to (a separate port on flwr 1.39)."""
        return f"{self._host_for_url()}:{self.fleet_port}"

    def _host_for_url(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        if exc_type is not None:
            self._failed = True
        self.stop()

    def start(self) -> LocalFederation:
        """Start the SuperLink and (deployment) all SuperNodes; wait until ready.

        A federation is one-shot: after :meth:`stop` it cannot be started
        again. If starting fails, everything started so far is stopped, the
        logs are kept and :class:`FederationError` is raised.
        """
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        try:
            self._start()
        except BaseException:
            self._failed = True
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.tls_files = write_tls_files(
                self.flwr_home / "tls", hosts=_cert_hosts(self.host)
            )
        ports = free_ports(2 + (0 if self.simulation else self.num_supernodes), self.host)
        self.control_port = ports[0]
        separate_fleet = self.transport == "grpc-rere" and not self.simulation
        self.fleet_port = ports[1] if separate_fleet else ports[0]
        self._write_connection()
        self._start_superlink()
        if not self.simulation:
            for i in range(self.num_supernodes):
                self.supernodes.append(
                    SuperNodeHandle(
                        index=i,
                        node_config={
                            "partition-id": i,
                            "num-partitions": self.num_supernodes,
                            **self.node_config,
                        },
                        runtime_port=ports[2 + i],
                    )
                )
            for node in self.supernodes:
                self._prepare_keys(node, register=True)
                self._spawn_supernode(node)
            for node in self.supernodes:
                self._wait_supernode(node)

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this federation started (SuperNodes first).

        Safe to call repeatedly and after partial starts. Raises nothing; if
        stray processes had to be swept, their PIDs are logged to
        ``<log_dir>/cleanup.log``.
        """
        _LIVE.discard(self)
        if self._stopped:  # second call: only make sure nothing is left
            stop_tagged_processes(self.tag, grace=grace)
            return
        self._stopped = True
        notes: list[str] = []
        for node in self.supernodes:
            if node.process is not None:
                rc = node.process.stop(grace)
                notes.append(f"{node.name} pid={node.process.pid} rc={rc}")
        if self.superlink is not None:
            rc = self.superlink.stop(grace)
            notes.append(f"superlink pid={self.superlink.pid} rc={rc}")
        swept = stop_tagged_processes(self.tag, grace=grace)
        if swept:
            notes.append(f"swept tagged pids: {sorted(swept)}")
        if self.log_dir.is_dir() and notes:
            with contextlib.suppress(OSError):
                with open(self.log_dir / "cleanup.log", "a", encoding="utf-8") as fh:
                    fh.write("\n".join(notes) + "\n")
        if self._own_home and not self.keep_home and not self._failed:
            shutil.rmtree(self.flwr_home, ignore_errors=True)

    def pids(self) -> dict[int, str]:
        """Live processes (``{pid: cmdline}``) belonging to this federation."""
        return list_tagged_processes(self.tag)

    # -- environment and commands --------------------------------------------

    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        """Environment for every Flower process of this federation."""
        env = dict(os.environ)
        for key in _SCRUBBED_ENV:
            env.pop(key, None)
        bin_dir = str(Path(sys.executable).parent)
        env.update(
            {
                "FLWR_HOME": str(flwr_home or self.flwr_home),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
                TAG_ENV: self.tag,
            }
        )
        env.update(self.extra_env)
        return env

    def _spawn(
        self, name: str, argv: list[str], flwr_home: Path | None = None
    ) -> ManagedProcess:
        self.commands.append(argv)
        return ManagedProcess(
            name,
            argv,
            self.log_dir / f"{name}.log",
            self.env(flwr_home),
            cwd=self.log_dir,
        )

    def flwr_cli(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``flwr <args>`` (this venv's CLI, this federation's FLWR_HOME)."""
        argv = [flwr_executable("flwr"), *args]
        self.commands.append(argv)
        proc = subprocess.run(
            argv,
            env=self.env(),
            cwd=self.log_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
        with contextlib.suppress(OSError):
            with open(self.log_dir / "cli.log", "a", encoding="utf-8") as fh:
                fh.write(f"$ {' '.join(argv)}\n{proc.stdout}{proc.stderr}[rc={proc.returncode}]\n")
        if check and proc.returncode != 0:
            raise FederationError(
                f"{' '.join(argv)} failed (rc={proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def _write_connection(self) -> None:
        lines = [
            "[superlink]",
            f'default = "{self.connection_name}"',
            "",
            f'[superlink."{self.connection_name}"]',
            f'address = "{self.address}"',
        ]
        if self.tls_files is not None:
            lines.append(f'root-certificates = "{self.tls_files.ca_cert}"')
        else:
            lines.append("insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _tls_server_args(self) -> list[str]:
        if self.tls_files is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.tls_files.ca_cert),
            "--ssl-certfile",
            str(self.tls_files.server_cert),
            "--ssl-keyfile",
            str(self.tls_files.server_key),
        ]

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` argv for this federation."""
        argv = [flwr_executable("flower-superlink"), *self._tls_server_args()]
        if self.simulation:
            argv.append("--simulation")
        argv += [
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(self.control_port),
        ]
        if self.transport == "grpc-rere" and not self.simulation:
            argv += ["--fleet-api-address", self.fleet_address]
        if self.supernode_auth:
            argv.append("--enable-supernode-auth")
        return argv + self.superlink_args

    def _start_superlink(self) -> None:
        self.superlink = self._spawn("superlink", self.superlink_command())
        deadline = time.monotonic() + self.startup_timeout
        url = f"{'https' if self.tls_files else 'http'}://{self.address}/health"
        ctx = (
            ssl.create_default_context(cafile=str(self.tls_files.ca_cert))
            if self.tls_files
            else None
        )
        while True:
            if not self.superlink.is_running():
                raise FederationError(
                    f"SuperLink exited with code {self.superlink.returncode}:\n"
                    f"{_tail(self.superlink.log_text())}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=ctx) as resp:
                    healthy = resp.status == 200
            except (urllib.error.URLError, OSError):
                healthy = False
            if healthy and (
                self.fleet_port == self.control_port or _port_open(self.host, self.fleet_port)
            ):
                return
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"SuperLink not healthy at {url} within {self.startup_timeout:.0f}s:"
                    f"\n{_tail(self.superlink.log_text())}"
                )
            time.sleep(0.1)

    # -- SuperNodes -----------------------------------------------------------

    def supernode_command(self, node: SuperNodeHandle) -> list[str]:
        """The ``flower-supernode`` argv for ``node``."""
        argv = [flwr_executable("flower-supernode")]
        if self.tls_files is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(self.tls_files.ca_cert)]
        argv += [
            "--superlink",
            self.fleet_address,
            "--host",
            self.host,
            "--port",
            str(node.runtime_port),
            "--node-config",
            format_config(node.node_config),
        ]
        if node.keys is not None:
            argv += ["--auth-supernode-private-key", str(node.keys.private_key)]
        return argv + self.supernode_args + node.extra_args

    def _prepare_keys(self, node: SuperNodeHandle, register: bool) -> None:
        if not self.supernode_auth or node.keys is not None:
            return
        node.keys = write_supernode_keys(self.flwr_home / "keys", node.name)
        if register:
            self.register_supernode(node.keys.public_key)
            node.registered = True

    def register_supernode(self, public_key: str | Path) -> str:
        """Register a SuperNode public key with ``flwr supernode register``."""
        proc = self.flwr_cli(
            "supernode", "register", str(public_key), self.connection_name
        )
        return proc.stdout

    def _spawn_supernode(self, node: SuperNodeHandle) -> None:
        node.starts += 1
        suffix = "" if node.starts == 1 else f".{node.starts - 1}"
        node.node_id = None
        node.process = self._spawn(
            f"{node.name}{suffix}",
            self.supernode_command(node),
            flwr_home=self.flwr_home / node.name,
        )

    def _wait_supernode(self, node: SuperNodeHandle, timeout: float | None = None) -> None:
        assert node.process is not None
        match = node.process.wait_for_log(_NODE_ID_RE, timeout or self.startup_timeout)
        node.node_id = int(match.group(1))

    def add_supernode(
        self,
        node_config: Mapping[str, ConfigValue] | None = None,
        *,
        register: bool = True,
        key: bool = True,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> SuperNodeHandle:
        """Start one more SuperNode (deployment mode only).

        ``node_config`` defaults to ``partition-id=<index>
        num-partitions=<num_supernodes>`` plus the federation's ``node_config``.
        With SuperNode auth, ``register=False`` starts it with a fresh key that
        the SuperLink does not know, and ``key=False`` without
        ``--auth-supernode-private-key`` at all (the SuperNode then signs with a
        throwaway key of its own); use ``wait=False`` and :meth:`wait_refused`
        to observe the refusal.
        """
        if self.simulation:
            raise FederationError("add_supernode() needs a deployment federation")
        if not self._started:
            raise FederationError("start() the federation first")
        index = len(self.supernodes)
        cfg = (
            dict(node_config)
            if node_config is not None
            else {
                "partition-id": index,
                "num-partitions": self.num_supernodes,
                **self.node_config,
            }
        )
        node = SuperNodeHandle(
            index=index,
            node_config=cfg,
            runtime_port=free_port(self.host),
            extra_args=list(extra_args),
        )
        self.supernodes.append(node)
        if key:
            self._prepare_keys(node, register=register)
        self._spawn_supernode(node)
        if wait:
            self._wait_supernode(node)
        return node

    def wait_refused(self, node: SuperNodeHandle, timeout: float = 60.0) -> int:
        """Wait for ``node`` to exit because the SuperLink refused it.

        Returns the exit status (1). Raises :class:`FederationError` if it was
        accepted (logged a SuperNode ID), exited for another reason (no
        ``Exit Code: 305`` in its log) or still runs after ``timeout``.
        """
        assert node.process is not None
        try:
            rc = node.process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise FederationError(
                f"{node.name} still running after {timeout:.0f}s:\n"
                f"{_tail(node.process.log_text())}"
            ) from err
        text = node.process.log_text()
        if _NODE_ID_RE.search(text):
            raise FederationError(f"{node.name} was accepted before it exited")
        if rc == 0 or not REFUSED_LOG_RE.search(text):
            raise FederationError(
                f"{node.name} exited with {rc} but not because it was refused:\n"
                f"{_tail(text)}"
            )
        return rc

    def stop_supernode(self, index: int, grace: float = 5.0) -> int | None:
        """Stop SuperNode ``index`` and its SuperExec/ClientApps; return its exit code.

        The rest of the federation keeps running; :meth:`start_supernode`
        brings the slot back.
        """
        node = self.supernodes[index]
        if node.process is None:
            return None
        return node.process.stop(grace)

    def start_supernode(self, index: int, wait: bool = True) -> SuperNodeHandle:
        """(Re)start SuperNode ``index`` with its original config and key."""
        node = self.supernodes[index]
        if node.is_running():
            raise FederationError(f"{node.name} is already running")
        self._spawn_supernode(node)
        if wait:
            self._wait_supernode(node)
        return node

    def restart_supernode(self, index: int, grace: float = 5.0) -> SuperNodeHandle:
        """Stop and start SuperNode ``index`` with the same node config and key.

        It comes back as a fresh process: new PID, empty in-memory state and,
        without SuperNode auth, a new node ID (with auth the ID belongs to the
        registered public key). Messages the old node had in flight come back
        to the ServerApp as failures.
        """
        self.stop_supernode(index, grace)
        return self.start_supernode(index)

    def list_supernodes(self) -> list[dict]:
        """``flwr supernode ls --format json`` as a list of node dicts."""
        proc = self.flwr_cli(
            "supernode", "ls", self.connection_name, "--format", "json"
        )
        return _cli_json(proc.stdout)["nodes"]

    # -- runs ---------------------------------------------------------------

    def run_command(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, ConfigValue] | str | None = None,
        federation_config: Mapping[str, ConfigValue] | None = None,
        stream: bool = True,
    ) -> list[str]:
        """The ``flwr run`` argv :meth:`run_app` uses (app path as given)."""
        argv = [flwr_executable("flwr"), "run", str(app_dir), self.connection_name]
        if run_config:
            rc = run_config if isinstance(run_config, str) else format_config(run_config)
            argv += ["--run-config", rc]
        fed_cfg: dict[str, ConfigValue] = {}
        if self.simulation:
            fed_cfg = {
                "num-supernodes": self.num_supernodes,
                "client-resources-num-cpus": self.client_cpus,
            }
        fed_cfg.update(federation_config or {})
        if fed_cfg:
            argv += ["--federation-config", format_config(fed_cfg)]
        if stream:
            argv.append("--stream")
        return argv

    def run_app(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, ConfigValue] | str | None = None,
        *,
        timeout: float = 600.0,
        federation_config: Mapping[str, ConfigValue] | None = None,
        fetch_status: bool = True,
    ) -> RunResult:
        """Run a Flower App with ``flwr run ... --stream`` and wait for it.

        ``run_config`` overrides ``[tool.flwr.app.config]`` (dict, or a
        preformatted ``"k=v ..."`` string). In simulation mode
        ``num-supernodes``/``client-resources-num-cpus`` are added to the
        federation config. The app directory is never modified (see module
        docstring). On timeout the CLI is killed and the run is stopped with
        ``flwr stop``. With ``fetch_status`` the final ``flwr ls --run-id``
        record (status, traffic counters) is attached to the result.
        """
        if not self._started:
            raise FederationError("start() the federation first")
        src = Path(app_dir).resolve()
        pyproject = src / "pyproject.toml"
        if not pyproject.is_file():
            raise FileNotFoundError(f"{pyproject} not found")
        name = f"run-{next(self._run_numbers)}"
        original = pyproject.read_bytes()
        with _app_copy_if_needed(src, original, self.flwr_home / "apps-src" / name) as app:
            argv = self.run_command(app, run_config, federation_config)
            log_path = self.log_dir / f"{name}.log"
            t0 = time.monotonic()
            proc = ManagedProcess(name, argv, log_path, self.env(), cwd=self.log_dir)
            self.commands.append(argv)
            timed_out = False
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                proc.stop(grace=2.0)
                if pyproject.read_bytes() != original:  # defence in depth
                    pyproject.write_bytes(original)
            duration = time.monotonic() - t0
        text = proc.log_text()
        match = _RUN_ID_RE.search(text)
        run_id = int(match.group(1)) if match else None
        if timed_out and run_id is not None:
            with contextlib.suppress(Exception):
                self.flwr_cli("stop", str(run_id), self.connection_name, timeout=30, check=False)
        result = RunResult(
            command=argv,
            returncode=None if timed_out else proc.returncode,
            log=text,
            log_path=log_path,
            duration=duration,
            timed_out=timed_out,
            run_id=run_id,
        )
        if fetch_status and run_id is not None and not timed_out:
            result.status = self.wait_run_finished(run_id, timeout=30.0)
        return result

    def run_status(self, run_id: int) -> dict | None:
        """``flwr ls --run-id <id> --format json`` record of one run."""
        proc = self.flwr_cli(
            "ls", self.connection_name, "--run-id", str(run_id), "--format", "json",
            check=False,
        )
        try:
            runs = _cli_json(proc.stdout).get("runs", [])
        except ValueError:
            return None
        return runs[0] if runs else None

    def wait_run_finished(self, run_id: int, timeout: float = 30.0) -> dict | None:
        """Poll :meth:`run_status` until the run is ``finished:*``."""
        deadline = time.monotonic() + timeout
        status = self.run_status(run_id)
        while (
            status is not None
            and not str(status.get("status", "")).startswith("finished")
            and time.monotonic() < deadline
        ):
            time.sleep(0.5)
            status = self.run_status(run_id)
        return status

    # -- diagnostics --------------------------------------------------------

    def logs(self) -> dict[str, Path]:
        """``{name: path}`` of every log file written so far."""
        if not self.log_dir.is_dir():
            return {}
        return {p.stem: p for p in sorted(self.log_dir.glob("*.log"))}

    def dump_logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every log (for failure messages)."""
        out = []
        for name, path in self.logs().items():
            text = path.read_text(encoding="utf-8", errors="replace")
            out.append(f"===== {name} ({path}) =====\n{_tail(text, lines)}")
        return "\n".join(out)

    def describe(self) -> str:
        """Every command run so far, one per line (for READMEs and debugging)."""
        return "\n".join(" ".join(_shell_quote(a) for a in argv) for argv in self.commands)


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def _cert_hosts(host: str) -> tuple[str, ...]:
    hosts = ["localhost", "127.0.0.1", "::1"]
    if host not in hosts:
        hosts.append(host)
    return tuple(hosts)


def _port_open(host: str, port: int | None) -> bool:
    if port is None:
        return False
    with contextlib.suppress(OSError):
        with socket.create_connection((host, port), timeout=0.5):
            return True
    return False


def _descendants(root: int) -> set[int]:
    """PIDs of all live descendants of ``root`` (empty without /proc)."""
    children: dict[int, list[int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return set()
    for entry in proc.iterdir():
        if entry.name.isdigit():
            ppid = _ppid(int(entry.name))
            if ppid is not None:
                children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode(errors="replace")
        return int(data[data.rindex(")") + 2 :].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _cli_json(text: str) -> dict:
    """Parse the JSON document a ``flwr ... --format json`` command printed.

    The CLI may print notices before it, so decode from the first line that
    opens a JSON object.
    """
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("{"):
            with contextlib.suppress(ValueError):
                obj, _ = json.JSONDecoder().raw_decode("".join(lines[i:]).lstrip())
                if isinstance(obj, dict):
                    return obj
    raise ValueError(f"no JSON object in CLI output: {text[-500:]!r}")


def _shell_quote(arg: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:=@%+,-]+", arg):
        return arg
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _has_legacy_federations(pyproject_bytes: bytes) -> bool:
    try:
        data = tomllib.loads(pyproject_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return True  # be safe: let flwr see a copy
    return "federations" in data.get("tool", {}).get("flwr", {})


def _strip_legacy_federations(text: str) -> str:
    """Drop ``[tool.flwr.federations*]`` tables (same section rule as flwr's
    own migration in ``flwr/cli/config_migration.py``)."""
    section = re.compile(r"\s*\[(.*)\]")
    out, skipping = [], False
    for line in text.splitlines(keepends=True):
        if match := section.match(line):
            skipping = match.group(1).strip().strip("[]").startswith(
                "tool.flwr.federations"
            )
        if not skipping:
            out.append(line)
    return "".join(out)


@contextlib.contextmanager
def _app_copy_if_needed(src: Path, pyproject_bytes: bytes, dest: Path) -> Iterator[Path]:
    """Yield the directory to pass to ``flwr run``.

    That is ``src`` itself unless its ``pyproject.toml`` has a legacy
    ``[tool.flwr.federations]`` section: ``flwr run`` would then migrate it
    into ``$FLWR_HOME/config.toml`` (possibly changing the default connection,
    or failing when no default federation is declared) and comment it out in
    place. We run from a temporary copy with that section removed instead;
    the connection we pass makes it irrelevant anyway.
    """
    if not _has_legacy_federations(pyproject_bytes):
        yield src
        return
    shutil.copytree(
        src,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", "__pycache__", "*.pyc", ".venv", ".mypy_cache", ".pytest_cache"
        ),
    )
    try:
        pyproject = dest / "pyproject.toml"
        pyproject.write_text(
            _strip_legacy_federations(pyproject_bytes.decode("utf-8")), encoding="utf-8"
        )
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)
