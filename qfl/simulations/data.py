"""The Fashion-MNIST tensors a client trains on and the server tests on.

What belongs here: turning a :class:`~qfl.simulations.partition.PartitionSpec` into one
client's partition of the Fashion-MNIST training pool, its local train/validation split
and normalised tensors, and the central test tensors. Reading the files is
:mod:`qfl.simulations.fashion_mnist`, the partitioners are
:mod:`qfl.simulations.partition`, and the one cache (on disk) is
:mod:`qfl.simulations.store`.

In a deployment a ClientApp runs in a fresh process for every message, so the module
imports only numpy at top level; ``torch`` and the ``datasets``/``flwr_datasets`` stack
are imported when they are really needed, and the partitions are kept in the on-disk
cache: a fresh process reads them back in under a millisecond instead of importing
``datasets`` (about a second) and partitioning again (up to 2 s).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import numpy as np

from .fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGE_SIZE, load_fashion_mnist
from .partition import PartitionSpec, partition_indices
from .store import cached_arrays

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

    from ..clients.torch_app import ClientData

__all__ = ["client_data", "get_partition_indices", "normalize_images", "partitions", "test_data"]


def partitions(spec: PartitionSpec, data_dir: str | os.PathLike[str] | None = None) -> tuple[np.ndarray, ...]:
    """Every client's indices into the Fashion-MNIST training split, read-only int64.

    All partitions are computed together (partitioners are global: a client's share
    depends on everyone else's) and kept in the on-disk cache, keyed by the spec's
    parameters, the labels and the flwr-datasets version. ``data_dir``: see
    :func:`~qfl.simulations.fashion_mnist.find_fashion_mnist`.
    """
    labels = load_fashion_mnist(data_dir).train_labels
    n = spec.num_partitions
    try:
        partitioner_version = version("flwr-datasets")
    except PackageNotFoundError:
        raise ModuleNotFoundError("partitioning needs flwr-datasets: pip install 'qfl[sim]'") from None
    key = {
        **spec.parameters,
        "format": 1,  # bump when the way partitions are derived from a spec changes
        "flwr_datasets": partitioner_version,
        "labels": hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes()).hexdigest(),
    }

    def compute() -> dict[str, np.ndarray]:
        parts = partition_indices(labels, spec)
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        return {"indices": np.concatenate(parts), "offsets": offsets}

    def check(arrays) -> bool:
        offsets = arrays["offsets"]
        return len(offsets) == n + 1 and offsets[-1] == len(arrays["indices"]) <= len(labels)

    arrays = cached_arrays("partitions", json.dumps(key, sort_keys=True), ("indices", "offsets"), compute, check)
    parts = tuple(np.split(arrays["indices"], arrays["offsets"][1:-1]))
    for p in parts:
        p.flags.writeable = False
    return parts


def get_partition_indices(
    spec: PartitionSpec, partition_id: int, data_dir: str | os.PathLike[str] | None = None
) -> np.ndarray:
    """Read-only int64 indices (into the training split) of client ``partition_id``."""
    if not 0 <= int(partition_id) < spec.num_partitions:
        raise ValueError(f"partition_id must be in [0, {spec.num_partitions}), got {partition_id!r}")
    return partitions(spec, data_dir)[int(partition_id)]


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
    spec: PartitionSpec,
    partition_id: int,
    data_dir: str | os.PathLike[str] | None = None,
    max_samples: int | None = None,
    val_fraction: float = 0.1,
) -> ClientData:
    """One client's training and local-validation tensors.

    The local validation split is carved out of the client's own partition (clients
    never see the central test set), deterministically from ``spec.seed`` and
    ``partition_id`` so every round of a run sees the same split.

    Parameters
    ----------
    spec : PartitionSpec
        How the training pool is split among clients.
    partition_id : int
        Client partition in ``[0, spec.num_partitions)``.
    data_dir : str or os.PathLike, optional
        See :func:`~qfl.simulations.fashion_mnist.find_fashion_mnist`.
    max_samples : int, optional
        Cap on the partition size (train + validation) before splitting, for fast
        tests; a deterministic random subset is kept.
    val_fraction : float
        Fraction of the (capped) partition held out for local validation, in ``[0, 1)``.
        At least one sample is held out when it is positive and the partition has two
        or more samples; training always keeps at least one.

    Returns
    -------
    ClientData
        Images float32 ``(N, 1, 28, 28)``, normalised, and int64 labels.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    import torch

    from ..clients.torch_app import ClientData

    data = load_fashion_mnist(data_dir)
    idx = get_partition_indices(spec, partition_id, data_dir)
    local_seed = [spec.seed, int(partition_id), 0x51F1]
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
        See :func:`~qfl.simulations.fashion_mnist.find_fashion_mnist`.
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
