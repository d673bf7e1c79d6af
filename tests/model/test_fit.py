"""model.fit.train: deterministic, never worse on validation than where it starts, and on time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.baselines import fit_difference_ar, newest
from model.data import DataError, Series, load_dataset
from model.fit import TrainConfig, _Candidate, _refit_linear, _shifted, train
from tests.model.conftest import make_forecaster, seasonal_series

SMALL = TrainConfig(hidden_size=8, num_layers=1, epochs=3, window=32, batch_size=8)


def _series(steps: int = 160) -> Series:
    values = np.column_stack([seasonal_series(steps), seasonal_series(steps, seed=5)])
    return Series(values, ("a", "b"), {}, None)


def test_same_seed_gives_the_same_weights() -> None:
    first, second = train(_series(), SMALL).model, train(_series(), SMALL).model
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


def test_trained_model_beats_persistence_on_validation() -> None:
    result = train(_series(), SMALL)
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


def test_better_means_lower_validation_errors() -> None:
    low = _Candidate(1, {}, np.zeros((1, 1)), np.array([0.1, 0.2, 0.1, 0.15]))
    high = _Candidate(0, {}, np.zeros((1, 1)), np.array([0.5, 0.6, 0.55, 0.5]))
    assert low.clearly_better_than(high, 1.0)
    assert not high.clearly_better_than(low, 1.0)


def test_kept_epoch_is_the_lowest_validation_mae_when_kept_at_all() -> None:
    result = train(_series(), dataclasses.replace(SMALL, min_t=-1e9))  # keep the best epoch, whatever it is
    assert result.history[result.best_epoch] == min(result.history)


def test_history_is_the_validation_mae_of_the_predictions() -> None:
    series = _series()
    result = train(series, dataclasses.replace(SMALL, min_t=-1e9, refit=False))
    diff_scale = np.array(result.model.config.diff_scale)
    errors = np.abs(result.predictions[result.split - 1 :] - series.values[result.split :]) / diff_scale
    assert result.history[result.best_epoch] == pytest.approx(errors.mean(), rel=1e-5)


def _daily_profile(steps: int) -> Series:
    """Differences that repeat 0.9 of the one 24 steps before, plus noise (a seasonal AR), no dates."""
    diffs = np.random.default_rng(6).normal(size=steps)
    for t in range(24, steps):
        diffs[t] += 0.9 * diffs[t - 24]
    return Series(np.cumsum(diffs)[:, None], ("a",), {}, None)


def test_a_clear_inferred_season_gives_the_autoregression_its_seasonal_lag() -> None:
    result = train(_daily_profile(600), SMALL)
    assert result.season == 24 and result.lags == ((1, 24),)
    assert result.model.config.lags == 24


def test_no_seasonal_lag_where_the_inferred_period_is_noise_or_lags_are_given() -> None:
    """Seattle's daily highs without their dates: the differences' ACF peaks at 21 days, inside the white
    noise band, where (1, 2, 3, 21) would win on validation by chance (and did, before the band)."""
    frame = load_dataset("seattle-weather")
    highs = frame["temp_max"].to_numpy(dtype=float)[: int(len(frame) * 0.8), None]
    noise = train(Series(highs, ("temp_max",), {}, None), SMALL)
    assert noise.season == 21 and noise.lags == (newest(3),)
    given = train(_daily_profile(600), dataclasses.replace(SMALL, lags=3))
    assert given.lags == (newest(3),)


def test_a_stated_season_is_the_one_tried_and_reported() -> None:
    result = train(_daily_profile(600), dataclasses.replace(SMALL, season=12))
    assert result.season == 12  # a set with a lag beyond its run 1..K can only have taken 12, not 24
    assert all(own == newest(len(own)) or own[-1] == 12 for own in result.lags)


def test_training_stops_after_patience_epochs_without_improvement() -> None:
    result = train(_series(), dataclasses.replace(SMALL, epochs=50, learning_rate=0.0, patience=2))
    assert result.stopped_by == "patience" and result.epochs == 2 and result.best_epoch == 0


def test_linear_term_is_refitted_on_every_row() -> None:
    series = _series()
    result = train(series, dataclasses.replace(SMALL, min_t=1e9))  # the GRU silent: the refit is plain AR
    diff_scale = np.array(result.model.config.diff_scale)
    whole = fit_difference_ar(series.values, result.lags, diff_scale)
    np.testing.assert_allclose(result.model.autoregression.weight.detach().double().numpy(), whole.coef, atol=1e-4)


def test_refit_leaves_a_persistence_features_trained_bias() -> None:
    """A feature left at persistence (no lags) has no autoregression to refit: its bias is the GRU's."""
    model = make_forecaster(features=2, lags=4)
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.2, 0.3]))
    values = np.column_stack([seasonal_series(80), seasonal_series(80, seed=5)])
    _refit_linear(model, values, ((1, 2, 3, 4), ()))
    assert model.head.bias[1].item() == pytest.approx(0.3)
    assert model.head.bias[0].item() != pytest.approx(0.2)  # the AR feature's drift was refitted


def test_level_shift_moves_prior_inputs_and_targets_together() -> None:
    model = make_forecaster(features=2)
    windows = tuple(torch.randn(4, n, 2) for n in (3, 5, 5))
    shifted = _shifted(model, windows, 0.5, torch.Generator().manual_seed(0))
    moves = [(s - w)[:, :1] for s, w in zip(shifted, windows, strict=True)]
    assert moves[0].abs().sum() > 0
    for move in moves[1:]:
        torch.testing.assert_close(move, moves[0])
