#!/usr/bin/env bash
# Run the whole test suite: every tier on flwr 1.41 (HTTP transport), the Flower-facing
# tests again on flwr 1.39 (gRPC transport), then the style check (ruff). Extra args go to
# pytest. Every step runs even if an earlier one failed; the exit status says if any did.
# Tiers (README "Tests"): -m unit (pure, < 1 min), -m integration (simulation engine),
# -m slow (real deployments).
set -uo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh || exit 1
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
failed=()
echo "== flwr 1.41: full suite"
.venv/bin/python -m pytest -q "$@" || failed+=("flwr 1.41 suite")
echo "== flwr 1.39: Flower integration, simulation engine and deployment tests"
.venv139/bin/python -m pytest -q tests/test_strategy.py tests/test_replica.py tests/test_async.py tests/test_robustness.py \
  tests/test_simulations.py tests/test_plugin.py tests/test_engine.py tests/test_launch.py tests/test_protocol.py tests/test_glue.py tests/test_dp.py tests/test_deploy.py tests/test_aggregate.py tests/test_records.py "$@" \
  || failed+=("flwr 1.39 suite")
echo "== style: ruff format --check, ruff check"
.venv/bin/ruff format --check . || failed+=("ruff format (apply: .venv/bin/ruff format .)")
.venv/bin/ruff check . || failed+=("ruff check (fix: .venv/bin/ruff check --fix .)")
if [ ${#failed[@]} -gt 0 ]; then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all passed"
