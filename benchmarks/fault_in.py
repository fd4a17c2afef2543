"""Fresh buffers and parallel kernels: why qfl faults huge pages in from one thread.

numpy backs buffers of 4 MiB or more with transparent huge pages. On the project's 2-vCPU
VM, a numba parallel kernel whose threads are the first to write such a buffer
intermittently runs ~10x slower than the same kernel serially (page faults included).
``qfl.compress.runtime.fault_in`` writes one byte per 2 MiB first, from the calling
thread, when a parallel writer is next. This prints, for qfl's parallel dequantisation of
``--size`` int8 levels into a float32 output allocated fresh for every call, the median
and worst time of each way, measured round-robin in one process:

* ``serial``: the serial variant (its faults are serial anyway);
* ``parallel``: the parallel variant into the fresh buffer as numpy returns it;
* ``parallel + fault_in``: the same after ``runtime.empty`` (what qfl does);
* ``parallel, reused``: the parallel variant into a buffer faulted in long ago (the
  kernel's own speed, the floor of the others).

Run (from the repository root)::

    PYTHONPATH=. python benchmarks/fault_in.py                   # 10M levels, 2 threads, 40 calls each
    PYTHONPATH=. python benchmarks/fault_in.py --size 2000000 --calls 100

A measurement, not a test: exit status 0 whatever it shows (2 on bad arguments).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000_000, help="levels per call (default 10M)")
    ap.add_argument("--calls", type=int, default=40, help="calls per way (default 40)")
    ap.add_argument("--threads", type=int, default=2, help="numba threads (default 2)")
    args = ap.parse_args()
    if args.size < 1 or args.calls < 1 or args.threads < 2:
        ap.error("--size and --calls must be positive and --threads at least 2")
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))

    import numpy as np

    from qfl.compress import _kernels as K
    from qfl.compress import runtime

    runtime.start_pool()
    print(f"# load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}; {args.threads} threads")
    n = args.size
    levels = np.random.default_rng(0).integers(-127, 128, n).astype(np.int8)
    factors = np.ones(1)
    reused = runtime.empty(n, np.float32, parallel=True)
    kernel = K._dequantize

    ways = {
        "serial": lambda: kernel.serial(levels, factors, n, np.empty(n, np.float32)),
        "parallel": lambda: kernel.parallel(levels, factors, n, np.empty(n, np.float32)),
        "parallel + fault_in": lambda: kernel.parallel(levels, factors, n, runtime.empty(n, np.float32, True)),
        "parallel, reused": lambda: kernel.parallel(levels, factors, n, reused),
    }
    for way in ways.values():  # JIT-load every variant before timing
        way()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.calls):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            times[name].append(time.perf_counter() - t0)
    floor = statistics.median(times["parallel, reused"])
    print(f"| way ({n:,} int8 levels -> float32) | median ms | worst ms | median / reused |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1e3 * med:.2f} | {1e3 * max(ts):.2f} | {med / floor:.1f}x |")
    print(f"# load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
