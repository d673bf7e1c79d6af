"""What GRU_UPGRADE=replay costs: an upgraded session against the new version having seen the whole series.

    python -m bench.replay

A session moved onto a new version at step u has that version's state primed from the K raw values the old
state keeps, not from the whole history. This runs the shipped model (the "new version") over the hourly
Seattle temperatures three ways from each of 20 upgrade points in the last 20% of the year: over the whole
series (the reference), primed with the K values before u (replay), and from a fresh state at u (what a
client does today after a 409: reset). It prints the mean distance of replay and reset to the reference, by
steps after the upgrade, beside the model's own error against the truth over the same steps.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from vega_datasets import local_data

from bench.common import DEFAULT_WEIGHTS, machine
from model.checkpoint import load_checkpoint

WINDOWS = ((1, 10), (11, 50), (51, 200), (201, 1000))


def _run(forecaster: torch.nn.Module, values: np.ndarray) -> np.ndarray:
    """One-step predictions over ``values`` (T, F) from a fresh state."""
    with torch.inference_mode():
        x = torch.from_numpy(values)[None]
        y, _ = forecaster.predict(x, forecaster.initial_state(1))  # type: ignore[operator]
    return np.asarray(y[0].numpy())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=20, help="upgrade points in the validation tail")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    forecaster, meta = load_checkpoint(DEFAULT_WEIGHTS)
    series = local_data("seattle-temps")["temp"].to_numpy(np.float32)[:, None]  # (N, 1)
    lags, horizon = forecaster.config.lags, WINDOWS[-1][1]
    reference = _run(forecaster, series)
    start = int(len(series) * 0.8)
    points = np.linspace(start, len(series) - horizon - 1, args.points).astype(int)
    replay_gap, reset_gap, model_error = (np.zeros(horizon) for _ in range(3))
    for u in points:
        after = series[u : u + horizon]
        replayed = _run(forecaster, np.concatenate([series[u - lags : u], after]))[lags:]
        fresh = _run(forecaster, after)
        replay_gap += np.abs(replayed - reference[u : u + horizon])[:, 0] / len(points)
        reset_gap += np.abs(fresh - reference[u : u + horizon])[:, 0] / len(points)
        model_error += np.abs(reference[u : u + horizon] - series[u + 1 : u + horizon + 1])[:, 0] / len(points)
    table = Table(title=f"replay vs reset at an upgrade, {meta['name']} ({args.points} upgrade points, °F)")
    for column in ("steps after the upgrade", "replay − reference", "reset − reference", "model − truth"):
        table.add_column(column, justify="right")
    for first, last in WINDOWS:
        window = slice(first - 1, last)
        table.add_row(f"{first}–{last}", f"{replay_gap[window].mean():.2e}", f"{reset_gap[window].mean():.2e}",
                      f"{model_error[window].mean():.4f}")
    console = Console()
    console.print(table)
    console.print(machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
