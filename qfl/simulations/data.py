"""Fashion-MNIST loading and federated partitioning for qfl simulations.

Everything here is built around one constraint: in a real Flower deployment a
ClientApp runs in a *fresh process for every message*, so whatever a client
does before training (finding the files, decoding them, partitioning the
labels) is paid again each round.  Hence:

* the module imports only numpy at top level; ``torch`` and the Hugging Face
  ``datasets``/``flwr_datasets`` stack (~2 s to import) are imported lazily, and
  only when they are really needed;
* decoded arrays and partition index lists are cached per process (for the
  simulation engine, whose workers live for the whole run) *and* on disk as
  plain ``.npy``/``.npz`` files (for deployments), so a fresh process memory-maps
  a few files instead of gunzipping 26 MB and re-running a partitioner.

The disk cache lives in ``$QFL_CACHE_DIR`` (default ``$XDG_CACHE_HOME/qfl`` or
``~/.cache/qfl``); set ``QFL_CACHE_DIR=off`` to disable it.  Cache entries are
keyed by the source files' size and mtime (arrays) or by a hash of the labels
and all partitioning parameters (partitions), and written atomically, so
concurrent processes and updated data files are safe.

The raw data are the four IDX files of Fashion-MNIST, read by a small numpy IDX
parser that validates the header against the file size, so a truncated
download produces a readable error rather than a reshape failure deep inside
numpy.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "DATA_DIR_ENV",
    "CACHE_DIR_ENV",
    "DEBIAN_DATA_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "NUM_CLASSES",
    "PARTITION_SCHEMES",
    "FashionMNIST",
    "ClientData",
    "read_idx",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "partition_indices",
    "get_partition_indices",
    "client_data",
    "test_data",
    "normalize_images",
    "clear_caches",
]

#: Environment variable naming a directory that holds the four IDX files.
DATA_DIR_ENV = "QFL_DATA_DIR"
#: Environment variable naming the on-disk cache directory ("off" disables it).
CACHE_DIR_ENV = "QFL_CACHE_DIR"
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Base file names (each may also be present with a ``.gz`` suffix).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}

#: Pixel mean/std of the Fashion-MNIST training images after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242
NUM_CLASSES = 10
IMAGE_SIZE = 28

#: Partitioning schemes understood by :func:`partition_indices`.
PARTITION_SCHEMES = ("iid", "dirichlet", "pathological")

_DOWNLOAD_HINT = (
    "To get the data either install the Debian package "
    "(`apt-get install dataset-fashion-mnist`, which puts the files in "
    f"{DEBIAN_DATA_DIR}/), or download the four IDX files "
    "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from the "
    "Fashion-MNIST GitHub repository (zalandoresearch/fashion-mnist, "
    "folder data/fashion) into a directory and point the environment variable "
    f"{DATA_DIR_ENV} or the `data-dir` run-config key at it."
)

# IDX type codes -> big-endian numpy dtypes (the format stores data MSB first).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


# --------------------------------------------------------------------------- #
# IDX parsing
# --------------------------------------------------------------------------- #
def _read_bytes(path: Path) -> bytes:
    """Return the file's payload, transparently gunzipping it.

    Compression is detected from the content, not the suffix, so a mis-named
    file still works and a corrupt archive is reported as such.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"cannot read IDX file {path}: {exc}") from exc
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({exc}); re-download the file") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed.

    The header is checked against the payload size before numpy sees the
    data: a partial download would otherwise either fail with an opaque
    reshape error or, worse, silently yield fewer samples.

    Parameters
    ----------
    path : str or os.PathLike
        File to read. Gzip compression is detected from the content.

    Returns
    -------
    numpy.ndarray
        Read-only array in native byte order with the dims declared in the
        header (e.g. ``(60000, 28, 28)`` uint8 for training images).

    Raises
    ------
    ValueError
        If the file is not a well-formed IDX file: wrong magic number,
        unknown type code, zero dimensions, or a payload whose size differs
        from what the declared dimensions require. The message names the file.
    FileNotFoundError
        If the file cannot be read.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file: only {len(data)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{magic:08X} "
            "(expected 0x0000TTDD: two zero bytes, a type code, a dim count)"
        )
    type_code, ndim = data[2], data[3]
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"{path}: unknown IDX data type code 0x{type_code:02X} in magic number 0x{magic:08X} (known: {known})"
        )
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need "
            f"{header_size} header bytes but the file has {len(data)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = 1
    for d in dims:
        count *= d
    expected = header_size + count * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: header declares dims {dims} of "
            f"{dtype.name} ({expected - header_size} data bytes, "
            f"{expected} in total) but the file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header_size)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
        arr.flags.writeable = False
    return arr.reshape(dims)


# --------------------------------------------------------------------------- #
# Locating and loading Fashion-MNIST
# --------------------------------------------------------------------------- #
class FashionMNIST(NamedTuple):
    """The four Fashion-MNIST arrays (read-only: they are shared via caches)."""

    train_images: np.ndarray  # uint8, (60000, 28, 28)
    train_labels: np.ndarray  # int64, (60000,)
    test_images: np.ndarray  # uint8, (10000, 28, 28)
    test_labels: np.ndarray  # int64, (10000,)


def _resolve_file(directory: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _missing_files(directory: Path) -> list[str]:
    return [base for base in FASHION_MNIST_FILES.values() if _resolve_file(directory, base) is None]


def find_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Find a directory holding all four Fashion-MNIST IDX files.

    Candidates are tried in order: ``data_dir``, ``$QFL_DATA_DIR``, then
    :data:`DEBIAN_DATA_DIR`. A ``data_dir`` that lacks the files is an error
    (the run config named it: using other data would be a silent
    substitution); a stale ``$QFL_DATA_DIR`` falls through to the Debian
    package with a warning.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Directory to try first.

    Returns
    -------
    pathlib.Path
        The first candidate that has all four files (each plain or ``.gz``).

    Raises
    ------
    FileNotFoundError
        If no candidate has all files; the message lists every location
        tried with what was missing there, and how to get the data.
    """
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None and str(data_dir) != "":
        candidates.append(("data_dir argument", Path(data_dir).expanduser()))
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        candidates.append((f"${DATA_DIR_ENV}", Path(env).expanduser()))
    candidates.append(("Debian package location", DEBIAN_DATA_DIR))

    tried: list[str] = []
    for origin, directory in candidates:
        if not directory.is_dir():
            problem = "no such directory"
        else:
            missing = _missing_files(directory)
            problem = "missing " + ", ".join(f"{m}[.gz]" for m in missing) if missing else None
        if problem is None:
            if tried:
                warnings.warn(
                    "Fashion-MNIST not found where configured:\n"
                    + "\n".join(tried)
                    + f"\nusing {directory} ({origin}) instead",
                    stacklevel=2,
                )
            return directory
        tried.append(f"  - {directory} ({origin}): {problem}")
        if origin == "data_dir argument":
            # Named explicitly (the ``data-dir`` run-config key): training on other data
            # than the one named would be a silent substitution.
            raise FileNotFoundError(
                "Fashion-MNIST IDX files not found in the configured data-dir:\n" + tried[-1] + "\n" + _DOWNLOAD_HINT
            )
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found. Looked in:\n" + "\n".join(tried) + "\n" + _DOWNLOAD_HINT
    )


def _disk_cache_dir() -> Path | None:
    """Return the on-disk cache directory, or None when disabled."""
    value = os.environ.get(CACHE_DIR_ENV)
    if value is not None and value.strip().lower() in ("off", "none", "0", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qfl"


def _atomic_write(target: Path, write) -> None:
    """Write via a temp file + rename so readers never see a partial file.

    Failures (read-only home, full disk) only cost the speed-up, so they are
    turned into a warning instead of failing the caller.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"qfl: could not write cache file {target}: {exc}", stacklevel=3)


def _validate_split(images: np.ndarray, labels: np.ndarray, split: str, files: dict[str, Path]) -> None:
    img_file, lab_file = files[f"{split}_images"], files[f"{split}_labels"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_file}: expected uint8 images of shape (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{lab_file}: expected a 1-D integer label array, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_file} has {len(images)} images but {lab_file} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"{lab_file}: labels must lie in [0, {NUM_CLASSES - 1}], found [{labels.min()}, {labels.max()}]"
        )


def _decode(files: dict[str, Path]) -> FashionMNIST:
    arrays = {key: read_idx(path) for key, path in files.items()}
    for key in ("train_labels", "test_labels"):
        arrays[key] = arrays[key].astype(np.int64)
    for split in ("train", "test"):
        _validate_split(arrays[f"{split}_images"], arrays[f"{split}_labels"], split, files)
    for arr in arrays.values():
        arr.flags.writeable = False
    return FashionMNIST(**arrays)


def _source_key(files: dict[str, Path]) -> str:
    """Hash that changes whenever any source file is replaced or edited."""
    h = hashlib.sha256()
    for key in sorted(files):
        st = files[key].stat()
        h.update(f"{key}|{files[key].resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _load_from_disk_cache(entry: Path) -> FashionMNIST | None:
    try:
        arrays = {key: np.load(entry / f"{key}.npy", mmap_mode="r", allow_pickle=False) for key in FashionMNIST._fields}
    except (OSError, ValueError):
        return None
    ok = (
        arrays["train_images"].shape[1:] == (28, 28)
        and arrays["train_images"].dtype == np.uint8
        and arrays["test_images"].dtype == np.uint8
        and arrays["train_labels"].dtype == np.int64
        and arrays["test_labels"].dtype == np.int64
        and len(arrays["train_images"]) == len(arrays["train_labels"])
        and len(arrays["test_images"]) == len(arrays["test_labels"])
    )
    return FashionMNIST(**arrays) if ok else None


@functools.lru_cache(maxsize=4)
def _load_dir(directory: str) -> FashionMNIST:
    path = Path(directory)
    files = {key: _resolve_file(path, base) for key, base in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, v in files.items() if v is None]
    if missing:  # files vanished between find and load
        raise FileNotFoundError(f"{path}: missing {', '.join(missing)}. {_DOWNLOAD_HINT}")
    cache_root = _disk_cache_dir()
    entry = None
    if cache_root is not None:
        entry = cache_root / f"fashion-mnist-{_source_key(files)}"
        cached = _load_from_disk_cache(entry)
        if cached is not None:
            return cached
    data = _decode(files)  # type: ignore[arg-type]
    if entry is not None:
        for key, arr in data._asdict().items():
            _atomic_write(
                entry / f"{key}.npy",
                lambda fh, a=arr: np.save(fh, np.ascontiguousarray(a), allow_pickle=False),
            )
    return data


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Load Fashion-MNIST as numpy arrays, cached per process and on disk.

    Parameters
    ----------
    data_dir : str or os.PathLike, optional
        Directory with the four IDX files; see :func:`find_fashion_mnist`
        for the fallback order when it is absent or incomplete.

    Returns
    -------
    FashionMNIST
        ``(train_images, train_labels, test_images, test_labels)``: images
        uint8 ``(N, 28, 28)``, labels int64. The arrays are read-only (and
        may be memory-mapped) because every caller shares them.

    Raises
    ------
    FileNotFoundError
        If the files are nowhere to be found (the message says how to get
        them).
    ValueError
        If a file is malformed.
    """
    directory = find_fashion_mnist(data_dir)
    return _load_dir(str(directory.resolve()))


# --------------------------------------------------------------------------- #
# Partitioning
# --------------------------------------------------------------------------- #
def _check_partition_args(
    num_labels: int,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    num_classes: int,
) -> str:
    scheme = scheme.lower().strip() if isinstance(scheme, str) else scheme
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; known schemes: " + ", ".join(PARTITION_SCHEMES))
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if num_partitions > num_labels:
        raise ValueError(f"cannot split {num_labels} samples into {num_partitions} non-empty partitions")
    if scheme == "dirichlet" and not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"Dirichlet alpha must be a positive finite number, got {alpha!r}")
    if scheme == "pathological" and not 1 <= classes_per_partition <= num_classes:
        raise ValueError(
            f"classes_per_partition must be in [1, {num_classes}] (the number of "
            f"classes present), got {classes_per_partition!r}"
        )
    return scheme


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 42,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split sample indices into client partitions with flwr-datasets.

    The partitioners run on an in-memory ``datasets.Dataset`` holding only an
    ``idx`` and a ``label`` column (never the images), in Arrow format so that
    the partitioners' column reads are zero-copy; that keeps partitioning of
    60k samples well under a second for IID/Dirichlet. Rows are permuted with
    ``seed`` first because ``IidPartitioner`` shards contiguously and would
    otherwise hand out the file's order.

    Parameters
    ----------
    labels : numpy.ndarray
        1-D integer class labels of the pool to split.
    num_partitions : int
        Number of clients.
    scheme : {"iid", "dirichlet", "pathological"}
        ``"iid"``: ``IidPartitioner`` (equal sizes, random samples).
        ``"dirichlet"``: ``DirichletPartitioner`` over labels with
        concentration ``alpha`` (smaller = more label skew).
        ``"pathological"``: ``PathologicalPartitioner`` giving each client
        exactly ``classes_per_partition`` classes; the first class of client
        ``i`` is ``i % num_classes`` ("first-deterministic", as in Li et
        al. 2021) so that every class is used when there are enough clients.
    alpha : float
        Dirichlet concentration (only for ``"dirichlet"``).
    classes_per_partition : int
        Classes per client (only for ``"pathological"``).
    seed : int
        Seed for the row permutation and the partitioner; the same seed and
        arguments give the same partitions.
    min_partition_size : int
        Dirichlet only: resample until every partition has at least this
        many samples. Clamped to ``len(labels) // (4 * num_partitions)``
        (and to at least 1): demanding a sizeable fraction of the mean size
        makes the partitioner's 10 resampling attempts fail on small pools,
        while non-empty partitions are all that is needed there.

    Returns
    -------
    list of numpy.ndarray
        ``num_partitions`` disjoint, non-empty int64 index arrays into
        ``labels``. They cover every index, except that with
        ``"pathological"`` and fewer clients than classes some classes may be
        assigned to no client (flwr-datasets warns about it) and their
        samples are left out.

    Raises
    ------
    ValueError
        On an unknown scheme or invalid parameter, or when a non-empty
        split cannot be produced (e.g. Dirichlet resampling gave up).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    num_classes = len(np.unique(labels))
    scheme = _check_partition_args(len(labels), num_partitions, scheme, alpha, classes_per_partition, num_classes)
    num_partitions = int(num_partitions)

    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    perm = np.random.default_rng(seed).permutation(len(labels)).astype(np.int64)
    ds = datasets.Dataset.from_dict({"idx": perm, "label": labels[perm].astype(np.int64)}).with_format("arrow")

    effective_min_size = max(1, min(int(min_partition_size), len(labels) // (4 * num_partitions)))
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=effective_min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=int(classes_per_partition),
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=seed,
        )
    partitioner.dataset = ds

    params = (
        f"scheme={scheme!r}, num_partitions={num_partitions}, alpha={alpha}, "
        f"classes_per_partition={classes_per_partition}, seed={seed}, "
        f"{len(labels)} samples"
    )
    try:
        with warnings.catch_warnings():
            if scheme == "dirichlet":
                # Dirichlet warns on every resampling attempt; the outcome
                # (success, or a ValueError after 10 tries) is what matters.
                warnings.simplefilter("ignore")
            parts = [
                partitioner.load_partition(pid)["idx"].to_numpy().astype(np.int64, copy=False)
                for pid in range(num_partitions)
            ]
    except ValueError as exc:
        hint = (
            f" Every partition must get at least {effective_min_size} "
            "samples; raise alpha, use fewer partitions, or lower min_partition_size."
            if scheme == "dirichlet"
            else ""
        )
        raise ValueError(f"partitioning failed ({params}): {exc}{hint}") from exc

    empty = [pid for pid, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"partitioning produced empty partitions {empty[:10]}"
            f"{'...' if len(empty) > 10 else ''} ({params}); use fewer partitions, "
            "a larger alpha, or more classes per partition"
        )
    return parts


def _partition_cache_key(
    labels: np.ndarray,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    seed: int,
    min_partition_size: int,
) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        fds_version = version("flwr-datasets")
    except PackageNotFoundError:  # pragma: no cover - flwr-datasets is required here
        fds_version = "unknown"
    spec = {
        "scheme": scheme,
        "num_partitions": int(num_partitions),
        "seed": int(seed),
        "flwr_datasets": fds_version,
        "format": 1,
    }
    if scheme == "dirichlet":
        spec["alpha"] = float(alpha)
        spec["min_partition_size"] = int(min_partition_size)
    if scheme == "pathological":
        spec["classes_per_partition"] = int(classes_per_partition)
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


@functools.lru_cache(maxsize=16)
def _all_partitions(
    directory: str,
    num_partitions: int,
    scheme: str,
    alpha: float,
    classes_per_partition: int,
    seed: int,
    min_partition_size: int,
) -> tuple[np.ndarray, ...]:
    labels = _load_dir(directory).train_labels
    cache_root = _disk_cache_dir()
    target = None
    if cache_root is not None:
        key = _partition_cache_key(
            labels, num_partitions, scheme, alpha, classes_per_partition, seed, min_partition_size
        )
        target = cache_root / "partitions" / f"{scheme}-{num_partitions}-{key}.npz"
        try:
            with np.load(target, allow_pickle=False) as npz:
                flat, offsets = npz["indices"], npz["offsets"]
            if len(offsets) == num_partitions + 1 and offsets[-1] == len(flat) == len(labels):
                parts = tuple(np.split(flat, offsets[1:-1]))
                for p in parts:
                    p.flags.writeable = False
                return parts
        except (OSError, ValueError, KeyError):
            pass  # absent or corrupt: recompute and rewrite below
    parts = partition_indices(
        labels,
        num_partitions,
        scheme=scheme,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
        min_partition_size=min_partition_size,
    )
    if target is not None:
        flat = np.concatenate(parts)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        _atomic_write(target, lambda fh: np.savez(fh, indices=flat, offsets=offsets))
    for p in parts:
        p.flags.writeable = False
    return tuple(parts)


def get_partition_indices(
    partition_id: int,
    num_partitions: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 42,
    data_dir: str | os.PathLike[str] | None = None,
    min_partition_size: int = 10,
) -> np.ndarray:
    """Indices (into the training split) of one client's partition.

    All partitions are computed together (partitioners are global: a
    client's share depends on everyone else's), then memoised in the process
    and in the disk cache, so a fresh ClientApp process skips both the
    ``datasets`` import and the partitioning.

    Parameters
    ----------
    partition_id : int
        Client partition in ``[0, num_partitions)``.
    num_partitions, scheme, alpha, classes_per_partition, seed, min_partition_size
        See :func:`partition_indices`.
    data_dir : str or os.PathLike, optional
        See :func:`load_fashion_mnist`.

    Returns
    -------
    numpy.ndarray
        Read-only int64 indices into ``load_fashion_mnist().train_images``.
    """
    if not 0 <= int(partition_id) < int(num_partitions):
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id!r}")
    directory = str(find_fashion_mnist(data_dir).resolve())
    scheme_norm = scheme.lower().strip() if isinstance(scheme, str) else scheme
    parts = _all_partitions(
        directory,
        int(num_partitions),
        scheme_norm,
        float(alpha),
        int(classes_per_partition),
        int(seed),
        int(min_partition_size),
    )
    return parts[int(partition_id)]


# --------------------------------------------------------------------------- #
# Tensors for training
# --------------------------------------------------------------------------- #
class ClientData(NamedTuple):
    """One client's local data as tensors ready for a DataLoader."""

    train_images: torch.Tensor  # float32 (N, 1, 28, 28), normalised
    train_labels: torch.Tensor  # int64 (N,)
    val_images: torch.Tensor  # float32 (M, 1, 28, 28), normalised
    val_labels: torch.Tensor  # int64 (M,)


def normalize_images(images: np.ndarray) -> torch.Tensor:
    """Turn uint8 ``(N, 28, 28)`` images into normalised float32 ``(N, 1, 28, 28)``.

    Normalising with the training-set statistics keeps inputs roughly
    zero-mean/unit-variance, which the CNN's first layer and the learning
    rates of the simulations assume.

    Parameters
    ----------
    images : numpy.ndarray
        uint8 array of shape ``(N, 28, 28)``.

    Returns
    -------
    torch.Tensor
        float32 tensor of shape ``(N, 1, 28, 28)``.
    """
    import torch

    x = np.asarray(images, dtype=np.float32).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    x = (x * np.float32(1.0 / 255.0) - np.float32(FASHION_MNIST_MEAN)) * np.float32(1.0 / FASHION_MNIST_STD)
    return torch.from_numpy(np.ascontiguousarray(x))


def _subsample(indices: np.ndarray, max_samples: int | None, seed: int | list[int]) -> np.ndarray:
    if max_samples is None or len(indices) <= max_samples:
        return indices
    if max_samples < 1:
        raise ValueError(f"max_samples must be positive, got {max_samples!r}")
    keep = np.random.default_rng(seed).choice(len(indices), size=max_samples, replace=False)
    return indices[np.sort(keep)]


def client_data(
    partition_id: int,
    num_partitions: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    classes_per_partition: int = 2,
    seed: int = 42,
    data_dir: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
    val_fraction: float = 0.1,
    min_partition_size: int = 10,
) -> ClientData:
    """One client's training and local-validation tensors.

    The local validation split is carved out of the client's own partition
    (clients never see the central test set), deterministically from
    ``seed`` and ``partition_id`` so every round of a run sees the same split.

    Parameters
    ----------
    partition_id : int
        Client partition in ``[0, num_partitions)``.
    num_partitions, scheme, alpha, classes_per_partition, seed, min_partition_size
        Partitioning parameters; see :func:`partition_indices`.
    data_dir : str or os.PathLike, optional
        See :func:`load_fashion_mnist`.
    max_samples : int, optional
        Cap on the partition size (train + validation) before splitting, for
        fast tests; a deterministic random subset is kept.
    val_fraction : float
        Fraction of the (capped) partition held out for local validation, in
        ``[0, 1)``. At least one sample is held out when it is positive and
        the partition has two or more samples; training always keeps at
        least one.

    Returns
    -------
    ClientData
        ``(train_images, train_labels, val_images, val_labels)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    import torch

    data = load_fashion_mnist(data_dir)
    idx = get_partition_indices(
        partition_id,
        num_partitions,
        scheme=scheme,
        alpha=alpha,
        classes_per_partition=classes_per_partition,
        seed=seed,
        data_dir=data_dir,
        min_partition_size=min_partition_size,
    )
    local_seed = [int(seed), int(partition_id), 0x51F1]
    idx = _subsample(idx, max_samples, local_seed)
    idx = idx[np.random.default_rng(local_seed).permutation(len(idx))]
    n_val = int(round(len(idx) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(idx) >= 2:
        n_val = 1
    n_val = min(n_val, len(idx) - 1)
    val_idx, train_idx = np.sort(idx[:n_val]), np.sort(idx[n_val:])
    return ClientData(
        normalize_images(data.train_images[train_idx]),
        torch.from_numpy(np.array(data.train_labels[train_idx], dtype=np.int64)),
        normalize_images(data.train_images[val_idx]),
        torch.from_numpy(np.array(data.train_labels[val_idx], dtype=np.int64)),
    )


def test_data(
    max_samples: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Centralised evaluation tensors from the official 10k test split.

    Parameters
    ----------
    max_samples : int, optional
        Keep a deterministic random subset of this size (a prefix could be
        class-imbalanced for small sizes).
    data_dir : str or os.PathLike, optional
        See :func:`load_fashion_mnist`.
    seed : int
        Seed of the subset choice.

    Returns
    -------
    tuple of torch.Tensor
        float32 images ``(N, 1, 28, 28)`` (normalised) and int64 labels.
    """
    import torch

    data = load_fashion_mnist(data_dir)
    idx = _subsample(np.arange(len(data.test_labels)), max_samples, seed)
    return (
        normalize_images(data.test_images[idx]),
        torch.from_numpy(np.array(data.test_labels[idx], dtype=np.int64)),
    )


# Keep pytest from collecting the public ``test_data`` function as a test when
# a test module does ``from qfl.simulations.data import test_data``.
test_data.__test__ = False  # type: ignore[attr-defined]


def clear_caches() -> None:
    """Drop the per-process caches (the disk cache is left alone).

    Useful for tests that change ``QFL_DATA_DIR``/``QFL_CACHE_DIR``, and to
    release memory after a run.
    """
    _load_dir.cache_clear()
    _all_partitions.cache_clear()
