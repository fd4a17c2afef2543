"""Hostile and broken clients, failures, restarts and reproducibility, in whole runs.

Every test runs the real ClientApp (with ``compression_mod``) per node on the fake
grid, through Flower's serialisation. Hostile nodes run a mod *outside*
``compression_mod`` that rewrites the compressed reply every round (or a train function
that sends a poisoned update); broken nodes fail, time out (their reply arrives too
late) or are offline. The runs must go on, count what they drop or miss per round,
and aggregate exactly what the honest clients sent.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_data, tiny_model
from fakes import AsyncFakeGrid, Capture, FakeGrid, blobs_of, contained, per_tensor
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg

import qfl
from qfl.clients import LocalTraining, compression_mod, make_client_app
from qfl.clients.records import blob_array, to_tensors
from qfl.clients.state import load_replica
from qfl.codec import MAX_VALUE, digest
from qfl.compress import IDENTITY, Levels, Payload, Raw, Sparse
from qfl.strategies import AsyncCompressed, Compressed, UpdateGuard
from qfl.wire import WireFormatError, decode, encode

PLAN = LocalTraining(steps=2, lr=0.1)
UPLINK = "topk(0.1) | qsgd(16)"
DOWNLINK = "delta | qsgd(256)"
MIN_ELEMENTS = 200  # 0.weight (64x20) and 3.weight (4x64) are compressed, the rest passes through


def honest_app(mods=(compression_mod,)) -> ClientApp:
    return make_client_app(tiny_model, tiny_data, default=PLAN, mods=mods)


def initial() -> ArrayRecord:
    return ArrayRecord(tiny_model().state_dict())


class Ordered(FedAvg):
    """FedAvg over the replies in node order (so runs with different participants can be
    compared bit for bit), remembering whose replies it aggregated each round."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.aggregated: dict[int, list[int]] = {}

    def aggregate_train(self, server_round, replies):
        replies = sorted(replies, key=lambda m: m.metadata.src_node_id)
        self.aggregated[server_round] = [m.metadata.src_node_id for m in replies if not m.has_error()]
        return super().aggregate_train(server_round, replies)


def strategy_for(num_nodes: int, **kwargs) -> Compressed:
    inner = Ordered(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=num_nodes)
    return Compressed(
        inner, **{"uplink": UPLINK, "downlink": DOWNLINK, "min_elements": MIN_ELEMENTS, "seed": 3, **kwargs}
    )


def snapshots(into: dict):
    """An evaluate_fn that keeps the global model after every round."""

    def keep(server_round, arrays):
        into[server_round] = {k: v.clone() for k, v in to_tensors(arrays).items()}
        return None

    return keep


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ hostile clients
def huge_blob(n: int = 1 << 24) -> bytes:
    """A valid blob of the configured operator that declares n elements (13,000 times
    0.weight): decoding it in full would cost the server 64 MB for a 200 kB reply."""
    op = qfl.parse(UPLINK)
    k = op.sparsifier.expected_count(n)
    body = Sparse(torch.arange(k), None, Levels(torch.zeros(1), torch.zeros(k, dtype=torch.int8)))
    return encode(Payload(op, (n,), torch.float32, body))


def poisoned(scale: float):
    """0.weight's compressed update with its scales multiplied: a valid payload of the
    configured operator whose norm is ``scale`` times the honest one."""

    def attack(arrays: ArrayRecord, content: RecordDict) -> None:
        p = decode(arrays["0.weight"].data)
        body = Sparse(p.body.indices, None, Levels(p.body.values.scales * scale, p.body.values.levels))
        arrays["0.weight"] = blob_array(encode(Payload(p.op, p.shape, p.dtype, body)))

    return attack


def replace(key: str, make):
    def attack(arrays: ArrayRecord, content: RecordDict) -> None:
        arrays[key] = make(arrays)

    return attack


def blob_of(payload: Payload) -> Array:
    return blob_array(encode(payload))


def flipped(arrays: ArrayRecord) -> Array:
    data = bytearray(arrays["0.weight"].data)
    data[len(data) // 2] ^= 0x10
    return blob_array(bytes(data))


def drop(key: str):
    def attack(arrays: ArrayRecord, content: RecordDict) -> None:
        del arrays[key]

    return attack


def drop_info(arrays: ArrayRecord, content: RecordDict) -> None:
    del content["qfl"]


HUGE = {}

#: attack name -> (rewrite of the compressed reply, a phrase of the server's log line)
ATTACKS = {
    "nan": (
        replace(
            "0.bias", lambda a: blob_of(Payload(IDENTITY, (64,), torch.float32, Raw(torch.full((64,), float("nan")))))
        ),
        "NaN",
    ),
    "inf": (
        replace(
            "3.bias",
            lambda a: blob_of(Payload(IDENTITY, (4,), torch.float32, Raw(torch.tensor([1.0, float("inf"), 0.0, 0.0])))),
        ),
        "3.bias contains NaN, Inf",
    ),
    "wrong-shape": (
        replace("0.weight", lambda a: blob_of(qfl.parse(UPLINK).compress(torch.randn(20, 64)))),
        "shape (20, 64) does not match",
    ),
    "missing-key": (drop("3.bias"), "missing ['3.bias']"),
    "extra-key": (replace("evil", lambda a: blob_of(IDENTITY.compress(torch.zeros(3)))), "unexpected ['evil']"),
    "other-operator": (
        replace("0.weight", lambda a: blob_of(qfl.parse("qsgd(256)").compress(torch.randn(64, 20)))),
        "the configured operator is topk",
    ),
    "huge-size": (
        replace("0.weight", lambda a: blob_array(HUGE.setdefault("blob", huge_blob()))),
        "exceeds the allowed maximum 1280",
    ),
    "two-payloads": (replace("0.weight", lambda a: blob_array(a["0.weight"].data * 2)), "max_total_elements=1280"),
    "corrupt": (replace("0.weight", flipped), "checksum"),
    "plain-array": (replace("0.weight", lambda a: Array(torch.zeros(64, 20).numpy())), "not a qfl payload"),
    "plain-model": (lambda a, c: ArrayRecord({k: Array(torch.zeros(3).numpy()) for k in a}), "one Array, 'qfl'"),
    "wrong-stype": (lambda a, c: ArrayRecord({"qfl": Array(torch.zeros(3).numpy())}), "has stype"),
    "trailing-bytes": (
        lambda a, c: ArrayRecord({"qfl": blob_array(contained(a)["qfl"].data + b"\0")}),
        "unexpected trailing bytes",
    ),
    "no-qfl-record": (drop_info, "no qfl record"),
    "huge-norm": (poisoned(1e6), "max_update_norm"),
}


def attack_mod(rewrite):
    """A mod placed outside compression_mod: rewrites the compressed train reply (its
    tensors' blobs, packed again into the container unless the rewrite returns a record)."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or not reply.has_content():
            return reply
        content = RecordDict(dict(reply.content.items()))
        arrays = per_tensor(content["arrays"])
        sent = rewrite(arrays, content)  # a rewrite may send another record than the container
        content["arrays"] = contained(arrays) if sent is None else sent
        reply.content = content
        return reply

    return mod


HONEST = 3
ROUNDS = 3


def test_hostile_clients_are_dropped_every_round_and_honest_updates_aggregated_exactly():
    names = list(ATTACKS)
    grid = FakeGrid(honest_app(), HONEST + len(names))
    for i, name in enumerate(names):
        grid.apps[grid.node_ids[HONEST + i]] = honest_app(mods=(attack_mod(ATTACKS[name][0]), compression_mod))
    strategy = strategy_for(len(grid.node_ids), guard=UpdateGuard(max_update_norm=50.0))
    models: dict = {}
    with Capture() as log:
        result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=ROUNDS, evaluate_fn=snapshots(models))
    assert result.arrays is not None and sorted(models) == list(range(ROUNDS + 1))
    honest = grid.node_ids[:HONEST]
    for r in range(1, ROUNDS + 1):
        metrics = result.train_metrics_clientapp[r]
        assert metrics["qfl.dropped"] == len(names), r
        assert metrics["qfl.failures"] == 0 and metrics["qfl.missing"] == 0
        assert strategy.strategy.aggregated[r] == honest
    dropped = [line for line in log.lines if "dropped the reply" in line]
    assert len(dropped) == len(names) * ROUNDS
    for i, name in enumerate(names):
        node = grid.node_ids[HONEST + i]
        mine = [line for line in dropped if f"node {node} " in line]
        assert len(mine) == ROUNDS and all(ATTACKS[name][1] in line for line in mine), (name, mine[:1])
    # Bit for bit what the honest clients alone produce, round after round.
    alone = FakeGrid(honest_app(), HONEST)
    reference: dict = {}
    strategy_for(HONEST).start(
        grid=alone, initial_arrays=initial(), num_rounds=ROUNDS, evaluate_fn=snapshots(reference)
    )
    for r in range(ROUNDS + 1):
        assert same(models[r], reference[r]), r
    # The server never trusted the hostile nodes' replicas: they are resynced every round.
    assert strategy.downlink.resyncs == {"new": len(grid.node_ids), "behind": 0, "lost": len(names) * (ROUNDS - 1)}
    assert set(strategy.downlink.nodes) == set(honest)


def test_the_asynchronous_server_drops_every_hostile_reply_and_applies_only_honest_ones():
    """The same attacks against AsyncCompressed, plus an update in range whose model is
    not: 3.bias starts at half of MAX_VALUE (equal across classes, so the honest clients
    still train) and a client sends 0.75 MAX_VALUE for it."""
    beyond = replace(
        "3.bias",
        lambda a: blob_of(Payload(IDENTITY, (4,), torch.float32, Raw(torch.full((4,), 0.75 * MAX_VALUE)))),
    )
    attacks = {**ATTACKS, "beyond": (beyond, "takes 3.bias beyond")}
    grid = AsyncFakeGrid(honest_app(), HONEST + len(attacks))
    hostile = dict(zip(grid.node_ids[HONEST:], attacks, strict=True))
    for node, name in hostile.items():
        grid.apps[node] = honest_app(mods=(attack_mod(attacks[name][0]), compression_mod))
    start = tiny_model().state_dict()
    start["3.bias"] = torch.full((4,), 0.5 * MAX_VALUE)
    strategy = AsyncCompressed(
        concurrency=len(grid.node_ids),
        max_staleness=len(grid.node_ids),
        uplink=UPLINK,
        downlink=DOWNLINK,
        min_elements=MIN_ELEMENTS,
        guard=UpdateGuard(max_update_norm=50.0),
        poll_interval=0.0,
        seed=3,
    )
    with Capture() as log:
        result = strategy.start(grid, ArrayRecord(start), num_updates=2 * HONEST)
    assert strategy.stats.applied == 2 * HONEST
    sent = {}  # node -> replies the server took in (those pulled after the last version are not)
    for reply in grid.received:
        if reply.metadata.reply_to_message_id not in strategy.jobs:
            sent[reply.metadata.src_node_id] = sent.get(reply.metadata.src_node_id, 0) + 1
    dropped = [line for line in log.lines if "dropped the reply" in line]
    for node, name in hostile.items():
        mine = [line for line in dropped if f"node {node} " in line]
        assert sent.get(node, 0) >= 1 and len(mine) == sent[node], name
        assert all(attacks[name][1] in line for line in mine), (name, mine[:1])
    assert strategy.stats.dropped == len(dropped) == sum(sent[n] for n in hostile)
    assert strategy.stats.accepted + strategy.stats.stale == sum(sent.get(n, 0) for n in grid.node_ids[:HONEST])
    assert not set(hostile) & set(strategy.downlink.nodes)  # no hostile replica is trusted
    model = to_tensors(result.arrays)
    assert all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < MAX_VALUE for t in model.values())


def test_without_per_tensor_limits_a_huge_declaration_would_be_decoded():
    """The server decodes each reply tensor with that tensor's size as the limit, so the
    huge-size attack costs nothing; the generic limit alone would decode 16M elements."""
    blob = huge_blob()
    with pytest.raises(WireFormatError, match="exceeds the allowed maximum 1280"):
        decode(blob, strategy_for(1).protocol.limits_for(torch.zeros(64, 20)))
    assert decode(blob).numel == 1 << 24  # what the default limits would have let through


def test_a_poisoned_train_function_is_dropped_by_the_norm_limit():
    """A client whose *training* is hostile (a scaled update, honestly compressed)."""

    def boosting_app() -> ClientApp:
        a = ClientApp(mods=[compression_mod])

        @a.train()
        def train(msg, ctx):
            arrays = msg.content["arrays"].to_torch_state_dict()
            boosted = {k: v * 1000 if v.is_floating_point() else v for k, v in arrays.items()}
            from flwr.app import MetricRecord

            return Message(
                RecordDict({"arrays": ArrayRecord(boosted), "metrics": MetricRecord({"num-examples": 240})}),
                reply_to=msg,
            )

        return a

    grid = FakeGrid(honest_app(), 3)
    grid.apps[grid.node_ids[2]] = boosting_app()
    strategy = strategy_for(3, guard=UpdateGuard(max_update_norm=50.0))
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert [result.train_metrics_clientapp[r]["qfl.dropped"] for r in (1, 2)] == [1, 1]
    assert strategy.strategy.aggregated[2] == grid.node_ids[:2]


# ------------------------------------------------------------------------ failures
def in_rounds(*rounds: int):
    """A per-message predicate: true for train messages of the given rounds."""
    return lambda m: m.metadata.message_type == "train" and int(m.content["config"]["qfl.round"]) in rounds


def test_clients_that_fail_time_out_or_vanish_mid_round_do_not_stop_the_run():
    grid = FakeGrid(honest_app(), 6)
    a, b, c = grid.node_ids[:3]
    grid.fail[a] = in_rounds(2, 3)  # error replies
    grid.timeout[b] = in_rounds(2)  # trains, applies the downlink, but its reply comes too late
    grid.offline[c] = in_rounds(3)  # never gets round 3's message
    strategy = strategy_for(6)
    with Capture() as log:
        result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=5)
    metrics = result.train_metrics_clientapp
    assert [metrics[r]["qfl.failures"] for r in range(1, 6)] == [0, 1, 1, 0, 0]
    assert [metrics[r]["qfl.missing"] for r in range(1, 6)] == [0, 1, 1, 0, 0]
    assert any("1 of 6 nodes did not reply in round 2" in line for line in log.lines)
    agg = strategy.strategy.aggregated
    assert a not in agg[2] and b not in agg[2] and a not in agg[3] and c not in agg[3]
    assert all(len(agg[r]) == 6 for r in (1, 4, 5))
    # The failed node is resynced (twice: it failed again after the first resync); the
    # late one had applied round 2's step, so round 3's chain from its last
    # acknowledged version brings it up to date without a resync; the offline one
    # just catches up.
    assert strategy.downlink.resyncs == {"new": 6, "behind": 0, "lost": 2}
    for nid in grid.node_ids:
        replica, version = load_replica(grid.contexts[nid].state)
        assert strategy.downlink.nodes[nid] == version == strategy.downlink.version
        assert digest(replica) == strategy.downlink._digests[version]


def test_a_round_where_every_client_fails_keeps_the_model_and_the_run_goes_on():
    grid = FakeGrid(honest_app(), 4)
    for nid in grid.node_ids:
        grid.fail[nid] = in_rounds(2)  # every reply an error
        grid.timeout[nid] = in_rounds(3)  # no reply at all
    strategy = strategy_for(4)
    models: dict = {}
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=4, evaluate_fn=snapshots(models))
    assert same(models[2], models[1]) and same(models[3], models[2])
    assert not same(models[4], models[3])  # training resumed
    metrics = result.train_metrics_clientapp
    assert metrics[2]["qfl.failures"] == 4 and metrics[3]["qfl.missing"] == 4
    assert strategy.downlink.version == 2  # the initial model and round 1's: nothing new to send since


@pytest.mark.parametrize("same_node_id", [True, False])
def test_supernode_restart_loses_replica_and_error_memory_then_resyncs(same_node_id):
    grid = FakeGrid(honest_app(), 3)
    strategy = strategy_for(3)
    victim = [grid.node_ids[1]]

    def restart_after_round_2(server_round, arrays):
        if server_round != 2:
            return None
        old = victim[0]
        assert "qfl.memory" in grid.contexts[old].state and "qfl.replica" in grid.contexts[old].state
        if same_node_id:  # the SuperNode restarts with its identity: state lost
            grid.contexts[old].state = RecordDict()
        else:  # it comes back under a new node id
            grid.node_ids[1] = victim[0] = 2000
            grid.contexts[2000] = grid.contexts.pop(old)
            grid.contexts[2000].state = RecordDict()
        return None

    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=5, evaluate_fn=restart_after_round_2)
    failed = [result.train_metrics_clientapp[r]["qfl.failures"] for r in range(1, 6)]
    if same_node_id:
        # Its first message after the restart is a delta it has no replica for: an
        # error reply ("no replica held"), then a resync, then it trains again.
        assert failed == [0, 0, 1, 0, 0]
        assert strategy.downlink.resyncs == {"new": 3, "behind": 0, "lost": 1}
        assert strategy.strategy.aggregated[4] == sorted(grid.node_ids)
    else:  # a node the server never saw: a resync straight away
        assert failed == [0, 0, 0, 0, 0]
        assert strategy.downlink.resyncs == {"new": 4, "behind": 0, "lost": 0}
    replica, version = load_replica(grid.contexts[victim[0]].state)
    assert version == strategy.downlink.version and digest(replica) == strategy.downlink._digests[version]
    memory = to_tensors(grid.contexts[victim[0]].state["qfl.memory"])
    assert set(memory) == {"0.weight", "3.weight"}  # rebuilt from scratch after the restart


# -------------------------------------------------------------------- reproducibility
def run_recorded(seed: int, sampling: int = 0):
    random.seed(sampling)  # FedAvg samples nodes with the random module
    grid = FakeGrid(honest_app(), 4)
    inner = FedAvg(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=4)
    strategy = Compressed(
        inner,
        uplink=UPLINK,
        downlink="delta | topk(0.2) | qsgd(64)",
        min_elements=MIN_ELEMENTS,
        downlink_initial="grid(8)",
        history=2,
        seed=seed,
    )
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=4)

    def blobs(messages):
        return [
            (
                m.metadata.message_type,
                m.metadata.dst_node_id or m.metadata.src_node_id,
                {k: b for r in m.content.array_records.values() for k, b in blobs_of(r).items()},
            )
            for m in messages
            if m.has_content()
        ]

    return blobs(grid.sent), blobs(grid.received), to_tensors(result.arrays)


def test_same_seed_same_bytes_and_model_other_seed_other_bytes():
    sent, received, model = run_recorded(seed=11)
    sent2, received2, model2 = run_recorded(seed=11)
    assert len(sent) == len(received) == 16  # 4 rounds of 2 train and 2 evaluate messages
    assert sent == sent2 and received == received2
    assert same(model, model2)
    sent3, received3, model3 = run_recorded(seed=12)
    assert [s[:2] for s in sent3] == [s[:2] for s in sent]  # same sampling, same messages...
    uplink = [(r, r3) for r, r3 in zip(received, received3) if r[0] == "train"]
    assert all(r[2]["0.weight"] != r3[2]["0.weight"] for r, r3 in uplink)  # ...other random bits
    assert sent3[-1][2] != sent[-1][2]
    assert not same(model, model3)


# ------------------------------------------------------------------- bounded state
def test_server_records_stay_bounded_under_node_churn():
    """Every round three never-seen-before nodes take part (SuperNodes that come and go,
    or restart under new ids): the server keeps records only for nodes seen within the
    last ``history`` versions, and its steps and digests stay bounded too."""
    from qfl.replica import ServerDownlink, client_model
    from qfl.wire import decode_all

    history = 4
    down = ServerDownlink("delta", qfl.Policy.build("qsgd(64)", min_elements=10), history=history)
    g = torch.Generator().manual_seed(0)
    model = {"w": torch.randn(30, 20, generator=g), "n": torch.tensor(3)}
    sizes = []
    for r in range(60):
        model = {"w": model["w"] + 0.01 * torch.randn(30, 20, generator=g), "n": model["n"] + 1}
        down.update(model)
        for node in (3 * r, 3 * r + 1, 3 * r + 2):
            offer = down.offer(node)
            _, replica = client_model({k: decode_all(b) for k, b in offer.blobs.items()}, offer.header, None)
            assert down.acknowledge(node, offer.header.version, digest(replica))
        if r % 7 == 0:
            down.forget(3 * r)  # and some of them fail
        sizes.append(down.state_size())
    assert max(s["nodes"] for s in sizes) <= 3 * (history + 1)
    assert max(s["steps"] for s in sizes) <= history and max(s["digests"] for s in sizes) <= history + 1
    assert len({s["step_bytes"] for s in sizes[10:]}) > 1  # real steps, bounded in number
    assert down.resyncs["new"] == 180 and down.resyncs["lost"] == 0


def test_replies_report_the_client_state_and_the_server_keeps_the_largest():
    grid = FakeGrid(honest_app(), 3)
    strategy = strategy_for(3)
    result = strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    from qfl.clients.records import state_bytes

    held = max(state_bytes(ctx.state) for ctx in grid.contexts.values())
    replica_bytes = sum(
        t.numel() * t.element_size() for t in load_replica(grid.contexts[grid.node_ids[0]].state)[0].values()
    )
    memory_bytes = (64 * 20 + 4 * 64) * 4  # float32 residuals of the two compressed tensors
    arrays = len(load_replica(grid.contexts[grid.node_ids[0]].state)[0]) + 2
    assert replica_bytes + memory_bytes <= held <= replica_bytes + memory_bytes + 128 * arrays  # + .npy headers
    assert result.train_metrics_clientapp[2]["qfl.client-state-bytes"] == held
    assert strategy.traffic.total().client_state_bytes == held  # a maximum, not a sum
