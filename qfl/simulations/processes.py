"""Processes started by PID and stopped with every descendant, through psutil.

A Flower SuperLink or SuperNode starts further processes (SuperExec, ServerApp,
ClientApps, the simulation and its Ray workers), some in sessions of their own, and
orphans are re-parented out of the tree. So each process we start gets its own session
and carries a tag in its environment, which its descendants inherit; stopping signals
the group and the descendants seen just before, and a sweep by tag catches the rest.
Never by name: other federations on the machine are not ours to stop.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

#: Environment variable carrying the per-federation tag used for cleanup.
TAG_ENV = "QFL_LAUNCH_TAG"


class FederationError(RuntimeError):
    """A Flower process failed to start or behaved unexpectedly."""


def _tagged(tag: str, var: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["environ", "status"]):
        env = proc.info["environ"] or {}  # None where access is denied: not ours
        if proc.pid != me and env.get(var) == tag and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def list_tagged_processes(tag: str, var: str = TAG_ENV) -> dict[int, str]:
    """``{pid: cmdline}`` of the live processes whose environment has ``var=tag``.

    Every process a federation starts carries its tag, and so do their descendants
    (SuperExec, ServerApp, ClientApps, the simulation and its Ray workers).
    """
    out = {}
    for proc in _tagged(tag, var):
        with contextlib.suppress(psutil.Error):
            out[proc.pid] = " ".join(proc.cmdline())
    return out


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after ``timeout`` s.

    Not ``psutil.wait_procs``: it waits until a zombie is reaped, which for a process
    that is not our child is its parent's business; a zombie runs nothing.
    """
    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _kill(procs: Sequence[psutil.Process], grace: float, terminate: bool = True) -> None:
    """SIGTERM (if ``terminate``), then SIGKILL after ``grace`` s, and wait until they are gone."""
    alive = list(procs)
    if terminate:
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        alive = _wait_gone(alive, grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _wait_gone(alive, 2.0)


def stop_tagged_processes(tag: str, grace: float = 5.0, var: str = TAG_ENV) -> set[int]:
    """SIGTERM, then SIGKILL after ``grace`` s, every live process with ``var=tag``; their PIDs."""
    found = _tagged(tag, var)
    _kill(found, grace)
    late = _tagged(tag, var)  # started meanwhile (a ClientApp of a SuperExec not yet dead)
    _kill(late, 0, terminate=False)
    return {p.pid for p in found + late}


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A process in its own session, its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str], cwd: str | Path | None = None
    ) -> None:
        self.name, self.argv, self.log_path = name, list(argv), log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"$ {shlex.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """PID, also the process group and session id."""
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit code, ``None`` while running."""
        return self.popen.poll()

    def is_running(self) -> bool:
        """True until the process exits."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        return tail(self.log_text(), lines)

    def wait_for_log(self, pattern: str, timeout: float) -> Any:
        """The first match of regex ``pattern`` in the log; raises if the process exits or time runs out first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not (match := regex.search(self.log_text())):
            if not self.is_running():
                raise FederationError(
                    f"{self.name} exited with code {self.returncode} before logging "
                    f"{regex.pattern!r}:\n{tail(self.log_text())}"
                )
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"{self.name} did not log {regex.pattern!r} within {timeout:.0f}s:\n{tail(self.log_text())}"
                )
            time.sleep(0.1)
        return match

    def wait(self, timeout: float | None = None) -> int:
        """The exit code once it exits (raises ``subprocess.TimeoutExpired``)."""
        return self.popen.wait(timeout)

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group (SuperNodes then deactivate at the SuperLink), SIGKILL after ``grace`` s.

        Descendants that left the group are taken from a snapshot made before signalling,
        since they are re-parented once their parent dies.
        """
        if self.popen.poll() is None:
            try:
                family = psutil.Process(self.pid).children(recursive=True)
            except psutil.Error:
                family = []
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            # The group id stays reserved while members live: kill those that ignored SIGTERM.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5.0)
            _kill(family, 0, terminate=False)
        return self.popen.poll()

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.pid}, rc={self.returncode})"


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def unwind_on_sigterm() -> None:
    """Make ``kill`` (SIGTERM) unwind the main thread like Ctrl-C.

    Python's default SIGTERM ends the process without running ``with``/``finally``
    blocks, so a script killed mid-run leaves the SuperLink, the simulation and its Ray
    workers that its LocalFederation started running (tens of processes, re-parented to
    init). Scripts that start federations call this first.
    """
    signal.signal(signal.SIGTERM, _interrupt)
