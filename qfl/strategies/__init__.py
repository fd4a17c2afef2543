"""Server side: a wrapper that compresses any Flower strategy, and paper presets."""

from .compressed import Compressed, Traffic, TrafficLog

__all__ = ["Compressed", "Traffic", "TrafficLog"]
