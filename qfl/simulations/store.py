"""The one cache of the simulation workloads: derived arrays on disk, memory-mapped back.

What belongs here: keeping numpy arrays that are slow to derive (decoded IDX files,
partition index lists, tokenised plays) between processes, and nothing else; what the
arrays mean is the caller's business.

Why on disk and nothing in memory: in a deployment a ClientApp runs in a fresh process
for every message, so only a cache that outlives the process helps it. Measured on an
idle 2-core machine: gunzipping and checking the four Fashion-MNIST IDX files takes about
0.5 s, importing ``datasets`` + ``flwr_datasets`` 1.1 s, partitioning 60k labels 0.05 s
(IID, 20 clients) to 2.3 s (pathological, 200 clients), parsing and encoding the
Shakespeare plays 0.7 s; reading such arrays back from here takes under a millisecond per
file, so a second, in-process level would save nothing worth its code. The price: with
the cache off, every call derives its arrays again.

An entry is a directory of ``.npy`` files named after a hash of the caller's key. It is
written in a temporary directory renamed into place, so concurrent processes never read
a half-written entry; an entry that does not load (or that the caller's check refuses)
is rebuilt. ``$QFL_CACHE_DIR`` moves the cache (default: the per-user cache directory,
``~/.cache/qfl`` on Linux) and ``QFL_CACHE_DIR=off`` turns it off. A cache that cannot be
written costs only the speed-up: a warning, and the arrays computed in memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["CACHE_DIR_ENV", "cache_dir", "cached_arrays"]

#: Environment variable naming the cache directory ("off" disables it).
CACHE_DIR_ENV = "QFL_CACHE_DIR"
_OFF = ("off", "none", "0", "false", "no")

Arrays = Mapping[str, np.ndarray]


def cache_dir() -> Path | None:
    """The cache directory, or None when ``$QFL_CACHE_DIR`` turns the cache off."""
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("qfl"))


def _load(entry: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    try:
        return {name: np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}
    except (OSError, ValueError):
        return None


def _write(entry: Path, arrays: Arrays, broken: bool) -> None:
    """Write the entry in a temporary sibling directory, then rename it into place
    (over ``entry`` only when it is ``broken``: a complete one is another process's)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
        try:
            for name, arr in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
            if broken:
                shutil.rmtree(entry, ignore_errors=True)
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry.is_dir():  # not another process finishing first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        warnings.warn(f"qfl: could not write cache entry {entry}: {exc}", stacklevel=3)


def cached_arrays(
    kind: str,
    key: str,
    names: tuple[str, ...],
    compute: Callable[[], Arrays],
    check: Callable[[Arrays], bool] = lambda arrays: True,
) -> Arrays:
    """The arrays ``compute()`` returns for ``key``, from the cache when an entry loads.

    ``key`` must change whenever the result would (source files, parameters, library
    versions); ``names`` are the arrays ``compute`` returns, and ``check`` refuses an
    entry whose arrays are not what the caller expects (it is then rebuilt). Arrays read
    from the cache are read-only memory maps.
    """
    root = cache_dir()
    entry, broken = None, False
    if root is not None:
        entry = root / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
        if entry.is_dir():
            cached = _load(entry, names)
            if cached is not None and check(cached):
                return cached
            broken = True
    arrays = compute()
    if set(arrays) != set(names):
        raise ValueError(f"cache {kind!r}: computed arrays {sorted(arrays)}, declared {sorted(names)}")
    if entry is not None:
        _write(entry, arrays, broken)
    return arrays
