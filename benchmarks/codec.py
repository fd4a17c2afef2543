"""Codec benchmark: qfl operators + wire format against peers, on one large tensor.

For each test tensor (a Gaussian one and a real model update) and each qfl operator,
this measures, in the same run and interleaved with the peers:

* encode time: ``op.compress(x, generator)`` + ``qfl.wire.encode(payload)``
* decode time: ``qfl.wire.decode(blob)`` + ``payload.decompress()``
* bytes: ``len(blob)``, the bytes that really cross the wire
* relative error ``||x - x_hat|| / ||x||``

next to

* a memory floor: ``x.amax()``, one read pass over the tensor;
* bitsandbytes blockwise 8-bit on CPU (``quantize_blockwise`` / ``dequantize_blockwise``,
  block 4096); bytes = uint8 codes + one float32 absmax per block;
* fedlab 1.3.0's ``QSGDCompressor(n_bit=4)`` and ``TopkCompressor(0.01)``; bytes = the
  tensors they return, in their containers (QSGD: float32 norm, bool signs, int32 levels;
  top-k: float32 values, int64 indices). They do no serialisation, so their times are
  compress / decompress only.

Times are medians over ``--repeats`` runs (after a warm-up run that also JIT-loads the
numba kernels); methods are run round-robin within each repeat so that load from other
processes spreads over all of them. Each thread count of ``--threads`` (default 1 and 2)
runs in its own process with ``OMP_NUM_THREADS``/``NUMBA_NUM_THREADS`` set, so peers and
qfl use the same threads. The targets are checked against the measured figures (nothing
is hard-coded) and printed as PASS/FAIL:

1. grid(8) encode+decode <= 0.5x bitsandbytes blockwise-8's time, at no more bytes;
2. topk(0.01) at most 0.3x fedlab top-k's encode+decode time, at <= 0.6x its bytes;
3. qsgd(levels=16) (Elias-coded) >= 3x faster than fedlab QSGD(n_bit=4), >= 4x fewer bytes;
4. qsgd(levels=255, bucket=512) <= 0.5x bitsandbytes blockwise-8's time, at no more bytes;
5. identity, fp16 and bf16 encode+decode <= 3x the memory floor (``x.amax()``) of the run.

A verdict needs a quiet machine: the load average is printed at start and end, and a
run above 1 per core is marked NOT A VERDICT.

The "update" tensor is the flattened parameter change of an MLP (784 -> h -> h -> 10,
h chosen so that it has at least ``--size`` parameters, truncated to ``--size``) after
a few SGD steps on random inputs labelled by a fixed random teacher network: per-layer
scales differ by orders of magnitude and dead ReLU units give exact zeros, as in real
updates.

Install the peers (into the same environment as qfl)::

    pip install -e .[bench]                # bitsandbytes==0.50.2
    pip install fedlab==1.3.0 --no-deps    # fedlab's code only; just its compressor
                                           # modules are imported, not its heavy deps

Run (from the repository root)::

    PYTHONPATH=. python benchmarks/codec.py                       # 10M elements, 7 repeats
    PYTHONPATH=. python benchmarks/codec.py --ops topk,qsgd --repeats 9 --json out.json
    PYTHONPATH=. python benchmarks/codec.py --threads 2           # one thread count only
    PYTHONPATH=. python benchmarks/codec.py --ops identity,fp16,bf16 --no-peers --bounds   # target (5)

Exit status: 0 whether targets pass or fail (this is a measurement, not a test),
2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qfl
from qfl import wire


# ============================================================================ tensors
def gaussian(n: int, seed: int) -> torch.Tensor:
    """i.i.d. N(0, 1) float32."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float32)


def _mlp_width(n: int, d_in: int = 784, d_out: int = 10) -> int:
    """Smallest h with (d_in+1) h + (h+1) h + (h+1) d_out >= n."""
    b = d_in + 2 + d_out
    h = max(1, math.ceil((-b + math.sqrt(b * b + 4 * max(n - d_out, 0))) / 2))
    while (d_in + 1) * h + (h + 1) * h + (h + 1) * d_out < n:
        h += 1
    return h


def model_update(n: int, seed: int, steps: int = 5, batch: int = 128, lr: float = 0.05) -> torch.Tensor:
    """Parameter delta of an MLP after ``steps`` SGD steps on teacher-labelled random data."""
    torch.manual_seed(seed)
    d_in, d_out = 784, 10
    h = _mlp_width(n, d_in, d_out)
    model = torch.nn.Sequential(
        torch.nn.Linear(d_in, h),
        torch.nn.ReLU(),
        torch.nn.Linear(h, h),
        torch.nn.ReLU(),
        torch.nn.Linear(h, d_out),
    )
    teacher = torch.randn(d_in, d_out)
    before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        inputs = torch.randn(batch, d_in)
        labels = (inputs @ teacher).argmax(dim=1)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        opt.step()
    after = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return (after - before)[:n].contiguous()


def describe(x: torch.Tensor) -> str:
    """One line of statistics: zeros, kurtosis, dynamic range."""
    v = x.double()
    a = v.abs()
    nz = a[a > 0]
    m2 = float((v * v).mean())
    kurt = float((v**4).mean() / (m2 * m2)) if m2 > 0 else float("nan")
    rng = float(nz.max() / nz.median()) if nz.numel() else float("nan")
    return (
        f"{x.numel():,} float32, zeros {100 * (1 - nz.numel() / max(x.numel(), 1)):.1f}%, "
        f"kurtosis {kurt:.1f} (Gaussian 3), max/median |x| {rng:.1f}"
    )


# ============================================================================ methods
_CLOCK = [time.perf_counter]


def now() -> float:
    """The clock every method is timed with: wall time, or with ``--clock thread`` the
    calling thread's CPU time, which other processes cannot inflate by preempting it
    (page faults count: the kernel zeroes a fresh page in the faulting thread's time)."""
    return _CLOCK[0]()


# ============================================================================ methods
@dataclass
class Method:
    """A codec under test. ``run(x)`` returns (nbytes, x_hat, {stage: seconds})."""

    name: str
    kind: str  # "qfl", "peer", "floor", "bound"
    run: Callable[[torch.Tensor], tuple[int, torch.Tensor | None, dict[str, float]]]
    note: str = ""


def qfl_method(name: str, spec: str, seed: int) -> Method:
    op = qfl.parse(spec)
    gen = torch.Generator().manual_seed(seed)
    clock = now

    def run(x: torch.Tensor):
        t0 = clock()
        payload = op.compress(x, gen)
        t1 = clock()
        blob = wire.encode(payload)
        t2 = clock()
        del payload
        got = wire.decode(blob)
        t3 = clock()
        x_hat = got.decompress()
        t4 = clock()
        return (
            len(blob),
            x_hat,
            {
                "compress": t1 - t0,
                "wire_encode": t2 - t1,
                "wire_decode": t3 - t2,
                "decompress": t4 - t3,
                "encode": t2 - t0,
                "decode": t4 - t2,
            },
        )

    return Method(name, "qfl", run, note=str(op))


def floor_method() -> Method:
    clock = now

    def run(x: torch.Tensor):
        t0 = clock()
        x.amax()
        t1 = clock()
        return 0, None, {"encode": t1 - t0}

    return Method("floor: x.amax()", "floor", run, note="one read pass over x")


def bound_methods() -> list[Method]:
    """What the least work of target (5) costs on this machine, next to the floor: the
    passes over memory that identity, fp16 and bf16 cannot avoid with a fresh ``bytes``
    blob (one read + one write into fresh memory, the checksum on each side; fp16: the
    two casts and a 20 MB copy), timed with numpy and xxhash, no qfl code."""
    import xxhash

    clock = now

    def fresh_copy(x: torch.Tensor):
        t0 = clock()
        torch.from_numpy(np.empty(x.numel(), np.float32)).copy_(x)
        t1 = clock()
        return 0, None, {"encode": t1 - t0}

    reused: list[np.ndarray] = []

    def reused_copy(x: torch.Tensor):
        if not reused or reused[0].size != x.numel():
            reused[:] = [np.ones(x.numel(), np.float32)]
        t0 = clock()
        torch.from_numpy(reused[0]).copy_(x)
        t1 = clock()
        return 0, None, {"encode": t1 - t0}

    def checksum(x: torch.Tensor):
        t0 = clock()
        xxhash.xxh3_64_intdigest(x.numpy())
        t1 = clock()
        return 0, None, {"encode": t1 - t0}

    def casts(x: torch.Tensor):
        t0 = clock()
        y = torch.from_numpy(np.empty(x.numel(), np.float16)).copy_(x)
        t1 = clock()
        z = torch.from_numpy(np.empty(x.numel(), np.float32)).copy_(y)
        t2 = clock()
        del z
        return 0, None, {"encode": t1 - t0, "decode": t2 - t1}

    return [
        Method("bound: copy into fresh 40 MB", "bound", fresh_copy, note="np.empty (huge pages) + torch copy"),
        Method("bound: copy into reused 40 MB", "bound", reused_copy, note="the same copy, pages already mapped"),
        Method("bound: xxh3 of 40 MB", "bound", checksum, note="XXH3-64 of x, on one thread"),
        Method("bound: fp16 casts, fresh", "bound", casts, note="torch casts to and back from fp16"),
    ]


def _container_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def bnb_method() -> Method | None:
    try:
        import bitsandbytes.functional as F
    except Exception as exc:  # pragma: no cover - depends on the environment
        print(f"# bitsandbytes unavailable ({exc}); pip install -e .[bench]", file=sys.stderr)
        return None
    clock = now

    def run(x: torch.Tensor):
        t0 = clock()
        codes, state = F.quantize_blockwise(x, blocksize=4096)
        t1 = clock()
        x_hat = F.dequantize_blockwise(codes, state)
        t2 = clock()
        return _container_bytes([codes, state.absmax]), x_hat, {"encode": t1 - t0, "decode": t2 - t1}

    return Method("bnb blockwise8", "peer", run, note="bitsandbytes quantize_blockwise, block 4096")


def _fedlab_module(name: str):
    """Import ``fedlab.contrib.compressor.<name>`` without running package __init__ files
    that may import heavy optional dependencies."""
    full = f"fedlab.contrib.compressor.{name}"
    try:
        return importlib.import_module(full)
    except ImportError:
        pass
    spec = importlib.util.find_spec("fedlab")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fedlab is not installed; pip install fedlab==1.3.0 --no-deps")
    base = Path(next(iter(spec.submodule_search_locations))) / "contrib" / "compressor"
    # The compressor modules import their sibling ``.compressor`` relatively: load it first
    # under a synthetic package.
    import types

    pkg_name = "_fedlab_compressor"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(base)]
        sys.modules[pkg_name] = pkg
    mod_name = f"{pkg_name}.{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, base / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def fedlab_methods() -> list[Method]:
    try:
        quant = _fedlab_module("quantization")
        topk = _fedlab_module("topk")
    except Exception as exc:  # pragma: no cover - depends on the environment
        print(f"# fedlab unavailable ({exc}); pip install fedlab==1.3.0 --no-deps", file=sys.stderr)
        return []
    clock = now
    qsgd = quant.QSGDCompressor(n_bit=4)
    tk = topk.TopkCompressor(compress_ratio=0.01)

    def run_qsgd(x: torch.Tensor):
        t0 = clock()
        sig = qsgd.compress(x)
        t1 = clock()
        x_hat = qsgd.decompress(sig)
        t2 = clock()
        return _container_bytes(sig), x_hat, {"encode": t1 - t0, "decode": t2 - t1}

    def run_topk(x: torch.Tensor):
        t0 = clock()
        values, indices = tk.compress(x)
        t1 = clock()
        x_hat = tk.decompress(values, indices, x.shape)
        t2 = clock()
        return _container_bytes([values, indices]), x_hat, {"encode": t1 - t0, "decode": t2 - t1}

    return [
        Method("fedlab QSGD(n_bit=4)", "peer", run_qsgd, note="fedlab 1.3.0 QSGDCompressor"),
        Method("fedlab TopK(0.01)", "peer", run_topk, note="fedlab 1.3.0 TopkCompressor"),
    ]


def our_specs(n: int) -> list[tuple[str, str]]:
    """(row name, spec) of the qfl operators benchmarked."""
    s_sqrt = math.ceil(math.sqrt(n))
    return [
        ("grid(8)", "grid(8)"),
        ("qsgd(16)", "qsgd(levels=16)"),
        ("qsgd(16, norm=max)", "qsgd(levels=16, norm=max)"),
        ("qsgd(255, bucket=512)", "qsgd(levels=255, bucket=512)"),
        (f"qsgd({s_sqrt}) s=sqrt(d)", f"qsgd(levels={s_sqrt})"),
        ("topk(0.01)", "topk(0.01)"),
        ("signtopk(0.01)", "signtopk(0.01)"),
        ("topk(0.01) | qsgd(16)", "topk(0.01) | qsgd(levels=16)"),
        ("randk(0.01)", "randk(0.01)"),
        ("bernoulli(0.01) | grid(4)", "bernoulli(budget=0.01) | grid(4)"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("identity", "identity"),
    ]


# ============================================================================ measuring
@dataclass
class Row:
    name: str
    kind: str
    note: str
    runs: list[dict[str, float]] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    rel_err: float | None = None

    def median(self, stage: str) -> float | None:
        vals = [r[stage] for r in self.runs if stage in r]
        return statistics.median(vals) if vals else None

    def total(self) -> float:
        """Median over runs of encode + decode."""
        return statistics.median(r["encode"] + r.get("decode", 0.0) for r in self.runs)

    def bytes(self) -> int:
        return int(statistics.median(self.nbytes))

    def as_dict(self) -> dict[str, Any]:
        stages = sorted({k for r in self.runs for k in r})
        return {
            "name": self.name,
            "kind": self.kind,
            "note": self.note,
            "bytes": self.bytes(),
            "rel_err": self.rel_err,
            "total_s": self.total(),
            "median_s": {s: self.median(s) for s in stages},
            "runs": self.runs,
            "bytes_runs": self.nbytes,
        }


def rel_err(x64: torch.Tensor, norm: float, x_hat: torch.Tensor | None) -> float | None:
    if x_hat is None:
        return None
    return float((x64 - x_hat.reshape(-1).double()).norm() / norm) if norm > 0 else 0.0


def measure(x: torch.Tensor, methods: list[Method], repeats: int) -> list[Row]:
    x64 = x.double()
    norm = float(x64.norm())
    rows = [Row(m.name, m.kind, m.note) for m in methods]
    for m, row in zip(methods, rows):  # warm-up: JIT load, page-in; gives the error
        nbytes, x_hat, _ = m.run(x)
        row.rel_err = rel_err(x64, norm, x_hat)
        del x_hat
    del x64
    for _ in range(repeats):
        for m, row in zip(methods, rows):
            nbytes, x_hat, stages = m.run(x)
            del x_hat
            row.runs.append(stages)
            row.nbytes.append(nbytes)
    return rows


# ============================================================================ targets
@dataclass
class Target:
    label: str
    status: str  # PASS, FAIL, SKIP
    detail: str


def _find(rows: list[Row], name: str) -> Row | None:
    return next((r for r in rows if r.name == name), None)


def check_targets(rows: list[Row]) -> list[Target]:
    out = []

    def compare(label, ours_name, peer_name, time_factor, bytes_factor, faster_word):
        ours, peer = _find(rows, ours_name), _find(rows, peer_name)
        if ours is None or peer is None:
            out.append(Target(label, "SKIP", f"needs rows {ours_name!r} and {peer_name!r}"))
            return
        to, tp = ours.total(), peer.total()
        bo, bp = ours.bytes(), peer.bytes()
        ok_t = to <= time_factor * tp
        ok_b = bo <= bytes_factor * bp
        detail = (
            f"time {to * 1e3:.1f} ms vs {tp * 1e3:.1f} ms = {to / tp:.2f}x "
            f"(need <= {time_factor:g}x{faster_word}) {'ok' if ok_t else 'MISSED'}; "
            f"bytes {bo:,} vs {bp:,} = {bo / bp:.3f}x (need <= {bytes_factor:g}x) "
            f"{'ok' if ok_b else 'MISSED'}"
        )
        out.append(Target(label, "PASS" if ok_t and ok_b else "FAIL", detail))

    compare("(1) grid(8) vs bitsandbytes blockwise8", "grid(8)", "bnb blockwise8", 0.5, 1.0, "")
    compare("(2) topk(0.01) vs fedlab TopK(0.01)", "topk(0.01)", "fedlab TopK(0.01)", 0.3, 0.6, "")
    compare(
        "(3) qsgd(16) vs fedlab QSGD(n_bit=4)", "qsgd(16)", "fedlab QSGD(n_bit=4)", 1 / 3, 1 / 4, ", i.e. >= 3x faster"
    )
    compare(
        "(4) qsgd(255, bucket=512) vs bitsandbytes blockwise8", "qsgd(255, bucket=512)", "bnb blockwise8", 0.5, 1.0, ""
    )
    floor = _find(rows, "floor: x.amax()")
    for name in ("identity", "fp16", "bf16"):
        ours = _find(rows, name)
        label = f"(5) {name} vs the memory floor"
        if ours is None or floor is None:
            out.append(Target(label, "SKIP", f"needs rows {name!r} and the floor"))
            continue
        ratio = ours.total() / floor.total()
        out.append(
            Target(
                label,
                "PASS" if ratio <= 3 else "FAIL",
                f"time {ours.total() * 1e3:.1f} ms vs {floor.total() * 1e3:.2f} ms = {ratio:.1f}x (need <= 3x)",
            )
        )
    return out


# ============================================================================ output
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def table(rows: list[Row], n: int) -> str:
    head = ["method", "encode ms", "decode ms", "total ms", "bytes", "bits/elt", "rel err"]
    lines = []
    for r in rows:
        nb = r.bytes()
        lines.append(
            [
                r.name,
                _ms(r.median("encode")),
                _ms(r.median("decode")),
                _ms(r.total()),
                f"{nb:,}" if r.kind not in ("floor", "bound") else "-",
                f"{8 * nb / n:.3f}" if r.kind not in ("floor", "bound") else "-",
                "-" if r.rel_err is None else f"{r.rel_err:.4g}",
            ]
        )
    return _markdown(head, lines)


def breakdown(rows: list[Row]) -> str:
    head = ["qfl operator", "compress ms", "wire encode ms", "wire decode ms", "decompress ms"]
    lines = [
        [
            r.name,
            _ms(r.median("compress")),
            _ms(r.median("wire_encode")),
            _ms(r.median("wire_decode")),
            _ms(r.median("decompress")),
        ]
        for r in rows
        if r.kind == "qfl"
    ]
    return _markdown(head, lines)


def _markdown(head: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i]) for i in range(len(head))]

    def fmt(cells):
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(head), sep, *(fmt(line) for line in lines)])


def versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "qfl": qfl.__version__,
    }
    import numba

    out["numba"] = numba.__version__
    for mod in ("bitsandbytes", "fedlab"):
        try:
            out[mod] = importlib.import_module(mod).__version__
        except Exception:
            out[mod] = "not installed"
    return out


# ============================================================================ main
def _per_thread_count(counts: list[int], argv: list[str], json_path: str | None) -> int:
    """Run this benchmark once per thread count, each in a fresh process whose thread
    pools (PyTorch's, bitsandbytes', numba's) all start with that many threads."""
    rest = []
    skip = False
    for a in argv:  # drop --threads/--json: each child gets its own
        if skip:
            skip = False
            continue
        if a in ("--threads", "--json"):
            skip = True
            continue
        if a.startswith(("--threads=", "--json=")):
            continue
        rest.append(a)
    status = 0
    for t in counts:
        env = dict(os.environ, OMP_NUM_THREADS=str(t), MKL_NUM_THREADS=str(t), NUMBA_NUM_THREADS=str(t))
        child = [sys.executable, __file__, *rest, "--threads", str(t)]
        if json_path:
            child += ["--json", str(Path(json_path).with_suffix(f".t{t}.json"))]
        print(f"\n\n# ======================== {t} thread(s) ========================", flush=True)
        status = max(status, subprocess.run(child, env=env).returncode)
    return status


def selected(specs: list[tuple[str, str]], ops: str) -> list[tuple[str, str]]:
    """The (row name, spec) pairs ``--ops`` keeps: those whose name or spec contains one of
    its comma-separated patterns, or whose name one matches as a regex. Commas inside
    parentheses belong to a spec ("qsgd(255, bucket=512)"), which is no valid regex."""
    pats = [p.strip() for p in re.split(r",(?![^()]*\))", ops) if p.strip()]

    def matches(pattern: str, name: str, spec: str) -> bool:
        if pattern in name or pattern in spec:
            return True
        try:
            return re.search(pattern, name) is not None
        except re.error:
            return False

    return [(name, spec) for name, spec in specs if any(matches(p, name, spec) for p in pats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=10_000_000, help="elements per tensor (default 10M)")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per method (default 7, median reported)")
    ap.add_argument(
        "--ops",
        default="",
        help="comma-separated substrings or regexes; keep only the qfl "
        "operators whose row name or spec matches one (peers and floor are always run)",
    )
    ap.add_argument("--tensors", default="gaussian,update", help="which tensors: gaussian, update (default both)")
    ap.add_argument(
        "--threads", default="1,2", help="comma-separated thread counts, each run in its own process (default 1,2)"
    )
    ap.add_argument("--no-peers", action="store_true", help="skip bitsandbytes and fedlab")
    ap.add_argument(
        "--bounds",
        action="store_true",
        help="also time the memory passes target (5) cannot avoid (fresh vs reused buffer, checksum, casts)",
    )
    ap.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall time (default), or the thread's CPU time: immune to other processes on a busy "
        "machine, but blind to work on other threads, so only with --threads 1",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = ap.parse_args(argv)
    try:
        counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error("--threads takes comma-separated positive integers")
    if args.size < 1 or args.repeats < 1 or not counts or min(counts) < 1:
        ap.error("--size, --repeats and --threads must be positive")
    if len(counts) > 1 or os.environ.get("NUMBA_NUM_THREADS") != str(counts[0]):
        return _per_thread_count(counts, argv if argv is not None else sys.argv[1:], args.json)
    args.threads = counts[0]
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread misses the work of other threads: use it with --threads 1")
        _CLOCK[0] = time.thread_time
    tensors = [t.strip() for t in args.tensors.split(",") if t.strip()]
    if not tensors or any(t not in ("gaussian", "update") for t in tensors):
        ap.error("--tensors takes a comma-separated subset of: gaussian, update")

    torch.set_num_threads(args.threads)
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))

    specs = our_specs(args.size)
    if args.ops:
        specs = selected(specs, args.ops)
    methods: list[Method] = [floor_method()]
    if not args.no_peers:
        if (m := bnb_method()) is not None:
            methods.append(m)
        methods += fedlab_methods()
    if args.bounds:
        methods += bound_methods()
    methods += [qfl_method(name, spec, args.seed + 1) for name, spec in specs]

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "size": args.size,
        "repeats": args.repeats,
        "threads": args.threads,
        "clock": args.clock,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {platform.platform()}",
        "loadavg_start": os.getloadavg(),
        "versions": versions(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"# qfl codec benchmark  {meta['date']}")
    print(f"# {meta['machine']}; threads={args.threads}; repeats={args.repeats} (medians); clock={args.clock}")
    print("# " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    print(
        "# load average at start: "
        + ", ".join(f"{v:.2f}" for v in meta["loadavg_start"])
        + " (other processes share the cores: compare rows of the same run only)"
    )
    result: dict[str, Any] = {"meta": meta, "tensors": {}}
    all_targets: list[tuple[str, Target]] = []
    for tname in tensors:
        t0 = time.perf_counter()
        x = gaussian(args.size, args.seed) if tname == "gaussian" else model_update(args.size, args.seed)
        desc = describe(x)
        print(f"\n## tensor: {tname} — {desc} (built in {time.perf_counter() - t0:.1f} s)\n")
        rows = measure(x, methods, args.repeats)
        print(table(rows, args.size))
        print()
        print(breakdown(rows))
        targets = check_targets(rows)
        print()
        for t in targets:
            print(f"{t.status}  {t.label}: {t.detail}")
            all_targets.append((tname, t))
        result["tensors"][tname] = {
            "description": desc,
            "rows": [r.as_dict() for r in rows],
            "targets": [t.__dict__ for t in targets],
        }
        del x
    meta["loadavg_end"] = os.getloadavg()
    print("\n# load average at end: " + ", ".join(f"{v:.2f}" for v in meta["loadavg_end"]))
    cores = os.cpu_count() or 1
    meta["verdict"] = max(meta["loadavg_start"][0], meta["loadavg_end"][0]) <= cores
    print(
        f"\n## targets ({args.threads} thread(s))"
        + ("" if meta["verdict"] else f" -- NOT A VERDICT: load above 1 per core on {cores} cores")
    )
    for tname, t in all_targets:
        print(f"{t.status}  [{tname}] {t.label}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"\n# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
