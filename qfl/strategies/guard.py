"""The norm screen against hostile updates, on its own so presets and run configs can name it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class UpdateGuard:
    """Which decoded client updates are too large to reach aggregation.

    A single client scaling its update by 1e30 would otherwise own the model for good.
    An update is dropped when its l2 norm exceeds ``median_factor`` times the lower median
    of the norms accepted recently (the round's candidates and the last ``window``
    accepted ones; the lower median, so that one honest and one hostile client do not
    average into a median that lets the hostile one in), or ``max_update_norm``. With a
    single norm to compare (the very first update of a run) only ``max_update_norm``
    applies; a median of 0 is no reference either.

    Parameters
    ----------
    median_factor : float or None (default: 10)
        None disables the relative check.
    max_update_norm : float or None (default: None)
        Absolute bound on the l2 norm of an update.
    window : int (default: 64)
        Accepted norms remembered across rounds (the reference of asynchronous runs).
    """

    median_factor: float | None = 10.0
    max_update_norm: float | None = None
    window: int = 64

    def __post_init__(self) -> None:
        for name in ("median_factor", "max_update_norm"):
            v = getattr(self, name)
            if v is not None and (
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
            ):
                raise ValueError(f"UpdateGuard.{name} must be a positive finite number or None, got {v!r}")
        if self.median_factor is not None and self.median_factor < 1:
            raise ValueError(f"UpdateGuard.median_factor must be >= 1, got {self.median_factor}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"UpdateGuard.window must be a positive integer, got {self.window!r}")

    @staticmethod
    def from_config(norm_guard: float, max_update_norm: float) -> UpdateGuard | None:
        """From run-config values where 0 means off (``norm-guard``, ``max-update-norm``); None if both are."""
        if not norm_guard and not max_update_norm:
            return None
        return UpdateGuard(norm_guard or None, max_update_norm or None)


#: The guard every strategy gets unless told otherwise.
DEFAULT_GUARD = UpdateGuard()
