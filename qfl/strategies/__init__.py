"""Server side: a wrapper that compresses any Flower strategy, and paper presets."""

from .asynchronous import AsyncCompressed, AsyncStats
from .compressed import Compressed, compressed
from .momentum import FedAvgMomentum
from .server import DEFAULT_GUARD, CompositionError, MisconfigurationError, Traffic, TrafficLog, UpdateGuard

__all__ = [
    "DEFAULT_GUARD",
    "AsyncCompressed",
    "AsyncStats",
    "CompositionError",
    "Compressed",
    "FedAvgMomentum",
    "MisconfigurationError",
    "Traffic",
    "TrafficLog",
    "UpdateGuard",
    "compressed",
]
