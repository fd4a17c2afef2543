"""The simulation's two workloads: what a client trains on, what the server tests on.

``dataset = "fashion-mnist"`` (images, label-skewed partitions of one pool, a CNN) and
``dataset = "shakespeare"`` (next-character prediction, one client per speaking role, an
LSTM) differ in data, model and a sensible learning rate; everything else (methods,
rounds, clients per round, local steps) is shared. A run config that leaves ``model``
empty or ``lr`` at 0 gets the workload's own, so switching the dataset never silently
trains with the other workload's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..clients.torch_app import ClientData

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .settings import Settings


@dataclass(frozen=True)
class Workload:
    """A dataset with its default model and learning rate.

    ``client_data(settings, partition_id, num_partitions)`` and ``test_data(settings)``
    load lazily: a deployment's ClientApp process imports this module for every message.
    """

    name: str
    model: str
    lr: float
    client_data: Callable[[Settings, int, int], ClientData]
    test_data: Callable[[Settings], tuple[torch.Tensor, torch.Tensor]]


def _fashion_client(s: Settings, pid: int, n: int) -> ClientData:
    from .data import client_data

    return client_data(s.partition_spec(n), pid, data_dir=s.data_dir or None, max_samples=s.max_client_samples or None)


def _fashion_test(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    from .data import test_data

    return test_data(max_samples=s.test_samples, data_dir=s.data_dir or None)


def _shakespeare_client(s: Settings, pid: int, n: int) -> ClientData:
    from . import shakespeare

    return shakespeare.client_data(
        pid, n, seq_len=s.seq_len, directory=s.data_dir or None, max_samples=s.max_client_samples or None
    )


def _shakespeare_test(s: Settings) -> tuple[torch.Tensor, torch.Tensor]:
    from . import shakespeare

    return shakespeare.test_data(
        s.num_clients, seq_len=s.seq_len, directory=s.data_dir or None, max_samples=s.test_samples
    )


#: ``dataset`` run-config value -> workload.
WORKLOADS: dict[str, Workload] = {
    "fashion-mnist": Workload("fashion-mnist", "cnn", 0.05, _fashion_client, _fashion_test),
    "shakespeare": Workload("shakespeare", "char-lstm", 1.0, _shakespeare_client, _shakespeare_test),
}
