"""Server momentum that leaves normalisation statistics alone.

Sparse uplinks with error memory apply only the top k of every accumulated update per
round; the rest waits in the clients' memory, which delays progress. Server momentum
(FedAvgM, Hsu et al., 2019) carries the applied directions across rounds and makes up
for that delay (ablation in benchmarks/ACCURACY.md).

Flower's ``FedAvgM`` extrapolates every array of the model, BatchNorm's running
statistics included. A running variance that fell from 1 to 0.1 in round 1 keeps
falling by the momentum in round 2 and turns negative: the normalised activations are
NaN and the model predicts one class (observed: 10.00% test accuracy in rounds 2-3 of a
Fashion-MNIST run, recovered by round 4). Statistics are estimates, not parameters
being optimised: :class:`FedAvgMomentum` averages them, as FedAvg does, and applies
momentum to the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedAvgM

from ..clients.records import array_record, new_array, numpy_array, numpy_views
from ..codec import MAX_VALUE, values_outside
from ..compress import runtime
from ..compress._kernels import largest_within
from ._kernels import momentum_step

#: Suffixes of PyTorch's normalisation buffers (BatchNorm, InstanceNorm): averaged, never extrapolated.
STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class FedAvgMomentum(FedAvgM):
    """FedAvgM whose momentum moves only the trainable parameters.

    Arrays whose key ends with one of ``statistics`` (PyTorch's normalisation buffers by
    default) or whose dtype is not floating point take the plain weighted average of
    the replies. The other arrays follow FedAvgM (heavy ball, no Nesterov):
    ``v = momentum * v + (w - w_avg)``, ``w = w - server_learning_rate * v``. Other
    arguments are FedAvgM's (``fraction_train``, ``min_available_nodes``, ...).
    """

    def __init__(
        self,
        *,
        server_momentum: float = 0.5,
        server_learning_rate: float = 1.0,
        statistics: Iterable[str] = STATISTICS,
        **fedavg,
    ) -> None:
        super().__init__(server_momentum=server_momentum, server_learning_rate=server_learning_rate, **fedavg)
        self.statistics = tuple(statistics)
        self.velocity: dict[str, np.ndarray] = {}

    def is_statistic(self, key: str, value: np.ndarray) -> bool:
        """Whether ``key`` is averaged rather than moved by momentum (``dtype.kind``, numpy's
        floating kind, rather than ``np.issubdtype``: ~5 us per call, per tensor per round)."""
        return value.dtype.kind != "f" or key.endswith(self.statistics)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's weighted average, then momentum on the parameters."""
        averaged, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if averaged is None or self.current_arrays is None:
            return averaged, metrics
        self.step(numpy_views(averaged))
        return self.current_arrays, metrics

    def step(self, averaged: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new model (also ``current_arrays``) from the round's weighted average.

        qfl's streaming aggregation (:mod:`qfl.strategies.aggregate`) steps from the
        updates it summed (:meth:`step_updates`); this is the step from an average Flower
        computed.
        """
        current = self._current_numpy()
        self.current_arrays = array_record(
            {key: numpy_array(self._moved(key, current.get(key), new)) for key, new in averaged.items()}
        )
        return self._current_numpy()

    def step_updates(
        self,
        base: Mapping[str, np.ndarray | None],
        updates: Mapping[str, np.ndarray],
        mean: Callable[[str], np.ndarray],
        bound: float = MAX_VALUE,
    ) -> tuple[dict[str, np.ndarray], str | None]:
        """:meth:`step` from the round's average given as ``base[key] + updates[key]``
        (flat, the summed updates of qfl's streaming aggregation; a counter's entry is not
        an update), ``mean(key)`` building a tensor's average wherever the compiled pass
        does not apply. Returns the new model and the first of its tensors with NaN, Inf
        or a value beyond ``bound`` (None if none): the check a server makes of every
        aggregate, counted while the model is written rather than read again after.

        Serialising the average into Flower Arrays for FedAvg to read back, scale by 1.0
        and serialise again costs three model-sized copies; stepping from the average in
        numpy five passes more. For every parameter of float32 or float64 the step is one
        compiled pass (:func:`._kernels.momentum_step`) writing the new model straight into
        the bytes of its Array, with numpy's result bit for bit.
        """
        current = self._current_numpy()
        arrays = {}
        beyond = None
        for key, update in updates.items():
            old, b = current.get(key), base.get(key)
            if old is not None and b is not None and self._fused(key, old, b, update):
                out, finish = new_array(old.dtype, old.shape)
                velocity = self.velocity.get(key)
                first = velocity is None
                if first:
                    velocity = runtime.empty(old.shape, old.dtype)
                scalar = old.dtype.type
                outside = momentum_step(
                    old.size,
                    b.reshape(-1),
                    update,
                    old.reshape(-1),
                    velocity.reshape(-1),
                    scalar(self.server_momentum),
                    scalar(self.server_learning_rate),
                    first,
                    largest_within(old.dtype, bound),
                    out.reshape(-1),
                )
                self.velocity[key] = velocity
                arrays[key] = finish()
            else:
                moved = self._moved(key, old, mean(key))
                outside = moved.dtype.kind == "f" and values_outside(moved.reshape(-1), bound)
                arrays[key] = numpy_array(moved)
            if outside and beyond is None:
                beyond = key
        self.current_arrays = array_record(arrays)
        return self._current_numpy(), beyond

    def _fused(self, key: str, old: np.ndarray, base: np.ndarray, update: np.ndarray) -> bool:
        """Whether the compiled step applies: a parameter (not a statistic) whose model, base,
        update and velocity share one float dtype and size, C-contiguous."""
        velocity = self.velocity.get(key)
        arrays = (old, base, update) if velocity is None else (old, base, update, velocity)
        return (
            old.dtype in (np.float32, np.float64)
            and not self.is_statistic(key, old)
            and all(a.dtype == old.dtype and a.size == old.size and a.flags.c_contiguous for a in arrays)
        )

    def _moved(self, key: str, old: np.ndarray | None, new: np.ndarray) -> np.ndarray:
        """One tensor of the new model from its average ``new`` (updating its velocity)."""
        if old is None:
            return new
        if self.is_statistic(key, old):  # averaged; FedAvg's float64 average back to the model's dtype
            return np.asarray(new if old.dtype.kind == "f" else np.rint(new), dtype=old.dtype)
        step = old - new
        velocity = self.velocity.get(key)
        if velocity is None:
            velocity = step
        else:  # momentum * velocity + step, in place
            velocity *= self.server_momentum
            velocity += step
        self.velocity[key] = velocity
        # 1.0 * v is v exactly: the default rate saves a pass over the model.
        moved = velocity if self.server_learning_rate == 1.0 else self.server_learning_rate * velocity
        return np.asarray(old - moved, dtype=old.dtype)

    def _current_numpy(self) -> dict[str, np.ndarray]:
        """``current_arrays`` as read-only numpy views of its bytes, kept while it is current."""
        held, arrays = getattr(self, "_current", (None, None))
        if held is self.current_arrays and arrays is not None:
            return arrays
        arrays = numpy_views(self.current_arrays)
        self._current = (self.current_arrays, arrays)
        return arrays
