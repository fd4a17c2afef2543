#!/usr/bin/env bash
# Set up (see tools/setup.sh) and run the default comparison offline: Fashion-MNIST,
# 20 clients with Dirichlet(0.5) label skew, 5 per round, 20 local steps, 20 rounds, the
# four papers' methods and two baselines in Flower's simulation engine. Leaves
# results/report.md, results/summary.csv and the PNG plots. Extra args go to the runner
# (e.g. --methods fedavg,qsparse --rounds 40 --out other-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/python -m qfl.simulations.runner \
  --methods fedavg,qsgd8,qsparse,double_quant,qesgd,ef_signsgd \
  --rounds 20 --clients 20 --fraction 0.25 --local-steps 20 --alpha 0.5 \
  --set test-samples=2000 --out results "$@"
