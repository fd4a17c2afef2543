"""Training steps interleaved with compression in one process: does numba's thread pool
slow PyTorch's training?

What the compression mod does each round: H local steps of PyTorch training, then
compress + encode the model's change tensor by tensor. PyTorch's CPU build and numba's
OpenMP layer each bring a libgomp pool, and libgomp workers spin after every parallel
region; two pools can then fight for the cores. Each mode below runs in a fresh process
(the threading layer and libgomp's wait policy are fixed when a pool starts):

* ``torch only``: the same training, no compression (the reference);
* ``qfl serial``: compression forced onto the serial kernels (no numba pool);
* ``qfl default``: qfl's policy (``qfl.compress.runtime``): numba's OpenMP pool with
  passive waiting, parallel kernels forced on;
* ``spinning pools``: both pools with libgomp's default spinning (``GOMP_SPINCOUNT``
  set explicitly to libgomp's default, which qfl respects), parallel kernels forced on;
* ``workqueue``: numba's workqueue layer, parallel kernels forced on.

Printed per mode: median seconds per training step (rounds after the first), as a
ratio to ``torch only``, and median compress+encode seconds per round. The load
average is printed at start and end; above 1 per core the figures are not a verdict.

Run::

    PYTHONPATH=. python benchmarks/train_overlap.py [--rounds 8 --steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MODES = {
    "torch only": {},
    "qfl serial": {},
    "qfl default": {},
    "spinning pools": {"GOMP_SPINCOUNT": "300000"},
    "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
}

_CHILD = r"""
import json, statistics, sys, time
import torch
import qfl
from qfl.compress import runtime
from qfl.wire import encode
mode, rounds, steps, spec = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    torch.nn.Flatten(), torch.nn.Linear(128 * 8 * 8, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
X, Y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
runtime.FORCE_PARALLEL = None if mode == "torch only" else mode != "qfl serial"
op = qfl.parse(spec)
step_s, codec_s = [], []
for r in range(rounds):
    start = [p.detach().clone() for p in model.parameters()]
    t = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), Y).backward()
        opt.step()
    step_s.append((time.perf_counter() - t) / steps)
    if mode != "torch only":
        t = time.perf_counter()
        for p, s in zip(model.parameters(), start):
            encode(op.compress((p.detach() - s).flatten(), torch.Generator().manual_seed(r)))
        codec_s.append(time.perf_counter() - t)
import numba
layer = numba.threading_layer() if mode not in ("torch only", "qfl serial") else "-"
print(json.dumps({"step": statistics.median(step_s[1:]), "codec": statistics.median(codec_s[1:]) if codec_s else 0.0,
                  "layer": layer, "params": sum(p.numel() for p in model.parameters())}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="training steps per round")
    ap.add_argument("--spec", default="topk(0.01) | qsgd(levels=16, bucket=512)")
    args = ap.parse_args(argv)
    if args.rounds < 2 or args.steps < 1:
        ap.error("--rounds must be >= 2 and --steps >= 1")
    cores = os.cpu_count() or 1
    start = os.getloadavg()
    print(f"load average at start: {start[0]:.2f} {start[1]:.2f} {start[2]:.2f} ({cores} cores)")
    rows = {}
    for mode, extra in MODES.items():
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
        }
        env.update(extra)
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, mode, str(args.rounds), str(args.steps), args.spec],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if out.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    end = os.getloadavg()
    ref = rows["torch only"]["step"]
    print(
        f"\n{rows['torch only']['params']:,}-parameter CNN, batch 32, {args.steps} steps per round, "
        f"then {args.spec!r} on every tensor's change"
    )
    print(f"{'mode':16} {'layer':10} {'s/step':>8} {'vs torch only':>14} {'codec s/round':>14}")
    for mode, r in rows.items():
        print(f"{mode:16} {r['layer']:10} {r['step']:8.4f} {r['step'] / ref:13.2f}x {r['codec']:14.3f}")
    print(
        f"\nload average at end: {end[0]:.2f} {end[1]:.2f} {end[2]:.2f}"
        + ("" if max(start[0], end[0]) <= cores else f"  (NOT A VERDICT: load above 1 per core on {cores} cores)")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
