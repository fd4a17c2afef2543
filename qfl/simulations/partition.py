"""How a labelled pool is split among clients: the partition schemes and their parameters.

What belongs here: :class:`PartitionSpec` (the schemes are declared once, here; the run
config is checked against :data:`SCHEMES`) and :func:`partition_indices`, which hands the
split to flwr-datasets' partitioners. Nothing here reads files or caches: which pool is
split, and where the result is kept, is :mod:`qfl.simulations.data`'s business.

Only numpy is imported at top level: the ``datasets``/``flwr_datasets`` stack costs about
a second to import and is imported only when a split is really computed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SCHEMES", "PartitionSpec", "partition_indices"]

#: Partitioning schemes, as the ``partitioning`` run-config key names them.
SCHEMES = ("iid", "dirichlet", "pathological")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PartitionSpec:
    """One way of splitting a pool among ``num_partitions`` clients.

    Frozen and hashable, so a spec can key a cache; the same spec over the same labels
    gives the same partitions. Fields a scheme does not use (``alpha`` outside
    ``"dirichlet"``, ``classes_per_partition`` outside ``"pathological"``) are carried but
    neither checked nor part of :attr:`parameters`.

    scheme
        ``"iid"``: ``IidPartitioner`` (equal sizes, random samples). ``"dirichlet"``:
        ``DirichletPartitioner`` over labels with concentration ``alpha`` (smaller = more
        label skew). ``"pathological"``: ``PathologicalPartitioner`` giving each client
        exactly ``classes_per_partition`` classes, the first class of client ``i`` being
        ``i % num_classes`` ("first-deterministic", as in Li et al. 2021) so every class
        is used when there are enough clients.
    seed
        Seeds the row permutation and the partitioner.
    min_partition_size
        Dirichlet only: resample until every partition has at least this many samples.
        Clamped to ``len(labels) // (4 * num_partitions)`` (and to at least 1): demanding
        a sizeable fraction of the mean size makes the partitioner's 10 resampling
        attempts fail on small pools, while non-empty partitions are all that is needed.
    """

    scheme: str
    num_partitions: int
    alpha: float = 0.5
    classes_per_partition: int = 2
    seed: int = 42
    min_partition_size: int = 10

    def __post_init__(self) -> None:
        scheme = self.scheme.lower().strip() if isinstance(self.scheme, str) else self.scheme
        if scheme not in SCHEMES:
            raise ValueError(f"unknown partition scheme {scheme!r}; known schemes: " + ", ".join(SCHEMES))
        object.__setattr__(self, "scheme", scheme)
        if not _is_int(self.num_partitions) or self.num_partitions < 1:
            raise ValueError(f"num_partitions must be a positive integer, got {self.num_partitions!r}")
        for name in ("classes_per_partition", "seed", "min_partition_size"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float, np.floating, np.integer)):
            raise ValueError(f"Dirichlet alpha must be a number, got {self.alpha!r}")
        for name, cast in (
            ("num_partitions", int),
            ("alpha", float),
            ("classes_per_partition", int),
            ("seed", int),
            ("min_partition_size", int),
        ):
            object.__setattr__(self, name, cast(getattr(self, name)))
        if scheme == "dirichlet" and not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"Dirichlet alpha must be a positive finite number, got {self.alpha!r}")
        if scheme == "pathological" and self.classes_per_partition < 1:
            raise ValueError(f"classes_per_partition must be >= 1, got {self.classes_per_partition!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy's generators refuse negative seeds), got {self.seed}")

    @property
    def parameters(self) -> dict[str, Any]:
        """The fields that decide the partitions of this scheme (for cache keys and messages)."""
        out: dict[str, Any] = {"scheme": self.scheme, "num_partitions": self.num_partitions, "seed": self.seed}
        if self.scheme == "dirichlet":
            out |= {"alpha": self.alpha, "min_partition_size": self.min_partition_size}
        if self.scheme == "pathological":
            out["classes_per_partition"] = self.classes_per_partition
        return out


def partition_indices(labels: np.ndarray, spec: PartitionSpec) -> list[np.ndarray]:
    """Split sample indices into ``spec.num_partitions`` client partitions with flwr-datasets.

    The partitioners run on an in-memory ``datasets.Dataset`` holding only an ``idx`` and
    a ``label`` column (never the images), in Arrow format so that the partitioners'
    column reads are zero-copy. Rows are permuted with ``spec.seed`` first because
    ``IidPartitioner`` shards contiguously and would otherwise hand out the file's order.

    Returns ``num_partitions`` disjoint, non-empty int64 index arrays into ``labels``.
    They cover every index, except that with ``"pathological"`` and fewer clients than
    classes some classes may be assigned to no client (flwr-datasets warns about it) and
    their samples are left out.

    Raises ValueError when the spec does not fit the labels (more partitions than
    samples, more classes per partition than classes present) or when a non-empty split
    cannot be produced (e.g. Dirichlet resampling gave up).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    num_classes = len(np.unique(labels))
    n = spec.num_partitions
    if n > len(labels):
        raise ValueError(f"cannot split {len(labels)} samples into {n} non-empty partitions")
    if spec.scheme == "pathological" and spec.classes_per_partition > num_classes:
        raise ValueError(
            f"classes_per_partition must be in [1, {num_classes}] (the number of "
            f"classes present), got {spec.classes_per_partition!r}"
        )

    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    perm = np.random.default_rng(spec.seed).permutation(len(labels)).astype(np.int64)
    ds = datasets.Dataset.from_dict({"idx": perm, "label": labels[perm].astype(np.int64)}).with_format("arrow")

    min_size = max(1, min(spec.min_partition_size, len(labels) // (4 * n)))
    if spec.scheme == "iid":
        partitioner = IidPartitioner(num_partitions=n)
    elif spec.scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=spec.seed,
        )
    else:
        partitioner = PathologicalPartitioner(
            num_partitions=n,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_partition,
            class_assignment_mode="first-deterministic",
            shuffle=True,
            seed=spec.seed,
        )
    partitioner.dataset = ds

    params = ", ".join(f"{k}={v!r}" for k, v in spec.parameters.items()) + f", {len(labels)} samples"
    try:
        with warnings.catch_warnings():
            if spec.scheme == "dirichlet":
                # Dirichlet warns on every resampling attempt; the outcome
                # (success, or a ValueError after 10 tries) is what matters.
                warnings.simplefilter("ignore")
            parts = [partitioner.load_partition(pid)["idx"].to_numpy().astype(np.int64, copy=False) for pid in range(n)]
    except ValueError as exc:
        hint = (
            f" Every partition must get at least {min_size} "
            "samples; raise alpha, use fewer partitions, or lower min_partition_size."
            if spec.scheme == "dirichlet"
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
