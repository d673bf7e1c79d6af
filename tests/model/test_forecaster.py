"""Forecaster: streaming in chunks, unequal lengths, rollout, learning, and its link to the AR baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Forecaster, ForecasterConfig
from model.baselines import difference_ar_predictions, fit_difference_ar, newest, persistence
from tests.model.conftest import make_forecaster, seasonal_series


def test_predictions_in_chunks_equal_one_call(forecaster: Forecaster) -> None:
    x = torch.randn(2, 30, 2).cumsum(1)
    with torch.no_grad():
        whole, state_whole = forecaster.predict(x, forecaster.initial_state(2))
        state, pieces = forecaster.initial_state(2), []
        for start, stop in [(0, 1), (1, 2), (2, 11), (11, 30)]:
            out, state = forecaster.predict(x[:, start:stop], state)
            pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(state, state_whole, atol=1e-5, rtol=0)


def test_unequal_lengths_equal_separate_calls(forecaster: Forecaster) -> None:
    lengths = [9, 5, 2]
    x = torch.randn(3, 9, 2).cumsum(1)
    with torch.no_grad():
        warm = forecaster.predict(torch.randn(3, 4, 2), forecaster.initial_state(3))[1]
        out, state = forecaster.predict(x, warm, lengths=lengths)
        for row, length in enumerate(lengths):
            alone_out, alone_state = forecaster.predict(x[row : row + 1, :length], warm[row : row + 1])
            torch.testing.assert_close(out[row : row + 1, :length], alone_out, atol=1e-5, rtol=0)
            torch.testing.assert_close(state[row : row + 1], alone_state, atol=1e-5, rtol=0)


def test_predict_leaves_the_callers_state_alone(forecaster: Forecaster) -> None:
    state = forecaster.predict(torch.randn(1, 5, 2), forecaster.initial_state(1))[1]
    before = state.clone()
    with torch.no_grad():
        forecaster.predict(torch.randn(1, 3, 2), state)
    assert torch.equal(state, before)


def test_rollout_starts_at_last_prediction_and_keeps_state(forecaster: Forecaster) -> None:
    with torch.no_grad():
        predictions, state = forecaster.predict(torch.randn(2, 6, 2).cumsum(1), forecaster.initial_state(2))
    before = state.clone()
    last = predictions[:, -1]
    forecast = forecaster.rollout(state, last, 5)
    assert forecast.shape == (2, 5, 2)
    assert torch.equal(forecast[:, 0], last)
    assert torch.equal(state, before)
    # The second step is what predict gives when fed the first forecast.
    with torch.no_grad():
        second = forecaster.predict(last[:, None], state)[0][:, 0]
    torch.testing.assert_close(forecast[:, 1], second)
    assert forecaster.rollout(state, last, 1).shape == (2, 1, 2)
    assert forecaster.rollout(state, last, 0).shape == (2, 0, 2)  # was one step: `last` itself
    with pytest.raises(ValueError, match="steps must be >= 0"):
        forecaster.rollout(state, last, -1)


def test_fresh_forecaster_with_silent_head_is_persistence() -> None:
    forecaster = Forecaster(ForecasterConfig(features=("a",), hidden_size=4, num_layers=1, lags=2))
    with torch.no_grad():
        forecaster.head.weight.zero_()
        x = torch.randn(1, 10, 1)
        predictions, _ = forecaster.predict(x, forecaster.initial_state(1))
    torch.testing.assert_close(predictions, x)


def test_linear_term_computes_the_difference_autoregression() -> None:
    values = np.stack([seasonal_series(80, seed=1), seasonal_series(80, seed=2)], axis=1)
    diff_scale = np.diff(values, axis=0).std(axis=0)
    ar = fit_difference_ar(values, (newest(4), newest(2)), diff_scale)
    forecaster = Forecaster(
        ForecasterConfig(features=("a", "b"), hidden_size=4, lags=4, diff_scale=tuple(diff_scale.tolist()))
    )
    with torch.no_grad():
        forecaster.head.weight.zero_()
        forecaster.head.bias.copy_(torch.tensor(ar.intercept))
        forecaster.autoregression.weight.copy_(torch.tensor(ar.coef))
        inputs = torch.tensor(values[None, :-1], dtype=torch.float32)  # (1, T − 1, 2)
        predictions, _ = forecaster.predict(inputs, forecaster.initial_state(1))
    expected = difference_ar_predictions(values, ar, diff_scale)
    np.testing.assert_allclose(predictions[0].numpy(), expected, atol=1e-4)


def test_training_lowers_the_loss_on_a_sine() -> None:
    torch.manual_seed(0)
    forecaster = Forecaster(ForecasterConfig(features=("s",), hidden_size=8, num_layers=1, lags=1))
    t = torch.arange(64, dtype=torch.float32)
    x = torch.sin(2 * np.pi * t / 16).reshape(1, 64, 1)
    optimizer = torch.optim.Adam(forecaster.parameters(), lr=0.02)
    losses = []
    for _ in range(60):
        predictions, _ = forecaster.predict(x[:, :-1], forecaster.initial_state(1))
        loss = (predictions - x[:, 1:]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in forecaster.gru.parameters())
    persistence_loss = float(((persistence(x[0].numpy()) - x[0, 1:].numpy()) ** 2).mean())
    assert losses[-1] < 0.2 * losses[0]
    assert losses[-1] < 0.2 * persistence_loss


@pytest.mark.parametrize("field", ["mean", "scale", "diff_scale"])
def test_scaler_with_another_length_than_the_features_is_refused(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} has 1 values for 2 features"):
        ForecasterConfig(features=("a", "b"), **{field: (1.0,)})


def test_predict_follows_the_docstring_equations() -> None:
    """u_t = [(x_t − μ)/σ, d_t/σ_d], ŷ = x_t + σ_d (W_o h_t + b_o + A lagged/σ_d), written out again."""
    forecaster = make_forecaster(features=2, lags=3)  # μ 1, σ 2, σ_d 0.5
    x = torch.randn(2, 6, 2).cumsum(1)
    mu, sigma, sigma_d = forecaster.mean, forecaster.scale, forecaster.diff_scale
    with torch.no_grad():
        got, _ = forecaster.predict(x, forecaster.initial_state(2))
        d = torch.cat([torch.zeros(2, 1, 2), x.diff(dim=1)], 1)  # first step: d = 0
        out, _ = forecaster.gru(torch.cat([(x - mu) / sigma, d / sigma_d], 2))
        padded = torch.cat([torch.zeros(2, 2, 2), d], 1) / sigma_d  # (B, K − 1 + T, F)
        lagged = torch.stack([padded[:, t : t + 3] for t in range(6)], 1)  # (B, T, K, F), newest last
        linear = forecaster.autoregression(lagged.permute(0, 1, 3, 2).reshape(2, 6, 6))
        expected = x + sigma_d * (forecaster.head(out) + linear)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_rollout_feeds_every_prediction_back_and_carries_the_state() -> None:
    forecaster = make_forecaster()
    with torch.no_grad():
        predictions, state = forecaster.predict(torch.randn(2, 6, 2).cumsum(1), forecaster.initial_state(2))
        forecast = forecaster.rollout(state, predictions[:, -1], 6)
        last, expected = predictions[:, -1], [predictions[:, -1]]
        for _ in range(5):
            step, state = forecaster.predict(last[:, None], state)
            last = step[:, 0]
            expected.append(last)
    torch.testing.assert_close(forecast, torch.stack(expected, 1))


def test_primed_state_sees_the_prior_values_as_streaming_them_would() -> None:
    """Training windows start from primed_state(prior): its first difference is x_0 − prior[-1], as for a
    session that streamed the prior; with the GRU silenced only that linear part differs."""
    forecaster = make_forecaster(lags=3)
    with torch.no_grad():
        forecaster.head.weight.zero_()
        series = torch.randn(2, 9, 2).cumsum(1)
        prior, x = series[:, :3], series[:, 3:]
        streamed = forecaster.predict(series, forecaster.initial_state(2))[0][:, 3:]
        primed = forecaster.predict(x, forecaster.primed_state(prior))[0]
    torch.testing.assert_close(primed, streamed, atol=1e-5, rtol=0)


def test_every_state_chunks_write_is_reachable_and_a_window_refilled_below_k_is_not() -> None:
    """``unreachable`` refuses only states no series writes: chunks of unequal lengths in one batch leave every
    position's state accepted; below K steps the window's values before the first one seen repeat it (a new
    series' window is filled with it), so another value there, in any feature, is refused."""
    forecaster = make_forecaster(lags=4)
    lengths, x = [6, 3, 1], torch.randn(3, 6, 2).cumsum(1)
    hidden = forecaster.config.num_layers * forecaster.config.hidden_size
    with torch.no_grad():
        state, positions = forecaster.initial_state(3), [0, 0, 0]
        for steps in (2, 4):  # each row's next `steps` values, as far as it goes (unequal, longest first)
            chunk = [min(steps, length - at) for length, at in zip(lengths, positions, strict=True)]
            live = [row for row, size in enumerate(chunk) if size]
            values = torch.stack([x[row, positions[row] : positions[row] + max(chunk)] for row in live])
            state[live] = forecaster.predict(values, state[live], lengths=[chunk[row] for row in live])[1]
            positions = [at + size for at, size in zip(positions, chunk, strict=True)]
            for row in live:
                assert forecaster.unreachable(state[row].numpy(), positions[row]) is None, (row, positions[row])
    assert positions == lengths
    for row, feature in ((1, 0), (2, 1)):  # positions 3 and 1, below K = 4
        damaged = state[row].numpy().copy()
        damaged[hidden + feature] += 1.0  # the oldest window value of one feature
        assert "first value seen" in (forecaster.unreachable(damaged, positions[row]) or "")
