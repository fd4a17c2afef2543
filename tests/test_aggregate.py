"""Streaming aggregation (qfl.strategies.aggregate): the model of handing the inner strategy
every decoded reply (within float rounding, and closer to the exact mean), with server memory
independent of the number of replies."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pytest
import torch
from fakes import FakeGrid
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg, FedYogi, Strategy

from qfl import wire
from qfl.clients import compression_mod
from qfl.clients.records import record_blobs
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


def same_model(a: ArrayRecord, b: ArrayRecord, tol: float) -> bool:
    """Same keys and dtypes, equal values (counters) and floats within ``tol`` of each other."""
    if list(a) != list(b):
        return False
    for k in a:
        x, y = a[k].numpy(), b[k].numpy()
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not (np.allclose(x, y, rtol=tol, atol=tol) if x.dtype.kind == "f" else np.array_equal(x, y)):
            return False
    return True


@pytest.mark.parametrize("kind", [FedAvg, FedAdam, FedYogi, FedAvgMomentum, FedAvgM, FedProx])
def test_streaming_gives_the_per_reply_model_and_the_same_metrics(kind, monkeypatch):
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
        # The two sum in a different order (see WeightedMean): float rounding apart. The
        # adaptive optimisers divide by sqrt(v) + tau, which magnifies an ulp of the mean.
        assert same_model(arrays_fast, arrays_slow, 1e-6 if kind in (FedAvg, FedProx) else 1e-4)
        assert not identical(arrays_fast, model())
        assert dict(metrics_fast) == dict(metrics_slow)
        assert metrics_fast["qfl.failures"] == 1 and metrics_fast["qfl.guarded"] == 1 and "train_loss" in metrics_fast
        assert fast.traffic.rounds == slow.traffic.rounds
        arrays_slow = arrays_fast  # the next round starts both from one model


def test_streaming_mean_is_at_least_as_close_to_the_exact_mean(monkeypatch):
    """FedAvg's mean of the accepted replies, against the same mean in float64."""
    grid = FakeGrid(client_app(scale=1e-4), 6)  # small updates: the base's rounding dominates
    fast, slow = strategy(FedAvg), strategy(FedAvg)
    base = model(30_000)
    replies = grid.send_and_receive(fast.configure_train(1, base, ConfigRecord(), grid))
    slow.configure_train(1, base, ConfigRecord(), grid)
    tensors = {k: torch.from_numpy(base[k].numpy().copy()) for k in base}
    deltas = [fast.protocol.decode_update(m, tensors)[1] for m in replies]
    weights = [m.content["metrics"]["num-examples"] for m in replies]
    arrays_fast, _ = fast.aggregate_train(1, replies)
    with monkeypatch.context() as m:
        m.setattr(streaming, "LINEAR", frozenset())
        arrays_slow, _ = slow.aggregate_train(1, replies)
    worse = 0
    for k in ("w", "b", "bn.running_var"):
        exact = sum(w * (tensors[k].double() + d[k].double()) for w, d in zip(weights, deltas)) / sum(weights)
        err_fast = (torch.from_numpy(arrays_fast[k].numpy()).double() - exact).abs().max()
        err_slow = (torch.from_numpy(arrays_slow[k].numpy()).double() - exact).abs().max()
        assert err_fast <= 1e-6 * exact.abs().max(), (k, err_fast)
        worse += bool(err_fast > err_slow)
    assert worse == 0


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_checks_on_a_sparse_update_equal_the_checks_on_its_dense_rebuild(dtype):
    """NaN, Inf, values beyond MAX_VALUE, a model taken beyond it (float16 overflows at 65504)
    and the norm: the same verdicts at the kept positions as on the dense tensor."""
    from qfl.codec import MAX_VALUE, SparseDelta, norm, out_of_range
    from qfl.strategies.replies import beyond_range

    g = torch.Generator().manual_seed(1)
    base = {"w": (torch.randn(50, 40, generator=g) * 100).to(dtype)}
    idx = torch.randperm(2000, generator=g)[:100].sort().values
    for poison in (None, float("nan"), float("inf"), 2.0 * MAX_VALUE, 7e4):
        values = torch.randn(100, generator=g).to(dtype)
        if poison is not None:
            values[37] = poison
        sparse = {"w": SparseDelta((50, 40), idx, values)}
        dense = {"w": sparse["w"].dense()}
        assert out_of_range(sparse) == out_of_range(dense)
        assert beyond_range(base, sparse) == beyond_range(base, dense)
        n_sparse, n_dense = norm(sparse), norm(dense)
        assert n_sparse == pytest.approx(n_dense, rel=1e-12) or (np.isnan(n_sparse) and np.isnan(n_dense))
    if dtype in (torch.float32, torch.float64):  # in range alone, beyond it added to the model's value
        values = torch.zeros(100, dtype=dtype)
        values[37] = 0.75 * MAX_VALUE
        for at, verdict in ((idx[36], None), (idx[37], "w")):
            high = base["w"].clone()
            high.view(-1)[at] = 0.75 * MAX_VALUE
            assert beyond_range({"w": high}, {"w": SparseDelta((50, 40), idx, values)}) == verdict
            assert beyond_range({"w": high}, {"w": SparseDelta((50, 40), idx, values).dense()}) == verdict


def test_updates_held_between_the_two_passes_fit_in_one_model(monkeypatch):
    """The first pass keeps decoded updates for the sum only within one model's bytes; the
    rest are decoded again, so the server's memory stays O(model) for any number of replies."""
    grid = FakeGrid(client_app(), 12)
    s = Compressed(FedAvg(fraction_train=1.0, fraction_evaluate=0.0), uplink="topk(0.05)", min_elements=50)
    base = model(30_000)
    replies = grid.send_and_receive(s.configure_train(1, base, ConfigRecord(), grid))
    s.protocol.train_replies(1, replies, rebuild=False)
    held = s.protocol.held
    size = sum(a.numpy().nbytes for a in base.values())
    assert 0 < len(held) < len(replies)
    assert sum(d.nbytes for delta in held.values() for d in delta.values()) <= size
    arrays, _ = s.aggregate_train(1, replies)  # a fresh round: held ones and decoded-again ones mixed
    assert arrays is not None and not s.protocol.held


@pytest.mark.parametrize("kind", [FedAvg, FedAvgMomentum])
def test_group_blobs_change_no_aggregate_bit_and_keep_the_models_order(kind, monkeypatch):
    """Small lossless tensors sent in one group blob or each in its own blob: the same
    model, bit for bit, in the model's order (its group members are not adjacent), with
    replies held from the first pass and replies decoded again both summed."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "b": torch.randn(10, generator=g).numpy(),
        "w": torch.randn(300, 100, generator=g).numpy(),
        "bn.num_batches_tracked": np.asarray(3, dtype=np.int64),
        "bn.running_var": np.ones(10, dtype=np.float32),
        "head": torch.randn(20, generator=g).numpy(),
    }
    base = ArrayRecord({k: Array(v) for k, v in tensors.items()})
    results = []
    for group_max in (wire.container.GROUP_MAX_ELEMENTS, 0):
        monkeypatch.setattr(wire.container, "GROUP_MAX_ELEMENTS", group_max)
        random.seed(0)  # FedAvg samples (and so orders) the replies with the random module
        s = Compressed(kind(fraction_train=1.0, fraction_evaluate=0.0), uplink="topk(0.05)", min_elements=50)
        grid = FakeGrid(client_app(), 12)
        arrays = base
        for rnd in (1, 2):
            replies = grid.send_and_receive(s.configure_train(rnd, arrays, ConfigRecord(), grid))
            groups = [v for r in replies for v in record_blobs(r.content["arrays"]).values()]
            assert any(isinstance(v, wire.Group) for v in groups) == (group_max > 0)
            arrays, _ = s.aggregate_train(rnd, replies)
        results.append(arrays)
    assert list(results[0]) == list(tensors) and identical(*results)


@pytest.mark.parametrize("kind", [FedAvg, FedProx, FedAvgMomentum])
def test_the_inner_strategy_skipped_on_the_average_gives_its_own_result(kind, monkeypatch):
    """FedAvg and FedProx (the average itself) and FedAvgMomentum (its step from the
    average) are not called on the one averaged reply: bit for bit their own result, over
    rounds (the momentum's velocity and model carry over)."""
    grid = FakeGrid(client_app(), 5)
    grid.fail = {grid.node_ids[1]: lambda m: True}
    skipping, calling = strategy(kind), strategy(kind)
    arrays = {True: model(), False: model()}
    for rnd in (1, 2, 3):
        replies = grid.send_and_receive(skipping.configure_train(rnd, arrays[True], ConfigRecord(), grid))
        calling.configure_train(rnd, arrays[False], ConfigRecord(), grid)
        arrays[True], metrics_skipping = skipping.aggregate_train(rnd, replies)
        with monkeypatch.context() as m:
            m.setattr(streaming, "_without_inner", lambda *a: None)
            arrays[False], metrics_calling = calling.aggregate_train(rnd, replies)
        assert identical(arrays[True], arrays[False]) and dict(metrics_skipping) == dict(metrics_calling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_the_mean_of_a_tensor_is_apply_delta_of_its_sum_bit_for_bit(dtype):
    """WeightedMean.mean_of adds in numpy where it can; its result is apply_delta's (numpy
    has no bfloat16: such a model never reaches it as numpy arrays)."""
    from qfl.codec import apply_delta

    g = torch.Generator().manual_seed(5)
    base = {"w": (torch.randn(4, 6, generator=g) * 1e3).to(dtype), "s": torch.randn((), generator=g).to(dtype)}
    mean = streaming.WeightedMean(base, [2.0, 5.0])
    for key, t in base.items():
        for factor in mean.factors:
            mean.add(key, torch.randn(t.shape, generator=g).to(dtype), factor)
        expected = apply_delta(t, torch.from_numpy(mean.sums[key]).reshape(t.shape))
        got = mean.mean_of(key)
        assert got.shape == tuple(t.shape) and torch.equal(torch.from_numpy(np.asarray(got)), expected)


def test_the_momentum_step_from_sums_takes_a_value_as_its_mean_not_as_an_update():
    """A reply may carry a value (an integer payload) for a float tensor, as clients do for
    counters the server holds as float: the step from the summed replies then moves to
    the values' mean, as the step from Flower's average does, not to base + their sum."""
    base = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5, 0.5])}
    fused, plain = (FedAvgMomentum(server_momentum=0.9) for _ in range(2))
    fused.current_arrays = plain.current_arrays = ArrayRecord({k: Array(v.numpy()) for k, v in base.items()})
    for rnd in range(2):
        mean = streaming.WeightedMean(
            {k: torch.from_numpy(v.copy()) for k, v in fused._current_numpy().items()}, [1.0, 3.0]
        )
        for factor in mean.factors:
            mean.add("w", torch.tensor([7, 8, 9]), factor)
            mean.add("b", torch.tensor([0.1, -0.2]), factor)
        new, beyond = fused.step_updates(mean.numpy_base(), mean.sums, mean.mean_of)
        expected = plain.step(mean.tensors())
        assert beyond is None and mean.values == {"w"}
        for k in base:
            assert new[k].tobytes() == expected[k].tobytes(), (rnd, k, new[k], expected[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("rate", [1.0, 0.7])
def test_the_compiled_momentum_step_equals_numpy_bit_for_bit(dtype, rate):
    """FedAvgMomentum's step from summed updates (one compiled pass for float32/float64
    parameters, numpy otherwise) gives the model and velocity of its step from the
    average, over rounds, statistics and counters included."""
    rng = np.random.default_rng(3)
    shapes = {"conv.weight": (8, 3, 5), "conv.bias": (8,), "bn.running_var": (8,), "bn.num_batches_tracked": ()}
    start = {
        k: np.asarray(rng.standard_normal(s) if k != "bn.num_batches_tracked" else 4).astype(
            np.int64 if k.endswith("tracked") else dtype
        )
        for k, s in shapes.items()
    }
    fused, plain = (FedAvgMomentum(server_momentum=0.9, server_learning_rate=rate) for _ in range(2))
    fused.current_arrays = plain.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
    work = np.float64 if dtype == np.float64 else np.float32  # the sums' precision, as WeightedMean keeps them
    for _ in range(3):
        base = {k: v.copy() for k, v in fused._current_numpy().items()}
        updates = {
            k: (rng.standard_normal(v.size).astype(work) if v.dtype.kind == "f" else np.asarray([2.0]))
            for k, v in base.items()
        }

        def mean(k, base=base, updates=updates):
            if base[k].dtype.kind != "f":
                return updates[k].reshape(base[k].shape)
            return (base[k].astype(work) + updates[k].reshape(base[k].shape)).astype(base[k].dtype)

        new, beyond = fused.step_updates(base, updates, mean)
        assert beyond is None
        expected = plain.step({k: mean(k) for k in base})
        for k in shapes:
            assert new[k].dtype == expected[k].dtype and new[k].tobytes() == expected[k].tobytes(), k
        for k, v in plain.velocity.items():
            assert fused.velocity[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_the_momentum_step_names_the_first_tensor_it_takes_beyond_range(dtype):
    """The range check counted while the compiled step writes the model (and numpy's check
    of the other tensors) names the first tensor with NaN, Inf or a value beyond the bound."""
    from qfl.codec import MAX_VALUE

    start = {"a": np.zeros(300, dtype), "b": np.zeros(300, dtype), "c": np.zeros(5, dtype)}
    for poison, bound in ((np.nan, MAX_VALUE), (np.inf, MAX_VALUE), (-3.0, 2.5), (3.0, 2.5)):
        s = FedAvgMomentum(server_momentum=0.9)
        s.current_arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
        base = {k: v.copy() for k, v in s._current_numpy().items()}
        work = np.float64 if dtype == np.float64 else np.float32
        updates = {k: np.zeros(v.size, work) for k, v in base.items()}
        updates["b"][123] = poison

        def mean(k, base=base, updates=updates, work=work):
            return (base[k].astype(work) + updates[k]).astype(base[k].dtype)

        clean = {k: np.zeros_like(u) for k, u in updates.items()}
        assert s.step_updates(base, clean, lambda k, base=base: base[k].copy(), bound=bound)[1] is None
        assert s.step_updates(base, updates, mean, bound=bound)[1] == "b", (poison, bound)


def _shared(sizes: dict[str, tuple[int, ...]], dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors lying back to back in one storage, as a group's members are decoded."""
    g = torch.Generator().manual_seed(seed)
    total = sum(int(np.prod(s)) for s in sizes.values())
    flat, out, at = torch.randn(total, generator=g).to(dtype), {}, 0
    for name, shape in sizes.items():
        n = int(np.prod(shape))
        out[name] = flat[at : at + n].view(shape)
        at += n
    return out


def test_runs_are_the_adjacent_tensors_of_one_storage_in_memory_order():
    """Only tensors that follow each other in ONE storage form a run (in memory order, the
    mapping's order aside); adjacent memory of two storages, another dtype, a gap, a
    strided view, an empty tensor, an integer tensor, a sparse update or a tensor that
    needs grad each break it, and the run's values are exactly the members'."""
    from qfl.codec import SparseDelta, Update, dense_runs, layout_of

    group = _shared({"a": (4,), "b": (2, 3), "c": (5,), "d": (3,)})
    raw = np.arange(12, dtype=np.float32)
    split = {"p": torch.from_numpy(raw[:6]), "q": torch.from_numpy(raw[6:])}  # adjacent, two storages
    mixed = torch.zeros(64, dtype=torch.uint8)
    f32, f64 = mixed[:16].view(torch.float32), mixed[16:32].view(torch.float64)  # one storage, two dtypes
    gap = _shared({"g0": (3,), "skip": (2,), "g1": (3,)}, seed=1)
    update = {
        "c": group["c"],
        "x": torch.randn(7),
        "a": group["a"],
        "p": split["p"],
        "q": split["q"],
        "f32": f32,
        "f64": f64,
        "g0": gap["g0"],
        "g1": gap["g1"],
        "t": torch.randn(3, 4)[:, :2],
        "e": group["a"][:0],
        "i": torch.arange(4),
        "s": SparseDelta((9,), torch.tensor([1, 4]), torch.ones(2)),
        "grad": torch.ones(3, requires_grad=True),
        "b": group["b"],
        "d": group["d"],
    }
    runs, rest = dense_runs(update)
    assert [r.names for r in runs] == [("a", "b", "c", "d")]
    assert np.array_equal(runs[0].values, np.concatenate([group[k].reshape(-1).numpy() for k in "abcd"]))
    assert sorted(rest) == sorted(k for k in update if k not in "abcd")
    found = Update(update).layout()  # an Update finds the same, once
    assert [r.names for r in found[0]] == [("a", "b", "c", "d")] and found[1] == rest
    assert layout_of(update) == ((), tuple(update))  # any other mapping: no scan, all rest
    half = {k: group[k] for k in "ab"}  # a run needs two members
    assert [r.names for r in dense_runs(half)[0]] == [("a", "b")] and dense_runs({"a": group["a"]}) == ((), ("a",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checks_of_an_update_with_runs_are_the_checks_one_by_one(dtype):
    """An Update's runs are checked in one pass each; the verdict (the first tensor in the
    model's order), the model-range verdict and the norm are those of checking every
    tensor alone, wherever the bad value lies (a run member, a tensor outside the run,
    several at once)."""
    from qfl.codec import MAX_VALUE, Model, Update, norm, out_of_range
    from qfl.strategies.replies import beyond_range

    sizes = {"n0": (6,), "n1": (2, 4), "n2": (5,), "n3": (3,)}
    g = torch.Generator().manual_seed(2)
    base = {
        "w": torch.randn(8, 8, generator=g).to(dtype),
        **{k: torch.randn(s, generator=g).to(dtype) for k, s in sizes.items()},
        "count": torch.tensor(3),
    }
    order = ["n2", "w", "n0", "count", "n3", "n1"]  # the model's order is not the memory's
    base = {k: base[k] for k in order}
    poisons = [(), (("n1", 3, float("nan")),), (("n3", 0, float("inf")),), (("w", 5, 2 * MAX_VALUE),)]
    poisons += [(("n1", 1, float("nan")), ("n2", 4, float("inf"))), (("n0", 2, -2 * MAX_VALUE), ("w", 0, float("nan")))]
    for poison in poisons:
        for near in (False, True):
            members = _shared(sizes, dtype, seed=3)
            plain = {"w": torch.randn(8, 8, generator=g).to(dtype), **members, "count": torch.tensor(4)}
            plain = {k: plain[k] for k in order}
            for name, at, value in poison:
                plain[name].view(-1)[at] = value
            model = dict(base)
            if near:  # in range alone, out of it added to the model's value
                model["n0"] = base["n0"].clone()
                model["n0"][1] = 0.75 * MAX_VALUE
                plain["n0"].view(-1)[1] = 0.75 * MAX_VALUE
            update = Update(plain)
            assert update.layout()[0], "the members form a run"
            assert out_of_range(update) == out_of_range(dict(plain))
            expected = beyond_range(model, dict(plain))
            kept = Model(model)  # the server's base: its members concatenated once per round
            assert beyond_range(model, update) == beyond_range(kept, update) == beyond_range(kept, update) == expected
            a, b = norm(update), norm(dict(plain))
            assert a == pytest.approx(b, rel=1e-12) or (np.isnan(a) and np.isnan(b)) or a == b


def test_packed_sums_equal_the_sums_tensor_by_tensor_bit_for_bit():
    """WeightedMean sums a run in one flat array whose slices are its members' sums: the
    same bits as adding tensor by tensor, for replies with the run, a reply whose run has
    other members (added member by member into the slices), and a run first seen after
    its members were summed alone."""
    from qfl.codec import Update

    sizes = {"n0": (6,), "n1": (2, 4), "n2": (5,)}
    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(10, generator=g), **{k: torch.randn(s, generator=g) for k, s in sizes.items()}}

    def reply(seed, names=tuple(sizes)):
        members = _shared({k: sizes[k] for k in names}, seed=seed)
        out = {"w": torch.randn(10, generator=g), **members}
        for k in sizes:
            out.setdefault(k, torch.randn(sizes[k], generator=g))
        return out

    for layouts in ((None, None, None), (None, ("n0", "n1"), None), ("plain", None, None)):
        replies = [reply(10 + i, tuple(sizes) if lay in (None, "plain") else lay) for i, lay in enumerate(layouts)]
        packed = streaming.WeightedMean(base, [1.0, 3.0, 5.0])
        alone = streaming.WeightedMean(base, [1.0, 3.0, 5.0])
        for r, lay, f in zip(replies, layouts, packed.factors, strict=True):
            packed.add_update(dict(r) if lay == "plain" else Update(r), f)
            for k, d in r.items():
                alone.add(k, d, f)
        assert bool(packed.packed) == (layouts[0] is None)
        packed.in_order()
        alone.in_order()
        assert list(packed.sums) == list(alone.sums)
        assert all(packed.sums[k].tobytes() == alone.sums[k].tobytes() for k in alone.sums)
        assert identical(packed.record(), alone.record())


def test_a_model_keeps_a_few_concatenated_layouts_per_dtype():
    """Model.concatenated gives concatenated()'s array (None where a member is of another
    dtype), keyed by names and dtype, and keeps at most _KEPT_RUNS layouts: clients that
    group differently cannot make the server hold a copy per layout."""
    from qfl import codec

    g = torch.Generator().manual_seed(6)
    model = codec.Model({f"t{i}": torch.randn(3 + i, generator=g) for i in range(8)})
    model["d"] = torch.randn(4, generator=g, dtype=torch.float64)
    names = ("t0", "t1", "t2")
    first = model.concatenated(names, torch.float32)
    assert np.array_equal(first, np.concatenate([model[k].numpy() for k in names]))
    assert model.concatenated(names, torch.float32) is first  # kept
    assert model.concatenated(names, torch.float64) is None  # another dtype: none, kept apart
    assert model.concatenated(("t0", "d"), torch.float32) is None
    for i in range(3, 8):
        layout = ("t0", f"t{i}")
        expected = codec.concatenated(model, layout, torch.float32)
        assert np.array_equal(model.concatenated(layout, torch.float32), expected)
    assert len(model._concatenated) == codec._KEPT_RUNS
