"""Calibrated intervals and surprise scores: split conformal prediction, adapted online per series.

At training (``calibrate``) the model streams the validation tail as a session would and, from every row
of it as a rolling origin, forecasts ``steps`` ahead; the absolute errors in units of σ_d, per forecast step
and feature, become the calibration scores. A checkpoint keeps their order statistics on a fixed grid of
ranks (``GRID`` values, linear between them), so any level can be asked for later.

With a ``scale_rate`` (every calibration the training CLI writes) the scores are normalised: each series
tracks its recent error level, a running mean u of its scores relative to the validation tail's mean, and
a score is counted in units of the u known before it arrived. Intervals then widen and narrow with the
series' noise at once, as a volatility model's do, and the calibration measures what is left. A score is
also divided by the level factor g(x) = 1 + w·(x − c) of the value x its prediction was made at, a line
fitted on the training rows' errors: a price moves more when it is high, a temperature in the warm season.

While serving, each series keeps a log-scale per feature and per anchor level in its state, updated with
every arriving value by adaptive conformal inference in its quantile-tracking form (Gibbs & Candès 2021;
Angelopoulos, Candès & Tibshirani 2023): a miss widens that level's intervals, a hit narrows them a little,
so the long-run miss rate of each anchor holds at its nominal value even when the series turns noisier than
the validation tail. docs/model.md, "Intervals and surprise scores", has the rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model import float32

ANCHORS = (50.0, 80.0, 90.0, 95.0, 99.0)  # levels (%) whose log-scale each series adapts
GRID = 257  # order statistics kept per forecast step and feature
LOG_SCALE_LIMIT = 5.0  # |log-scale| cap: a long flat stretch cannot shrink intervals beyond recovery
DEFAULT_STEPS = 24
DEFAULT_ADAPT_RATE = 0.02
DEFAULT_SCALE_RATE = 0.05  # β of the running error level: a memory of about 1/β values
SCALE_CLIP = 5.0  # one score moves the running level by at most this many times the level
SCALE_FLOOR = 0.9  # the running level narrows intervals by at most this factor (the state keeps u itself)
_LOG_FLOOR = np.float32(math.log(SCALE_FLOOR))
LEVEL_FLOOR = 0.25  # the level factor g(x) narrows intervals by at most this factor; it widens them up to e^5


@dataclass(frozen=True)
class Calibration:
    """What a checkpoint stores to turn predictions into intervals and arriving values into p-values."""

    counts: tuple[int, ...]  # N_h: calibration scores of forecast step h = 1..H
    quantiles: tuple[tuple[tuple[float, ...], ...], ...]  # H × F × GRID order statistics, evenly spaced in rank
    adapt_rate: float = DEFAULT_ADAPT_RATE  # γ of the online update
    anchors: tuple[float, ...] = ANCHORS
    scale_rate: float = 0.0  # β of the running error level; 0: scores are not normalised (older checkpoints)
    scale_start: tuple[float, ...] = ()  # per feature, the validation tail's mean score: where u = 1
    level_centre: tuple[float, ...] = ()  # per feature, c of the level factor g(x) = 1 + w·(x − c); () : g = 1
    level_slope: tuple[float, ...] = ()  # per feature, w of the level factor
    _table: np.ndarray = field(init=False, repr=False, compare=False)  # (H, F, GRID) float64
    _anchor_q: np.ndarray = field(init=False, repr=False, compare=False)  # (F, A) one-step quantiles, float32

    def __post_init__(self) -> None:
        """Refuse what a hostile or hand-edited config.json could hold: the checkpoint's values are input."""
        counts, anchors = self.counts, self.anchors
        if not counts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
            raise ValueError(f"calibration counts must be whole numbers >= 1, one per forecast step, got {counts!r}")
        try:
            table = np.array(self.quantiles, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"calibration quantiles must be steps × features × {GRID} numbers: {exc}") from None
        if table.ndim != 3 or table.shape[0] != len(counts) or table.shape[2] != GRID or table.shape[1] < 1:
            raise ValueError(f"calibration quantiles have shape {list(table.shape)}, expected"
                             f" [{len(counts)}, F, {GRID}]")
        if not (np.abs(table) <= float32.MAX).all() or (table < 0).any() or (np.diff(table, axis=2) < 0).any():
            raise ValueError("calibration quantiles must be finite float32 numbers, >= 0 and non-decreasing along"
                             " the ranks")
        rate = self.adapt_rate
        if not float32.holds(rate) or not 0 < rate <= 1:
            raise ValueError(f"calibration adapt_rate must be in (0, 1], got {rate!r}")
        if not anchors or list(anchors) != sorted(set(anchors)) or not all(0 < a < 100 for a in anchors):
            raise ValueError(f"calibration anchors must be increasing levels in (0, 100), got {anchors!r}")
        beta, start = self.scale_rate, self.scale_start
        if not float32.holds(beta) or not 0 <= beta < 1:
            raise ValueError(f"calibration scale_rate must be in [0, 1), got {beta!r}")
        wanted = table.shape[1] if beta else 0
        if len(start) != wanted or not all(float32.holds(v, positive=True) for v in start):
            raise ValueError(f"calibration scale_start must be {wanted} finite float32 numbers > 0 (one per feature"
                             f" with a scale_rate, none without), got {start!r}")
        centre, slope = self.level_centre, self.level_slope
        wanted = table.shape[1] if slope else 0
        if (not beta and slope) or len(centre) != wanted or len(slope) != wanted or not all(
                float32.holds(v) for v in (*centre, *slope)):
            raise ValueError(f"calibration level_centre and level_slope must be {wanted or 'F'} finite float32"
                             f" numbers each (one per feature, only with a scale_rate), got {centre!r}, {slope!r}")
        object.__setattr__(self, "_table", table)
        object.__setattr__(self, "_anchor_q", self.quantile(np.array(anchors), 0).T.astype(np.float32))

    @property
    def steps(self) -> int:
        return len(self.counts)

    @property
    def features(self) -> int:
        return int(self._table.shape[1])

    @property
    def normalised(self) -> bool:
        """Whether scores are counted in units of each series' running error level."""
        return self.scale_rate > 0

    @property
    def level_scaled(self) -> bool:
        """Whether scores are also counted in units of the level factor g(x)."""
        return bool(self.level_slope)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's form; a calibration without β or without g writes what older versions wrote
        (same hash)."""
        out = {"counts": list(self.counts), "quantiles": [[list(f) for f in h] for h in self.quantiles],
               "adapt_rate": self.adapt_rate, "anchors": list(self.anchors)}
        if self.normalised:
            out |= {"scale_rate": self.scale_rate, "scale_start": list(self.scale_start)}
        if self.level_scaled:
            out |= {"level_centre": list(self.level_centre), "level_slope": list(self.level_slope)}
        return out

    @classmethod
    def from_dict(cls, raw: object) -> Calibration:
        if not isinstance(raw, dict) or set(raw) - {"counts", "quantiles", "adapt_rate", "anchors", "scale_rate",
                                                     "scale_start", "level_centre", "level_slope"}:
            raise ValueError("calibration must be an object with counts, quantiles, adapt_rate and anchors"
                             " (and scale_rate, scale_start, level_centre, level_slope)")

        def nested(value: Any) -> Any:
            return tuple(nested(v) for v in value) if isinstance(value, list) else value

        return cls(**{name: nested(value) for name, value in raw.items()})

    # -- the conformal quantities ----------------------------------------------------------------------

    def quantile(self, levels: np.ndarray, step: int) -> np.ndarray:
        """(L, F) conformal quantiles of forecast step ``step`` (0: one step ahead) at ``levels`` (%):
        the ⌈(N + 1)·level⌉-th smallest score, the largest where that rank passes N."""
        count = self.counts[step]
        rank = np.minimum(np.ceil((count + 1) * np.asarray(levels, dtype=np.float64) / 100), count)  # 1-based
        position = (rank - 1) / max(count - 1, 1) * (GRID - 1)  # on the grid of kept order statistics
        grid = np.arange(GRID)
        return np.stack([np.interp(position, grid, row) for row in self._table[step]], axis=1)

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """Conformal p-values (1 + #{calibration scores ≥ s}) / (N + 1) of one-step scores (..., F);
        NaN (no prediction to score against) stays NaN. A score equal to kept order statistics that tie
        counts from the first of them: every tied calibration score is at least as large."""
        count = self.counts[0]
        out = np.full(scores.shape, np.nan, dtype=np.float32)
        grid = np.arange(GRID) / (GRID - 1) * (count - 1)  # 0-based rank of each kept order statistic
        for f in range(self.features):
            row = self._table[0, f]
            s = scores[..., f].astype(np.float64)
            first = np.minimum(np.searchsorted(row, s, side="left"), GRID - 1)  # np.interp takes a tie's last
            below = np.where(s > row[-1], count, np.where(row[first] == s, grid[first], np.interp(s, row, grid)))
            out[..., f] = np.where(np.isnan(s), np.nan, (1 + count - below) / (count + 1))
        return out

    def follow(self, scores: np.ndarray, carry: np.ndarray,
               series: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch's arriving values through the session's adaptation. scores (B, T, F) float32 in units of
        σ_d, NaN where unscored; carry (B, F·A [+ F]) the state's log-scales [and log u] before them; series
        (B, T + 1, F) the value before the first step, then each step's value (for the level factor).
        Returns the scores as p-values and the adaptation count them (normalised by the u known before each
        value and g of the value before it), each step's interval log-scales (B, T, F, A), u's and g's
        included, and the carry after each step (B, T, F·A [+ F])."""
        batch, steps, features = scores.shape
        anchors = len(self.anchors)
        log_scales = carry[:, : features * anchors].reshape(batch, features, anchors)
        if not self.normalised:
            path = self.adapt(scores, log_scales)
            return scores, path, path.reshape(batch, steps, -1)
        log_factor = self.log_level_factor(series)  # (B, T + 1, F)
        before = carry[:, features * anchors :]  # (B, F)
        with np.errstate(over="ignore"):  # a score past float32 becomes inf, past every calibration score
            scores = scores / np.exp(log_factor[:, :-1])
            levels = level_path(scores, before, self.scale_rate, np.asarray(self.scale_start, dtype=np.float32))
            scores = scores / np.exp(floored(np.concatenate([before[:, None], levels[:, :-1]], axis=1)))
        path = self.adapt(scores, log_scales)
        carried = np.concatenate([path.reshape(batch, steps, -1), levels], axis=2)
        return scores, path + (floored(levels) + log_factor[:, 1:])[..., None], carried

    def log_level_factor(self, values: np.ndarray) -> np.ndarray:
        """log g(x) of each value (..., F), float32; 0 for a calibration without a level fit."""
        if not self.level_scaled:
            return np.zeros(values.shape, dtype=np.float32)
        return log_level_factor(values, np.asarray(self.level_centre, dtype=np.float64),
                                np.asarray(self.level_slope, dtype=np.float64))  # ints past int64: no object array

    def adapt(self, scores: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
        """The log-scales after each step: scores (B, T, F) float32, NaN where nothing is scored (no earlier
        prediction, or past a row's end); log_scales (B, F, A) before the first step -> (B, T, F, A).

        Per anchor a of miss rate α_a: miss = score > q_a · exp(λ); λ += γ (miss − α_a), kept within ±LIMIT.
        In float32 throughout, so a series streamed in chunks adapts bit for bit as in one call."""
        rate = np.float32(self.adapt_rate)
        miss_rate = (1 - np.asarray(self.anchors, dtype=np.float32) / 100)  # (A,)
        widen, narrow = rate * (np.float32(1) - miss_rate), rate * (np.float32(0) - miss_rate)  # per miss, hit
        limit = np.float32(LOG_SCALE_LIMIT)
        current = log_scales.astype(np.float32, copy=True)
        path = np.empty((*scores.shape, current.shape[-1]), dtype=np.float32)  # (B, T, F, A)
        unscored = np.isnan(scores)[..., None]  # (B, T, F, 1)
        for t in range(scores.shape[1]):
            missed = scores[:, t, :, None] > self._anchor_q * np.exp(current)  # (B, F, A)
            step = np.where(unscored[:, t], np.float32(0), np.where(missed, widen, narrow))
            current = np.minimum(np.maximum(current + step, -limit), limit)
            path[:, t] = current
        return path

    def half_widths(self, levels: np.ndarray, log_scales: np.ndarray, diff_scale: np.ndarray,
                    steps: int | None = None) -> np.ndarray:
        """Interval half-widths in the data's units, (L, T, F).

        ``steps`` None: one-step intervals, log_scales (T, F, A) the adaptation after each step. Else a
        forecast of ``steps`` steps from log_scales (F, A): step h uses its own calibration, past the
        calibrated steps the last one's, widened by √(h / H) as a random walk's spread grows.
        """
        levels = np.asarray(levels, dtype=np.float64)
        asked, anchors = len(levels), np.asarray(self.anchors)
        # The anchors' own widths come along (one pass over the quantiles): each anchor adapts its own λ, so
        # two anchors' widths can cross (a run of misses at 95% only), and a level's interval is nested: at
        # least that of every anchor at or below it, whichever levels were asked.
        every = np.concatenate([levels, anchors])
        scale = np.exp(np.concatenate([self._log_scale_at(levels, log_scales),
                                       np.moveaxis(log_scales.astype(np.float64), -1, 0)]))  # (L + A, [T,] F)
        if steps is None:
            widths = self.quantile(every, 0)[:, None, :] * scale  # (L + A, T, F)
        else:
            calibrated = self.steps
            base = np.stack([self.quantile(every, min(h, calibrated) - 1) * math.sqrt(max(h / calibrated, 1.0))
                             for h in range(1, steps + 1)], axis=1)  # (L + A, steps, F)
            widths = base * scale[:, None, :]
        own, at_anchors = widths[:asked], widths[asked:]
        below = (anchors[None, :] <= levels[:, None]).reshape(asked, len(anchors), *[1] * (own.ndim - 1))
        nested = np.maximum(own, np.where(below, at_anchors[None], 0.0).max(axis=1))
        with np.errstate(over="ignore"):  # past float32 (a state from outside): inf, which the service refuses
            return (nested * diff_scale).astype(np.float32)

    def _log_scale_at(self, levels: np.ndarray, log_scales: np.ndarray) -> np.ndarray:
        """Each level's log-scale, linear in the level between the two anchors around it (the nearest
        anchor's outside them): (..., F, A) -> (L, ..., F)."""
        anchors = np.asarray(self.anchors, dtype=np.float64)
        flat = log_scales.reshape(-1, len(anchors)).astype(np.float64)
        out = np.stack([interp_rows(float(level), anchors, flat) for level in levels])  # (L, n)
        return out.reshape(len(levels), *log_scales.shape[:-1])


def interp_rows(x: float, xp: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``np.interp(x, xp, row)`` for every row of ``rows`` (n, len(xp)) in one pass, to the bit: the same
    segment, the same arithmetic, the same answers at and beyond the ends. A call per row cost about 2.5 µs,
    so a chunk of 384 steps × 32 features asking four levels spent 0.1 s here."""
    if not x > xp[0]:  # at or below the first point (np.interp: its value)
        return rows[:, 0].copy()
    if not x < xp[-1]:  # at or beyond the last
        return rows[:, -1].copy()
    j = int(np.searchsorted(xp, x, side="right")) - 1  # xp[j] <= x < xp[j + 1]
    low, high = rows[:, j], rows[:, j + 1]
    if xp[j] == x:
        return low.copy()
    with np.errstate(invalid="ignore", over="ignore"):  # as quiet as np.interp on infinities
        slope = (high - low) / (xp[j + 1] - xp[j])
        out = slope * (x - xp[j]) + low
        undefined = np.isnan(out)  # np.interp tries the segment's other end, then a flat segment's value
        if undefined.any():
            out[undefined] = (slope * (x - xp[j + 1]) + high)[undefined]
            flat = np.isnan(out) & (low == high)
            out[flat] = low[flat]
    return out


def floored(log_level: np.ndarray) -> np.ndarray:
    """log u as scores and intervals use it: at least log SCALE_FLOOR, so a calm stretch narrows intervals
    by at most that factor (a quantised series' errors sit on its steps: narrower misses them all)."""
    return np.maximum(log_level, _LOG_FLOOR)


def log_level_factor(values: np.ndarray, centre: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """log g(x) = log max(1 + w·(x − c), LEVEL_FLOOR), at most LOG_SCALE_LIMIT, per value (..., F) in float32:
    each value's alone, so chunks give what one call gives. In float64 first: w·x may pass float32's range."""
    factor = 1 + slope * (values.astype(np.float64) - centre)
    return np.minimum(np.log(np.maximum(factor, LEVEL_FLOOR)), LOG_SCALE_LIMIT).astype(np.float32)


def fit_level(values: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per feature, the level factor's c and w: the least-squares line of the scores (N, F; NaN where
    unscored) on the values their predictions were made at (N, F), c the values' mean (every digit: a series
    far from 0 next to its spread needs them) and w the line's slope over its height at c (6 digits). w = 0
    where there is no line to fit (values or scores all alike, or values so nearly alike that w would pass
    float32's range)."""
    centre, slope = [], []
    for x, s in zip(values.T.astype(np.float64), scores.T.astype(np.float64), strict=True):
        kept = np.isfinite(s)
        x, s = x[kept], s[kept]
        mean_x = float(x.mean()) if len(x) else 0.0
        spread, height = (float(x.var()), float(s.mean())) if len(x) >= 2 else (0.0, 0.0)
        fitted = float(np.mean((x - mean_x) * (s - height))) / spread / height if spread > 0 and height > 0 else 0.0
        centre.append(mean_x)
        slope.append(float(f"{fitted:.6g}") if float32.holds(fitted) else 0.0)
    return np.array(centre), np.array(slope)


def level_path(scores: np.ndarray, log_level: np.ndarray, rate: float, start: np.ndarray) -> np.ndarray:
    """log u after each step (B, T, F) from scores (B, T, F) and log u before them (B, F):
    u ← (1 − β)·u + β·min(s / s₀, CLIP·u), unscored (NaN) steps keep u; log u within ±LIMIT. In float32 with
    the state's log u as the only carry, so chunks give what one call gives, bit for bit."""
    beta, keep = np.float32(rate), np.float32(1 - rate)
    beta_clip, limit = beta * np.float32(SCALE_CLIP), np.float32(LOG_SCALE_LIMIT)
    pulls = beta * (scores / start)  # (B, T, F): β·s/s₀, NaN where unscored
    unscored = np.isnan(pulls)
    current = log_level.astype(np.float32, copy=True)
    path = np.empty(scores.shape, dtype=np.float32)
    for t in range(scores.shape[1]):
        level = np.exp(current)
        moved = np.log(keep * level + np.minimum(pulls[:, t], beta_clip * level))  # β·min(s/s₀, CLIP·u)
        current = np.where(unscored[:, t], current, np.minimum(np.maximum(moved, -limit), limit))
        path[:, t] = current
    return path


@dataclass(frozen=True)
class _Normaliser:
    """What normalises a calibration's scores, fitted on the rows before the validation tail and streamed
    over every row: s₀ and the level factor's c and w (F,) as kept, log u before each row and log g of each
    row's value (rows, F)."""

    start: np.ndarray
    centre: np.ndarray
    slope: np.ndarray
    log_level: np.ndarray
    log_factor: np.ndarray

    @classmethod
    def fit(cls, model: Any, values: np.ndarray, whole: Tensor, rate: float, split: int) -> _Normaliser:
        """Scored as ``Forecaster.observe`` scores a session streamed from the first row: rows 0..K have no
        score; the level factor is the line through the training rows' scores (before ``split``)."""
        predictions, _ = model.predict(whole[None, :-1], model.initial_state(1))
        diff_scale = np.asarray(model.config.diff_scale or [1.0] * values.shape[1], dtype=np.float32)
        scores = np.abs(values[1:] - predictions[0].numpy()).astype(np.float32) / diff_scale  # row t + 1's score
        scores[: model.config.lags] = np.nan
        centre, slope = fit_level(values[: split - 1], scores[: split - 1])
        log_factor = log_level_factor(values, centre, slope)
        scores /= np.exp(log_factor[:-1])  # in units of g of the value each prediction was made at
        mean = np.nanmean(scores[split - 1 :], axis=0).astype(np.float64)
        start = np.array([float(f"{v:.6g}") if math.isfinite(v) and v > 0 else 1.0 for v in mean])  # as kept
        after = level_path(scores[None], np.zeros((1, values.shape[1]), np.float32), rate,
                           start.astype(np.float32))
        log_level = np.concatenate([np.zeros((2, values.shape[1]), np.float32), after[0, :-1]])
        return cls(start, centre, slope, log_level, log_factor)


@torch.no_grad()
def calibrate(model: Any, values: np.ndarray, split: int, steps: int = DEFAULT_STEPS,
              adapt_rate: float = DEFAULT_ADAPT_RATE, scale_rate: float = DEFAULT_SCALE_RATE) -> Calibration:
    """Scores of ``model`` (a Forecaster) on the rows from ``split`` on: every validation row is an origin,
    its state the one a session streamed from the first row holds; forecast step h from origin o is scored
    against row o + h, when ``scale_rate`` > 0 in units of the running error level u after row o and of the
    level factor g of row o's value. ``steps`` is capped at half the validation rows."""
    rows = len(values)
    horizon = max(1, min(steps, (rows - split) // 2))
    whole = torch.tensor(values, dtype=torch.float32)
    normaliser = _Normaliser.fit(model, values, whole, scale_rate, split) if scale_rate else None
    _, state = model.predict(whole[None, : split - 1], model.initial_state(1))
    states, lasts = [], []
    for origin in range(split - 1, rows - 1):  # the state and one-step prediction after each origin
        prediction, state = model.predict(whole[None, origin : origin + 1], state)
        states.append(state)
        lasts.append(prediction[:, 0])
    forecast = model.rollout(torch.cat(states), torch.cat(lasts), horizon).double().numpy()  # (O, H, F)
    targets = values.astype(np.float64)
    diff_scale = np.asarray(model.config.diff_scale or [1.0] * values.shape[1], dtype=np.float64)
    counts, table = [], []
    for h in range(1, horizon + 1):
        usable = rows - split - h + 1  # origins o = split − 1 + i with o + h ≤ rows − 1
        errors = np.abs(forecast[:usable, h - 1] - targets[split - 1 + h : split - 1 + h + usable]) / diff_scale
        if normaliser is not None:  # u after each origin, g of its value
            errors /= np.exp(floored(normaliser.log_level[split : split + usable]).astype(np.float64)
                             + normaliser.log_factor[split - 1 : split - 1 + usable])
        ordered = np.sort(errors, axis=0)  # (N_h, F)
        positions = np.linspace(0, usable - 1, GRID)
        counts.append(usable)
        table.append(tuple(tuple(float(f"{q:.6g}") for q in np.interp(positions, np.arange(usable), column))
                           for column in ordered.T))
    if normaliser is None:
        return Calibration(tuple(counts), tuple(table), adapt_rate)
    return Calibration(tuple(counts), tuple(table), adapt_rate, scale_rate=scale_rate,
                       scale_start=tuple(float(v) for v in normaliser.start),
                       level_centre=tuple(float(v) for v in normaliser.centre),
                       level_slope=tuple(float(v) for v in normaliser.slope))
