"""Compile every kernel once, ahead of the first message: ``python -m qfl warm``.

numba compiles a kernel the first time it is called with new argument types and keeps
the result in the per-user cache (see :mod:`qfl.compress.runtime`). The first
compression in a fresh process then only loads machine code (~0.1 s) instead of
compiling it (15-25 s) -- but only for the kernels and argument types some earlier
process reached. This walks every operator family, each level width (int8, int16,
int32), each input dtype, the serial and the parallel variants and the wire format's
coders both ways, and the server's aggregation kernels, so that no later process
compiles anything. ``tools/setup.sh`` runs it after installing.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from numba.core.dispatcher import Dispatcher

from .compress import runtime
from .compress._kernels import count_outside
from .spec import parse
from .wire import ELIAS_BLOCK, decode, encode, warm_level_coders, warm_other_kernels

#: Every kernel a message can reach: each operator family, each level dtype (level_dtype:
#: <= 127 int8, <= 32767 int16, else int32), both norms, signs, and chains.
SPECS = (
    "identity",
    "fp16",
    "bf16",
    "qsgd(16)",
    "qsgd(255, bucket=512)",
    "qsgd(1000)",
    "qsgd(70000)",
    "qsgd(4, norm=max, bucket=7)",
    "grid(2)",
    "grid(4)",
    "grid(8)",
    "grid(16, bucket=100)",
    "sign",
    "topk(0.01)",
    "topk(0.3)",
    "topk(0.01) | qsgd(16, bucket=512)",
    "topk(0.01) | sign",
    "randk(0.01)",
    "randk(0.01) | qsgd(16)",
    "bernoulli(0.1)",
    "bernoulli(budget=0.05) | grid(4)",
)
#: Above one Elias block and one parallel chunk, so every branch of the coders is reached.
ELEMENTS = 3 * ELIAS_BLOCK + 1234


@dataclass(frozen=True)
class Report:
    """What a warm-up did: kernel specialisations compiled now, loaded from the cache."""

    compiled: int
    loaded: int
    seconds: float
    cache_dir: str


def dispatchers() -> list:
    """Every numba dispatcher of qfl's kernels (both variants of each twin)."""
    found: dict[int, object] = {}
    for name, module in list(sys.modules.items()):
        if not (name == "qfl" or name.startswith("qfl.")) or module is None:
            continue
        for value in vars(module).values():
            if isinstance(value, runtime.Twin):
                found.setdefault(id(value.parallel), value.parallel)
                found.setdefault(id(value.serial), value.serial)
            elif isinstance(value, Dispatcher):
                found.setdefault(id(value), value)
    return list(found.values())


def counts() -> tuple[int, int]:
    """(specialisations compiled, loaded from the cache) in this process so far."""
    compiled = loaded = 0
    for d in dispatchers():
        compiled += sum(d.stats.cache_misses.values())
        loaded += sum(d.stats.cache_hits.values())
    return compiled, loaded


def warm() -> Report:
    """Reach every kernel with every argument type a message can bring; see the module doc."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(ELEMENTS, generator=g) * torch.rand(ELEMENTS, generator=g) ** 4
    old = runtime.FORCE_PARALLEL
    try:
        for parallel in (False, True):
            runtime.FORCE_PARALLEL = parallel
            for spec in SPECS:
                for t in (x, x.double(), x.half()) if spec in ("qsgd(16)", "topk(0.01)") else (x,):
                    payload = parse(spec).compress(t, torch.Generator().manual_seed(1))
                    decode(encode(payload)).decompress()
            for t in (x, x.double()):  # the range check of updates and models (qfl.codec.out_of_range)
                count_outside(t.numpy(), 1.0)
            warm_level_coders()
    finally:
        runtime.FORCE_PARALLEL = old
    warm_other_kernels()
    from .strategies._kernels import warm_kernels  # the server's: imports Flower, so only here

    warm_kernels()
    compiled, loaded = counts()
    return Report(compiled, loaded, time.perf_counter() - start, str(runtime.cache_dir()))
