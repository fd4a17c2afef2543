"""Server side: a wrapper that compresses any Flower strategy, and paper presets."""

from .asynchronous import AsyncCompressed, AsyncStats
from .compressed import Compressed, Traffic, TrafficLog
from .momentum import FedAvgMomentum

__all__ = ["AsyncCompressed", "AsyncStats", "Compressed", "FedAvgMomentum", "Traffic", "TrafficLog"]
