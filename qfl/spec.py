"""Spec strings: one line of text names a compression pipeline.

A spec fits where Flower carries configuration (``[tool.flwr.app.config]``,
``--run-config``, a message's ConfigRecord)::

    topk(0.01) | qsgd(levels=16, bucket=512)
    delta | qsgd(levels=256)          # downlink: mode, then the pipeline

``parse(spec)`` builds the operator; ``str(op)`` gives back a spec that parses to an
equal operator. A :class:`Policy` decides, tensor by tensor, which operator applies
(small and non-float tensors pass through losslessly; per-name overrides win).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .compress import IDENTITY, REGISTRY, Chain, Operator, signtopk
from .compress.base import FLOAT_DTYPES

#: Names that are not operators but expand to chains.
_ALIASES = {"signtopk": signtopk}

_STAGE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)
_INT = re.compile(r"^[+-]?\d[\d_]*$")
_FLOAT = re.compile(r"^[+-]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][+-]?\d+)?$")
_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

#: Downlink modes a downlink spec may start with.
DOWNLINK_MODES = ("model", "delta", "anchor")


def _known() -> str:
    return ", ".join(sorted([*REGISTRY, *_ALIASES]))


def _literal(token: str, where: str) -> Any:
    t = token.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if _INT.match(t):
        return int(t.replace("_", ""))
    if _FLOAT.match(t):
        return float(t.replace("_", ""))
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    if _WORD.match(t):
        return t
    raise ValueError(f"bad value {token.strip()!r} in {where!r}: expected a number, true/false, none or a word")


def _stage(text: str) -> Operator:
    m = _STAGE.match(text)
    if not m:
        raise ValueError(
            f"bad spec token {text.strip()!r}: expected name or name(arg, key=value, ...); known operators: {_known()}"
        )
    name, argtext = m.group(1), m.group(2)
    if name not in REGISTRY and name not in _ALIASES:
        raise ValueError(f"unknown operator {name!r} in {text.strip()!r}; known operators: {_known()}")
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if argtext is not None and argtext.strip():
        for raw in argtext.split(","):
            if "=" in raw:
                key, _, val = raw.partition("=")
                key = key.strip()
                if not _WORD.match(key):
                    raise ValueError(f"bad parameter name {key!r} in {text.strip()!r}")
                if key in kwargs:
                    raise ValueError(f"parameter {key!r} given twice in {text.strip()!r}")
                kwargs[key] = _literal(val, text.strip())
            else:
                if kwargs:
                    raise ValueError(f"positional value {raw.strip()!r} after a keyword in {text.strip()!r}")
                args.append(_literal(raw, text.strip()))
    if name in _ALIASES:
        factory = _ALIASES[name]
        try:
            return factory(*args, **kwargs)
        except TypeError as exc:
            raise ValueError(f"bad parameters in {text.strip()!r}: {exc}") from None
    cls = REGISTRY[name]
    if len(args) > len(cls.positional):
        raise ValueError(
            f"{name} takes at most {len(cls.positional)} positional value(s) "
            f"({', '.join(cls.positional) or 'none'}), got {len(args)} in {text.strip()!r}"
        )
    for key, val in zip(cls.positional, args):
        if key in kwargs:
            raise ValueError(f"parameter {key!r} given twice in {text.strip()!r}")
        kwargs[key] = val
    params = [f.name for f in dataclasses.fields(cls)]
    for key in kwargs:
        if key not in params:
            raise ValueError(f"unknown parameter {key!r} in {text.strip()!r}; {name} takes: {', '.join(params)}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad parameters in {text.strip()!r}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{exc} (in {text.strip()!r})") from None


def parse(spec: str | Operator | None) -> Operator:
    """Build the operator a spec string names; an Operator passes through, None is identity.

    Raises ValueError naming the offending token (and the known operators).
    """
    if spec is None:
        return IDENTITY
    if isinstance(spec, Operator):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a spec must be a string or an operator, got {type(spec).__name__}")
    if not spec.strip():
        return IDENTITY
    ops: list[Operator] = []
    for text in spec.split("|"):
        if not text.strip():
            raise ValueError(f"empty stage in spec {spec!r}")
        op = _stage(text)
        ops.extend(op.ops if isinstance(op, Chain) else [op])
    try:
        return Chain.of(ops)
    except ValueError as exc:
        raise ValueError(f"{exc} (in spec {spec!r})") from None


def parse_downlink(spec: str | Operator | None, default_mode: str = "model") -> tuple[str, Operator]:
    """Split a downlink spec into (mode, operator): ``"delta | qsgd(256)"`` -> ("delta", qsgd).

    ``model`` sends the (quantized) model itself, stateless; ``delta`` sends the
    compressed difference to the replica clients hold, with server-side error feedback;
    ``anchor`` sends the compressed difference to an epoch anchor (Quantized Epoch-SGD).
    """
    if isinstance(spec, str):
        head, _, rest = spec.partition("|")
        if head.strip() in DOWNLINK_MODES:
            return head.strip(), parse(rest)
    if default_mode not in DOWNLINK_MODES:
        raise ValueError(f"downlink mode must be one of {DOWNLINK_MODES}, got {default_mode!r}")
    return default_mode, parse(spec)


#: Default element count below which a tensor travels losslessly (see :class:`Policy`).
MIN_ELEMENTS = 1024


@dataclass(frozen=True)
class Policy:
    """Which operator compresses which tensor of a model.

    Parameters
    ----------
    op : Operator
        The default pipeline.
    min_elements : int
        Tensors with fewer elements pass through losslessly: biases and norm layers are
        a rounding error of the bytes but sensitive to noise.
    overrides : tuple of (pattern, Operator)
        ``fnmatch`` patterns on tensor names, first match wins (and ignores
        ``min_elements``). Integer and boolean tensors always pass through.
    """

    op: Operator = IDENTITY
    min_elements: int = MIN_ELEMENTS
    overrides: tuple[tuple[str, Operator], ...] = field(default_factory=tuple)

    @staticmethod
    def build(
        spec: str | Operator | None,
        min_elements: int = MIN_ELEMENTS,
        overrides: Mapping[str, str | Operator] | None = None,
    ) -> Policy:
        """Policy from spec strings (or operators)."""
        if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 0:
            raise ValueError(f"min_elements must be a non-negative integer, got {min_elements!r}")
        ovr = tuple((str(k), parse(v)) for k, v in (overrides or {}).items())
        return Policy(parse(spec), min_elements, ovr)

    def operator_for(self, name: str, tensor: torch.Tensor) -> Operator:
        """The operator for one named tensor."""
        if tensor.dtype not in FLOAT_DTYPES:
            return IDENTITY
        for pattern, op in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return op
        if tensor.numel() < self.min_elements:
            return IDENTITY
        return self.op

    def to_config(self, prefix: str) -> dict[str, Any]:
        """Flat ConfigRecord entries (str/int/list[str]) that :meth:`from_config` inverts."""
        return {
            f"{prefix}.spec": str(self.op),
            f"{prefix}.min-elements": self.min_elements,
            f"{prefix}.override-patterns": [p for p, _ in self.overrides],
            f"{prefix}.override-specs": [str(o) for _, o in self.overrides],
        }

    @staticmethod
    def from_config(config: Mapping[str, Any], prefix: str) -> Policy:
        """Inverse of :meth:`to_config`; ValueError naming the key that is wrong."""
        try:
            spec = config[f"{prefix}.spec"]
            min_elements = config[f"{prefix}.min-elements"]
        except KeyError as exc:
            raise ValueError(f"missing config key {exc.args[0]!r}") from None
        patterns = list(config.get(f"{prefix}.override-patterns", []) or [])
        specs = list(config.get(f"{prefix}.override-specs", []) or [])
        if len(patterns) != len(specs):
            raise ValueError(f"{prefix}: {len(patterns)} override patterns but {len(specs)} override specs")
        return Policy.build(spec, int(min_elements), dict(zip(patterns, specs)))
