#!/usr/bin/env bash
# Set up (see tools/setup.sh) and run the default comparison offline: Fashion-MNIST,
# 20 clients with Dirichlet(0.5) label skew, 10 per round, 20 local steps, 60 rounds, the
# four papers' methods (Qsparse-local-SGD in both of its forms) and the fedavg baseline
# in Flower's simulation engine; about 7 minutes on 2 cores. Leaves results/report.md,
# results/summary.csv and the PNG plots. Extra args go to the runner (e.g.
# --methods fedavg,qsparse --rounds 40 --out other-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec .venv/bin/python -m qfl.simulations.runner \
  --methods fedavg,qsgd8,qsparse,qsparse_sign,double_quant,qesgd \
  --rounds 60 --clients 20 --fraction 0.5 --local-steps 20 --alpha 0.5 \
  --set test-samples=2000 --out results "$@"
