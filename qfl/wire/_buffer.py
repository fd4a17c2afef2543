"""The ``bytes`` object a blob travels in, written once in place, and its checksum.

Flower ships an Array's ``data`` as ``bytes``. Assembling a blob from pieces and joining
them writes it twice, and a fresh 40 MB ``bytes`` is mmap'ed by glibc and faulted in 4 KB
pages (~10 ms for 40 MB here, as long as the copy itself). So the encoder asks CPython
for an uninitialised ``bytes`` of the final size (``PyBytes_FromStringAndSize(NULL, n)``,
the C API's way of building a ``bytes`` in place), asks the kernel to back a large one
with huge pages (what numpy does for its own buffers: a 2 MB fault instead of 512 4 KB
ones), faults it in from one thread when several will write it (huge pages faulted from
two threads at once cost ~10x more here: :func:`qfl.compress.runtime.fault_in`), and
writes every section straight into it, before anyone else can see it.
Elsewhere than CPython on Linux it falls back to a ``bytearray`` copied once.

The checksum (wire format 3) is XXH3-64 over the little-endian XXH3-64 digests of the
content's :data:`SEGMENT`-byte segments. Segments are independent, so a large blob is
written and checksummed by two threads, each over its own segments (xxhash and numpy's
copies release the GIL), and each segment of a piece is checksummed right after it is
copied, from its source bytes still in the cache: the content is read from memory once
on each side.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from ..compress import runtime

#: Content bytes per checksum segment: part of the wire format.
SEGMENT = 1 << 20
#: Pieces below this size are copied first and checksummed from the blob with the bytes
#: around them; larger ones a segment at a time (:func:`fill`).
_PIECE = 1 << 18
#: Below this size a blob is built in a bytearray and copied: the copy costs less than
#: the ctypes calls.
IN_PLACE_MIN = 1 << 16
#: Smallest content worth a second thread (a thread hand-off costs ~50 us).
PARALLEL_MIN = 4 * SEGMENT
_HUGE = 1 << 21
_MADV_HUGEPAGE = 14

_api = None
if sys.implementation.name == "cpython":
    _api = ctypes.pythonapi
    _api.PyBytes_FromStringAndSize.restype = ctypes.py_object
    _api.PyBytes_FromStringAndSize.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
    _api.PyBytes_AsString.restype = ctypes.c_void_p
    _api.PyBytes_AsString.argtypes = [ctypes.py_object]

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        _madvise = None


class Blob:
    """A buffer of ``n`` bytes to fill through :attr:`view`, then hand out with :meth:`finish`."""

    def __init__(self, n: int) -> None:
        self._bytes: bytes | None = None
        self._keep: bytearray | None = None
        if _api is not None and n >= IN_PLACE_MIN:
            self._bytes = _api.PyBytes_FromStringAndSize(None, n)
            addr = _api.PyBytes_AsString(self._bytes)
            if _madvise is not None and n >= 2 * _HUGE:
                start = -(-addr // _HUGE) * _HUGE
                end = (addr + n) // _HUGE * _HUGE
                _madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal costs speed, not data
            self.view = runtime.fault_in(np.frombuffer((ctypes.c_char * n).from_address(addr), np.uint8))
        else:
            self._keep = bytearray(n)
            self.view = np.frombuffer(self._keep, np.uint8)

    def finish(self) -> bytes:
        """The filled blob; the buffer must not be written after this."""
        self.view = None
        if self._bytes is not None:
            out, self._bytes = self._bytes, None
            return out
        out = bytes(self._keep)
        self._keep = None
        return out


# ------------------------------------------------------------------------ threads
_pool: dict[int, ThreadPoolExecutor] = {}  # by process id: a forked child has no workers
_pool_lock = threading.Lock()


def _threads(nbytes: int) -> int:
    """Threads for ``nbytes`` of content: numba's thread count (what the user gave qfl's
    kernels), within the cores usable, only for large blobs on cores that are not busy
    (:func:`qfl.compress.runtime.use_parallel`, which counts float32 elements)."""
    if nbytes < PARALLEL_MIN or not runtime.use_parallel(nbytes // 4):
        return 1
    return max(1, min(runtime.start_pool(), runtime.usable_cores()))


def _run(count: int, work: Callable[[int, int], None], threads: int) -> None:
    """``work(lo, hi)`` over ``range(count)`` split into ``threads`` contiguous ranges,
    the first in this thread, the others in a pool kept for the process."""
    if threads <= 1 or count <= 1:
        work(0, count)
        return
    pid = os.getpid()
    pool = _pool.get(pid)
    if pool is None:
        with _pool_lock:
            pool = _pool.get(pid)
            if pool is None:
                _pool.clear()  # the parent's, whose threads did not survive the fork
                pool = _pool[pid] = ThreadPoolExecutor(runtime.usable_cores(), thread_name_prefix="qfl-wire")
    bounds = [count * t // threads for t in range(threads + 1)]
    futures = [pool.submit(work, bounds[t], bounds[t + 1]) for t in range(1, threads)]
    try:
        work(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


# ----------------------------------------------------------------------- checksum
def _combine(digests: np.ndarray) -> bytes:
    return xxhash.xxh3_64_intdigest(digests).to_bytes(8, "little")


def digest(content: np.ndarray | memoryview) -> bytes:
    """The checksum of a blob's content, as the blob carries it (8 bytes)."""
    content = np.frombuffer(content, np.uint8) if not isinstance(content, np.ndarray) else content
    n = content.size
    if 0 < n <= SEGMENT:  # one segment: its digest combined, without the segment loop's setup
        return _combine(np.array([xxhash.xxh3_64_intdigest(content)], "<u8"))
    digests = np.empty(-(-n // SEGMENT), "<u8")

    def work(lo: int, hi: int) -> None:
        for s in range(lo, hi):
            h = xxhash.xxh3_64()  # the object's update releases the GIL, the one-shot function does not
            h.update(content[s * SEGMENT : s * SEGMENT + SEGMENT])
            digests[s] = h.intdigest()

    _run(digests.size, work, _threads(n))
    return _combine(digests)


def fill(content: np.ndarray, pieces: list[tuple[int, np.ndarray]]) -> bytes:
    """Write each ``(offset, uint8 array)`` into ``content`` and return the checksum of
    all of it (bytes between the pieces are already written: sections a coder wrote in
    place).

    A large piece is copied one checksum segment (1 MiB) at a time and the segment is
    checksummed from the *source* bytes just copied (the same bytes, still in cache), so
    the content is read from memory once. Copies of a segment, not of smaller slices:
    below glibc's streaming threshold (a fraction of the cache; between 256 KiB and
    1 MiB on the 2-vCPU AMD EPYC here) ``memcpy`` stores through the cache, and then a
    destination a few bytes past the source modulo 4 KiB -- which the blob's header and
    CPython's ``bytes`` header decide, not us -- makes every load wait for the stores
    before it (4K aliasing): identity's 40 MB took 20 ms to write in 256 KiB slices at
    two header lengths out of three, 7.5-8.5 ms at every length in 1 MiB ones.
    """
    n = content.size
    small = [(o, a) for o, a in pieces if a.size < _PIECE]
    large = [(o, a) for o, a in pieces if a.size >= _PIECE]
    for o, a in small:
        content[o : o + a.size] = a
    digests = np.empty(-(-n // SEGMENT), "<u8")

    def work(lo: int, hi: int) -> None:
        for s in range(lo, hi):
            h = xxhash.xxh3_64()
            start, end = s * SEGMENT, min(n, s * SEGMENT + SEGMENT)
            at = start  # content[start:at] is in the digest
            for o, a in large:  # in offset order (the encoder's sections): checked below
                lo_, hi_ = max(o, start), min(o + a.size, end)
                if lo_ >= hi_:
                    continue
                if lo_ > at:
                    h.update(content[at:lo_])
                src = a[lo_ - o : hi_ - o]
                content[lo_:hi_] = src
                h.update(src)
                at = hi_
            if end > at:
                h.update(content[at:end])
            digests[s] = h.intdigest()

    if any(o2 < o1 + a1.size for (o1, a1), (o2, _) in zip(large, large[1:])):
        raise ValueError("large pieces must be given in offset order, without overlap")
    _run(digests.size, work, _threads(n))
    return _combine(digests)
