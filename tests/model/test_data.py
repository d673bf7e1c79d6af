"""model.data: what a CSV becomes, and the message for each way a CSV can be wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from model.data import DataError, fit_scaler, read_table, sample_windows, series_from_frame, split_point
from tests.model.conftest import CsvWriter


def test_every_numeric_column_is_taken_and_text_columns_are_not(write_csv: CsvWriter) -> None:
    path = write_csv("date,a,label,b\n2020-01-01,1,x,4\n2020-01-02,2,y,5\n2020-01-03,4,z,7\n")
    series = series_from_frame(read_table(path), None, "s.csv")
    assert series.features == ("a", "b")
    np.testing.assert_array_equal(series.values, [[1, 4], [2, 5], [4, 7]])
    assert series.season == 7  # daily dates: a week


def test_named_columns_keep_the_given_order(write_csv: CsvWriter) -> None:
    path = write_csv("a,b\n1,4\n2,5\n")
    series = series_from_frame(read_table(path), ["b", "a"], "s.csv")
    assert series.features == ("b", "a")
    np.testing.assert_array_equal(series.values[:, 0], [4, 5])


def test_gaps_are_interpolated_and_counted(write_csv: CsvWriter) -> None:
    path = write_csv("a,b\n,1\n2,\n,3\n6,\n8,9\n")
    series = series_from_frame(read_table(path), None, "s.csv")
    np.testing.assert_allclose(series.values[:, 0], [2, 2, 4, 6, 8])  # the leading gap takes the first value
    np.testing.assert_allclose(series.values[:, 1], [1, 2, 3, 6, 9])
    assert series.filled == {"a": 2, "b": 2}


def test_non_numeric_cell_is_named_with_its_row(write_csv: CsvWriter) -> None:
    path = write_csv("a\n1\n2\nabc\n4\n")
    with pytest.raises(DataError, match=r"column 'a', row 3: 'abc' is not a number"):
        series_from_frame(read_table(path), None, "s.csv")


def test_missing_column_lists_the_columns(write_csv: CsvWriter) -> None:
    path = write_csv("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"no column 'c'; the columns are \['a', 'b'\]"):
        series_from_frame(read_table(path), ["a", "c"], "s.csv")


def test_missing_file_is_named(tmp_path: pytest.TempPathFactory) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_table(f"{tmp_path}/absent.csv")


def test_table_without_numbers_is_refused() -> None:
    with pytest.raises(DataError, match="no numeric column"):
        series_from_frame(pd.DataFrame({"name": ["x", "y"]}), None, "s.csv")


def test_short_series_is_refused_with_the_length_needed() -> None:
    with pytest.raises(DataError, match="only 20 rows: need at least 24 for training"):
        split_point(20, 0.2, min_train=24, min_val=4)
    assert split_point(100, 0.2, min_train=24, min_val=4) == 80


def test_constant_column_is_refused_by_name() -> None:
    train = np.column_stack([np.sin(np.arange(10.0)), np.full(10, 3.0)])
    with pytest.raises(DataError, match="column 'flat' is constant"):
        fit_scaler(train, ("wave", "flat"))


def test_straight_line_is_refused_by_name() -> None:
    with pytest.raises(DataError, match="column 'ramp' changes by exactly 2 every training row"):
        fit_scaler(np.arange(0.0, 20.0, 2.0)[:, None], ("ramp",))


def test_time_columns_are_left_out_unless_named(write_csv: CsvWriter) -> None:
    path = write_csv(",step,Quarter,value\n0,10,1,3.5\n1,20,2,2.0\n2,30,3,4.0\n3,40,4,1.0\n4,50,1,2.5\n")
    series = series_from_frame(read_table(path), None, "s.csv")
    assert series.features == ("value",)
    assert series.skipped == ("Unnamed: 0", "step", "Quarter")
    named = series_from_frame(read_table(path), ["Quarter", "value"], "s.csv")
    assert named.features == ("Quarter", "value")


def test_columns_only_left_out_as_time_are_named_when_nothing_is_left(write_csv: CsvWriter) -> None:
    path = write_csv("n,month\n1,1\n2,2\n3,3\n4,4\n")
    with pytest.raises(DataError, match=r"'n', 'month' left out as saying when .* name them with --columns"):
        series_from_frame(read_table(path), None, "s.csv")


def test_a_file_that_runs_newest_first_is_refused(write_csv: CsvWriter) -> None:
    """A newest-first export trained on silently: the model learnt time backwards, validated on the
    oldest rows, and the season came out as 24 (the spacing's median was negative)."""
    days = [f"2024-01-{day:02d}" for day in range(12, 0, -1)]
    path = write_csv("date,a\n" + "".join(f"{day},{i * i % 7}\n" for i, day in enumerate(days)))
    with pytest.raises(DataError, match=r"column 'date' runs newest first \(11 of 11 steps .* oldest first"):
        series_from_frame(read_table(path), None, "s.csv")


@pytest.mark.parametrize(("stamps", "season"), [
    ([f"{day:02d}/{month:02d}/2023" for month in (1, 2) for day in range(1, 29)], 7),  # day first
    ([f"2023-11-05 {hour:02d}:{minute:02d}" for hour in range(24) for minute in (0, 30)][:4]
     + ["2023-11-05 01:00", "2023-11-05 01:30"]
     + [f"2023-11-05 {hour:02d}:{minute:02d}" for hour in range(2, 24) for minute in (0, 30)], 24),  # summer time ends
    ([f"{hour:02d}:00" for _ in range(3) for hour in range(24)], 24),  # a time of day wrapping at midnight
], ids=["day-first dates", "repeated hour", "time of day"])
def test_oldest_first_files_with_a_few_steps_back_are_taken(
    write_csv: CsvWriter, stamps: list[str], season: int
) -> None:
    path = write_csv("when,a\n" + "".join(f"{stamp},{i * i % 11}\n" for i, stamp in enumerate(stamps)))
    assert series_from_frame(read_table(path), None, "s.csv").season == season


def test_scaler_holds_mean_spread_and_difference_spread() -> None:
    train = np.array([[0.0], [2.0], [4.0], [8.0]])
    scaler = fit_scaler(train, ("x",))
    assert scaler.mean == (3.5,)
    assert scaler.scale == pytest.approx((np.std([0, 2, 4, 8]),))
    assert scaler.diff_scale == pytest.approx((np.std([2, 2, 4]),))


def test_windows_carry_the_values_before_them() -> None:
    values = torch.arange(20.0).reshape(20, 1)
    generator = torch.Generator().manual_seed(0)
    prior, inputs, targets = sample_windows(values, lags=3, length=5, batch=16, generator=generator)
    assert prior.shape == (16, 3, 1) and inputs.shape == (16, 5, 1)
    torch.testing.assert_close(targets, inputs + 1)  # the next value of each input
    start = inputs[:, 0, 0]
    expected_prior = torch.clamp(start[:, None] - torch.tensor([3.0, 2.0, 1.0]), min=0)  # first value repeated
    torch.testing.assert_close(prior[:, :, 0], expected_prior)


def test_windows_start_anywhere_in_the_training_rows() -> None:
    values = torch.arange(40.0).reshape(40, 1)
    _, inputs, _ = sample_windows(values, 3, 5, 4000, torch.Generator().manual_seed(0))
    assert set(inputs[:, 0, 0].tolist()) == set(map(float, range(35)))


def test_empty_column_is_refused_by_name() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 4.0], "b": [np.nan] * 3})
    with pytest.raises(DataError, match="column 'b' is empty"):
        series_from_frame(frame, None, "s.csv")
