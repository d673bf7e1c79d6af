"""The classical forecasts: exact on series they describe, and lag choice that prefers the simple."""

from __future__ import annotations

import numpy as np

from model.baselines import (
    choose_orders,
    difference_ar_predictions,
    fit_difference_ar,
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
    ar = fit_difference_ar(values, (2,), np.ones(1), ridge=0.0)
    np.testing.assert_allclose(ar.coef[0], [-0.3, 0.6], atol=0.05)  # oldest first
    np.testing.assert_allclose(ar.intercept, [0.5], atol=0.1)
    errors = np.abs(difference_ar_predictions(values, ar, np.ones(1)) - values[1:])
    assert errors[100:].mean() < 0.85  # E|N(0, 1)| = 0.80: only the noise is left


def test_features_are_fitted_on_their_own_past() -> None:
    values = np.random.default_rng(1).normal(size=(200, 3)).cumsum(axis=0)
    ar = fit_difference_ar(values, (4, 4, 4), np.ones(3))
    mask = np.kron(np.eye(3), np.ones(4))  # (F, F·K) block diagonal
    assert np.all(ar.coef[mask == 0] == 0)


def test_each_feature_gets_its_own_order_persistence_for_a_random_walk() -> None:
    walk = np.random.default_rng(2).normal(size=600).cumsum()
    t = np.arange(600)
    season = np.sin(2 * np.pi * t / 12) + 0.05 * np.random.default_rng(3).normal(size=600)
    values = np.column_stack([walk, season])
    orders = choose_orders(values, 480, (1, 2, 4, 12, 24), np.diff(values, axis=0).std(axis=0))
    assert orders[0] == 0
    assert orders[1] >= 4


def test_a_lower_order_uses_the_newest_lags_and_order_zero_is_persistence() -> None:
    values = np.random.default_rng(4).normal(size=(300, 2)).cumsum(axis=0)
    ar = fit_difference_ar(values, (2, 0), np.ones(2))
    assert ar.lags == 2
    assert np.all(ar.coef[0, :2] != 0) and np.all(ar.coef[1] == 0) and ar.intercept[1] == 0
    np.testing.assert_array_equal(difference_ar_predictions(values, ar, np.ones(2))[:, 1], values[:-1, 1])
    mixed = fit_difference_ar(values, (1, 3), np.ones(2))
    assert mixed.lags == 3
    assert mixed.coef[0, 0] == 0 and mixed.coef[0, 1] == 0 and mixed.coef[0, 2] != 0  # newest lag last


def test_strongest_period_finds_the_season() -> None:
    t = np.arange(240)
    assert strongest_period(np.sin(2 * np.pi * t / 12)[:, None]) == 12
