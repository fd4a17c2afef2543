"""Operator protocol: immutable, composable, self-describing compressors.

An operator is a frozen dataclass whose fields are its parameters. That gives value
equality (``parse(str(op)) == op``), hashing, and a config that round-trips
(``get_config`` / ``from_config``, as in numcodecs) for free — which is what lets the
wire format name the operator in a header and the spec string name it in a config.
"""

from __future__ import annotations

import dataclasses
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from . import runtime
from ._raw_kernels import nonfinite_count
from .payload import Levels, Part, Payload, Raw, Signs, Sparse

#: Every concrete operator, by spec name.
REGISTRY: dict[str, type[Operator]] = {}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class Properties:
    """Guarantees of an operator C on a tensor of ``n`` elements.

    unbiased
        E[C(x)] = x.
    variance
        For unbiased C: E||C(x) - x||^2 <= variance * ||x||^2.
    contraction
        For biased C: E||C(x) - x||^2 <= (1 - contraction) * ||x||^2 (0 < contraction <= 1),
        the condition under which error feedback converges (Stich et al.; Basu et al.).
    """

    unbiased: bool
    variance: float | None = None
    contraction: float | None = None


def draw_seed(generator: torch.Generator | None) -> np.uint64:
    """One 62-bit seed from a torch generator (or torch's global one).

    Operators take randomness in this single draw, so ``torch.manual_seed`` or an
    explicit generator makes compression reproducible, and the kernels stay free of
    shared generator state.
    """
    return np.uint64(torch.randint(0, 2**62, (1,), generator=generator).item())


def as_numpy_f32(x: torch.Tensor) -> np.ndarray:
    """Flat contiguous float32 numpy view (a copy only when the dtype differs)."""
    return x.to(torch.float32).contiguous().numpy()


def check_finite(x: torch.Tensor) -> None:
    """Refuse NaN/Inf: they would poison the scales and, via error memory, every round after."""
    if x.dtype == torch.float32:
        bad = nonfinite_count(x.contiguous().numpy()) > 0
    else:
        bad = not bool(torch.isfinite(x).all())
    if bad:
        raise_nonfinite(x)


def raise_nonfinite(x: torch.Tensor) -> None:
    """The error for a tensor holding NaN or Inf (counted here: this is the slow path)."""
    nan = int(torch.isnan(x).sum())
    inf = int(torch.isinf(x).sum())
    if not nan and not inf:  # finite in a wider dtype, but not as float32
        raise ValueError(f"cannot compress a tensor whose values (up to {float(x.abs().max()):.6g}) overflow float32")
    raise ValueError(
        f"cannot compress a tensor with non-finite values: {nan} NaN and {inf} Inf among {x.numel()} elements"
    )


def numpy_ok(t: torch.Tensor) -> bool:
    """Whether ``t`` can be worked on as a numpy view: on the CPU, a dtype numpy has (not
    bfloat16), and no autograd history to keep."""
    return t.device.type == "cpu" and t.dtype != torch.bfloat16 and not t.requires_grad


#: PyTorch's grain (``at::internal::GRAIN_SIZE``): its elementwise kernels run on one
#: thread below this many elements.
TORCH_GRAIN = 1 << 15


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` (same dtype and shape), computed where it cannot stall (:func:`_in_numpy`)."""
    return _elementwise(operator.add, a, b)


def subtract(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a - b`` (same dtype and shape), computed where it cannot stall (:func:`_in_numpy`)."""
    return _elementwise(operator.sub, a, b)


def add_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a += b`` in place, returning ``a`` (writable; same dtype and shape): :func:`add`'s
    arithmetic without a fresh result, whose pages a large model pays to fault in."""
    return _elementwise_into(np.add, torch.Tensor.add_, a, b)


def subtract_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a -= b`` in place, returning ``a``: :func:`subtract`'s arithmetic (see :func:`add_`)."""
    return _elementwise_into(np.subtract, torch.Tensor.sub_, a, b)


def _elementwise_into(
    op: np.ufunc, in_torch: Callable[[torch.Tensor, torch.Tensor], Any], a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """``op`` into ``a``: numpy's ufunc where :func:`_in_numpy` says, else torch's in-place method."""
    if _in_numpy(a, b):
        out = a.detach().numpy()
        op(out, b.detach().numpy(), out=out)
    else:
        in_torch(a, b)
    return a


def _elementwise(op: Callable[[Any, Any], Any], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if _in_numpy(a, b):
        return torch.from_numpy(np.asarray(op(a.detach().numpy(), b.detach().numpy())))
    return op(a, b)


def _in_numpy(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether an elementwise op on ``a`` and ``b`` runs in numpy, in the calling thread,
    rather than on PyTorch's threads: always for tensors below PyTorch's grain (no
    parallel region to gain, less overhead), and whenever the cores are saturated
    (:func:`.runtime.saturated`). Then each of PyTorch's parallel regions waits for
    parked threads: with two other busy processes on the 2-core machine, a client's
    error-memory subtraction over a ResNet-18(width=32)'s 20 larger tensors took 68 ms
    on PyTorch's threads and 1.3 ms in numpy (1.3 vs 0.6 ms when quiet). Same IEEE
    operation either way, so the same result."""
    return (
        a.dtype == b.dtype
        and numpy_ok(a)
        and numpy_ok(b)
        and (a.numel() < TORCH_GRAIN or torch.get_num_threads() < 2 or runtime.saturated())
    )


def empty_tensor(n: int, dtype: type = np.float32) -> torch.Tensor:
    """An uninitialised tensor of n elements of numpy ``dtype`` for PyTorch to copy into,
    numpy-allocated: numpy asks the kernel for huge pages, which makes a fresh 40 MB buffer
    ~4x cheaper to fault in than a torch allocation. PyTorch's copies run on its threads:
    faulted in first when it has several (:func:`.runtime.fault_in`)."""
    return torch.from_numpy(runtime.empty(n, dtype, torch.get_num_threads() > 1))


def _overflow(part: Part) -> str | None:
    """What in a compressed body is not finite (None if all is): the operators compute
    in float32, so a norm, a rescaled value or a float64 input can overflow it."""
    if isinstance(part, Levels):
        return None if bool(torch.isfinite(part.scales).all()) else "a bucket scale (norm)"
    if isinstance(part, Signs):
        return None if np.isfinite(part.scale) else "the sign scale (mean magnitude)"
    if isinstance(part, Sparse):
        if isinstance(part.values, Raw):
            return None if bool(torch.isfinite(part.values.values.to(torch.float32)).all()) else "a kept value"
        return _overflow(part.values)
    return None  # top-level raw values: lossless (identity) or a cast that checks itself


def _check_representable(op: Operator, body: Part, x: torch.Tensor) -> None:
    """Refuse (ValueError) rather than send Inf/NaN that would poison the receiver and,
    through error memory, every later round."""
    what = _overflow(body)
    if what is not None:
        big = float(x.abs().max()) if x.numel() else 0.0
        raise ValueError(
            f"{op} cannot represent this tensor: {what} overflows float32 "
            f"(largest magnitude {big:.6g}, {x.numel()} elements)"
        )


#: Float dtypes narrower than the float32 the operators compute in.
_NARROW = (torch.float16, torch.bfloat16)


def _check_fits(op: Operator, body: Part, x: torch.Tensor) -> None:
    """Refuse (ValueError) a payload whose reconstruction overflows the tensor's own dtype.

    Every input value fits, but a rescaled value (x_i / p_i), a level rounded up, or a
    norm scale can land beyond float16's 65504 (or bfloat16's top binade), and the
    receiver would cast it to Inf. The bounds are data-dependent, so rebuild and look:
    one extra decompression, paid by the narrow dtypes only.
    """
    y = op._decompress(body, x.numel())
    if y.numel() and not bool(torch.isfinite(y.to(x.dtype)).all()):
        big = float(y.abs().max())
        raise ValueError(
            f"{op} cannot represent this tensor in {str(x.dtype).removeprefix('torch.')}: "
            f"a reconstructed value ({big:.6g}) overflows it (largest input magnitude "
            f"{float(x.abs().max()):.6g}, {x.numel()} elements)"
        )


class Operator(ABC):
    """Base class of every compression operator.

    Subclasses are frozen dataclasses. ``compress`` accepts a tensor of any shape, float
    dtype and device, and ``decompress`` returns a tensor of the original shape, dtype
    and device. Non-float tensors (integer, boolean) pass through losslessly: their
    payload names :class:`Identity` as its operator.
    """

    #: Spec name, e.g. ``"qsgd"``.
    name: ClassVar[str]
    #: Parameters that may be given positionally in a spec string, in order.
    positional: ClassVar[tuple[str, ...]] = ()
    #: True when ``_compress`` rejects NaN/Inf in float32 input itself (with
    #: :func:`raise_nonfinite`), as a by-product of a pass it makes anyway; other
    #: operators and dtypes get a separate check first.
    checks_finite: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name != "chain":
            REGISTRY[cls.name] = cls

    # ------------------------------------------------------------------ public API
    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Payload:
        """Compress ``x``; randomness is drawn from ``generator`` (torch's global one if None)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self} expects a torch.Tensor, got {type(x).__name__}")
        shape = tuple(x.shape)
        flat = x.detach().reshape(-1).to("cpu")
        if flat.data_ptr() % flat.element_size():
            # A view into a received blob (raw values are decoded in place, at any byte
            # offset): the kernels read their arrays as aligned, so they get a copy.
            flat = flat.clone()
        if x.dtype not in FLOAT_DTYPES:
            return Payload(IDENTITY, shape, x.dtype, Raw(flat.clone()), x.device)
        if not (self.checks_finite and flat.dtype == torch.float32):
            check_finite(flat)
        body = self._compress(flat, generator)
        _check_representable(self, body, flat)
        if x.dtype in _NARROW:
            _check_fits(self, body, flat)
        return Payload(self, shape, x.dtype, body, x.device)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """Rebuild the tensor a payload describes (always with the payload's own operator)."""
        op = payload.op
        out = op._decompress(payload.body, payload.numel)
        # Each step only when it changes something: a server decodes a model's ~100 small
        # tensors per reply, and a no-op .to() or .reshape() costs ~1.5 us of dispatch.
        if out.dtype != payload.dtype:
            out = out.to(payload.dtype)
        if out.shape != payload.shape:
            out = out.reshape(payload.shape)
        if not (out.is_cpu and payload.device.type == "cpu"):
            out = out.to(payload.device)
        return out

    def decompress_sparse(self, payload: Payload) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(positions, values)`` of a sparse payload, or None for a dense one.

        A server sums and checks a sparse update at its kept positions only, in O(kept)
        rather than O(tensor): ``decompress`` would write every zero of an 11M-element
        tensor to add 1% of it. Positions are int64, strictly increasing and in range
        (checked: they may come from an untrusted peer); values are in the payload's
        dtype, so ``decompress()`` equals them scattered into zeros.
        """
        return None

    @abstractmethod
    def properties(self, n: int) -> Properties:
        """Unbiasedness and variance/contraction bound for an ``n``-element tensor."""

    # ------------------------------------------------------------- configuration
    def get_config(self) -> dict[str, Any]:
        """``{"id": name, **parameters}``; ``from_config`` inverts it."""
        return {"id": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    @staticmethod
    def from_config(config: dict[str, Any]) -> Operator:
        """Build an operator (or chain) from ``get_config`` output; ValueError if invalid."""
        config = dict(config)
        name = config.pop("id", None)
        if name == "chain":
            from .chain import Chain

            return Chain.of([Operator.from_config(c) for c in config.get("ops", [])])
        if name not in REGISTRY:
            raise ValueError(f"unknown operator {name!r}; known operators: {', '.join(sorted(REGISTRY))}")
        try:
            return REGISTRY[name](**config)
        except TypeError as exc:
            raise ValueError(f"bad parameters for {name}: {exc}") from None

    def __str__(self) -> str:
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                args.append(f"{f.name}={_format(value)}")
        return f"{self.name}({', '.join(args)})" if args else self.name

    # --------------------------------------------------------------- subclass API
    @abstractmethod
    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        """Compress a flat, finite, CPU tensor in its original float dtype."""

    @abstractmethod
    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        """Rebuild ``n`` values (float32, or the raw dtype for lossless parts)."""


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


class ValueOperator(Operator):
    """An operator on values (quantizer, cast, sign, identity): may follow a sparsifier."""


@dataclass(frozen=True)
class Identity(ValueOperator):
    """No compression: the values as they are. Unbiased, zero variance, lossless.

    The payload holds the tensor itself (flattened, a view when it is contiguous on the
    CPU), not a copy, and ``decompress`` gives it back: a copy would be a pass over it
    that nobody needs, since no caller changes a tensor in place after compressing it
    (error memory and replicas build new tensors). A caller that does must encode first.
    """

    name: ClassVar[str] = "identity"

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> Part:
        return Raw(x)

    def _decompress(self, part: Part, n: int) -> torch.Tensor:
        assert isinstance(part, Raw)
        return part.values

    def properties(self, n: int) -> Properties:
        return Properties(unbiased=True, variance=0.0)


IDENTITY = Identity()
