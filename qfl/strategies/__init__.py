"""Server side: a wrapper that compresses any Flower strategy, and paper presets."""

from .asynchronous import AsyncCompressed, AsyncStats
from .compressed import Compressed, compressed
from .guard import DEFAULT_GUARD, UpdateGuard
from .momentum import FedAvgMomentum
from .server import CompositionError, MisconfigurationError
from .traffic import Traffic, TrafficLog

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
