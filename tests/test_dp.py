"""qfl with Flower's differential-privacy wrappers and mods: every update the server
aggregates stays within the clipping norm, in every order that runs; the orders that
cannot work stop with an error naming the one that does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_data, tiny_model
from fakes import FakeGrid
from flwr.app import ArrayRecord
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)

from qfl.clients import LocalTraining, compression_mod, make_client_app
from qfl.clients.records import to_tensors
from qfl.codec import norm
from qfl.strategies import CompositionError, Compressed, MisconfigurationError

NODES = 4
CLIP = 0.5
PLAN = LocalTraining(steps=5, lr=0.5)  # updates far longer than CLIP: the clipping binds
UPLINK = "topk(0.1) | qsgd(4)"  # lossy and biased, with error memory: what could push a norm over


#: The model's parameters; its counters (BatchNorm's num_batches_tracked) are values, not
#: updates, and FedAvg turns them into floats after the first round.
PARAMETERS = [k for k, v in tiny_model().state_dict().items() if v.is_floating_point()]


def client(*mods):
    return make_client_app(tiny_model, tiny_data, default=PLAN, mods=mods)


def initial() -> ArrayRecord:
    return ArrayRecord(tiny_model().state_dict())


class Recording(FedAvg):
    """FedAvg that measures the l2 norm of every update it aggregates, and the clipping
    norm its round was configured with."""

    def __init__(self, **kwargs) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=NODES, **kwargs)
        self.norms: dict[int, list[float]] = {}
        self.clip: dict[int, float] = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.base = to_tensors(arrays)
        if "clipping_norm" in config:
            self.clip[server_round] = float(config["clipping_norm"])
        elif getattr(self, "dp", None) is not None:  # server-side clipping: the wrapper's norm this round
            self.clip[server_round] = float(self.dp.clipping_norm)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        for msg in replies:
            if not msg.has_error():
                model = to_tensors(next(iter(msg.content.array_records.values())))
                self.norms.setdefault(server_round, []).append(
                    norm({k: model[k].double() - self.base[k].double() for k in PARAMETERS})
                )
        return super().aggregate_train(server_round, replies)


def check_bound(recorder: Recording, rounds: int, clip: dict[int, float] | float) -> float:
    assert sorted(recorder.norms) == list(range(1, rounds + 1))
    worst = 0.0
    for r, norms in recorder.norms.items():
        bound = clip[r] if isinstance(clip, dict) else clip
        assert len(norms) == NODES, r
        assert max(norms) <= bound * (1 + 1e-6), (r, norms, bound)
        worst = max(worst, max(norms) / bound)
    return worst


def run(strategy, app, rounds=4):
    grid = FakeGrid(app, NODES)
    return strategy.start(grid=grid, initial_arrays=initial(), num_rounds=rounds), grid


# ------------------------------------------------------------ client-side clipping
@pytest.mark.parametrize("order", ["dp-outside", "dp-inside"])
@pytest.mark.parametrize("error_feedback", [True, False])
def test_client_side_fixed_clipping_bounds_what_the_server_aggregates(order, error_feedback):
    recorder = Recording()
    if order == "dp-outside":
        strategy = DifferentialPrivacyClientSideFixedClipping(
            Compressed(recorder, uplink=UPLINK, error_feedback=error_feedback), 0.0, CLIP, NODES
        )
    else:
        strategy = Compressed(
            DifferentialPrivacyClientSideFixedClipping(recorder, 0.0, CLIP, NODES),
            uplink=UPLINK,
            error_feedback=error_feedback,
        )
    run(strategy, client(compression_mod, fixedclipping_mod))
    worst = check_bound(recorder, 4, CLIP)
    assert worst > 0.3  # the bound was binding, not trivially met
    traffic = (strategy if order == "dp-inside" else strategy.strategy).traffic.total()
    assert traffic.uplink < traffic.uplink_full / 3 and traffic.dropped == 0


def test_client_side_adaptive_clipping_bounds_every_round_by_its_own_norm():
    recorder = Recording()
    strategy = DifferentialPrivacyClientSideAdaptiveClipping(
        Compressed(recorder, uplink=UPLINK), 0.0, NODES, initial_clipping_norm=CLIP
    )
    run(strategy, client(compression_mod, adaptiveclipping_mod))
    assert len(set(recorder.clip.values())) > 1  # the norm adapted
    check_bound(recorder, 4, recorder.clip)


def test_compression_mod_keeps_the_bound_even_without_a_clipping_mod():
    recorder = Recording()
    strategy = Compressed(DifferentialPrivacyClientSideFixedClipping(recorder, 0.0, CLIP, NODES), uplink=UPLINK)
    run(strategy, client(compression_mod))
    check_bound(recorder, 4, CLIP)


@pytest.mark.parametrize("order", ["dp-outside", "dp-inside"])
@pytest.mark.parametrize("mod", [fixedclipping_mod, adaptiveclipping_mod])
def test_a_clipping_mod_before_compression_mod_stops_the_run_naming_the_order(order, mod):
    if order == "dp-outside":
        strategy = DifferentialPrivacyClientSideFixedClipping(Compressed(Recording(), uplink=UPLINK), 0.0, CLIP, NODES)
    else:
        strategy = Compressed(DifferentialPrivacyClientSideFixedClipping(Recording(), 0.0, CLIP, NODES), uplink=UPLINK)
    grid = FakeGrid(client(mod, compression_mod), NODES)
    with pytest.raises(MisconfigurationError, match="compression_mod.* first"):
        strategy.start(grid=grid, initial_arrays=initial(), num_rounds=5)
    assert len(grid.sent) <= 2 * NODES  # stopped at once, not five rounds later
    reasons = [m.error.reason for m in grid.received]
    assert all(f"compression_mod runs inside {mod.__name__}" in r for r in reasons), reasons[0]


# ------------------------------------------------------------ server-side clipping
@pytest.mark.parametrize(
    "dp", [DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping]
)
def test_server_side_clipping_inside_compressed_clips_the_decoded_updates(dp):
    recorder = Recording()
    if dp is DifferentialPrivacyServerSideFixedClipping:
        inner = dp(recorder, 0.0, CLIP, NODES)
    else:
        inner = dp(recorder, 0.0, NODES, initial_clipping_norm=CLIP)
    recorder.dp = inner
    strategy = Compressed(inner, uplink=UPLINK)
    result, _ = run(strategy, client(compression_mod))
    assert check_bound(recorder, 4, recorder.clip) > 0.5
    final = to_tensors(result.arrays)
    assert all(bool(torch.isfinite(t).all()) for t in final.values() if t.is_floating_point())


@pytest.mark.parametrize(
    "dp", [DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping]
)
def test_server_side_clipping_around_compressed_is_refused_before_round_one(dp):
    args = (0.0, CLIP, NODES) if dp is DifferentialPrivacyServerSideFixedClipping else (0.0, NODES)
    strategy = dp(Compressed(Recording(), uplink=UPLINK), *args)
    grid = FakeGrid(client(compression_mod), NODES)
    with pytest.raises(CompositionError, match=f"Compressed\\({dp.__name__}\\(FedAvg"):
        strategy.start(grid=grid, initial_arrays=initial(), num_rounds=2)
    assert grid.sent == []
