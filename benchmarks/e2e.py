"""Large models and many clients, end to end: plain Flower vs qfl in Flower's simulation engine.

``benchmarks/scale.py`` measures qfl's codec on the same models in one process; this
runs the whole thing: ``tests/apps/bigmodel`` (a user's app with qfl in its two places,
``Compressed(...)`` and ``compression_mod``) on a private SuperLink in simulation mode,
each workload once as plain Flower (FedAvg, ``plain = true``) and once with qfl
(``presets.recommended(rounds, clients per round, local steps)``, or ``--uplink``/``--downlink``),
on the same clients, seeds and synthetic data. The app measures in each process
(``tests/apps/bigmodel/bigmodel/measure.py``):

* **round wall time**: the server's ``configure_train`` to the end of ``aggregate_train``;
* **client**: the local training steps (the user's function times them), qfl's work
  before (downlink decode, model rebuild) and after (update compressed with error memory
  and encoded) the user's function, timed by mods around ``compression_mod``;
* **server**: ``aggregate_train`` (qfl: decode + validate + FedAvgM; plain: FedAvg),
  per reply and per 10M parameters;
* **memory**: peak RSS of the server process and of every client process (Ray actors);
* **bytes**: every Array in the messages and replies, counted the same way for both.

Workloads: ``--models resnet18,gpt2`` (ResNet-18, 11.2M parameters, ``--steps`` steps
at batch ``--batch``; a GPT-2-small-shaped decoder, 124M, ``--gpt-steps`` steps at
1 x ``--seq`` tokens; any family of ``tests/apps/bigmodel``'s models, ``mlp`` included,
with sizes, e.g. ``resnet18(width=32)``: ``--steps`` at ``--batch`` but GPT-2's) with
``--clients`` clients for ``--rounds`` rounds; ``--many``:
``--many-clients`` virtual clients (an MLP) at ``--many-fraction`` participation for
``--many-rounds`` rounds -- qfl's per-client overhead, the server's memory over rounds
(qfl's strategy state apart from the contexts Flower's engine keeps for every node in the
server process), and whether clients that skip rounds come back to a correct replica (resyncs, drops and
failures from the strategy's traffic counters; a client whose replica drifted fails the
digest check and is counted). ``--tiny`` shrinks every model and runs one round (two
for ``--many``): a smoke test, not a measurement.

Goals, as ratios measured in this run with PASS/FAIL: client compress+encode <= 10% of
the local training time (ResNet-18); server decode+aggregate <= 50 ms per 10M parameters
per reply. The load average is printed at start and end; above 1 per core the run is
not a verdict. qfl's kernels are compiled into the per-user cache first (``python -m qfl
warm``, as ``tools/setup.sh`` does), so that no client compiles inside a round. Run::

    PYTHONPATH=. python benchmarks/e2e.py --models resnet18,gpt2 --many --out e2e.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from qfl.simulations.processes import tail
from qfl.strategies import Compressed

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "apps" / "bigmodel"
sys.path.insert(0, str(APP))
from bigmodel.measure import commit  # noqa: E402
from bigmodel.models import parse_model, split_models  # noqa: E402  (the app's own model names)

ENCODE_LIMIT = 0.10  # client compress+encode / local training time
SERVER_LIMIT_MS = 50.0  # server decode+aggregate, per reply, per 10M parameters
HISTORY = inspect.signature(Compressed).parameters["history"].default  # the app keeps Compressed's default


def machine() -> str:
    import flwr
    import numba
    import torch

    return (
        f"commit {commit(ROOT)}, {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, numba {numba.__version__}, flwr {flwr.__version__}"
    )


def run(fed, config: dict, nodes: int, out: Path, timeout: float) -> dict:
    """One run's measurements; RuntimeError when a client failed (its figures would be missing)."""
    flower = fed.run_app(
        APP,
        {**config, "result-path": str(out)},
        timeout=timeout,
        federation_config={"num-supernodes": nodes, "client-resources-num-cpus": 1},
    ).check()
    result = json.loads(out.read_text())
    result["rounds"] = [result["rounds"][k] for k in sorted(result["rounds"], key=int)]
    for i, r in enumerate(result["rounds"], 1):
        if r["errors"] or not r["clients"]:
            raise RuntimeError(
                f"{config['model']} ({'plain' if config['plain'] else 'qfl'}), round {i}: {r['errors']} of "
                f"{r['replies']} replies were errors (a client crashed or ran out of memory?); the run's log "
                f"{flower.log_path} ends:\n{tail(_log_lines(flower), 40)}"
            )
    return result


def _log_lines(flower) -> str:
    """The run's log as the file holds it now, blank lines dropped: Flower's simulation
    engine may still append after the CLI returned, and a client's traceback is what a
    reader of the error needs."""
    try:
        text = flower.log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = flower.log
    return "\n".join(line for line in text.splitlines() if line.strip())


def later(result: dict) -> list[dict]:
    """The rounds after the first (which pays the actors' start and first imports), or all."""
    return result["rounds"][1:] or result["rounds"]


def mean(values) -> float:
    values = list(values)
    return statistics.fmean(values) if values else float("nan")


def per10m_ms(result: dict, row: dict) -> float:
    """Server aggregate_train time per reply per 10M parameters, ms."""
    return 1e3 * row["aggregate_s"] / max(row["replies"] - row["errors"], 1) / (result["params"] / 1e7)


def summary(result: dict) -> dict:
    """The figures of one run that the tables and goals read (also written to --out)."""
    rows, rest = result["rounds"], later(result)
    clients = [c for r in rest for c in r["clients"]]
    return {
        "wall_s": mean(r["wall_s"] for r in rest),
        "train_s": mean(c["train-s"] for c in clients),
        "qfl_in_s": mean(c["qfl-in-s"] for c in clients),
        "qfl_out_s": mean(c["qfl-out-s"] for c in clients),
        "encode_ratio": max(c["qfl-out-s"] / c["train-s"] for c in clients),
        "aggregate_ms_per_10m": max(per10m_ms(result, r) for r in rest),
        "up_bytes": mean(r["up_bytes"] for r in rows),
        "down_bytes": mean(r["down_bytes"] for r in rows),
        "server_peak_mb": result["server_peak_rss_mb"],
        "client_peak_mb": max(c["peak-rss-mb"] for r in rows for c in r["clients"]),
    }


def print_rounds(label: str, result: dict, extra=lambda row: "") -> None:
    for i, r in enumerate(result["rounds"], 1):
        cs = r["clients"]
        print(
            f"{label:16} {i:5} {r['wall_s']:8.2f} {len(cs):7} {mean(c['train-s'] for c in cs):8.3f} "
            f"{mean(c['qfl-in-s'] for c in cs):8.3f} {mean(c['qfl-out-s'] for c in cs):9.3f} "
            f"{r['aggregate_s']:8.3f} {per10m_ms(result, r):8.1f} {r['up_bytes']:13,} {r['down_bytes']:13,} "
            f"{r['server_rss_mb']:8.0f} {max((c['peak-rss-mb'] for c in cs), default=0):9.0f}" + extra(r)
        )


ROUND_HEADER = (
    f"{'run':16} {'round':>5} {'wall s':>8} {'clients':>7} {'train s':>8} {'qfl in':>8} {'qfl out':>9} "
    f"{'agg s':>8} {'ms/10M':>8} {'up bytes':>13} {'down bytes':>13} {'srv MB':>8} {'client pk':>9}"
)


def big_models(fed, args, tmp: Path, goals: list) -> dict:
    out = {}
    for name in args.models:
        family = parse_model(name)[0]
        steps = args.gpt_steps if family == "gpt2" else args.steps
        common = {
            "model": name,
            "tiny": args.tiny,
            "num-server-rounds": args.rounds,
            "fraction-train": 1.0,
            "local-steps": steps,
            "batch-size": 1 if family == "gpt2" else args.batch,
            "seq": args.seq,
            "seed": args.seed,
            "uplink": args.uplink or "",
            "downlink": args.downlink or "",
        }
        stem = re.sub(r"[^\w.-]+", "_", name)  # a name with sizes, as a file name
        runs = {
            mode: run(
                fed, {**common, "plain": mode == "plain"}, args.clients, tmp / f"{stem}-{mode}.json", args.timeout
            )
            for mode in ("plain", "qfl")
        }
        figures = {mode: summary(r) for mode, r in runs.items()}
        out[name] = {"runs": runs, "summary": figures}
        params = runs["qfl"]["params"]
        print(
            f"\n## {name}: {params:,} parameters, {args.clients} clients, {args.rounds} rounds, {steps} local steps; "
            f"qfl: {runs['qfl']['compression']}"
        )
        print(ROUND_HEADER)
        for mode, r in runs.items():
            print_rounds(f"{name} {mode}", r)
        p, q = figures["plain"], figures["qfl"]
        print(
            f"wall per round (rounds after the first): plain {p['wall_s']:.2f} s, qfl {q['wall_s']:.2f} s "
            f"= {q['wall_s'] / p['wall_s']:.2f}x; bytes per round: up {p['up_bytes'] / max(q['up_bytes'], 1):.0f}x "
            f"fewer, down {p['down_bytes'] / max(q['down_bytes'], 1):.0f}x fewer; peak RSS server "
            f"{p['server_peak_mb']:.0f} -> {q['server_peak_mb']:.0f} MB, client {p['client_peak_mb']:.0f} -> "
            f"{q['client_peak_mb']:.0f} MB"
        )
        if family == "resnet18":
            goals.append((f"{name}: client compress+encode / {steps} steps' training", q["encode_ratio"], ENCODE_LIMIT))
        goals.append(
            (
                f"{name}: server decode+aggregate, ms per 10M parameters per reply",
                q["aggregate_ms_per_10m"],
                SERVER_LIMIT_MS,
            )
        )
    return out


def many_clients(fed, args, tmp: Path, checks: list) -> dict:
    common = {
        "model": "mlp",
        "tiny": args.tiny,
        "num-server-rounds": args.many_rounds,
        "fraction-train": args.many_fraction,
        "local-steps": args.many_steps,
        "batch-size": 16,
        "seed": args.seed,
        "uplink": args.uplink or "",
        "downlink": args.downlink or "",
    }
    runs = {
        mode: run(fed, {**common, "plain": mode == "plain"}, args.many_clients, tmp / f"many-{mode}.json", args.timeout)
        for mode in ("plain", "qfl")
    }
    figures = {mode: summary(r) for mode, r in runs.items()}
    ours = runs["qfl"]
    print(
        f"\n## many clients: {args.many_clients} virtual clients, {args.many_fraction:g} per round, "
        f"{args.many_rounds} rounds, MLP {ours['params']:,} parameters; qfl: {ours['compression']}"
    )
    print(ROUND_HEADER + f" {'new':>4} {'back':>4}")
    for mode, r in runs.items():
        print_rounds(f"many {mode}", r, lambda row: f" {row['first_contacts']:4} {row['returning']:4}")
    per_round = mean(len(r["clients"]) for r in later(ours))
    overhead = (figures["qfl"]["wall_s"] - figures["plain"]["wall_s"]) / max(per_round, 1)
    print(
        f"qfl per client per round: {1e3 * overhead:.1f} ms of round wall time "
        f"({figures['plain']['wall_s']:.2f} -> {figures['qfl']['wall_s']:.2f} s per round of {per_round:.0f} clients); "
        f"in the client {1e3 * (figures['qfl']['qfl_in_s'] + figures['qfl']['qfl_out_s']):.1f} ms "
        f"(plain Flower's pass-through: {1e3 * (figures['plain']['qfl_in_s'] + figures['plain']['qfl_out_s']):.1f} ms)"
    )
    for mode, r in runs.items():
        print(
            f"server RSS ({mode}): {r['rounds'][0]['server_rss_mb']:.0f} MB after round 1, "
            f"{r['rounds'][-1]['server_rss_mb']:.0f} MB after round {len(r['rounds'])}, "
            f"peak {r['server_peak_rss_mb']:.0f} MB"
        )
    memory = process_memory(runs["plain"], ours)
    print(
        f"server state (qfl's strategy: downlink replica, steps, checkpoint, offers): "
        f"{memory['state_mb'][0]:.2f} MB after round 1, {memory['state_mb'][1]:.2f} MB after round "
        f"{len(ours['rounds'])}; node records {memory['nodes'][0]} -> {memory['nodes'][1]}"
    )
    print(
        f"contexts Flower's simulation engine keeps in the server process: {memory['contacted']} nodes contacted x "
        f"{memory['client_state_kb']:.0f} KB of qfl client state (replica + error memory) = "
        f"{memory['contexts_mb']:.1f} MB; from round 1 on the process grew {memory['growth_mb']:.1f} MB beyond "
        f"plain Flower's growth, for {memory['contexts_growth_mb']:.1f} MB of contexts added "
        f"({memory['growth_per_context']:.2f}x)"
    )
    total, first = ours["total"], sum(r["first_contacts"] for r in ours["rounds"])
    back = sum(r["returning"] for r in ours["rounds"])
    print(
        f"replicas: {first} first contacts, {back} clients back after skipping rounds; resyncs {total['resyncs']} "
        f"(by reason {ours['resyncs']}), dropped {total['dropped']}, failures {total['failures']}, "
        f"missing {sum(r['messages'] - r['replies'] for r in ours['rounds'])}"
    )
    checks.append(
        (
            "many clients: every resync was a first contact, and every client back after skipping rounds "
            "rebuilt the server's replica (no drop, no failed digest, no missing reply)",
            total["resyncs"] == first
            and total["dropped"] == total["failures"] == 0
            and all(r["replies"] == r["messages"] for r in ours["rounds"]),
        )
    )
    return {"runs": runs, "summary": figures, "per_client_overhead_s": overhead, "memory": memory}


def process_memory(plain: dict, ours: dict) -> dict:
    """What the server process holds in the many-clients run, apart: qfl's strategy state
    (bounded by its history, whatever the number of clients) and the contexts Flower's
    simulation engine keeps in the same process for every node it ran, which with qfl
    hold the client state (replica + error memory, reported by each reply) -- memory a
    deployment spreads over its SuperNodes. Their growth from round 1 is set beside the
    process's growth beyond plain Flower's."""
    rounds, MB = ours["rounds"], 1 << 20
    state = ours["total"]["client_state_bytes"]
    contacted = sum(r["first_contacts"] for r in rounds)

    def growth(run):
        return run["rounds"][-1]["server_rss_mb"] - run["rounds"][0]["server_rss_mb"]

    added = (contacted - rounds[0]["first_contacts"]) * state / MB
    beyond = growth(ours) - growth(plain)
    return {
        "state_mb": (rounds[0].get("server_state_bytes", 0) / MB, rounds[-1].get("server_state_bytes", 0) / MB),
        "nodes": (rounds[0].get("server_state_nodes", 0), rounds[-1].get("server_state_nodes", 0)),
        "contacted": contacted,
        "client_state_kb": state / 1024,
        "contexts_mb": contacted * state / MB,
        "growth_mb": beyond,
        "contexts_growth_mb": added,
        "growth_per_context": beyond / added if added > 0 else float("nan"),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="resnet18,gpt2",
        help="comma-separated: resnet18, gpt2, mlp, each with sizes or not, e.g. "
        "'gpt2(layers=24,width=1024,heads=16)'; 'none' for none",
    )
    ap.add_argument("--clients", type=int, default=2, help="clients (all train every round)")
    ap.add_argument("--rounds", type=int, help="rounds per run (default 3; 1 with --tiny)")
    ap.add_argument("--steps", type=int, help="local steps, ResNet-18 (default 20; 2 with --tiny)")
    ap.add_argument("--batch", type=int, help="batch, ResNet-18 (default 32; 4 with --tiny)")
    ap.add_argument("--gpt-steps", type=int, default=2, help="local steps, GPT-2 shape")
    ap.add_argument("--seq", type=int, help="tokens per step, GPT-2 shape (default 64; 16 with --tiny)")
    ap.add_argument("--uplink", help="replaces the recommended uplink spec")
    ap.add_argument("--downlink", help="replaces the recommended downlink spec")
    ap.add_argument("--many", action="store_true", help="also run the many-clients workload")
    ap.add_argument("--many-clients", type=int, help="virtual clients (default 240; 40 with --tiny)")
    ap.add_argument("--many-fraction", type=float, default=0.05, help="clients sampled per round")
    ap.add_argument("--many-rounds", type=int, help="rounds (default 5; 2 with --tiny)")
    ap.add_argument("--many-steps", type=int, default=5, help="local steps per client, MLP")
    ap.add_argument("--tiny", action="store_true", help="shrunk models, 1 round: a smoke test, not a measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    ap.add_argument("--no-warm", action="store_true", help="skip `python -m qfl warm` (clients may compile kernels)")
    ap.add_argument("--out", type=Path, help="write every run's measurements and the summary here (JSON)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    for key, full, small in (
        ("rounds", 3, 1),
        ("steps", 20, 2),
        ("batch", 32, 4),
        ("seq", 64, 16),
        ("many_clients", 240, 40),
        ("many_rounds", 5, 2),
    ):
        if getattr(args, key) is None:
            setattr(args, key, small if tiny else full)
    try:
        args.models = [] if args.models == "none" else split_models(args.models)
    except ValueError as exc:
        ap.error(f"--models: {exc}")
    if not args.models and not args.many:
        ap.error("nothing to run: give --models or --many")
    if min(args.clients, args.rounds, args.steps, args.batch, args.gpt_steps, args.seq, args.many_steps) < 1:
        ap.error("--clients, --rounds, --steps, --batch, --gpt-steps, --seq and --many-steps must be positive")
    if args.many_rounds > HISTORY:
        ap.error(
            f"--many-rounds at most {HISTORY}: a client away longer than Compressed's history ({HISTORY} versions) "
            "is resynced by design, and the replica check counts every resync but first contacts as a fault"
        )
    if args.clients < 2 or args.many_clients < 2 or not 0 < args.many_fraction <= 1:
        ap.error("FedAvg samples at least 2 clients: --clients and --many-clients >= 2, 0 < --many-fraction <= 1")

    from qfl.simulations.superlink import LocalFederation

    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    print(f"# qfl end-to-end scale benchmark{' (--tiny: not a measurement)' if tiny else ''}, {machine()}")
    print(f"# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}", flush=True)
    if not args.no_warm:
        # As after tools/setup.sh: every process then loads qfl's kernels from the cache
        # instead of compiling them (a minute or more per Ray actor, inside round 1).
        warm = subprocess.run([sys.executable, "-m", "qfl", "warm"], capture_output=True, text=True, check=True)
        print(f"# {warm.stdout.strip()}", flush=True)
    goals: list[tuple[str, float, float]] = []
    checks: list[tuple[str, bool]] = []
    results: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as tmp, LocalFederation(simulation=True, num_supernodes=2) as fed:
        if args.models:
            results["models"] = big_models(fed, args, Path(tmp), goals)
        if args.many:
            results["many"] = many_clients(fed, args, Path(tmp), checks)
    load_end = os.getloadavg()
    quiet = max(load_start[0], load_end[0]) <= cores
    print(f"\n# load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    if goals:
        print(
            "goals (worst reply after the first round)"
            + (
                ""
                if quiet and not tiny
                else " -- NOT A VERDICT: " + ("--tiny" if tiny else f"load above 1 per core on {cores} cores")
            )
            + ":"
        )
    for label, value, limit in goals:
        print(
            f"  {label}: {value:.3g} = {value / limit:.2f}x the {limit:g} limit -> "
            + ("PASS" if value <= limit else "FAIL")
        )
    for name, model in results.get("models", {}).items():
        # The goal is absolute; on a small model Flower's own round may miss it too, and a
        # reader of a FAIL needs to know which.
        plain = model["summary"]["plain"]["aggregate_ms_per_10m"]
        print(
            f"  ({name}: plain Flower's aggregate_train in the same run: {plain:.3g} ms per 10M parameters per reply)"
        )
    for label, ok in checks:
        print(f"  {label} -> {'PASS' if ok else 'FAIL'}")
    results.update(
        load={"start": load_start, "end": load_end, "cores": cores, "verdict": quiet and not tiny},
        goals=[{"goal": g, "value": v, "limit": lim, "pass": v <= lim} for g, v, lim in goals],
        checks=[{"check": c, "pass": ok} for c, ok in checks],
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(0 if all(g["pass"] for g in res["goals"]) and all(c["pass"] for c in res["checks"]) else 1)
