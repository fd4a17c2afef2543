"""Shared pieces: the tiny classification task (from tests/apps/engine) and its fixture; the
serial/parallel switch of the compiled kernels."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The loopback deployment harness is not part of the wheel: tools/qfl_deploy.
sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
# The tiny task lives in the simulation-engine test app, so in-process and engine tests share it.
sys.path.insert(0, str(Path(__file__).parent / "apps" / "engine"))
from engine_app.task import tiny_data, tiny_model

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


#: The tiers (README "Tests"). A test marked with one keeps it; otherwise its file's tier
#: below, then its name's, then ``unit``. ``-m unit`` must answer in under a minute on two
#: cores, so what runs whole federations, starts Ray or a fresh interpreter, trains to a
#: target or fuzzes at length is ``integration`` even where it is pure.
TIERS = ("unit", "integration", "slow")
FILE_TIERS = {
    # whole federations through the in-process grid: real ClientApps, training, many rounds
    "test_async.py": "integration",
    "test_strategy.py": "integration",
    "test_robustness.py": "integration",
}
TEST_TIERS = {
    "test_kernels_from_many_threads_at_once": "integration",  # Ray workers
    "test_kernels_serial_and_parallel_agree": "integration",  # compiles every kernel twice
    "test_import_is_light": "integration",  # a fresh interpreter
    "test_bytes_do_not_depend_on_thread_count": "integration",  # a fresh interpreter with 2 numba threads
    "test_crafted_blobs_raise_wire_errors_under_an_address_space_limit": "integration",  # a fresh interpreter
    # whole federations through the in-process grid (4 rounds of training on 4 nodes; two runs)
    "test_client_side_fixed_clipping_bounds_what_the_server_aggregates": "integration",
    "test_client_side_adaptive_clipping_bounds_every_round_by_its_own_norm": "integration",
    "test_compression_mod_keeps_the_bound_even_without_a_clipping_mod": "integration",
    "test_server_side_clipping_inside_compressed_clips_the_decoded_updates": "integration",
    "test_a_custom_start_keeps_its_checkpoints_and_results_with_two_changed_lines": "integration",
    "test_char_model_learns": "integration",  # trains an LSTM to a target
    "test_every_operator_compresses_within_its_contract_and_survives_the_wire": "integration",
    "test_every_truncated_blob_is_rejected_and_the_full_blob_accepted": "integration",
    "test_hostile_inputs_stay_within_the_limits_memory": "integration",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            name = getattr(item, "originalname", item.name)
            item.add_marker(FILE_TIERS.get(item.path.name) or TEST_TIERS.get(name, "unit"))


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
