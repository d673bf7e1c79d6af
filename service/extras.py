"""What a predict request may ask beyond the predictions: intervals at some levels, and surprise scores.

It travels with the chunk from the route to the engine, the compute thread and the answer, and is part of
the exact-retry fingerprint. Requests without it keep today's answers byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extras:
    levels: tuple[float, ...] = ()  # interval levels in percent, each in (0, 100), distinct, at most 4
    scores: bool = False  # the p-value of every arriving value

    def __bool__(self) -> bool:
        return bool(self.levels) or self.scores


NO_EXTRAS = Extras()


def level_key(level: float) -> str:
    """How a level names its interval in an answer: 80 and 80.0 are "80", 99.5 is "99.5"."""
    return format(level, "g")


def repeats_a_level(levels: Sequence[float]) -> bool:
    """Whether two of ``levels`` name the same interval: 80 and 80.0, and also 80 and 80.0000001 (both
    "80"), whose second interval would replace the first in the answer."""
    return len({level_key(level) for level in levels}) != len(levels)


def answer_values(steps: int, features: int, horizon: int, extras: Extras) -> int:
    """How many numbers a chunk's answer holds (``encode_answer``'s arrays): T × F predictions, a lower and
    an upper bound per level around each, the T × F scores, and horizon × F forecast values with their own
    bounds per level. What a batch call's answer is bounded by (GRU_MAX_BATCH_ANSWER_VALUES)."""
    per_value = 1 + 2 * len(extras.levels)
    return features * (steps * (per_value + extras.scores) + horizon * per_value)
