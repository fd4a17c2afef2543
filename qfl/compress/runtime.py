"""Where qfl's compiled kernels are cached and how many threads they may use.

This is process-wide policy, kept apart from the math in ``_kernels`` and
``qfl.wire._bits``: the kernels state *what* they compute (and compute it identically
for any thread count), this module decides *where* and *on how many cores*.

Cache. numba's default puts ``cache=True`` kernels in the package's own
``__pycache__``: a read-only install (a system site-packages, a container image)
recompiles every kernel in every process -- 15+ s before the first message, and a
deployed ClientApp may be a fresh process per message. qfl's kernels are cached under
the user's cache directory instead (``platformdirs.user_cache_dir("qfl")/numba``), never
in the installed package; ``NUMBA_CACHE_DIR`` (or ``NUMBA_CACHE_LOCATOR_CLASSES``) in the
environment overrides that, as numba documents. ``python -m qfl warm`` compiles every
kernel once, so that no later process compiles what an earlier one did. Other packages'
numba functions keep numba's default: only files inside qfl are located here.

Threads. Parallel variants run only for large inputs, only when the cores are not
saturated, one caller at a time (:func:`parallel_slot`), and on no more threads than
the cores this process may run on. qfl always shares its process with PyTorch, and
PyTorch's CPU build brings its own libgomp: numba's OpenMP layer loads the system's,
a second pool. libgomp workers spin for up to ~300k pause loops (milliseconds) after
every parallel region before they sleep, so each pool's spinning workers take the
cores the other pool's next region needs -- training steps right after a compression,
compression right after a training step. qfl therefore starts numba's pool with
passive waiting (:func:`start_pool`), leaving PyTorch's pool as the user configured it;
in Ray workers it uses the workqueue layer (:func:`threading_layer`).
benchmarks/train_overlap.py measures training steps interleaved with compression
under each choice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numba as nb
import numba.core.caching as _caching
import numpy as np
import platformdirs

log = logging.getLogger(__name__)

#: The directory of the qfl package: only kernels defined below it are cached here.
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """Where qfl's compiled kernels live in this process.

    ``NUMBA_CACHE_DIR`` when set (numba's own locator then serves every package), else
    the per-user cache directory, which ``XDG_CACHE_HOME`` moves on Linux.
    """
    if nb.config.CACHE_DIR:
        return Path(nb.config.CACHE_DIR)
    return Path(platformdirs.user_cache_dir("qfl")) / "numba"


_BaseLocator = getattr(_caching, "UserProvidedCacheLocator", None) or _caching._UserProvidedCacheLocator
_CacheImpl = getattr(_caching, "CacheImpl", None) or _caching._CacheImpl
_fallback: list[str] = []


class UserCacheLocator(_BaseLocator):  # type: ignore[misc, valid-type]
    """numba cache locator for qfl's kernels: the per-user cache directory.

    When that directory cannot be written, a temporary directory for this process
    serves instead (logged once): compiling again is slow, but writing into the
    installed package -- numba's next locator -- is what this class exists to prevent.
    """

    def __init__(self, py_func, py_file):
        super().__init__(py_func, py_file)
        self._cache_path = os.path.join(self._root(), self.get_suitable_cache_subpath(py_file))

    @staticmethod
    def _root() -> str:
        return _fallback[0] if _fallback else str(cache_dir())

    @classmethod
    def from_function(cls, py_func, py_file):
        if nb.config.CACHE_DIR or not Path(py_file).resolve().is_relative_to(PACKAGE_DIR):
            return None  # numba's own locators: NUMBA_CACHE_DIR, or not one of ours
        if not os.path.exists(py_file):
            return None
        self = cls(py_func, py_file)
        try:
            self.ensure_cache_path()
        except OSError as exc:
            if _fallback:
                raise
            _fallback.append(tempfile.mkdtemp(prefix="qfl-numba-"))
            log.warning(
                "qfl: cannot write numba's kernel cache in %s (%s); compiling into %s for this process "
                "only. Set NUMBA_CACHE_DIR to a writable directory to keep compiled kernels.",
                cache_dir(),
                exc,
                _fallback[0],
            )
            self = cls(py_func, py_file)
            self.ensure_cache_path()
        return self


def _install_locator() -> None:
    """Put :class:`UserCacheLocator` right after numba's NUMBA_CACHE_DIR locator, before
    the in-tree one that would write into the package."""
    classes = _CacheImpl._locator_classes
    if UserCacheLocator not in classes:
        classes.insert(classes.index(_BaseLocator) + 1, UserCacheLocator)


_install_locator()


# --------------------------------------------------------------------------- threads
def threading_layer() -> str | None:
    """The numba threading layer qfl asks for in this process (None: numba's choice).

    Flower's simulation engine runs every virtual client as a Ray actor on one host,
    each training with PyTorch's own OpenMP threads. numba's OpenMP layer adds the
    system libgomp's pool to each (loading any kernel whose call graph holds a parallel
    loop starts it, even if no parallel loop runs), and a round of 20 sign-top-k
    clients on two cores then took 9.2 s instead of 1.6 s under the workqueue layer
    (benchmarks/client_threads.py). Elsewhere the OpenMP layer stays: its parallel
    regions are several times cheaper to enter (grid(8) on 10M elements: 18 ms vs 33 ms
    encode + decode). NUMBA_THREADING_LAYER in the environment always wins.
    """
    if "NUMBA_THREADING_LAYER" in os.environ or "ray" not in sys.modules:
        return None
    return "workqueue"


if (_LAYER := threading_layer()) is not None:
    nb.config.THREADING_LAYER = _LAYER


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        return os.cpu_count() or 1


#: Environment variables by which a user sets libgomp's waiting; qfl then leaves it alone.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_pool_lock = threading.Lock()
_pool_started = [False]


def start_pool() -> int:
    """Start numba's thread pool once, its OpenMP workers waiting passively; returns
    numba's thread count.

    libgomp reads its wait policy when it is loaded, which for numba's OpenMP layer is
    now (PyTorch's libgomp, loaded with ``import torch``, is another copy and keeps its
    settings). The variable is set only for that moment and only if the user set
    neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``.
    """
    if _pool_started[0]:
        return nb.get_num_threads()
    with _pool_lock:
        if not _pool_started[0]:
            passive = not any(k in os.environ for k in _WAIT_SETTINGS)
            if passive:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
            try:
                nb.get_num_threads()  # loads the threading layer
            finally:
                if passive:
                    del os.environ["OMP_WAIT_POLICY"]
            _pool_started[0] = True
    return nb.get_num_threads()


#: Below this many elements kernels run serially: starting a parallel region costs
#: more than it can save.
PARALLEL_MIN = 1 << 18
#: Tests set this to True/False to force the parallel/serial variants.
FORCE_PARALLEL: bool | None = None
_load_checked = [-1.0, True]


def use_parallel(n: int) -> bool:
    """Whether a kernel over ``n`` elements should run its parallel variant.

    Only for large inputs, and, unless ``NUMBA_NUM_THREADS`` is set, only while the
    cores are not already saturated (1-minute load average below the CPU count, re-read
    at most once a second). On a machine that other processes keep busy -- Flower's
    simulation engine runs many clients on one host; CI runners are shared -- every
    parallel region waits for a worker thread the scheduler has parked, at a scheduler
    tick (4 ms) or more each time, which costs more than the second core saves. A thread
    count set in the environment is the user's decision and is honoured whatever the
    load (the load average also counts this process's own threads, so a process that
    keeps its cores busy would otherwise switch itself to serial kernels). Results do
    not depend on the choice (counter-based randomness, fixed reduction order).
    """
    if FORCE_PARALLEL is not None:
        return FORCE_PARALLEL and n > 0
    if n < PARALLEL_MIN or start_pool() < 2 or usable_cores() < 2:
        return False
    if "NUMBA_NUM_THREADS" in os.environ:
        return True
    return not saturated()


def saturated() -> bool:
    """Whether other work already keeps this process's cores busy: the 1-minute load
    average at or above their count (re-read at most once a second). Then a parallel
    region, numba's or PyTorch's, waits for threads the scheduler has parked
    (:func:`use_parallel`)."""
    now = time.monotonic()
    if now - _load_checked[0] > 1.0:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - platforms without a load average
            load = 0.0
        _load_checked[0] = now
        _load_checked[1] = load < usable_cores()
    return not _load_checked[1]


#: numpy backs buffers of 4 MiB or more with transparent huge pages (``madvise``), and
#: so does qfl.wire's ``Blob``: from this size on, :func:`fault_in` matters.
HUGE_BUFFER = 1 << 22
#: A transparent huge page (x86-64): one touch faults all of it in.
_HUGE_PAGE = 1 << 21


def fault_in(buf: np.ndarray, parallel: bool | None = None) -> np.ndarray:
    """Fault a fresh buffer's pages in from this thread when a parallel writer is about
    to write it; returns ``buf``. ``parallel`` says whether the writer runs on several
    threads (PyTorch's own pool, say); None: whether qfl's kernels would (:func:`use_parallel`).

    Why: with huge pages, first touches from numba's threads are intermittently
    pathological. Measured on the 2-vCPU machine (kernel 6.18, THP ``madvise``, defrag
    ``madvise``), the parallel dequantisation of 10M levels into a fresh numpy buffer
    took 4.4 ms in some runs of calls and 45-50 ms in others, against 3.4-4.7 ms
    serially (page faults included) and 1-2 ms into a buffer already faulted in; into
    4 KB pages ~9 ms either way; two Python threads filling halves of a fresh buffer
    never showed it (benchmarks/fault_in.py: median 5.2 ms with this, 4.4 without; worst
    call 5.9 ms with, 45 without). One byte written
    every 2 MiB, serially, faults every huge page in (1.4 ms per 40 MB; the 4 KB pages
    at an unaligned head or tail, and all pages where huge ones are refused, are left to
    the writer, whose threads fault those without harm), after which the parallel
    kernel runs at its speed. Serial writers need no touch (their faults are already
    serial), so nothing is done for them, nor for buffers too small for huge pages.
    """
    if buf.nbytes >= HUGE_BUFFER and (use_parallel(buf.size) if parallel is None else parallel):
        buf.reshape(-1).view(np.uint8)[::_HUGE_PAGE] = 0
    return buf


def empty(shape, dtype, parallel: bool | None = None) -> np.ndarray:
    """``np.empty`` for the output of a writer that may run in parallel (:func:`fault_in`)."""
    return fault_in(np.empty(shape, dtype), parallel)


_SLOT = threading.Lock()


@contextlib.contextmanager
def parallel_slot(n: int) -> Iterator[bool]:
    """Whether a kernel over ``n`` elements runs its parallel variant, holding the
    process's one parallel slot while it does.

    The workqueue layer (see :func:`threading_layer`) terminates the process when two
    threads enter parallel code at once (a server decoding replies in a thread pool
    would); a caller that finds the slot taken runs the serial variant instead, with
    the same result. While it holds the slot, numba runs on at most as many threads as
    the process has usable cores.
    """
    if use_parallel(n) and _SLOT.acquire(blocking=False):
        threads = start_pool()
        try:
            nb.set_num_threads(max(1, min(threads, usable_cores())))
            yield True
        finally:
            nb.set_num_threads(threads)
            _SLOT.release()
    else:
        yield False


class Twin:
    """One kernel body, compiled twice: ``parallel`` (its ``prange`` loops split across
    numba's threads) and ``serial`` (``prange`` is ``range``, no parallel region at all,
    so it is safe from any thread under the workqueue layer).

    Calling it with the element count first runs the variant :func:`parallel_slot`
    grants; both give the same result, since no body's output depends on how its
    iterations are split.
    """

    def __init__(self, body):
        self.__doc__ = body.__doc__
        self.__name__ = body.__name__
        self.parallel = nb.njit(parallel=True, cache=True)(body)
        # A distinct qualified name gives the serial variant its own cache entry: numba's
        # cache index is keyed by the function's name and types, not by parallel=.
        serial = types.FunctionType(body.__code__, body.__globals__, body.__name__, body.__defaults__, body.__closure__)
        serial.__qualname__ = body.__qualname__ + ".serial"
        self.serial = nb.njit(cache=True)(serial)

    def variant(self, parallel: bool):
        return self.parallel if parallel else self.serial

    def __call__(self, n: int, *args):
        if n < PARALLEL_MIN and FORCE_PARALLEL is None:  # what use_parallel says, without the slot's overhead
            return self.serial(*args)
        with parallel_slot(n) as parallel:
            return self.variant(parallel)(*args)


def twin(body) -> Twin:
    """Decorator: see :class:`Twin`."""
    return Twin(body)
