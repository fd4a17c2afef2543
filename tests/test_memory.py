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
