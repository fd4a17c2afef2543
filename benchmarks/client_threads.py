"""Round time in Flower's simulation engine under numba's OpenMP and workqueue layers.

Flower's simulation engine runs the virtual clients as Ray actors on one host; each
trains a PyTorch model, then qfl compresses its update. Loading any qfl kernel whose
call graph holds a parallel loop starts numba's thread pool, and numba's OpenMP layer
brings the system libgomp into a process that already runs PyTorch's own. This runs
the same simulation (the simulation app, ``--clients`` clients all training every round,
``--spec`` on the uplink, full-precision downlink) once under each layer, and once with
NUMBA_THREADING_LAYER unset (qfl picks the workqueue layer in Ray workers, see
``qfl.compress.runtime.threading_layer``), and prints the seconds per round without
the first round (actor start-up, data loading).

    .venv/bin/python benchmarks/client_threads.py
    .venv/bin/python benchmarks/client_threads.py --rounds 6 --spec "topk(0.01) | qsgd(levels=7, bucket=512)"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def seconds_per_round(layer: str | None, spec: str, rounds: int, clients: int, out: Path) -> list[float]:
    """Wall time of rounds 2..``rounds`` of one simulation under numba layer ``layer``
    (None: NUMBA_THREADING_LAYER unset)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    args = [
        sys.executable,
        "-m",
        "qfl.simulations.runner",
        "--methods",
        "custom",
        "--rounds",
        str(rounds),
        "--clients",
        str(clients),
        "--fraction",
        "1.0",
        "--set",
        f"uplink={spec}",
        "--set",
        "test-samples=1000",
        "--out",
        str(out),
        "--no-report",
    ]
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = json.loads((out / "custom.json").read_text())["rounds"]
    walls = [r["wall_time"] for r in rows]
    return [b - a for a, b in zip(walls[1:], walls[2:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="signtopk(0.01)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    print(f"{args.clients} clients x 20 local steps per round on {os.cpu_count()} CPUs, uplink {args.spec!r}")
    print("| numba threading layer | s per round (median) | min | max |\n|---|--:|--:|--:|")
    with tempfile.TemporaryDirectory(prefix="qfl-threads-") as tmp:
        for layer in ("omp", "workqueue", None):
            t = seconds_per_round(layer, args.spec, args.rounds, args.clients, Path(tmp) / str(layer))
            name = layer or "unset (qfl's choice)"
            print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} |", flush=True)


if __name__ == "__main__":
    main()
