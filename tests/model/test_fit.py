"""model.fit.train: deterministic, never worse on validation than where it starts, and on time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.data import DataError, Series
from model.fit import TrainConfig, train
from tests.model.conftest import seasonal_series

SMALL = TrainConfig(hidden_size=8, num_layers=1, epochs=3, window=32, batch_size=8)


def _series(steps: int = 160) -> Series:
    values = np.column_stack([seasonal_series(steps), seasonal_series(steps, seed=5)])
    return Series(values, ("a", "b"), {}, None)


def test_same_seed_gives_the_same_weights() -> None:
    first, second = train(_series(), SMALL).model, train(_series(), SMALL).model
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_kept_model_is_the_best_on_validation_or_the_linear_start() -> None:
    result = train(_series(), SMALL)
    assert result.best_epoch == 0 or result.history[result.best_epoch] == min(result.history)
    assert len(result.history) == result.epochs + 1  # the linear start is epoch 0
    truth = _series().values[result.split :]
    mae = np.abs(result.predictions[result.split - 1 :] - truth).mean()
    persistence_mae = np.abs(_series().values[result.split - 1 : -1] - truth).mean()
    assert mae < 0.8 * persistence_mae


def test_gru_that_is_not_clearly_better_is_dropped() -> None:
    strict = train(_series(), dataclasses.replace(SMALL, min_t=1e9))
    assert strict.best_epoch == 0
    assert not strict.model.head.weight.any()  # the GRU is silent: the linear model alone


def test_training_stops_at_max_seconds() -> None:
    # Patience beyond reach: only the clock can stop it, however fast the machine trains.
    config = TrainConfig(hidden_size=8, num_layers=1, epochs=10_000, max_seconds=1.0, patience=10_000)
    result = train(_series(), config)
    assert result.stopped_by == "max-seconds"
    assert result.seconds < 10


def test_more_lags_than_the_training_rows_can_fit_are_refused() -> None:
    """--lags 200 on 128 training rows left the linear term no rows: NaN coefficients, NaN epochs, then an
    error blaming the values' magnitude."""
    with pytest.raises(DataError, match="--lags 200 needs at least 401 training rows; this series has 128"):
        train(_series(), dataclasses.replace(SMALL, lags=200))
