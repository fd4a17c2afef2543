"""Does the README's recommended setting keep plain Flower's accuracy in a quickstart-shaped app?

    python benchmarks/quickstart.py --seeds 1,2,3 --rounds 10

tests/apps/quickstart is Flower's quickstart-pytorch shape (4 SuperNodes, every client
trains every round, one local epoch with momentum SGD, a small CNN with BatchNorm) with
qfl added in two places. For each seed it runs the app twice in Flower's simulation
engine: plain Flower (FedAvg, no ``Compressed``) for ``--rounds`` rounds, and the
recommended setting for 1.5 times as many: ``presets.recommended(rounds, clients per
round, local steps)``, chosen inside the app as a user would, or the specs given with ``--uplink``,
``--downlink`` and ``--server-momentum``. The server evaluates the global model on the
Fashion-MNIST test set after every round.

Goal (issue "Accuracy you can trust at 100x"): the recommended setting reaches plain
Flower's smoothed accuracy (mean of its last 5 evaluations) - 1 pp within 1.5x plain
Flower's rounds, on every seed. Prints one line per seed and PASS/FAIL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "apps" / "quickstart"


def run(fed, config: dict, out: Path) -> dict:
    result = fed.run_app(
        APP,
        {**config, "result-path": str(out)},
        timeout=3600,
        federation_config={"num-supernodes": 4, "client-resources-num-cpus": 1},
    )
    result.check()
    return json.loads(out.read_text())


def main() -> int:
    from qfl.simulations.compare import DROP, WINDOW
    from qfl.simulations.processes import unwind_on_sigterm
    from qfl.simulations.superlink import LocalFederation
    from qfl.strategies.presets import SPARSE_DOWNLINK

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--rounds", type=int, default=10, help="plain Flower's rounds (qfl gets 1.5x)")
    p.add_argument("--max-samples", type=int, default=3000, help="training images per client")
    p.add_argument("--test-samples", type=int, default=10000)
    p.add_argument("--uplink", help="instead of the recommended setting (with --downlink, --server-momentum)")
    p.add_argument("--downlink", default=SPARSE_DOWNLINK)
    p.add_argument("--server-momentum", type=float, default=0.5)
    args = p.parse_args()
    unwind_on_sigterm()  # a killed benchmark stops the federation it started
    seeds = [int(s) for s in args.seeds.split(",")]
    longer = math.ceil(1.5 * args.rounds)
    common = {
        "fraction-train": 1.0,
        "local-epochs": 1,
        "lr": 0.05,
        "batch-size": 32,
        "max-samples": args.max_samples,
        "test-samples": args.test_samples,
    }
    qfl_config = (
        {"uplink": args.uplink, "downlink": args.downlink, "server-momentum": args.server_momentum}
        if args.uplink
        else {"recommended": True}
    )
    print(f"load average {os.getloadavg()[0]:.2f}; qfl: {qfl_config}", flush=True)
    verdicts = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, LocalFederation(simulation=True, num_supernodes=4) as fed:
        for seed in seeds:
            plain = run(
                fed,
                {**common, "seed": seed, "plain": True, "num-server-rounds": args.rounds},
                Path(tmp) / f"plain-{seed}.json",
            )
            ours = run(
                fed, {**common, **qfl_config, "seed": seed, "num-server-rounds": longer}, Path(tmp) / f"qfl-{seed}.json"
            )
            base = [plain["central"][str(r)] for r in range(1, args.rounds + 1)]
            acc = [ours["central"][str(r)] for r in range(1, longer + 1)]
            target = sum(base[-WINDOW:]) / len(base[-WINDOW:]) - DROP
            reached = next((r for r, a in enumerate(acc, 1) if a >= target), None)
            verdicts.append(reached is not None)
            print(
                f"seed {seed}: plain Flower {100 * base[-1]:.2f}% at round {args.rounds} (smoothed "
                f"{100 * (target + DROP):.2f}%, target {100 * target:.2f}%); qfl "
                f"{100 * acc[args.rounds - 1]:.2f}% at round {args.rounds}, {100 * acc[-1]:.2f}% at {longer}, "
                + (f"target at round {reached}" if reached else f"target not reached in {longer} rounds")
                + f"; bytes {ours['uplink_full'] / max(ours['uplink'], 1):.0f}x fewer up, "
                f"{ours['downlink_full'] / max(ours['downlink'], 1):.0f}x fewer down per round; {ours['compression']}",
                flush=True,
            )
    print(
        f"{'PASS' if all(verdicts) else 'FAIL'}: qfl reaches plain Flower's smoothed accuracy - "
        f"1 pp within 1.5x its rounds on {sum(verdicts)}/{len(verdicts)} seeds "
        f"({time.perf_counter() - started:.0f} s, load average {os.getloadavg()[0]:.2f})"
    )
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
