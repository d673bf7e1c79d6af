"""From a table of numbers to what training needs: a clean (T, F) series, a split, a scaler, windows.

Everything a user can get wrong in a CSV is caught here and raised as ``DataError`` with a message that
names the file, the column or cell, and what to do; the CLI turns it into exit status 2. Gaps inside a
column are filled by linear interpolation (the count is reported), because a recurrent model needs one
value per step and dropping rows would silently join the two sides of a gap.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from model import float32

# Seasonal-naive needs a period; the time column's spacing names the usual one (days -> a week, ...).
_PERIOD_BY_SPACING_DAYS = ((1 / 24 * 1.5, 24), (1.5, 7), (8, 52), (32, 12), (100, 4))


# Numeric columns with these names are calendar fields, left out unless --columns names them.
_TIME_NAMES = frozenset(
    {"year", "quarter", "month", "week", "day", "weekday", "hour", "minute", "second", "date", "time",
     "timestamp", "index", "period", "t"}
)




class DataError(ValueError):
    """Input the CLI refuses: the message says which file, column or cell, and what was expected."""


@dataclass(frozen=True)
class Series:
    values: np.ndarray  # (T, F) float64, no gaps
    features: tuple[str, ...]  # column names, in the order of values' columns
    filled: dict[str, int]  # column -> how many missing cells were interpolated
    season: int | None  # period implied by a time column, if the table had one
    skipped: tuple[str, ...] = ()  # numeric columns left out as time columns (an index, a year, a quarter)


@dataclass(frozen=True)
class Scaler:
    """Per-feature statistics of the training split, in the form ``ForecasterConfig`` stores them."""

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    diff_scale: tuple[float, ...]  # spread of one-step differences: the unit the model predicts in


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a CSV, turning every way it can fail into a ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass --csv the path of a CSV file with a header row")
    try:
        with warnings.catch_warnings():
            # index_col=False: rows one field longer than the header are refused, where pandas took their
            # first field for an index and shifted every column name onto its neighbour's values
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(path, index_col=False)
    except pd.errors.ParserWarning:
        raise DataError(f"{path}: a row has more fields than its header; give every column a name") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({str(exc).strip()})") from exc


def load_dataset(name: str) -> pd.DataFrame:
    """A dataset shipped inside the vega_datasets package (no network), e.g. ``seattle-temps``."""
    from vega_datasets import local_data

    names = local_data.list_datasets()
    if name not in names:
        raise DataError(f"dataset {name!r} is not shipped with vega_datasets; choose from {', '.join(names)}")
    frame: pd.DataFrame = getattr(local_data, name.replace("-", "_"))()
    return frame


def series_from_frame(frame: pd.DataFrame, columns: list[str] | None, source: str) -> Series:
    """Pick the named columns (or every numeric one that is not a step counter), check cells, fill gaps."""
    skipped: list[str] = []
    if columns is None:
        numeric = [c for c in frame.columns if _mostly_numeric(frame[c])]
        skipped = [c for c in numeric if _says_when(str(c), frame[c])]
        columns = [c for c in numeric if c not in skipped]
        if not columns:
            told = (f"; {', '.join(map(repr, skipped))} left out as saying when (a row number or a calendar"
                    " field): name them with --columns to model them") if skipped else ""
            raise DataError(f"{source}: no numeric column found; columns are {list(frame.columns)}{told}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: no column {missing[0]!r}; the columns are {list(frame.columns)}")
    if len(set(columns)) != len(columns):
        raise DataError(f"{source}: a column is named twice in {columns}")
    values = np.empty((len(frame), len(columns)))
    filled: dict[str, int] = {}
    for j, name in enumerate(columns):
        values[:, j], gaps = _numeric_column(frame[name], name, source)
        if gaps:
            filled[name] = gaps
    features = tuple(str(c) for c in columns)
    return Series(values, features, filled, _season_from_time(frame, source), tuple(map(str, skipped)))


def _mostly_numeric(column: pd.Series) -> bool:
    # A numeric column with one typo arrives as text; treat it as numeric so the typo gets reported
    # instead of the column silently disappearing from the model.
    if pd.api.types.is_bool_dtype(column) or pd.api.types.is_datetime64_any_dtype(column):
        return False
    if pd.api.types.is_numeric_dtype(column):
        return True
    present = column.dropna()
    return len(present) > 0 and pd.to_numeric(present, errors="coerce").notna().mean() > 0.5


def _says_when(name: str, column: pd.Series) -> bool:
    # A row number, a year or a quarter column says when, not what: a forecaster fed one would learn to
    # add one, or to count to four. Such columns are a calendar name, or rise by the same step every row.
    if name.strip().lower() in _TIME_NAMES:
        return True
    numbers = pd.to_numeric(column, errors="coerce").to_numpy(dtype=float)
    steps = np.diff(numbers)
    return len(steps) > 1 and bool(np.all(steps == steps[0])) and steps[0] != 0


def _numeric_column(column: pd.Series, name: str, source: str) -> tuple[np.ndarray, int]:
    """The column as floats with gaps interpolated, and how many gaps there were."""
    numbers = pd.to_numeric(column, errors="coerce")
    bad = numbers.isna() & column.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{source}: column {name!r}, row {row + 1}: {column.iloc[row]!r} is not a number"
            f" ({int(bad.sum())} such cells); fix or remove them, or choose other columns with --columns"
        )
    array = numbers.to_numpy(dtype=float)
    if not np.isfinite(array[~np.isnan(array)]).all():
        raise DataError(f"{source}: column {name!r} holds an infinite value")
    huge = np.abs(array) > float32.MAX  # the model and the service compute in float32
    if huge.any():
        row = int(np.flatnonzero(huge)[0])
        raise DataError(f"{source}: column {name!r}, row {row + 1}: {array[row]:g} is beyond float32 range"
                        " (|x| > 3.4e38), which the model computes in; rescale the column")
    gaps = int(np.isnan(array).sum())
    if gaps == len(array):
        raise DataError(f"{source}: column {name!r} is empty")
    if gaps:
        # Inside a gap: linear interpolation; before the first or after the last value: the nearest one.
        array = numbers.interpolate(method="linear", limit_direction="both").to_numpy(dtype=float)
    return array, gaps


def _season_from_time(frame: pd.DataFrame, source: str) -> int | None:
    """The period the first time column implies; refuses a file that runs newest first (a common export),
    which the model would learn backwards while the validation tail held the oldest rows. A few steps back
    are no such file: a clock's repeated hour at the end of summer time, a time-of-day column wrapping at
    midnight, day-first dates that a per-cell parse reads month-first."""
    for name in frame.columns:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column):
            continue
        try:
            stamps = pd.to_datetime(column, format="mixed")
        except (ValueError, TypeError, OverflowError):
            continue
        steps = stamps.diff()
        backwards, forwards = int((steps < pd.Timedelta(0)).sum()), int((steps > pd.Timedelta(0)).sum())
        if backwards > forwards:
            raise DataError(f"{source}: column {name!r} runs newest first ({backwards} of {len(steps) - 1} steps go"
                            " back in time); sort the file oldest first")
        spacing = steps.median()
        if pd.isna(spacing):
            continue
        days = spacing / pd.Timedelta(days=1)
        for limit, period in _PERIOD_BY_SPACING_DAYS:
            if days < limit:
                return period
        return None
    return None


def split_point(length: int, val_fraction: float, min_train: int, min_val: int) -> int:
    """Index where the validation tail starts; refuses series too short to train and validate on."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must lie strictly between 0 and 1, got {val_fraction}")
    cut = round(length * (1.0 - val_fraction))
    if cut < min_train or length - cut < min_val:
        needed = max(int(np.ceil(min_train / (1 - val_fraction))), int(np.ceil(min_val / val_fraction)))
        raise DataError(
            f"only {length} rows: need at least {min_train} for training and {min_val} for validation"
            f" (at --val-fraction {val_fraction}, about {needed} rows); give a longer series"
        )
    return cut


def fit_scaler(train: np.ndarray, features: tuple[str, ...]) -> Scaler:
    """Mean, spread and difference spread per feature of the training split; refuses constant columns."""
    scale = train.std(axis=0)
    diffs = np.diff(train, axis=0)
    diff_scale = diffs.std(axis=0)
    for j, name in enumerate(features):
        if scale[j] == 0:
            raise DataError(
                f"column {name!r} is constant ({train[0, j]:g}) over the training rows: there is nothing to"
                " learn; drop it with --columns"
            )
        if diff_scale[j] == 0:
            raise DataError(
                f"column {name!r} changes by exactly {diffs[0, j]:g} every training row (a counter or a"
                " straight line): there is nothing to learn; drop it with --columns"
            )
        # The config holds both spreads as float32 divisors: below its smallest normal number one becomes 0
        # (every answer NaN), and alternating values near float32's limit step by twice it.
        for what, spread in (("values", scale[j]), ("one-step changes", diff_scale[j])):
            if not float32.holds(float(spread), positive=True):
                raise DataError(
                    f"column {name!r}: the spread of its {what} over the training rows ({spread:g}) is outside"
                    f" float32's range ({float32.TINY:.3g} to {float32.MAX:.3g}), which the model computes in;"
                    " rescale the column"
                )
    return Scaler(tuple(train.mean(axis=0).tolist()), tuple(scale.tolist()), tuple(diff_scale.tolist()))


def sample_windows(
    values: Tensor, lags: int, length: int, batch: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Random windows for truncated backprop: (prior (B, K, F), inputs (B, W, F), targets (B, W, F)).

    ``prior`` is the K values before each window, as the state of a series streamed from its first step
    would hold them (the first value repeated before the start), so the model sees the same differences
    in training as in serving; only the GRU's hidden state starts cold.
    """
    steps = values.size(0)
    padded = torch.cat([values[:1].expand(lags, -1), values])  # (K + T, F)
    starts = torch.randint(0, steps - length, (batch,), generator=generator)
    offsets = torch.arange(length + 1)
    inputs_and_next = values[starts[:, None] + offsets]  # (B, W + 1, F)
    prior = padded[starts[:, None] + torch.arange(lags)]  # (B, K, F)
    return prior, inputs_and_next[:, :-1], inputs_and_next[:, 1:]
