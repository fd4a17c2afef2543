"""A client's memory per message, phase by phase: qfl's ``compression_mod`` against plain Flower.

A large model's client runs out of memory on copies: the decoded downlink, the replica
and error memory in ``context.state``, the user's model and what it returns, the update,
the corrected update, the new memory. This runs one client (the benchmark's user
function: build the model, load the received arrays, one SGD step, reply the state dict)
and the server in ONE process through the tests' in-process Grid, first as plain Flower
(FedAvg, no mod), then with qfl (``presets.recommended``'s specs, FedAvgMomentum), and
prints for each round:

* ``client peak``: the resident set's peak while the client handles its message, above
  the level before the round, in multiples of the model's bytes (sampled every 2 ms by a
  thread; Linux's VmHWM is reset before each round);
* for qfl, the same peak per phase of the mod (state read, downlink decode, model
  rebuild, the user's function, update compression, state write).

Memory freed earlier in the process is reused without growing the resident set, and
glibc keeps freed heap memory (the ``retained`` column: released by ``malloc_trim``
before each round so that rounds compare), so these are the figures of one process, as
a Ray actor or a deployment's ClientApp process sees them. ``e2e.py`` measures the whole
simulation. Run::

    PYTHONPATH=. python benchmarks/client_memory.py [--model gpt2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time
from pathlib import Path

import psutil
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "apps" / "bigmodel"))
from bigmodel.models import build, parse_model, train_steps  # the models of scale.py and e2e.py
from fakes import FakeGrid  # the in-process Grid of the tests

import qfl.clients.mod as mod
from qfl.clients import compression_mod
from qfl.clients.records import state_bytes
from qfl.strategies import Compressed, FedAvgMomentum, presets

MB = 1 << 20
PROC = psutil.Process()
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


class Phases:
    """Peak resident set per phase label, sampled by a thread."""

    def __init__(self) -> None:
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self._note(self.phase)
            time.sleep(0.002)

    def _note(self, phase: str) -> None:
        rss = PROC.memory_info().rss
        if rss > self.peaks.get(phase, 0):
            self.peaks[phase] = rss

    def enter(self, phase: str) -> None:
        self._note(self.phase)
        self.phase = phase
        self._note(phase)

    def reset(self) -> None:
        self.peaks = {}
        self.phase = "idle"


def instrument(phases: Phases) -> None:
    """Label the mod's phases (the functions it calls, replaced by timed wrappers)."""
    for owner, name, label in (
        (mod.held_state, "held", "state read"),
        (mod, "decode_record", "downlink decode"),
        (mod, "client_model", "model rebuild"),
        (mod, "_compress_reply", "update compression"),
        (mod.held_state, "commit", "state write"),
    ):
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _label=label, **kwargs):
            phases.enter(_label)
            try:
                return _original(*args, **kwargs)
            finally:
                phases.enter("mod")

        setattr(owner, name, wrapped)


def make_app(model_name: str, phases: Phases, with_mod: bool) -> ClientApp:
    app = ClientApp(mods=[compression_mod] if with_mod else [])

    @app.train()
    def train(msg: Message, context) -> Message:
        phases.enter("user function")
        model = build(model_name)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        train_steps(model_name, model, 1, 1 if parse_model(model_name)[0] == "gpt2" else 8, 16, 1)
        reply = Message(
            RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": 8})}),
            reply_to=msg,
        )
        phases.enter("mod")
        return reply

    return app


def run(model_name: str, rounds: int, with_mod: bool, phases: Phases) -> list[dict]:
    initial = ArrayRecord(build(model_name).state_dict())
    model_bytes = sum(len(a.data) for a in initial.values())
    inner = dict(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
    if with_mod:
        setting = presets.recommended(rounds, 1, 1)
        strategy = Compressed(FedAvgMomentum(server_momentum=0.5, **inner), **setting.compression())
    else:
        strategy = FedAvg(**inner)
    grid = FakeGrid(make_app(model_name, phases, with_mod), 1)
    arrays, rows = initial, []
    for rnd in range(1, rounds + 1):
        messages = strategy.configure_train(rnd, arrays, ConfigRecord({"lr": 0.01}), grid)
        gc.collect()
        before_trim = PROC.memory_info().rss
        _LIBC.malloc_trim(0)
        base = PROC.memory_info().rss
        phases.reset()
        phases.enter("mod")
        replies = grid.send_and_receive(messages)
        phases.enter("idle")
        peak = max(phases.peaks.values())
        new, _ = strategy.aggregate_train(rnd, replies)
        arrays = new or arrays
        del replies, messages
        grid.sent.clear(), grid.received.clear()  # the test Grid's log of every message
        rows.append(
            {
                "round": rnd,
                "base_mb": base / MB,
                "retained_mb": (before_trim - base) / MB,
                "peak": (peak - base) / model_bytes,
                "phases": {p: (v - base) / model_bytes for p, v in phases.peaks.items() if p != "idle"},
                "state": state_bytes(grid.contexts[grid.node_ids[0]].state) / model_bytes,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2", help="gpt2, resnet18 or mlp, with sizes or not (tests/apps/bigmodel)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    phases = Phases()
    instrument(phases)
    size = sum(p.numel() * p.element_size() for p in build(args.model).state_dict().values())
    print(f"# client memory per message, model {args.model} ({size / MB:.0f} MB), pid {os.getpid()}")
    print("# peaks, base and state in multiples of the model's bytes; base/retained in MB")
    print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (memory does not depend on it)")
    for label, with_mod in (("plain Flower", False), ("qfl", True)):
        print(f"\n## {label}")
        print("| round | base MB | retained MB | client peak | state | per phase (above base) |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in run(args.model, args.rounds, with_mod, phases):
            per = ", ".join(f"{p} {v:+.1f}" for p, v in r["phases"].items()) if with_mod else "-"
            cells = [r["round"], f"{r['base_mb']:.0f}", f"{r['retained_mb']:.0f}"]
            cells += [f"{r['peak']:.1f}", f"{r['state']:.1f}"]
            print("| " + " | ".join(map(str, [*cells, per])) + " |")
    print(f"\n# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
