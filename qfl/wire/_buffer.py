"""The ``bytes`` object a blob travels in, written once, in place.

Flower ships an Array's ``data`` as ``bytes``. Assembling a blob from pieces and joining
them writes it twice, and a fresh 40 MB ``bytes`` is mmap'ed by glibc and faulted in 4 KB
pages (~10 ms for 40 MB here, as long as the copy itself). So the encoder asks CPython
for an uninitialised ``bytes`` of the final size (``PyBytes_FromStringAndSize(NULL, n)``,
the C API's way of building a ``bytes`` in place), asks the kernel to back a large one
with huge pages (what numpy does for its own buffers: a 2 MB fault instead of 512 4 KB
ones), and writes every section straight into it, before anyone else can see it.
Elsewhere than CPython on Linux it falls back to a ``bytearray`` copied once.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np

#: Below this size a blob is built in a bytearray and copied: the copy costs less than
#: the ctypes calls.
IN_PLACE_MIN = 1 << 16
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
        if _api is not None and n >= IN_PLACE_MIN:
            self._bytes = _api.PyBytes_FromStringAndSize(None, n)
            addr = _api.PyBytes_AsString(self._bytes)
            if _madvise is not None and n >= 2 * _HUGE:
                start = -(-addr // _HUGE) * _HUGE
                end = (addr + n) // _HUGE * _HUGE
                _madvise(start, end - start, _MADV_HUGEPAGE)  # advice only: a refusal costs speed, not data
            self.view = np.frombuffer((ctypes.c_char * n).from_address(addr), np.uint8)
            self._keep = None
        else:
            self._keep = bytearray(n)
            self.view = np.frombuffer(self._keep, np.uint8)

    def finish(self) -> bytes:
        """The filled blob; the buffer must not be written after this."""
        view, self.view = self.view, None
        del view
        if self._bytes is not None:
            out, self._bytes = self._bytes, None
            return out
        out = bytes(self._keep)
        self._keep = None
        return out
