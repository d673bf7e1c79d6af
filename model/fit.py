"""Fit a Forecaster to a series: the training loop behind ``python -m model.train``.

1. The last ``val_fraction`` of the rows validate; scaling is fitted on the rest (``model.data``).
2. The Forecaster's linear term starts as a ridge least-squares autoregression on differences, each
   feature on its own past with its own lag set chosen on the validation tail (persistence, the newest K
   differences, or those and the seasonal lag where the series has a clear season); the GRU's head starts
   at zero. Training starts where the classical baseline ends: the GRU only has to learn what the
   autoregression misses.
3. Truncated backprop through time over random windows (Williams & Peng 1990): each window's state holds
   the values before it, exactly as a session streamed from the first row would, and only the hidden
   state starts cold. Each window is shifted by a random level, so that the GRU does not extrapolate
   from levels it never saw. Adam, L1 loss in units of the difference spread: the judged metric is MAE.
4. After every epoch the whole series streams through ``predict`` from ``initial_state``, as a served
   session would see it, and the validation tail is scored. Training stops after ``patience`` epochs
   without improvement, after ``epochs``, or at ``max_seconds``. The best epoch is kept if it beats
   the linear start clearly (paired t over validation steps), else the linear model alone.
5. The kept model is calibrated on the validation tail (model.conformal): its errors there, per forecast
   step, before the refit below has seen those rows.
6. Finally the linear term is refitted on every row, validation included, around the GRU's part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from model.baselines import (
    DifferenceAR,
    Lags,
    choose_lags,
    clear_period,
    fit_difference_ar,
    lagged_differences,
    newest,
    strongest_period,
)
from model.cell import Variant
from model.conformal import DEFAULT_ADAPT_RATE, DEFAULT_SCALE_RATE, DEFAULT_STEPS, calibrate
from model.data import DataError, Series, fit_scaler, sample_windows, split_point
from model.forecaster import Forecaster, ForecasterConfig

LAG_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 36, 52)
MIN_TRAIN_ROWS = 24
MIN_VALIDATION_ROWS = 4


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 64
    num_layers: int = 2
    variant: Variant = "seed"
    lags: int | None = None  # None: each feature's best on the validation tail, from LAG_CANDIDATES
    season: int | None = None  # None: the dates' period, else inferred
    epochs: int = 200  # an epoch is enough windows to cover the training rows once (at least 4 batches)
    max_seconds: float = 600.0
    val_fraction: float = 0.2
    seed: int = 0
    window: int = 64  # steps of truncated backprop; shorter on short series
    batch_size: int = 32
    learning_rate: float = 1e-3
    patience: int = 20  # epochs without a better validation MAE before stopping
    refit: bool = True  # refit the linear term on every row at the end (see _refit_linear)
    level_jitter: float = 0.5  # windows shift by N(0, this · σ): see _shifted
    min_t: float = 1.0  # how clearly the GRU must beat the linear start on validation to be kept
    calibration_steps: int = DEFAULT_STEPS  # forecast steps calibrated (at most half the validation rows)
    adapt_rate: float = DEFAULT_ADAPT_RATE  # γ of each session's online adaptation of its intervals
    scale_rate: float = DEFAULT_SCALE_RATE  # β of each session's running error level (0: none)


@dataclass
class TrainResult:
    model: Forecaster
    split: int  # first validation row
    lags: tuple[Lags, ...]  # lag set of each feature's autoregression ((): persistence)
    season: int  # the series' period: given, from its dates, or inferred
    predictions: np.ndarray  # (T − 1, F) one-step predictions of the best model over the whole series
    best_epoch: int  # 0: the autoregression it started from was never beaten
    epochs: int
    seconds: float
    stopped_by: str
    history: list[float] = field(default_factory=list)  # validation MAE (units of σ_d) after each epoch


def check_lags(lags: int | None, split: int, rows: int) -> None:
    """DataError when ``lags`` (given, not chosen) has fewer than twice its coefficients in the ``split``
    training rows of ``rows``: nothing to fit. The CLI asks before training, so it refuses before any progress."""
    if lags and 2 * lags >= split:
        raise DataError(f"--lags {lags} needs at least {2 * lags + 1} training rows; this series"
                        f" has {split} (the other {rows - split} validate): lower --lags")


def train(
    series: Series,
    config: TrainConfig,
    on_epoch: Callable[[int, float, float], None] | None = None,
    build: Callable[[ForecasterConfig], Forecaster] = Forecaster,
) -> TrainResult:
    """Fit a Forecaster to ``series``; ``on_epoch(epoch, train_loss, val_mae)`` reports progress.

    ``build`` makes the model from its config: a Forecaster subclass with another recurrent core trains
    through the same loop, so that cores can be compared (the CLI and the service know only the GRU).
    """
    started = time.monotonic()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    values = series.values
    split = split_point(len(values), config.val_fraction, MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS)
    scaler = fit_scaler(values[:split], series.features)
    diff_scale = np.array(scaler.diff_scale)
    check_lags(config.lags, split, len(values))
    known_season = config.season or series.season
    season = known_season or strongest_period(values[:split])
    given = (newest(config.lags),) * len(series.features) if config.lags else None
    seasonal = season if known_season or clear_period(values[:split], season) else 0
    lags = given or choose_lags(values, split, LAG_CANDIDATES, diff_scale, seasonal)
    model = build(
        ForecasterConfig(
            features=series.features,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            variant=config.variant,
            lags=max((own[-1] for own in lags if own), default=1),
            mean=scaler.mean,
            scale=scaler.scale,
            diff_scale=scaler.diff_scale,
        )
    )
    with torch.no_grad():
        model.head.weight.zero_()  # the GRU starts silent: epoch 0 is the linear model alone
    _set_linear(model, fit_difference_ar(values[:split], lags, diff_scale))

    whole = torch.tensor(values, dtype=torch.float32)
    train_rows = whole[:split]
    window = max(4, min(config.window, split // 2))
    batches = max(4, -(-split // (config.batch_size * window)))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    start = best = _Candidate.of(model, whole, split, epoch=0)
    history = [start.mae]
    stopped_by, epoch = "epochs", 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        for _ in range(batches):
            windows = sample_windows(train_rows, model.config.lags, window, config.batch_size, generator)
            prior, inputs, targets = _shifted(model, windows, config.level_jitter, generator)
            predictions, _ = model.predict(inputs, model.primed_state(prior))
            loss = ((predictions - targets).abs() / model.diff_scale).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
        candidate = _Candidate.of(model, whole, split, epoch)
        history.append(candidate.mae)
        if candidate.mae < best.mae:
            best = candidate
        if on_epoch is not None:
            on_epoch(epoch, float(np.mean(losses)), candidate.mae)
        if epoch - best.epoch >= config.patience:
            stopped_by = "patience"
            break
        if time.monotonic() - started >= config.max_seconds:
            stopped_by = "max-seconds"
            break
    if not best.clearly_better_than(start, config.min_t):
        best = start
    model.load_state_dict(best.weights)
    model.eval()
    if not np.isfinite(best.predictions).all():  # values within float32 whose sums and spreads are not
        raise DataError("the model's predictions on these values are not finite numbers: they are too large"
                        " for float32 arithmetic; rescale the columns")
    try:
        calibration = calibrate(model, values, split, config.calibration_steps, config.adapt_rate,
                                config.scale_rate)
    except ValueError as exc:  # forecasts rolled out past float32 range
        raise DataError(f"the model's forecasts on the validation rows cannot be calibrated ({exc}); rescale"
                        " the columns") from None
    if config.refit:
        _refit_linear(model, values, lags)
    model.calibration = calibration
    seconds = time.monotonic() - started
    return TrainResult(model, split, lags, season, best.predictions, best.epoch, epoch, seconds, stopped_by,
                       history)


@dataclass(frozen=True)
class _Candidate:
    """The model after one epoch, as the validation tail judged it."""

    epoch: int
    weights: dict[str, torch.Tensor]
    predictions: np.ndarray  # (T − 1, F) one-step predictions over the whole series
    errors: np.ndarray  # (V,) validation error of each step, units of σ_d, averaged over features

    @classmethod
    @torch.no_grad()
    def of(cls, model: Forecaster, whole: torch.Tensor, split: int, epoch: int) -> _Candidate:
        """Stream the whole series from the initial state, as a served session would, and score the tail."""
        model.eval()
        predictions, _ = model.predict(whole[None, :-1], model.initial_state(1))  # (1, T − 1, F)
        errors = (predictions[0, split - 1 :] - whole[split:]).abs() / model.diff_scale  # (V, F)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        return cls(epoch, weights, predictions[0].double().numpy(), errors.mean(dim=1).double().numpy())

    @property
    def mae(self) -> float:
        return float(self.errors.mean())

    def clearly_better_than(self, other: _Candidate, min_t: float) -> bool:
        """A paired t statistic over the validation steps of at least ``min_t``.

        The best of many epochs on a short validation tail is partly luck; a GRU that is not clearly
        better than the linear model it started from is more likely to hurt than help on new rows.
        """
        if self is other:
            return True
        gain = other.errors - self.errors  # (V,)
        spread = gain.std(ddof=1) / np.sqrt(len(gain))
        return bool(gain.mean() > min_t * spread)


def _shifted(
    model: Forecaster, windows: tuple[torch.Tensor, ...], jitter: float, generator: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """Move each window's level by a random offset, the same for every tensor of the window.

    The GRU sees the level (x − μ)/σ as well as the differences. On a trending series the rows to forecast
    lie beyond every level seen in training; shifted windows teach the GRU not to lean on the level
    further than the differences justify.
    """
    if jitter == 0:
        return windows
    batch, features = windows[0].size(0), windows[0].size(2)
    offset = torch.randn(batch, 1, features, generator=generator) * jitter * model.scale  # (B, 1, F)
    return tuple(w + offset for w in windows)


def _set_linear(model: Forecaster, ar: DifferenceAR) -> None:
    """The linear term := the autoregression; the head's bias := its drift (both in units of σ_d)."""
    with torch.no_grad():
        model.autoregression.weight.copy_(torch.tensor(ar.coef, dtype=torch.float32))
        model.head.bias.copy_(torch.tensor(ar.intercept, dtype=torch.float32))


@torch.no_grad()
def _refit_linear(model: Forecaster, values: np.ndarray, lags: tuple[Lags, ...]) -> None:
    """Refit the linear term on every row, validation included, around what the trained GRU predicts.

    Early stopping needed the validation tail held out; the linear term, the part that extrapolates a
    trend or a season, should not lose the most recent rows for it.
    """
    diff_scale = np.array(model.config.diff_scale)
    whole = torch.tensor(values[None, :-1], dtype=torch.float32)  # (1, T − 1, F)
    predictions, _ = model.predict(whole, model.initial_state(1))
    step = (predictions[0].double().numpy() - values[:-1]) / diff_scale  # (T − 1, F), units of σ_d
    design, _ = lagged_differences(values, model.config.lags, diff_scale)  # (T − 1, F, K)
    linear = design.reshape(len(design), -1) @ model.autoregression.weight.double().numpy().T
    known = step - linear - model.head.bias.double().numpy()  # the GRU's part: W_o h_t
    ar = fit_difference_ar(values, lags, diff_scale, known=known)
    # A feature left at persistence has no autoregression to refit; its trained bias belongs to the GRU.
    intercept = np.where([bool(own) for own in lags], ar.intercept, model.head.bias.double().numpy())
    _set_linear(model, DifferenceAR(ar.coef, intercept))
