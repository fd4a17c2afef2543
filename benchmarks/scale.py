"""Large models: what compression costs a client and the server, next to training.

This script measures the parts of the cost that are qfl's own, in one process and
without Flower; ``benchmarks/e2e.py`` runs the same models (``tests/apps/bigmodel``'s
``models.py``, imported from there) through Compressed + compression_mod against plain
Flower in the simulation engine:

* **client**: local SGD steps on synthetic data (the training time), then the model
  change compressed tensor by tensor with error memory (``qfl.codec.compress_model``,
  called as the mod calls it: the update handed over, no rebuild kept) and encoded into
  one container (``qfl.clients.records.encode_record``): the mod's path --
  compress+encode time and bytes. Each client compresses with the error memory the
  client before it left, as a client does from its second round on (the first has
  none: its reply is the one the goals leave out);
* **server**: each reply decoded as a Compressed server decodes it (each tensor within
  its own size, a sparse update held sparse: ``decode_record``, ``decode_delta``), its
  three checks (values, the model it makes, its norm) and its addition into the
  streaming weighted sum (``qfl.strategies.aggregate.WeightedMean``) -- decode+aggregate
  time per reply, per 10M parameters (Flower's message handling and the server
  optimiser's step are ``benchmarks/aggregate.py``'s);
* **memory**: the process's resident set (psutil) after each phase, next to the model's
  own size, and its peak (``ru_maxrss``).

Models (random init, real deltas from real steps):

* ``resnet18``: ResNet-18 (BasicBlock, 10 classes, 32x32 inputs), 11.2M parameters,
  ``--steps`` steps (default 20) at batch ``--batch``;
* ``gpt2``: a GPT-2-small-shaped decoder (vocab 50257, 12 layers, width 768, 1024
  positions, tied head), 124M parameters, ``--gpt-steps`` steps (default 1) on
  synthetic tokens, batch 1 x ``--seq`` tokens (kept small for 2 CPU cores).

Goals, printed as ratios with PASS/FAIL:

* client compress+encode <= 10% of the local training time (ResNet-18, ``--steps`` steps);
* server decode+aggregate <= 50 ms per 10M parameters per reply.

The load average is printed at start and end; above 1 per core the figures are not a
verdict. Run::

    PYTHONPATH=. python benchmarks/scale.py [--models resnet18,gpt2] [--clients 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import qfl
from qfl.clients.records import decode_record, encode_record, record_bytes
from qfl.codec import Model, Update, compress_model, decode_delta, norm, out_of_range
from qfl.spec import Policy
from qfl.strategies.aggregate import WeightedMean
from qfl.strategies.replies import beyond_range, tensor_limits
from qfl.wire import DEFAULT_LIMITS

MB = 1 << 20


# The models are the end-to-end app's (benchmarks/e2e.py), so both benchmarks measure the same ones.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "apps" / "bigmodel"))
from bigmodel.measure import commit, peak_rss, rss  # noqa: E402
from bigmodel.models import build, parse_model, split_models, train_steps  # noqa: E402


# ============================================================================ measuring
def run_model(name: str, args: argparse.Namespace, policy: Policy) -> dict:
    torch.manual_seed(args.seed)
    family = parse_model(name)[0]
    model = build(name)
    params = sum(p.numel() for p in model.parameters())
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_bytes = sum(v.numel() * v.element_size() for v in start.values())
    steps = args.gpt_steps if family == "gpt2" else args.steps
    out = {"params": params, "model_bytes": model_bytes, "steps": steps, "clients": []}
    base = Model(start)
    limits = {k: tensor_limits(DEFAULT_LIMITS, t) for k, t in base.items()}
    mean = WeightedMean(base, [1.0] * args.clients)
    memory: dict[str, torch.Tensor] = {}  # the error memory the previous client left (see the module doc)
    out["rss_model"] = rss()
    for c in range(args.clients):
        model.load_state_dict(start)
        t = time.perf_counter()
        train_steps(name, model, steps, 1 if family == "gpt2" else args.batch, args.seq, args.seed + c)
        train_s = time.perf_counter() - t
        trained = model.state_dict()
        delta = {k: (trained[k] - start[k]) if start[k].is_floating_point() else trained[k] for k in start}
        t = time.perf_counter()
        payloads, _, memory = compress_model(
            delta, policy, torch.Generator().manual_seed(c), memory, keep_sent=False, consume=True
        )
        record = encode_record(payloads)
        codec_s = time.perf_counter() - t
        del payloads, delta
        rss_client = rss()
        t = time.perf_counter()
        decoded = decode_record(record, limits)
        update = Update((k, decode_delta(decoded[k][0])) for k in base)
        bad = out_of_range(update) or beyond_range(base, update)
        if bad is not None or not math.isfinite(norm(update)):
            raise RuntimeError(f"client {c}: the server would drop this reply ({bad} out of range)")
        mean.add_update(update, mean.factors[c])
        server_s = time.perf_counter() - t
        del decoded, update
        out["clients"].append(
            {
                "train_s": train_s,
                "codec_s": codec_s,
                "server_s": server_s,
                "bytes": record_bytes(record),
                "rss_client": rss_client,
                "rss_server": rss(),
            }
        )
        del record
    out["peak_rss"] = peak_rss()
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        default="resnet18,gpt2",
        help="comma-separated: resnet18, gpt2, mlp, each with sizes or not, "
        "e.g. 'resnet18(width=128),gpt2(layers=24,width=1024,heads=16)'",
    )
    ap.add_argument("--spec", default="topk(0.01) | qsgd(levels=16, bucket=512)", help="uplink spec")
    ap.add_argument("--min-elements", type=int, default=qfl.spec.MIN_ELEMENTS)
    ap.add_argument("--clients", type=int, default=2, help="replies per model")
    ap.add_argument("--steps", type=int, default=20, help="local steps, ResNet-18")
    ap.add_argument("--batch", type=int, default=16, help="batch, ResNet-18")
    ap.add_argument("--gpt-steps", type=int, default=1, help="local steps, GPT-2-shaped")
    ap.add_argument("--seq", type=int, default=32, help="tokens per step, GPT-2-shaped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        models = split_models(args.models)
    except ValueError as exc:
        ap.error(f"--models: {exc}")
    if not models:
        ap.error("--models: give at least one model")
    if min(args.clients, args.steps, args.batch, args.gpt_steps, args.seq) < 1:
        ap.error("--clients, --steps, --batch, --gpt-steps and --seq must be positive")
    policy = Policy.build(args.spec, args.min_elements)
    cores = os.cpu_count() or 1
    load_start = os.getloadavg()
    print(
        f"# qfl scale benchmark, commit {commit(Path(__file__).parent)}, {platform.machine()} {cores} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), spec {args.spec!r}, "
        f"min-elements {args.min_elements}"
    )
    print(f"# load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    results = {m: run_model(m, args, policy) for m in models}
    load_end = os.getloadavg()

    print(
        f"\n{'model':9} {'params':>12} {'steps':>5} {'train s':>8} {'enc s':>7} {'enc/train':>9} "
        f"{'dec+agg s':>9} {'ms/10M':>7} {'bytes':>11} {'x smaller':>9} {'RSS MB':>7} {'peak MB':>7} {'model MB':>8}"
    )
    goals = []
    for m, r in results.items():
        for _i, c in enumerate(r["clients"]):
            per10m = 1e3 * c["server_s"] / (r["params"] / 1e7)
            print(
                f"{m:9} {r['params']:12,} {r['steps']:5} {c['train_s']:8.2f} {c['codec_s']:7.3f} "
                f"{c['codec_s'] / c['train_s']:9.3f} {c['server_s']:9.3f} {per10m:7.1f} {c['bytes']:11,} "
                f"{r['model_bytes'] / c['bytes']:9.0f} {c['rss_server'] / MB:7.0f} {r['peak_rss'] / MB:7.0f} "
                f"{r['model_bytes'] / MB:8.0f}"
            )
        # Later replies: the first pays one-off costs (page faults, kernel loading).
        later = r["clients"][1:] or r["clients"]
        enc = max(c["codec_s"] / c["train_s"] for c in later)
        dec = max(1e3 * c["server_s"] / (r["params"] / 1e7) for c in later)
        if parse_model(m)[0] == "resnet18":
            goals.append((f"{m}: client compress+encode / {r['steps']} steps' training", enc, 0.10))
        goals.append((f"{m}: server decode+aggregate, ms per 10M parameters per reply", dec, 50.0))
    quiet = max(load_start[0], load_end[0]) <= cores
    print(f"\n# load average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    print(
        "goals (worst reply after the first)"
        + ("" if quiet else f" -- NOT A VERDICT: load above 1 per core on {cores} cores")
        + ":"
    )
    for label, value, limit in goals:
        print(f"  {label}: {value:.3g} = {value / limit:.2f}x the {limit:g} limit -> {verdict(value <= limit)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
