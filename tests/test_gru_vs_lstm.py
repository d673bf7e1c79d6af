"""``make bench-lstm``: the GRU-against-LSTM comparison runs on a tiny budget and prints well-formed tables whose
sizes are right; the LSTM core it trains carries h and c across chunks; its lag series and score mean what
the tables say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from bench import gru_vs_lstm
from bench.gru_vs_lstm import (
    LagRow,
    LSTMForecaster,
    lagged_series,
    longest_kept,
    matched_hidden,
    parameters,
    relative_mae,
)
from model.data import series_from_frame
from model.fit import TrainConfig, train
from model.forecaster import Forecaster, ForecasterConfig

MODELS = ("ours GRU (H=8)", "nn.GRU (H=8)", "nn.LSTM (H=8)", "nn.LSTM matched (H=7)")


def _rows(printed: str, title: str) -> list[list[str]]:
    """The body rows of the rich table printed after ``title``, as lists of stripped cells."""
    lines = printed[printed.index(title):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("│"):
            break
        rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def test_comparison_runs_on_a_tiny_budget_and_prints_one_row_per_model(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shapes", "1,8,1", "--batches", "1", "3", "--steps", "2", "8", "--min-run-time", "0.001",
            "--rounds", "1", "--series", "sf-temps, daily mean", "--max-seconds", "0.5", "--lags", "1", "3",
            "--lag-rows", "300", "--lag-seconds", "0.5"]
    threads = torch.get_num_threads()
    assert gru_vs_lstm.main(argv) == 0
    assert torch.get_num_threads() == threads  # the bench's one thread does not outlive it
    printed = capsys.readouterr().out
    summary = _rows(printed, "GRU against LSTM at I H L = 1 8 1")
    assert [row[0] for row in summary] == list(MODELS)
    # params and state bytes (float32): GRU 3·(8·1 + 8·8 + 2·8); LSTM 4·(…); the matched LSTM's H is 7
    assert [(row[1], row[2]) for row in summary] == [("264", "32"), ("264", "32"), ("352", "64"), ("280", "56")]
    for row in summary:
        assert len(row) == 7
        assert all(float(cell.replace(",", "")) > 0 for cell in row[3:5])  # µs at B = 1 and B = 3, T = 8
    trained = [row for row in summary if row[5] != "not trained"]
    assert [row[0] for row in trained] == [MODELS[0], MODELS[2]]  # our GRU and the LSTM of the same size
    for row in trained:
        assert 0 < float(row[5]) < 10 and row[6] in ("0", "1", "3")
    assert len(_rows(printed, "Forward: median")) == 4  # B × T
    assert len(_rows(printed, "Size: parameters")) == 4
    quality = _rows(printed, "Real series")
    assert [row[0] for row in quality] == ["sf-temps, daily mean", "mean"]
    memory = _rows(printed, "Memory:")
    assert [row[0] for row in memory] == ["1", "3"]
    assert all(float(row[3]) > 0.8 for row in memory)  # the autoregression on the last k differences reaches k


def test_comparison_refuses_an_unknown_series_and_a_lag_the_tail_cannot_hold() -> None:
    for argv in (["--series", "no such series"], ["--series", "sf-temps"], ["--lags", "100", "--lag-rows", "300"]):
        with pytest.raises(SystemExit) as stopped:
            gru_vs_lstm.main(argv)
        assert stopped.value.code == 2


def test_the_matched_lstm_has_the_parameter_count_nearest_the_grus() -> None:
    assert parameters(torch.nn.GRU(1, 64, 2)) == 37_824
    assert matched_hidden(1, 64, 2) == 55
    assert parameters(torch.nn.LSTM(1, 55, 2)) == 37_400  # H = 56 would have 38,752
    assert matched_hidden(4, 128, 1) == 110  # 51,040 against the GRU's 51,456; H = 111 would have 51,948


def test_the_lstm_forecaster_carries_h_and_c_so_chunks_equal_one_pass() -> None:
    torch.manual_seed(0)
    config = ForecasterConfig(features=("x", "y"), hidden_size=6, num_layers=2, lags=3)
    model = LSTMForecaster(config).eval()
    assert not hasattr(model, "gru") and parameters(model) == parameters(torch.nn.LSTM(4, 6, 2)) + 6 * 2 + 2 + 3 * 2 * 2
    assert model.state_size == 2 * 2 * 6 + 3 * 2 + 1 == Forecaster(config).state_size + 2 * 6
    x = torch.randn(3, 11, 2)
    with torch.no_grad():
        whole, end = model.predict(x, model.initial_state(3))
        first, state = model.predict(x[:, :4], model.initial_state(3))
        second, state = model.predict(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(state, end)
    with pytest.raises(ValueError, match="equal length"):
        model.predict(x, model.initial_state(3), [11, 11, 5])


def test_the_lag_series_depends_on_the_value_k_steps_back_only() -> None:
    values = lagged_series(5, 20_000)
    assert abs(values.std() - 1) < 0.05
    correlation = {lag: float(np.corrcoef(values[lag:], values[:-lag])[0, 1]) for lag in range(1, 7)}
    assert correlation[5] == pytest.approx(gru_vs_lstm.LAG_COEFFICIENT, abs=0.02)
    assert all(abs(c) < 0.05 for lag, c in correlation.items() if lag != 5)


def test_a_lag_counts_as_kept_up_to_the_first_one_whose_gap_is_less_than_half_closed() -> None:
    def row(lag: int, mae: float) -> LagRow:  # no memory 1.0, oracle 0.5: closed = (1 − mae) / 0.5
        return LagRow(lag, 1.0, 0.5, {"GRU": mae, "LSTM": 1.1}, {})

    rows = [row(16, 0.55), row(2, 0.5), row(8, 0.8), row(4, 0.74)]
    assert [r.closed("GRU") for r in rows] == pytest.approx([0.9, 1.0, 0.4, 0.52])
    assert longest_kept(rows, "GRU") == 4  # 16 is closed again, but 8 was not: luck, not memory
    assert longest_kept(rows, "LSTM") == 0


def test_the_training_loop_trains_the_model_build_makes() -> None:
    frame = pd.DataFrame({"x": lagged_series(2, 200)})
    config = TrainConfig(hidden_size=4, num_layers=1, epochs=2, lags=1)
    result = train(series_from_frame(frame, None, "lag 2"), config, build=LSTMForecaster)
    assert isinstance(result.model, LSTMForecaster) and result.epochs == 2
    # h and c, the lag window, seen; then the calibration's tail: values seen, last prediction, 5 log-scales,
    # the running error level
    assert result.model.calibration is not None
    assert result.model.state_size == 2 * 4 + 1 + 1 + (1 + 1 + 5 + 1)


def test_real_series_are_scored_per_feature_so_a_large_column_does_not_outweigh_a_small_one() -> None:
    steps = np.arange(10.0)
    values = np.column_stack([1000 * (-1) ** steps, steps])  # a large alternating column and a small ramp
    predictions = np.column_stack([values[:-1, 0], values[1:, 1]])  # persistence on the first, exact on the second
    assert relative_mae(predictions, values) == pytest.approx(0.5)  # (1 + 0) / 2; pooled MAEs would give 0.9995
