"""A Flower SuperLink on loopback that runs Flower Apps and leaves no process behind.

What the runner needs to run the simulation app, and what the deployment harness
(``tools/qfl_deploy``, outside the wheel) builds SuperNodes, TLS and authentication on::

    with LocalFederation(num_supernodes=10, simulation=True) as fed:
        run = fed.run_app(app_dir, {"num-server-rounds": 3}).check()

Why it is written this way:

* ``flwr`` never starts anything on its own. A ``:local:`` connection makes ``flwr run``
  spawn a detached SuperLink on the fixed port 39091 that ``uv sync``-s the app's
  dependencies (a multi-GB CUDA torch). We start ``flower-superlink`` with
  ``--disable-runtime-dependency-installation`` and write a *named* connection with an
  explicit address into a private ``$FLWR_HOME/config.toml``; parallel federations then
  do not see each other, and logs stay out of ``~/.flwr``.
* Executables come from the directory of ``sys.executable``, which also goes first on
  ``PATH``: the SuperLink spawns ``flower-superexec``, ``flwr-serverapp`` and
  ``flwr-simulation`` *by name*, so another ``flwr`` on ``PATH`` would mix versions.
* Every config reaches Flower as a TOML file written by ``tomli_w``: ``--run-config``,
  ``--node-config`` and ``--federation-config`` all accept one (``parse_config_args``),
  so no value needs hand-written quoting.
* Cleanup by PID, never by name (:mod:`qfl.simulations.processes`): every process
  started here, and every descendant, carries this federation's tag.
* ``flwr run`` rewrites an app whose ``pyproject.toml`` still has a legacy
  ``[tool.flwr.federations]`` section (``flwr/cli/config_migration.py``), and fails if it
  names no default. :meth:`LocalFederation.run_app` runs such apps from a copy without it.
* Flower's simulation default reserves 2 CPUs per virtual client (one at a time on two
  cores); we ask for 1.

Traffic: ``flwr ls --run-id N --format json`` reports the protobuf bytes the SuperLink's
*Fleet* API handled (``network-traffic``); :meth:`LocalFederation.run_app` attaches that
record to :class:`FlowerRun`. Simulation runs bypass the Fleet API and report 0.

The stateless pieces (executables, ports, TOML files, the CLI's JSON, the run record, the
legacy-federations copy) are in :mod:`qfl.simulations.flower_cli`; this module is the
federation: its processes, their environment and their lifecycle.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .flower_cli import (
    FlowerRun,
    RunFailedError,
    TlsFiles,
    cli_json,
    fleet_transport,
    flwr_executable,
    free_ports,
    runnable_app,
    write_toml,
)
from .processes import (
    TAG_ENV,
    FederationError,
    ManagedProcess,
    list_tagged_processes,
    stop_tagged_processes,
    tail,
)

__all__ = [
    "FederationError",
    "FlowerRun",
    "LocalFederation",
    "ManagedProcess",
    "RunFailedError",
    "TlsFiles",
    "fleet_transport",
    "flwr_executable",
    "free_ports",
    "list_tagged_processes",
    "stop_tagged_processes",
]

# Would make a SuperLink open extra legacy gRPC servers on fixed, non-loopback ports.
_SCRUBBED_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")

# Started and not yet stopped (strong references on purpose): stopped at interpreter exit,
# so a script that forgets ``with``/``stop()`` leaves no SuperLink behind.
_LIVE: set[LocalFederation] = set()


@atexit.register
def _stop_live_federations() -> None:
    for fed in list(_LIVE):
        with contextlib.suppress(Exception):
            fed.stop(grace=2.0)


# --------------------------------------------------------------------------- federation
class LocalFederation:
    """A SuperLink on loopback with a private ``FLWR_HOME``, started and stopped as a unit.

    ``simulation=True``: the SuperLink runs the simulation engine with
    ``num_supernodes`` virtual SuperNodes of ``client_cpus`` CPUs each. Otherwise it
    waits for SuperNodes (``tools/qfl_deploy`` starts them). ``tls`` serves every API
    over TLS with the given certificates. ``flwr_home`` defaults to a temporary
    directory, removed by a clean :meth:`stop` unless ``keep_home``; logs go to
    ``<flwr_home>/tmp``. A federation is one-shot: it cannot start again after :meth:`stop`.
    """

    def __init__(
        self,
        num_supernodes: int = 2,
        *,
        simulation: bool = False,
        tls: TlsFiles | None = None,
        client_cpus: int = 1,
        flwr_home: str | Path | None = None,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        superlink_args: Sequence[str] = (),
        connection_name: str = "qfl-local",
        keep_home: bool = False,
    ) -> None:
        if num_supernodes < 0 or (simulation and num_supernodes < 1):
            raise ValueError(
                f"num_supernodes={num_supernodes}: a simulation needs at least one, a deployment zero or more"
            )
        self.num_supernodes, self.simulation, self.tls_files = num_supernodes, simulation, tls
        self.client_cpus, self.host, self.startup_timeout = client_cpus, host, startup_timeout
        self.extra_env, self.superlink_args = dict(env or {}), list(superlink_args)
        self.connection_name, self.keep_home = connection_name, keep_home
        self.tag = uuid.uuid4().hex
        self.transport = fleet_transport()
        self._own_home = flwr_home is None
        self.flwr_home = Path(flwr_home if flwr_home is not None else tempfile.mkdtemp(prefix="qfl-flwr-")).resolve()
        self.log_dir = self.flwr_home / "tmp"
        self.superlink: ManagedProcess | None = None
        #: Every command run so far, in order.
        self.commands: list[list[str]] = []
        self.control_port: int | None = None
        self.fleet_port: int | None = None
        self._run_numbers = itertools.count(1)
        self._started = self._stopped = self._failed = False

    @property
    def address(self) -> str:
        """``host:port`` of the Control API (what ``flwr`` talks to)."""
        return f"{self._url_host()}:{self.control_port}"

    @property
    def fleet_address(self) -> str:
        """``host:port`` SuperNodes connect to (a port of its own on flwr 1.39)."""
        return f"{self._url_host()}:{self.fleet_port}"

    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    # -- lifecycle
    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:  # type: ignore[no-untyped-def]
        self._failed = self._failed or exc_type is not None
        self.stop()

    def start(self) -> LocalFederation:
        """Start and wait until ready; on failure stop what started, keep the logs and raise."""
        if self._started:
            return self
        self._started = True
        _LIVE.add(self)
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._start()
        except BaseException:
            self._failed = True
            self.stop()
            raise
        return self

    def _start(self) -> None:
        """Ports, connection and SuperLink; subclasses start their SuperNodes after it."""
        separate_fleet = self.transport == "grpc-rere" and not self.simulation
        ports = free_ports(2, self.host)
        self.control_port, self.fleet_port = ports[0], ports[1] if separate_fleet else ports[0]
        connection: dict[str, Any] = {"address": self.address}
        if self.tls_files is not None:
            connection["root-certificates"] = str(self.tls_files.ca_cert)
        else:
            connection["insecure"] = True
        write_toml(
            self.flwr_home / "config.toml",
            {"superlink": {"default": self.connection_name, self.connection_name: connection}},
        )
        self._start_superlink()

    def stop(self, grace: float = 5.0) -> None:
        """Stop every process this federation started; safe to repeat, raises nothing.

        What had to be swept is noted in ``<log_dir>/cleanup.log``.
        """
        _LIVE.discard(self)
        if self._stopped:
            stop_tagged_processes(self.tag, grace=grace)
            return
        self._stopped = True
        notes = self._stop_processes(grace)
        swept = stop_tagged_processes(self.tag, grace=grace)
        if swept:
            notes.append(f"swept tagged pids: {sorted(swept)}")
        if notes and self.log_dir.is_dir():
            with contextlib.suppress(OSError), open(self.log_dir / "cleanup.log", "a", encoding="utf-8") as fh:
                fh.write("\n".join(notes) + "\n")
        if self._own_home and not self.keep_home and not self._failed:
            shutil.rmtree(self.flwr_home, ignore_errors=True)

    def _stop_processes(self, grace: float) -> list[str]:
        """Stop the processes started by name (subclasses: SuperNodes first); notes for the cleanup log."""
        if self.superlink is None:
            return []
        rc = self.superlink.stop(grace)
        return [f"superlink pid={self.superlink.pid} rc={rc}"]

    def pids(self) -> dict[int, str]:
        """``{pid: cmdline}`` of this federation's live processes."""
        return list_tagged_processes(self.tag)

    # -- commands
    def env(self, flwr_home: Path | None = None) -> dict[str, str]:
        """The environment of every Flower process of this federation."""
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(
            {
                "FLWR_HOME": str(flwr_home or self.flwr_home),
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
                TAG_ENV: self.tag,
            }
        )
        env.update(self.extra_env)
        return env

    def spawn(self, name: str, argv: list[str], flwr_home: Path | None = None) -> ManagedProcess:
        """Start ``argv`` as one of this federation's processes, logging to ``<log_dir>/<name>.log``."""
        self.commands.append(argv)
        return ManagedProcess(name, argv, self.log_dir / f"{name}.log", self.env(flwr_home), cwd=self.log_dir)

    def config_file(self, name: str, config: Mapping[str, Any]) -> str:
        """Write a ``--*-config`` TOML file into the log directory (kept with the logs); its path."""
        return str(write_toml(self.log_dir / "config" / f"{name}.toml", config))

    def flwr_cli(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``flwr <args>`` with this environment's CLI and this federation's ``FLWR_HOME``."""
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
        with contextlib.suppress(OSError), open(self.log_dir / "cli.log", "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}[rc={proc.returncode}]\n")
        if check and proc.returncode != 0:
            raise FederationError(f"{shlex.join(argv)} failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def flwr_json(self, *args: str, check: bool = True) -> dict:
        """The JSON object ``flwr <args> --format json`` printed (``ValueError`` if none)."""
        return cli_json(self.flwr_cli(*args, "--format", "json", check=check).stdout)

    def superlink_command(self) -> list[str]:
        """The ``flower-superlink`` argv."""
        argv = [flwr_executable("flower-superlink")]
        if self.tls_files is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(self.tls_files.ca_cert),
                "--ssl-certfile",
                str(self.tls_files.server_cert),
                "--ssl-keyfile",
                str(self.tls_files.server_key),
            ]
        if self.simulation:
            argv.append("--simulation")
        argv += ["--disable-runtime-dependency-installation", "--host", self.host, "--port", str(self.control_port)]
        if self.fleet_port != self.control_port:
            argv += ["--fleet-api-address", self.fleet_address]
        return argv + self.superlink_args

    def _start_superlink(self) -> None:
        self.superlink = self.spawn("superlink", self.superlink_command())
        url = f"{'https' if self.tls_files else 'http'}://{self.address}/health"
        ctx = ssl.create_default_context(cafile=str(self.tls_files.ca_cert)) if self.tls_files else None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not self.superlink.is_running():
                raise FederationError(
                    f"SuperLink exited with code {self.superlink.returncode}:\n{tail(self.superlink.log_text())}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=ctx) as resp:
                    healthy = resp.status == 200
            except (urllib.error.URLError, OSError):
                healthy = False
            if healthy and (self.fleet_port == self.control_port or self._fleet_listening()):
                return
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"SuperLink not healthy at {url} within {self.startup_timeout:.0f}s:\n"
                    f"{tail(self.superlink.log_text())}"
                )
            time.sleep(0.1)

    def _fleet_listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.fleet_port), timeout=0.5):
            return True
        return False

    # -- runs
    def run_command(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
        name: str = "run",
    ) -> list[str]:
        """The ``flwr run`` argv of :meth:`run_app` (config files written under ``name``)."""
        argv = [flwr_executable("flwr"), "run", str(app_dir), self.connection_name]
        if run_config:
            argv += ["--run-config", self.config_file(f"{name}.run", run_config)]
        fed_cfg: dict[str, Any] = {}
        if self.simulation:
            fed_cfg = {"num-supernodes": self.num_supernodes, "client-resources-num-cpus": self.client_cpus}
        fed_cfg.update(federation_config or {})
        if fed_cfg:
            argv += ["--federation-config", self.config_file(f"{name}.federation", fed_cfg)]
        return argv + ["--stream"]

    def run_app(
        self,
        app_dir: str | Path,
        run_config: Mapping[str, Any] | None = None,
        *,
        timeout: float = 600.0,
        federation_config: Mapping[str, Any] | None = None,
        fetch_status: bool = True,
    ) -> FlowerRun:
        """``flwr run <app> --stream`` and wait; the app directory is never modified.

        ``run_config`` overrides ``[tool.flwr.app.config]``. On timeout the CLI is killed
        and the run stopped with ``flwr stop``. With ``fetch_status`` the final
        ``flwr ls --run-id`` record (status, traffic counters) is attached.
        """
        if not self._started or self._stopped:
            raise FederationError("run_app() needs a running federation: start() it first")
        src = Path(app_dir).resolve()
        pyproject = src / "pyproject.toml"
        if not pyproject.is_file():
            raise FileNotFoundError(f"{pyproject} not found")
        name = f"run-{next(self._run_numbers)}"
        original = pyproject.read_bytes()
        with runnable_app(src, original, self.flwr_home / "apps-src" / name) as app:
            argv = self.run_command(app, run_config, federation_config, name)
            t0 = time.monotonic()
            proc = self.spawn(name, argv)
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
        match = re.search(r"Successfully started run (\d+)", text)
        run_id = int(match.group(1)) if match else None
        if timed_out and run_id is not None:
            with contextlib.suppress(Exception):
                self.flwr_cli("stop", str(run_id), self.connection_name, timeout=30, check=False)
        result = FlowerRun(
            command=argv,
            returncode=None if timed_out else proc.returncode,
            log=text,
            log_path=proc.log_path,
            duration=duration,
            timed_out=timed_out,
            run_id=run_id,
        )
        if fetch_status and run_id is not None and not timed_out:
            result.status = self.wait_run_finished(run_id, timeout=30.0)
        return result

    def run_status(self, run_id: int) -> dict | None:
        """The ``flwr ls --run-id <id> --format json`` record of one run."""
        try:
            runs = self.flwr_json("ls", self.connection_name, "--run-id", str(run_id), check=False).get("runs", [])
        except ValueError:
            return None
        return runs[0] if runs else None

    def wait_run_finished(self, run_id: int, timeout: float = 30.0) -> dict | None:
        """:meth:`run_status` once it is ``finished:*`` (or when ``timeout`` s are up)."""
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

    # -- diagnostics
    def dump_logs(self, lines: int = 40) -> str:
        """The last ``lines`` lines of every log, for failure messages."""
        return "\n".join(
            f"===== {p.stem} ({p}) =====\n{tail(p.read_text(errors='replace'), lines)}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def describe(self) -> str:
        """Every command run so far, one per line, as a shell would take it."""
        return "\n".join(shlex.join(argv) for argv in self.commands)
