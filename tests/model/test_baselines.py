"""The classical forecasts: exact on series they describe, and lag choice that prefers the simple."""

from __future__ import annotations

import numpy as np

from model.baselines import (
    choose_lags,
    clear_period,
    describe,
    difference_ar_predictions,
    fit_difference_ar,
    newest,
    persistence,
    seasonal_naive,
    strongest_period,
)


def test_persistence_and_seasonal_naive_forecast_known_values() -> None:
    values = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(persistence(values)[:, 0], np.arange(9.0))
    # x̂_{t+1} = x_{t+1−3}; the first two steps have no season behind them and fall back to persistence
    np.testing.assert_array_equal(seasonal_naive(values, 3)[:, 0], [0, 1, 0, 1, 2, 3, 4, 5, 6])


def test_difference_ar_recovers_the_process_that_made_the_series() -> None:
    rng = np.random.default_rng(0)
    diffs = np.zeros(3000)
    for t in range(2, 3000):
        diffs[t] = 0.5 + 0.6 * diffs[t - 1] - 0.3 * diffs[t - 2] + rng.normal()
    values = np.cumsum(diffs)[:, None]
    ar = fit_difference_ar(values, (newest(2),), np.ones(1), ridge=0.0)
    np.testing.assert_allclose(ar.coef[0], [-0.3, 0.6], atol=0.05)  # oldest first
    np.testing.assert_allclose(ar.intercept, [0.5], atol=0.1)
    errors = np.abs(difference_ar_predictions(values, ar, np.ones(1)) - values[1:])
    assert errors[100:].mean() < 0.85  # E|N(0, 1)| = 0.80: only the noise is left


def test_features_are_fitted_on_their_own_past() -> None:
    values = np.random.default_rng(1).normal(size=(200, 3)).cumsum(axis=0)
    ar = fit_difference_ar(values, (newest(4),) * 3, np.ones(3))
    mask = np.kron(np.eye(3), np.ones(4))  # (F, F·K) block diagonal
    assert np.all(ar.coef[mask == 0] == 0)


def test_each_feature_gets_its_own_lags_persistence_for_a_random_walk() -> None:
    walk = np.random.default_rng(2).normal(size=600).cumsum()
    t = np.arange(600)
    season = np.sin(2 * np.pi * t / 12) + 0.05 * np.random.default_rng(3).normal(size=600)
    values = np.column_stack([walk, season])
    lags = choose_lags(values, 480, (1, 2, 4, 12, 24), np.diff(values, axis=0).std(axis=0))
    assert lags[0] == ()
    assert lags[1] == newest(len(lags[1])) and len(lags[1]) >= 4


def test_a_shorter_lag_set_uses_the_newest_lags_and_no_lags_is_persistence() -> None:
    values = np.random.default_rng(4).normal(size=(300, 2)).cumsum(axis=0)
    ar = fit_difference_ar(values, (newest(2), ()), np.ones(2))
    assert ar.lags == 2
    assert np.all(ar.coef[0, :2] != 0) and np.all(ar.coef[1] == 0) and ar.intercept[1] == 0
    np.testing.assert_array_equal(difference_ar_predictions(values, ar, np.ones(2))[:, 1], values[:-1, 1])
    mixed = fit_difference_ar(values, (newest(1), newest(3)), np.ones(2))
    assert mixed.lags == 3
    assert mixed.coef[0, 0] == 0 and mixed.coef[0, 1] == 0 and mixed.coef[0, 2] != 0  # newest lag last


def test_a_seasonal_lag_set_weighs_the_newest_and_the_seasonal_difference_only() -> None:
    """d̂_{t+1} = 0.9 d_{t+1−12}: the set (1, 12) recovers it; the columns of lags 2..11 stay zero."""
    rng = np.random.default_rng(5)
    diffs = rng.normal(size=3000)
    for t in range(12, 3000):
        diffs[t] += 0.9 * diffs[t - 12]
    values = np.cumsum(diffs)[:, None]
    ar = fit_difference_ar(values, ((1, 12),), np.ones(1), ridge=0.0)
    assert ar.lags == 12
    np.testing.assert_allclose(ar.coef[0, [0, 11]], [0.9, 0.0], atol=0.05)  # lag 12 first, lag 1 last
    assert np.all(ar.coef[0, 1:11] == 0)


def test_the_seasonal_lag_is_chosen_where_it_forecasts_with_fewer_lags() -> None:
    """A daily profile of many harmonics plus a wandering level: a few lags and the one a season back
    forecast as well as the 24 newest do."""
    rng = np.random.default_rng(6)
    profile = rng.normal(size=24)
    values = (np.tile(profile, 50) + 0.03 * rng.normal(size=1200).cumsum())[:, None]
    diff_scale = np.diff(values, axis=0).std(axis=0)
    (seasonal,) = choose_lags(values, 960, (1, 2, 4, 12, 24), diff_scale, season=24)
    (plain,) = choose_lags(values, 960, (1, 2, 4, 12, 24), diff_scale)
    assert seasonal == (1, 24)
    assert plain == newest(24)


def test_lag_sets_read_as_written() -> None:
    assert [describe(lags) for lags in ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 24), (1, 24))] == [
        "0", "1", "1,2", "1..3", "1..3,24", "1,24"]


def test_a_period_is_clear_only_above_the_white_noise_band() -> None:
    t = np.arange(600)
    assert clear_period(np.sin(2 * np.pi * t / 12)[:, None], 12)
    assert not clear_period(np.random.default_rng(7).normal(size=(600, 1)).cumsum(axis=0), 12)


def test_strongest_period_finds_the_season() -> None:
    t = np.arange(240)
    assert strongest_period(np.sin(2 * np.pi * t / 12)[:, None]) == 12
