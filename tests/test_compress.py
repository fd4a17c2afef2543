"""Conformance of the operators with the properties the papers state.

Statistical tests draw N independent compressions (seeded generators) and compare
Monte Carlo means with the exact expectation within a few standard errors: a biased
rounding, a wrong scale or a wrong probability moves the mean by far more.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import qfl
import qfl.wire
from qfl.compress import (
    QSGD,
    Bernoulli,
    Chain,
    Grid,
    Identity,
    Levels,
    Payload,
    RandK,
    Sign,
    Sparse,
    TopK,
    signtopk,
)

N = 3000  # Monte Carlo samples


def samples(op, x, n=N):
    """(n, d) matrix of independent decompressed compressions of x."""
    return torch.stack(
        [op.decompress(op.compress(x, torch.Generator().manual_seed(i))).reshape(-1).double() for i in range(n)]
    )


def assert_unbiased(op, x, n=N, z=5.0):
    s = samples(op, x, n)
    mean, se = s.mean(0), s.std(0) / math.sqrt(n)
    target = x.reshape(-1).double()
    # Coordinates with zero spread must be exact; others within z standard errors.
    err = (mean - target).abs()
    assert torch.all(err <= z * se + 1e-6 * (1 + target.abs())), float((err / (se + 1e-12)).max())
    return s


# ----------------------------------------------------------------------------- QSGD
@pytest.mark.parametrize("op", [QSGD(4), QSGD(4, bucket=16), QSGD(4, norm="max"), QSGD(1), QSGD(16, bucket=7)])
def test_qsgd_unbiased(op):
    torch.manual_seed(0)
    assert_unbiased(op, torch.randn(64))


def exact_qsgd_variance(x, s, bucket, use_max):
    """sum_i (norm/s)^2 p_i (1 - p_i), computed from the definition (float64)."""
    x = x.double()
    total = 0.0
    for lo in range(0, x.numel(), bucket):
        v = x[lo : lo + bucket]
        norm = v.abs().max() if use_max else v.norm()
        norm = float(torch.tensor(float(norm), dtype=torch.float32))  # the operator sends float32 scales
        norm = max(norm, float(v.abs().max() if use_max else v.norm()))
        y = v.abs() / norm * s
        p = y - y.floor()
        total += float(((norm / s) ** 2 * p * (1 - p)).sum())
    return total


@pytest.mark.parametrize("s,bucket,norm", [(1, 64, "l2"), (4, 16, "l2"), (3, 64, "max"), (8, 8, "l2")])
def test_qsgd_variance_exact_and_within_lemma_bound(s, bucket, norm):
    torch.manual_seed(1)
    x = torch.randn(64)
    op = QSGD(s, norm=norm, bucket=bucket)
    sq = ((samples(op, x) - x.double()) ** 2).sum(1)
    est, se = float(sq.mean()), float(sq.std()) / math.sqrt(N)
    exact = exact_qsgd_variance(x, s, bucket, norm == "max")
    assert abs(est - exact) <= 5 * se + 1e-9
    # Lemma 3.1 bound per bucket, summed: sum_b beta_b ||v_b||^2.
    bound = sum(op.beta(bucket) * float(x[lo : lo + bucket].double().norm() ** 2) for lo in range(0, 64, bucket))
    assert est <= bound + 5 * se


def test_qsgd_variance_bound_is_nearly_tight_for_flat_vectors():
    # For v = (1,...,1) and s = 1 the variance is ||v|| ||v||_1 - ||v||^2 = (sqrt(d) - 1) ||v||^2,
    # close to the lemma's sqrt(d)/s ||v||^2: a loose implementation would be caught.
    d = 64
    x = torch.ones(d)
    op = QSGD(1)
    sq = ((samples(op, x, 1000) - x.double()) ** 2).sum(1)
    assert abs(float(sq.mean()) - (math.sqrt(d) - 1) * d) <= 5 * float(sq.std()) / math.sqrt(1000)
    assert float(sq.mean()) <= op.properties(d).variance * d


def test_qsgd_support():
    torch.manual_seed(2)
    x = torch.randn(1000)
    op = QSGD(8, bucket=100)
    p = op.compress(x)
    assert isinstance(p.body, Levels) and p.body.scales.numel() == 10
    lv = p.body.levels.long()
    assert int(lv.abs().max()) <= 8
    assert torch.all((lv == 0) | (lv.sign() == x.sign().long()))
    y = op.decompress(p)
    scale = p.body.scales.repeat_interleave(100) / 8
    ratio = (y / scale).double()
    assert torch.allclose(ratio, ratio.round(), atol=1e-4)
    # Each magnitude rounds to one of its two neighbouring levels.
    assert torch.all((y.abs() - x.abs()).abs() <= scale * (1 + 1e-5))


def test_qsgd_damped_is_a_contraction_with_basu_factor():
    torch.manual_seed(3)
    x = torch.randn(256)
    op = QSGD(2, bucket=64, damped=True)
    beta = op.beta(256)
    assert beta == pytest.approx(min(64 / 4, 8 / 2))
    sq = ((samples(op, x, 1000) - x.double()) ** 2).sum(1)
    assert float(sq.mean()) <= (1 - 1 / (1 + beta)) * float(x.double().norm() ** 2)


# ----------------------------------------------------------------------- sparsifiers
def test_topk_keeps_the_k_largest_and_contracts():
    torch.manual_seed(4)
    x = torch.randn(10_000)
    for k in (1, 10, 137, 5000, 10_000):
        op = TopK(k=k)
        p = op.compress(x)
        kept = set(p.body.indices.tolist())
        assert kept == set(torch.topk(x.abs(), k).indices.tolist())
        y = op.decompress(p)
        assert float((x - y).norm() ** 2) <= (1 - k / x.numel()) * float(x.norm() ** 2) + 1e-3
        assert torch.equal(y[p.body.indices], x[p.body.indices])


def test_topk_ties_take_lowest_indices_and_ratio_rounds_up():
    x = torch.tensor([1.0, -3.0, 3.0, 2.0, 3.0, 0.0, -3.0])
    assert TopK(k=2).compress(x).body.indices.tolist() == [1, 2]
    assert TopK(k=4).compress(x).body.indices.tolist() == [1, 2, 4, 6]
    assert TopK(ratio=0.01).expected_count(1000) == 10
    assert TopK(ratio=0.01).expected_count(10) == 1
    assert TopK(ratio=0.5).expected_count(0) == 0


def test_topk_on_huge_and_tiny_magnitudes():
    x = torch.tensor([1e-40, -1e-38, 3e38, -2e-45, 0.0, 1.0])
    assert TopK(k=3).compress(x).body.indices.tolist() == [1, 2, 5]


def test_randk_unbiased_when_scaled_and_sends_no_indices():
    torch.manual_seed(5)
    x = torch.randn(40)
    op = RandK(k=8, unbiased=True)
    p = op.compress(x)
    assert p.body.indices is None and p.body.seed is not None
    assert_unbiased(op, x, n=4000)


def test_randk_is_uniform_and_contracts_in_expectation():
    x = torch.randn(50)
    op = RandK(k=10)
    hits = torch.zeros(50)
    sq = []
    for i in range(2000):
        p = op.compress(x, torch.Generator().manual_seed(i))
        pos = op.positions(p.body, 50)
        assert pos.unique().numel() == 10 and torch.all(pos[1:] > pos[:-1])
        hits[pos] += 1
        sq.append(float((x - op.decompress(p)).norm() ** 2))
    # Each position is kept with probability k/n = 0.2: binomial(2000, 0.2), sd ~ 17.9.
    assert torch.all((hits - 400).abs() <= 5 * 17.9)
    mean, se = sum(sq) / len(sq), torch.tensor(sq).std().item() / math.sqrt(len(sq))
    assert abs(mean - 0.8 * float(x.norm() ** 2)) <= 5 * se


def test_qsparse_composition_contraction():
    torch.manual_seed(6)
    x = torch.randn(500)
    d, k = 500, 50
    op = Chain.of([TopK(k=k), QSGD(2, damped=True)])
    beta = QSGD(2).beta(k)
    sq = ((samples(op, x, 1000) - x.double()) ** 2).sum(1)
    bound = (1 - k / (d * (1 + beta))) * float(x.double().norm() ** 2)
    assert float(sq.mean()) <= bound
    assert op.properties(d).contraction == pytest.approx(k / (d * (1 + beta)))


@pytest.mark.parametrize("sparsifier", [TopK(k=50), RandK(k=50)])
def test_fine_quantizer_after_a_projection_is_a_contraction_undamped(sparsifier):
    # max-norm QSGD with s = 7 levels on buckets of 16: beta = 16 / (4 * 49) < 1, so
    # Q(S(x)) contracts with (1 - beta) gamma_S and needs no 1/(1 + beta) damping.
    torch.manual_seed(8)
    x = torch.randn(500) * torch.rand(500) ** 4  # heavy-tailed, like an update
    q = QSGD(7, norm="max", bucket=16)
    op = Chain.of([sparsifier, q])
    beta = q.beta(50)
    props = op.properties(500)
    assert not props.unbiased and props.contraction == pytest.approx(50 / 500 * (1 - beta))
    sq = ((samples(op, x, 2000) - x.double()) ** 2).sum(1)
    se = float(sq.std()) / math.sqrt(len(sq))
    assert float(sq.mean()) <= (1 - props.contraction) * float(x.double().norm() ** 2) + 3 * se
    # A quantizer too coarse for this (beta >= 1) gives no such guarantee.
    assert Chain.of([sparsifier, QSGD(1, bucket=64)]).properties(500).contraction is None


def test_signtopk_identity():
    torch.manual_seed(7)
    x = torch.randn(1000)
    for k in (1, 10, 100, 1000):
        op = signtopk(k=k)
        y = op.decompress(op.compress(x))
        top = torch.topk(x.abs(), k).values.double()
        expected = float(x.double().norm() ** 2 - top.sum() ** 2 / k)
        assert float((x.double() - y.double()).norm() ** 2) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_sign_identity():
    x = torch.randn(333)
    y = Sign().decompress(Sign().compress(x))
    expected = float(x.double().norm() ** 2 - x.double().abs().sum() ** 2 / 333)
    assert float((x.double() - y.double()).norm() ** 2) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("op", [Bernoulli(p=0.2), Bernoulli(budget=0.1)])
def test_bernoulli_unbiased_with_budget(op):
    torch.manual_seed(8)
    x = torch.randn(60) * torch.linspace(0.01, 3, 60)
    assert_unbiased(op, x, n=4000)
    counts = torch.tensor([float(op.compress(x, torch.Generator().manual_seed(i)).body.count) for i in range(2000)])
    budget = 0.2 * 60 if op.p is not None else 0.1 * 60
    assert float(counts.mean()) <= budget + 3 * float(counts.std()) / math.sqrt(2000)
    assert float(counts.mean()) >= 0.8 * budget  # it uses the budget, not far less


def test_bernoulli_budget_larger_than_support_keeps_everything():
    x = torch.tensor([0.0, 1.0, -2.0, 0.0])
    p = Bernoulli(budget=0.9).compress(x)
    assert p.body.indices.tolist() == [1, 2]
    assert torch.equal(p.decompress(), x)


# ------------------------------------------------------------------------------ grid
@pytest.mark.parametrize("bits,bucket", [(2, None), (4, 16), (8, None)])
def test_grid_on_grid_unbiased_nothing_clipped(bits, bucket):
    torch.manual_seed(9)
    x = torch.randn(64) * 3
    op = Grid(bits, bucket=bucket)
    m = op.max_level
    p = op.compress(x)
    b = bucket or 64
    delta = (p.body.scales / m).repeat_interleave(b)[:64]
    inf = x.abs().reshape(-1, b).max(1).values.repeat_interleave(b)
    assert torch.allclose(delta * m, inf, rtol=1e-6)  # scale = ||x||_inf / (2^(b-1) - 1)
    assert int(p.body.levels.abs().max()) <= m
    assert torch.all(x.abs() <= delta * m * (1 + 1e-6))  # nothing outside the grid
    y = op.decompress(p)
    assert torch.all((y - x).abs() < delta * (1 + 1e-5))  # rounded to a neighbour
    assert_unbiased(op, x)


# ------------------------------------------------------------------ dtypes, devices, edge cases
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "spec",
    [
        "qsgd(8)",
        "grid(6, bucket=10)",
        "topk(0.1) | qsgd(4, damped=true)",
        "randk(0.2)",
        "bernoulli(budget=0.2) | grid(4)",
        "signtopk(0.1)",
        "fp16",
        "bf16",
        "identity",
        "sign",
    ],
)
def test_shape_and_dtype_preserved(spec, dtype):
    op = qfl.parse(spec)
    for shape in [(), (0,), (17,), (2, 3, 4, 5)]:
        x = torch.randn(shape).to(dtype)
        y = op.decompress(op.compress(x))
        assert y.shape == x.shape and y.dtype == x.dtype


def test_identity_is_lossless_for_every_dtype():
    for x in [
        torch.randn(5, 3).double(),
        torch.randn(9).bfloat16(),
        torch.arange(10),
        torch.tensor([True, False]),
        torch.randint(0, 255, (7,), dtype=torch.uint8),
    ]:
        assert torch.equal(Identity().decompress(Identity().compress(x)), x)


def test_non_float_tensors_pass_through_losslessly():
    x = torch.arange(-5, 5, dtype=torch.int64)
    p = QSGD(2).compress(x)
    assert isinstance(p.op, Identity)
    assert torch.equal(p.decompress(), x)
    b = torch.tensor([True, False, True])
    assert torch.equal(TopK(k=1).compress(b).decompress(), b)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "spec", ["qsgd(4)", "topk(0.5)", "randk(0.5)", "grid(8)", "fp16", "identity", "sign", "bernoulli(0.5)"]
)
def test_nan_and_inf_are_refused(spec, bad):
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(100).to(dtype)
        x[37] = bad
        with pytest.raises(ValueError, match="non-finite"):
            qfl.parse(spec).compress(x)


def test_fp16_overflow_is_refused():
    with pytest.raises(ValueError, match="fp16 cannot represent"):
        qfl.parse("fp16").compress(torch.tensor([1.0, 1e6]))


@pytest.mark.parametrize(
    "spec",
    [
        "qsgd(4)",
        "qsgd(4, bucket=3)",
        "topk(0.5)",
        "randk(0.5)",
        "grid(8)",
        "sign",
        "bernoulli(budget=0.5)",
        "topk(0.5) | qsgd(2)",
    ],
)
def test_empty_and_all_zero(spec):
    op = qfl.parse(spec)
    assert op.decompress(op.compress(torch.zeros(0))).numel() == 0
    z = torch.zeros(3, 5)
    assert torch.equal(op.decompress(op.compress(z)), z)


def test_inputs_on_other_devices_and_strided_views_are_accepted():
    x = torch.randn(8, 10)[:, ::2]  # non-contiguous
    op = QSGD(4)
    assert op.decompress(op.compress(x)).shape == (8, 5)
    if torch.cuda.is_available():  # pragma: no cover - no GPU on CI
        xc = torch.randn(100, device="cuda")
        assert op.decompress(op.compress(xc)).device == xc.device


def test_reproducible_with_a_generator_and_global_seed():
    x = torch.randn(1000)
    for spec in ["qsgd(4)", "randk(0.1)", "bernoulli(0.1) | grid(3)"]:
        op = qfl.parse(spec)
        a = op.compress(x, torch.Generator().manual_seed(5)).decompress()
        b = op.compress(x, torch.Generator().manual_seed(5)).decompress()
        assert torch.equal(a, b)
        torch.manual_seed(11)
        c = op.compress(x).decompress()
        torch.manual_seed(11)
        assert torch.equal(c, op.compress(x).decompress())


def test_rounding_does_not_depend_on_thread_count():
    import numba

    x = torch.randn(300_000)
    op = QSGD(16, bucket=512)
    ref = op.compress(x, torch.Generator().manual_seed(1)).body.levels
    old = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = op.compress(x, torch.Generator().manual_seed(1)).body.levels
    finally:
        numba.set_num_threads(old)
    assert torch.equal(ref, one)


def test_properties_declared():
    assert QSGD(4).properties(100).unbiased
    assert QSGD(4).properties(100).variance == pytest.approx(min(100 / 16, 10 / 4))
    assert QSGD(4, norm="max").properties(100).variance == pytest.approx(min(100 / 64, 10 / 4))
    assert TopK(k=10).properties(100).contraction == pytest.approx(0.1)
    assert not TopK(k=10).properties(100).unbiased
    assert RandK(k=10, unbiased=True).properties(100).variance == pytest.approx(9.0)
    assert Bernoulli(p=0.25).properties(100).variance == pytest.approx(3.0)
    assert Grid(8).properties(100).unbiased
    chain = Chain.of([RandK(k=10, unbiased=True), QSGD(4)])
    assert chain.properties(100).variance == pytest.approx(10 * (1 + QSGD(4).beta(10)) - 1)


def test_payload_of_sparse_chain_holds_quantized_values():
    x = torch.randn(1000)
    p = qfl.parse("topk(0.05) | qsgd(4, bucket=10)").compress(x)
    assert isinstance(p.body, Sparse) and p.body.count == 50
    assert isinstance(p.body.values, Levels) and p.body.values.scales.numel() == 5


# ------------------------------------------------- compiled kernels: every code path
def _topk_reference(x, k):
    """Top-k by magnitude, ties to the lower index, from a stable sort."""
    order = sorted(range(x.numel()), key=lambda i: (-abs(float(x[i])), i))[:k]
    return sorted(order)


def test_kernels_serial_and_parallel_agree(kernel_mode):
    from qfl.compress import runtime

    torch.manual_seed(12)
    x = (torch.randn(400_000) * torch.rand(400_000) ** 4).numpy()
    for op in (
        "qsgd(16)",
        "qsgd(256, bucket=512)",
        "grid(8)",
        "grid(4, bucket=100)",
        "bernoulli(budget=0.05) | grid(4)",
        "bernoulli(0.1)",
        "topk(0.01)",
        "topk(0.3)",
        "randk(0.01)",
    ):
        p = qfl.parse(op).compress(torch.from_numpy(x), torch.Generator().manual_seed(3))
        runtime.FORCE_PARALLEL = not kernel_mode
        q = qfl.parse(op).compress(torch.from_numpy(x), torch.Generator().manual_seed(3))
        runtime.FORCE_PARALLEL = kernel_mode
        assert torch.equal(p.decompress(), q.decompress()), op


def _splitmix_uniforms(seed: int, n: int) -> np.ndarray:
    """Element i's rounding uniform, written from the documented definition in plain
    numpy (uint64 arithmetic wraps): SplitMix64 of ``seed + (h + 1) * golden gamma`` for
    draw ``h = 32 (i // 64) + i % 32``, its high half for ``i % 64 < 32``, else its low
    half, times 2^-32."""
    i = np.arange(n, dtype=np.uint64)
    p = i % np.uint64(64)
    z = np.uint64(seed) + (np.uint64(32) * (i // np.uint64(64)) + p % np.uint64(32) + np.uint64(1)) * np.uint64(
        0x9E3779B97F4A7C15
    )
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    half = np.where(p < np.uint64(32), z >> np.uint64(32), z & np.uint64(0xFFFFFFFF))
    return half.astype(np.float64) * 2.0**-32


@pytest.mark.parametrize("n", [1000, 300_001])
@pytest.mark.parametrize(
    ("signed_grid", "s", "bucket", "use_max"),
    [
        (True, 127, None, True),  # grid(8): one bucket, norms in a pass of their own
        (True, 7, 100, True),  # buckets that cut the draw blocks
        (False, 255, 512, False),  # qsgd(255, bucket=512)
        (False, 16, 37, True),
        (False, 1 << 30, 8192, False),  # the largest QSGD level count, norms in their own pass
    ],
)
def test_stochastic_levels_are_the_floor_of_value_plus_its_uniform(kernel_mode, n, signed_grid, s, bucket, use_max):
    """Every element's level is exactly the documented rounding with its own uniform, a
    function of (seed, index) only: whatever the kernels' vector tricks, the bucket
    boundaries inside a block of draws, or the thread count (``kernel_mode``)."""
    from qfl.compress import _kernels as K

    rng = np.random.default_rng(n + s)
    x = (rng.standard_normal(n) * rng.random(n) ** 3).astype(np.float32)
    x[::97] = 0.0
    x[5::89] = -0.0
    b = min(bucket or n, n)
    seed = 0x1234_5678_9ABC_DEF0 + n
    levels = np.empty(n, np.int32 if s > 32767 else np.int16)
    norms = K.stochastic_levels(x, b, s, use_max, signed_grid, np.uint64(seed), levels)

    starts = np.arange(0, n, b)
    if use_max:
        assert norms.tolist() == np.maximum.reduceat(np.abs(x), starts).tolist()
    else:
        true = np.sqrt(np.add.reduceat(x.astype(np.float64) ** 2, starts))
        assert (norms >= true).all() and (np.nextafter(norms, np.float32(0)) < true).all()
    f = np.repeat(s / norms.astype(np.float64), np.diff(np.append(starts, n)))
    u = _splitmix_uniforms(seed, n)
    v = x.astype(np.float64)
    if signed_grid:
        want = np.clip(np.floor(v * f + u + (s + 1)) - (s + 1), -s, s)
    else:
        want = np.minimum(np.floor(np.abs(v) * f + u), s) * np.where(v < 0, -1, 1)
    assert levels.tolist() == want.astype(np.int64).tolist()


_THREADS_SCRIPT = """
import sys, threading
if sys.argv[1] == "ray":
    import ray  # as in a virtual client of Flower's simulation engine
import torch, numba, qfl
from qfl.compress import runtime
from qfl.wire import decode, encode
runtime.FORCE_PARALLEL = True
x = torch.randn(600_000, generator=torch.Generator().manual_seed(5))
specs = ["qsgd(16)", "grid(4)", "topk(0.3)", "bernoulli(budget=0.05) | grid(4)", "qsgd(3, norm=max)"]
ref = {s: decode(encode(qfl.parse(s).compress(x, torch.Generator().manual_seed(1)))).decompress() for s in specs}
errors = []
def work(i):
    try:
        for _ in range(6):
            for s in specs:
                y = decode(encode(qfl.parse(s).compress(x, torch.Generator().manual_seed(1)))).decompress()
                assert torch.equal(y, ref[s]), s
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
print(numba.threading_layer())
"""


@pytest.mark.parametrize("process", ["ray", "plain"])
def test_kernels_from_many_threads_at_once(process):
    # In a Ray worker qfl picks numba's workqueue layer, which kills the process when two
    # threads enter parallel code at once; the parallel slot makes the others run
    # serially, with identical results. A subprocess, since the failure mode is an abort.
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, process],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    layer = out.stdout.split()[-1]
    assert (layer == "workqueue") == (process == "ray"), layer  # see qfl.compress.runtime.threading_layer


@pytest.mark.parametrize(
    "n,k",
    [
        (1_200_000, 12_000),
        (1_200_000, 1),
        (1_200_000, 250_000),
        (1_200_000, 600_000),
        (300_000, 3_000),
        (300_000, 150_000),
        (5000, 50),
        (5000, 5000),
        (7, 3),
        (1, 1),
    ],
)
def test_topk_every_path_exact(kernel_mode, n, k):
    # 1.2M elements with k <= n/4 take the sampled-threshold path; k > n/4 the full radix
    # select on 16-bit digits (parallel or serial); fewer than 2^20 elements the radix
    # select on 11-bit digits, in slices from 2^17 on. Few distinct magnitudes make
    # massive ties, which the sampled path must hand to the exact fallback; magnitudes
    # equal in all but their lowest mantissa bits leave the first digits no choice.
    from qfl.compress import _sparse_kernels as K

    g = torch.Generator().manual_seed(n + k)
    near = (1 + torch.randint(0, 4096, (n,), generator=g) * 2.0**-23) * torch.randint(0, 2, (n,), generator=g).mul(
        2
    ).sub(1)
    for x in (torch.randn(n, generator=g), torch.randint(-3, 4, (n,), generator=g).float(), near.float()):
        idx, vals, bad = K.topk_select(x.numpy(), k)
        assert not bad
        ref = torch.topk(x.abs(), k, sorted=True)
        if x.numel() <= 5000:
            assert idx.tolist() == _topk_reference(x, k)
        else:
            assert torch.equal(torch.from_numpy(idx), torch.from_numpy(idx).sort().values)
            kept = x.abs()[torch.from_numpy(idx)]
            # Exactly the k largest magnitudes; among ties at the threshold, the lowest indices.
            assert torch.equal(kept.sort(descending=True).values, ref.values)
            t = float(ref.values[-1])
            ties = torch.nonzero(x.abs() == t).flatten()
            taken = torch.from_numpy(idx)[kept == t]
            assert torch.equal(taken, ties[: taken.numel()])
        assert torch.equal(torch.from_numpy(vals), x[torch.from_numpy(idx)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("n,k", [(1_200_000, 12_000), (1_200_000, 600_000), (300_000, 3_000), (3000, 30)])
def test_topk_detects_nonfinite_on_every_path(kernel_mode, bad, n, k):
    from qfl.compress import _sparse_kernels as K

    x = torch.randn(n)
    for where in (0, n // 2, n - 1):
        y = x.clone()
        y[where] = bad
        assert K.topk_select(y.numpy(), k)[2]
        with pytest.raises(ValueError, match="non-finite"):
            TopK(k=k).compress(y)


@pytest.mark.parametrize(
    "spec", ["qsgd(4)", "qsgd(4, norm=max, bucket=7)", "grid(8, bucket=1000)", "fp16", "bf16", "topk(0.01) | qsgd(4)"]
)
def test_fused_finite_checks(spec):
    # These operators find NaN/Inf in the pass they make anyway (norms, top-k keys, max |x|).
    x = torch.randn(300_000)
    for i in (0, 123_457, 299_999):
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[i] = bad
            with pytest.raises(ValueError, match="non-finite"):
                qfl.parse(spec).compress(y)


def test_float64_beyond_float32_range_is_a_clear_error():
    x = torch.tensor([1.0, 1e300], dtype=torch.float64)
    for spec in ("qsgd(4)", "grid(8)"):
        with pytest.raises(ValueError, match="overflow float32"):
            qfl.parse(spec).compress(x)


def test_cast_overflow_thresholds():
    fp16 = qfl.parse("fp16")
    assert torch.equal(
        fp16.decompress(fp16.compress(torch.tensor([65504.0, -65519.0]))), torch.tensor([65504.0, -65504.0])
    )
    with pytest.raises(ValueError, match="fp16 cannot represent"):
        fp16.compress(torch.tensor([0.0, -65520.0]))
    with pytest.raises(ValueError, match="fp16 cannot represent"):
        fp16.compress(torch.tensor([1e5], dtype=torch.float64))
    bf16 = qfl.parse("bf16")
    big = float(torch.finfo(torch.bfloat16).max)
    assert float(bf16.decompress(bf16.compress(torch.tensor([big])))[0]) == big
    with pytest.raises(ValueError, match="bf16 cannot represent"):
        bf16.compress(torch.tensor([3.4e38]))


@pytest.mark.parametrize(
    "spec,x",
    [
        ("bernoulli(budget=0.5)", torch.tensor(65504.0, dtype=torch.float16)),  # 65504 / p = 131008
        # Each value rounds up to the norm, 524032, with probability 1/8: some of 64 do.
        ("qsgd(1)", torch.full((64,), 65504.0, dtype=torch.float16)),
    ],
)
def test_reconstructions_beyond_a_narrow_dtype_are_refused(spec, x):
    # Every input fits its dtype, but what the receiver would rebuild does not: refuse, never send Inf.
    with pytest.raises(ValueError, match="cannot represent this tensor in float16"):
        qfl.parse(spec).compress(x, torch.Generator().manual_seed(0))
    # The same values in float32 are fine.
    y = qfl.parse(spec).compress(x.float(), torch.Generator().manual_seed(0)).decompress()
    assert bool(torch.isfinite(y).all())


def test_large_casts_and_identity_round_trip():
    x = torch.randn(1_500_000)
    for spec, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        p = qfl.parse(spec).compress(x)
        assert torch.equal(p.body.values, x.to(dtype))
        assert torch.equal(p.decompress(), x.to(dtype).float())
    for y in (x, x.double(), x.bfloat16(), x.half()):
        p = Identity().compress(y)
        assert torch.equal(p.decompress(), y)
        assert p.body.values.data_ptr() == y.data_ptr()  # the tensor itself: no pass over it


def test_sparse_decompress_scatters_any_order_and_checks_range():
    from qfl.compress import _sparse_kernels as K
    from qfl.compress.payload import Payload, Raw

    out = np.full(10, 7.0, np.float32)
    assert K.scatter(np.array([7, 2, 7]), np.array([1.0, 2.0, 3.0], np.float32), out) == 0
    assert out.tolist() == [0, 0, 2, 0, 0, 0, 0, 3, 0, 0]
    assert K.scatter(np.array([3, 10]), np.array([1.0, 2.0], np.float32), out) == -1
    assert K.scatter(np.array([-1]), np.array([1.0], np.float32), out) == -1
    op = TopK(k=2)
    p = Payload(op, (10,), torch.float32, Sparse(torch.tensor([9, 12]), None, Raw(torch.ones(2))))
    with pytest.raises(IndexError):
        p.decompress()


def test_randk_positions_match_floyd_definition():
    # random_subset reads membership back from a bitset instead of sorting: same subset.
    from qfl.compress import _sparse_kernels as K

    for n, k, seed in ((1000, 10, 1), (1000, 1000, 2), (70, 0, 3), (200_000, 2000, 4)):
        taken, out = set(), []
        for c, j in enumerate(range(n - k, n)):
            t = min(int(K.uniform(np.uint64(seed), c) * (j + 1)), j)
            if t in taken:
                t = j
            taken.add(t)
            out.append(t)
        assert K.random_subset(n, k, np.uint64(seed)).tolist() == sorted(out)


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.1)",
        "topk(0.05) | qsgd(7, norm=max, bucket=128)",
        "randk(0.2)",
        "bernoulli(0.1) | grid(4)",
        "signtopk(0.1)",
        "topk(0.1) | fp16",
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_a_sparse_payload_read_sparsely_is_its_decompression(spec, dtype):
    """What a server sums at the kept positions equals the dense rebuild, through the wire
    (float64 raw values too: rebuilt through float32 they differed from what was sent)."""
    # Drawn in float64, so that a float64 tensor has values float32 cannot hold.
    x = torch.randn(40, 53, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    payload = qfl.wire.decode(qfl.wire.encode(qfl.parse(spec).compress(x, torch.Generator().manual_seed(4))))
    idx, values = payload.decompress_sparse()
    assert idx.dtype == torch.int64 and values.dtype == dtype and bool((idx[1:] > idx[:-1]).all())
    rebuilt = torch.zeros(x.numel(), dtype=dtype)
    rebuilt[idx] = values
    assert torch.equal(rebuilt.reshape(x.shape), payload.decompress())


@pytest.mark.parametrize("spec", ["grid(8)", "qsgd(16)", "fp16", "identity"])
def test_a_dense_payload_has_no_sparse_view(spec):
    assert qfl.parse(spec).compress(torch.randn(300)).decompress_sparse() is None


def test_a_sparse_view_refuses_positions_that_are_not_strictly_increasing():
    """Positions an untrusted peer repeats or reorders cannot be summed once each: refused."""
    payload = qfl.parse("topk(0.1)").compress(torch.randn(100))
    for bad in ([3, 3, *range(10, 18)], [9, 2, *range(10, 18)], [*range(1, 10), 100]):
        body = Sparse(torch.tensor(bad), None, payload.body.values)
        with pytest.raises(IndexError, match="strictly increasing"):
            Payload(payload.op, payload.shape, payload.dtype, body).decompress_sparse()
