"""qfl: communication-efficient federated learning on Flower.

Layers, each importing only those above it: ``qfl.compress`` (math on one tensor),
``qfl.wire`` (bytes), Flower-free helpers here (spec strings, error memory, replicas,
``qfl.protocol``: the typed fields server and client exchange), ``qfl.clients`` (the
client mod, and the conversion between Flower records and tensors both sides use),
``qfl.strategies`` (server), ``qfl.simulations``.
"""

from .memory import compress_with_memory
from .spec import Policy, parse, parse_downlink

__version__ = "0.1.0"

__all__ = ["Policy", "__version__", "compress_with_memory", "parse", "parse_downlink"]
