"""Random checkpoints: the tests' tiny models and the benchmarks' stand-in when no shipped model exists."""

from __future__ import annotations

from pathlib import Path


def random_checkpoint(directory: Path, *, hidden: int, layers: int, lags: int, features: tuple[str, ...] = ("x",),
                      seed: int = 0, name: str, error_scale: float | None = None) -> Path:
    """A random forecaster saved as a checkpoint, with a head and autoregression loud enough that a wrong
    state changes the numbers; seeds give versions. ``error_scale``: calibrated as if its one-step errors
    (in units of σ_d) were spread evenly over [0, error_scale], so its intervals' widths are known."""
    import torch  # here, not at the top: the load generator imports the harness and must start fast

    from model import Forecaster, ForecasterConfig, save_checkpoint
    from model.conformal import GRID, Calibration

    torch.manual_seed(seed)
    count = len(features)
    config = ForecasterConfig(features=features, hidden_size=hidden, num_layers=layers, lags=lags,
                              mean=(0.5,) * count, scale=(0.3,) * count, diff_scale=(0.1,) * count)
    calibration = None
    if error_scale is not None:
        ranks = tuple(error_scale * rank / (GRID - 1) for rank in range(GRID))
        calibration = Calibration(counts=(GRID - 1,), quantiles=((ranks,) * count,))
    forecaster = Forecaster(config, calibration)
    with torch.no_grad():
        forecaster.head.weight.normal_(0, 0.5)
        forecaster.autoregression.weight.normal_(0, 0.2)
    save_checkpoint(forecaster, directory, name=name)
    return directory
