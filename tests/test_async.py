"""The asynchronous strategy: arrival order, staleness, silence, failures, bounded state."""

from __future__ import annotations

from conftest import tiny_data, tiny_model
from fakes import AsyncFakeGrid, FakeGrid
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg

from qfl.clients import LocalTraining, evaluate, make_client_app
from qfl.clients.state import load_replica
from qfl.codec import digest
from qfl.strategies import AsyncCompressed, Compressed

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
    s = strategy()
    s.start(grid, initial(), num_updates=8)
    assert s.stats.failed >= 1 and s.stats.applied == 8


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
