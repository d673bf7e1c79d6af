"""Train a Forecaster on a CSV of one or more numeric columns.

    python -m model.train --csv data.csv --out runs/pump --columns flow,pressure --max-seconds 45
    python -m model.train --dataset seattle-temps --name seattle-temp --out model/weights/default --seed 0
    python -m model.train --csv data.csv --repository models --name pumps   # publishes models/pumps/<next>/

The training itself is ``model.fit``; this module reads the data, reports progress, prints the validation
MAE of the model against persistence, seasonal naive and the autoregression it started from, and writes
the checkpoint with a plot of the validation tail. Bad input (missing file or column, non-numeric cells,
too few rows, a constant column) ends with a message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from model.baselines import describe, difference_ar_predictions, fit_difference_ar, persistence, seasonal_naive
from model.cell import VARIANTS
from model.checkpoint import (
    MODEL_NAME,
    CheckpointError,
    load_checkpoint,
    publishing,
    save_checkpoint,
    versions_in,
)
from model.conformal import DEFAULT_SCALE_RATE
from model.data import DataError, Series, fit_scaler, load_dataset, read_table, series_from_frame, split_point
from model.fit import MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS, TrainConfig, TrainResult, check_lags, train
from model.forecaster import Forecaster
from model.report import Scores, plot_validation, print_table, score


def baseline_scores(series: Series, result: TrainResult) -> Scores:
    """Validation MAE of the model, persistence, seasonal naive and the autoregression it started from."""
    values, split = series.values, result.split
    diff_scale = np.array(result.model.config.diff_scale)
    ar = fit_difference_ar(values[:split], result.lags, diff_scale)
    forecasts = {
        "model": result.predictions,
        "persistence": persistence(values),
        f"seasonal naive m={result.season}": seasonal_naive(values, result.season),
        f"AR on diffs lags {'/'.join(sorted(set(map(describe, result.lags))))}": difference_ar_predictions(
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
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="checkpoint directory to write")
    target.add_argument("--repository", type=Path,
                        help="model repository to publish into, as --name's next version (atomically)")
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
    parser.add_argument("--season", type=int, help="the seasonal lag the autoregression may take and the seasonal"
                        " naive baseline's period (default: from the dates, else inferred)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--scale-rate", type=float,
                        help=f"β of each session's running error level, by which interval scores are normalised"
                             f" (with the level factor); 0: raw scores, no level factor, the state layout of"
                             f" versions calibrated before it existed (default"
                             f" {DEFAULT_SCALE_RATE}, or 0 when publishing next to such a version)")
    args = parser.parse_args(argv)
    for name in ("hidden", "layers", "epochs", "lags", "season"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}")
    if not args.max_seconds > 0:  # NaN too: no elapsed time is ever >= it, so it would turn the limit off
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}")
    if args.out is not None and args.out.exists() and not args.out.is_dir():  # now, not after minutes of training
        parser.error(f"--out {args.out} is a file; give a directory for the checkpoint")
    if args.repository is not None and (args.name is None or not MODEL_NAME.fullmatch(args.name)):
        parser.error(f"--repository needs --name matching {MODEL_NAME.pattern} (the model's directory)")
    if args.repository is not None:
        for directory in (args.repository, args.repository / args.name):
            if directory.exists() and not directory.is_dir():
                parser.error(f"--repository: {directory} is a file; the model's versions go in a directory")
    if args.scale_rate is not None and not 0.0 <= args.scale_rate < 1.0:
        parser.error(f"--scale-rate must lie in [0, 1), got {args.scale_rate}")
    return args


def _served(model_dir: Path) -> tuple[int, Forecaster] | None:
    """The newest version under ``model_dir`` that loads, as a service serves it (skipping damaged ones)."""
    for number in reversed(versions_in(model_dir) if model_dir.is_dir() else []):
        try:
            return number, load_checkpoint(model_dir / str(number))[0]
        except (CheckpointError, OSError):
            continue
    return None


def _scale_rate(args: argparse.Namespace, console: Console) -> float:
    """--scale-rate, else normalised scores, unless the version a service serves of the model ``--repository``
    publishes into (its newest that loads) is calibrated on raw scores: a normalised version's larger state
    would not fit its sessions' store, and the service would skip the new version."""
    if args.scale_rate is not None:
        return float(args.scale_rate)
    served = _served(args.repository / args.name) if args.repository is not None else None
    if served is not None and served[1].calibration is not None and not served[1].calibration.normalised:
        console.print(f"{args.name} version {served[0]} scores raw errors: calibrating alike"
                      " (--scale-rate 0), so the two share a state layout")
        return 0.0
    return DEFAULT_SCALE_RATE


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
        season=args.season,
        scale_rate=_scale_rate(args, console),
    )
    try:
        series, default_name = _load(args)
        for column in series.skipped:
            console.print(f"column {column!r} left out: it says when, not what (name it in --columns to model it)")
        for column, count in series.filled.items():
            console.print(f"column {column!r}: {count} missing values filled by linear interpolation")
        # What training would refuse at once (too few rows, a constant column, too many lags), refused before
        # the bar shows.
        split = split_point(len(series.values), config.val_fraction, MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS)
        fit_scaler(series.values[:split], series.features)
        check_lags(config.lags, split, len(series.values))
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
    scores = baseline_scores(series, result)
    print_table(scores, console)
    name = args.name or default_name
    split = result.split

    def write(directory: Path) -> str:
        version = save_checkpoint(
            result.model, directory, name=name, training=_summary(args, series, result, scores)
        )
        plot_validation(
            directory / "validation.png",
            series.values[split:],
            result.predictions[split - 1 :],
            series.features,
            f"{name}: validation one-step prediction (MAE {scores.relative('model'):.2f} × persistence)",
        )
        return version

    try:
        if args.repository is None:
            written, version = args.out, write(args.out)
        else:
            with publishing(args.repository, name) as publication:
                version = write(publication.staging)
            written = publication.published
    except OSError as exc:
        print(f"error: cannot write the checkpoint to {args.out or args.repository}: {exc}", file=sys.stderr)
        return 2
    console.print(
        f"best epoch {result.best_epoch} of {result.epochs} (stopped by {result.stopped_by},"
        f" {result.seconds:.1f} s); wrote {written} version {version} and validation.png"
    )
    return 0


def _summary(
    args: argparse.Namespace, series: Series, result: TrainResult, scores: Scores
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
        "autoregression_lags": {f: list(own) for f, own in zip(series.features, result.lags, strict=True)},
        "stopped_by": result.stopped_by,
        "season": result.season,
        "validation_mae": scores.as_dict(),
    }


if __name__ == "__main__":
    sys.exit(main())
