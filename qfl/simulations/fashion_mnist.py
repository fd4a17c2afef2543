"""Fashion-MNIST as numpy arrays: finding the four IDX files, reading and checking them.

What belongs here: the file format (a small IDX parser that checks the header against
the file size, so a truncated download gives a readable error rather than a reshape
failure deep inside numpy), where the files are looked for, and the dataset's constants.
How the training pool is split among clients is :mod:`qfl.simulations.partition`; the
tensors a client trains on are :mod:`qfl.simulations.data`.

Decoding the gzipped files takes about half a second, which a deployment's fresh
ClientApp process would pay for every message; :func:`load_fashion_mnist` therefore goes
through the on-disk cache of :mod:`qfl.simulations.store`, keyed by the files' size and
modification time. Only numpy is imported at top level.
"""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .store import cached_arrays

__all__ = [
    "DATA_DIR_ENV",
    "DEBIAN_DATA_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "FashionMNIST",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

#: Environment variable naming a directory that holds the four IDX files.
DATA_DIR_ENV = "QFL_DATA_DIR"
#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
DEBIAN_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Base file names (each may also be present with a ``.gz`` suffix).
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: Pixel mean/std of the Fashion-MNIST training images after scaling to [0, 1].
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242
NUM_CLASSES = 10
IMAGE_SIZE = 28

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
    """Changes whenever any source file is replaced or edited."""
    return "\n".join(
        f"{key}|{path.resolve()}|{path.stat().st_size}|{path.stat().st_mtime_ns}" for key, path in sorted(files.items())
    )


def _cached_ok(arrays) -> bool:
    return (
        arrays["train_images"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE)
        and arrays["train_images"].dtype == np.uint8
        and arrays["test_images"].dtype == np.uint8
        and arrays["train_labels"].dtype == np.int64
        and arrays["test_labels"].dtype == np.int64
        and len(arrays["train_images"]) == len(arrays["train_labels"])
        and len(arrays["test_images"]) == len(arrays["test_labels"])
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Fashion-MNIST as numpy arrays, decoded once and then read from the on-disk cache.

    ``data_dir`` is tried first; see :func:`find_fashion_mnist` for the fallback order.
    Images are uint8 ``(N, 28, 28)``, labels int64; the arrays are read-only (memory
    maps when they come from the cache). Raises FileNotFoundError when the files are
    nowhere to be found (the message says how to get them), ValueError when a file is
    malformed.
    """
    directory = find_fashion_mnist(data_dir)
    files = {key: _resolve_file(directory, base) for key, base in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[k] for k, v in files.items() if v is None]
    if missing:  # files vanished between find and load
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}. {_DOWNLOAD_HINT}")
    arrays = cached_arrays(
        "fashion-mnist",
        _source_key(files),  # type: ignore[arg-type]
        FashionMNIST._fields,
        lambda: _decode(files)._asdict(),  # type: ignore[arg-type]
        _cached_ok,
    )
    return FashionMNIST(**arrays)
