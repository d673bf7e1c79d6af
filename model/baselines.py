"""The classical one-step forecasts a trained model is judged against, and the autoregression it starts from.

All take the whole series ``values (T, F)`` and return ``predictions (T − 1, F)``: row t forecasts
``values[t + 1]`` from ``values[: t + 1]`` only.

- persistence: x̂_{t+1} = x_t
- seasonal naive: x̂_{t+1} = x_{t+1−m} for season m
- autoregression on differences (Box & Jenkins' ARIMA(K, 1, 0) with drift, fitted by least squares):
  d̂_{t+1} = c + Σ_k a_k d_{t−k}, x̂_{t+1} = x_t + d̂_{t+1}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def persistence(values: np.ndarray) -> np.ndarray:
    return values[:-1].copy()


def seasonal_naive(values: np.ndarray, season: int) -> np.ndarray:
    predictions = values[:-1].copy()
    if 1 < season < len(values):
        predictions[season - 1 :] = values[: len(values) - season]
    return predictions


@dataclass(frozen=True)
class DifferenceAR:
    """Least-squares coefficients on scaled differences, each feature on its own past only."""

    coef: np.ndarray  # (F, F·K), column f·K + k weighs feature f's difference K − 1 − k steps before x_t
    intercept: np.ndarray  # (F,)

    @property
    def lags(self) -> int:
        return self.coef.shape[1] // self.coef.shape[0]


def lagged_differences(
    values: np.ndarray, lags: int, diff_scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row t: the K scaled differences up to x_t, newest last, (T − 1, F, K); and d_{t+1}, (T − 1, F).

    Before the first step the Forecaster sees zero differences; so does this, to compute the same thing.
    """
    diffs = np.diff(values, axis=0) / diff_scale  # (T − 1, F)
    padded = np.concatenate([np.zeros((lags, diffs.shape[1])), diffs[:-1]])  # (K + T − 2, F)
    return np.lib.stride_tricks.sliding_window_view(padded, lags, axis=0), diffs


def fit_difference_ar(
    values: np.ndarray,
    orders: tuple[int, ...],
    diff_scale: np.ndarray,
    ridge: float = 10.0,
    known: np.ndarray | None = None,
) -> DifferenceAR:
    """Ridge least squares per feature on its own newest ``orders[f]`` scaled differences, plus a drift.

    ``known`` (T − 1, F) is a part of each target already explained (the GRU's), fitted around. Rows
    whose history starts before the series are left out; the ridge keeps short series from overfitting.
    Cross-feature terms are left to the GRU: on short series a full VAR overfits and loses to this.
    """
    lags = max(*orders, 1)
    design, targets = lagged_differences(values, lags, diff_scale)
    if known is not None:
        targets = targets - known
    design, targets = design[lags:], targets[lags:]  # (N, F, K), (N, F)
    features = values.shape[1]
    coef = np.zeros((features, features * lags))
    intercept = np.zeros(features)
    for f, order in enumerate(orders):
        if order == 0:
            continue
        x, y = design[:, f, lags - order :], targets[:, f]  # (N, order), (N,)
        x_mean, y_mean = x.mean(axis=0), y.mean()
        centred = x - x_mean
        weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(order), centred.T @ (y - y_mean))
        coef[f, (f + 1) * lags - order : (f + 1) * lags] = weights
        intercept[f] = y_mean - x_mean @ weights
    return DifferenceAR(coef, intercept)


def difference_ar_predictions(values: np.ndarray, model: DifferenceAR, diff_scale: np.ndarray) -> np.ndarray:
    """One-step forecasts (T − 1, F) of ``values`` (T, F) by a fit on differences scaled by ``diff_scale``."""
    design, _ = lagged_differences(values, model.lags, diff_scale)
    step = design.reshape(len(design), -1) @ model.coef.T + model.intercept  # (T − 1, F)
    return values[:-1] + step * diff_scale


def choose_orders(
    values: np.ndarray, split: int, candidates: tuple[int, ...], diff_scale: np.ndarray
) -> tuple[int, ...]:
    """Per feature, the lag count whose autoregression fitted before ``split`` forecasts the rest best.

    0 stands for persistence, which wins on series that behave like random walks. Among counts within 2%
    of the best the smallest is taken: the validation tail is short, and fewer lags generalise better.
    """
    features = values.shape[1]

    def errors(predictions: np.ndarray) -> np.ndarray:  # (F,)
        return (np.abs(predictions[split - 1 :] - values[split:]) / diff_scale).mean(axis=0)

    by_order = {0: errors(persistence(values))}
    for order in candidates:
        if split - 1 - order < 3 * order + 8:  # too few rows to fit K coefficients with any confidence
            break
        fit = fit_difference_ar(values[:split], (order,) * features, diff_scale)
        by_order[order] = errors(difference_ar_predictions(values, fit, diff_scale))
    chosen = []
    for f in range(features):
        best = min(e[f] for e in by_order.values())
        chosen.append(min(order for order, e in by_order.items() if e[f] <= 1.02 * best))
    return tuple(chosen)


def strongest_period(values: np.ndarray, longest: int = 60) -> int:
    """The lag in 2..longest where the differences correlate most, averaged over features (an ACF peak)."""
    diffs = np.diff(values, axis=0)
    diffs = (diffs - diffs.mean(axis=0)) / (diffs.std(axis=0) + 1e-12)
    longest = min(longest, len(diffs) // 3)
    if longest < 2:
        return 2
    correlations = [float((diffs[lag:] * diffs[:-lag]).mean()) for lag in range(2, longest + 1)]
    return 2 + int(np.argmax(correlations))
