"""What a training run shows at the end: the validation MAE table against the baselines, and a plot.

The table answers the only question that matters for a forecaster: does it beat the forecasts that cost
nothing (persistence, seasonal naive) and the classical one (an autoregression on differences)?
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display

import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Scores:
    """Validation one-step MAE per feature (raw units) of each forecast, the model's first."""

    features: tuple[str, ...]
    mae: dict[str, np.ndarray]  # forecast name -> (F,)

    def relative(self, name: str) -> float:
        """Mean over features of MAE / persistence MAE: below 1 beats persistence. A feature persistence
        predicts exactly (a constant validation tail) counts 1 where this forecast is exact too, else inf."""
        mae, base = self.mae[name], self.mae["persistence"]
        with np.errstate(divide="ignore", invalid="ignore"):  # the zeros are decided by ``where``
            ratios = np.where(base > 0, mae / base, np.where(mae > 0, np.inf, 1.0))
        return float(np.mean(ratios))

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {name: dict(zip(self.features, e.tolist(), strict=True)) for name, e in self.mae.items()}


def score(truth: np.ndarray, forecasts: dict[str, np.ndarray], features: tuple[str, ...]) -> Scores:
    """MAE of each forecast (N, F) against truth (N, F), per feature."""
    return Scores(features, {name: np.abs(p - truth).mean(axis=0) for name, p in forecasts.items()})


def print_table(scores: Scores, console: Console) -> None:
    """One row per feature, one column per forecast (so 8 features still fit), then the ratios."""
    table = Table(title="Validation one-step MAE (lower is better)")
    table.add_column("feature")
    for name in scores.mae:
        table.add_column(name, justify="right")
    for j, feature in enumerate(scores.features):
        table.add_row(feature, *(f"{errors[j]:.4g}" for errors in scores.mae.values()))
    table.add_section()
    table.add_row("÷ persistence", *(f"{scores.relative(name):.3f}" for name in scores.mae))
    console.print(table)


def plot_validation(
    path: Path, truth: np.ndarray, prediction: np.ndarray, features: tuple[str, ...], title: str
) -> None:
    """Truth and one-step prediction over the validation tail, one panel per feature."""
    count = len(features)
    fig, axes = plt.subplots(count, 1, figsize=(10, 2.6 * count + 0.6), sharex=True, squeeze=False)
    steps = np.arange(len(truth))
    for j, (ax, name) in enumerate(zip(axes[:, 0], features, strict=True)):
        ax.plot(steps, truth[:, j], color="black", linewidth=1.2, label="truth")
        ax.plot(steps, prediction[:, j], color="tab:orange", linewidth=1.0, label="one-step prediction")
        ax.set_ylabel(name)
    # Above the first panel, right of the title: a long validation tail leaves no empty corner inside.
    axes[0, 0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False, fontsize="small")
    axes[0, 0].set_title(title, loc="left", fontsize="medium")
    axes[-1, 0].set_xlabel("validation step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
