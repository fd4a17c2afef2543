"""The strategy wrapper and the client mod, through an in-process Grid.

The fake grid runs the real ClientApp (with compression_mod) per node and passes every
message through Flower's serialisation, so these tests exercise the whole protocol
(downlink versions, resyncs, uplink memory, dropped replies, byte accounting) in a
second, without a SuperLink.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_data, tiny_model
from expected import container_bytes
from fakes import Capture, FakeGrid, blobs_of
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedTrimmedAvg

import qfl
from qfl.clients import LocalTraining, make_client_app
from qfl.clients.records import encode_record, record_blobs, record_bytes, to_tensors
from qfl.clients.state import load_replica
from qfl.codec import digest
from qfl.compress import IDENTITY, Payload, Raw
from qfl.strategies import Compressed, MisconfigurationError, UpdateGuard
from qfl.wire import STYPE, Group, encode

PLAN = LocalTraining(steps=5, lr=0.1)


def app(mod: bool = True):
    return make_client_app(tiny_model, tiny_data, default=PLAN, mods=(qfl.clients.compression_mod,) if mod else ())


def initial() -> ArrayRecord:
    return ArrayRecord(tiny_model().state_dict())


def eval_loss(result, last=True) -> float:
    rounds = sorted(result.evaluate_metrics_clientapp)
    return float(result.evaluate_metrics_clientapp[rounds[-1] if last else rounds[0]]["eval_loss"])


# ----------------------------------------------------------------- whole runs
@pytest.mark.parametrize(
    "inner",
    [
        lambda: FedAvg(),
        lambda: FedAdam(eta=0.05, eta_l=0.1),
        lambda: FedAvgM(server_momentum=0.5, server_learning_rate=0.5),  # 1.0 diverges uncompressed too
        lambda: FedProx(proximal_mu=0.01),
        lambda: FedTrimmedAvg(beta=0.2),
        lambda: qfl.strategies.FedAvgMomentum(server_momentum=0.5, server_learning_rate=0.5),
    ],
)
def test_any_inner_strategy_trains_with_both_directions_compressed(inner):
    grid = FakeGrid(app(), 5)
    strategy = Compressed(inner(), uplink="topk(0.1) | qsgd(16)", downlink="delta | qsgd(256)", min_elements=200)
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=4)
    assert eval_loss(result) < eval_loss(result, last=False)
    # What the strategy reports is what crossed the (fake) wire.
    total = strategy.traffic.total()
    assert total.downlink == FakeGrid.array_bytes(grid.sent)
    assert total.uplink == FakeGrid.array_bytes(m for m in grid.received if m.metadata.message_type == "train")
    assert total.uplink < total.uplink_full / 4
    assert total.downlink < total.downlink_full / 2
    # Full-precision uplink: what the clients' float32 models take, although FedAdam's server
    # model (and so the plain-Flower downlink) is float64.
    train_replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert total.uplink_full == len(train_replies) * record_bytes(initial())
    for r, metrics in result.train_metrics_clientapp.items():
        assert metrics["qfl.uplink-bytes"] == strategy.traffic.at(r, "train").uplink


def test_identity_spec_equals_plain_fedavg():
    plain_grid = FakeGrid(app(mod=False), 4)
    plain = FedAvg().start(grid=plain_grid, initial_arrays=initial(), num_rounds=3)
    grid = FakeGrid(app(), 4)
    wrapped = Compressed(FedAvg()).start(grid=grid, initial_arrays=initial(), num_rounds=3)
    a, b = to_tensors(plain.arrays), to_tensors(wrapped.arrays)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-5, atol=1e-6), k


def test_uplink_bytes_are_what_the_spec_implies():
    grid = FakeGrid(app(), 3)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="randk(k=64)", downlink=None, min_elements=1000)
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    # No evaluation rounds: nothing counted, no empty metrics in the result (as plain FedAvg).
    assert not result.evaluate_metrics_clientapp
    assert {phase for _, phase in strategy.traffic.rounds} == {"train"}
    model = to_tensors(initial())
    for reply in grid.received:
        record = next(iter(r for r in reply.content.array_records.values()))
        (arr,) = record.values()  # one container Array for all tensors
        assert arr.stype == STYPE and arr.dtype == "uint8" and arr.shape == (len(arr.data),)
        blobs = record_blobs(record, model)
        assert len(arr.data) == container_bytes({k: b if isinstance(b, Group) else len(b) for k, b in blobs.items()})
        small = [k for k, t in model.items() if t.numel() < 1000 and t.is_floating_point()]
        for name, blob in blobs.items():
            t = model[name]
            if t.numel() >= 1000:  # rand-k of 64 float32 values: 256 bytes plus the header and seed
                assert 256 + 8 < len(blob) <= 256 + 8 + 48
            elif not t.is_floating_point():  # a counter, the only int64 tensor: alone, raw bytes plus the header
                assert t.numel() * t.element_size() < len(blob) <= t.numel() * t.element_size() + 48
            else:  # passthrough, lossless, all float32 ones in one group: raw bytes plus one header
                assert isinstance(blob, Group) and [m for m, _ in blob.members] == small
                raw = sum(model[k].numel() * model[k].element_size() for k in small)
                assert raw < len(blob.data) <= raw + 48


# ------------------------------------------------------------- shared records
class Spy(FedAvg):
    """FedAvg that remembers the (shared) content it built."""

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.original = msgs[0].content
        self.snapshot = {k: bytes(a.data) for k, a in self.original["arrays"].items()}
        return msgs


def test_shared_recorddict_is_never_mutated_and_payloads_are_encoded_once(monkeypatch):
    import qfl.replica

    calls = []
    real = qfl.replica.encode

    def counting(p):
        calls.append(p)
        return real(p)

    monkeypatch.setattr(qfl.replica, "encode", counting)
    grid = FakeGrid(app(), 6)
    spy = Spy()
    strategy = Compressed(spy, uplink=None, downlink="model | grid(8)")
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord({"lr": 0.1}), grid))
    assert all(m.content is msgs[0].content for m in msgs)  # one payload, one content
    assert msgs[0].content is not spy.original
    assert all(a.stype == "numpy.ndarray" for a in spy.original["arrays"].values())
    assert {k: bytes(a.data) for k, a in spy.original["arrays"].items()} == spy.snapshot
    assert not any(k.startswith("qfl.") for k in spy.original["config"])
    assert len(calls) == len(spy.snapshot)  # once per tensor, not once per client
    assert msgs[0].content["config"]["lr"] == 0.1


def test_delta_mode_groups_clients_by_replica_state():
    grid = FakeGrid(app(), 4)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.2)", downlink="delta | qsgd(64)")
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    strategy.downlink.forget(grid.node_ids[0])  # this one will need a resync
    msgs = list(strategy.configure_train(3, result.arrays, ConfigRecord(), grid))
    contents = {id(m.content) for m in msgs}
    assert len(contents) == 2
    full = [m for m in msgs if m.content["config"]["qfl.base"] == -1]
    assert [m.metadata.dst_node_id for m in full] == [grid.node_ids[0]]


# ---------------------------------------------------------------- replicas
def test_every_client_replica_matches_the_server_record_with_partial_participation():
    grid = FakeGrid(app(), 6)
    strategy = Compressed(
        FedAvg(fraction_train=0.5, fraction_evaluate=0.0, min_train_nodes=2),
        uplink="topk(0.1) | qsgd(16)",
        downlink="delta | topk(0.05) | qsgd(64)",
        history=4,
    )
    arrays = initial()
    for _ in range(8):
        arrays = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1).arrays
        for nid in grid.node_ids:
            replica, version = load_replica(grid.contexts[nid].state)
            if nid in strategy.downlink.nodes:
                assert strategy.downlink.nodes[nid] == version
                assert digest(replica) == strategy.downlink._digests[version]
    state = strategy.downlink.state_size()
    assert state["steps"] <= 4 and state["digests"] <= 5
    contacted = {m.metadata.dst_node_id for m in grid.sent}
    # Everyone contacted was resynced once at first contact, plus those who fell too far behind.
    assert strategy.traffic.total().resyncs >= len(contacted) >= 2


def test_anchor_mode_sends_the_anchor_once_per_epoch_and_client():
    from qfl.strategies.presets import qesgd

    grid = FakeGrid(app(), 4)
    strategy = qesgd(levels=63, first_epoch=2, growth=2, min_elements=200, fraction_evaluate=0.0)
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=6)
    # Epochs start at rounds 1 and 3: only then does everyone get the anchor in full;
    # in between, the replies' anchor reports let the server send only the difference.
    resyncs = [strategy.traffic.at(r, "train").resyncs for r in range(1, 7)]
    assert resyncs == [4, 0, 4, 0, 0, 0]
    full = strategy.traffic.at(1, "train").downlink
    assert all(strategy.traffic.at(r, "train").downlink < full / 3 for r in (2, 4, 5, 6))
    assert result.arrays is not None


def test_a_client_that_failed_is_resynced_not_chained():
    grid = FakeGrid(app(), 3)
    strategy = Compressed(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1), uplink="topk(0.1)", downlink="delta | topk(0.1)", history=3
    )
    absent = grid.node_ids[2]
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=1)
    grid.fail[absent] = lambda m: True
    result = strategy.start(grid=grid, initial_arrays=result.arrays, num_rounds=2)
    grid.fail.clear()
    assert absent not in strategy.downlink.nodes  # failing made the server forget it
    strategy.start(grid=grid, initial_arrays=result.arrays, num_rounds=1)
    last = [m for m in grid.sent if m.metadata.dst_node_id == absent][-1]
    assert last.content["config"]["qfl.base"] == -1
    replica, version = load_replica(grid.contexts[absent].state)
    assert version == strategy.downlink.version


def test_superlink_error_replies_make_the_server_forget_the_right_node():
    """The SuperLink answers for a node that went away (stopped, restarted) with an error
    reply whose source is the SuperLink itself; the node it was for must be resynced."""
    grid = FakeGrid(app(), 3)
    strategy = Compressed(
        FedAvg(fraction_evaluate=0.0, min_train_nodes=1), uplink="topk(0.1)", downlink="delta | topk(0.1)"
    )
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=1)
    victim = grid.node_ids[0]
    assert victim in strategy.downlink.nodes
    grid.fail[victim] = lambda m: True
    carry = grid.send_and_receive

    def superlink_answers(messages, *, timeout=None):
        replies = carry(messages, timeout=timeout)
        for reply in replies:
            if reply.has_error():
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return replies

    grid.send_and_receive = superlink_answers
    result = strategy.start(grid=grid, initial_arrays=result.arrays, num_rounds=1)
    assert strategy.traffic.total().failures == 1
    assert victim not in strategy.downlink.nodes
    grid.fail.clear()
    strategy.start(grid=grid, initial_arrays=result.arrays, num_rounds=1)
    last = [m for m in grid.sent if m.metadata.dst_node_id == victim][-1]
    assert last.content["config"]["qfl.base"] == -1  # resynced at once, no round lost to a stale delta


def test_restarted_client_is_resynced_and_training_continues():
    grid = FakeGrid(app(), 3)
    strategy = Compressed(FedAvg(), uplink="signtopk(0.1)", downlink="delta | qsgd(64)")
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert strategy.traffic.total().resyncs == 3
    victim = grid.node_ids[1]
    grid.contexts[victim].state = RecordDict()  # the SuperNode restarted: state lost
    with Capture() as log:
        result = strategy.start(grid=grid, initial_arrays=result.arrays, num_rounds=2)
    assert any("no replica held" in line for line in log.lines)
    replies = [m for m in grid.received if m.metadata.src_node_id == victim]
    assert replies[-1].has_content()  # it trains again after the resync
    assert strategy.traffic.total().resyncs == 3 + 1  # everyone at the start, the victim once more
    assert strategy.traffic.total().failures == 1  # its first reply after the restart: no replica
    replica, version = load_replica(grid.contexts[victim].state)
    assert version == strategy.downlink.version


def test_evaluate_messages_are_compressed_and_report_bytes():
    grid = FakeGrid(app(), 3)
    strategy = Compressed(FedAvg(), uplink="topk(0.1)", downlink="model | grid(6)")
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    evals = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    assert evals and all(a.stype == STYPE for m in evals for a in m.content["arrays"].values())
    assert result.evaluate_metrics_clientapp[2]["qfl.downlink-bytes"] == FakeGrid.array_bytes(evals[-3:])
    assert "eval_acc" in result.evaluate_metrics_clientapp[2]


# -------------------------------------------------------------- bad replies
def good_replies(strategy, grid):
    msgs = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))
    return grid.send_and_receive(msgs)


def forge(reply: Message, arrays: ArrayRecord | None = None, drop_info: bool = False) -> Message:
    content = RecordDict({k: v for k, v in reply.content.items() if not (drop_info and k == "qfl")})
    if arrays is not None:
        content["arrays"] = arrays
    return Message(content=content, metadata=reply.metadata)


def test_bad_replies_are_dropped_with_a_reason_and_the_round_goes_on():
    grid = FakeGrid(app(), 8)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.1) | qsgd(16)", downlink=None)
    replies = good_replies(strategy, grid)
    model = to_tensors(initial())
    big = "0.weight"
    blobs = blobs_of(replies[1].content["arrays"])

    flipped = dict(blobs)
    data = bytearray(flipped[big])
    data[len(data) // 2] ^= 0x40
    flipped[big] = bytes(data)

    nan = {k: torch.zeros_like(v, dtype=torch.float32) if v.is_floating_point() else v for k, v in model.items()}
    nan[big][0, 0] = float("nan")
    # a hostile client: a lossless payload carrying NaN
    nan_blobs = {**blobs, "3.bias": encode(Payload(IDENTITY, (4,), torch.float32, Raw(torch.full((4,), float("nan")))))}

    missing = {k: v for k, v in blobs.items() if k != big}
    other_op = {**blobs, big: encode(IDENTITY.compress(torch.zeros(64, 20)))}
    wrong_shape = {**blobs, big: encode(qfl.parse("topk(0.1) | qsgd(16)").compress(torch.zeros(20, 64)))}

    bad = [
        forge(replies[1], encode_record(flipped)),
        forge(replies[2], encode_record(nan_blobs)),
        forge(replies[3], encode_record(missing)),
        forge(replies[4], encode_record(other_op)),
        forge(replies[5], encode_record(wrong_shape)),
        forge(replies[6], drop_info=True),
    ]
    reasons = ["checksum", "NaN", "missing ['0.weight']", "configured operator", "shape", "no qfl record"]
    good = [replies[0], replies[7]]
    base = strategy.protocol.base  # the round's, forgotten once its replies are aggregated
    with Capture() as log:
        arrays_out, metrics = strategy.aggregate_train(1, good + bad)
    assert strategy.protocol.base is None
    assert metrics["qfl.dropped"] == 6
    for reason in reasons:
        assert any("dropped the reply" in line and reason in line for line in log.lines), reason
    # The aggregate is exactly the aggregate of the good replies.
    strategy2 = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.1) | qsgd(16)", downlink=None)
    strategy2.protocol._base, strategy2.protocol._full_bytes = base, strategy.protocol._full_bytes
    ref, _ = strategy2.aggregate_train(1, good)
    for k, v in to_tensors(ref).items():
        assert torch.equal(v, to_tensors(arrays_out)[k])


def test_all_replies_bad_keeps_the_model():
    grid = FakeGrid(app(), 2)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.1)")
    replies = good_replies(strategy, grid)
    with pytest.raises(MisconfigurationError, match="compression_mod"):  # answered as if without the mod
        strategy.aggregate_train(1, [forge(r, drop_info=True) for r in replies])


def test_huge_update_norm_is_dropped():
    grid = FakeGrid(app(), 2)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.1)", guard=UpdateGuard(max_update_norm=1e-6))
    replies = good_replies(strategy, grid)
    with Capture() as log:
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["qfl.dropped"] == 2 and any("max_update_norm" in line for line in log.lines)


def test_failed_clients_do_not_stop_the_round():
    grid = FakeGrid(app(), 4)
    grid.fail[grid.node_ids[0]] = lambda m: True
    strategy = Compressed(FedAvg(min_available_nodes=4), uplink="topk(0.1)", downlink="delta | qsgd(64)")
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert result.arrays is not None and len(result.train_metrics_clientapp) == 2
    assert [m["qfl.failures"] for m in result.train_metrics_clientapp.values()] == [1, 1]
    assert strategy.traffic.total().dropped == 0


# ------------------------------------------------------------------- the mod
def test_mod_passes_through_messages_without_qfl_settings():
    grid = FakeGrid(app(), 2)
    result = FedAvg().start(grid=grid, initial_arrays=initial(), num_rounds=1)
    assert all(
        a.stype == "numpy.ndarray"
        for m in grid.received
        if m.has_content()
        for r in m.content.array_records.values()
        for a in r.values()
    )
    assert result.arrays is not None


def test_mod_turns_a_corrupt_downlink_into_an_error_reply():
    grid = FakeGrid(app(), 1)
    strategy = Compressed(FedAvg(min_available_nodes=1, min_train_nodes=1), downlink="model | grid(8)")
    msg = list(strategy.configure_train(1, initial(), ConfigRecord(), grid))[0]
    blobs = blobs_of(msg.content["arrays"])
    content = RecordDict(dict(msg.content.items()))
    content["arrays"] = encode_record({**blobs, "0.weight": b"QF\x07"})
    msg.content = content
    reply = grid.send_and_receive([msg])[0]
    assert reply.has_error() and "could not rebuild the model" in reply.error.reason
    assert "version 7" in reply.error.reason


def test_mod_refuses_nan_from_training():
    def nan_model(ctx):
        m = tiny_model()
        return m

    def train_nan_app():
        from flwr.clientapp import ClientApp

        a = ClientApp(mods=[qfl.clients.compression_mod])

        @a.train()
        def train(msg, ctx):
            sd = msg.content["arrays"].to_torch_state_dict()
            sd["0.weight"][0, 0] = float("nan")
            return Message(
                RecordDict({"arrays": ArrayRecord(sd), "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
            )

        return a

    grid = FakeGrid(train_nan_app(), 1)
    strategy = Compressed(FedAvg(min_available_nodes=1, min_train_nodes=1), uplink="topk(0.1)")
    reply = grid.send_and_receive(list(strategy.configure_train(1, initial(), ConfigRecord(), grid)))[0]
    assert reply.has_error() and "NaN" in reply.error.reason


def test_error_feedback_warning_for_unbiased_high_variance():
    grid = FakeGrid(app(), 2)
    with Capture() as log:
        Compressed(FedAvg(), uplink="qsgd(2)").configure_train(1, initial(), ConfigRecord(), grid)
    assert any("can diverge" in line for line in log.lines)
    with Capture() as log:
        Compressed(FedAvg(), uplink="qsgd(2)", error_feedback=False).configure_train(1, initial(), ConfigRecord(), grid)
    assert not any("can diverge" in line for line in log.lines)


def test_client_error_memory_persists_in_context_state():
    grid = FakeGrid(app(), 2)
    strategy = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.05)")
    strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    for ctx in grid.contexts.values():
        memory = to_tensors(ctx.state["qfl.memory"])
        assert set(memory) == {"0.weight"}  # only the lossy tensor keeps a residual
        assert float(memory["0.weight"].abs().sum()) > 0


def test_a_second_strategy_in_the_same_run_starts_with_fresh_client_state():
    grid = FakeGrid(app(), 2)
    first = Compressed(FedAvg(fraction_evaluate=0.0), uplink="topk(0.1)", downlink="delta | qsgd(64)")
    result = first.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert all("qfl.memory" in ctx.state for ctx in grid.contexts.values())
    second = Compressed(FedAvg(fraction_evaluate=0.0), uplink=None, downlink="delta | qsgd(64)")
    second.start(grid=grid, initial_arrays=result.arrays, num_rounds=1)
    # The first strategy's error memory must not leak into the second's updates.
    assert not any("qfl.memory" in ctx.state for ctx in grid.contexts.values())
    assert second.traffic.total().resyncs == 2 and second.traffic.total().dropped == 0
    for ctx in grid.contexts.values():
        assert load_replica(ctx.state)[1] == second.downlink.version


# ----------------------------------------------------------------- server momentum
def _reply(arrays: dict, n: int) -> Message:
    request = Message(RecordDict(), dst_node_id=7, message_type="train")
    request.metadata.__dict__["_message_id"] = "m1"
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": MetricRecord({"num-examples": n})}
    )
    return Message(content, reply_to=request)


def test_server_momentum_moves_parameters_and_averages_statistics():
    import numpy as np

    from qfl.strategies import FedAvgMomentum

    start = {
        "w": np.ones(3, np.float32),
        "bn.running_var": np.ones(2, np.float32),
        "bn.num_batches_tracked": np.array(0, np.int64),
    }
    strategy = FedAvgMomentum(server_momentum=0.5)
    strategy.configure_train(
        1, ArrayRecord({k: Array(v) for k, v in start.items()}), ConfigRecord(), FakeGrid(app(), 2)
    )
    var = np.full(2, 0.1, np.float32)  # the clients' running variance fell to 0.1 in round 1
    for server_round, w in ((1, 0.5), (2, 0.5)):
        arrays, _ = strategy.aggregate_train(
            server_round,
            [_reply({"w": np.full(3, w, np.float32), "bn.running_var": var, "bn.num_batches_tracked": np.array(5)}, 1)],
        )
    got = {k: a.numpy() for k, a in arrays.items()}
    # w: 1 -> 0.5 (v = 0.5), then v = 0.5 * 0.5 + 0 -> 0.25: momentum carries it on.
    assert got["w"] == pytest.approx(np.full(3, 0.25))
    # Statistics take the replies' average: Flower's FedAvgM would extrapolate the
    # variance to 0.1 - 0.45 < 0 (NaN activations).
    assert got["bn.running_var"] == pytest.approx(var) and got["bn.num_batches_tracked"] == 5
    assert got["bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize(
    ("rounds", "clients", "steps"),
    [(15, 4, 75), (30, 4, 75), (45, 10, 20), (45, 15, 10), (45, 10, 40), (200, 50, 20), (1, 1, 1), (20, 5, 10)],
)
def test_recommended_budgets_the_uplink_by_the_runs_length_and_local_work(rounds, clients, steps):
    from qfl.spec import parse, parse_downlink
    from qfl.strategies import presets

    setting = presets.recommended(rounds, clients, steps)
    up = parse(setting.uplink)
    ratio = up.sparsifier.ratio
    low, high = presets.RATIO_BOUNDS
    wanted = presets.STEP_BUDGET * steps / (rounds * clients)
    assert ratio == pytest.approx(min(high, max(low, wanted)), rel=1e-2)
    # the evidence's points: top-1% on both workloads, top-10% on the quickstart shape
    assert {(45, 10, 20): 0.01, (45, 15, 10): 0.01, (15, 4, 75): 0.1, (30, 4, 75): 0.1}.get(
        (rounds, clients, steps), ratio
    ) == ratio
    assert up.properties(100_000).contraction > 0  # error memory converges without damping
    mode, down = parse_downlink(setting.downlink)
    assert mode == "delta" and down.sparsifier.ratio == pytest.approx(min(2 * ratio, 1), rel=1e-2)
    assert down.properties(100_000).contraction > 0  # so is the server's (downlink) memory
    strategy = setting.build(fraction_train=0.5)
    assert isinstance(strategy, Compressed) and strategy.uplink.op == up


def test_recommended_refuses_what_is_not_a_run_length():
    from qfl.strategies import presets

    for args in [(0, 4, 1), (10, 0, 1), (2.5, 4, 1), (10, -1, 1), (10, 4, 0), (10, 4, True)]:
        with pytest.raises(ValueError, match="positive integer"):
            presets.recommended(*args)
    assert presets.RECOMMENDED == presets.recommended(45, 10, 20)
    # at top-1% the recommended setting is the qsparse preset, spec for spec
    qsparse = presets.qsparse()
    strategy = presets.RECOMMENDED.build()
    assert (qsparse.uplink, qsparse.downlink.policy, qsparse.downlink.mode) == (
        strategy.uplink,
        strategy.downlink.policy,
        strategy.downlink.mode,
    )
    assert "topk(0.01)" in presets.RECOMMENDED.uplink


@pytest.mark.parametrize(
    ("uplink", "downlink", "warned"),
    [
        # top-k then a coarse l2 quantizer (variance 1.5): biased and no contraction, either way
        ("topk(0.1) | qsgd(levels=15, bucket=512)", None, "uplink"),
        ("topk(0.1)", "delta | topk(0.2) | qsgd(levels=15, bucket=512)", "downlink"),
        # the same with max-norm buckets of 128 (variance 0.14): a contraction, no warning
        (
            "topk(0.1) | qsgd(levels=15, norm=max, bucket=128)",
            "delta | topk(0.2) | qsgd(levels=15, norm=max, bucket=128)",
            None,
        ),
        ("topk(0.1)", "model | qsgd(levels=15, bucket=512)", None),  # no downlink memory to diverge
    ],
)
def test_error_memory_without_a_contraction_is_warned_per_direction(uplink, downlink, warned):
    grid = FakeGrid(app(), 2)
    with Capture() as log:
        # 100k values: top-10% keeps 10k, and a 512-value l2 bucket then has variance 1.5
        model = ArrayRecord({"w": torch.zeros(100_000)})
        Compressed(FedAvg(), uplink=uplink, downlink=downlink).configure_train(1, model, ConfigRecord(), grid)
    lines = [line for line in log.lines if "no convergence guarantee" in line]
    assert [line.split("qfl: ")[1].split()[0] for line in lines] == ([warned] if warned else [])
