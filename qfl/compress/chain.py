"""Composition of a sparsifier and a value operator, applied left to right."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import Identity, Operator, Properties, ValueOperator
from .payload import Part, Payload
from .sparsifiers import Sparsifier


@dataclass(frozen=True)
class Chain(Operator):
    """``sparsifier | value_op``: keep positions, then compress the kept values.

    Only this shape composes meaningfully (quantizing first would make the sparsifier
    select on rounded values; two sparsifiers are one sparsifier). Build chains with
    :meth:`Chain.of`, which drops identities and returns a lone operator unwrapped.
    """

    sparsifier: Sparsifier
    value: ValueOperator

    name: ClassVar[str] = "chain"

    @staticmethod
    def of(ops: Sequence[Operator]) -> Operator:
        """Normalise a left-to-right list of operators; ValueError on a meaningless order."""
        ops = [op for op in ops if not isinstance(op, Identity)] or [Identity()]
        for op in ops:
            if not isinstance(op, (Sparsifier, ValueOperator)):
                raise ValueError(f"{op} cannot be part of a chain")
        if len(ops) == 1:
            return ops[0]
        if len(ops) == 2 and isinstance(ops[0], Sparsifier) and isinstance(ops[1], ValueOperator):
            return Chain(ops[0], ops[1])
        text = " | ".join(str(op) for op in ops)
        raise ValueError(
            f"cannot compose {text!r}: a chain is at most one sparsifier (topk, randk, "
            "bernoulli) followed by at most one value operator (qsgd, grid, sign, fp16, bf16)"
        )

    @property
    def checks_finite(self) -> bool:  # type: ignore[override]
        """The sparsifier sees the whole tensor first: its check is the chain's."""
        return self.sparsifier.checks_finite

    @property
    def ops(self) -> tuple[Operator, Operator]:
        """The operators, left to right."""
        return (self.sparsifier, self.value)

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        return self.sparsifier._compress(x, generator, inner=self.value)

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        return self.sparsifier._decompress(part, n, inner=self.value)

    def decompress_sparse(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sparsifier.decompress_sparse(payload, inner=self.value)

    def properties(self, n: int) -> Properties:
        sp = self.sparsifier.properties(n)
        k = self.sparsifier.expected_count(n)
        vq = self.value.properties(k if k is not None else n)
        if sp.unbiased and vq.unbiased:
            # E||Q(S(x)) - x||^2 = E||S(x) - x||^2 + E||Q(S(x)) - S(x)||^2 and E||S(x)||^2 <= (1 + w_s)||x||^2.
            return Properties(True, variance=(1 + sp.variance) * (1 + vq.variance) - 1)
        if not sp.unbiased and sp.contraction is not None and vq.contraction is not None and not vq.unbiased:
            # Basu et al., Lemma 1: (gamma_S * gamma_Q) for top-k and a damped quantizer/sign.
            return Properties(False, contraction=sp.contraction * vq.contraction)
        if (
            not sp.unbiased
            and sp.contraction is not None
            and self.sparsifier.is_projection()
            and vq.unbiased
            and vq.variance is not None
            and vq.variance < 1
        ):
            # x - S(x) is orthogonal to S(x) and E[Q(v)] = v, so
            # E||x - Q(S(x))||^2 = ||x||^2 - (1 - beta) ||S(x)||^2 <= (1 - (1 - beta) gamma_S) ||x||^2:
            # a quantizer fine enough (beta < 1: more levels, max-norm scaling, smaller
            # buckets) needs none of the 1/(1 + beta) damping that shrinks every step.
            return Properties(False, contraction=sp.contraction * (1.0 - vq.variance))
        return Properties(False)

    def get_config(self) -> dict[str, Any]:
        return {"id": "chain", "ops": [op.get_config() for op in self.ops]}

    def __str__(self) -> str:
        return " | ".join(str(op) for op in self.ops)
