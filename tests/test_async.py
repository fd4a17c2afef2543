"""The asynchronous strategy: arrival order, staleness, silence, failures, bounded state."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_data, tiny_model
from fakes import AsyncFakeGrid, FakeGrid
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from qfl.clients import LocalTraining, evaluate, make_client_app
from qfl.clients.records import decode_record
from qfl.clients.state import load_replica
from qfl.codec import digest
from qfl.strategies import AsyncCompressed, Compressed, MisconfigurationError

PLAN = LocalTraining(steps=5, lr=0.1)


def app():
    return make_client_app(tiny_model, tiny_data, default=PLAN)


def initial() -> ArrayRecord:
    return ArrayRecord(tiny_model().state_dict())


def central_loss():
    x, y, _, _ = tiny_data(type("C", (), {"node_config": {"partition-id": 99}})())
    model = tiny_model()

    def fn(version: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, x, y)
        return MetricRecord({"loss": loss, "accuracy": acc})

    return fn


def strategy(**kw) -> AsyncCompressed:
    defaults = dict(
        concurrency=3,
        buffer_size=1,
        max_staleness=4,
        uplink="topk(0.2) | qsgd(16)",
        downlink="delta | qsgd(64)",
        min_elements=200,
        poll_interval=0.0,
    )
    return AsyncCompressed(**{**defaults, **kw})


def test_out_of_order_replies_are_applied_with_their_staleness():
    grid = AsyncFakeGrid(app(), 4, delays={1000: 0, 1001: 1, 1002: 3, 1003: 2})
    s = strategy()
    result = s.start(grid, initial(), num_updates=12, evaluate_fn=central_loss())
    arrival = [m.metadata.src_node_id for m in grid.received]
    assert arrival != sorted(arrival)  # they did arrive out of order
    assert s.stats.applied == 12 and s.stats.accepted == 12
    assert s.stats.staleness_sum > 0  # slow nodes' updates were computed on older models
    losses = result.evaluate_metrics_serverapp
    assert losses[max(losses)]["loss"] < losses[0]["loss"]


def test_updates_older_than_tau_are_rejected():
    grid = AsyncFakeGrid(app(), 4, delays={1003: 12})
    s = strategy(max_staleness=2)
    s.start(grid, initial(), num_updates=30)
    assert s.stats.stale >= 1
    # A rejected update moves nothing: only accepted ones were applied.
    assert s.stats.applied == s.stats.accepted == 30


def test_a_silent_client_times_out_and_frees_its_slot():
    grid = AsyncFakeGrid(app(), 3)
    grid.silent.add(1001)
    s = strategy(concurrency=3, message_timeout=0.05, poll_interval=0.01)
    s.start(grid, initial(), num_updates=10, max_time=60)
    assert s.stats.applied == 10
    assert s.stats.timed_out >= 1
    assert 1001 not in s.downlink.nodes


def test_failed_replies_do_not_stop_the_run():
    grid = AsyncFakeGrid(app(), 3)
    grid.fail[1002] = lambda m: True
    s = strategy(max_unusable=2)  # counted in a row: usable replies come in between
    s.start(grid, initial(), num_updates=8)
    assert s.stats.failed > 2 and s.stats.applied == 8


def test_state_stays_bounded_and_replicas_match_after_many_versions():
    grid = AsyncFakeGrid(app(), 6, delays={1000: 0, 1001: 2, 1002: 5, 1003: 1, 1004: 0, 1005: 3})
    s = strategy(concurrency=4, buffer_size=2, max_staleness=6, history=5)
    sizes = []

    def sample(version, arrays):
        sizes.append(s.state_size())
        return None

    s.start(grid, initial(), num_updates=16, evaluate_fn=sample)
    assert len(sizes) >= 8  # sampled at (almost) every version
    assert all(z["jobs"] <= 4 and z["buffered"] < 2 and z["steps"] <= 5 and z["digests"] <= 6 for z in sizes)
    # Every replica a client holds is exactly what the server has on record for that
    # version (the server may not have heard of the newest ones yet: replies in flight).
    assert s.downlink.nodes
    for nid, version in s.downlink.nodes.items():
        replica, held = load_replica(grid.contexts[nid].state)
        assert held >= version and digest(replica) == s.downlink._digests[held]
    assert s.traffic.total().dropped == 0 and s.stats.dropped == 0


def fedbuff_replay(grid: AsyncFakeGrid, start: dict, buffer_size: int, lr: float, exponent: float, versions: int):
    """The model FedBuff's rule makes of the replies in the order the server took them
    in, in float64, each update decoded densely from the reply's own blobs:
    ``model + lr * sum_i n_i (1 + s_i)^-a delta_i / sum_i n_i`` every ``buffer_size``
    updates, s_i the versions since the model its client was sent, a counter the newest."""
    sent = {m.metadata.message_id: int(m.content["config"]["server-round"]) for m in grid.sent}
    model = {k: v.double() if v.is_floating_point() else v.clone() for k, v in start.items()}
    version, buffered = 0, []
    for reply in grid.received:
        if version >= versions:
            break  # the server stops taking replies in once done
        staleness = version - sent[reply.metadata.reply_to_message_id]
        delta = {
            k: ps[0].decompress().reshape(model[k].shape) for k, ps in decode_record(reply.content["arrays"]).items()
        }
        n = float(reply.content["metrics"]["num-examples"])
        buffered.append((delta, n * (1 + staleness) ** -exponent, n))
        if len(buffered) < buffer_size:
            continue
        total = sum(b[2] for b in buffered)
        for k, t in model.items():
            if t.is_floating_point():
                model[k] = t + lr * sum(d[k].double() * w for d, w, _ in buffered) / total
            else:
                model[k] = buffered[-1][0][k].to(t.dtype)
        version, buffered = version + 1, []
    return model


@pytest.mark.parametrize("uplink", ["topk(0.2) | qsgd(16)", "randk(0.3)", "qsgd(16)"])
def test_buffered_updates_are_summed_as_they_arrive_into_fedbuffs_step(uplink):
    """Sparse and dense uplinks: the server's model is FedBuff's step of the very updates
    it took in (staleness-weighted, divided by the examples), and between steps it holds
    one sum of the model's size, not one update per buffered reply."""
    held = []

    class Sampled(AsyncFakeGrid):
        def pull_messages(self, message_ids):
            held.append(s.state_size())
            return super().pull_messages(message_ids)

    grid = Sampled(app(), 5, delays={1000: 0, 1001: 2, 1002: 1, 1003: 4, 1004: 0})
    s = strategy(concurrency=4, buffer_size=4, max_staleness=50, staleness_exponent=0.5, server_lr=0.8, uplink=uplink)
    start = tiny_model().state_dict()
    result = s.start(grid, ArrayRecord(start), num_updates=5)
    assert s.stats.applied == 5 and s.stats.accepted == 20 and s.stats.staleness_sum > 0
    expected = fedbuff_replay(grid, start, 4, 0.8, 0.5, 5)
    got = result.arrays.to_torch_state_dict()
    assert got.keys() == expected.keys()
    for k, t in got.items():
        assert t.dtype == start[k].dtype
        torch.testing.assert_close(t.double(), expected[k].double(), rtol=1e-5, atol=1e-6, msg=k)
    model_bytes = sum(t.nbytes for t in start.values())
    assert max(z["buffered"] for z in held) == 3
    assert all(z["buffer_bytes"] <= model_bytes for z in held)


def test_async_reaches_the_sync_accuracy_band():
    sync_grid = FakeGrid(app(), 4)
    sync = Compressed(
        FedAvg(fraction_evaluate=0.0), uplink="topk(0.2) | qsgd(16)", downlink="delta | qsgd(64)", min_elements=200
    )
    sync_result = sync.start(grid=sync_grid, initial_arrays=initial(), num_rounds=6, evaluate_fn=central_loss())
    grid = AsyncFakeGrid(app(), 4, delays={1000: 0, 1001: 1, 1002: 2, 1003: 1})
    s = strategy(concurrency=4, buffer_size=2)
    result = s.start(grid, initial(), num_updates=12, evaluate_fn=central_loss())  # 24 client updates, as sync
    sync_acc = sync_result.evaluate_metrics_serverapp[6]["accuracy"]
    async_acc = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]["accuracy"]
    assert async_acc >= sync_acc - 0.05


def test_clients_without_the_mod_stop_the_run_with_a_clear_error():
    """Every node lacks compression_mod: no reply is ever usable, so the run must not wait
    for updates that never come (nor end at max_time with the initial model)."""
    plain = make_client_app(tiny_model, tiny_data, default=PLAN, mods=())
    for grid in (AsyncFakeGrid(plain, 4), AsyncFakeGrid(PlainReplies(), 4)):
        s = strategy(concurrency=3)
        with pytest.raises(MisconfigurationError, match="compression_mod"):
            s.start(grid, initial(), num_updates=5, max_time=60)
        assert s.stats.applied == 0


def test_one_client_without_the_mod_among_working_ones_is_dropped_and_the_run_goes_on():
    grid = AsyncFakeGrid(app(), 4)
    grid.apps[grid.node_ids[1]] = make_client_app(tiny_model, tiny_data, default=PLAN, mods=())
    grid.apps[grid.node_ids[2]] = PlainReplies()
    s = strategy(concurrency=4)
    s.start(grid, initial(), num_updates=8)
    assert s.stats.applied == 8
    assert s.stats.failed >= 1 and s.stats.dropped >= 1  # the one that crashed, the one that answered plainly


class PlainReplies:
    """A ClientApp that answers every train message with a model of its own, no qfl record
    (it never reads the message's arrays)."""

    def __call__(self, msg, context):
        return Message(RecordDict({"arrays": initial(), "metrics": MetricRecord({"num-examples": 10})}), reply_to=msg)


class Switching:
    """Node by node, answers its n-th message (1-based) without the mod when n is in
    ``plain_at[node]``, else as the working ClientApp does."""

    def __init__(self, plain_at: dict[int, set[int]]) -> None:
        self.plain_at, self.seen, self.good, self.plain = plain_at, {}, app(), PlainReplies()

    def __call__(self, msg, context):
        node = msg.metadata.dst_node_id
        self.seen[node] = self.seen.get(node, 0) + 1
        handler = self.plain if self.seen[node] in self.plain_at.get(node, ()) else self.good
        return handler(msg, context)


def test_a_usable_reply_clears_the_nodes_seen_without_the_mod():
    """With two nodes both busy, the first node's first reply and the second node's third
    lack qfl's record, with usable replies in between: never both at once, so the run goes
    on (counting the two as distinct nodes without the mod across the run would stop it)."""
    grid = AsyncFakeGrid(app(), 2)
    a, b = grid.node_ids
    switching = Switching({a: {1}, b: {3}})
    grid.apps = {a: switching, b: switching}
    s = strategy(concurrency=2)
    s.start(grid, initial(), num_updates=6)
    assert s.stats.applied == 6 and s.stats.dropped == 2


def test_a_run_where_no_reply_is_ever_usable_stops_with_the_last_problem():
    """Every node fails, or none answers: without a limit the run would wait forever for
    its updates. With max_unusable=None it keeps waiting (here until max_time)."""
    grid = AsyncFakeGrid(app(), 3)
    for nid in grid.node_ids:
        grid.fail[nid] = lambda m: True
    s = strategy(max_unusable=12)
    with pytest.raises(RuntimeError, match=r"last 12 replies \(or timeouts\) brought no usable update .*node failed"):
        s.start(grid, initial(), num_updates=5, max_time=60)
    assert s.stats.failed == 12 and s.stats.applied == 0

    grid = AsyncFakeGrid(app(), 2)
    grid.silent.update(grid.node_ids)
    s = strategy(max_unusable=4, message_timeout=0.01, poll_interval=0.005)
    with pytest.raises(RuntimeError, match="did not answer within"):
        s.start(grid, initial(), num_updates=5, max_time=60)
    assert s.stats.timed_out == 4

    grid = AsyncFakeGrid(app(), 2)
    for nid in grid.node_ids:
        grid.fail[nid] = lambda m: True
    s = strategy(max_unusable=None)
    s.start(grid, initial(), num_updates=5, max_time=0.5)
    assert s.stats.failed > 12 and s.stats.applied == 0
    with pytest.raises(ValueError, match="max_unusable"):
        strategy(max_unusable=0)
