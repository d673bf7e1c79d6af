"""Our GRU against torch's LSTM: what each costs to serve and what each learns; prints five tables.

    python -m bench.gru_vs_lstm                     # the whole comparison, under five minutes on 2 cores
    python -m bench.gru_vs_lstm --max-seconds 5 --lag-seconds 3 --lags 1 8 32 --series "sf-temps, daily mean"

1. **Cost** at ``bench.cell``'s serving shapes: parameters, state bytes per session (the GRU carries h,
   the LSTM h and c) and µs per forward (thread CPU time, one torch thread, under ``inference_mode``;
   lowest of the interleaved rounds' medians) for our GRU (seed variant, what the service ships),
   ``nn.GRU``, ``nn.LSTM`` at the same hidden size, and ``nn.LSTM`` at the hidden size whose parameter
   count is nearest the GRU's.
2. **Quality on real series**: the Forecaster trained by ``model.fit.train`` (the training CLI's loop and
   defaults) with the same wall-clock budget, once with our GRU as its core and once with ``nn.LSTM``
   (``LSTMForecaster``, which exists for this comparison only), on the first 80% of series the quality
   bench uses; streamed from ``initial_state`` in chunks, one-step MAE on the unseen last 20% ÷ persistence.
3. **Memory**: x_t = a·x_{t−k} + √(1 − a²)·ε_t, whose next value depends only on the value k steps back,
   for growing k; the same training with ``--lags 1`` (so the linear term cannot reach back: what is kept
   is the core's). The score is the share of the gap between forecasting the mean (no memory) and the
   oracle a·x_{t+1−k} that the model closes on the unseen tail; a lag is kept at 0.5 or more. For scale, the
   ridge autoregression on the last k differences (what ``--lags k`` gives the linear term) is scored too.
4. **Summary**: one row per model at the first shape (the shipped model's size; it reads one input where the
   shipped GRU reads two, a feature and its difference), the table the README shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from bench.cell import BATCHES, SHAPES, STEPS, best_median_us
from bench.common import machine
from bench.forecast_quality import CASES, TRAIN_FRACTION, stream
from model.baselines import difference_ar_predictions, fit_difference_ar, newest, persistence
from model.data import fit_scaler, series_from_frame
from model.fit import TrainConfig, train
from model.forecaster import Forecaster, ForecasterConfig
from model.gru import GRU

FLOAT_BYTES = 4  # states are float32
SERIES = ("sf-temps, daily mean", "seattle-weather temp_max, weekly", "us-employment 4 sectors, monthly")
LAGS = (2, 4, 8, 16, 32)
LAG_ROWS = 2500
LAG_COEFFICIENT = 0.9  # a: how much of x_{t+1} the value k steps back explains (a² of its variance)
KEPT = 0.5  # share of the memory gap a model must close for a lag to count as kept
CORES = ("GRU", "LSTM")  # the two Forecaster cores trained
LINEAR = "AR on k diffs"  # the memory part's yardstick: what --lags k gives the linear term alone


class LSTMForecaster(Forecaster):
    """The Forecaster with ``torch.nn.LSTM`` as its recurrent core, for this comparison only.

    Everything but the core is the Forecaster's own (scaling, differences, linear term, head, state layout),
    so the two differ in their core alone; each layer's state is [h | c]. Streams whole rows only: the
    service, the sole user of unequal lengths, never serves it.
    """

    core_states = 2

    def __init__(self, config: ForecasterConfig):
        super().__init__(config)
        del self.gru  # built by the parent; this model's core is the LSTM
        self.lstm = nn.LSTM(2 * config.num_features, config.hidden_size, config.num_layers, batch_first=True)

    def _recurrence(self, x: Tensor, h0: Tensor, lengths: Tensor | list[int] | None) -> tuple[Tensor, Tensor]:
        if lengths is not None:
            raise ValueError("LSTMForecaster runs rows of equal length only")
        h, c = h0.chunk(2, dim=2)  # (L, B, H) each
        out, (h_n, c_n) = self.lstm(x, (h.contiguous(), c.contiguous()))
        return out, torch.cat([h_n, c_n], dim=2)


BUILDERS: dict[str, Callable[[ForecasterConfig], Forecaster]] = {"GRU": Forecaster, "LSTM": LSTMForecaster}


def parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matched_hidden(inputs: int, hidden: int, layers: int) -> int:
    """The LSTM hidden size whose parameter count is nearest a GRU's of ``hidden`` (the smaller on a tie)."""
    target = parameters(nn.GRU(inputs, hidden, layers))
    return min(range(1, hidden + 1), key=lambda h: (abs(parameters(nn.LSTM(inputs, h, layers)) - target), h))


@dataclass(frozen=True)
class Core:
    """One contender of the cost table at one shape."""

    name: str
    module: nn.Module
    hidden: int
    states: int  # vectors of ``hidden`` floats per layer carried between calls: 1 (h) or 2 (h and c)

    def state_bytes(self, layers: int) -> int:
        return self.states * layers * self.hidden * FLOAT_BYTES

    def call(self, x: Tensor, layers: int) -> Callable[[], object]:
        """The forward on x from a random state, as a served chunk runs it."""
        shape = (layers, x.size(0), self.hidden)
        h0 = torch.randn(shape) * 0.5
        if self.states == 1:
            return lambda: self.module(x, h0)
        c0 = torch.randn(shape) * 0.5
        return lambda: self.module(x, (h0, c0))


def cores(shape: tuple[int, int, int]) -> list[Core]:
    inputs, hidden, layers = shape
    torch.manual_seed(0)
    matched = matched_hidden(inputs, hidden, layers)
    return [
        Core("ours GRU", GRU(inputs, hidden, layers, variant="seed").eval(), hidden, 1),
        Core("nn.GRU", nn.GRU(inputs, hidden, layers, batch_first=True).eval(), hidden, 1),
        Core("nn.LSTM", nn.LSTM(inputs, hidden, layers, batch_first=True).eval(), hidden, 2),
        Core("nn.LSTM matched", nn.LSTM(inputs, matched, layers, batch_first=True).eval(), matched, 2),
    ]


@dataclass
class CostRow:
    shape: tuple[int, int, int]
    names: list[str]  # "ours GRU" first
    hidden: list[int]
    params: list[int]
    state_bytes: list[int]
    times_us: dict[tuple[int, int], list[float]]  # (B, T) -> µs per contender


def measure_cost(shape: tuple[int, int, int], batches: tuple[int, ...], steps: tuple[int, ...], min_run_time: float,
                 rounds: int) -> CostRow:
    contenders = cores(shape)
    layers = shape[2]
    row = CostRow(shape, [c.name for c in contenders], [c.hidden for c in contenders],
                  [parameters(c.module) for c in contenders],
                  [c.state_bytes(layers) for c in contenders], {})
    with torch.inference_mode():
        for batch in batches:
            for length in steps:
                x = torch.randn(batch, length, shape[0])
                calls = [c.call(x, layers) for c in contenders]
                row.times_us[batch, length] = best_median_us(calls, min_run_time, 1, rounds, time.thread_time)
    return row


@dataclass
class QualityRow:
    series: str
    rows: int
    mae: dict[str, float]  # core -> one-step MAE on the unseen tail ÷ persistence's, mean over features
    epochs: dict[str, str]  # core -> "best/run": best 0 means the linear model alone was kept


def fit(frame: pd.DataFrame, core: str, config: TrainConfig) -> tuple[Forecaster, str]:
    """Train on the first TRAIN_FRACTION of ``frame``; the model and its "best epoch/epochs run"."""
    split = int(len(frame) * TRAIN_FRACTION)
    series = series_from_frame(frame.iloc[:split], None, "bench")
    result = train(series, config, build=BUILDERS[core])
    return result.model, f"{result.best_epoch}/{result.epochs}"


def warm_up(config: TrainConfig) -> None:
    """One epoch of each core on a short series, outside every budget: TorchScript compiles our GRU's
    training path on its first calls (seconds), a one-off cost that would otherwise eat its first budget."""
    frame = pd.DataFrame({"x": lagged_series(2, 200)})
    for core in CORES:
        fit(frame, core, dataclasses.replace(config, epochs=1, max_seconds=60.0))


def tail_mae(predictions: np.ndarray, values: np.ndarray) -> np.ndarray:
    """MAE per feature (F,) of one-step ``predictions`` (T − 1, F) of ``values`` (T, F) on the unseen tail."""
    split = int(len(values) * TRAIN_FRACTION)
    return np.abs(predictions[split - 1 :] - values[split:]).mean(axis=0)


def relative_mae(predictions: np.ndarray, values: np.ndarray) -> float:
    """Tail MAE ÷ persistence's, averaged over features (as bench.forecast_quality scores: each feature in
    its own units, so a large-valued column does not outweigh the others)."""
    return float(np.mean(tail_mae(predictions, values) / tail_mae(persistence(values), values)))


def measure_quality(name: str, config: TrainConfig) -> QualityRow:
    case = next(c for c in CASES if c.name == name)
    frame = case.load().astype(float)
    values = frame.to_numpy()
    row = QualityRow(name, len(values), {}, {})
    for core in CORES:
        model, epochs = fit(frame, core, config)
        row.mae[core] = relative_mae(stream(model, values), values)
        row.epochs[core] = epochs
    return row


def lagged_series(lag: int, rows: int, seed: int = 0) -> np.ndarray:
    """x_t = a·x_{t−k} + √(1 − a²)·ε_t, started stationary (unit variance from the first row): (rows,)."""
    noise = np.random.default_rng(seed).standard_normal(rows)
    values = noise.copy()
    spread = math.sqrt(1 - LAG_COEFFICIENT**2)
    for t in range(lag, rows):
        values[t] = LAG_COEFFICIENT * values[t - lag] + spread * noise[t]
    return values


@dataclass
class LagRow:
    lag: int
    no_memory: float  # tail MAE of forecasting the mean
    oracle: float  # tail MAE of a·x_{t+1−k}
    mae: dict[str, float]  # core (or LINEAR) -> tail MAE
    epochs: dict[str, str]

    def closed(self, core: str) -> float:
        """Share of the gap between no memory and the oracle that ``core`` closes: 1 is the oracle."""
        return (self.no_memory - self.mae[core]) / (self.no_memory - self.oracle)


def measure_lag(lag: int, rows: int, config: TrainConfig) -> LagRow:
    values = lagged_series(lag, rows)
    split = int(rows * TRAIN_FRACTION)
    truth = values[split:]
    oracle = LAG_COEFFICIENT * values[split - lag : rows - lag]
    row = LagRow(lag, float(np.abs(truth - values[:split].mean()).mean()), float(np.abs(truth - oracle).mean()),
                 {}, {})
    column = values[:, None]  # (T, 1)
    diff_scale = np.array(fit_scaler(column[:split], ("x",)).diff_scale)
    linear_fit = fit_difference_ar(column[:split], (newest(lag),), diff_scale)
    linear = difference_ar_predictions(column, linear_fit, diff_scale)
    row.mae[LINEAR] = float(tail_mae(linear, column)[0])
    frame = pd.DataFrame({"x": values})
    for core in CORES:
        model, epochs = fit(frame, core, config)
        row.mae[core] = float(tail_mae(stream(model, column), column)[0])
        row.epochs[core] = epochs
    return row


def longest_kept(rows: list[LagRow], core: str) -> int:
    """The largest k up to which every lag tried is kept; 0 when even the shortest is not."""
    kept = 0
    for row in sorted(rows, key=lambda r: r.lag):
        if row.closed(core) < KEPT:
            break
        kept = row.lag
    return kept


def _shape_text(shape: tuple[int, int, int]) -> str:
    return " ".join(map(str, shape))


def cost_tables(rows: list[CostRow]) -> tuple[Table, Table]:
    sizes = Table(title="Size: parameters and state bytes per session (float32)")
    for column in ("I H L", "model", "H", "params", "vs ours", "state bytes", "vs ours"):
        sizes.add_column(column, justify="left" if column == "model" else "right")
    for row in rows:
        for name, hidden, params, state in zip(row.names, row.hidden, row.params, row.state_bytes, strict=True):
            sizes.add_row(_shape_text(row.shape), name, str(hidden), f"{params:,}", f"{params / row.params[0]:.2f}x",
                          f"{state:,}", f"{state / row.state_bytes[0]:.2f}x")
    times = Table(title="Forward: median µs of thread CPU time, one torch thread, inference_mode (ratio: ÷ ours)")
    for column in ("I H L", "B", "T"):
        times.add_column(column, justify="right")
    for index, name in enumerate(rows[0].names):
        times.add_column(name, justify="right")
        if index:
            times.add_column("ratio", justify="right")
    for row in rows:
        for (batch, length), us in row.times_us.items():
            cells = [f"{us[0]:,.1f}"]
            for value in us[1:]:
                cells += [f"{value:,.1f}", f"{value / us[0]:.2f}x"]
            times.add_row(_shape_text(row.shape), str(batch), str(length), *cells)
    return sizes, times


def quality_table(rows: list[QualityRow], seconds: float) -> Table:
    out = Table(title=f"Real series: one-step MAE on the unseen last 20% ÷ persistence (training ≤ {seconds:g} s;"
                      " epochs best/run, best 0: the linear model alone was kept)")
    out.add_column("series")
    out.add_column("T", justify="right")
    for core in CORES:
        out.add_column(core, justify="right")
        out.add_column("epochs", justify="right")
    for row in rows:
        out.add_row(row.series, str(row.rows), *(cell for core in CORES
                                                  for cell in (f"{row.mae[core]:.3f}", row.epochs[core])))
    if rows:
        out.add_row("mean", "", *(cell for core in CORES for cell in (f"{mean_quality(rows, core):.3f}", "")))
    return out


def mean_quality(rows: list[QualityRow], core: str) -> float:
    return float(np.mean([row.mae[core] for row in rows]))


def lag_table(rows: list[LagRow], seconds: float, length: int) -> Table:
    out = Table(title=f"Memory: x_t = {LAG_COEFFICIENT}·x_(t−k) + noise, {length} rows, linear term 1 lag, training"
                      f" ≤ {seconds:g} s; tail MAE and share of the memory gap closed (kept at ≥ {KEPT})")
    for column in ("k", "no memory", "oracle", f"{LINEAR} closed"):
        out.add_column(column, justify="right")
    for core in CORES:
        for column in (f"{core} MAE", "closed", "epochs"):
            out.add_column(column, justify="right")
    for row in rows:
        cells = [f"{row.no_memory:.3f}", f"{row.oracle:.3f}", f"{row.closed(LINEAR):.2f}"]
        for core in CORES:
            cells += [f"{row.mae[core]:.3f}", f"{row.closed(core):.2f}", row.epochs[core]]
        out.add_row(str(row.lag), *cells)
    return out


def summary_table(cost: CostRow, quality: list[QualityRow], lags: list[LagRow]) -> Table:
    """One row per model at ``cost``'s shape: what the README shows."""
    batches = sorted({b for b, _ in cost.times_us})
    shown = sorted({batches[0], batches[-1]})  # one served session's chunk, and a full engine batch
    steps = max((t for _, t in cost.times_us if t <= 8), default=min(t for _, t in cost.times_us))  # a served chunk
    out = Table(title=f"GRU against LSTM at I H L = {_shape_text(cost.shape)}")
    out.add_column("model")
    for column in ("params", "state bytes", *(f"µs B={b} T={steps}" for b in shown),
                   "MAE ÷ persistence", "longest lag kept"):
        out.add_column(column, justify="right")
    trained = dict(zip(cost.names[:1] + cost.names[2:3], CORES, strict=True))  # our GRU; the LSTM at the same H
    for index, name in enumerate(cost.names):
        core = trained.get(name)
        mae = (f"{mean_quality(quality, core):.3f}" if quality else "not run") if core else "not trained"
        kept = (str(longest_kept(lags, core)) if lags else "not run") if core else "not trained"
        times = [f"{cost.times_us[b, steps][index]:,.1f}" for b in shown]
        out.add_row(f"{name} (H={cost.hidden[index]})", f"{cost.params[index]:,}", f"{cost.state_bytes[index]:,}",
                    *times, mae, kept)
    return out


def _shape(text: str) -> tuple[int, int, int]:
    inputs, hidden, layers = (int(part) for part in text.split(","))
    return inputs, hidden, layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gru_vs_lstm", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", type=_shape, default=SHAPES, metavar="I,H,L",
                        help="cost part: input size, hidden size, layers; the first one's H and L are the trained"
                             " models' and the summary's")
    parser.add_argument("--batches", nargs="+", type=int, default=BATCHES, metavar="B")
    parser.add_argument("--steps", nargs="+", type=int, default=STEPS, metavar="T")
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timing per median")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the lowest median counts")
    parser.add_argument("--series", nargs="*", default=SERIES, metavar="NAME",
                        help="real series (names in bench.forecast_quality; a unique part of one will do)")
    parser.add_argument("--max-seconds", type=float, default=12.0, help="training budget per real series and core")
    parser.add_argument("--lags", nargs="*", type=int, default=LAGS, metavar="K")
    parser.add_argument("--lag-rows", type=int, default=LAG_ROWS)
    parser.add_argument("--lag-seconds", type=float, default=10.0, help="training budget per lag and core")
    parser.add_argument("--lag-epochs", type=int, default=TrainConfig.epochs,
                        help="most epochs per lag and core: with a long --lag-seconds, the same epochs for both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = []
    for part in args.series:
        found = [c.name for c in CASES if c.name == part] or [c.name for c in CASES if part in c.name]
        if len(found) != 1:
            parser.error(f"--series {part!r} names {len(found)} series; choose one of {[c.name for c in CASES]}")
        names.append(found[0])
    if any(k < 1 or 4 * k >= args.lag_rows for k in args.lags):
        parser.error(f"--lags must lie in 1..{(args.lag_rows - 1) // 4} for --lag-rows {args.lag_rows}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the training CLI and the service on 2 cores
    try:
        return _run(args, names)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, names: list[str]) -> int:
    console = Console(width=max(Console().width, 160))
    started = time.monotonic()
    console.print(f"machine: {machine()}; load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _, hidden, layers = args.shapes[0]
    base = TrainConfig(hidden_size=hidden, num_layers=layers, seed=args.seed)
    with console.status("cost") as status:
        cost = []
        for shape in args.shapes:
            status.update(f"timing I H L = {shape}")
            cost.append(measure_cost(shape, tuple(args.batches), tuple(args.steps), args.min_run_time, args.rounds))
        status.update("warming up the training paths")
        warm_up(base)
        quality = []
        for name in names:
            status.update(f"training on {name}")
            quality.append(measure_quality(name, dataclasses.replace(base, max_seconds=args.max_seconds)))
        lags = []
        lag_config = dataclasses.replace(base, max_seconds=args.lag_seconds, epochs=args.lag_epochs, lags=1)
        for lag in args.lags:
            status.update(f"training on lag {lag}")
            lags.append(measure_lag(lag, args.lag_rows, lag_config))
    for table in (*cost_tables(cost), quality_table(quality, args.max_seconds),
                  lag_table(lags, args.lag_seconds, args.lag_rows), summary_table(cost[0], quality, lags)):
        console.print(table)
    console.print(f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())};"
                  f" {time.monotonic() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
