"""Decoding a model's small lossless tensors: one blob each, or one group blob (issue 13).

A blob's decoding costs fixed Python (header, checksum, limits) whatever its size; since
3d8b470 a reply's small lossless tensors of one dtype travel in one group. This decodes
the float tensors of fewer than 256 elements of a bigmodel (ResNet-18(width=32) by
default: its normalisation layers and biases) both ways, alternating, in one process,
with the per-tensor limits a server uses, and prints the times, their ratio and the
bytes::

    PYTHONPATH=. python benchmarks/container_decode.py [--model 'resnet18(width=32)'] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "apps" / "bigmodel"))
from bigmodel.measure import commit  # noqa: E402
from bigmodel.models import build  # noqa: E402

from qfl.compress import IDENTITY  # noqa: E402
from qfl.wire import Group, Limits, decode_container, encode, group_payloads, pack  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet18(width=32)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args(argv)
    state = build(args.model).state_dict()
    small = {k: IDENTITY.compress(v) for k, v in state.items() if v.numel() < 256 and v.is_floating_point()}
    limits = {k: Limits(max_elements=p.numel) for k, p in small.items()}
    layouts = {
        "one blob per tensor": pack({k: encode(p) for k, p in small.items()}),
        "one group blob": pack({k: v if isinstance(v, Group) else encode(v) for k, v in group_payloads(small).items()}),
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(5):  # alternating rounds: a machine slowing mid-run slows both
        for name, data in layouts.items():
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                decode_container(data, limits)
            times[name].append((time.perf_counter() - t0) / args.repeats)
    print(f"# commit {commit(ROOT)}; {args.model}: {len(small)} of {len(state)} tensors are float with < 256 elements")
    for name, data in layouts.items():
        print(f"{name:>20}: {1e3 * statistics.median(times[name]):.2f} ms per container, {len(data):,} bytes")
    a, b = (statistics.median(t) for t in times.values())
    print(f"one group / one blob per tensor: {b / a:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
