"""The training report's ratios against persistence, including a feature persistence predicts exactly."""

from __future__ import annotations

import math
import warnings

import numpy as np

from model.report import Scores


def _scores(model: list[float], persistence: list[float]) -> Scores:
    return Scores(("a", "b"), {"model": np.array(model), "persistence": np.array(persistence)})


def test_relative_is_the_mean_of_the_per_feature_ratios() -> None:
    assert _scores([1.0, 3.0], [2.0, 3.0]).relative("model") == 0.75
    assert _scores([1.0, 3.0], [2.0, 3.0]).relative("persistence") == 1.0


def test_a_feature_persistence_predicts_exactly_counts_one_when_matched_else_inf_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as under python -W error: no divide-by-zero warning may escape
        assert _scores([1.0, 0.0], [2.0, 0.0]).relative("model") == 0.75
        assert _scores([1.0, 0.5], [2.0, 0.0]).relative("model") == math.inf
        assert _scores([0.0, 0.0], [0.0, 0.0]).relative("persistence") == 1.0
