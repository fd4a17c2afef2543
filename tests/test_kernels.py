"""Compiled kernels as a process sees them: where they are cached, and results that do not
depend on the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qfl.compress import runtime
from qfl.warm import dispatchers

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_kernels_are_cached_outside_the_package():
    found = dispatchers()
    assert len(found) > 40  # every kernel module is scanned, _sparse_kernels and _elias included
    for d in found:
        path = Path(d.stats.cache_path).resolve()
        assert not path.is_relative_to(runtime.PACKAGE_DIR), (d.py_func.__qualname__, path)
        assert path.is_relative_to(runtime.cache_dir().resolve()), (d.py_func.__qualname__, path)
    assert not list(runtime.PACKAGE_DIR.rglob("*.nbi")), "numba wrote an index into the package"


def test_twin_variants_have_their_own_cache_entries():
    # numba's cache index is keyed by name and types, not by parallel=: a shared entry
    # would hand the parallel machine code to the serial variant.
    from qfl.compress import _kernels as K

    bases = {K._levels.parallel._cache._impl.filename_base, K._levels.serial._cache._impl.filename_base}
    assert len(bases) == 2, bases


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    import numba

    from qfl.compress import _kernels as K

    body, source = K.bucket_norms.py_func, K.__file__
    if sys.platform == "linux":  # XDG_CACHE_HOME moves the per-user cache directory
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert runtime.cache_dir() == tmp_path / "xdg" / "qfl" / "numba"
        assert Path(runtime.UserCacheLocator.from_function(body, source).get_cache_path()).is_relative_to(tmp_path)
    # Another package's functions keep numba's own locators.
    assert runtime.UserCacheLocator.from_function(json.dumps, json.__file__) is None
    # NUMBA_CACHE_DIR (numba.config.CACHE_DIR) wins: numba's own locator then serves qfl too.
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba"))
    assert runtime.cache_dir() == tmp_path / "numba"
    assert runtime.UserCacheLocator.from_function(body, source) is None


_THREADS = """
import hashlib, json, numba, torch, qfl
from qfl.compress import runtime
from qfl.wire import decode, encode
big = torch.randn(4_500_000, generator=torch.Generator().manual_seed(5)) * torch.rand(4_500_000) ** 3
x = big[:700_000]
specs = [(x, "qsgd(16)"), (big, "qsgd(255, bucket=512)"), (big, "grid(8)"), (x, "grid(3)"), (big, "fp16"),
         (x, "topk(0.01)"), (x, "topk(0.3) | qsgd(16)"), (x, "bernoulli(budget=0.05) | grid(4)"),
         (x, "bernoulli(0.1)"), (x, "randk(0.01) | qsgd(4)"), (x, "topk(0.02) | sign")]
out = {}
for mode, threads in (("serial", 2), ("parallel", 1), ("parallel", 2)):
    runtime.FORCE_PARALLEL = mode == "parallel"
    numba.set_num_threads(threads)
    digests = []
    for t, s in specs:
        blob = encode(qfl.parse(s).compress(t, torch.Generator().manual_seed(1)))
        y = decode(blob).decompress()
        digests.append(hashlib.sha256(blob).hexdigest() + hashlib.sha256(y.numpy().tobytes()).hexdigest())
    out[f"{mode}-{threads}"] = digests
print(json.dumps(out))
"""


def test_bytes_do_not_depend_on_thread_count():
    # The same bytes (and decoded values) from the serial variants and from the parallel
    # ones on 1 and on 2 numba threads: counter-based randomness, fixed reduction order,
    # chunking independent of the thread count. A subprocess, so that 2 threads exist
    # even where the test run itself is limited to one. Dense specs on 4.5M elements:
    # buffers beyond runtime.HUGE_BUFFER, which parallel writers get faulted in first.
    out = subprocess.run(
        [sys.executable, "-c", _THREADS], env=_env(NUMBA_NUM_THREADS="2"), capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["parallel-1"] == runs["serial-2"]
    assert runs["parallel-2"] == runs["serial-2"]


def test_fault_in_touches_only_large_buffers_a_parallel_writer_fills():
    n = runtime.HUGE_BUFFER + 3 * (1 << 21) + 5
    buf = np.full(n, 7, np.uint8)
    assert runtime.fault_in(buf, parallel=False) is buf and (buf == 7).all()
    small = np.full(runtime.HUGE_BUFFER - 1, 7, np.uint8)
    assert (runtime.fault_in(small, parallel=True) == 7).all()
    runtime.fault_in(buf, parallel=True)  # one byte per huge page, written before the writer's own
    touched = np.flatnonzero(buf != 7)
    assert touched.tolist() == list(range(0, n, 1 << 21)) and (buf[touched] == 0).all()
    grid = runtime.empty((runtime.HUGE_BUFFER // 16, 8), np.float32, parallel=True)
    assert grid.shape == (runtime.HUGE_BUFFER // 16, 8) and grid.dtype == np.float32 and grid.flags.c_contiguous
    runtime.FORCE_PARALLEL = False
    try:  # None follows the kernels' own choice
        assert (runtime.fault_in(np.full(n, 7, np.uint8)) == 7).all()
    finally:
        runtime.FORCE_PARALLEL = None


@pytest.mark.slow
def test_no_process_compiles_what_warm_compiled(tmp_path):
    env = _env(XDG_CACHE_HOME=str(tmp_path))
    for expect_compiled in (True, False):
        out = subprocess.run(
            [sys.executable, "-m", "qfl", "warm"], env=env, capture_output=True, text=True, timeout=3600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        compiled = int(out.stdout.split("warm: ")[1].split()[0])
        assert (compiled > 0) == expect_compiled, out.stdout
    assert str(tmp_path) in out.stdout
