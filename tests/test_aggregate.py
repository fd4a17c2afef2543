"""Streaming aggregation (qfl.strategies.aggregate): the same model, bit for bit, as handing
the inner strategy every decoded reply, with server memory independent of the number of replies."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from fakes import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, FedYogi, Strategy

from qfl.clients import compression_mod
from qfl.strategies import Compressed, FedAvgMomentum, compressed
from qfl.strategies import aggregate as streaming

UPLINK = "topk(0.5) | qsgd(16)"


def model(elements: int = 3000) -> ArrayRecord:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(elements // 100, 100, generator=g).numpy(),
        "b": torch.randn(10, generator=g).numpy(),
        "bn.running_var": np.ones(10, dtype=np.float32),
        "bn.num_batches_tracked": np.asarray(3, dtype=np.int64),
    }
    return ArrayRecord({k: Array(v) for k, v in tensors.items()})


def client_app(metric_keys=("train_loss",), scale: float = 0.01) -> ClientApp:
    """Moves every float tensor by node-dependent noise; uneven weights (num-examples)."""
    app = ClientApp(mods=[compression_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        node, rnd = context.node_id, int(msg.content["config"]["server-round"])
        g = torch.Generator().manual_seed(node * 100 + rnd)
        out = {}
        for k, a in msg.content["arrays"].items():
            x = torch.from_numpy(a.numpy().copy())
            if x.is_floating_point():
                x += torch.randn(x.shape, generator=g) * (scale * (1 + node % 5))
            else:
                x += 1
            out[k] = Array(x.numpy())
        metrics = {"num-examples": 7 + 13 * (node % 4), **dict.fromkeys(metric_keys, 0.1 * (node % 7) + rnd)}
        return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def strategy(kind, **settings):
    return Compressed(kind(fraction_train=1.0, fraction_evaluate=0.0), uplink=UPLINK, min_elements=50, **settings)


def identical(a: ArrayRecord, b: ArrayRecord) -> bool:
    return list(a) == list(b) and all(
        a[k].numpy().dtype == b[k].numpy().dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a
    )


@pytest.mark.parametrize("kind", [FedAvg, FedAdam, FedYogi, FedAvgM, FedProx, FedAvgMomentum])
def test_streaming_gives_the_per_reply_model_and_metrics_bit_for_bit(kind, monkeypatch):
    grid = FakeGrid(client_app(), 6)
    grid.fail = {grid.node_ids[2]: lambda m: True}  # an error reply among them
    grid.apps[grid.node_ids[4]] = client_app(scale=1e3)  # and one the UpdateGuard drops
    fast, slow = strategy(kind), strategy(kind)
    arrays_fast = arrays_slow = model()
    for rnd in (1, 2, 3):  # the server optimisers' state (momentum, moments) carries over
        replies = grid.send_and_receive(fast.configure_train(rnd, arrays_fast, ConfigRecord(), grid))
        slow.configure_train(rnd, arrays_slow, ConfigRecord(), grid)
        arrays_fast, metrics_fast = fast.aggregate_train(rnd, replies)
        with monkeypatch.context() as m:
            m.setattr(streaming, "LINEAR", frozenset())
            arrays_slow, metrics_slow = slow.aggregate_train(rnd, replies)
        assert identical(arrays_fast, arrays_slow)
        assert dict(metrics_fast) == dict(metrics_slow)
        assert metrics_fast["qfl.failures"] == 1 and metrics_fast["qfl.guarded"] == 1 and "train_loss" in metrics_fast
        assert fast.traffic.rounds == slow.traffic.rounds
    assert not identical(arrays_fast, model())


def test_only_known_classes_or_own_declarations_stream():
    class Custom(FedAvg):  # e.g. a start() override: may override what aggregation calls, too
        pass

    class Declared(FedAvg):
        qfl_linear = True

    class Below(Declared):
        def aggregate_train(self, server_round, replies):
            return super().aggregate_train(server_round, list(replies)[:1])

    assert all(streaming.is_linear(k) for k in (FedAvg, FedAdam, FedAvgMomentum, Declared))
    bare = type("Bare", (Strategy,), {"qfl_linear": True})  # no FedAvg average to keep
    assert not any(streaming.is_linear(k) for k in (Custom, Below, FedTrimmedAvg, bare))


def test_a_subclass_of_a_compressed_class_streams_only_when_its_class_is_linear(monkeypatch):
    calls = []
    original = streaming.mean_reply
    monkeypatch.setattr(streaming, "mean_reply", lambda *a: calls.append(1) or original(*a))
    grid = FakeGrid(client_app(), 3)
    for kind, streams in ((FedAvg, True), (type("Custom", (FedAvg,), {}), False)):
        calls.clear()
        s = compressed(kind, uplink=UPLINK, min_elements=50)(fraction_train=1.0, fraction_evaluate=0.0)
        arrays, _ = s.aggregate_train(1, grid.send_and_receive(s.configure_train(1, model(), ConfigRecord(), grid)))
        assert arrays is not None and bool(calls) == streams


def test_inconsistent_metric_keys_end_the_run_as_flower_would():
    grid = FakeGrid(client_app(), 3)
    grid.apps[grid.node_ids[1]] = client_app(metric_keys=("other",))
    s = strategy(FedAvg)
    with pytest.raises(InconsistentMessageReplies):
        s.aggregate_train(1, grid.send_and_receive(s.configure_train(1, model(), ConfigRecord(), grid)))


def peak(kind, replies_count: int, elements: int, monkeypatch, per_reply: bool = False) -> int:
    """Peak bytes traced while one round of ``replies_count`` replies is aggregated."""
    grid = FakeGrid(client_app(), replies_count)
    s = strategy(kind, guard=None)
    replies = grid.send_and_receive(s.configure_train(1, model(elements), ConfigRecord(), grid))
    with monkeypatch.context() as m:
        if per_reply:
            m.setattr(streaming, "LINEAR", frozenset())
        tracemalloc.start()
        try:
            arrays, _ = s.aggregate_train(1, replies)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert arrays is not None


def test_streaming_memory_does_not_grow_with_the_number_of_replies(monkeypatch):
    elements = 100_000
    size = elements * 4
    few, many = peak(FedAvg, 4, elements, monkeypatch), peak(FedAvg, 16, elements, monkeypatch)
    assert many < 6 * size and many < 1.3 * few
    # The per-reply path (what robust aggregators need) holds every rebuilt reply.
    assert peak(FedAvg, 16, elements, monkeypatch, per_reply=True) > 12 * size
    assert peak(FedTrimmedAvg, 16, elements, monkeypatch) > 12 * size
