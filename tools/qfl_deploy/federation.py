"""A SuperLink plus N ``flower-supernode`` processes on loopback, optionally with TLS and SuperNode auth.

    with LoopbackFederation(num_supernodes=2, tls=True, supernode_auth=True) as fed:
        fed.run_app("tests/apps/probe", {"num-server-rounds": 3}).check()
        fed.restart_supernode(0)

Differences between flwr 1.39 and 1.41 handled here and in :mod:`qfl.simulations.superlink`
(checked against the installed sources; the ``flwr`` CLI is identical in both):

* Fleet transport. 1.39 SuperNodes speak gRPC-rere to a *separate* Fleet server of the
  SuperLink (``--fleet-api-address``, by default ``0.0.0.0:9092``: reachable from the
  network and shared between federations), so it is pinned to a free loopback port.
  From 1.40 the Fleet API is HTTP on the SuperLink's single ``--host/--port``.
* SuperNode authentication is the same on both: ``--enable-supernode-auth`` (requires
  TLS) on the SuperLink, ``flwr supernode register <pubkey> <connection>`` per SuperNode
  and ``--auth-supernode-private-key`` (an EC key in OpenSSH format) on the SuperNode.
  An unregistered SuperNode is refused at activation: the SuperLink logs ``ApiError:2004
  ... No SuperNode found with the given public key``, the SuperNode logs ``Exit Code:
  305`` and exits with status 1.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfl.simulations.superlink import (
    FederationError,
    LocalFederation,
    ManagedProcess,
    TlsFiles,
    flwr_executable,
    free_ports,
)

#: What a SuperNode logs when the SuperLink refuses it (flwr ExitCode 305; the process exits with 1).
REFUSED_LOG_RE = re.compile(r"Exit Code: 305")
_NODE_ID_RE = re.compile(r"SuperNode ID: (\d+)")


def write_tls_files(directory: str | Path, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1")) -> TlsFiles:
    """A throwaway CA (``ca.crt``) and a server certificate for ``hosts`` (``server.pem``, ``server.key``).

    Loopback tests only: the keys are not encrypted.
    """
    import trustme

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="qfl test CA")
    server = ca.issue_cert(*hosts)
    files = TlsFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    ca.cert_pem.write_to_path(str(files.ca_cert))
    server.cert_chain_pems[0].write_to_path(str(files.server_cert))
    _write_private(files.server_key, server.private_key_pem.bytes())
    return files


@dataclass(frozen=True)
class NodeKeys:
    """The OpenSSH-format EC key pair identifying one SuperNode."""

    private_key: Path
    public_key: Path


def write_supernode_keys(directory: str | Path, name: str) -> NodeKeys:
    """An EC P-384 key pair ``<name>`` / ``<name>.pub`` in the OpenSSH format Flower expects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out / name, out / f"{name}.pub")
    _write_private(
        keys.private_key,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return keys


def _write_private(path: Path, data: bytes) -> None:
    """Write a key readable by its owner only (ssh refuses others, and so should we)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass
class SuperNodeHandle:
    """One SuperNode slot: it survives restarts of its process."""

    index: int
    node_config: dict[str, Any]
    runtime_port: int
    keys: NodeKeys | None = None
    registered: bool = False
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None
    node_id: int | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        """``supernode-<index>``."""
        return f"supernode-{self.index}"

    def is_running(self) -> bool:
        """True while the current process is alive."""
        return self.process is not None and self.process.is_running()


class LoopbackFederation(LocalFederation):
    """A deployment-mode SuperLink and ``num_supernodes`` SuperNodes (or a simulation, as the base class).

    SuperNode ``i`` gets ``--node-config`` ``partition-id=i num-partitions=N`` plus
    ``node_config``. ``tls=True`` writes a throwaway CA (:func:`write_tls_files`) that
    SuperNodes and the CLI trust; ``supernode_auth=True`` (needs TLS) gives each
    SuperNode a key pair registered with ``flwr supernode register`` before it starts.
    """

    def __init__(
        self,
        num_supernodes: int = 2,
        *,
        tls: bool = False,
        supernode_auth: bool = False,
        node_config: Mapping[str, Any] | None = None,
        supernode_args: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        if supernode_auth and not tls:
            raise ValueError("SuperNode authentication requires tls=True (Flower's rule)")
        super().__init__(num_supernodes, **kwargs)
        self.tls, self.supernode_auth = tls, supernode_auth
        self.node_config, self.supernode_args = dict(node_config or {}), list(supernode_args)
        self.supernodes: list[SuperNodeHandle] = []

    def _start(self) -> None:
        if self.tls:
            hosts = dict.fromkeys(("localhost", "127.0.0.1", "::1", self.host))
            self.tls_files = write_tls_files(self.flwr_home / "tls", hosts=tuple(hosts))
        if self.supernode_auth:
            self.superlink_args = ["--enable-supernode-auth", *self.superlink_args]
        super()._start()
        if self.simulation:
            return
        for _ in range(self.num_supernodes):
            self.add_supernode(wait=False)
        for node in self.supernodes:
            self._wait_supernode(node)

    def _stop_processes(self, grace: float) -> list[str]:
        notes = []
        for node in self.supernodes:
            if node.process is not None:
                notes.append(f"{node.name} pid={node.process.pid} rc={node.process.stop(grace)}")
        return notes + super()._stop_processes(grace)

    # -- SuperNodes
    def supernode_command(self, node: SuperNodeHandle) -> list[str]:
        """The ``flower-supernode`` argv of ``node``."""
        argv = [flwr_executable("flower-supernode")]
        argv += ["--insecure"] if self.tls_files is None else ["--root-certificates", str(self.tls_files.ca_cert)]
        argv += [
            "--superlink",
            self.fleet_address,
            "--host",
            self.host,
            "--port",
            str(node.runtime_port),
            "--node-config",
            self.config_file(f"{node.name}.node", node.node_config),
        ]
        if node.keys is not None:
            argv += ["--auth-supernode-private-key", str(node.keys.private_key)]
        return argv + self.supernode_args + node.extra_args

    def register_supernode(self, public_key: str | Path) -> str:
        """``flwr supernode register <public_key>``; its output."""
        return self.flwr_cli("supernode", "register", str(public_key), self.connection_name).stdout

    def _spawn_supernode(self, node: SuperNodeHandle) -> None:
        node.starts += 1
        node.node_id = None
        suffix = "" if node.starts == 1 else f".{node.starts - 1}"
        node.process = self.spawn(
            f"{node.name}{suffix}", self.supernode_command(node), flwr_home=self.flwr_home / node.name
        )  # SuperNodes install FABs non-atomically

    def _wait_supernode(self, node: SuperNodeHandle, timeout: float | None = None) -> None:
        assert node.process is not None
        node.node_id = int(node.process.wait_for_log(_NODE_ID_RE.pattern, timeout or self.startup_timeout).group(1))

    def add_supernode(
        self,
        node_config: Mapping[str, Any] | None = None,
        *,
        register: bool = True,
        key: bool = True,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> SuperNodeHandle:
        """Start one more SuperNode.

        With SuperNode auth, ``register=False`` gives it a key the SuperLink does not
        know, ``key=False`` no ``--auth-supernode-private-key`` at all (it then signs with
        a throwaway key of its own); with ``wait=False``, :meth:`wait_refused` observes
        the refusal.
        """
        if self.simulation:
            raise FederationError("add_supernode() needs a deployment, not a simulation")
        if not self._started:
            raise FederationError("start() the federation first")
        index = len(self.supernodes)
        config = (
            dict(node_config)
            if node_config is not None
            else {"partition-id": index, "num-partitions": self.num_supernodes, **self.node_config}
        )
        taken = {n.runtime_port for n in self.supernodes}  # a stopped SuperNode's port comes back on restart
        port = next(p for p in free_ports(len(taken) + 1, self.host) if p not in taken)
        node = SuperNodeHandle(index=index, node_config=config, runtime_port=port, extra_args=list(extra_args))
        self.supernodes.append(node)
        if key and self.supernode_auth:
            node.keys = write_supernode_keys(self.flwr_home / "keys", node.name)
            if register:
                self.register_supernode(node.keys.public_key)
                node.registered = True
        self._spawn_supernode(node)
        if wait:
            self._wait_supernode(node)
        return node

    def wait_refused(self, node: SuperNodeHandle, timeout: float = 60.0) -> int:
        """The exit status (1) of ``node`` once the SuperLink refused it.

        Raises :class:`FederationError` if it was accepted, exited for another reason or
        still runs after ``timeout`` s.
        """
        assert node.process is not None
        try:
            rc = node.process.wait(timeout)
        except subprocess.TimeoutExpired as err:
            raise FederationError(
                f"{node.name} still running after {timeout:.0f}s:\n{node.process.log_tail()}"
            ) from err
        text = node.process.log_text()
        if _NODE_ID_RE.search(text):
            raise FederationError(f"{node.name} was accepted before it exited")
        if rc == 0 or not REFUSED_LOG_RE.search(text):
            raise FederationError(
                f"{node.name} exited with {rc} but not because it was refused:\n{node.process.log_tail()}"
            )
        return rc

    def stop_supernode(self, index: int, grace: float = 5.0) -> int | None:
        """Stop SuperNode ``index`` with its SuperExec and ClientApps; its exit code. The rest keeps running."""
        process = self.supernodes[index].process
        return None if process is None else process.stop(grace)

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
        """Stop and start SuperNode ``index``: a new PID, empty in-memory state and, without auth, a new node id.

        With auth the id belongs to the registered key. Messages the old process had in
        flight come back to the ServerApp as failures.
        """
        self.stop_supernode(index, grace)
        return self.start_supernode(index)

    def list_supernodes(self) -> list[dict]:
        """``flwr supernode ls --format json``: one dict per node."""
        return self.flwr_json("supernode", "ls", self.connection_name)["nodes"]
