"""Cold start: the first compress+encode in a fresh process, empty user cache vs warm.

A deployed ClientApp may be a fresh process per message, so what counts is what a new
process pays before its first payload leaves. This copies the qfl package into a
scratch directory (standing in for a read-only install: a site-packages nobody may
write to) and points the per-user cache (``XDG_CACHE_HOME``) at another scratch
directory, then runs, each in a fresh process:

1. **empty cache**: import qfl, then the first ``compress`` + ``wire.encode`` of the
   default uplink spec, then a few other specs, each timed apart;
2. ``python -m qfl warm`` (what tools/setup.sh runs after installing);
3. **warm cache**: the same as 1;
4. **warm cache again**: the same as 1, to show that no process compiles again.

Each process also reports how many kernel specialisations it compiled (numba's cache
misses, :func:`qfl.warm.counts`) and the benchmark counts the files that appeared in the
package copy (numba must never write there).

Goals, each printed as a ratio with PASS/FAIL:

* import qfl + first compress+encode with a warm cache <= 1 s;
* no kernel compiled in a process started after ``qfl warm`` (compiled == 0);
* no file written into the installed package.

A verdict needs a quiet machine: the load average is printed at start and end, and a
run above 1 per core is marked "not a verdict".

Run (from the repository root)::

    PYTHONPATH=. python benchmarks/cold_start.py [--elements 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qfl

FIRST_SPEC = "topk(0.01) | qsgd(levels=16, bucket=512)"
NEXT_SPECS = ("grid(8)", "qsgd(levels=255, bucket=512)", "fp16", "bernoulli(budget=0.05) | grid(4)")

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import qfl
from qfl import wire
from qfl.warm import counts
t2 = time.perf_counter()
n, first, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3].split(";")
x = torch.randn(n, generator=torch.Generator().manual_seed(0))
def timed(spec):
    s = time.perf_counter()
    blob = wire.encode(qfl.parse(spec).compress(x, torch.Generator().manual_seed(1)))
    return time.perf_counter() - s, len(blob)
t_first, nbytes = timed(first)
next_ = {spec: timed(spec)[0] for spec in rest}
compiled, loaded = counts()
print(json.dumps({"qfl": qfl.__file__, "import_torch": t1 - t0, "import_qfl": t2 - t1, "first": t_first,
                  "bytes": nbytes, "next": next_, "compiled": compiled, "loaded": loaded}))
"""


def load() -> tuple[float, float, float]:
    return os.getloadavg()


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def run_child(env: dict[str, str], n: int, cwd: Path) -> dict:
    # cwd: not the repository, whose qfl/ would shadow the copy (sys.path[0] is the cwd).
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), FIRST_SPEC, ";".join(NEXT_SPECS)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--elements", type=int, default=1_000_000, help="tensor size of each compression")
    ap.add_argument("--goal", type=float, default=1.0, help="seconds allowed for import + first call, warm")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.elements < 1:
        ap.error("--elements must be positive")

    cores = os.cpu_count() or 1
    load_start = load()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} ({cores} cores)")
    scratch = Path(tempfile.mkdtemp(prefix="qfl-cold-"))
    try:
        install = scratch / "site-packages"
        shutil.copytree(
            Path(qfl.__file__).parent, install / "qfl", ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc")
        )
        before = files_under(install)
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
        env.update(PYTHONPATH=str(install), XDG_CACHE_HOME=str(scratch / "cache"), PYTHONDONTWRITEBYTECODE="1")
        rows = {"empty cache": run_child(env, args.elements, scratch)}
        t = time.perf_counter()
        warm = subprocess.run(
            [sys.executable, "-m", "qfl", "warm"], env=env, cwd=scratch, capture_output=True, text=True, timeout=3600
        )
        warm_s = time.perf_counter() - t
        if warm.returncode != 0:
            raise SystemExit(f"qfl warm failed:\n{warm.stderr[-3000:]}")
        rows["warm cache"] = run_child(env, args.elements, scratch)
        rows["warm cache again"] = run_child(env, args.elements, scratch)
        written = sorted(files_under(install) - before)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    load_end = load()

    print(f"\nfirst compress+encode of {FIRST_SPEC!r} on {args.elements:,} float32, each row a fresh process")
    print(
        f"{'':18} {'import torch':>12} {'import qfl':>10} {'first call':>10} {'compiled':>8} {'loaded':>6}   next specs"
    )
    for name, r in rows.items():
        nxt = ", ".join(f"{s} {v:.2f}" for s, v in r["next"].items())
        print(
            f"{name:18} {r['import_torch']:11.2f}s {r['import_qfl']:9.2f}s {r['first']:9.2f}s "
            f"{r['compiled']:8d} {r['loaded']:6d}   {nxt}"
        )
    print(f"python -m qfl warm: {warm_s:.1f} s ({warm.stdout.strip()})")
    assert all(r["qfl"].startswith(str(install)) for r in rows.values()), "children did not import the copy"

    warm_row = rows["warm cache"]
    startup = warm_row["import_qfl"] + warm_row["first"]
    empty = rows["empty cache"]["import_qfl"] + rows["empty cache"]["first"]
    compiled_after = max(rows["warm cache"]["compiled"], rows["warm cache again"]["compiled"])
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    quiet = max(load_start[0], load_end[0]) <= cores
    print("goals" + ("" if quiet else f" (NOT A VERDICT: load above 1 per core on {cores} cores)") + ":")
    print(
        f"  import qfl + first call, warm cache: {startup:.2f} s = {startup / args.goal:.2f}x the {args.goal:g} s goal"
        f" -> {verdict(startup <= args.goal)}   (empty cache: {empty:.1f} s, {empty / startup:.0f}x slower)"
    )
    print(f"  kernels compiled in processes after qfl warm: {compiled_after} -> {verdict(compiled_after == 0)}")
    print(
        f"  files written into the installed package: {len(written)} -> {verdict(not written)}"
        + (f" {written[:5]}" if written else "")
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "warm_seconds": warm_s,
                    "load_start": load_start,
                    "load_end": load_end,
                    "cores": cores,
                    "written": written,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
