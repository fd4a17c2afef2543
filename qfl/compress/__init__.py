"""Compression operators on one tensor: math only, no bytes and no Flower.

Every operator is an immutable object with ``compress(x, generator=None) -> Payload``
and ``decompress(payload) -> tensor``; ``properties(n)`` states whether it is
unbiased and its variance or contraction factor. Operators compose left to right,
sparsify then quantize: ``Chain.of([topk(0.01), qsgd(16)])``, or in a spec string
``"topk(0.01) | qsgd(levels=16)"`` (see :func:`qfl.parse`).

What belongs here: an operator's math on one tensor and the statement of its properties
(with the paper they come from). Not bytes (:mod:`qfl.wire`), not state kept across
rounds (:mod:`qfl.memory`, :mod:`qfl.replica`), not Flower.
"""

from .base import IDENTITY, REGISTRY, Identity, Operator, Properties, ValueOperator
from .chain import Chain
from .payload import Levels, Part, Payload, Raw, Signs, Sparse
from .quantizers import BF16, FP16, QSGD, Grid, Sign
from .sparsifiers import Bernoulli, RandK, Sparsifier, TopK

# Lower-case spellings mirror spec strings: qfl.compress.qsgd(16) == qfl.parse("qsgd(16)").
identity = Identity
fp16 = FP16
bf16 = BF16
qsgd = QSGD
grid = Grid
sign = Sign
topk = TopK
randk = RandK
bernoulli = Bernoulli


def signtopk(ratio: float | None = None, k: int | None = None) -> Chain:
    """Sign-top-k: ||top_k(x)||_1 / k * sign(top_k(x)), i.e. ``topk | sign``."""
    return Chain(TopK(ratio=ratio, k=k), Sign())


def decompress(payload: Payload):
    """Rebuild a tensor from any payload (its operator is recorded in it)."""
    return payload.op.decompress(payload)


__all__ = [
    "BF16",
    "FP16",
    "IDENTITY",
    "QSGD",
    "REGISTRY",
    "Bernoulli",
    "Chain",
    "Grid",
    "Identity",
    "Levels",
    "Operator",
    "Part",
    "Payload",
    "Properties",
    "RandK",
    "Raw",
    "Sign",
    "Signs",
    "Sparse",
    "Sparsifier",
    "TopK",
    "ValueOperator",
    "bernoulli",
    "bf16",
    "decompress",
    "fp16",
    "grid",
    "identity",
    "qsgd",
    "randk",
    "sign",
    "signtopk",
    "topk",
]
