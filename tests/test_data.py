"""Tests for the Fashion-MNIST workload: IDX parsing, data lookup, the cache, partitioning, tensors."""

from __future__ import annotations

import gzip
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from qfl.simulations import data as D
from qfl.simulations import fashion_mnist as F
from qfl.simulations import store
from qfl.simulations.partition import PartitionSpec, partition_indices
from qfl.simulations.settings import Settings

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
HAVE_REAL = all(
    (REAL_DIR / f"{base}.gz").is_file() or (REAL_DIR / base).is_file() for base in F.FASHION_MNIST_FILES.values()
)
needs_real = pytest.mark.skipif(
    not HAVE_REAL,
    reason=f"Fashion-MNIST not installed at {REAL_DIR} (apt-get install dataset-fashion-mnist)",
)

_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode an array as IDX (big-endian), the way the MNIST files are made."""
    code = _CODES[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    payload = idx_bytes(arr)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def make_fake_dataset(directory: Path, n_train: int = 300, n_test: int = 60, seed: int = 0) -> Path:
    """Small Fashion-MNIST look-alike (all 10 classes, gz and plain mixed)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8)[rng.permutation(n_train)],
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for i, (key, arr) in enumerate(arrays.items()):
        base = F.FASHION_MNIST_FILES[key]
        gz = i % 2 == 0
        write_idx(directory / (base + (".gz" if gz else "")), arr, gz=gz)
    return directory


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the user's environment or cache, or another test's cache."""
    monkeypatch.delenv(F.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(tmp_path / "qfl-cache"))


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    empty = tmp_path / "debian-empty"
    empty.mkdir()
    monkeypatch.setattr(F, "DEBIAN_DATA_DIR", empty)
    return empty


# --------------------------------------------------------------------------- #
# IDX parsing
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_valid_uint8(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = F.read_idx(write_idx(tmp_path / ("a.idx.gz" if gz else "a.idx"), arr, gz=gz))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_multibyte_types_are_big_endian(tmp_path, dtype):
    arr = (np.arange(-6, 6).reshape(3, 4) * 1000).astype(dtype)
    out = F.read_idx(write_idx(tmp_path / "m.idx", arr))
    assert out.dtype == np.dtype(dtype)  # native order
    np.testing.assert_array_equal(out, arr)


def test_read_idx_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(10, dtype=np.uint8)
    out = F.read_idx(write_idx(tmp_path / "labels-no-suffix", arr, gz=True))
    np.testing.assert_array_equal(out, arr)


def _assert_value_error(path: Path, *fragments: str):
    with pytest.raises(ValueError) as info:
        F.read_idx(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    _assert_value_error(path, "magic number", "0x89504E47")


def test_read_idx_unknown_type_code(tmp_path):
    path = tmp_path / "type.idx"
    path.write_bytes(bytes([0, 0, 0x07, 1]) + struct.pack(">I", 3) + bytes(3))
    _assert_value_error(path, "type code 0x07")


def test_read_idx_too_short(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(b"\x00\x00")
    _assert_value_error(path, "only 2 bytes")


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "hdr.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">I", 60000))
    _assert_value_error(path, "truncated IDX header", "3 dimensions")


def test_read_idx_truncated_data(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    path = tmp_path / "trunc.idx"
    path.write_bytes(idx_bytes(arr)[:-100])
    _assert_value_error(path, "truncated", "(5, 28, 28)")


def test_read_idx_truncated_gz_data(tmp_path):
    arr = np.zeros((5, 28, 28), dtype=np.uint8)
    path = tmp_path / "trunc.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr)[:-100]))
    _assert_value_error(path, "truncated", "(5, 28, 28)")


def test_read_idx_dims_size_mismatch(tmp_path):
    # Header claims 60000 labels, file holds 10: the classic half-download.
    path = tmp_path / "labels.idx"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 60000) + bytes(10))
    msg = _assert_value_error(path, "(60000,)", "60008", "18 bytes")
    assert "truncated" in msg


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "trail.idx"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"junk")
    _assert_value_error(path, "trailing bytes")


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(1000, dtype=np.uint8)))[:-12])
    _assert_value_error(path, "gzip")


# --------------------------------------------------------------------------- #
# Locating data
# --------------------------------------------------------------------------- #
def test_missing_data_message_lists_places_and_remedies(monkeypatch, tmp_path, no_debian):
    env_dir = tmp_path / "env-empty"
    env_dir.mkdir()
    arg_dir = tmp_path / "does-not-exist"
    monkeypatch.setenv(F.DATA_DIR_ENV, str(env_dir))
    with pytest.raises(FileNotFoundError, match=f"configured data-dir:\n  - {arg_dir} .*no such directory"):
        F.load_fashion_mnist(arg_dir)  # named explicitly: no fallback
    with pytest.raises(FileNotFoundError) as info:
        F.load_fashion_mnist()
    msg = str(info.value)
    for fragment in (
        str(env_dir),
        "train-images-idx3-ubyte",
        str(no_debian),
        "apt-get install dataset-fashion-mnist",
        "QFL_DATA_DIR",
        "data-dir",
        "zalandoresearch/fashion-mnist",
    ):
        assert fragment in msg, f"{fragment!r} not in:\n{msg}"
    # The order tried is the documented lookup order.
    assert msg.index(str(env_dir)) < msg.index(str(no_debian))


def test_missing_data_without_any_configuration(no_debian):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        F.find_fashion_mnist()


def test_lookup_order(monkeypatch, tmp_path, no_debian):
    arg = make_fake_dataset(tmp_path / "arg", n_train=30, seed=1)
    env = make_fake_dataset(tmp_path / "env", n_train=40, seed=2)
    deb = make_fake_dataset(tmp_path / "deb", n_train=50, seed=3)
    monkeypatch.setattr(F, "DEBIAN_DATA_DIR", deb)
    assert F.find_fashion_mnist() == deb
    monkeypatch.setenv(F.DATA_DIR_ENV, str(env))
    assert F.find_fashion_mnist() == env
    assert F.find_fashion_mnist(arg) == arg
    assert len(F.load_fashion_mnist(arg).train_labels) == 30
    assert len(F.load_fashion_mnist().train_labels) == 40


def test_incomplete_env_dir_warns_and_falls_back_but_a_configured_data_dir_is_an_error(monkeypatch, tmp_path):
    deb = make_fake_dataset(tmp_path / "deb")
    monkeypatch.setattr(F, "DEBIAN_DATA_DIR", deb)
    partial = make_fake_dataset(tmp_path / "partial")
    (partial / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv(F.DATA_DIR_ENV, str(partial))
    with pytest.warns(UserWarning, match="t10k-labels-idx1-ubyte"):
        assert F.find_fashion_mnist() == deb
    for configured in (partial, tmp_path / "empty"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match="configured data-dir"):
            F.find_fashion_mnist(configured)


def test_load_fake_dataset_and_disk_cache(tmp_path):
    src = make_fake_dataset(tmp_path / "fake")
    first = F.load_fashion_mnist(src)
    assert first.train_images.shape == (300, 28, 28) and first.train_images.dtype == np.uint8
    assert first.train_labels.dtype == np.int64 and first.test_labels.dtype == np.int64
    assert not first.train_images.flags.writeable
    cache_files = sorted(p.name for p in (tmp_path / "qfl-cache").rglob("*.npy"))
    assert cache_files == sorted(f"{k}.npy" for k in F.FashionMNIST._fields)

    second = F.load_fashion_mnist(src)  # now served from the disk cache
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    # A replaced source file is a new entry, not the stale one.
    write_idx(src / "t10k-labels-idx1-ubyte", np.full(60, 3, dtype=np.uint8))
    assert set(F.load_fashion_mnist(src).test_labels.tolist()) == {3}


def test_disk_cache_can_be_disabled(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_DIR_ENV, "off")
    F.load_fashion_mnist(make_fake_dataset(tmp_path / "fake"))
    assert not (tmp_path / "qfl-cache").exists()


def test_corrupt_disk_cache_is_rebuilt(tmp_path):
    src = make_fake_dataset(tmp_path / "fake")
    ref = F.load_fashion_mnist(src)
    for f in (tmp_path / "qfl-cache").rglob("train_images.npy"):
        f.write_bytes(b"garbage")
    np.testing.assert_array_equal(F.load_fashion_mnist(src).train_images, ref.train_images)


def test_store_computes_once_and_rebuilds_what_does_not_load(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5), "b": np.ones((2, 3))}

    first = store.cached_arrays("t", "k1", ("a", "b"), compute)
    again = store.cached_arrays("t", "k1", ("a", "b"), compute)
    assert len(calls) == 1 and isinstance(again["a"], np.memmap) and not again["a"].flags.writeable
    np.testing.assert_array_equal(again["b"], first["b"])
    store.cached_arrays("t", "k2", ("a", "b"), compute)  # another key, another entry
    assert len(calls) == 2
    # An entry the caller's check refuses is rebuilt in place, as is one that does not load.
    store.cached_arrays("t", "k1", ("a", "b"), compute, check=lambda arrays: False)
    assert len(calls) == 3
    for e in (tmp_path / "qfl-cache").glob("t-*"):
        (e / "b.npy").write_bytes(b"garbage")
    store.cached_arrays("t", "k1", ("a", "b"), compute)
    store.cached_arrays("t", "k1", ("a", "b"), compute)
    assert len(calls) == 4
    # Two entries, no temporary directories left behind.
    assert len(list((tmp_path / "qfl-cache").iterdir())) == len(list((tmp_path / "qfl-cache").glob("t-*"))) == 2
    with pytest.raises(ValueError, match="computed arrays"):
        store.cached_arrays("t", "k3", ("a",), compute)


def test_store_off_and_unwritable(monkeypatch, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(3)}

    monkeypatch.setenv(store.CACHE_DIR_ENV, "off")
    for _ in range(2):
        store.cached_arrays("t", "k", ("a",), compute)
    assert len(calls) == 2 and not (tmp_path / "qfl-cache").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(blocker / "cache"))
    with pytest.warns(UserWarning, match="could not write cache entry"):
        np.testing.assert_array_equal(store.cached_arrays("t", "k", ("a",), compute)["a"], np.arange(3))


def test_malformed_dataset_file_names_the_file(tmp_path):
    src = make_fake_dataset(tmp_path / "fake")
    bad = src / "train-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-7])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*truncated"):
        F.load_fashion_mnist(src)


def test_images_labels_count_mismatch(tmp_path):
    src = make_fake_dataset(tmp_path / "fake")
    write_idx(src / "train-labels-idx1-ubyte", np.zeros(299, dtype=np.uint8))
    with pytest.raises(ValueError, match="300 images but .* 299 labels"):
        F.load_fashion_mnist(src)


def test_import_is_light():
    import os
    import subprocess
    import sys

    heavy = ("torch", "datasets", "flwr_datasets", "pyarrow")
    # Only what this module adds counts: the parent packages are not ours.
    code = (
        "import sys, qfl.simulations; before = set(sys.modules); "
        "import qfl.simulations.data; new = set(sys.modules) - before; "
        f"print(','.join(m for m in {heavy!r} if m in new))"
    )
    root = str(Path(D.__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "", f"heavy modules imported at top level: {out.stdout}"


# --------------------------------------------------------------------------- #
# Partitioning
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(123)
    return rng.integers(0, 10, size=5000).astype(np.int64)


def label_skew(parts, labels, num_classes=10):
    """Mean total-variation distance of client label mixes from the global one."""
    global_p = np.bincount(labels, minlength=num_classes) / len(labels)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / len(p) - global_p).sum() for p in parts]
    return float(np.mean(tv))


SCHEMES = [
    dict(scheme="iid"),
    dict(scheme="dirichlet", alpha=0.5),
    dict(scheme="dirichlet", alpha=0.05),
    dict(scheme="pathological", classes_per_partition=2),
]


def split(labels, num_partitions, **kwargs):
    return partition_indices(labels, PartitionSpec(num_partitions=num_partitions, **kwargs))


@pytest.mark.parametrize("kwargs", SCHEMES, ids=lambda k: "-".join(map(str, k.values())))
def test_partitions_disjoint_cover_nonempty(labels, kwargs):
    parts = split(labels, 20, seed=7, **kwargs)
    assert len(parts) == 20
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(flat) == len(labels)  # disjoint (with the next line) ...
    np.testing.assert_array_equal(np.sort(flat), np.arange(len(labels)))  # ... and covering


@pytest.mark.parametrize("kwargs", SCHEMES, ids=lambda k: "-".join(map(str, k.values())))
def test_partitions_deterministic_for_seed(labels, kwargs):
    a = split(labels, 10, seed=3, **kwargs)
    b = split(labels, 10, seed=3, **kwargs)
    c = split(labels, 10, seed=4, **kwargs)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced_and_random(labels):
    parts = split(labels, 10, scheme="iid", seed=1)
    assert {len(p) for p in parts} == {500}
    # Not the file's order: the first client is not simply indices 0..499.
    assert not np.array_equal(np.sort(parts[0]), np.arange(500))


def test_dirichlet_skew_exceeds_iid(labels):
    iid = label_skew(split(labels, 20, scheme="iid", seed=5), labels)
    d05 = label_skew(split(labels, 20, scheme="dirichlet", alpha=0.5, seed=5), labels)
    d01 = label_skew(split(labels, 20, scheme="dirichlet", alpha=0.1, seed=5), labels)
    print(f"label skew (mean TV distance): iid={iid:.3f} dir0.5={d05:.3f} dir0.1={d01:.3f}")
    assert iid < 0.1
    assert d05 > 3 * iid and d05 > 0.3
    assert d01 > d05


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_classes_per_client(labels, k):
    parts = split(labels, 20, scheme="pathological", classes_per_partition=k, seed=2)
    assert [len(np.unique(labels[p])) for p in parts] == [k] * 20
    # "first-deterministic": with >= 10 clients every class is used.
    assert len(np.unique(labels[np.concatenate(parts)])) == 10


def test_dirichlet_min_partition_size(labels):
    parts = split(labels, 50, scheme="dirichlet", alpha=0.5, seed=0, min_partition_size=20)
    assert min(map(len, parts)) >= 20


def test_dirichlet_small_pool_still_nonempty():
    small = np.arange(60) % 10
    parts = split(small, 12, scheme="dirichlet", alpha=0.3, seed=0)
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(scheme="shards"),
            "unknown partition scheme 'shards'; known schemes: iid, dirichlet, pathological",
        ),
        (dict(scheme="dirichlet", alpha=0.0), "alpha must be a positive"),
        (
            dict(scheme="pathological", classes_per_partition=11),
            r"classes_per_partition must be in \[1, 10\]",
        ),
        (dict(num_partitions=0), "positive integer"),
        (dict(num_partitions=10**6), "cannot split 5000 samples"),
    ],
)
def test_partition_argument_errors(labels, kwargs, match):
    args = dict(scheme="dirichlet", num_partitions=10) | kwargs
    with pytest.raises(ValueError, match=match):
        partition_indices(labels, PartitionSpec(**args))


def test_partition_spec_validates_and_normalises():
    spec = PartitionSpec(" Dirichlet ", np.int64(20), alpha=1, seed=np.int32(3))
    assert (spec.scheme, type(spec.num_partitions), type(spec.alpha), type(spec.seed)) == ("dirichlet", int, float, int)
    assert (
        spec == PartitionSpec("dirichlet", 20, alpha=1.0, seed=3)
        and len({spec, PartitionSpec("dirichlet", 20, 1.0, seed=3)}) == 1
    )
    assert PartitionSpec("iid", 4, alpha=-1).parameters == {"scheme": "iid", "num_partitions": 4, "seed": 42}
    for kwargs, match in [
        (dict(scheme="iid", num_partitions=2.0), "num_partitions must be a positive integer"),
        (dict(scheme="iid", num_partitions=True), "num_partitions must be a positive integer"),
        (dict(scheme="dirichlet", num_partitions=2, alpha=float("inf")), "alpha must be a positive finite"),
        (dict(scheme="dirichlet", num_partitions=2, alpha="0.5"), "alpha must be a number"),
        (dict(scheme="pathological", num_partitions=2, classes_per_partition=0), "classes_per_partition must be >= 1"),
        (dict(scheme="iid", num_partitions=2, seed=1.5), "seed must be an integer"),
        (dict(scheme="iid", num_partitions=2, seed=-1), "seed must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            PartitionSpec(**kwargs)


def test_settings_build_the_partition_spec():
    s = Settings(partitioning="pathological", alpha=0.3, classes_per_client=3, seed=5)
    assert s.partition_spec(12) == PartitionSpec("pathological", 12, alpha=0.3, classes_per_partition=3, seed=5)


def test_get_partition_indices_disk_cache(tmp_path):
    src = make_fake_dataset(tmp_path / "fake", n_train=400)
    labels = F.load_fashion_mnist(src).train_labels
    spec = PartitionSpec("dirichlet", 8, alpha=0.5, seed=9)
    expected = partition_indices(labels, spec)
    got = [D.get_partition_indices(spec, i, data_dir=src) for i in range(8)]
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    assert len(list((tmp_path / "qfl-cache").glob("partitions-*"))) == 1
    again = D.get_partition_indices(spec, 5, data_dir=src)  # from the disk cache
    assert not again.flags.writeable
    np.testing.assert_array_equal(again, expected[5])
    # A field the scheme does not use does not make another entry.
    D.get_partition_indices(PartitionSpec("dirichlet", 8, alpha=0.5, seed=9, classes_per_partition=3), 0, src)
    assert len(list((tmp_path / "qfl-cache").glob("partitions-*"))) == 1
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 8\)"):
        D.get_partition_indices(spec, 8, data_dir=src)


def test_client_data_on_fake_dataset(tmp_path):
    import torch

    src = make_fake_dataset(tmp_path / "fake", n_train=400)
    cd = D.client_data(PartitionSpec("iid", 4, seed=1), 2, data_dir=src, val_fraction=0.2)
    assert cd.train_inputs.shape == (80, 1, 28, 28) and cd.val_inputs.shape == (20, 1, 28, 28)
    assert cd.train_inputs.dtype == torch.float32 and cd.train_labels.dtype == torch.int64
    # Same pixels, normalised: recover uint8 values exactly.
    idx = D.get_partition_indices(PartitionSpec("iid", 4, seed=1), 2, data_dir=src)
    raw = F.load_fashion_mnist(src).train_images[idx]
    back = cd.train_inputs * F.FASHION_MNIST_STD + F.FASHION_MNIST_MEAN
    recovered = torch.round(back * 255).to(torch.uint8).squeeze(1).numpy()
    all_raw = {r.tobytes() for r in raw}
    assert all(r.tobytes() in all_raw for r in recovered)
    # Train and validation are disjoint and deterministic.
    tr = {r.tobytes() for r in recovered}
    val = torch.round((cd.val_inputs * F.FASHION_MNIST_STD + F.FASHION_MNIST_MEAN) * 255)
    assert not tr & {r.tobytes() for r in val.to(torch.uint8).squeeze(1).numpy()}
    again = D.client_data(PartitionSpec("iid", 4, seed=1), 2, data_dir=src, val_fraction=0.2)
    for a, b in zip(cd, again, strict=True):
        assert torch.equal(a, b)


def test_client_data_max_samples_and_val_fraction(tmp_path):
    src = make_fake_dataset(tmp_path / "fake", n_train=400)
    cd = D.client_data(PartitionSpec("iid", 2, seed=1), 0, data_dir=src, max_samples=30, val_fraction=0.1)
    assert (len(cd.train_labels), len(cd.val_labels)) == (27, 3)
    cd0 = D.client_data(PartitionSpec("iid", 2, seed=1), 0, data_dir=src, max_samples=30, val_fraction=0.0)
    assert (len(cd0.train_labels), len(cd0.val_labels)) == (30, 0)
    tiny = D.client_data(PartitionSpec("iid", 2, seed=1), 0, data_dir=src, max_samples=2, val_fraction=0.01)
    assert (len(tiny.train_labels), len(tiny.val_labels)) == (1, 1)
    with pytest.raises(ValueError, match="val_fraction"):
        D.client_data(PartitionSpec("iid", 2), 0, data_dir=src, val_fraction=1.0)


def test_test_data_subsample(tmp_path):
    import torch

    src = make_fake_dataset(tmp_path / "fake", n_test=60)
    x, y = D.test_data(data_dir=src)
    assert x.shape == (60, 1, 28, 28) and y.dtype == torch.int64
    xs, ys = D.test_data(max_samples=25, data_dir=src)
    xs2, ys2 = D.test_data(max_samples=25, data_dir=src)
    assert xs.shape == (25, 1, 28, 28) and torch.equal(xs, xs2) and torch.equal(ys, ys2)


# --------------------------------------------------------------------------- #
# Real Fashion-MNIST (Debian package)
# --------------------------------------------------------------------------- #
@needs_real
def test_real_fashion_mnist_loads():
    t0 = time.perf_counter()
    d = F.load_fashion_mnist()
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    d2 = F.load_fashion_mnist()
    warm = time.perf_counter() - t0
    print(f"Fashion-MNIST load: first {cold:.3f}s (decode, unless cached), then from disk cache {warm * 1e3:.1f}ms")
    assert d.train_images.shape == (60000, 28, 28) and d.test_images.shape == (10000, 28, 28)
    assert d.train_images.dtype == np.uint8
    assert d.train_labels.dtype == np.int64 and d.test_labels.dtype == np.int64
    assert np.bincount(d.train_labels).tolist() == [6000] * 10
    assert np.bincount(d.test_labels).tolist() == [1000] * 10
    np.testing.assert_array_equal(d.train_labels, d2.train_labels)
    # The normalisation constants are the training set's statistics.
    x = np.asarray(d.train_images[:10000], dtype=np.float64) / 255
    assert abs(x.mean() - F.FASHION_MNIST_MEAN) < 0.01 and abs(x.std() - F.FASHION_MNIST_STD) < 0.01


@needs_real
def test_real_client_and_test_data():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cd = D.client_data(PartitionSpec("dirichlet", 10, alpha=0.5, seed=42), 3, max_samples=200)
    # A clean setup finds the data without falling back from a configured place.
    assert not [w for w in caught if "not found where configured" in str(w.message)]
    assert cd.train_inputs.shape == (180, 1, 28, 28) and cd.val_inputs.shape == (20, 1, 28, 28)
    x, y = D.test_data(max_samples=500)
    assert x.shape == (500, 1, 28, 28) and len(y) == 500
    assert abs(float(D.test_data()[0].mean())) < 0.05
