"""Property-based fuzzing of every operator, the spec strings and the wire decoder.

Hypothesis draws operators with random parameters (every registered operator and every
sparsifier | value-operator chain), tensors of random shape, dtype and values (zeros,
ties, subnormals, values near the float32 and float16 limits), and blobs mutated or
truncated under a recomputed checksum. The properties:

* an operator either compresses or refuses with a ValueError that says why (the values
  overflow what it can represent); what it produces is finite, has the input's shape
  and dtype, obeys the operator's deterministic error bound, and survives the wire
  bit for bit;
* ``parse(str(op)) == op`` and ``from_config(get_config())`` round trips;
* error memory keeps ``sent + new memory == memory + delta``;
* the decoder returns a payload or raises WireFormatError, never anything else, and
  what it accepts re-encodes to the same tensor (``qfl.wire.fuzz.check_one``); so does
  the parser of the container that carries a message's blobs by tensor name.

``QFL_FUZZ_EXAMPLES`` (default 60) scales the examples per test; the coverage-guided
target is ``python -m qfl.wire.fuzz`` (see its docstring).
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import qfl
from qfl.compress import (
    BF16,
    FP16,
    QSGD,
    Bernoulli,
    Chain,
    Grid,
    Identity,
    Levels,
    Operator,
    RandK,
    Sign,
    Signs,
    Sparse,
    TopK,
)
from qfl.memory import compress_with_memory
from qfl.wire import Limits, WireFormatError, decode, decode_all, encode, fuzz, fuzz_inputs

EXAMPLES = int(os.environ.get("QFL_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# ------------------------------------------------------------------- strategies
buckets = st.one_of(st.none(), st.integers(1, 70), st.sampled_from([512, 65_536, 2**31, 2**62, 2**63 - 1]))
ratios = st.one_of(st.floats(1e-9, 1.0, exclude_min=False), st.sampled_from([1.0, 0.5, 1e-3, 1e-12]))
counts = st.one_of(st.integers(1, 80), st.sampled_from([10**6, 2**62]))
probabilities = st.one_of(st.floats(1e-4, 1.0), st.sampled_from([1.0, 0.5, 0.01]))


@st.composite
def amounts(draw):
    return {"ratio": draw(ratios)} if draw(st.booleans()) else {"k": draw(counts)}


value_ops = st.one_of(
    st.builds(
        QSGD,
        levels=st.one_of(st.integers(1, 300), st.sampled_from([2**15, 2**30])),
        norm=st.sampled_from(["l2", "max"]),
        bucket=buckets,
        damped=st.booleans(),
    ),
    st.builds(Grid, bits=st.integers(2, 16), bucket=buckets),
    st.just(Sign()),
    st.just(FP16()),
    st.just(BF16()),
    st.just(Identity()),
)


@st.composite
def sparsifiers(draw):
    kind = draw(st.sampled_from(["topk", "randk", "bernoulli"]))
    if kind == "topk":
        return TopK(**draw(amounts()))
    if kind == "randk":
        return RandK(**draw(amounts()), seed=draw(st.integers(0, 2**63 - 1)), unbiased=draw(st.booleans()))
    if draw(st.booleans()):
        return Bernoulli(p=draw(probabilities))
    return Bernoulli(budget=draw(probabilities))


@st.composite
def operators(draw):
    kind = draw(st.sampled_from(["value", "sparsifier", "chain"]))
    if kind == "value":
        return draw(value_ops)
    if kind == "sparsifier":
        return draw(sparsifiers())
    return Chain.of([draw(sparsifiers()), draw(value_ops)])


@st.composite
def tensors(draw, max_elements=400):
    """(x, dtype): shapes with zero-size and scalar cases; values with ties, zeros, extremes."""
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(0, 12), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_elements:
        shape = (max_elements,)
    n = math.prod(shape)
    dtype = draw(st.sampled_from(FLOATS))
    style = draw(st.sampled_from(["normal", "ties", "sparse", "wide", "extreme", "zeros"]))
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    if style == "normal":
        x = torch.randn(n, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 100.0]))
    elif style == "ties":
        x = torch.randint(-2, 3, (n,), generator=g).double() * 0.5
    elif style == "sparse":
        x = torch.randn(n, generator=g, dtype=torch.float64) * (torch.rand(n, generator=g) < 0.05)
    elif style == "wide":  # magnitudes from subnormal to large, in float64
        x = torch.randn(n, generator=g, dtype=torch.float64) * torch.pow(
            10.0, torch.randint(-44, 30, (n,), generator=g).double()
        )
    elif style == "extreme":
        picks = torch.tensor(
            [0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1.0e-45, 6.0e4, 65504.0, 1.0e30], dtype=torch.float64
        )
        x = picks[torch.randint(0, len(picks), (n,), generator=g)]
    else:
        x = torch.zeros(n, dtype=torch.float64)
    return x.to(dtype).reshape(shape)


OVERFLOW_WORDS = ("cannot represent", "overflow", "non-finite")


def bits(t: torch.Tensor) -> torch.Tensor:
    return fuzz.bits_of(t)


# --------------------------------------------------------------- operators
@SETTINGS
@given(op=operators(), x=tensors(), seed=st.integers(0, 2**31))
# Found by this test: float16 rounds the sign scale (5/6 -> 0.8335), the check must too.
@example(op=Sign(), x=torch.tensor([1.0, 1.0, 0.5], dtype=torch.float16), seed=0)
# Found by this test: 65504 / p_i overflowed float16 on decompression (now refused).
@example(op=Bernoulli(budget=0.5), x=torch.tensor(65504.0, dtype=torch.float16), seed=0)
# A float64 value float32 cannot hold, kept: rebuilt exactly (e78c1f9).
@example(op=TopK(k=1), x=torch.tensor([0.0015, -1e-9], dtype=torch.float64), seed=0)
def test_every_operator_compresses_within_its_contract_and_survives_the_wire(op, x, seed):
    try:
        p = op.compress(x, torch.Generator().manual_seed(seed))
    except ValueError as exc:
        # Only values beyond what the operator can represent may be refused (a wide or
        # extreme input, or a rescaling by a tiny keep probability that overflows).
        assert any(w in str(exc) for w in OVERFLOW_WORDS), exc
        return
    y = p.decompress()
    assert tuple(y.shape) == tuple(x.shape) and y.dtype == x.dtype
    assert bool(torch.isfinite(y).all()), "a finite input produced a non-finite reconstruction"
    blob = encode(p)
    q = decode(blob)
    assert q.op == p.op and q.shape == p.shape and q.dtype == p.dtype
    assert torch.equal(bits(q.decompress()), bits(y))
    check_error_bound(op, p, x.reshape(-1), y.reshape(-1))


def check_error_bound(op: Operator, p, x: torch.Tensor, y: torch.Tensor) -> None:
    """Deterministic per-operator guarantees (the statistical ones live in test_compress)."""
    xd, yd = x.double(), y.double()
    n = x.numel()
    if n == 0:
        return
    if isinstance(op, Identity):
        assert torch.equal(bits(y), bits(x))
    elif isinstance(op, TopK):
        k = op.expected_count(n)
        assert int((yd != 0).sum()) <= k
        kept = yd != 0
        # Kept values are rebuilt as they are, in the tensor's dtype (float64 ones were
        # rounded to float32 by decompress() alone: not what the wire and the server have).
        assert torch.equal(yd[kept], xd[kept])
        # ||x - C(x)||^2 <= (1 - k/n) ||x||^2, up to the float32 magnitudes the selection ranks.
        assert float(((xd - yd) ** 2).sum()) <= (1 - k / n) * float((xd**2).sum()) * (1 + 1e-6) + 1e-300
    elif isinstance(op, (QSGD, Grid)):
        assert isinstance(p.body, Levels)
        s = op.levels if isinstance(op, QSGD) else op.max_level
        b = min(op.bucket or n, n)
        scales = p.body.scales.double().repeat_interleave(b)[:n]
        x32 = x.to(torch.float32).double()  # the operators quantize the float32 values
        damping = 1 / (1 + op.beta(n)) if isinstance(op, QSGD) and op.damped else 1.0
        # Each value rounds to one of its two neighbours on the grid of step scale / s.
        tol = scales / s * (1 + 1e-6) + (x32 - xd).abs() + yd.abs() * 2**-7 + 1e-300
        if damping == 1.0:
            assert bool(((xd - yd).abs() <= tol).all())
        # Scales are never below the true bucket norm (no clipping).
        mags = x32.abs()
        assert bool((mags <= scales * (1 + 1e-6) + 1e-300).all())
    elif isinstance(op, Sign):
        assert isinstance(p.body, Signs)
        # Every magnitude is the scale, rounded once to the tensor's dtype.
        scale = torch.tensor(abs(p.body.scale), dtype=y.dtype).double()
        assert bool((yd.abs() == scale).all()) or p.body.scale == 0
    elif isinstance(op, RandK):
        k = op.expected_count(n)
        assert isinstance(p.body, Sparse) and p.body.count == k


@SETTINGS
@given(op=operators(), x=tensors(max_elements=200))
def test_finite_inputs_of_ordinary_magnitude_are_never_refused(op, x):
    """Refusals are for overflow only: |x| <= 1e6 in float32/64 always compresses
    (Bernoulli's 1/p rescaling with p >= 1e-4 stays far from float32's limit)."""
    assume(bool((x.double().abs() <= 1e6).all()))
    if isinstance(op, (FP16, Chain)) and (isinstance(op, FP16) or isinstance(op.value, FP16)):
        assume(bool((x.double().abs() <= 6e4).all()))
    if x.dtype in (torch.float16, torch.bfloat16):
        # What the receiver rebuilds must fit the tensor's own dtype too, after a
        # rescaling by up to 1/p = 1e4 (Bernoulli) or n/k (unbiased rand-k).
        assume(float(x.double().abs().sum()) * 1e4 <= float(torch.finfo(x.dtype).max))
    op.compress(x, torch.Generator().manual_seed(0))


@SETTINGS
@given(op=operators())
def test_spec_string_and_config_round_trip(op):
    assert qfl.parse(str(op)) == op
    assert Operator.from_config(op.get_config()) == op
    # And the header that names it on the wire.
    assert decode(encode(op.compress(torch.ones(3)))).op == op


@SETTINGS
@given(
    op=operators(),
    x=tensors(max_elements=120),
    memory_scale=st.sampled_from([0.0, 1e-3, 1.0]),
    seed=st.integers(0, 2**31),
)
def test_error_memory_invariant(op, x, memory_scale, seed):
    assume(x.numel() > 0 and bool((x.double().abs() <= 1e6).all()))
    if isinstance(op, FP16) or (isinstance(op, Chain) and isinstance(op.value, FP16)):
        assume(bool((x.double().abs() <= 1e4).all()))
    memory = (
        torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(
            torch.float64 if x.dtype == torch.float64 else torch.float32
        )
        * memory_scale
    )
    payload, sent, new_memory = compress_with_memory(op, x, memory, torch.Generator().manual_seed(seed))
    want = (x.to(memory.dtype) + memory).double()
    got = (sent.to(memory.dtype) + new_memory).double()
    # Exact up to rounding the residual (corrected - sent) and adding it back: a few ulps
    # of |corrected| + |sent| (sent may be far larger than corrected: x / p for Bernoulli).
    eps = 2.0**-52 if memory.dtype == torch.float64 else 2.0**-23
    assert bool(((got - want).abs() <= 2 * eps * (want.abs() + sent.double().abs()) + 1e-300).all())
    assert torch.equal(bits(decode(encode(payload)).decompress()), bits(sent))


# ------------------------------------------------------------------ overflow fixes
@pytest.mark.parametrize(
    "spec,x",
    [
        ("qsgd(4)", torch.full((4,), 3e38)),  # the l2 norm overflows float32
        ("topk(0.5) | qsgd(4)", torch.full((4,), 3e38)),
        ("bernoulli(0.01)", torch.full((400,), 3e37)),  # x / p overflows float32
        ("randk(0.25, unbiased=true)", torch.full((4,), 3e38)),  # n / k rescaling
        ("qsgd(4)", torch.tensor([1e300, -1e300, 1.0], dtype=torch.float64)),  # beyond float32
        ("sign", torch.tensor([1e300, 1.0], dtype=torch.float64)),
        ("grid(8)", torch.tensor([1e300, 1.0], dtype=torch.float64)),
        ("bernoulli(0.5)", torch.tensor([1e300, -1e300, 1.0], dtype=torch.float64)),
    ],
)
def test_values_an_operator_cannot_represent_are_refused_not_sent_as_inf(spec, x):
    """Found by the property test: these used to send NaN/Inf (or a blob the decoder
    refuses), poisoning the receiver and, through error memory, every later round."""
    with pytest.raises(ValueError, match="cannot represent|overflow"):
        qfl.parse(spec).compress(x, torch.Generator().manual_seed(0))


def test_bucket_larger_than_any_tensor_is_the_whole_tensor():
    """Found by the property test: bucket=2**63-1 overflowed the kernels' bucket arithmetic."""
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for op, whole in ((QSGD(4, bucket=2**63 - 1), QSGD(4)), (Grid(4, bucket=2**62), Grid(4))):
        y = op.decompress(op.compress(x, torch.Generator().manual_seed(1)))
        assert torch.equal(y, whole.decompress(whole.compress(x, torch.Generator().manual_seed(1))))
        assert torch.equal(decode(encode(op.compress(x, torch.Generator().manual_seed(1)))).decompress(), y)


def test_bf16_overflow_message_does_not_recommend_bf16():
    with pytest.raises(ValueError) as info:
        qfl.parse("bf16").compress(torch.tensor([1e300], dtype=torch.float64))
    assert "use bf16" not in str(info.value)


# ------------------------------------------------------------------ the decoder
def valid_blob(op: Operator, x: torch.Tensor, seed: int) -> bytes:
    return encode(op.compress(x, torch.Generator().manual_seed(seed)))


@st.composite
def valid_blobs(draw):
    op, x, seed = draw(operators()), draw(tensors(max_elements=150)), draw(st.integers(0, 2**31))
    try:
        return valid_blob(op, x, seed)
    except ValueError:
        assume(False)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_wire_format_error(data):
    for blob in (data, fuzz.frame(data)):  # as they are, and as content behind a valid checksum
        try:
            decode_all(blob, fuzz.FUZZ_LIMITS)
        except WireFormatError:
            pass


@SETTINGS
@given(
    blob=valid_blobs(),
    cuts=st.lists(st.integers(0, 10**6), max_size=3),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
)
def test_mutated_content_under_a_valid_checksum_keeps_the_contract(blob, cuts, edits):
    content = bytearray(fuzz.content_of(blob))
    for at, value in edits:
        if content:
            content[at % len(content)] = value
    for cut in cuts:
        content = content[: cut % (len(content) + 1)]
    fuzz.check_one(fuzz.as_content_input(bytes(content)))


@SETTINGS
@given(blob=valid_blobs(), data=st.data())
def test_every_truncated_blob_is_rejected_and_the_full_blob_accepted(blob, data):
    cut = data.draw(st.integers(0, len(blob) - 1))
    with pytest.raises(WireFormatError):
        decode(blob[:cut])
    # Truncated content re-framed with a valid checksum: rejected or (rarely) another valid payload.
    fuzz.check_one(fuzz.as_content_input(fuzz.content_of(blob)[:cut]))
    assert fuzz.check_one(fuzz.as_raw_input(blob)) is None


@SETTINGS
@given(blobs=st.lists(valid_blobs(), max_size=4), mutator_seed=st.integers(0, 2**31))
def test_structure_aware_mutations_of_chains_keep_the_contract(blobs, mutator_seed):
    rnd = random.Random(mutator_seed)
    raw = fuzz.as_raw_input(b"".join(blobs))
    assert fuzz.check_one(raw) is None
    assert [p.shape for p in decode_all(b"".join(blobs))] == [decode(b).shape for b in blobs]
    pool = [raw, *(fuzz.as_content_input(fuzz.content_of(b)) for b in blobs)]
    for _ in range(6):
        fuzz.check_one(fuzz.mutate(rnd.choice(pool), rnd, pool))


@SETTINGS
@given(
    blobs=st.lists(st.lists(valid_blobs(), max_size=2), max_size=4),
    names=st.lists(st.text(min_size=1, max_size=12), min_size=4, max_size=4, unique=True),
    mutator_seed=st.integers(0, 2**31),
)
def test_containers_round_trip_and_their_mutants_keep_the_contract(blobs, names, mutator_seed):
    entries = dict(zip(names, blobs, strict=False))
    data = qfl.wire.pack(entries)
    raw = fuzz.as_raw_input(data)
    assert fuzz.check_one(raw) is None
    decoded = qfl.wire.decode_container(data, fuzz.FUZZ_LIMITS)
    assert {k: [p.shape for p in ps] for k, ps in decoded.items()} == {
        k: [decode(b).shape for b in bs] for k, bs in entries.items()
    }
    rnd = random.Random(mutator_seed)
    pool = [raw, *(fuzz.as_raw_input(b) for bs in blobs for b in bs)]
    for _ in range(6):
        fuzz.check_one(fuzz.mutate(rnd.choice(pool), rnd, pool))


@SETTINGS
@given(blob=valid_blobs(), limit=st.integers(0, 200))
def test_declared_sizes_beyond_the_limits_are_refused(blob, limit):
    p = decode(blob)
    limits = Limits(max_elements=limit, max_total_elements=limit)
    if p.numel > limit or max(p.shape, default=0) > limit:  # every dimension is bounded too
        with pytest.raises(WireFormatError, match="max_elements|exceeds the allowed maximum"):
            decode(blob, limits)
    else:
        decode(blob, limits)
    # A chain of copies: the per-array budget counts them all.
    copies = 3
    if copies * p.numel > limit and p.numel <= limit:
        with pytest.raises(WireFormatError, match="max_total_elements"):
            decode_all(blob * copies, limits)


def test_fuzz_seed_corpus_round_trips_and_mutants_keep_the_contract(tmp_path):
    """A short run of the fallback driver (the CI smoke test of ``python -m qfl.wire.fuzz``)."""
    corpus = fuzz.seed_corpus(0)
    assert all(fuzz.check_one(c) is None for c in corpus if c[0] % 2 == 0)
    small = [c for c in corpus if len(c) < 4096]  # mutants of the multi-block seeds cost 100x more
    findings = fuzz.Findings(tmp_path, fuzz.FUZZ_LIMITS, timeout=60.0, rss_budget_mb=256)
    fuzz.run_random(len(small) + 1000, findings, seed=1, corpus=small)
    findings.close()
    assert findings.found == []
    assert findings.accepted > 50 and len(findings.reasons) > 30  # it reached deep into the parser


# ------------------------------------------------------------- memory, hostile input
def test_hostile_inputs_stay_within_the_limits_memory():
    """Blobs declaring the most work for the fewest bytes cost memory in proportion to
    the declared (and allowed) elements, never to what the blob merely claims."""
    limits = fuzz.FUZZ_LIMITS
    budget_mb = 16 + fuzz.BYTES_PER_ELEMENT * limits.max_total_elements / 2**20
    fuzz.check_one(fuzz.seed_corpus(0)[0])  # warm up the kernels
    report = {}
    for name, blob in fuzz.hostile_inputs(limits).items():
        m = fuzz.measure(fuzz.as_raw_input(blob), limits)
        report[name] = m
        assert m["tracemalloc_mb"] <= budget_mb, (name, m)
        if not math.isnan(m["peak_rss_mb"]):
            assert m["peak_rss_mb"] <= budget_mb, (name, m)
    assert report["dimension-2^62"]["rejected"] and report["elias-block-lengths-overflow"]["rejected"]
    assert report["chain-of-maximal-blobs"]["rejected"] and report["rice-length-overflow"]["rejected"]
    assert report["container-of-maximal-blobs"]["rejected"]


def test_elias_block_lengths_claiming_gigabytes_are_refused_before_allocating():
    """Found while fuzzing: each Elias block length was checked against the bytes left,
    but not their sum, and the stream buffer was allocated before its bytes were
    checked. A 1 MB blob made the decoder allocate 4 GB; a 16 MB one raised MemoryError
    out of ``decode`` (a crash of whoever decodes a client's reply)."""
    n = 1 << 28  # the default max_elements
    nblk = n >> 16
    pad = bytes(1 << 20)
    remaining = 8 * (4 * nblk + len(pad))
    op = bytes([4, 4, 1]) + fuzz.varint((1 << 30) << 1) + bytes([5]) + fuzz.varint(2) + b"l2" + bytes([0, 3])
    content = (
        bytes([1])
        + op
        + bytes([1, 1])
        + fuzz.varint(n)
        + np.float32(1).tobytes()
        + bytes([1])
        + b"".join(fuzz_inputs.varint4(remaining) for _ in range(nblk))
        + pad
    )
    tracemalloc.start()
    try:
        with pytest.raises(WireFormatError, match="block lengths add up"):
            decode(fuzz.frame(content))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


def test_boolean_values_must_be_zero_or_one():
    blob = bytearray(encode(qfl.parse("identity").compress(torch.tensor([True, False, True]))))
    content = bytearray(fuzz.content_of(bytes(blob)))
    content[-2] = 2
    with pytest.raises(WireFormatError, match="boolean"):
        decode(fuzz.frame(bytes(content)))


@pytest.mark.slow
def test_coverage_guided_target_runs(tmp_path):
    """``python -m qfl.wire.fuzz`` for a few thousand inputs (atheris when installed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "qfl.wire.fuzz", "--runs", "3000", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"findings": []' in proc.stdout
