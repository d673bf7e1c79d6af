"""The classical one-step forecasts a trained model is judged against, and the autoregression it starts from.

All take the whole series ``values (T, F)`` and return ``predictions (T − 1, F)``: row t forecasts
``values[t + 1]`` from ``values[: t + 1]`` only.

- persistence: x̂_{t+1} = x_t
- seasonal naive: x̂_{t+1} = x_{t+1−m} for season m
- autoregression on differences (Box & Jenkins' ARIMA(K, 1, 0) with drift, fitted by least squares):
  d̂_{t+1} = c + Σ_{l ∈ L} a_l d_{t+1−l}, x̂_{t+1} = x_t + d̂_{t+1}, over a lag set L: the newest K
  differences 1..K, or those and the seasonal lag m (the difference one season before the one forecast)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Lags = tuple[int, ...]  # the differences an autoregression weighs, ascending; 1 is d_t, the newest; (): persistence


def newest(order: int) -> Lags:
    """The lag set of the newest ``order`` differences, 1..order."""
    return tuple(range(1, order + 1))


def describe(lags: Lags) -> str:
    """A lag set as people write it: "1..3", "1..3,24", "1", "0" for persistence."""
    if not lags:
        return "0"
    run = next((k for k in range(len(lags), 0, -1) if lags[:k] == newest(k)), 0)
    head = [f"1..{run}" if run > 2 else ",".join(map(str, lags[:run]))] if run else []
    return ",".join(head + [str(lag) for lag in lags[run:]])


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
    lags: Sequence[Lags],
    diff_scale: np.ndarray,
    ridge: float = 10.0,
    known: np.ndarray | None = None,
) -> DifferenceAR:
    """Ridge least squares per feature on its own scaled differences at the lags ``lags[f]``, plus a drift.

    ``known`` (T − 1, F) is a part of each target already explained (the GRU's), fitted around. Rows
    whose history starts before the series are left out; the ridge keeps short series from overfitting.
    Cross-feature terms are left to the GRU: on short series a full VAR overfits and loses to this.
    """
    window = max((max(own) for own in lags if own), default=1)
    design, targets = lagged_differences(values, window, diff_scale)
    if known is not None:
        targets = targets - known
    design, targets = design[window:], targets[window:]  # (N, F, K), (N, F)
    features = values.shape[1]
    coef = np.zeros((features, features * window))
    intercept = np.zeros(features)
    for f, own in enumerate(lags):
        if not own:
            continue
        columns = window - np.array(own)  # lag l sits l − 1 places before the newest, which is last
        x, y = design[:, f, columns], targets[:, f]  # (N, |L|), (N,)
        x_mean, y_mean = x.mean(axis=0), y.mean()
        centred = x - x_mean
        weights = np.linalg.solve(centred.T @ centred + ridge * np.eye(len(own)), centred.T @ (y - y_mean))
        coef[f, f * window + columns] = weights
        intercept[f] = y_mean - x_mean @ weights
    return DifferenceAR(coef, intercept)


def difference_ar_predictions(values: np.ndarray, model: DifferenceAR, diff_scale: np.ndarray) -> np.ndarray:
    """One-step forecasts (T − 1, F) of ``values`` (T, F) by a fit on differences scaled by ``diff_scale``."""
    design, _ = lagged_differences(values, model.lags, diff_scale)
    step = design.reshape(len(design), -1) @ model.coef.T + model.intercept  # (T − 1, F)
    return values[:-1] + step * diff_scale


def choose_lags(
    values: np.ndarray, split: int, orders: tuple[int, ...], diff_scale: np.ndarray, season: int = 0
) -> tuple[Lags, ...]:
    """Per feature, the lag set whose autoregression fitted before ``split`` forecasts the rest best.

    The candidates: persistence (), which wins on series that behave like random walks; the newest K
    differences for each K in ``orders``; and, given a ``season`` m, each of those below m with the
    seasonal lag m added (what lets a seasonal ARIMA follow a daily cycle with a few coefficients, where
    1..m needs m). Among sets within 2% of the best the one with fewest lags, then the nearest, is taken:
    the validation tail is short, and fewer lags generalise better.
    """
    features = values.shape[1]

    def errors(predictions: np.ndarray) -> np.ndarray:  # (F,)
        return (np.abs(predictions[split - 1 :] - values[split:]) / diff_scale).mean(axis=0)

    candidates = [newest(order) for order in orders]
    if season > 1:
        candidates += [(*newest(order), season) for order in orders if order < season - 1]
    by_lags: dict[Lags, np.ndarray] = {(): errors(persistence(values))}
    for lags in candidates:
        if split - 1 - lags[-1] < 3 * len(lags) + 8:  # too few rows to fit the coefficients with any confidence
            continue
        fit = fit_difference_ar(values[:split], (lags,) * features, diff_scale)
        by_lags[lags] = errors(difference_ar_predictions(values, fit, diff_scale))
    chosen = []
    for f in range(features):
        best = min(e[f] for e in by_lags.values())
        chosen.append(min((lags for lags, e in by_lags.items() if e[f] <= 1.02 * best),
                          key=lambda lags: (len(lags), lags[-1:])))
    return tuple(chosen)


def _standardised_differences(values: np.ndarray) -> np.ndarray:
    diffs = np.diff(values, axis=0)
    return (diffs - diffs.mean(axis=0)) / (diffs.std(axis=0) + 1e-12)


def strongest_period(values: np.ndarray, longest: int = 60) -> int:
    """The lag in 2..longest where the differences correlate most, averaged over features (an ACF peak)."""
    diffs = _standardised_differences(values)
    longest = min(longest, len(diffs) // 3)
    if longest < 2:
        return 2
    correlations = [float((diffs[lag:] * diffs[:-lag]).mean()) for lag in range(2, longest + 1)]
    return 2 + int(np.argmax(correlations))


def clear_period(values: np.ndarray, period: int) -> bool:
    """Whether the differences' autocorrelation at ``period``, averaged over features, lies above the band
    ±2/√N that white noise stays inside: an ACF peak found on noise is no season to fit a lag to."""
    diffs = _standardised_differences(values)
    if not 1 <= period < len(diffs):
        return False
    return float((diffs[period:] * diffs[:-period]).mean()) > 2 / np.sqrt(len(diffs))
