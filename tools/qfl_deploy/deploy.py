"""Run the simulation app as a real Flower deployment on this machine.

    python tools/deploy.py --nodes 3 --methods qsparse --rounds 5 --out results/deploy
    python tools/deploy.py --nodes 3 --tls --auth --restart 0@2 --out results/deploy

One ``flower-superlink`` and N ``flower-supernode`` processes (SuperNode ``i`` with
``--node-config "partition-id=i num-partitions=N"``) on loopback with free ports and a
private FLWR_HOME, then ``flwr run <app> <connection>`` of the same Flower App the
simulation runs, with the run config built like ``qfl.simulations.runner``'s. Options
``--tls`` (throwaway CA and a server certificate for localhost) and ``--auth``
(SuperNode authentication: each SuperNode's public key is registered with
``flwr supernode register`` before it starts; implies ``--tls``, as Flower requires).
Every process started here is stopped at the end, also on errors and Ctrl-C.

Results: ``<out>/<label>.json`` and ``<label>.progress.jsonl`` per method (as in
simulation), plus ``<out>/flower-run.jsonl``: one line with the run's Flower status,
the SuperLink's Fleet API traffic counters next to qfl's own byte accounting, the
SuperNodes and the exact commands that were run (not named ``*.json`` so that
``python -m qfl.simulations.report <out>`` reads only result files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qfl.simulations.report import human_bytes
from qfl.simulations.runner import Progress, method_health, parse_set, write_app
from qfl.simulations.server_app import flwr_version
from qfl.simulations.settings import Settings

from .federation import LoopbackFederation

#: Name of the file with Flower's view of the run, next to the result files.
FLOWER_RUN_FILE = "flower-run.jsonl"

#: Called in a background thread while the app runs: (federation, results dir, run
#: finished). It must return soon after the event is set.
During = Callable[[Any, Path, threading.Event], None]


@dataclass
class Deployment:
    """What :func:`run_deployment` did."""

    out: Path
    methods: list[str]
    #: label -> result file written
    status: dict[str, bool]
    #: the ``flwr run`` outcome (:class:`qfl.simulations.superlink.FlowerRun`)
    run: Any
    #: the line written to ``flower-run.jsonl``
    record: dict[str, Any]
    #: logs copied to ``<out>/flower-logs`` (failed runs, or ``keep_logs``)
    logs: Path | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The run completed, every method wrote its result and no hook failed."""
        return bool(self.run.ok) and all(self.status.values()) and not self.errors


def _qfl_totals(out: Path, labels: Sequence[str]) -> dict[str, int]:
    """qfl's own accounting summed over the methods' result files (what exists)."""
    keys = (
        "uplink_bytes",
        "downlink_bytes",
        "uplink_full_bytes",
        "downlink_full_bytes",
        "messages",
        "replies",
        "resyncs",
        "dropped",
        "failures",
    )
    totals = dict.fromkeys(keys, 0)
    for label in labels:
        path = out / f"{label}.json"
        if not path.exists():
            continue
        for row in json.loads(path.read_text()).get("rounds", []):
            for key in keys:
                totals[key] += int(row.get(key) or 0)
    return totals


def flower_record(fed: Any, run: Any, out: Path, labels: Sequence[str], wall_time: float) -> dict[str, Any]:
    """Flower's view of one run next to qfl's: the line of ``flower-run.jsonl``.

    Flower's counters (``flwr ls --run-id``: ``network-traffic``) are the protobuf
    sizes the SuperLink's Fleet API handled for the run: requests and replies of the
    message pushes and of the pulls that returned a message (empty polls are not
    counted), and the object bytes of the messages; no HTTP/gRPC/TLS framing.
    ``inbound`` covers qfl's uplink, ``outbound`` its downlink, each plus Flower's own
    per-message overhead.
    """
    qfl = _qfl_totals(out, labels)
    traffic = run.traffic
    record: dict[str, Any] = {
        "run_id": run.run_id,
        "status": (run.status or {}).get("status"),
        "ok": bool(run.ok),
        "timed_out": run.timed_out,
        "flwr": flwr_version(),
        "transport": fed.transport,
        "tls": fed.tls,
        "auth": fed.supernode_auth,
        "methods": list(labels),
        "supernodes": [
            {"index": n.index, "node_id": n.node_id, "starts": n.starts, "node_config": n.node_config}
            for n in fed.supernodes
        ],
        "network_traffic": (run.status or {}).get("network-traffic"),
        "compute_time": (run.status or {}).get("compute-time"),
        "qfl": qfl,
        "run_seconds": round(run.duration, 3),
        "wall_seconds": round(wall_time, 3),
        "commands": fed.describe().splitlines(),
    }
    if traffic is not None:
        inbound, outbound = traffic
        record["flower_vs_qfl"] = {
            "inbound_per_uplink": inbound / qfl["uplink_bytes"] if qfl["uplink_bytes"] else None,
            "outbound_per_downlink": outbound / qfl["downlink_bytes"] if qfl["downlink_bytes"] else None,
        }
    return record


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP raise KeyboardInterrupt once, so that cleanup runs.

    Further signals are ignored until the block is left: a second Ctrl-C must not
    abort the cleanup half-way and leave Flower processes behind.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def interrupt(signum, frame):
        if fired:
            print("   (still stopping the federation)", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise KeyboardInterrupt(f"signal {signum}")

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, interrupt) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def restart_after(node: int, after_round: int, label: str, poll: float = 0.2) -> During:
    """A ``during`` hook: restart SuperNode ``node`` once ``label`` has finished round ``after_round``.

    The restarted SuperNode has lost its ``context.state`` (replica, error memory);
    the server resyncs it with a full model.
    """

    def hook(fed: Any, out: Path, done: threading.Event) -> None:
        progress = out / f"{label}.progress.jsonl"
        while True:
            rounds = []
            if progress.exists():
                for line in progress.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError, KeyError, ValueError):
                        rounds.append(int(json.loads(line)["round"]))
            if rounds and max(rounds) >= after_round:
                break
            if done.wait(poll):
                raise RuntimeError(f"the run ended before round {after_round}: SuperNode {node} was not restarted")
        old = fed.supernodes[node].node_id
        fed.restart_supernode(node)
        print(
            f"  [deploy] restarted SuperNode {node} after round {after_round} "
            f"(node id {old} -> {fed.supernodes[node].node_id})",
            flush=True,
        )

    return hook


def run_deployment(
    methods: Sequence[str],
    common: dict[str, Any],
    out: str | Path,
    *,
    nodes: int = 2,
    tls: bool = False,
    auth: bool = False,
    timeout: float = 3600,
    keep_logs: bool = False,
    during: During | None = None,
    env: dict[str, str] | None = None,
    show_commands: bool = False,
    stream=sys.stdout,
) -> Deployment:
    """Start SuperLink + ``nodes`` SuperNodes, run the methods in one ``flwr run``, stop everything.

    ``common`` is the run config (``num-clients`` is set to ``nodes``); ``timeout`` is
    per method. ``during(fed, out)`` runs in a background thread while the app runs
    (e.g. :func:`restart_after`). ``env`` adds environment variables for every Flower
    process. Raises KeyboardInterrupt after cleaning up if interrupted.
    """
    if auth and not tls:
        raise ValueError("SuperNode authentication needs TLS (Flower's rule): pass tls=True")
    if nodes < 1:
        raise ValueError("a deployment needs at least one SuperNode")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if int(common.get("num-clients", nodes)) != nodes:
        raise ValueError(f"num-clients={common['num-clients']} but {nodes} SuperNodes: they must match")
    rounds = int(common.get("num-server-rounds", Settings.num_server_rounds))
    config = {**common, "num-clients": nodes, "method": ",".join(methods), "label": "", "results-dir": str(out)}
    Settings.from_run_config(config)  # fail fast, before starting anything
    labels = list(methods)
    for label in labels:
        for suffix in (".json", ".progress.jsonl", ".error.txt"):
            (out / f"{label}{suffix}").unlink(missing_ok=True)
    (out / FLOWER_RUN_FILE).unlink(missing_ok=True)

    started = time.perf_counter()
    security = "TLS + SuperNode auth" if auth else ("TLS" if tls else "insecure")
    print(
        f"== deploying {', '.join(labels)}: {rounds} rounds, {nodes} SuperNodes ({security})", file=stream, flush=True
    )
    progress = Progress(out, labels, dict.fromkeys(labels, rounds), stream=stream)
    errors: list[str] = []
    logs: Path | None = None
    # FLWR_HOME (config, installed FABs, logs) lives in a temp dir removed at the end in
    # every case; the logs of a failed run are copied to <out>/flower-logs first.
    with _signals_as_interrupts(), tempfile.TemporaryDirectory(prefix="qfl-deploy-") as tmp:
        fed = LoopbackFederation(
            num_supernodes=nodes, tls=tls, supernode_auth=auth, env=env, flwr_home=Path(tmp) / "flwr"
        )
        failed = True
        try:
            with fed:
                run, status = _run(
                    fed,
                    write_app(Path(tmp) / "app"),
                    config,
                    labels,
                    out,
                    timeout * len(labels),
                    progress,
                    during,
                    errors,
                    show_commands,
                    started,
                    stream,
                )
                record = flower_record(fed, run, out, labels, time.perf_counter() - started)
            failed = not run.ok or not all(status.values()) or bool(errors)
        except KeyboardInterrupt:
            failed = False  # nothing to debug
            raise
        finally:
            if (failed or keep_logs) and fed.log_dir.is_dir():
                logs = out / "flower-logs"
                shutil.copytree(fed.log_dir, logs, dirs_exist_ok=True)
                print(f"   Flower logs: {logs}", file=stream, flush=True)
    record["wall_seconds"] = round(time.perf_counter() - started, 3)
    (out / FLOWER_RUN_FILE).write_text(json.dumps(record) + "\n")
    result = Deployment(out=out, methods=labels, status=status, run=run, record=record, logs=logs, errors=errors)
    _print_summary(result, stream)
    return result


def _run(
    fed: Any,
    app: Path,
    config: dict[str, Any],
    labels: list[str],
    out: Path,
    timeout: float,
    progress: Progress,
    during: During | None,
    errors: list[str],
    show_commands: bool,
    started: float,
    stream,
) -> tuple[Any, dict[str, bool]]:
    """The part of :func:`run_deployment` that runs on a started federation."""
    print(
        f"   SuperLink {fed.address} ({fed.transport}, flwr {flwr_version()}), SuperNodes: "
        + ", ".join(f"{n.index}=node {n.node_id}" for n in fed.supernodes)
        + f" [{time.perf_counter() - started:.0f} s]",
        file=stream,
        flush=True,
    )
    if show_commands:
        print("   " + fed.describe().replace("\n", "\n   "), file=stream, flush=True)
    done = threading.Event()
    hook_thread = None
    if during is not None:

        def call_hook() -> None:
            try:
                during(fed, out, done)
            except Exception as exc:
                errors.append(f"during-run hook failed: {exc}")

        hook_thread = threading.Thread(target=call_hook, daemon=True, name="qfl-deploy-hook")
    progress.start()
    try:
        if hook_thread is not None:
            hook_thread.start()
        run = fed.run_app(app, config, timeout=timeout)
    finally:
        done.set()
        progress.done.set()
        progress.join(5)
        if hook_thread is not None:  # before the federation stops: it may be starting a SuperNode
            hook_thread.join(fed.startup_timeout + 30)
    status = {}
    for label in labels:
        path = out / f"{label}.json"
        problem = "no result file" if not path.exists() else method_health(path)
        if problem:
            errors.append(f"{label}: {problem}")
        status[label] = problem is None
    return run, status


def _print_summary(dep: Deployment, stream) -> None:
    rec, q = dep.record, dep.record["qfl"]
    print(
        f"== finished in {rec['wall_seconds']:.0f} s (run {rec['run_id']}: {rec['status']}): "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in dep.status.items()),
        file=stream,
        flush=True,
    )
    print(
        f"   qfl: uplink {human_bytes(q['uplink_bytes'])} ({q['replies']} replies), downlink "
        f"{human_bytes(q['downlink_bytes'])} ({q['messages']} messages, {q['resyncs']} full), "
        f"{q['dropped']} dropped, {q['failures']} failed",
        file=stream,
        flush=True,
    )
    nt = rec.get("network_traffic")
    if nt:
        ratio = rec["flower_vs_qfl"]

        def times(x):
            return f"x{x:.2f}" if x else "n/a"

        print(
            f"   Flower Fleet API: inbound {human_bytes(nt['inbound-bytes'])} ({times(ratio['inbound_per_uplink'])} "
            f"qfl uplink), outbound {human_bytes(nt['outbound-bytes'])} ({times(ratio['outbound_per_downlink'])} "
            "qfl downlink)",
            file=stream,
            flush=True,
        )
    for err in dep.errors:
        print(f"   {err}", file=stream, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code (130 when interrupted)."""
    p = argparse.ArgumentParser(
        prog="python tools/deploy.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--methods", default="qsparse", help="comma-separated presets (and/or 'custom')")
    p.add_argument("--nodes", type=int, default=2, help="SuperNodes to start (= num-clients)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of clients per round")
    p.add_argument("--local-steps", type=int, default=Settings.local_steps)
    p.add_argument("--alpha", type=float, default=Settings.alpha, help="Dirichlet concentration")
    p.add_argument("--partitioning", default=Settings.partitioning)
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run-config key, in flwr run's --run-config syntax (quote strings)",
    )
    p.add_argument("--tls", action="store_true", help="TLS with a throwaway CA for localhost")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies --tls)")
    p.add_argument("--restart", metavar="NODE@ROUND", help="restart SuperNode NODE after round ROUND (first method)")
    p.add_argument("--out", default="results/deploy", help="directory for results")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per method")
    p.add_argument("--keep-logs", action="store_true", help="copy Flower's logs to <out>/flower-logs")
    p.add_argument("--show-commands", action="store_true", help="print the Flower commands as they are run")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        extra = parse_set(args.set)
    except ValueError as exc:
        p.error(str(exc))
    common = {
        "num-server-rounds": args.rounds,
        "num-clients": args.nodes,
        "fraction-train": args.fraction,
        "local-steps": args.local_steps,
        "alpha": args.alpha,
        "partitioning": args.partitioning,
        "seed": args.seed,
        **extra,
    }
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    during = None
    if args.restart:
        node, sep, after = args.restart.partition("@")
        if not sep or not node.isdigit() or not after.isdigit() or int(node) >= args.nodes:
            p.error(f"--restart expects NODE@ROUND with NODE < {args.nodes}, got {args.restart!r}")
        during = restart_after(int(node), int(after), methods[0])
    try:
        dep = run_deployment(
            methods,
            common,
            args.out,
            nodes=args.nodes,
            tls=args.tls or args.auth,
            auth=args.auth,
            timeout=args.timeout,
            keep_logs=args.keep_logs,
            during=during,
            show_commands=args.show_commands,
        )
    except KeyboardInterrupt:
        print("== interrupted: every process started was stopped", file=sys.stderr, flush=True)
        return 130
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.no_report and any(dep.status.values()):
        from qfl.simulations.report import write_report

        report = write_report(dep.out, baseline="fedavg" if "fedavg" in methods else methods[0])
        print(f"== report: {report}", flush=True)
    if not dep.ok:
        if dep.run.log:
            (dep.out / "run.log").write_text(dep.run.log)
        print(f"== failed: see {dep.out / 'run.log'}" + (f" and {dep.logs}" if dep.logs else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
