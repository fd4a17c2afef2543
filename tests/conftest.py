"""Shared pieces: the tiny classification task (from tests/apps/engine) and its fixture."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The loopback deployment harness is not part of the wheel: tools/qfl_deploy.
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
# The tiny task lives in the simulation-engine test app, so in-process and engine tests share it.
sys.path.insert(0, str(Path(__file__).parent / "apps" / "engine"))
from engine_app.task import tiny_data, tiny_model  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def task():
    """(model_fn, data_fn) of the tiny task."""
    return tiny_model, tiny_data
