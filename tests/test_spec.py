"""Spec strings and per-tensor policies."""

from __future__ import annotations

import pytest
import torch

import qfl
from qfl.compress import IDENTITY, QSGD, Chain, Operator, TopK

ROUND_TRIP = [
    "identity",
    "fp16",
    "bf16",
    "sign",
    "qsgd(16)",
    "qsgd(levels=16, bucket=512)",
    "qsgd(4, norm=max)",
    "qsgd(2, damped=true)",
    "grid(8)",
    "grid(4, bucket=64)",
    "topk(0.01)",
    "topk(k=100)",
    "topk(250)",
    "randk(0.1, seed=7)",
    "randk(k=5, unbiased=true)",
    "bernoulli(0.2)",
    "bernoulli(budget=0.01)",
    "signtopk(0.05)",
    "topk(0.01) | qsgd(levels=16, bucket=512)",
    "bernoulli(budget=0.01) | grid(4)",
    "randk(0.1) | fp16",
    "topk(0.1) | qsgd(4, damped=true)",
    "  topk( 0.01 )|qsgd( levels = 16 ) ",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_str_parses_back_to_an_equal_chain(spec):
    op = qfl.parse(spec)
    assert isinstance(op, Operator)
    again = qfl.parse(str(op))
    assert again == op and hash(again) == hash(op) and str(again) == str(op)
    assert Operator.from_config(op.get_config()) == op


def test_parse_builds_the_expected_objects():
    op = qfl.parse("topk(0.01) | qsgd(levels=16, bucket=512)")
    assert op == Chain(TopK(ratio=0.01), QSGD(16, bucket=512))
    assert qfl.parse("signtopk(0.1)") == qfl.parse("topk(0.1) | sign")
    assert qfl.parse("topk(250)") == TopK(k=250)
    assert qfl.parse(None) == IDENTITY and qfl.parse("") == IDENTITY
    assert qfl.parse("identity | qsgd(4)") == QSGD(4)
    assert qfl.parse(QSGD(4)) is not None


@pytest.mark.parametrize(
    "spec,token",
    [
        ("qsdg(4)", "qsdg"),
        ("topk(0.01) | qsgd(lvls=4)", "lvls"),
        ("qsgd(levels=0)", "qsgd(levels=0)"),
        ("qsgd(4", "qsgd(4"),
        ("qsgd(4) | topk(0.1)", "qsgd(levels=4) | topk"),
        ("topk(0.1) | randk(0.1)", "randk"),
        ("grid(8) |", "empty stage"),
        ("qsgd(levels=4, levels=5)", "given twice"),
        ("qsgd(4, 5, 6)", "positional"),
        ("topk(ratio=2.5)", "ratio must be in (0, 1]"),
        ("qsgd(4, norm=l3)", "norm must be"),
        ("grid(1)", "grid bits"),
        ("bernoulli(p=0.1, budget=0.1)", "exactly one"),
        ("qsgd(4, bucket=@)", "bad value"),
    ],
)
def test_bad_specs_name_the_token(spec, token):
    with pytest.raises(ValueError) as err:
        qfl.parse(spec)
    assert token in str(err.value)


def test_unknown_operator_lists_known_ones():
    with pytest.raises(
        ValueError, match="known operators: bernoulli, bf16, fp16, grid, identity, qsgd, randk, sign, signtopk, topk"
    ):
        qfl.parse("zip(9)")


def test_downlink_mode():
    assert qfl.parse_downlink("delta | qsgd(levels=256)") == ("delta", QSGD(256))
    assert qfl.parse_downlink("model | grid(8)")[0] == "model"
    assert qfl.parse_downlink("grid(8)") == ("model", qfl.parse("grid(8)"))
    assert qfl.parse_downlink(None, "delta") == ("delta", IDENTITY)


def test_policy_small_integer_and_overrides():
    pol = qfl.Policy.build("qsgd(4)", min_elements=100, overrides={"fc.*": "fp16", "head.bias": "qsgd(8)"})
    assert pol.operator_for("conv.weight", torch.zeros(100)) == QSGD(4)
    assert pol.operator_for("conv.bias", torch.zeros(99)) == IDENTITY
    assert pol.operator_for("bn.num_batches_tracked", torch.zeros(1000, dtype=torch.int64)) == IDENTITY
    assert pol.operator_for("fc.weight", torch.zeros(1000)) == qfl.parse("fp16")
    assert pol.operator_for("head.bias", torch.zeros(3)) == QSGD(8)  # explicit override beats min_elements
    cfg = pol.to_config("qfl.uplink")
    assert all(isinstance(v, (str, int, list)) for v in cfg.values())
    assert qfl.Policy.from_config(cfg, "qfl.uplink") == pol
    with pytest.raises(ValueError, match="missing config key 'qfl.uplink.spec'"):
        qfl.Policy.from_config({}, "qfl.uplink")
    with pytest.raises(ValueError, match="min_elements"):
        qfl.Policy.build("qsgd(4)", min_elements=-1)
