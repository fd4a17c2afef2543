"""qfl: communication-efficient federated learning on Flower.

Layers, each importing only those above it: ``qfl.compress`` (math on one tensor),
``qfl.wire`` (bytes), state helpers here (spec strings, error memory, replicas),
``qfl.strategies`` (server), ``qfl.clients`` (client mod), ``qfl.simulations``.
"""

from .memory import compress_with_memory
from .spec import Policy, parse, parse_downlink

__version__ = "0.1.0"

__all__ = ["Policy", "__version__", "compress_with_memory", "parse", "parse_downlink"]
