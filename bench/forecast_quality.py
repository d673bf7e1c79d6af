"""Does the training CLI beat the classical forecasts on real series? Prints a table.

    python -m bench.forecast_quality                      # every series, 45 s of training each
    python -m bench.forecast_quality --max-seconds 10 --only weekly

The protocol is the independent evaluation's: train with ``python -m model.train`` (default flags) on the
first 80% of a series, stream the whole series through ``Forecaster.predict`` in chunks from
``initial_state`` as a served session would, and score the one-step MAE on the last 20% against
persistence, seasonal naive and a least-squares autoregression on differences (order by AIC, per feature).
The series are real data shipped inside installed packages (vega_datasets, matplotlib's sample data);
statsmodels' datasets are left alone, reserved for the independent evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import matplotlib
import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from vega_datasets import local_data

from model.baselines import persistence, seasonal_naive
from model.checkpoint import load_checkpoint
from model.forecaster import Forecaster
from model.train import main as train_main

TRAIN_FRACTION = 0.8
CHUNK = 37  # an odd chunk size, so chunk boundaries fall everywhere relative to any season


@dataclass(frozen=True)
class Case:
    name: str
    season: int
    load: Callable[[], pd.DataFrame]  # numeric columns only, one row per step


def _resampled(frame: pd.DataFrame, columns: list[str], rule: str) -> pd.DataFrame:
    """Means over each period of ``rule`` ("W", "D"): the shorter series the evaluation is about."""
    return frame.set_index(pd.to_datetime(frame["date"]))[columns].resample(rule).mean().reset_index(drop=True)


def _weekly(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return _resampled(frame, columns, "W")


def _daily(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    return _resampled(frame, columns, "D")


def _stock(symbol: str) -> pd.DataFrame:
    frame = local_data.stocks()
    return frame[frame.symbol == symbol][["price"]].reset_index(drop=True)


def _sample_prices(column: str) -> pd.DataFrame:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "Stocks.csv"
    return pd.read_csv(path, comment="#")[[column]].dropna().reset_index(drop=True)


def _goog_daily() -> pd.DataFrame:
    path = Path(matplotlib.get_data_path()) / "sample_data" / "goog.npz"
    with np.load(path) as archive:
        return pd.DataFrame({"close": archive["price_data"]["close"]})


WEATHER = ["temp_max", "temp_min", "wind", "precipitation"]
EMPLOYMENT = ["goods_producing", "service_providing", "government", "construction"]
CASES = [
    Case("seattle-weather temp_max, daily", 7, lambda: local_data.seattle_weather()[["temp_max"]]),
    Case("seattle-weather 4 columns, daily", 7, lambda: local_data.seattle_weather()[WEATHER]),
    Case("seattle-weather temp_max, weekly", 52, lambda: _weekly(local_data.seattle_weather(), ["temp_max"])),
    Case("seattle-weather 4 columns, weekly", 52, lambda: _weekly(local_data.seattle_weather(), WEATHER)),
    Case("sf-temps, daily mean", 7, lambda: _daily(local_data.sf_temps(), ["temp"])),
    Case("sf-temps, hourly (first 2500)", 24, lambda: local_data.sf_temps()[["temp"]].iloc[:2500]),
    Case("us-employment nonfarm, monthly", 12, lambda: local_data.us_employment()[["nonfarm"]]),
    Case("us-employment 4 sectors, monthly", 12, lambda: local_data.us_employment()[EMPLOYMENT]),
    Case("stocks MSFT, monthly", 12, lambda: _stock("MSFT")),
    Case("stocks AMZN, monthly", 12, lambda: _stock("AMZN")),
    Case("stocks IBM, monthly", 12, lambda: _stock("IBM")),
    Case("S&P 500, monthly (matplotlib)", 12, lambda: _sample_prices("^GSPC")),
    Case("GOOG close, daily (matplotlib)", 5, _goog_daily),
]


def aic_difference_ar(train: np.ndarray, values: np.ndarray, longest: int = 24) -> np.ndarray:
    """One-step forecasts of one feature by AR on differences with intercept, order by AIC on ``train``."""
    diffs = np.diff(train)
    best: tuple[float, np.ndarray, int] | None = None
    for order in range(1, min(longest, len(diffs) // 5) + 1):
        rows = np.lib.stride_tricks.sliding_window_view(diffs[:-1], order)  # (N − p, p), newest last
        design = np.column_stack([np.ones(len(rows)), rows])
        target = diffs[order:]
        coef, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = target - design @ coef
        aic = len(target) * np.log(residual.var() + 1e-300) + 2 * (order + 1)
        if best is None or aic < best[0]:
            best = (aic, coef, order)
    assert best is not None
    _, coef, order = best
    all_diffs = np.concatenate([np.zeros(order), np.diff(values)])  # (p + T − 1,)
    rows = np.lib.stride_tricks.sliding_window_view(all_diffs[:-1], order)  # (T − 1, p)
    return values[:-1] + coef[0] + rows @ coef[1:]


def stream(forecaster: Forecaster, values: np.ndarray) -> np.ndarray:
    """One-step predictions (T − 1, F) of a session fed the series chunk by chunk from its first row."""
    state = forecaster.initial_state(1)
    whole = torch.tensor(values, dtype=torch.float32)[None]  # (1, T, F)
    outputs = []
    with torch.no_grad():
        for start in range(0, whole.size(1), CHUNK):
            predictions, state = forecaster.predict(whole[:, start : start + CHUNK], state)
            outputs.append(predictions[0])
    return torch.cat(outputs)[:-1].numpy().astype(np.float64)


def train(case: Case, max_seconds: float, workdir: Path) -> tuple[np.ndarray, int, Path, float]:
    """The series, its split, a checkpoint the CLI trained (and calibrated) on the rows before it, and the
    seconds the training took."""
    frame = case.load().astype(float)
    values = frame.to_numpy()
    split = int(len(values) * TRAIN_FRACTION)
    csv = workdir / "train.csv"
    frame.iloc[:split].to_csv(csv, index=False)
    out = workdir / "model"
    started = time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):
        status = train_main(["--csv", str(csv), "--out", str(out), "--max-seconds", str(max_seconds)])
    seconds = time.monotonic() - started
    if status != 0:
        raise RuntimeError(f"{case.name}: training failed with status {status}")
    return values, split, out, seconds


def evaluate(case: Case, max_seconds: float, workdir: Path) -> dict[str, float]:
    """Mean over features of MAE / persistence MAE for each forecast, and the training time."""
    values, split, out, seconds = train(case, max_seconds, workdir)
    truth = values[split:]
    forecasts = {
        "model": stream(load_checkpoint(out)[0], values),
        "persistence": persistence(values),
        "seasonal": seasonal_naive(values, case.season),
        "ar": np.column_stack([aic_difference_ar(values[:split, j], values[:, j]) for j in range(values.shape[1])]),
    }
    mae = {name: np.abs(p[split - 1 :] - truth).mean(axis=0) for name, p in forecasts.items()}
    row = {name: float(np.mean(m / mae["persistence"])) for name, m in mae.items()}
    row.update(seconds=seconds, rows=len(values), features=values.shape[1])
    return row


def series_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a bench that trains a model per series: the training budget and which series to run."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--max-seconds", type=float, default=45.0, help="training budget per series")
    parser.add_argument("--only", default="", help="run the series whose name contains this text")
    return parser


Result = TypeVar("Result")


def each_case(cases: Iterable[Case], only: str, max_seconds: float,
              run: Callable[[Case, float, Path], Result]) -> Iterator[tuple[Case, Result]]:
    """Each case whose name contains ``only``, with what ``run`` makes of it in a work directory of its own
    (removed before the next case starts)."""
    for case in cases:
        if only in case.name:
            with tempfile.TemporaryDirectory() as workdir:
                result = run(case, max_seconds, Path(workdir))
            yield case, result


def main(argv: list[str] | None = None) -> None:
    parser = series_parser(__doc__)
    args = parser.parse_args(argv)
    table = Table(title=f"One-step MAE on the last 20% ÷ persistence MAE (training ≤ {args.max_seconds:g} s)")
    for column in ("series", "T", "F", "model", "seasonal naive", "AR (AIC)", "train s"):
        table.add_column(column, justify="left" if column == "series" else "right")
    rows = []
    for case, row in each_case(CASES, args.only, args.max_seconds, evaluate):
        rows.append(row)
        cells = [f"{row[k]:.3f}" for k in ("model", "seasonal", "ar")]
        table.add_row(case.name, str(row["rows"]), str(row["features"]), *cells, f"{row['seconds']:.0f}")
    if rows:
        means = [f"{np.mean([r[k] for r in rows]):.3f}" for k in ("model", "seasonal", "ar")]
        table.add_row("mean", "", "", *means, "")
    Console(width=120).print(table)
    beats = sum(r["model"] < 1 for r in rows)
    matches = sum(r["model"] <= 1.02 * r["ar"] for r in rows)
    print(f"model beats persistence on {beats} of {len(rows)} series; within 2% of AR or better on {matches}")


if __name__ == "__main__":
    main()
