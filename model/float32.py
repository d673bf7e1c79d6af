"""What float32 holds. The model and the service compute in it, so a checkpoint's numbers and a training
column's values are judged by it."""

from __future__ import annotations

import numpy as np

MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32: a divisor that stays > 0


def holds(value: object, *, positive: bool = False) -> bool:
    """Whether ``value`` (read from a config.json) is a number, not a bool, that float32 holds as a finite
    number; with ``positive``, one of at least ``TINY`` (1e-300 is > 0 but becomes 0, a division by zero).
    Whole numbers past float64 (10**400) are judged exactly, never raised on."""
    if not isinstance(value, float | int) or isinstance(value, bool):
        return False
    return abs(value) <= MAX and (not positive or value >= TINY)
