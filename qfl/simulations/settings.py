"""The run config of the simulation app, read once, validated, with defaults.

Server and client read the same ``[tool.flwr.app.config]`` (overridable with
``flwr run --run-config``); keeping the parsing in one place keeps them in agreement
on partitions, model and seed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..strategies.presets import ASYNC_PRESETS, PRESETS
from .links import parse_links
from .partition import SCHEMES, PartitionSpec
from .workloads import WORKLOADS

#: A quarter of the clients on a slow mobile link, the rest on broadband; a local step
#: takes 50 ms on every device (see :mod:`qfl.simulations.links`).
DEFAULT_LINKS = "slow: share=0.25, up=1, down=4, latency=50, step=0.05; fast: up=50, down=100, latency=20, step=0.05"


@dataclass(frozen=True)
class Settings:
    """One experiment. Field names are the run-config keys with ``-`` replaced by ``_``."""

    method: str = "qsparse"
    uplink: str = ""
    downlink: str = ""
    downlink_initial: str = ""
    error_feedback: bool = True
    num_server_rounds: int = 20
    baseline: str = "fedavg"
    rounds_factor: float = 1.0
    rounds_factor_methods: str = ""
    num_clients: int = 20
    fraction_train: float = 0.5
    local_steps: int = 20
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.0
    momentum: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    dataset: str = "fashion-mnist"
    seq_len: int = 80
    partitioning: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    model: str = ""
    seed: int = 42
    data_dir: str = ""
    max_client_samples: int = 0
    test_samples: int = 10000
    min_elements: int = 256
    results_dir: str = ""
    label: str = ""
    slow_clients: float = 0.0
    slow_factor: float = 1.0
    round_timeout: float = 3600.0
    links: str = DEFAULT_LINKS
    async_concurrency: int = 0
    async_buffer: int = 0
    max_staleness: int = 8
    staleness_exponent: float = 0.5
    norm_guard: float = 10.0
    max_update_norm: float = 0.0

    @staticmethod
    def from_run_config(config: dict[str, Any]) -> Settings:
        """Settings from a Flower run config; ValueError naming the bad key."""
        fields = {f.name: f for f in dataclasses.fields(Settings)}
        values: dict[str, Any] = {}
        for key, raw in config.items():
            name = key.replace("-", "_")
            if name not in fields:
                continue  # other apps' keys may share a run config
            default = fields[name].default
            try:
                if isinstance(default, bool):
                    if not isinstance(raw, bool):
                        raise TypeError
                    values[name] = raw
                elif isinstance(default, int):
                    if isinstance(raw, bool) or float(raw) != int(raw):
                        raise TypeError
                    values[name] = int(raw)
                elif isinstance(default, float):
                    values[name] = float(raw)
                else:
                    values[name] = str(raw)
            except (TypeError, ValueError):
                raise ValueError(f"run config {key!r}: expected {type(default).__name__}, got {raw!r}") from None
        s = Settings(**values)
        s.validate()
        return s

    @property
    def methods(self) -> list[str]:
        """``method`` may list several methods (comma-separated), run one after the other."""
        return [m.strip() for m in self.method.split(",") if m.strip()]

    def validate(self) -> None:
        """Refuse settings that cannot describe an experiment, saying which key is wrong."""
        for method in self.methods or [""]:
            if method not in PRESETS and method not in ASYNC_PRESETS and method != "custom":
                raise ValueError(
                    f"run config 'method': unknown {method!r}; known: "
                    f"{', '.join(sorted([*PRESETS, *ASYNC_PRESETS]))}, custom"
                )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("run config 'method' lists a method twice")
        if self.label and len(self.methods) > 1:
            raise ValueError("run config 'label' names a single run; leave it empty when 'method' lists several")
        if self.dataset not in WORKLOADS:
            raise ValueError(f"run config 'dataset': {self.dataset!r} is not one of {', '.join(WORKLOADS)}")
        if self.partitioning not in SCHEMES:
            raise ValueError(f"run config 'partitioning': {self.partitioning!r} is not one of {', '.join(SCHEMES)}")
        for key in ("num_server_rounds", "num_clients", "batch_size", "test_samples"):
            if getattr(self, key) < 1:
                raise ValueError(f"run config {key.replace('_', '-')!r} must be >= 1")
        if not (math.isfinite(self.rounds_factor) and self.rounds_factor >= 1):
            raise ValueError("run config 'rounds-factor' must be a number >= 1")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0) or not 0 <= self.server_momentum < 1:
            raise ValueError("run config 'server-lr' must be > 0 and 'server-momentum' in [0, 1)")
        if not 0 < self.fraction_train <= 1:
            raise ValueError("run config 'fraction-train' must be in (0, 1]")
        if self.local_steps < 0 or self.local_epochs < 0 or (self.local_steps == 0 and self.local_epochs == 0):
            raise ValueError("run config 'local-steps' (or, when 0, 'local-epochs') must be positive")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"run config {f.name.replace('_', '-')!r} must be a finite number, got {value}")
        if self.alpha <= 0:
            raise ValueError(f"run config 'alpha' (Dirichlet concentration) must be > 0, got {self.alpha}")
        if self.lr < 0 or self.momentum < 0 or self.staleness_exponent < 0:
            raise ValueError(
                "run config 'lr', 'momentum' and 'staleness-exponent' must be >= 0 (lr 0: the dataset's default)"
            )
        if self.classes_per_client < 1 or self.seq_len < 1:
            raise ValueError("run config 'classes-per-client' and 'seq-len' must be >= 1")
        if self.max_client_samples < 0 or self.min_elements < 0 or self.max_staleness < 0:
            raise ValueError("run config 'max-client-samples', 'min-elements' and 'max-staleness' must be >= 0")
        if self.async_concurrency < 0 or self.async_buffer < 0 or self.round_timeout <= 0:
            raise ValueError("run config 'async-concurrency' and 'async-buffer' must be >= 0, 'round-timeout' > 0")
        if self.norm_guard != 0 and self.norm_guard < 1:
            raise ValueError(
                f"run config 'norm-guard' must be 0 (off) or >= 1 (x the median update norm), got {self.norm_guard}"
            )
        if self.max_update_norm < 0:
            raise ValueError(f"run config 'max-update-norm' must be 0 (off) or positive, got {self.max_update_norm}")
        try:
            parse_links(self.links)
        except ValueError as exc:
            raise ValueError(f"run config 'links': {exc}") from None
        if not 0 <= self.slow_clients <= 1 or self.slow_factor < 1:
            raise ValueError("run config 'slow-clients' must be in [0, 1] and 'slow-factor' >= 1")

    @property
    def workload(self):
        """The dataset's workload: data, default model and learning rate."""
        return WORKLOADS[self.dataset]

    @property
    def model_name(self) -> str:
        """``model``, or the dataset's model when it is empty."""
        return self.model or self.workload.model

    @property
    def learning_rate(self) -> float:
        """``lr``, or the dataset's learning rate when it is 0."""
        return self.lr or self.workload.lr

    def rounds_of(self, method: str) -> int:
        """Rounds ``method`` trains: ``num-server-rounds`` for the baseline, ``rounds-factor``
        times that for the others, or for those ``rounds-factor-methods`` lists (what is
        compared is bytes to the baseline's accuracy, which a sparse method may need more
        rounds to reach; methods judged on their final accuracy need not train longer)."""
        longer = [m.strip() for m in self.rounds_factor_methods.split(",") if m.strip()]
        if method == self.baseline or (longer and method not in longer):
            return self.num_server_rounds
        return math.ceil(self.num_server_rounds * self.rounds_factor - 1e-9)

    def partition_spec(self, num_partitions: int) -> PartitionSpec:
        """How the pool is split among ``num_partitions`` clients (the node config's
        ``num-partitions``, which a deployment sets per SuperNode)."""
        return PartitionSpec(
            scheme=self.partitioning,
            num_partitions=num_partitions,
            alpha=self.alpha,
            classes_per_partition=self.classes_per_client,
            seed=self.seed,
        )

    @property
    def clients_per_round(self) -> int:
        """m: clients a synchronous round samples."""
        return max(1, round(self.fraction_train * self.num_clients))

    def async_plan(self) -> tuple[int, int, int, int]:
        """(concurrency M, buffer K, server versions, evaluate every) of an async run.

        Defaults make it comparable with the synchronous runs: M = m clients busy, K = m/2,
        and as many client updates in total as ``num-server-rounds`` rounds of m.
        """
        m = self.clients_per_round
        concurrency = self.async_concurrency or m
        buffer = self.async_buffer or max(1, m // 2)
        versions = -(-self.num_server_rounds * m // buffer)
        return concurrency, buffer, versions, max(1, round(m / buffer))

    @property
    def name(self) -> str:
        """The label of this run in a comparison (file name of its results)."""
        return self.label or self.method

    def fedavg_kwargs(self) -> dict[str, Any]:
        """Sampling arguments of the inner FedAvg: federated evaluation is off (the
        server evaluates centrally on the test set), every client must be connected."""
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": 0.0,
            "min_train_nodes": self.clients_per_round,
            "min_available_nodes": self.num_clients,
        }
