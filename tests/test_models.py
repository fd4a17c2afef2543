"""Tests for qfl.simulations.models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qfl.simulations.models import MODELS, build_model, count_parameters


def test_cnn_parameter_count_in_range():
    n = count_parameters(build_model("cnn", seed=0))
    print(f"cnn trainable parameters: {n:,}")
    assert 100_000 <= n <= 250_000


def test_tiny_models_are_tiny():
    for name in ("mlp", "logreg"):
        n = count_parameters(build_model(name, seed=0))
        print(f"{name} trainable parameters: {n:,}")
        assert n < 30_000


def test_cnn_has_int64_batchnorm_buffer():
    sd = build_model("cnn", seed=0).state_dict()
    int_keys = [k for k, v in sd.items() if v.dtype == torch.int64]
    assert int_keys == ["bn1.num_batches_tracked"]
    assert "bn1.running_mean" in sd and "bn1.running_var" in sd


IMAGE_MODELS = sorted(set(MODELS) - {"char-lstm"})  # char-lstm: tests/test_shakespeare.py


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_forward_shape(name):
    model = build_model(name, seed=0)
    out = model(torch.zeros(5, 1, 28, 28))
    assert out.shape == (5, 10) and out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(MODELS))
def test_seeded_init_is_deterministic_and_isolated(name):
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    a = build_model(name, seed=7).state_dict()
    after = torch.rand(3)
    assert torch.equal(before, after), "build_model disturbed the global RNG"
    b = build_model(name, seed=7).state_dict()
    c = build_model(name, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn, logreg, mlp"):
        build_model("resnet", seed=0)


def test_name_is_case_insensitive():
    assert type(build_model("CNN", seed=0)) is type(build_model("cnn", seed=0))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_training_steps_reduce_loss(name):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    model = build_model(name, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    assert final < 0.5 * initial, (initial, final)
    if name == "cnn":
        # 15 steps + the 2 measuring forwards (train mode updates BN stats too).
        assert model.state_dict()["bn1.num_batches_tracked"].item() == 17
