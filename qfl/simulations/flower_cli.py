"""Flower's command line as the federation uses it: executables, ports, config files, runs.

Apart from :mod:`qfl.simulations.superlink` (the federation's processes and their
lifecycle) because none of it holds state: which ``flwr`` binaries belong to this
interpreter, free loopback ports, the TOML files every ``--*-config`` option accepts,
the JSON a ``flwr ... --format json`` command prints, the record of one ``flwr run``,
and the copy of an app without the legacy federations section ``flwr run`` would rewrite.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import FederationError, tail

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class RunFailedError(FederationError):
    """``flwr run`` failed, timed out, or the run did not complete."""


def fleet_transport() -> str:
    """``"http"`` (flwr >= 1.40: the SuperLink's main port) or ``"grpc-rere"`` (1.39: a Fleet port of its own).

    Detected by feature, not by version string.
    """
    return "http" if importlib.util.find_spec("flwr.supernode.fleet_http_connection") else "grpc-rere"


def flwr_executable(name: str) -> str:
    """The Flower executable ``name`` of this interpreter's environment."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name!r} not found next to {sys.executable}; is flwr installed in this environment?")
    return str(path)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` now (another process may still take one first)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as stack:  # held open together, so the ports are distinct
        socks = [stack.enter_context(socket.socket(family, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as TOML (the form every Flower ``--*-config`` option accepts as a file)."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(data)), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a CA and of a server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class FlowerRun:
    """What one ``flwr run`` did, as Flower saw it (qfl's own results: :class:`~qfl.simulations.results.RunResult`)."""

    command: list[str]
    returncode: int | None
    log: str
    log_path: Path
    duration: float
    timed_out: bool = False
    run_id: int | None = None
    #: ``flwr ls --run-id`` record: ``status`` ("finished:completed", ...), ``network-traffic``
    #: (bytes), ``compute-time``; ``None`` if unknown.
    status: dict | None = None

    @property
    def ok(self) -> bool:
        """The CLI succeeded and the run finished as ``completed``."""
        if self.timed_out or self.returncode != 0:
            return False
        return self.status is None or self.status.get("status") == "finished:completed"

    @property
    def traffic(self) -> tuple[int, int] | None:
        """``(inbound, outbound)`` Fleet API bytes as the SuperLink counted them."""
        nt = (self.status or {}).get("network-traffic")
        return None if nt is None else (int(nt["inbound-bytes"]), int(nt["outbound-bytes"]))

    def check(self) -> FlowerRun:
        """``self`` if :attr:`ok`, else :class:`RunFailedError` with the end of the log."""
        if not self.ok:
            status = (self.status or {}).get("status")
            raise RunFailedError(
                f"flwr run failed (rc={self.returncode}, timed_out={self.timed_out}, "
                f"status={status}); log {self.log_path}:\n{tail(self.log, 60)}"
            )
        return self


def cli_json(text: str) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed (after any notices)."""
    start = text.find("{")
    while start >= 0:
        with contextlib.suppress(ValueError):
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict):
                return obj
        start = text.find("{", start + 1)
    raise ValueError(f"no JSON object in CLI output: {text[-500:]!r}")


def has_legacy_federations(pyproject: bytes) -> bool:
    """Whether ``flwr run`` would rewrite this pyproject (a ``[tool.flwr.federations]`` section)."""
    try:
        data = tomllib.loads(pyproject.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return True  # let flwr see a copy
    return "federations" in data.get("tool", {}).get("flwr", {})


def strip_legacy_federations(text: str) -> str:
    """The pyproject without ``[tool.flwr.federations]`` (comments do not survive: it is a throwaway copy)."""
    import tomli_w

    data = tomllib.loads(text)
    data.get("tool", {}).get("flwr", {}).pop("federations", None)
    return tomli_w.dumps(data)


@contextlib.contextmanager
def runnable_app(src: Path, pyproject: bytes, dest: Path) -> Iterator[Path]:
    """``src``, or a copy of it without the legacy federations section ``flwr run`` would rewrite in place."""
    if not has_legacy_federations(pyproject):
        yield src
        return
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".venv"))
    try:
        (dest / "pyproject.toml").write_text(strip_legacy_federations(pyproject.decode("utf-8")), encoding="utf-8")
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)
