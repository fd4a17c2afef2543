"""``Compressed``: wrap any Flower strategy so both directions travel compressed.

Two ways in, one behaviour:

* ``Compressed(FedAvg(...), uplink=..., downlink=...)`` wraps a strategy instance, as
  Flower's differential-privacy wrappers do. Attributes it does not have are looked up
  on the inner strategy, so code written for the inner one keeps working.
* ``compressed(CustomFedAvg, uplink=..., downlink=...)`` makes a subclass of a strategy
  *class*. Use it when the class overrides ``start()`` (Flower's advanced-pytorch
  example saves checkpoints and a results file there): a wrapper's ``start()`` would
  bypass that override, a subclass keeps it and only adds qfl's hooks to
  ``configure_*``/``aggregate_*``. ``Compressed(CustomFedAvg(...))`` builds the same
  subclass from the instance. Two changed lines of user code::

      from qfl.strategies import compressed
      strategy = compressed(CustomFedAvg, uplink="topk(0.01) | qsgd(16)")(fraction_train=0.5, ...)

Composition with Flower's DP wrappers: ``Compressed(DifferentialPrivacyServerSide...(FedAvg))``
(server-side clipping sees the decoded updates), and both orders of client-side clipping
(``DifferentialPrivacyClientSide...``) with ``mods=[compression_mod, fixedclipping_mod]``.
``DifferentialPrivacyServerSide...(Compressed(...))`` would clip qfl's encoded bytes: it is
refused with a :class:`CompositionError` when the run starts.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore import log

from ..compress import Operator
from ..replica import ServerDownlink
from ..spec import MIN_ELEMENTS, Policy
from ..wire import DEFAULT_LIMITS, Limits
from .aggregate import aggregate_round
from .guard import DEFAULT_GUARD, UpdateGuard
from .server import CompositionError, MisconfigurationError, ServerProtocol
from .traffic import Traffic, TrafficLog

_SERVER_SIDE_DP = (DifferentialPrivacyServerSideFixedClipping, DifferentialPrivacyServerSideAdaptiveClipping)
_PARAMETERS = """
    uplink : str or Operator, optional
        Pipeline for client updates, e.g. ``"topk(0.01) | qsgd(levels=16)"``. None
        sends updates in full precision (losslessly).
    downlink : str or Operator, optional
        Pipeline for the model, optionally prefixed by a mode: ``"delta | qsgd(256)"``
        (stateful: compressed difference to the clients' replica, server-side error
        feedback, versioned, resync when needed), ``"anchor | qsgd(15)"`` (difference to
        an epoch's anchor) or ``"model | grid(8)"`` (stateless: the model itself
        quantized, as in AsyLPG). Without a prefix: ``model``. None sends the model
        losslessly.
    error_feedback : bool (default: True)
        Clients keep the uplink residual (error memory) and add it to the next update.
        Needed for biased compressors (top-k, sign); harmful for unbiased ones with a
        variance factor of 1 or more (a warning says so).
    min_elements : int (default: qfl.spec.MIN_ELEMENTS)
        Tensors smaller than this pass through losslessly (biases, norm layers).
    uplink_overrides, downlink_overrides : mapping of str to str or Operator, optional
        Per tensor-name (fnmatch pattern) pipelines that replace the default.
    downlink_initial : str or Operator, optional
        Delta mode: compress the first model with this (e.g. ``"grid(8)"``) to make the
        clients' first replica; error feedback sends the difference later. None: the
        first replica is the model, losslessly.
    history : int (default: 16)
        Delta mode: downlink versions kept; a client further behind gets a resync.
    seed : int (default: 0)
        Seeds server-side compression and, per round and client, client-side compression.
    limits : qfl.wire.Limits
        Decoder limits for client replies (each tensor is also bounded by its own size).
    guard : UpdateGuard or None (default: UpdateGuard())
        Drops updates whose l2 norm is out of proportion to the round's (10 x the
        median by default) or above an absolute bound. None disables it; a client-side
        DP clipping norm in the round's config is enforced either way.
"""


class Compressed(Strategy):
    """Compress the model on the downlink and the updates on the uplink of any strategy.

    The wrapper delegates sampling, configuration and aggregation to ``strategy``
    (FedAvg, FedAvgM, FedAdam, FedProx, FedTrimmedAvg, ...): it only rewrites the model
    in outgoing messages and rebuilds ordinary ArrayRecords (server model + decoded
    client delta) from incoming replies, so the inner strategy runs unchanged. Clients
    need :func:`qfl.clients.compression_mod`, first among their mods; a round whose
    replies show it missing stops the run with a :class:`MisconfigurationError`.

    Server memory: when the inner strategy's class averages linearly (FedAvg, FedAvgM,
    FedProx, FedAdam, FedYogi, FedAdagrad, :class:`FedAvgMomentum`, exactly these
    classes) the replies are summed one at a time and the inner strategy aggregates one
    reply holding their weighted mean: memory O(model) whatever the number of clients,
    O(kept) time per sparse reply, and the same model up to float rounding. Robust aggregators (Krum, MultiKrum, Bulyan,
    FedTrimmedAvg, FedMedian), DP wrappers and any other class, FedAvg subclasses
    included, need every reply at once (they compare, sort or clip them, or may
    override how they aggregate): they get every decoded reply, O(clients x model).
    See :mod:`qfl.strategies.aggregate`.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The strategy to wrap (Message API). A legacy ``flwr.server.strategy`` strategy
        is refused with a TypeError. One whose class overrides ``start()`` is not
        wrapped but adopted: the result is an instance of ``compressed(type(strategy))``
        holding the strategy's attributes, so its ``start()`` keeps running (a wrapper's
        would bypass it).
    """

    __doc__ = (__doc__ or "") + _PARAMETERS

    def __new__(cls, strategy: Strategy | None = None, **settings: Any) -> Any:
        """``Compressed(CustomFedAvg(...))`` with a ``start()`` override: the adopted subclass
        instance (see ``strategy`` above); anything else: a wrapper, built by ``__init__``."""
        if (
            cls is Compressed
            and isinstance(strategy, Strategy)
            and not isinstance(strategy, Compressed)
            and type(strategy).start is not Strategy.start
        ):
            return _adopt(strategy, settings)
        return super().__new__(cls)

    def __init__(
        self,
        strategy: Strategy,
        *,
        uplink: str | Operator | None = None,
        downlink: str | Operator | None = None,
        error_feedback: bool = True,
        min_elements: int = MIN_ELEMENTS,
        uplink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_overrides: Mapping[str, str | Operator] | None = None,
        downlink_initial: str | Operator | None = None,
        history: int = 16,
        seed: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        guard: UpdateGuard | None = DEFAULT_GUARD,
    ) -> None:
        check_strategy(strategy)
        self.strategy = strategy
        self.protocol = ServerProtocol(
            uplink=uplink,
            downlink=downlink,
            error_feedback=error_feedback,
            min_elements=min_elements,
            uplink_overrides=uplink_overrides,
            downlink_overrides=downlink_overrides,
            downlink_initial=downlink_initial,
            history=history,
            seed=seed,
            limits=limits,
            guard=guard,
        )
        self.protocol.weight_key = _weight_key(strategy)

    def __getattr__(self, name: str) -> Any:
        """Attributes Compressed does not have come from the inner strategy (user methods,
        FedAvg's fractions, ...). Only called when ordinary lookup fails."""
        if name.startswith("__") or name in ("strategy", "protocol"):
            raise AttributeError(name)  # copy/pickle probing, or an instance not yet initialised
        inner = self.__dict__.get("strategy")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    def __repr__(self) -> str:
        return f"Compressed({self.strategy!r})"

    # What tests and reports read: the protocol's state.
    downlink: ServerDownlink = property(lambda self: self.protocol.downlink)  # type: ignore[assignment]
    uplink: Policy = property(lambda self: self.protocol.uplink)  # type: ignore[assignment]
    traffic: TrafficLog = property(lambda self: self.protocol.traffic)  # type: ignore[assignment]
    error_feedback: bool = property(lambda self: self.protocol.error_feedback)  # type: ignore[assignment]
    guard = property(lambda self: self.protocol.guard, lambda self, g: setattr(self.protocol, "guard", g))

    def summary(self) -> None:
        """Log the compression settings, then the inner strategy's summary."""
        _refuse_server_side_dp(self, sys._getframe(1))
        _summary(self.protocol)
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure, then compress the model in its messages."""
        _refuse_server_side_dp(self, sys._getframe(1))
        return self.protocol.configure(
            "train", server_round, arrays, self.strategy.configure_train(server_round, arrays, config, grid)
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation messages carry the model too: compressed the same way."""
        return self.protocol.configure(
            "evaluate", server_round, arrays, self.strategy.configure_evaluate(server_round, arrays, config, grid)
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check every reply, then aggregate the ones that pass with the inner strategy
        (summed one reply at a time when it averages linearly: see :mod:`qfl.strategies.aggregate`)."""
        _refuse_server_side_dp(self, sys._getframe(1))
        try:
            return aggregate_round(
                self.protocol, self.strategy, type(self.strategy), self.strategy.aggregate_train, server_round, replies
            )
        finally:
            self.protocol.end_train_round()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record what clients report about their replica, then let the inner strategy aggregate."""
        replies = list(replies)
        if not replies and (server_round, "evaluate") not in self.traffic.rounds:
            return self.strategy.aggregate_evaluate(server_round, replies)  # no evaluation this round
        metrics = self.strategy.aggregate_evaluate(server_round, self.protocol.evaluate_replies(server_round, replies))
        return self.protocol.finish_train(None, metrics, self.traffic.at(server_round, "evaluate"))[1]


# What help() and IDEs show: __init__'s explicit parameters, not __new__'s pass-through.
Compressed.__signature__ = inspect.signature(Compressed.__init__).replace(
    parameters=list(inspect.signature(Compressed.__init__).parameters.values())[1:]
)

S = TypeVar("S", bound=Strategy)
#: The compression settings: Compressed's keyword arguments (its signature without ``strategy``).
_SETTINGS = tuple(inspect.signature(Compressed).parameters.values())[1:]


def compression_settings(caller: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every compression setting, ``settings`` over Compressed's defaults; unknown names refused."""
    unknown = set(settings) - {p.name for p in _SETTINGS}
    if unknown:
        raise TypeError(f"{caller} got unknown settings {sorted(unknown)}; it takes {[p.name for p in _SETTINGS]}")
    return {p.name: settings.get(p.name, p.default) for p in _SETTINGS}


def compressed(cls: type[S], **settings: Any) -> type[S]:
    """A subclass of the strategy class ``cls`` whose messages travel compressed.

    Its instances are built with ``cls``'s own arguments and behave like ``cls`` in
    every way (``start()`` overrides, extra methods, attributes) except that
    ``configure_*`` compress the model in the messages ``cls`` makes and
    ``aggregate_*`` decode and check the replies before ``cls`` aggregates them. The
    compression settings (``**settings``) are the keyword arguments of
    :class:`Compressed`; they are checked here, once.
    """
    if not isinstance(cls, type):
        raise TypeError(f"compressed() takes a strategy class, got {cls!r}; to wrap an instance use Compressed(...)")
    check_strategy(cls)
    settings = compression_settings("compressed()", settings)
    ServerProtocol(**settings)  # fail now, not when the class is instantiated

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, *args, **kwargs)
        self.protocol = ServerProtocol(**settings)
        self.protocol.weight_key = _weight_key(self)

    def summary(self) -> None:
        _summary(self.protocol)
        cls.summary(self)

    def configure_train(self, server_round, arrays, config, grid):
        return self.protocol.configure(
            "train", server_round, arrays, cls.configure_train(self, server_round, arrays, config, grid)
        )

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.protocol.configure(
            "evaluate", server_round, arrays, cls.configure_evaluate(self, server_round, arrays, config, grid)
        )

    def aggregate_train(self, server_round, replies):
        inner = cls.aggregate_train.__get__(self)
        return aggregate_round(self.protocol, self, cls, inner, server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        if not replies and (server_round, "evaluate") not in self.protocol.traffic.rounds:
            return cls.aggregate_evaluate(self, server_round, replies)
        metrics = cls.aggregate_evaluate(self, server_round, self.protocol.evaluate_replies(server_round, replies))
        return self.protocol.finish_train(None, metrics, self.protocol.traffic.at(server_round, "evaluate"))[1]

    hooks = {
        "__init__": __init__,
        "summary": summary,
        "configure_train": configure_train,
        "configure_evaluate": configure_evaluate,
        "aggregate_train": aggregate_train,
        "aggregate_evaluate": aggregate_evaluate,
    }
    for name, fn in hooks.items():
        fn.__qualname__ = f"Compressed{cls.__name__}.{name}"
        fn.__doc__ = getattr(Compressed, name).__doc__
    namespace = {
        **hooks,
        "__module__": cls.__module__,
        "__doc__": f"{cls.__name__} with qfl compression.\n\n{compressed.__doc__}",
        "downlink": Compressed.downlink,
        "uplink": Compressed.uplink,
        "traffic": Compressed.traffic,
        "error_feedback": Compressed.error_feedback,
        "guard": Compressed.guard,
    }
    return type(f"Compressed{cls.__name__}", (cls,), namespace)


# What help() and IDEs show: the settings by name, as for Compressed.
compressed.__signature__ = inspect.Signature(
    [inspect.Parameter("cls", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation="type[S]"), *_SETTINGS],
    return_annotation="type[S]",
)


compressed.__doc__ = (
    (compressed.__doc__ or "") + "\n    Parameters\n    ----------\n    cls : type\n        A "
    "``flwr.serverapp.strategy.Strategy`` subclass." + _PARAMETERS
)


def _adopt(strategy: Strategy, settings: dict[str, Any]) -> Strategy:
    """An instance of ``compressed(type(strategy), **settings)`` carrying ``strategy``'s attributes."""
    sub = compressed(type(strategy), **settings)
    adopted = sub.__new__(sub)
    adopted.__dict__.update(strategy.__dict__)
    adopted.protocol = ServerProtocol(**compression_settings("Compressed()", settings))
    adopted.protocol.weight_key = _weight_key(adopted)
    return adopted


def check_strategy(strategy: object) -> None:
    """Refuse what Compressed cannot wrap, saying why (TypeError)."""
    kind = strategy if isinstance(strategy, type) else type(strategy)
    legacy = _legacy_strategy()
    if legacy is not None and issubclass(kind, legacy):
        raise TypeError(
            f"{kind.__name__} is a legacy flwr.server.strategy strategy; qfl wraps the Message API "
            "strategies of flwr.serverapp.strategy (e.g. flwr.serverapp.strategy.FedAvg) run by a "
            "ServerApp's @app.main(). Legacy workflows (SecAggPlusWorkflow, DefaultWorkflow) cannot "
            "carry qfl's payloads."
        )
    if not issubclass(kind, Strategy):
        raise TypeError(f"Compressed wraps a flwr.serverapp.strategy.Strategy, got {kind.__name__}")


def _legacy_strategy() -> type | None:
    try:
        from flwr.server.strategy import Strategy as LegacyStrategy
    except ImportError:  # a Flower without the legacy API cannot be handed a legacy strategy
        return None
    return LegacyStrategy


def _weight_key(strategy: object) -> str | None:
    key = getattr(strategy, "weighted_by_key", None)
    return key if isinstance(key, str) else None


def _summary(protocol: ServerProtocol) -> None:
    log(INFO, "\t├──> qfl compression:")
    log(INFO, "\t│\t├── uplink: %s (error feedback: %s)", protocol.uplink.op, protocol.error_feedback)
    log(INFO, "\t│\t├── downlink: %s | %s", protocol.downlink.mode, protocol.downlink.policy.op)
    log(INFO, "\t│\t├── update guard: %s", protocol.guard)
    log(INFO, "\t│\t└── tensors below %d elements pass through", protocol.uplink.min_elements)


def _refuse_server_side_dp(strategy: Compressed, caller) -> None:
    """Server-side DP clipping must see decoded updates: it cannot wrap Compressed.

    Flower's ``DifferentialPrivacyServerSide*`` wrappers clip ``reply - current model``
    for every ArrayRecord of every reply; wrapped around Compressed they would be handed
    qfl's encoded blobs. The wrapper calls our methods from its own, so its frame names it.
    """
    outer = caller.f_locals.get("self") if caller is not None else None
    if isinstance(outer, _SERVER_SIDE_DP) and getattr(outer, "strategy", None) is strategy:
        raise CompositionError(
            f"{type(outer).__name__}(Compressed(...)) would clip qfl's encoded bytes, not the clients' updates. "
            f"Wrap the other way round: Compressed({type(outer).__name__}(FedAvg(...), ...), uplink=..., "
            "downlink=...), so the DP wrapper clips the decoded updates and adds noise to their aggregate."
        )


__all__ = [
    "CompositionError",
    "Compressed",
    "MisconfigurationError",
    "Traffic",
    "TrafficLog",
    "UpdateGuard",
    "check_strategy",
    "compressed",
]
