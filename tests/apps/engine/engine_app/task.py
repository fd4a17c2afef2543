"""A tiny classification task, deterministic per partition: the tests' shared task.

tests/conftest.py imports it too, so the in-process tests (FakeGrid) and the
simulation-engine tests train exactly the same model on exactly the same data.
"""

from __future__ import annotations

import torch
from flwr.app import Context
from torch import nn


def tiny_model(ctx: Context | None = None) -> nn.Module:
    """An MLP with a BatchNorm layer (so an int64 buffer exists); 2,116 float parameters."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))


def tiny_data(ctx: Context):
    """A linearly separable 4-class problem, a different sample per partition."""
    pid = int(ctx.node_config.get("partition-id", 0))
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(7))
    x = torch.randn(300, 20, generator=torch.Generator().manual_seed(100 + pid))
    y = (x @ w).argmax(1)
    return x[:240], y[:240], x[240:], y[240:]
