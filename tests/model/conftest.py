"""Fixtures for the model tests: small deterministic forecasters and CSV files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model import Forecaster, ForecasterConfig


def make_forecaster(features: int = 2, hidden: int = 8, layers: int = 2, lags: int = 3, seed: int = 0,
                    variant: str = "seed") -> Forecaster:
    """A random forecaster whose GRU and linear term both move the output, so state bugs show."""
    torch.manual_seed(seed)
    names = tuple(f"f{i}" for i in range(features))
    config = ForecasterConfig(
        features=names, hidden_size=hidden, num_layers=layers, variant=variant, lags=lags,  # type: ignore[arg-type]
        mean=(1.0,) * features, scale=(2.0,) * features, diff_scale=(0.5,) * features,
    )
    forecaster = Forecaster(config)
    with torch.no_grad():
        forecaster.head.weight.normal_(0, 0.5)
        forecaster.autoregression.weight.normal_(0, 0.3)
    return forecaster.eval()


@pytest.fixture
def forecaster() -> Forecaster:
    return make_forecaster()


CsvWriter = Callable[..., Path]


@pytest.fixture
def write_csv(tmp_path: Path) -> CsvWriter:
    """Write text or columns to ``tmp_path/name`` and return the path."""

    def write(text: str | None = None, name: str = "series.csv", **columns: np.ndarray) -> Path:
        path = tmp_path / name
        if text is None:
            header = ",".join(columns)
            rows = zip(*columns.values(), strict=True)
            text = header + "\n" + "\n".join(",".join(f"{v:.6g}" for v in row) for row in rows) + "\n"
        path.write_text(text)
        return path

    return write


def seasonal_series(steps: int, seed: int = 0) -> np.ndarray:
    """A noisy season of 12 steps on a slow trend: something a forecaster can beat persistence on."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    return 10 + 0.02 * t + 3 * np.sin(2 * np.pi * t / 12) + rng.normal(0, 0.3, steps)
