"""Train a Forecaster on a CSV of one or more numeric columns.

    python -m model.train --csv data.csv --out runs/pump --columns flow,pressure --max-seconds 45
    python -m model.train --dataset seattle-temps --name seattle-temp --out model/weights/default --seed 0

How, and why:

1. The last ``--val-fraction`` of the rows validate; scaling is fitted on the rest (``model.data``).
2. The Forecaster's linear term starts as a least-squares autoregression on differences (per feature,
   ridge), its lag count chosen on the validation tail, persistence included; the GRU's head starts at
   zero. Training starts where the classical baseline ends: the GRU only learns what it misses.
3. Truncated backprop through time over random windows (Williams & Peng 1990): each window's state holds
   the values before it, exactly as a session streamed from the first row would, and only the hidden
   state starts cold. Each window is shifted by a random level, so that the GRU does not extrapolate
   from levels it never saw. Adam, L1 loss in units of the difference spread: the judged metric is MAE.
4. After every epoch the whole series streams through ``predict`` from ``initial_state``, as a served
   session would see it, and the validation tail is scored. Training stops after ``patience`` epochs
   without improvement, after ``--epochs``, or at ``--max-seconds``. The best epoch is kept if it beats
   the linear start clearly (paired t over validation steps), else the linear model alone.
5. Finally the linear term is refitted on every row, validation included, around the GRU's part.

Bad input (missing file or column, non-numeric cells, too few rows, a constant column) ends with a message
and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from model.baselines import (
    DifferenceAR,
    choose_orders,
    difference_ar_predictions,
    fit_difference_ar,
    lagged_differences,
    persistence,
    seasonal_naive,
    strongest_period,
)
from model.cell import VARIANTS, Variant
from model.checkpoint import save_checkpoint
from model.data import (
    DataError,
    Series,
    fit_scaler,
    load_dataset,
    read_table,
    sample_windows,
    series_from_frame,
    split_point,
)
from model.forecaster import Forecaster, ForecasterConfig
from model.report import Scores, plot_validation, print_table, score

LAG_CANDIDATES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 36, 52)
MIN_TRAIN_ROWS = 24
MIN_VALIDATION_ROWS = 4


@dataclass(frozen=True)
class TrainConfig:
    hidden_size: int = 64
    num_layers: int = 2
    variant: Variant = "seed"
    lags: int | None = None  # None: each feature's best on the validation tail, from LAG_CANDIDATES
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


@dataclass
class TrainResult:
    model: Forecaster
    split: int  # first validation row
    orders: tuple[int, ...]  # lags of each feature's autoregression (0: persistence)
    predictions: np.ndarray  # (T − 1, F) one-step predictions of the best model over the whole series
    best_epoch: int  # 0: the autoregression it started from was never beaten
    epochs: int
    seconds: float
    stopped_by: str
    history: list[float] = field(default_factory=list)  # validation MAE (units of σ_d) after each epoch


def train(
    series: Series, config: TrainConfig, on_epoch: Callable[[int, float, float], None] | None = None
) -> TrainResult:
    """Fit a Forecaster to ``series``; ``on_epoch(epoch, train_loss, val_mae)`` reports progress."""
    started = time.monotonic()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    values = series.values
    split = split_point(len(values), config.val_fraction, MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS)
    scaler = fit_scaler(values[:split], series.features)
    diff_scale = np.array(scaler.diff_scale)
    given = (config.lags,) * len(series.features) if config.lags else None
    orders = given or choose_orders(values, split, LAG_CANDIDATES, diff_scale)
    model = Forecaster(
        ForecasterConfig(
            features=series.features,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            variant=config.variant,
            lags=max(*orders, 1),
            mean=scaler.mean,
            scale=scaler.scale,
            diff_scale=scaler.diff_scale,
        )
    )
    with torch.no_grad():
        model.head.weight.zero_()  # the GRU starts silent: epoch 0 is the linear model alone
    _set_linear(model, fit_difference_ar(values[:split], orders, diff_scale))

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
            predictions, _ = model.predict(inputs, _primed_state(model, prior))
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
    if config.refit:
        _refit_linear(model, values, orders)
    model.eval()
    seconds = time.monotonic() - started
    return TrainResult(model, split, orders, best.predictions, best.epoch, epoch, seconds, stopped_by, history)


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


def _primed_state(model: Forecaster, prior: torch.Tensor) -> torch.Tensor:
    """A state that has seen the K values ``prior`` (B, K, F) but whose GRU starts from zeros."""
    batch = prior.size(0)
    hidden = model.config.num_layers * model.config.hidden_size
    state = model.initial_state(batch)
    state[:, hidden:-1] = prior.reshape(batch, -1)  # (B, K·F), the layout Forecaster._split reads
    state[:, -1] = 1.0
    return state


def _set_linear(model: Forecaster, ar: DifferenceAR) -> None:
    """The linear term := the autoregression; the head's bias := its drift (both in units of σ_d)."""
    with torch.no_grad():
        model.autoregression.weight.copy_(torch.tensor(ar.coef, dtype=torch.float32))
        model.head.bias.copy_(torch.tensor(ar.intercept, dtype=torch.float32))


@torch.no_grad()
def _refit_linear(model: Forecaster, values: np.ndarray, orders: tuple[int, ...]) -> None:
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
    ar = fit_difference_ar(values, orders, diff_scale, known=known)
    # A feature left at persistence has no autoregression to refit; its trained bias belongs to the GRU.
    intercept = np.where(np.array(orders) > 0, ar.intercept, model.head.bias.double().numpy())
    _set_linear(model, DifferenceAR(ar.coef, intercept, orders))


def baseline_scores(series: Series, result: TrainResult, season: int) -> Scores:
    """Validation MAE of the model, persistence, seasonal naive and the autoregression it started from."""
    values, split = series.values, result.split
    diff_scale = np.array(result.model.config.diff_scale)
    ar = fit_difference_ar(values[:split], result.orders, diff_scale)
    forecasts = {
        "model": result.predictions,
        "persistence": persistence(values),
        f"seasonal naive m={season}": seasonal_naive(values, season),
        f"AR on diffs K={'/'.join(map(str, sorted(set(result.orders))))}": difference_ar_predictions(
            values, ar, diff_scale
        ),
    }
    tail = {name: p[split - 1 :] for name, p in forecasts.items()}
    return score(values[split:], tail, series.features)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m model.train", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV file with a header row; one row per time step")
    source.add_argument("--dataset", help="a dataset shipped with vega_datasets, e.g. seattle-temps")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--columns", help="comma-separated columns to model (default: every numeric one)")
    parser.add_argument("--name", help="model name stored in the checkpoint (default: the file's stem)")
    defaults = TrainConfig()
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--variant", choices=VARIANTS, default=defaults.variant)
    parser.add_argument(
        "--lags", type=int, help="differences in the linear term (default: chosen on validation)"
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    parser.add_argument("--season", type=int, help="seasonal-naive baseline's period (default: inferred)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "epochs", "lags", "season"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if args.max_seconds <= 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    return args


def _load(args: argparse.Namespace) -> tuple[Series, str]:
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    if args.csv is not None:
        return series_from_frame(read_table(args.csv), columns, str(args.csv)), args.csv.stem
    return series_from_frame(load_dataset(args.dataset), columns, args.dataset), args.dataset


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # One thread: the matrices are small (batch × hidden), so a second thread mostly adds synchronisation,
    # and on a busy machine it can make each step ten times slower. It also keeps --seed runs identical
    # across machines with different core counts.
    torch.set_num_threads(1)
    console, progress_console = Console(), Console(stderr=True)
    config = TrainConfig(
        hidden_size=args.hidden,
        num_layers=args.layers,
        variant=args.variant,
        lags=args.lags,
        epochs=args.epochs,
        max_seconds=args.max_seconds,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    try:
        series, default_name = _load(args)
        for column in series.skipped:
            console.print(f"column {column!r} left out: it says when, not what (name it in --columns to model it)")
        for column, count in series.filled.items():
            console.print(f"column {column!r}: {count} missing values filled by linear interpolation")
        with Progress(
            TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  val MAE {task.fields[val]:.4f}"),
            TimeElapsedColumn(),
            console=progress_console,
        ) as progress:
            task = progress.add_task("train", total=config.epochs, loss=float("nan"), val=float("nan"))

            def on_epoch(epoch: int, loss: float, val: float) -> None:
                progress.update(task, completed=epoch, loss=loss, val=val)

            result = train(series, config, on_epoch)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    season = args.season or series.season or strongest_period(series.values[: result.split])
    scores = baseline_scores(series, result, season)
    print_table(scores, console)
    name = args.name or default_name
    split = result.split
    try:
        version = save_checkpoint(
            result.model, args.out, name=name, training=_summary(args, series, result, scores, season)
        )
        plot_validation(
            args.out / "validation.png",
            series.values[split:],
            result.predictions[split - 1 :],
            series.features,
            f"{name}: validation one-step prediction (MAE {scores.relative('model'):.2f} × persistence)",
        )
    except OSError as exc:
        print(f"error: cannot write the checkpoint to {args.out}: {exc}", file=sys.stderr)
        return 2
    console.print(
        f"best epoch {result.best_epoch} of {result.epochs} (stopped by {result.stopped_by},"
        f" {result.seconds:.1f} s); wrote {args.out} version {version} and validation.png"
    )
    return 0


def _summary(
    args: argparse.Namespace, series: Series, result: TrainResult, scores: Scores, season: int
) -> dict[str, object]:
    """What config.json records about the run, so a checkpoint says where it came from and how good it is."""
    return {
        "source": str(args.csv) if args.csv is not None else f"vega_datasets:{args.dataset}",
        "rows": len(series.values),
        "validation_rows": len(series.values) - result.split,
        "filled_missing": series.filled,
        "seed": args.seed,
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "autoregression_orders": dict(zip(series.features, result.orders, strict=True)),
        "stopped_by": result.stopped_by,
        "season": season,
        "validation_mae": scores.as_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
