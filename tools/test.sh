#!/usr/bin/env bash
# Run the whole test suite: everything on flwr 1.41 (HTTP transport), then the
# Flower-facing tests again on flwr 1.39 (gRPC transport). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
echo "== flwr 1.41: full suite"
.venv/bin/python -m pytest -q "$@"
echo "== flwr 1.39: Flower integration, simulation engine and deployment tests"
.venv139/bin/python -m pytest -q tests/test_strategy.py tests/test_replica.py tests/test_async.py tests/test_robustness.py \
  tests/test_simulations.py tests/test_plugin.py tests/test_engine.py tests/test_launch.py tests/test_protocol.py tests/test_glue.py tests/test_dp.py $(ls tests/test_deploy.py 2>/dev/null) "$@"
