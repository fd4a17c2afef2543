"""The papers' claims (the report checks them), and which presets test each.

Kept apart from the presets that implement the methods: the claims are read by the
comparison and the report (``qfl.simulations``), which need no strategy; each claim names
the presets (:data:`qfl.strategies.presets.PRESETS`) that test it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Claim:
    """What a paper claims, in terms a comparison against full-precision FedAvg can check.

    Every criterion that is set must hold. ``within_pp``: the method's accuracy ends
    within this many percentage points of the baseline's (both smoothed over their last
    evaluations, at the baseline's number of rounds). ``to_target``: (direction,
    factor), the method reaches the baseline's accuracy - 1 pp with at least ``factor``
    times fewer bytes in that direction ("uplink", "downlink" or "total").
    ``total_factor``: at least this many times fewer bytes in both directions over
    the baseline's rounds.
    """

    paper: str
    statement: str
    methods: tuple[str, ...]
    within_pp: float | None = None
    to_target: tuple[str, float] | None = None
    total_factor: float | None = None


#: The four papers' claims; each names the presets that implement its method
#: (asynchronous variants test the same claim).
CLAIMS: tuple[Claim, ...] = (
    Claim(
        "QSGD (Alistarh et al., 2017)",
        "4- and 8-bit QSGD reach full-precision accuracy",
        ("qsgd4", "qsgd8"),
        within_pp=1.0,
    ),
    Claim(
        "Qsparse-local-SGD (Basu et al., 2019)",
        "large savings in bits to reach a target accuracy, with local steps (large: >= 10x fewer uplink bytes)",
        ("qsparse", "qsparse_sign", "qsparse_async", "qsparse_sign_async", "recommended"),
        to_target=("uplink", 10.0),
    ),
    Claim(
        "AsyLPG double quantization (Yu, Wu, Huang, 2019)",
        "6-19x fewer bits transmitted without accuracy loss",
        ("double_quant", "sparse_double_quant", "acc_double_quant", "double_quant_async"),
        within_pp=1.0,
        total_factor=6.0,
    ),
    Claim(
        "Quantized Epoch-SGD (Zhao, Gao, Li, 2019)",
        "near full-precision accuracy at lower communication (reconstructed from the abstract)",
        ("qesgd",),
        within_pp=1.0,
        total_factor=1.0,
    ),
)


def claim_of(method: str) -> Claim | None:
    """The paper claim a preset is tagged with (None for baselines and custom specs)."""
    return next((c for c in CLAIMS if method in c.methods), None)
