"""Server memory of one round's aggregation: streaming (linear strategies) against per reply.

``Compressed(FedAvg(...))`` sums the accepted replies one at a time
(:mod:`qfl.strategies.aggregate`); the per-reply path, which robust aggregators need,
holds every decoded reply. For a ResNet-18-sized model (11.2M parameters) and N = 4, 16,
64 replies (``--clients``) this prints, for each path, the peak memory while
``aggregate_train`` runs, in multiples of the model's size:

* ``traced``: tracemalloc's peak (numpy arrays and Python objects, e.g. Flower Arrays);
* ``rss``: the resident set's peak above its level before the call, sampled every
  millisecond by a thread (torch tensors are not traced by tracemalloc). Memory the
  allocators freed earlier in the process is reused without growing the resident set,
  so this is a lower bound, and so is ``traced`` for the per-reply path (its decoded
  torch deltas are not traced);

and the time of each path and of its parts: ``checks`` decodes and checks every reply
(and, per reply, rebuilds it), ``second`` is the streaming path's extra decode of each
accepted reply into the running sum (the guard needs every norm before it accepts any
update, so the first decode cannot feed the sum). The replies are made once, by
``compression_mod`` on a model moved by noise, and handed to a fresh strategy per
measurement. Both paths run in this one process, so the figures are ratios of one run.
Run::

    PYTHONPATH=. python benchmarks/server_memory.py [--clients 4,16,64] [--uplink "topk(0.01) | qsgd(16)"]
        [--strategies fedavg,fedadam,...]

With ``--strategies`` each inner strategy qfl sums one reply at a time is measured in turn,
and a goal line per strategy compares the streaming path's traced peak at the largest N
with its peak at the smallest (O(model): no growth with N).
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "apps" / "bigmodel"))
from bigmodel.models import resnet18  # the model of scale.py and e2e.py
from fakes import FakeGrid  # the in-process Grid of the tests

from qfl.clients import compression_mod
from qfl.strategies import Compressed
from qfl.strategies import aggregate as streaming

#: ``--strategies``: the inner strategies qfl aggregates one reply at a time, by lower-case
#: class name (qfl's own list, ``LINEAR``).
STRATEGIES = {kind.__name__.lower(): kind for kind in sorted(streaming.LINEAR, key=lambda k: k.__name__)}
#: The streaming path's traced peak at the largest N over its peak at the smallest: O(model)
#: means no growth with N, up to this much for allocator noise.
FLAT = 1.25


def inner(name: str):
    """A fresh inner strategy of ``--strategies``' ``name``, sampling every node."""
    return STRATEGIES[name](fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)


def client_app() -> ClientApp:
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        g = torch.Generator().manual_seed(context.node_id)
        out = {}
        for k, a in msg.content["arrays"].items():
            x = torch.from_numpy(a.numpy().copy())
            if x.is_floating_point():
                x += torch.randn(x.shape, generator=g) * 0.01
            out[k] = Array(x.numpy())
        metrics = MetricRecord({"num-examples": 10 + context.node_id % 7})
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": metrics}), reply_to=msg)

    return app


class PeakRss:
    """The resident set's peak above its start, sampled by a thread while the block runs."""

    def __enter__(self) -> PeakRss:
        self.proc, self.start, self.peak, self.done = psutil.Process(), 0, 0, False
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def grown(self) -> int:
        return self.peak - self.start


def timed(fn, into: dict, name: str):
    def run(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + time.perf_counter() - t

    return run


def measure(
    model: ArrayRecord, replies: list[Message], uplink: str, per_reply: bool, strategy_name: str = "fedavg"
) -> tuple[int, int, dict]:
    """(traced peak, rss growth, seconds per part) of one aggregate_train over ``replies``,
    with the inner strategy ``strategy_name`` (a key of :data:`STRATEGIES`).

    Parts: ``total``; ``checks``, the first decode of every reply with every check (the
    norms the guard needs, and the rebuilt replies on the per-reply path); ``second``,
    the streaming path's second decode of the accepted replies into the running sum.
    """
    grid = FakeGrid(client_app(), len(replies))
    strategy = Compressed(inner(strategy_name), uplink=uplink)
    strategy.configure_train(1, model, ConfigRecord(), grid)
    seconds: dict[str, float] = {}
    strategy.protocol.train_replies = timed(strategy.protocol.train_replies, seconds, "checks")
    linear, mean_reply = streaming.LINEAR, streaming.mean_reply
    streaming.LINEAR = frozenset() if per_reply else linear
    streaming.mean_reply = timed(mean_reply, seconds, "second")
    gc.collect()
    try:
        tracemalloc.start()
        with PeakRss() as rss:
            t = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, replies)
            seconds["total"] = time.perf_counter() - t
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        streaming.LINEAR, streaming.mean_reply = linear, mean_reply
    if arrays is None:
        raise RuntimeError("the round aggregated nothing: check the uplink spec")
    return traced, rss.grown, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="4,16,64")
    parser.add_argument("--uplink", default="topk(0.01) | qsgd(16)")
    parser.add_argument(
        "--strategies",
        default="fedavg",
        help=f"comma-separated inner strategies, of: {', '.join(STRATEGIES)} (default fedavg)",
    )
    args = parser.parse_args(argv)
    counts = sorted(int(c) for c in args.clients.split(","))
    names = [n.strip().lower() for n in args.strategies.split(",") if n.strip()]
    if not names or any(n not in STRATEGIES for n in names):
        parser.error(f"--strategies takes a comma-separated subset of: {', '.join(STRATEGIES)}")
    torch.manual_seed(0)
    model = ArrayRecord(resnet18().state_dict())
    size = sum(a.numpy().nbytes for a in model.values())
    print(f"model: {sum(a.numpy().size for a in model.values()) / 1e6:.1f}M elements, {size / 2**20:.1f} MiB")
    grid = FakeGrid(client_app(), max(counts))
    maker = Compressed(inner("fedavg"), uplink=args.uplink)
    t = time.perf_counter()
    replies = grid.send_and_receive(maker.configure_train(1, model, ConfigRecord(), grid))
    up = np.mean([sum(len(a.data) for a in next(iter(r.content.array_records.values())).values()) for r in replies])
    print(f"{len(replies)} replies made in {time.perf_counter() - t:.0f} s, {up / 2**20:.2f} MiB each ({args.uplink})")
    verdicts = []
    for name in names:
        measure(model, replies[:1], args.uplink, False, name)  # warm-up: compiled kernels, first-use allocations
        print(f"\n## inner strategy {STRATEGIES[name].__name__}")
        print(f"{'N':>4} {'path':>9} {'traced/model':>13} {'rss/model':>10} {'seconds':>8} {'checks':>7} {'second':>7}")
        peaks: dict[bool, list[int]] = {False: [], True: []}
        for n in counts:
            row = {}
            for per_reply in (False, True):
                traced, grown, seconds = measure(model, replies[:n], args.uplink, per_reply, name)
                row[per_reply] = (traced, grown, seconds)
                peaks[per_reply].append(traced)
                print(
                    f"{n:>4} {'per-reply' if per_reply else 'streaming':>9} {traced / size:>13.2f} "
                    f"{grown / size:>10.2f} {seconds['total']:>8.2f} {seconds['checks']:>7.2f} "
                    f"{seconds.get('second', 0.0):>7.2f}"
                )
            (ts, rs, ss), (tp, rp, sp) = row[False], row[True]
            print(
                f"{n:>4} streaming/per-reply: traced {ts / tp:.3f}, rss {rs / max(rp, 1):.3f}, time "
                f"{ss['total'] / sp['total']:.2f}; second decode / first decode+checks "
                f"{ss['second'] / ss['checks']:.2f}"
            )
        growth, theirs = peaks[False][-1] / peaks[False][0], peaks[True][-1] / peaks[True][0]
        verdicts.append(
            f"{STRATEGIES[name].__name__}: streaming traced peak at N={counts[-1]} / at N={counts[0]} = {growth:.2f}x "
            f"(per-reply {theirs:.1f}x); O(model) needs <= {FLAT}x -> {'PASS' if growth <= FLAT else 'FAIL'}"
        )
    print("\ngoals (server memory O(model), not O(clients x model)):")
    for line in verdicts:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
