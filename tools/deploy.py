"""Run the simulation app as a real Flower deployment on this machine: ``python tools/deploy.py --help``.

The harness lives in ``tools/qfl_deploy`` (outside the qfl wheel); see its ``deploy`` module.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qfl_deploy.deploy import main

if __name__ == "__main__":
    raise SystemExit(main())
