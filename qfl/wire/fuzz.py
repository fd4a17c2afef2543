"""Fuzzing the wire decoder: a coverage-guided target (atheris) and a fallback driver.

    python -m qfl.wire.fuzz --runs 100000                  # atheris if importable, else the fallback
    python -m qfl.wire.fuzz --engine random --runs 100000  # the dependency-free mutation fuzzer
    python -m qfl.wire.fuzz --engine atheris --runs 100000 -- -max_len=8192   # extra libFuzzer flags
    python -m qfl.wire.fuzz --replay findings/              # re-check saved inputs

atheris is an optional extra (``pip install qfl[fuzz]``). It instruments the Python
side of the decoder (``qfl.wire.format`` and the operators in ``qfl.compress``); the
numba kernels are native code it cannot see, which is why the fallback driver also
mutates *structure* (varints, counts, block lengths, truncations, splices) rather than
only bits. Run with ``NUMBA_BOUNDSCHECK=1`` (and a fresh ``NUMBA_CACHE_DIR``) to turn any
out-of-bounds access in a kernel into an ``IndexError``, i.e. a finding.

Input layout. Every blob carries a checksum, so nearly every mutation would be rejected
by the checksum before reaching the parser. The first input byte therefore selects
how the rest is used: an even byte means "content": the harness frames it with a
valid header, length and checksum (what :func:`frame` does), so mutations reach the
parser; an odd byte means "raw": the rest is decoded as it is (framing, checksum,
concatenation), and raw bytes that begin with the container magic are decoded as
the container a message carries (:mod:`qfl.wire.container`: names, lengths, and
blobs per tensor). The decoder itself has no switch to skip the checksum.

Contract checked for every input (:func:`check_one`):

* ``decode_all(blob, limits)`` (``decode_container`` for a container) returns payloads
  or raises ``WireFormatError``; nothing else escapes (no IndexError, MemoryError,
  OverflowError, numba error...).
* A container it accepts is exactly what ``pack`` writes for the entries it found.
* Every payload decompresses to a tensor of its declared shape and dtype, and
  re-encodes to a blob that decodes to the bit-identical tensor: the decoder accepts
  only what the encoder can produce.
* The declared element counts stay within ``limits``.
* Time: an input that runs past ``--timeout`` seconds is a hang: a C-level watchdog
  (``faulthandler``, which needs no GIL, so it fires inside numba code too) dumps the
  stacks and exits with status 1; the input is left in ``<out>/current-input``.
* Memory: the peak resident set of each input (``VmHWM``, reset per input through
  ``/proc/self/clear_refs``) must stay below ``--rss-budget-mb`` plus 32 bytes per
  element of ``max_total_elements``; larger is a finding.

Findings (the input, and what went wrong) are written to ``--out``; the command prints
a JSON summary (inputs run, accepted/rejected, distinct rejection reasons, slowest
input, peak RSS) and exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import hashlib
import json
import random
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .container import CONTAINER_MAGIC, Group, decode_container, pack, unpack
from .format import decode, decode_all, encode
from .fuzz_inputs import (
    FUZZ_LIMITS,
    SPECS,
    as_content_input,
    as_raw_input,
    content_of,
    frame,
    hostile_inputs,
    mutate,
    seed_corpus,
    to_blob,
)
from .layout import Limits, WireFormatError, varint

__all__ = [
    "BYTES_PER_ELEMENT",
    "FUZZ_LIMITS",
    "SPECS",
    "ContractViolation",
    "Findings",
    "PeakRSS",
    "as_content_input",
    "bits_of",
    "as_raw_input",
    "check_one",
    "content_of",
    "frame",
    "hostile_inputs",
    "main",
    "measure",
    "mutate",
    "replay",
    "run_atheris",
    "run_random",
    "seed_corpus",
    "to_blob",
    "varint",
]

#: Bytes of resident memory allowed per element of ``max_total_elements``.
BYTES_PER_ELEMENT = 32


class ContractViolation(AssertionError):
    """The decoder broke its contract on an input (not a clean WireFormatError)."""


# ----------------------------------------------------------------------- contract
def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The tensor as integers of its width: bit-identical values compare equal (NaNs, -0.0)."""
    t = t.contiguous()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t.to(torch.int64) if t.dtype == torch.bool else t


def check_one(data: bytes, limits: Limits = FUZZ_LIMITS) -> str | None:
    """Check the decoder's contract on one input; returns the rejection message (None
    if the input decoded) and raises ContractViolation (or the escaping exception)."""
    blob = to_blob(data)
    container = blob[: len(CONTAINER_MAGIC)] == CONTAINER_MAGIC
    try:
        if container:
            payloads = [p for ps in decode_container(blob, limits).values() for p in ps]
        else:
            payloads = decode_all(blob, limits)
    except WireFormatError as exc:
        return str(exc)
    if container and pack({k: v if isinstance(v, Group) else bytes(v) for k, v in unpack(blob).items()}) != blob:
        raise ContractViolation("an accepted container is not what pack writes for its entries")
    total = 0
    for p in payloads:
        if p.numel > limits.max_elements or len(p.shape) > limits.max_ndim:
            raise ContractViolation(f"accepted shape {p.shape} beyond {limits}")
        total += p.numel
        y = p.decompress()
        if tuple(y.shape) != p.shape or y.dtype != p.dtype:
            raise ContractViolation(f"decompressed to {tuple(y.shape)} {y.dtype}, declared {p.shape} {p.dtype}")
        try:
            again = decode(encode(p), limits)
        except WireFormatError as exc:
            raise ContractViolation(
                f"a decoded payload ({p.op}, {p.shape}) does not survive re-encoding: {exc}"
            ) from None
        z = again.decompress()
        if again.op != p.op or not torch.equal(bits_of(y), bits_of(z)):
            raise ContractViolation(f"re-encoding a decoded payload ({p.op}, {p.shape}) changes it")
    if total > limits.max_total_elements:
        raise ContractViolation(f"accepted {total} elements in one array or container, beyond {limits}")
    return None


# ------------------------------------------------------------------------ memory
class PeakRSS:
    """Peak resident set size of this process, resettable on Linux (VmHWM / clear_refs)."""

    def __init__(self) -> None:
        self.resettable = self._try_reset()

    @staticmethod
    def _status_kb(field: str) -> int | None:
        """A memory figure of /proc/self/status (None where there is none)."""
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    @staticmethod
    def current_peak_kb() -> int:
        peak = PeakRSS._status_kb("VmHWM:")
        if peak is None:
            import resource

            peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return peak

    @staticmethod
    def current_kb() -> int:
        current = PeakRSS._status_kb("VmRSS:")
        return PeakRSS.current_peak_kb() if current is None else current

    @staticmethod
    def _try_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def reset(self) -> None:
        if self.resettable:
            self._try_reset()


def measure(data: bytes, limits: Limits = FUZZ_LIMITS) -> dict[str, float]:
    """Decode one input (as :func:`check_one` does) and report its cost: seconds, peak RSS
    above the resident set before it (MB), and the tracemalloc peak (numpy's buffers)."""
    import gc
    import tracemalloc

    gc.collect()
    rss = PeakRSS()
    before = rss.current_kb()
    rss.reset()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        outcome = check_one(data, limits)
    finally:
        seconds = time.perf_counter() - t0
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    peak = rss.current_peak_kb() if rss.resettable else float("nan")
    return {
        "seconds": seconds,
        "peak_rss_mb": (peak - before) / 1024,
        "tracemalloc_mb": traced / 2**20,
        "rejected": outcome is not None,
        "reason": outcome or "",
    }


# ------------------------------------------------------------------------ drivers
class Findings:
    """Where findings go, and the per-input watchdog and memory check."""

    def __init__(self, out: Path, limits: Limits, timeout: float, rss_budget_mb: float) -> None:
        self.out = out
        self.limits = limits
        self.timeout = timeout
        self.rss_budget_kb = 1024 * rss_budget_mb + BYTES_PER_ELEMENT * limits.max_total_elements / 1024
        self.found: list[dict] = []
        self.rss = PeakRSS()
        self.reasons: collections.Counter[str] = collections.Counter()
        self.accepted = self.rejected = 0
        self.slowest = (0.0, b"")
        self.peak_kb = 0
        out.mkdir(parents=True, exist_ok=True)
        self._current = open(out / "current-input", "wb")

    def record(self, kind: str, data: bytes, detail: str) -> None:
        name = f"{kind}-{hashlib.sha1(data).hexdigest()[:12]}"
        (self.out / name).write_bytes(data)
        self.found.append({"kind": kind, "file": str(self.out / name), "detail": detail[-2000:]})
        print(f"FINDING {kind}: {self.out / name}\n{detail[-2000:]}", file=sys.stderr, flush=True)

    def run(self, data: bytes) -> None:
        """Check one input; anything but a clean outcome becomes a finding."""
        self._current.seek(0)
        self._current.truncate()
        self._current.write(data)
        self._current.flush()
        before = self.rss.current_kb()
        self.rss.reset()
        faulthandler.dump_traceback_later(self.timeout, exit=True)
        t0 = time.perf_counter()
        try:
            reason = check_one(data, self.limits)
        except Exception as exc:
            faulthandler.cancel_dump_traceback_later()
            kind = "contract" if isinstance(exc, ContractViolation) else f"escaped-{type(exc).__name__}"
            self.record(kind, data, traceback.format_exc())
            return
        finally:
            faulthandler.cancel_dump_traceback_later()
        elapsed = time.perf_counter() - t0
        if reason is None:
            self.accepted += 1
        else:
            self.rejected += 1
            self.reasons[_reason_key(reason)] += 1
        if elapsed > self.slowest[0]:
            self.slowest = (elapsed, data)
        if elapsed > self.timeout:  # finished, but past the limit (the watchdog missed it by a hair)
            self.record("slow", data, f"{elapsed:.3f} s > {self.timeout} s")
        peak = self.rss.current_peak_kb()
        self.peak_kb = max(self.peak_kb, peak)
        if self.rss.resettable and peak - before > self.rss_budget_kb:
            self.record(
                "memory", data, f"peak RSS {peak - before} kB above {before} kB > budget {self.rss_budget_kb:.0f} kB"
            )

    def summary(self, engine: str, runs: int, seconds: float) -> dict:
        return {
            "engine": engine,
            "inputs": runs,
            "seconds": round(seconds, 1),
            "accepted": self.accepted,
            "rejected": self.rejected,
            "distinct_rejections": len(self.reasons),
            "top_rejections": self.reasons.most_common(12),
            "slowest_input_s": round(self.slowest[0], 4),
            "peak_rss_mb": round(self.peak_kb / 1024, 1),
            "limits": vars(self.limits) if hasattr(self.limits, "__dict__") else str(self.limits),
            "findings": self.found,
        }

    def close(self) -> None:
        self._current.close()
        (self.out / "current-input").unlink(missing_ok=True)


def _reason_key(message: str) -> str:
    """A rejection message without its numbers (to count distinct reasons)."""
    return re.sub(r"\d+", "N", message.split(" (at content byte")[0])[:100]


def run_random(
    runs: int,
    findings: Findings,
    seed: int = 0,
    corpus: Sequence[bytes] | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """The fallback driver: mutate seeds (and inputs that decoded) for ``runs`` inputs."""
    rnd = random.Random(seed)
    pool = list(corpus if corpus is not None else seed_corpus(seed))
    accepted_pool: list[bytes] = []
    for i in range(runs):
        if i < len(pool):
            data = pool[i]  # every seed once, unmutated
        else:
            parent = rnd.choice(accepted_pool) if accepted_pool and rnd.random() < 0.3 else rnd.choice(pool)
            data = mutate(parent, rnd, pool)
        before = findings.accepted
        findings.run(data)
        if findings.accepted > before and len(accepted_pool) < 4096 and i >= len(pool):
            accepted_pool.append(data)  # mutants that still decode are good parents
        if progress is not None and i % 10_000 == 0:
            progress(i)
    return runs


def run_atheris(runs: int, findings: Findings, seed: int, extra: Sequence[str]) -> None:
    """Coverage-guided fuzzing with atheris/libFuzzer; exits the process when done."""
    import atheris

    targets = {
        "qfl.wire.container",
        "qfl.wire.format",
        "qfl.compress.base",
        "qfl.compress.chain",
        "qfl.compress.payload",
        "qfl.compress.quantizers",
        "qfl.compress.sparsifiers",
        "qfl.wire.fuzz",
        "qfl.wire.fuzz_inputs",
        "qfl.wire.layout",
    }
    import gc
    import types

    count = 0
    for obj in gc.get_objects():
        if type(obj) is types.FunctionType and obj.__module__ in targets:
            try:
                atheris.instrument_func(obj)
                count += 1
            except Exception:
                pass
    corpus_dir = findings.out / "corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for data in seed_corpus(seed):
        (corpus_dir / hashlib.sha1(data).hexdigest()[:16]).write_bytes(data)
    started = time.perf_counter()
    executed = [0]

    def report() -> None:
        summary = findings.summary("atheris", executed[0], time.perf_counter() - started)
        (findings.out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary, indent=1), flush=True)

    def one(data: bytes) -> None:
        executed[0] += 1
        findings.run(data)
        if findings.found:
            report()
            raise ContractViolation(findings.found[-1]["detail"])  # let libFuzzer save the crash and stop
        if executed[0] == runs:  # libFuzzer exits from C when done: no atexit handlers run
            report()

    print(f"atheris: instrumented {count} functions; corpus {corpus_dir}", file=sys.stderr, flush=True)
    argv = [
        sys.argv[0],
        str(corpus_dir),
        f"-runs={runs}",
        f"-seed={seed or 1}",
        f"-artifact_prefix={findings.out}/",
        f"-timeout={max(1, int(findings.timeout))}",
        "-rss_limit_mb=4096",
        "-max_len=65536",
        *extra,
    ]
    atheris.Setup(argv, one)
    atheris.Fuzz()


def replay(paths: Iterable[Path], findings: Findings) -> int:
    n = 0
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            findings.run(f.read_bytes())
            n += 1
    return n


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(prog="python -m qfl.wire.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100_000, help="inputs to run (default 100000)")
    p.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per input before it counts as a hang")
    p.add_argument("--max-elements", type=int, default=FUZZ_LIMITS.max_elements)
    p.add_argument("--max-total-elements", type=int, default=FUZZ_LIMITS.max_total_elements)
    p.add_argument(
        "--rss-budget-mb",
        type=float,
        default=64.0,
        help=f"per-input peak RSS allowed, plus {BYTES_PER_ELEMENT} bytes per max-total element",
    )
    p.add_argument("--out", default="fuzz-findings", help="directory for findings (and the atheris corpus)")
    p.add_argument("--replay", nargs="*", type=Path, help="re-check saved inputs instead of fuzzing")
    args = p.parse_args(argv)
    limits = Limits(
        max_elements=args.max_elements, max_ndim=FUZZ_LIMITS.max_ndim, max_total_elements=args.max_total_elements
    )
    findings = Findings(Path(args.out), limits, args.timeout, args.rss_budget_mb)
    # Warm up: the first decode of each kind compiles (or loads) numba kernels, which
    # must not count against the per-input time limit.
    for data in seed_corpus(args.seed):
        check_one(data, limits)
    started = time.perf_counter()
    if args.replay is not None:
        n = replay(args.replay, findings)
        engine = "replay"
    else:
        engine = args.engine
        if engine == "auto":
            try:
                import atheris  # noqa: F401

                engine = "atheris"
            except ImportError:
                engine = "random"
                print("atheris is not installed: using the fallback mutation driver", file=sys.stderr)
        if engine == "atheris":
            run_atheris(args.runs, findings, args.seed, extra)  # does not return
        n = run_random(
            args.runs,
            findings,
            args.seed,
            progress=lambda i: print(
                f"  {i} inputs, {len(findings.found)} findings, {time.perf_counter() - started:.0f} s",
                file=sys.stderr,
                flush=True,
            ),
        )
    findings.close()
    summary = findings.summary(engine, n, time.perf_counter() - started)
    (findings.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 1 if findings.found else 0


if __name__ == "__main__":
    raise SystemExit(main())
