"""Downlink versions: chains of steps, bounded history, resyncs, digests."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import qfl
from qfl.codec import digest
from qfl.replica import DownlinkError, Offer, ServerDownlink, client_model
from qfl.wire import decode_all


def model(step: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(50, 40, generator=g) + step,
        "b": torch.zeros(3) + step,
        "n": torch.tensor(int(round(step * 10))),
    }


def decoded(offer: Offer) -> dict:
    return {k: decode_all(b) for k, b in offer.blobs.items()}


def apply(offer: Offer, state: dict, arrays=None, header=None) -> dict[str, torch.Tensor]:
    """What the mod does with a message: rebuild, then keep the new replica (``state["held"]``)."""
    header = header or offer.header
    out, replica = client_model(decoded(offer) if arrays is None else arrays, header, state.get("held"))
    if replica is not None:
        state["held"] = (replica, header.version)
    return out


def receive(down: ServerDownlink, node: int, state: dict) -> dict[str, torch.Tensor]:
    out = apply(down.offer(node), state)
    replica, version = state["held"]
    assert down.acknowledge(node, version, digest(replica))
    return out


def test_chain_brings_a_lagging_client_to_the_exact_replica():
    down = ServerDownlink("delta", qfl.Policy.build("topk(0.2) | qsgd(16)", min_elements=10), history=5)
    states = {1: {}, 2: {}}
    down.update(model(0.0))
    for node, state in states.items():
        receive(down, node, state)
    for step in range(1, 4):  # node 2 misses three versions
        down.update(model(step * 0.1))
        receive(down, 1, states[1])
    offer = down.offer(2)
    assert offer.kind == "delta" and offer.header.base == 1
    # The chain is exactly the three encoded steps, nothing re-encoded per client.
    assert offer.nbytes == sum(len(b) for v in (2, 3, 4) for b in down._steps[v].values())
    assert all(len(ps) == 3 for ps in decoded(offer).values())
    got = receive(down, 2, states[2])
    assert digest(got) == digest(down.replica)
    assert got["n"].dtype == torch.int64 and int(got["n"]) == 3  # values, not deltas, for counters
    # The replica tracks the model up to the compression error, which error feedback keeps bounded.
    assert float((down.replica["w"] - model(0.3)["w"]).norm()) < float(model(0.3)["w"].norm())


def test_client_ahead_of_what_the_server_knows_skips_applied_steps():
    down = ServerDownlink("delta", qfl.Policy.build("qsgd(64)", min_elements=10))
    state = {}
    down.update(model(0.0))
    receive(down, 7, state)
    down.update(model(0.5))
    offer = down.offer(7)
    apply(offer, state)  # applied, but the reply got lost
    down.update(model(1.0))
    offer = down.offer(7)  # still based on version 1
    assert offer.header.base == 1
    got = apply(offer, state)
    assert digest(got) == digest(down.replica)


def test_history_bound_and_resync():
    down = ServerDownlink("delta", qfl.Policy.build("qsgd(64)", min_elements=10), history=2)
    state = {}
    down.update(model(0.0))
    receive(down, 1, state)
    for step in range(1, 6):
        down.update(model(step))
    size = down.state_size()
    assert size["steps"] == 2 and size["digests"] == 3
    assert down.offer(1).kind == "full"  # too far behind: the replica itself, losslessly
    got = receive(down, 1, state)
    assert all(torch.equal(got[k], down.replica[k]) for k in got)


def test_missing_replica_and_digest_mismatch_are_refused_and_leave_the_state():
    down = ServerDownlink("delta", qfl.Policy.build("qsgd(64)", min_elements=10))
    state = {}
    down.update(model(0.0))
    receive(down, 1, state)
    down.update(model(1.0))
    offer = down.offer(1)
    with pytest.raises(DownlinkError, match="no replica held"):
        apply(offer, {})
    held = state["held"]
    with pytest.raises(DownlinkError, match="digest"):
        apply(offer, state, header=replace(offer.header, digest=offer.header.digest ^ 1))
    assert state["held"] is held  # untouched: the server resyncs the node after its error reply
    assert not down.acknowledge(1, 2, 12345)  # a report the server cannot vouch for
    assert down.offer(1).kind == "full"


def test_model_mode_is_stateless_and_shared():
    down = ServerDownlink("model", qfl.Policy.build("grid(8)", min_elements=10))
    down.update(model(0.0))
    a, b = down.offer(1), down.offer(2)
    assert a is b
    got, kept = client_model(decoded(a), a.header, None)
    assert kept is None
    assert torch.equal(got["b"], model(0.0)["b"])  # small tensors pass through
    scale = model(0.0)["w"].abs().max() / 127
    assert float((got["w"] - model(0.0)["w"]).abs().max()) <= float(scale) * 1.0001


def test_same_model_twice_is_not_a_new_version():
    down = ServerDownlink("delta", qfl.Policy.build("qsgd(64)"))
    assert down.update(model(0.0)) and not down.update(model(0.0))
    assert down.version == 1


def test_anchor_mode_sends_differences_to_the_epoch_anchor():
    down = ServerDownlink("anchor", qfl.Policy.build("qsgd(64)", min_elements=10))
    s1, s2 = {}, {}
    down.update(model(0.0))
    assert down.offer(1).kind == "full"
    receive(down, 1, s1)
    down.update(model(0.5))
    offer = down.offer(1)
    assert offer.kind == "delta" and offer.header.base == down.version
    got = receive(down, 1, s1)
    assert torch.equal(got["n"], model(0.5)["n"])
    assert float((got["w"] - model(0.5)["w"]).abs().max()) < float((model(0.5)["w"] - model(0.0)["w"]).abs().max())
    # A client without the anchor gets it together with the difference, in one message.
    late = down.offer(2)
    assert late.kind == "full" and all(len(ps) == 2 for ps in decoded(late).values())
    assert digest(receive(down, 2, s2)) == digest(got)
    # The next epoch re-anchors everyone; the old anchor is refused.
    version = down.version
    down.new_epoch()
    down.update(model(0.5))
    assert down.version == version + 1 and down.offer(1).kind == "full"
    stale = down.offer(1)
    wrong = replace(stale.header, base=version)
    with pytest.raises(DownlinkError):
        client_model({k: ps[1:] for k, ps in decoded(stale).items()}, wrong, None)


def test_compact_initial_replica_makes_resyncs_cheaper_and_exact():
    pol = qfl.Policy.build("topk(0.05) | qsgd(16)", min_elements=10)
    lossless = ServerDownlink("delta", pol)
    compact = ServerDownlink("delta", pol, initial=qfl.Policy.build("grid(8)", min_elements=10))
    early = {}
    for down in (lossless, compact):
        down.update(model(0.0))
    receive(compact, 1, early)
    sizes = {}
    for down in (lossless, compact):
        for step in range(1, 4):
            down.update(model(step * 0.01))
        sizes[id(down)] = down.offer(2).nbytes
    assert sizes[id(compact)] < sizes[id(lossless)] / 2  # 8-bit checkpoint + 3 sparse steps
    late = {}
    got = receive(compact, 2, late)  # the resync from the checkpoint is exact
    assert digest(got) == digest(compact.replica)
    assert compact.offer(1).kind == "delta"  # the early client just follows the chain
    assert digest(receive(compact, 1, early)) == digest(compact.replica)
    # The first replica is 8-bit, yet the replica tracks the model: error feedback.
    assert float((compact.replica["w"] - model(0.03)["w"]).abs().max()) < 0.1


@pytest.mark.parametrize(
    "spec", ["topk(0.1)", "delta | topk(0.15) | qsgd(15, norm=max, bucket=128)", "randk(0.2)", "grid(8)", "identity"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_step_applied_from_its_payload_is_the_dense_step(spec, dtype):
    # What a client adds to its replica (and the server to its copy of it): the kept
    # positions added to base + 0, negative zeros turned +0 as the dense rebuild's zeros
    # turn them; digests on both sides depend on these bits.
    from qfl.codec import apply_delta, apply_payload, model_delta

    g = torch.Generator().manual_seed(11)
    base = torch.randn(23, 41, generator=g, dtype=torch.float64).to(dtype)
    base[3, :7] = -0.0
    target = base + torch.randn(23, 41, generator=g).to(dtype) * 0.01
    op = qfl.parse(spec.removeprefix("delta | "))
    payload = qfl.wire.decode(qfl.wire.encode(op.compress(model_delta(target, base), torch.Generator().manual_seed(2))))
    before = base.clone()
    got, want = apply_payload(base, payload), apply_delta(base, payload.decompress())
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.equal(_bits(got), _bits(want)) and torch.equal(_bits(base), _bits(before))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)
