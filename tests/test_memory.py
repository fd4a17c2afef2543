"""Error memory: the invariant sent + new_memory == memory + delta, round after round."""

from __future__ import annotations

import pytest
import torch

import qfl
from qfl.memory import compensate, compress_with_memory, update


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.05)",
        "signtopk(0.1)",
        "topk(0.1) | qsgd(2, damped=true)",
        "qsgd(2)",
        "randk(0.1)",
        "grid(3)",
        "identity",
        "bf16",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_invariant_over_rounds(spec, dtype):
    op = qfl.parse(spec)
    torch.manual_seed(0)
    memory = None
    total_delta = torch.zeros(500, dtype=torch.float64)
    total_sent = torch.zeros(500, dtype=torch.float64)
    for r in range(20):
        delta = torch.randn(500).to(dtype)
        old = torch.zeros(500) if memory is None else memory.clone()
        payload, sent, memory = compress_with_memory(op, delta, memory, torch.Generator().manual_seed(r))
        assert memory.dtype == torch.float32
        lhs = sent.double() + memory.double()
        rhs = old.double() + delta.double()
        # One float32 rounding of (memory + delta) and of the subtraction.
        assert torch.allclose(lhs, rhs, rtol=0, atol=1e-6 * (1 + float(rhs.abs().max())))
        assert torch.equal(sent, payload.decompress())
        total_delta += delta.double()
        total_sent += sent.double()
    # Telescoping: everything not sent yet is in memory (up to one float32 rounding per round).
    scale = 1 + float(total_delta.abs().max()) + float(memory.abs().max())
    assert torch.allclose(total_sent + memory.double(), total_delta, rtol=0, atol=20 * 1e-6 * scale)


def test_memory_shrinks_the_bias_of_top_k():
    # With memory, the average of what was sent tracks the average update; without, it does not.
    op = qfl.parse("topk(k=1)")
    delta = torch.tensor([1.0, 0.9, 0.8, 0.7])
    memory, sent_sum = None, torch.zeros(4)
    for _r in range(400):
        _, sent, memory = compress_with_memory(op, delta, memory)
        sent_sum += sent
    assert torch.allclose(sent_sum / 400, delta, atol=0.01)
    # Bounded: ||m|| <= sqrt(1 - d) / (1 - sqrt(1 - d)) max ||delta|| for a d-contraction (d = k/n).
    q = (1 - 1 / 4) ** 0.5
    assert float(memory.norm()) <= q / (1 - q) * float(delta.norm())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="does not match"):
        compensate(torch.zeros(3), torch.zeros(4))


def test_float64_memory_stays_float64():
    corrected = compensate(torch.zeros(2, dtype=torch.float64), None)
    assert update(corrected, torch.ones(2)).dtype == torch.float64


def _same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    return (
        x.dtype == y.dtype
        and x.shape == y.shape
        and torch.equal(x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((), torch.float32),
        ((7,), torch.float32),
        ((300, 200), torch.float32),
        ((70_000,), torch.float64),
        ((5, 3), torch.bfloat16),
    ],
)
def test_memory_arithmetic_is_torchs_whichever_way_it_runs(monkeypatch, busy, shape, dtype):
    # compensate/update/model_delta run in numpy on saturated cores or below PyTorch's
    # grain, else on PyTorch's threads: the same IEEE operation, so the same bits (a
    # transposed view included); bfloat16, which numpy lacks, stays in torch.
    from qfl.codec import model_delta
    from qfl.compress import base, runtime
    from qfl.memory import memory_dtype

    monkeypatch.setattr(runtime, "saturated", lambda: busy)
    g = torch.Generator().manual_seed(len(shape))
    a, b = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    if a.dim() == 2:
        a, b = a.t(), b.t()
    assert base._in_numpy(a, b) == (dtype != torch.bfloat16 and (busy or a.numel() < base.TORCH_GRAIN))
    assert _same_bits(base.add(a, b), a + b) and _same_bits(base.subtract(a, b), a - b)
    into = a.clone()
    assert base.add_(into, b) is into and _same_bits(into, a + b)
    into = a.clone()
    assert base.subtract_(into, b) is into and _same_bits(into, a - b)
    w = memory_dtype(dtype)
    assert _same_bits(compensate(a, b.to(w)), a.to(w) + b.to(w))
    assert _same_bits(compensate(a.to(w).clone(), b.to(w), owned=True), a.to(w) + b.to(w))
    assert _same_bits(update(a.to(w), b), a.to(w) - b.to(w))
    assert _same_bits(model_delta(a, b), a.to(w) - b.to(w))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.05)",
        "randk(0.1)",
        "bernoulli(0.2) | grid(4)",
        "topk(0.1) | qsgd(7, norm=max, bucket=128)",
        "signtopk(0.1)",
        "qsgd(4)",
        "grid(8)",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("owned", [False, True])
def test_memory_without_the_rebuild_is_the_same_bits(spec, dtype, owned):
    # keep_sent=False updates a sparse payload's memory at its kept positions only (in
    # place when the update is handed over): the same bits as corrected - decompress(),
    # round after round, and an update not handed over is never written.
    op = qfl.parse(spec)
    g = torch.Generator().manual_seed(5)
    dense_memory = sparse_memory = None
    for r in range(4):
        delta = (torch.randn(37, 29, generator=g, dtype=torch.float64) * 10.0**-r).to(dtype)
        delta[0, :9] = -0.0  # x - (+0) is x, negative zeros included: their bits must stay
        before = delta.clone()
        p1, sent, dense_memory = compress_with_memory(op, delta, dense_memory, torch.Generator().manual_seed(r))
        p2, none, sparse_memory = compress_with_memory(
            op, delta.clone() if owned else delta, sparse_memory, torch.Generator().manual_seed(r), False, owned
        )
        assert none is None and torch.equal(sent, p2.decompress())
        assert sparse_memory.dtype == dense_memory.dtype and sparse_memory.shape == delta.shape
        assert torch.equal(_bits(sparse_memory), _bits(dense_memory)), f"round {r}"
        assert torch.equal(_bits(delta), _bits(before))


def test_a_body_holding_the_input_is_not_written_over(monkeypatch):
    # An operator whose payload keeps a view of its input (raw values of every position):
    # the new memory is written into a copy, so the payload still says what was meant.
    op = qfl.parse("topk(1.0)")
    real = type(op).select

    def select_views(self, x, generator):
        indices, seed, _ = real(self, x, generator)  # every position, in order
        return indices, seed, x.reshape(-1)

    monkeypatch.setattr(type(op), "select", select_views)
    delta = torch.randn(50, generator=torch.Generator().manual_seed(1))
    payload, _, new = compress_with_memory(op, delta, None, None, keep_sent=False, owned=True)
    assert payload.body.values.values.data_ptr() == delta.data_ptr()
    assert torch.equal(payload.decompress(), delta) and new.data_ptr() != delta.data_ptr()
    assert torch.equal(new, torch.zeros(50))


def test_a_dense_body_holding_the_input_is_not_written_over():
    # identity's payload is its input itself: the residual goes into a fresh tensor.
    delta = torch.randn(50, generator=torch.Generator().manual_seed(2))
    kept = delta.clone()
    payload, _, new = compress_with_memory(qfl.parse("identity"), delta, None, None, keep_sent=False, owned=True)
    assert torch.equal(payload.decompress(), kept) and torch.equal(delta, kept)
    assert torch.equal(new, torch.zeros(50)) and new.data_ptr() != delta.data_ptr()
