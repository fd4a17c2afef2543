"""Shared pieces: the tiny classification task (from tests/apps/engine) and its fixture; the
serial/parallel switch of the compiled kernels."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The tiny task lives in the simulation-engine test app, so in-process and engine tests share it.
sys.path.insert(0, str(Path(__file__).parent / "apps" / "engine"))
from engine_app.task import tiny_data, tiny_model  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def task():
    """(model_fn, data_fn) of the tiny task."""
    return tiny_model, tiny_data


@pytest.fixture(params=[False, True], ids=["serial", "parallel"])
def kernel_mode(request):
    """Force the serial or the parallel variant of the kernels (normally chosen by size
    and machine load); their results must be identical."""
    from qfl.compress import runtime

    old = runtime.FORCE_PARALLEL
    runtime.FORCE_PARALLEL = request.param
    yield request.param
    runtime.FORCE_PARALLEL = old
