"""Are the served intervals calibrated on series the model never saw? Prints a table.

    python -m bench.intervals                       # every series, 45 s of training each
    python -m bench.intervals --max-seconds 10 --only wind
    python -m bench.intervals --cost                  # what scoring and adapting add to a batch's compute
    python -m bench.intervals --rates 0.1:0.05,0.1:0   # adaptation rate γ : level rate β, each pair in-process

Per series (real data shipped inside installed packages, none of them the shipped model's): train with
``python -m model.train`` on the first 80% (it calibrates on the last fifth of those rows), start the
service on that checkpoint, stream the whole series through one session in chunks of 37 with
``"levels": [80, 95]``, and score the one-step intervals on the last 20%, which neither the training nor
the calibration saw: coverage, mean width and the interval (Winkler) score, the width plus 2/α times any
miss distance (Gneiting & Raftery 2007; lower is better). Next to them, statsforecast's AutoARIMA fitted on
the same 80% and run one step ahead over the tail with its parameters fixed (its in-sample intervals).
"""

from __future__ import annotations

import functools
import logging
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from vega_datasets import local_data

from bench.forecast_quality import CHUNK, Case, _goog_daily, _sample_prices, each_case, series_parser, train
from harness.processes import start_service
from model.checkpoint import load_checkpoint
from model.conformal import calibrate
from model.data import split_point
from model.fit import MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS, TrainConfig
from service.config import DEFAULT_MODEL_PATH

LEVELS = (80, 95)
CASES = [
    Case("seattle-weather temp_max, daily", 7, lambda: local_data.seattle_weather()[["temp_max"]]),
    Case("seattle-weather wind, daily", 7, lambda: local_data.seattle_weather()[["wind"]]),
    Case("sf-temps, hourly (first 2500)", 24, lambda: local_data.sf_temps()[["temp"]].iloc[:2500]),
    Case("GOOG close, daily (matplotlib)", 5, _goog_daily),
    Case("S&P 500, monthly (matplotlib)", 12, lambda: _sample_prices("^GSPC")),
]


@dataclass(frozen=True)
class Scored:
    coverage: float  # share of tail values inside the interval
    width: float  # mean upper − lower
    winkler: float  # mean interval score


def score(truth: np.ndarray, lower: np.ndarray, upper: np.ndarray, level: float) -> Scored:
    alpha = 1 - level / 100
    below, above = np.maximum(lower - truth, 0), np.maximum(truth - upper, 0)
    winkler = (upper - lower) + 2 / alpha * (below + above)
    inside = (truth >= lower) & (truth <= upper)
    return Scored(float(inside.mean()), float((upper - lower).mean()), float(winkler.mean()))


def served_intervals(checkpoint: Path, values: np.ndarray, logs: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per level, (lower, upper) of the one-step interval for every row after the first, (T − 1,), from a
    session of the real service fed the series chunk by chunk."""
    server = start_service(checkpoint, logs, {"GRU_DEVICE": "cpu", "GRU_TORCH_THREADS": "1"})
    bands: dict[int, tuple[list[float], list[float]]] = {level: ([], []) for level in LEVELS}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for start in range(0, len(values), CHUNK):
                chunk = values[start : start + CHUNK]
                response = http.post("/v1/sessions/bench/predict", json={
                    "values": chunk.tolist(), "offset": start, "levels": list(LEVELS)})
                response.raise_for_status()
                for level in LEVELS:
                    band = response.json()["intervals"][str(level)]
                    bands[level][0].extend(row[0] for row in band["lower"])
                    bands[level][1].extend(row[0] for row in band["upper"])
    finally:
        server.stop(signal.SIGKILL)
    # the interval given after row t is for row t + 1
    return {level: (np.array(lower[:-1]), np.array(upper[:-1])) for level, (lower, upper) in bands.items()}


def arima_intervals(values: np.ndarray, split: int, season: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """AutoARIMA fitted on the first ``split`` rows, one step ahead over the series with those parameters."""
    from statsforecast.models import AutoARIMA

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoARIMA(season_length=season).fit(values[:split])
        out = model.forward(y=values, h=1, level=list(LEVELS), fitted=True)
    return {level: (out[f"fitted-lo-{level}"][1:], out[f"fitted-hi-{level}"][1:]) for level in LEVELS}


def rates(case: Case, max_seconds: float, workdir: Path, candidates: list[tuple[float, float]]) -> list[str]:
    """Per pair of rates (γ, β), "coverage 80 | 95; score 80 | 95 ÷ AutoARIMA's", from one-step intervals
    computed in-process (``Forecaster.observe`` over the whole series) with the trained model recalibrated
    on its validation rows at those rates (its linear term was refitted on them: a little optimistic, the
    same for every pair)."""
    values, split, out, _ = train(case, max_seconds, workdir)
    forecaster, _ = load_checkpoint(out)
    assert forecaster.calibration is not None
    steps = forecaster.calibration.steps
    validation = split_point(split, TrainConfig.val_fraction, MIN_TRAIN_ROWS, MIN_VALIDATION_ROWS)
    truth, series = values[split:, 0], torch.tensor(values[None], dtype=torch.float32)
    arima = {level: score(truth, lower[split - 1 :], upper[split - 1 :], level)
             for level, (lower, upper) in arima_intervals(values[:, 0], split, case.season).items()}
    cells = []
    for adapt_rate, scale_rate in candidates:
        forecaster.calibration = None  # calibrate streams the series through the bare model
        forecaster.calibration = calibrate(forecaster, values[:split], validation, steps, adapt_rate, scale_rate)
        observed = forecaster.observe(series, forecaster.initial_state(1))
        assert observed.log_scales is not None
        middle = observed.predictions[0, split - 1 : -1, 0].numpy()
        widths = forecaster.calibration.half_widths(np.array(LEVELS), observed.log_scales[0, split - 1 : -1],
                                                    np.array(forecaster.config.diff_scale))[:, :, 0]
        scored = [score(truth, middle - w, middle + w, level) for level, w in zip(LEVELS, widths, strict=True)]
        cells.append(f"{scored[0].coverage:.1%} | {scored[1].coverage:.1%};"
                     f" {scored[0].winkler / arima[80].winkler:.2f} | {scored[1].winkler / arima[95].winkler:.2f}")
    return cells


def evaluate(case: Case, max_seconds: float, workdir: Path) -> dict[str, object]:
    values, split, out, _ = train(case, max_seconds, workdir)
    truth = values[split:, 0]
    tail = slice(split - 1, None)  # intervals for rows split .. T − 1
    row: dict[str, object] = {"name": case.name, "tail": len(truth)}
    for method, bands in (("model", served_intervals(out, values, workdir)),
                          ("arima", arima_intervals(values[:, 0], split, case.season))):
        for level, (lower, upper) in bands.items():
            row[f"{method}{level}"] = score(truth, lower[tail], upper[tail], level)
    return row


def cost(repeats: int = 200) -> None:
    """Median time of one batch through the shipped model: ``predict`` alone, and ``observe`` (predict,
    scores and adaptation), one torch thread."""
    torch.set_num_threads(1)
    forecaster, _ = load_checkpoint(DEFAULT_MODEL_PATH)
    table = Table(title="One batch through the shipped model, median ms (1 torch thread)")
    for column in ("batch × steps", "predict", "observe", "added"):
        table.add_column(column, justify="right")
    for batch, steps in ((1, 1), (64, 1), (1, 37), (64, 37)):
        x = torch.randn(batch, steps, 1) + 50
        state = forecaster.observe(x, forecaster.initial_state(batch)).states
        timings = []
        for method in (forecaster.predict, forecaster.observe):
            with torch.inference_mode():
                method(x, state)
                samples = []
                for _ in range(repeats):
                    began = time.perf_counter()
                    method(x, state)
                    samples.append(time.perf_counter() - began)
            timings.append(1000 * float(np.median(samples)))
        table.add_row(f"{batch} × {steps}", f"{timings[0]:.3f}", f"{timings[1]:.3f}",
                      f"{timings[1] - timings[0]:+.3f}")
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> None:
    parser = series_parser(__doc__)
    parser.add_argument("--cost", action="store_true", help="time scoring and adapting instead")
    parser.add_argument("--rates", default="", help="compare these γ:β rate pairs (comma-separated) instead")
    args = parser.parse_args(argv)
    if args.cost:
        cost()
        return
    if args.rates:
        pairs = (pair.split(":") for pair in args.rates.split(","))
        candidates = [(float(gamma), float(beta)) for gamma, beta in pairs]
        table = Table(title="Coverage of the 80% | 95% one-step intervals; Winkler score ÷ AutoARIMA's")
        for column in ("series", *(f"γ {gamma:g} β {beta:g}" for gamma, beta in candidates)):
            table.add_column(column)
        compare = functools.partial(rates, candidates=candidates)
        for case, cells in each_case(CASES, args.only, args.max_seconds, compare):
            table.add_row(case.name, *cells)
        Console(width=200).print(table)
        return
    logging.getLogger("statsforecast").setLevel(logging.ERROR)
    table = Table(title="One-step intervals on the unseen last 20%: model (calibrated, adapted per session)"
                        " | AutoARIMA")
    for column in ("series", "tail", "cover 80", "cover 95", "width 80", "width 95", "score 80", "score 95",
                   "score ÷ ARIMA's"):
        table.add_column(column, justify="left" if column == "series" else "right")
    verdicts = []
    for _, row in each_case(CASES, args.only, args.max_seconds, evaluate):
        cells = []
        for attribute, form in (("coverage", "{:.1%}"), ("width", "{:.3g}"), ("winkler", "{:.3g}")):
            for level in LEVELS:
                model, arima = row[f"model{level}"], row[f"arima{level}"]
                cells.append(f"{form.format(getattr(model, attribute))} | {form.format(getattr(arima, attribute))}")
        ratios = []
        for level in LEVELS:
            model, arima = row[f"model{level}"], row[f"arima{level}"]
            assert isinstance(model, Scored) and isinstance(arima, Scored)
            verdicts.append((abs(model.coverage - level / 100) <= 0.03, model.winkler <= arima.winkler))
            ratios.append(f"{model.winkler / arima.winkler:.3f}")
        table.add_row(str(row["name"]), str(row["tail"]), *cells, " | ".join(ratios))
    Console(width=180).print(table)
    print(f"coverage within 3 points of nominal: {sum(v[0] for v in verdicts)} of {len(verdicts)};"
          f" interval score no worse than AutoARIMA: {sum(v[1] for v in verdicts)} of {len(verdicts)}")


if __name__ == "__main__":
    main()
