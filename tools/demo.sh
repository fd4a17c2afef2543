#!/usr/bin/env bash
# Set up (see tools/setup.sh) and run the default comparison offline, with ONE seed: one
# seed of the multi-seed evidence in benchmarks/ACCURACY.md (benchmarks/accuracy.sh runs
# all three seeds and both workloads). Fashion-MNIST, 20 clients with Dirichlet(0.5) label
# skew, 10 per round, 20 local steps; fedavg, 8-bit QSGD and AsyLPG's double quantization
# for 30 rounds, Qsparse-local-SGD (the recommended setting) for 45; the full 10,000-image
# test set; about 10 minutes on 2 cores. Leaves results/report.md, results/summary.csv
# and the PNG plots. Extra args go to the runner (e.g. --seeds 1,2,3 --out other-dir).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh --no-139
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
echo "== one seed: a demo, not evidence (three seeds, both workloads: benchmarks/ACCURACY.md)"
exec .venv/bin/python -m qfl.simulations.runner \
  --methods fedavg,qsgd8,double_quant,qsparse --seeds 1 \
  --rounds 30 --rounds-factor 1.5 --rounds-factor-methods qsparse \
  --clients 20 --fraction 0.5 --local-steps 20 --alpha 0.5 \
  --goals uplink=100,downlink=10 --out results "$@"
