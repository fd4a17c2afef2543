"""The four papers (and two baselines) as ready-made strategies.

Each preset returns a configured :class:`Compressed` (or subclass) around a Flower
strategy built from ``**inner`` (FedAvg keyword arguments: ``fraction_train``,
``min_available_nodes``, ...). Local steps H are a client setting (``local-steps`` in the
run config or ConfigRecord); each preset documents the H its paper assumes. Every
preset takes ``seed`` and ``min_elements`` (tensors smaller than this travel losslessly,
see :class:`Compressed`).

Bit widths follow the fixed-width cost of our wire format: a b-bit QSGD uses
s = 2^(b-1) - 1 levels, so sign and magnitude fit in b bits; the Elias coding then
usually makes it cheaper still.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from ..spec import MIN_ELEMENTS
from .asynchronous import AsyncCompressed
from .claims import CLAIMS as CLAIMS
from .claims import Claim as Claim
from .claims import claim_of as claim_of
from .compressed import Compressed
from .epoch import QuantizedEpochSGD
from .guard import DEFAULT_GUARD, UpdateGuard
from .momentum import FedAvgMomentum


def server_strategy(momentum: float = 0.0, server_lr: float = 1.0, **inner: Any) -> Strategy:
    """FedAvg, or FedAvgMomentum where the server optimiser is not plain averaging."""
    if momentum or server_lr != 1:
        return FedAvgMomentum(server_momentum=momentum, server_learning_rate=server_lr, **inner)
    return FedAvg(**inner)


def _levels(bits: int) -> int:
    if bits < 2:
        raise ValueError(f"a b-bit quantizer needs b >= 2 (sign + magnitude), got {bits}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class Setting:
    """A complete compression setting: both specs, error memory and the server optimiser.

    Every preset is one: :meth:`build` makes the synchronous strategy, :meth:`compression`
    gives the asynchronous one its specs. :data:`RECOMMENDED` is what the README's example
    wraps around a user's strategy.
    """

    uplink: str | None
    downlink: str | None
    downlink_initial: str | None = None
    server_momentum: float = 0.0
    error_feedback: bool = True

    def compression(self) -> dict[str, Any]:
        """The keyword arguments of :class:`Compressed` (and AsyncCompressed) it fixes."""
        return {
            "uplink": self.uplink,
            "downlink": self.downlink,
            "downlink_initial": self.downlink_initial,
            "error_feedback": self.error_feedback,
        }

    def build(self, *, seed: int = 0, min_elements: int = MIN_ELEMENTS, **inner: Any) -> Compressed:
        """``Compressed`` around :func:`server_strategy` (``**inner``: FedAvg keyword arguments)."""
        return Compressed(
            server_strategy(self.server_momentum, **inner), seed=seed, min_elements=min_elements, **self.compression()
        )

    def __str__(self) -> str:
        return (
            f"uplink={self.uplink!r}, downlink={self.downlink!r}, downlink_initial={self.downlink_initial!r}, "
            f"server_momentum={self.server_momentum}"
        )


def _take(make: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` that name parameters of ``make``, taken out of ``options`` (the rest
    are for :meth:`Setting.build`, :func:`asynchronous` or FedAvg)."""
    names = inspect.signature(make).parameters
    return {k: options.pop(k) for k in list(options) if k in names}


#: Server momentum of the sparse presets (see :func:`qsparse`).
SPARSE_SERVER_MOMENTUM = 0.5


def sparse_downlink(ratio: float) -> str:
    """The sparse presets' downlink: top-k model differences against the clients' replica.

    The server's error memory there is the distance between its model and the replica,
    so the operator must be a contraction too. 15-level max-norm QSGD on buckets of 128
    has variance factor 128 / (4 * 15^2) = 0.14: top-k then quantized stays a
    contraction, 0.86 k/n. The l2-norm QSGD(15) on buckets of 512 used before has 1.5
    (no guarantee; it also measured ~0.02 relative error against 0.001 on a CNN's
    averaged update) and cost the quickstart shape rounds, for ~15% fewer bytes.
    """
    return f"delta | topk({float(f'{ratio:.3g}')}) | qsgd(levels=15, norm=max, bucket=128)"


#: Downlink of the sparse presets at top-2%, with the server's error memory.
SPARSE_DOWNLINK = sparse_downlink(0.02)


def fedavg(**options: Any) -> Compressed:
    """Uncompressed FedAvg (McMahan et al.): the baseline, with the same byte accounting.

    Both directions are lossless (identity payloads are the raw tensor bytes plus a
    ~20-byte header), so its numbers are what plain Flower sends. ``options``: those of
    :meth:`Setting.build`.
    """
    return Setting(None, None, error_feedback=False).build(**options)


def qsgd(bits: int = 4, bucket: int = 512, **options: Any) -> Compressed:
    """QSGD (Alistarh et al., 2017): unbiased stochastic quantization of the uplink.

    Settings as in the paper's experiments: b-bit QSGD with bucket size 512 and the l2
    norm per bucket, Elias-coded; no error memory (the estimator is unbiased); the model
    is broadcast in full precision. The paper's H is 1 (a quantized minibatch
    gradient); in federated use the update of H local steps is quantized instead.
    Claim checked by the report: 4- and 8-bit QSGD match full-precision accuracy.
    """
    return Setting(f"qsgd(levels={_levels(bits)}, bucket={bucket})", None, error_feedback=False).build(**options)


def qsparse_uplink(ratio: float = 0.01, bits: int = 4, *, sign: bool = False, bucket: int = 128) -> str:
    """Qsparse-local-SGD's uplink operator: top-k composed with a quantizer, or SignTop_k.

    Basu et al. (Lemma 1) damp the quantizer, Q(top_k(x)) / (1 + beta), so that the
    composition is a contraction and error memory converges; the damping shrinks every
    step, and that, not the quantization, is what made this preset lag FedAvg (ablation in
    benchmarks/ACCURACY.md). Max-norm scaling on buckets of ``bucket`` values has variance
    factor beta = bucket / (4 s^2): below 1 (s = 7 levels for 4 bits and buckets of 128
    give 0.65) the composition is already a contraction, (1 - beta) k/n (see
    :meth:`qfl.compress.chain.Chain.properties`), and no damping is needed. Damping is
    kept only where the quantizer is too coarse for that.
    """
    if sign:
        return f"signtopk({ratio})"
    levels = _levels(bits)
    spec = f"qsgd(levels={levels}, norm=max, bucket={bucket}"
    if bucket / (4 * levels * levels) >= 1:
        spec += ", damped=true"
    return f"topk({ratio}) | {spec})"


def qsparse_setting(
    ratio: float = 0.01,
    bits: int = 4,
    *,
    sign: bool = False,
    bucket: int = 128,
    server_momentum: float = SPARSE_SERVER_MOMENTUM,
    downlink: str | None = SPARSE_DOWNLINK,
    downlink_initial: str | None = "grid(8)",
) -> Setting:
    """Qsparse-local-SGD (Basu et al., 2019): top-k composed with a quantizer, error memory, H local steps.

    Uplink: :func:`qsparse_uplink`, ``topk(ratio) | qsgd(levels=2^(b-1)-1, norm=max,
    bucket)``, a contraction without damping, with the client's error memory;
    ``sign=True`` uses SignTop_k instead (||top_k||_1 / k * sign). H >= 1 local steps
    between synchronisations (the paper uses H up to 8 on ResNet-50). The paper
    compresses the uplink only; to save on the broadcast too, the default downlink sends
    compressed model differences against the clients' replica with server-side error
    feedback, starting from an 8-bit replica of the initial model (``downlink=None``:
    full precision).

    Server: :class:`~qfl.strategies.momentum.FedAvgMomentum` with ``server_momentum``
    (0: plain FedAvg). Each round applies only the top 1% of every client's accumulated
    update; the rest waits in error memory, which delays progress. Server momentum (Hsu
    et al., 2019) carries the applied directions across rounds and makes up for much of
    that delay; 0.8 oscillated in the ablation, 0.5 did not (benchmarks/ACCURACY.md).
    """
    return Setting(
        qsparse_uplink(ratio, bits, sign=sign, bucket=bucket),
        downlink,
        downlink_initial if downlink else None,
        server_momentum,
    )


def qsparse(ratio: float = 0.01, bits: int = 4, **options: Any) -> Compressed:
    """Qsparse-local-SGD as a strategy: :func:`qsparse_setting` built; ``options``: the
    rest of its arguments and those of :meth:`Setting.build`."""
    setting = qsparse_setting(ratio, bits, **_take(qsparse_setting, options))
    return setting.build(**options)


#: k/n of the recommended uplink per local step, per round's client (see :func:`recommended`).
#: Set by Fashion-MNIST (20 local steps, 45 rounds of 10 clients): top-1% there reached
#: FedAvg's accuracy - 1 pp with 113-131x fewer uplink bytes, top-1.33% with only 99x on
#: one seed, so no more. Everything else the evidence holds is at a bound of RATIO_BOUNDS.
STEP_BUDGET = 0.225

#: The sparsest (1%: Fashion-MNIST, Shakespeare) and densest (10%: the quickstart shape)
#: uplink the evidence covers; the rule is not extrapolated beyond them.
RATIO_BOUNDS = (0.01, 0.1)


def recommended(num_rounds: int, clients_per_round: int, local_steps: int) -> Setting:
    """The recommended setting for ``num_rounds`` rounds of ``clients_per_round`` clients
    that each take ``local_steps`` SGD steps per round (epochs x batches per epoch).

    Top-k with error memory sends each client's k largest accumulated coordinates per
    round; the rest waits in memory for a later round. Two things set how much k must
    carry. The rounds and clients that can carry what waits: a run of many client-rounds
    can afford a small k (``num_rounds * clients_per_round`` in the denominator), a
    quickstart-sized one cannot (60 client-rounds of top-1% never send most coordinates
    once). And the local work each update sums: H local steps move the model H gradients
    far, and a fixed k drops more of that (Basu et al.'s bound grows with H over the
    compression's contraction). So ``k = STEP_BUDGET * local_steps / (num_rounds *
    clients_per_round)``, within :data:`RATIO_BOUNDS`: top-1% for Fashion-MNIST (20
    steps, 45 rounds of 10) and Shakespeare (10 steps, 45 rounds of 15), with 100x+
    fewer uplink bytes to FedAvg's accuracy - 1 pp; top-10% for Flower's quickstart shape
    (an epoch of ~94 steps, 15 or 30 rounds of 4 clients). A rule with the rounds and
    clients alone gave the quickstart shape 3.75% at 30 rounds, which missed plain
    Flower's accuracy (benchmarks/ACCURACY.md).

    Uplink: top-k + 7-level max-norm QSGD on 128-value buckets (a contraction without
    damping, :func:`qsparse_uplink`). Downlink: model differences, top-2k (the
    average of several clients' top-k is denser than each) + 15-level max-norm QSGD,
    with the server's error memory (:func:`sparse_downlink`), from an 8-bit replica of
    the initial model. Server: :class:`~qfl.strategies.momentum.FedAvgMomentum` with
    momentum 0.5.

    ``clients_per_round`` is what the strategy samples (``fraction_train`` times the
    nodes, at least ``min_train_nodes``); pass the rounds the run will really train.
    """
    for name, value in (
        ("num_rounds", num_rounds),
        ("clients_per_round", clients_per_round),
        ("local_steps", local_steps),
    ):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    low, high = RATIO_BOUNDS
    ratio = min(high, max(low, STEP_BUDGET * int(local_steps) / (int(num_rounds) * int(clients_per_round))))
    ratio = float(f"{ratio:.3g}")  # a spec a user can read back
    return qsparse_setting(ratio, 4, downlink=sparse_downlink(2 * ratio))


#: :func:`recommended` at its sparsest, top-1% (Fashion-MNIST's and Shakespeare's setting
#: in benchmarks/ACCURACY.md).
RECOMMENDED = recommended(1000, 1, 1)


def double_quant_setting(
    model_bits: int = 8,
    grad_bits: int = 4,
    *,
    bucket: int | None = None,
    budget: float | None = None,
    momentum: float | None = None,
) -> Setting:
    """AsyLPG's double quantization (Yu, Wu, Huang, 2019).

    Downlink: the model itself on a b_x-bit grid, ``model | grid(b_x)`` (stateless, the
    same payload for every client); uplink: the update on a b-bit grid, ``grid(b)``
    (unbiased, scale ||x||_inf / (2^(b-1) - 1), no error memory). The server adds the
    decoded update to its full-precision model, as AsyLPG's master does. The paper uses
    variance-reduced (SVRG) gradients and H = 1; here the update of H local steps is
    quantized. Claim checked by the report: 6-19x fewer bits with no accuracy loss.

    ``budget`` makes it Sparse-AsyLPG: ``bernoulli(budget) | grid(b)``, coordinate i kept
    with probability p_i = min(1, lambda |x_i|), expected count budget * n, rescaled by
    1/p_i (Wangni et al.'s variance-optimal choice), then quantized. ``momentum``: server
    momentum (FedAvgM), the accelerated variant.
    """
    uplink = f"grid({grad_bits}" + (f", bucket={bucket})" if bucket else ")")
    if budget is not None:
        uplink = f"bernoulli(budget={budget}) | {uplink}"
    return Setting(uplink, f"model | grid({model_bits})", None, momentum or 0.0, error_feedback=False)


def double_quant(model_bits: int = 8, grad_bits: int = 4, **options: Any) -> Compressed:
    """Double quantization, synchronous form: :func:`double_quant_setting` built;
    ``options``: the rest of its arguments and those of :meth:`Setting.build`."""
    setting = double_quant_setting(model_bits, grad_bits, **_take(double_quant_setting, options))
    return setting.build(**options)


def sparse_double_quant(budget: float = 0.05, model_bits: int = 8, grad_bits: int = 4, **options: Any) -> Compressed:
    """Sparse-AsyLPG: unbiased magnitude-proportional sparsification, then the b-bit grid
    (``budget`` of :func:`double_quant_setting`); downlink as in :func:`double_quant`."""
    setting = double_quant_setting(model_bits, grad_bits, budget=budget, **_take(double_quant_setting, options))
    return setting.build(**options)


def acc_double_quant(momentum: float = 0.5, model_bits: int = 8, grad_bits: int = 4, **options: Any) -> Compressed:
    """Accelerated AsyLPG: double quantization with momentum, here server momentum (FedAvgM).

    The paper accelerates with a momentum (Katyusha-style) sequence on the master; in
    Flower terms that is the server optimiser, so the inner strategy is FedAvgM.
    """
    setting = double_quant_setting(model_bits, grad_bits, momentum=momentum, **_take(double_quant_setting, options))
    return setting.build(**options)


def qesgd(levels: int = 15, bucket: int = 512, **options: Any) -> QuantizedEpochSGD:
    """Quantized Epoch-SGD (reconstruction, see :class:`~qfl.strategies.epoch.QuantizedEpochSGD`);
    ``options``: the rest of its arguments and FedAvg's keyword arguments."""
    own = _take(QuantizedEpochSGD.__init__, options)
    return QuantizedEpochSGD(FedAvg(**options), levels=levels, bucket=bucket, **own)


def ef_signsgd(*, downlink: str | None = None, **options: Any) -> Compressed:
    """EF-SignSGD (Karimireddy et al., 2019): scaled sign ||x||_1/d * sign(x) with error memory.

    One bit per coordinate plus a scale per tensor; biased, so the client's error
    feedback is what makes it converge. Extra baseline, not one of the four papers.
    ``options``: those of :meth:`Setting.build`.
    """
    return Setting("sign", downlink).build(**options)


#: Scheduling of the asynchronous presets (arguments of :class:`AsyncCompressed`).
ASYNC_SCHEDULE: dict[str, Any] = {"concurrency": 4, "buffer_size": 2, "max_staleness": 8, "staleness_exponent": 0.5}


def asynchronous(setting: Setting, **schedule: Any) -> AsyncCompressed:
    """``setting``'s compression applied asynchronously: each update on arrival (buffered
    by ``buffer_size``), down-weighted by staleness, rejected when more than
    ``max_staleness`` versions old; the server optimiser is AsyncCompressed's own.
    ``schedule``: arguments of :class:`AsyncCompressed` (``seed``, ``min_elements``, ...)
    over :data:`ASYNC_SCHEDULE`."""
    return AsyncCompressed(**{**ASYNC_SCHEDULE, **schedule}, **setting.compression())


def qsparse_async(**options: Any) -> AsyncCompressed:
    """Asynchronous Qsparse-local-SGD (Basu et al., Sec. 4): workers synchronise when they are
    done with their H local steps; the master applies each compressed update on arrival
    (see :func:`asynchronous`). ``options``: those of :func:`asynchronous` and of
    :func:`qsparse_setting`."""
    setting = qsparse_setting(**_take(qsparse_setting, options))
    return asynchronous(setting, **options)


def double_quant_async(**options: Any) -> AsyncCompressed:
    """AsyLPG proper: asynchronous double quantization. Each worker reads the b_x-bit model,
    computes, and sends its b-bit update; the master applies it on arrival if its delay is
    within the bound (the paper's tau), down-weighted by staleness. ``options``: those of
    :func:`asynchronous` and of :func:`double_quant_setting`."""
    setting = double_quant_setting(**_take(double_quant_setting, options))
    return asynchronous(setting, **options)


#: Asynchronous presets: name -> factory(concurrency=..., buffer_size=..., ...).
ASYNC_PRESETS: dict[str, Callable[..., AsyncCompressed]] = {
    "qsparse_async": qsparse_async,
    "qsparse_sign_async": lambda **kw: qsparse_async(sign=True, **kw),
    "double_quant_async": double_quant_async,
}

#: name -> factory(**FedAvg kwargs). ``qsgd4``/``qsgd8`` are the paper's two settings.
PRESETS: dict[str, Callable[..., Compressed]] = {
    "fedavg": fedavg,
    "qsgd4": lambda **kw: qsgd(bits=4, **kw),
    "qsgd8": lambda **kw: qsgd(bits=8, **kw),
    "qsparse": qsparse,
    "qsparse_sign": lambda **kw: qsparse(sign=True, **kw),
    "recommended": lambda *, num_rounds, clients_per_round, local_steps, **kw: recommended(
        num_rounds, clients_per_round, local_steps
    ).build(**kw),
    "double_quant": double_quant,
    "sparse_double_quant": sparse_double_quant,
    "acc_double_quant": acc_double_quant,
    "qesgd": qesgd,
    "ef_signsgd": ef_signsgd,
}


def build(name: str, *, guard: UpdateGuard | None = DEFAULT_GUARD, **kwargs: Any) -> Compressed:
    """A synchronous preset by name, with ``guard`` screening client updates; ValueError listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(PRESETS))}")
    strategy = PRESETS[name](**kwargs)
    strategy.guard = guard
    return strategy
