"""Calibration: conformal quantiles and p-values, the online adaptation, and the checkpoint that carries them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import Forecaster, ForecasterConfig, load_checkpoint, save_checkpoint
from model.checkpoint import CheckpointError
from model.conformal import (
    ANCHORS,
    GRID,
    LEVEL_FLOOR,
    LOG_SCALE_LIMIT,
    SCALE_CLIP,
    SCALE_FLOOR,
    Calibration,
    calibrate,
    fit_level,
    interp_rows,
    level_path,
    log_level_factor,
)


def _calibration(scores: np.ndarray, adapt_rate: float = 0.05) -> Calibration:
    """From one-step scores (N,) of one feature, as ``calibrate`` stores them."""
    ordered = np.sort(scores)
    grid = np.interp(np.linspace(0, len(ordered) - 1, GRID), np.arange(len(ordered)), ordered)
    return Calibration((len(ordered),), ((tuple(float(q) for q in grid),),), adapt_rate)


_ENDS = st.floats(-6, 6) | st.sampled_from([np.inf, -np.inf, np.nan])


@settings(max_examples=300, deadline=None)
@given(x=st.floats(0, 100) | st.sampled_from([*ANCHORS, np.nextafter(80.0, 0.0), np.nextafter(80.0, 100.0)]),
       rows=st.lists(st.lists(_ENDS, min_size=len(ANCHORS), max_size=len(ANCHORS)), min_size=1, max_size=6))
def test_interp_rows_is_np_interp_row_by_row_to_the_bit(x: float, rows: list[list[float]]) -> None:
    """A level's log-scale between the anchors, for every row at once, as np.interp gives each row: the
    segment, the ends, an anchor itself, infinities and NaN (a row of equal infinities is that infinity)."""
    anchors, table = np.array(ANCHORS), np.array(rows)
    expected = np.array([np.interp(x, anchors, row) for row in table])
    assert interp_rows(x, anchors, table).tobytes() == expected.tobytes()


def test_quantile_is_the_conformal_order_statistic() -> None:
    """Scores 1..19: the 80% quantile is the ⌈20 · 0.8⌉ = 16th smallest; past rank N, the largest."""
    calibration = _calibration(np.arange(1.0, 20.0))
    assert calibration.quantile(np.array([80.0, 50.0, 99.0]), 0)[:, 0].tolist() == [16.0, 10.0, 19.0]


def test_p_values_count_the_calibration_scores_at_least_as_large() -> None:
    """(1 + #{s_i ≥ s}) / (N + 1) with scores 1..19; nothing to score (NaN) stays NaN."""
    calibration = _calibration(np.arange(1.0, 20.0))
    p = calibration.p_values(np.array([[0.5], [19.0], [25.0], [np.nan]], dtype=np.float32))
    np.testing.assert_allclose(p[:3, 0], [1.0, 2 / 20, 1 / 20], rtol=1e-6)
    assert np.isnan(p[3, 0])


def test_p_values_count_every_tied_calibration_score_as_at_least_as_large() -> None:
    """Scores 0 ×5, 1 ×5, 2..6, 10 ×2 (N = 17, so the grid keeps every order statistic exactly): a score of
    0 has all 17 at least as large (p = 1), one of 1 has 12, one of 10 has 2. The kept order statistics
    repeat a tied score; each counts, not only the last of them (which made a value on a tie look more
    surprising than the formula says: p = 0.78, 0.5 and 0.11)."""
    calibration = _calibration(np.array([0.0] * 5 + [1.0] * 5 + [2.0, 3.0, 4.0, 5.0, 6.0] + [10.0] * 2))
    p = calibration.p_values(np.array([[0.0], [1.0], [10.0]], dtype=np.float32))
    np.testing.assert_allclose(p[:, 0], [18 / 18, 13 / 18, 3 / 18], rtol=1e-6)


def test_adaptation_holds_coverage_when_the_series_turns_three_times_noisier() -> None:
    """Calibrated on N(0, 1) errors, served N(0, 3): unadapted, the 80% interval covers about 26%; the
    adapted one comes back to its level over 4000 steps, for both anchor levels the bench reports."""
    rng = np.random.default_rng(0)
    calibration = _calibration(np.abs(rng.standard_normal(2000)))
    served = np.abs(3 * rng.standard_normal(4000)).astype(np.float32)[None, :, None]  # (B, T, F)
    path = calibration.adapt(served, np.zeros((1, 1, len(ANCHORS)), dtype=np.float32))  # (1, T, 1, A)
    before = np.concatenate([np.zeros((1, 1, len(ANCHORS)), np.float32), path[0, :-1]])  # scale before each value
    for level in (80.0, 95.0):
        a = ANCHORS.index(level)
        width = calibration.quantile(np.array([level]), 0)[0, 0]
        fixed = np.mean(served[0, :, 0] <= width)
        adapted = np.mean(served[0, :, 0] <= width * np.exp(before[:, 0, a]))
        assert fixed < level / 100 - 0.15
        assert abs(adapted - level / 100) < 0.015, (level, adapted)
    assert (path[0, -1, 0] > 0.7).all()  # every anchor widened, towards log 3 = 1.1


def test_adaptation_skips_unscored_steps_and_stays_within_its_limit() -> None:
    calibration = _calibration(np.ones(100))
    scores = np.full((1, 500, 1), 1e9, dtype=np.float32)
    scores[0, :10] = np.nan
    path = calibration.adapt(scores, np.zeros((1, 1, len(ANCHORS)), dtype=np.float32))
    assert (path[0, :10] == 0).all()
    assert (path[0, -1] == np.float32(LOG_SCALE_LIMIT)).all()


def test_adaptation_in_two_chunks_equals_one_call_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    calibration = _calibration(np.abs(rng.standard_normal(300)))
    scores = np.abs(2 * rng.standard_normal((2, 90, 1))).astype(np.float32)
    start = np.zeros((2, 1, len(ANCHORS)), dtype=np.float32)
    whole = calibration.adapt(scores, start)
    first = calibration.adapt(scores[:, :37], start)
    second = calibration.adapt(scores[:, 37:], first[:, -1])
    assert np.array_equal(np.concatenate([first, second], axis=1), whole)


def test_levels_between_anchors_interpolate_and_widths_grow_with_the_level() -> None:
    rng = np.random.default_rng(2)
    calibration = _calibration(np.abs(rng.standard_normal(500)))
    log_scales = np.array([[[0.0, 0.2, 0.3, 0.4, 0.6]]], dtype=np.float32)  # (T=1, F=1, A)
    levels = np.array([30.0, 80.0, 87.5, 95.0, 99.9])
    widths = calibration.half_widths(levels, log_scales, np.array([2.0]))[:, 0, 0]
    expected_log = [0.0, 0.2, 0.275, 0.4, 0.6]
    base = calibration.quantile(levels, 0)[:, 0] * 2.0
    np.testing.assert_allclose(widths, base * np.exp(expected_log), rtol=1e-5)
    assert (np.diff(widths) > 0).all()


def test_intervals_are_nested_when_the_anchors_adapted_apart() -> None:
    """A run of misses at 95% only (λ₉₅ up) and of hits at 99% (λ₉₉ down): the 99.5% interval, scaled by
    λ₉₉, would be narrower than the 95%; each level's interval holds every lower anchor's, the same whichever
    other levels are asked, one step ahead and in a forecast."""
    calibration = _calibration(np.random.default_rng(4).exponential(size=500))
    log_scales = np.zeros((1, 1, len(ANCHORS)), np.float32)
    log_scales[..., ANCHORS.index(95.0)], log_scales[..., ANCHORS.index(99.0)] = 1.0, -1.0
    unit = np.ones(1)
    for args in ((log_scales, unit), (log_scales[0], unit, 3)):
        both = calibration.half_widths(np.array([95.0, 99.5]), *args)
        assert (both[1] >= both[0]).all()
        np.testing.assert_array_equal(calibration.half_widths(np.array([99.5]), *args)[0], both[1])
        np.testing.assert_array_equal(calibration.half_widths(np.array([95.0]), *args)[0], both[0])


def test_forecast_widths_past_the_calibrated_steps_grow_as_a_random_walk() -> None:
    rng = np.random.default_rng(3)
    steps = [tuple(float(q) for q in np.sort(np.abs(rng.standard_normal(GRID))) * (h + 1)) for h in range(3)]
    calibration = Calibration((GRID,) * 3, tuple((s,) for s in steps))
    widths = calibration.half_widths(np.array([90.0]), np.zeros((1, len(ANCHORS)), np.float32), np.ones(1), steps=12)
    third = calibration.quantile(np.array([90.0]), 2)[0, 0]
    np.testing.assert_allclose(widths[0, [2, 11], 0], [third, third * np.sqrt(12 / 3)], rtol=1e-5)
    assert widths[0, 0, 0] < widths[0, 1, 0] < widths[0, 2, 0]


def test_running_level_follows_a_noisier_series_and_one_spike_moves_it_by_a_bounded_step() -> None:
    """Scores 3 times the start's level: u goes to 3 within a few 1/β; a score of 10⁶ right after moves u
    by at most the clip's factor 1 + β (CLIP − 1); NaN steps keep u; chunks give one call's path bit for bit."""
    rng = np.random.default_rng(4)
    scores = np.abs(3 * rng.standard_normal((1, 600, 1))).astype(np.float32) * np.float32(np.sqrt(np.pi / 2))
    scores[0, 300] = 1e6
    scores[0, 10:20] = np.nan
    start = np.array([1.0], np.float32)
    path = level_path(scores, np.zeros((1, 1), np.float32), 0.05, start)[0, :, 0]
    assert (path[10:20] == path[9]).all()
    assert abs(np.exp(np.median(path[200:300])) - 3) < 0.6
    assert path[300] - path[299] <= np.log1p(0.05 * (SCALE_CLIP - 1)) + 1e-6
    first = level_path(scores[:, :337], np.zeros((1, 1), np.float32), 0.05, start)
    second = level_path(scores[:, 337:], first[:, -1], 0.05, start)
    whole = level_path(scores, np.zeros((1, 1), np.float32), 0.05, start)
    assert np.array_equal(np.concatenate([first, second], axis=1), whole)


def test_normalised_scores_widen_intervals_as_the_noise_grows_and_keep_coverage() -> None:
    """A forecaster of a random walk (persistence) calibrated on unit steps, served steps 4 times larger
    from row 500: within 100 rows the 80% interval is about 4 times wider, and covers about 80% after."""
    torch.manual_seed(0)
    config = ForecasterConfig(features=("x",), hidden_size=4, num_layers=1, lags=2, mean=(0.0,), scale=(1.0,),
                              diff_scale=(1.0,))
    model = Forecaster(config).eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.autoregression.weight.zero_()
    rng = np.random.default_rng(5)
    steps = rng.standard_normal(2000)
    steps[500:] *= 4
    values = np.cumsum(steps)[:, None]
    model.calibration = calibrate(model, values[:500], 300, steps=2)
    observed = model.observe(torch.tensor(values[None], dtype=torch.float32), model.initial_state(1))
    assert observed.log_scales is not None
    widths = model.calibration.half_widths(np.array([80.0]), observed.log_scales[0], np.ones(1))[0, :, 0]
    assert 3 < widths[600] / widths[450] < 5.5
    inside = np.abs(values[601:, 0] - values[600:-1, 0]) <= widths[600:-1]
    assert abs(inside.mean() - 0.8) < 0.03


def test_a_calmer_series_narrows_intervals_through_its_running_level_by_at_most_the_floor() -> None:
    """Values ten times calmer than the validation tail: the state's running level u follows them down, but
    scores are counted, and intervals scaled, in units of max(u, SCALE_FLOOR)."""
    base = _calibration(np.random.default_rng(3).exponential(size=400))
    calibration = Calibration(base.counts, base.quantiles, 0.1, scale_rate=0.05, scale_start=(1.0,))
    anchors = len(calibration.anchors)
    scores = np.full((1, 200, 1), 0.1, np.float32)
    normalised, log_scales, carried = calibration.follow(scores, np.zeros((1, anchors + 1), np.float32),
                                                         np.zeros((1, 201, 1), np.float32))
    state_level = carried[0, :, -1]  # log u after each step, as the state keeps it
    assert np.exp(state_level[-1]) < 0.2
    used = np.maximum(np.exp(np.concatenate([[0.0], state_level[:-1]])), SCALE_FLOOR)
    np.testing.assert_allclose(normalised[0, :, 0], 0.1 / used, rtol=1e-6)
    from_level = log_scales[0, :, 0, :] - carried[0, :, :anchors]  # the interval's log-scale less the λ's
    np.testing.assert_allclose(from_level[-1], np.log(SCALE_FLOOR), atol=1e-6)


def test_the_level_factor_scales_each_score_by_the_value_before_it_and_each_interval_by_the_value_after() -> None:
    """g(x) = max(1 + w (x − c), LEVEL_FLOOR), at most e^LIMIT: a score is divided by g of the value its
    prediction was made at, the interval after a value is scaled by g of that value; each value's alone, so
    a series in chunks gives what one call gives."""
    base = _calibration(np.random.default_rng(4).exponential(size=400))
    calibration = Calibration(base.counts, base.quantiles, 0.02, scale_rate=0.05, scale_start=(1.0,),
                              level_centre=(10.0,), level_slope=(0.5,))
    values = np.array([10.0, 12.0, 8.0, 11.0, -30.0, 1e30, 10.0], np.float32)  # g: 1, 2, 0.25 (floor), 1.5, ...
    factor = np.array([1.0, 2.0, 0.25, 1.5, LEVEL_FLOOR, np.exp(LOG_SCALE_LIMIT), 1.0], np.float32)
    np.testing.assert_allclose(np.exp(calibration.log_level_factor(values[:, None]))[:, 0], factor, rtol=1e-6)
    scores = np.ones((1, 6, 1), np.float32)
    carry = np.zeros((1, len(calibration.anchors) + 1), np.float32)
    series = values[None, :, None]
    normalised, log_scales, carried = calibration.follow(scores, carry, series)
    plain = Calibration(base.counts, base.quantiles, 0.02, scale_rate=0.05, scale_start=(1.0,))
    unscaled, plain_scales, _ = plain.follow(scores / factor[None, :-1, None], carry, series)
    np.testing.assert_allclose(normalised, unscaled, rtol=1e-6)
    np.testing.assert_allclose(log_scales - plain_scales, np.log(factor[None, 1:, None, None]).repeat(5, axis=3),
                               atol=1e-6)
    first = calibration.follow(scores[:, :2], carry, series[:, :3])
    second = calibration.follow(scores[:, 2:], first[2][:, -1], series[:, 2:])
    assert np.array_equal(np.concatenate([first[1], second[1]], axis=1), log_scales)
    assert np.array_equal(np.concatenate([first[2], second[2]], axis=1), carried)
    assert "level_slope" not in plain.to_dict()  # a calibration without g writes what it wrote before


def test_a_score_past_float32_counts_as_beyond_every_calibration_score_without_a_warning() -> None:
    """A jump from 1e38 to −1e38 is a score near float32's limit, and g < 1 of the value before it (or a
    scale start under 1) carries it past: inf, the smallest p-value and a miss at every anchor, with no
    numpy warning in the service's log."""
    base = _calibration(np.random.default_rng(4).exponential(size=400))
    calibration = Calibration(base.counts, base.quantiles, 0.02, scale_rate=0.05, scale_start=(0.5,),
                              level_centre=(10.0,), level_slope=(-0.5,))
    scores = np.array([[[1.0], [3e38], [3e38]]], np.float32)
    series = np.array([[[10.0], [10.0], [1e38], [-1e38]]], np.float32)  # g: 1, 1, 0.25 (floor), e^5
    carry = np.zeros((1, len(calibration.anchors) + 1), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalised, log_scales, carried = calibration.follow(scores, carry, series)
        p_values = calibration.p_values(normalised)
    assert p_values[0, 1:, 0].tolist() == pytest.approx([1 / 401] * 2)
    assert np.isfinite(log_scales).all() and np.isfinite(carried).all()
    assert (np.diff(carried[0, :, :-1], axis=0) > 0).all()  # both missed every anchor: each λ grew


def test_the_level_line_is_flat_where_there_is_none_to_fit() -> None:
    """w = 0 for values all alike, scores all unscored, or values so nearly alike that the slope would pass
    float32's range (a checkpoint could not hold it); a real slope is kept."""
    scores = np.abs(np.random.default_rng(6).normal(size=(50, 1)))
    scores[3] = 100.0
    nearly = np.zeros((50, 1))
    nearly[3] = 1e-45
    for values, their_scores in ((np.ones((50, 1)), scores), (np.arange(50.0)[:, None], np.full((50, 1), np.nan)),
                                 (nearly, scores)):
        assert fit_level(values, their_scores)[1].tolist() == [0.0]
    far = 1e6 + np.linspace(0.3, 0.5, 50)[:, None]  # far from 0 next to its spread: c must keep every digit
    centre, slope = fit_level(far, 1 + 3 * (far - 1e6))
    assert np.exp(log_level_factor(far.mean(axis=0), centre, slope)) == pytest.approx(1, abs=1e-6)
    assert slope[0] == pytest.approx(3 / 2.2, rel=1e-5)
    rising = np.arange(50.0)[:, None]
    centre, slope = fit_level(rising, 1 + rising / 49)  # scores 1 at x = 0, 2 at x = 49: height 1.5 at c = 24.5
    assert centre.tolist() == [24.5] and slope[0] == pytest.approx(1 / 49 / 1.5, rel=1e-5)  # kept to 6 digits


def test_a_level_line_of_whole_numbers_past_int64_works_as_their_floats() -> None:
    """config.json may write c and w as whole numbers; one past int64 (10**20, within float32's range) is
    accepted at load, so it must give the level factor its float gives, not fail at the first request."""
    good = {**_calibration(np.arange(1.0, 20.0)).to_dict(), "scale_rate": 0.05, "scale_start": [1.0]}
    whole = Calibration.from_dict(json.loads(json.dumps({**good, "level_centre": [0], "level_slope": [10**20]})))
    as_float = Calibration.from_dict({**good, "level_centre": [0.0], "level_slope": [1e20]})
    values = np.array([[-1.0], [0.0], [1e-30], [1.0]], np.float32)
    assert np.array_equal(whole.log_level_factor(values), as_float.log_level_factor(values))


@pytest.mark.parametrize("damage", [
    {"counts": []}, {"counts": [0]}, {"quantiles": [[[1.0, 0.5] + [2.0] * (GRID - 2)]]},
    {"quantiles": [[[float("nan")] * GRID]]}, {"quantiles": [[[1.0] * 3]]}, {"adapt_rate": 0},
    {"anchors": [95, 80]}, {"anchors": [0, 50]}, {"surprise": 1}, {"scale_rate": 1.0},
    {"scale_rate": -0.1}, {"scale_rate": 0.05}, {"scale_rate": 0.05, "scale_start": [1.0, 2.0]},
    {"scale_rate": 0.05, "scale_start": [0.0]}, {"scale_rate": 0.05, "scale_start": [float("inf")]},
    {"scale_rate": 0.05, "scale_start": [10**400]}, {"scale_rate": 0.05, "scale_start": [3.5e38]},
    {"scale_rate": 0.05, "scale_start": [1e-320]},
    {"scale_start": [1.0]}, {"level_centre": [1.0], "level_slope": [0.1]},
    {"scale_rate": 0.05, "scale_start": [1.0], "level_centre": [1.0]},
    {"scale_rate": 0.05, "scale_start": [1.0], "level_centre": [1.0], "level_slope": [float("nan")]},
    {"scale_rate": 0.05, "scale_start": [1.0], "level_centre": [1.0], "level_slope": [1e39]},
    {"scale_rate": 0.05, "scale_start": [1.0], "level_centre": [1.0, 2.0], "level_slope": [0.1, 0.2]},
    {"scale_rate": 0.05, "scale_start": [1.0], "level_centre": ["1"], "level_slope": [0.1]},
])
def test_a_damaged_calibration_is_refused(damage: dict[str, object]) -> None:
    good = _calibration(np.arange(1.0, 20.0)).to_dict()
    with pytest.raises(ValueError, match="calibration"):
        Calibration.from_dict({**good, **damage})


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Forecaster, np.ndarray]:
    """A small random forecaster calibrated on a real series' last 200 rows."""
    torch.manual_seed(0)
    from model.data import load_dataset, series_from_frame

    values = series_from_frame(load_dataset("seattle-weather"), ["temp_max"], "seattle-weather").values[:600]
    config = ForecasterConfig(features=("temp_max",), hidden_size=8, num_layers=1, lags=3,
                              mean=(16.0,), scale=(7.0,), diff_scale=(3.0,))
    model = Forecaster(config).eval()
    model.calibration = calibrate(model, values, 400, steps=6)
    return model, values


def test_calibrate_scores_each_forecast_step_from_every_origin(calibrated: tuple[Forecaster, np.ndarray]) -> None:
    model, values = calibrated
    calibration = model.calibration
    assert calibration is not None
    assert calibration.counts == (200, 199, 198, 197, 196, 195)
    # h, window, seen | count, last, log-scales, log running level
    assert model.state_size == 8 + 3 + 1 + 1 + 1 + len(ANCHORS) + 1
    # the one-step scores are the model's own one-step errors over the tail in units of σ_d, each divided by
    # the level factor g of the value its prediction was made at, g(x) = 1 + w (x − c) with c, w the least-
    # squares line of the training rows' scores (before row 400) over its height at c, and by the running
    # level u the session held before that value arrived, floored (unscored: the first K + 1 rows)
    uncalibrated = Forecaster(model.config)
    uncalibrated.load_state_dict(model.state_dict())
    with torch.no_grad():
        y, _ = uncalibrated.eval().predict(torch.tensor(values[None, :-1], dtype=torch.float32),
                                           uncalibrated.initial_state(1))
    raw = np.abs(y[0, :, 0].double().numpy() - values[1:, 0]) / 3.0  # row t + 1's score
    slope, height = np.polyfit(values[3:399, 0], raw[3:399], 1)
    centre = values[3:399, 0].mean()
    np.testing.assert_allclose(calibration.level_centre, [centre], rtol=1e-5)
    np.testing.assert_allclose(calibration.level_slope, [slope / (height + slope * centre)], rtol=1e-5)
    factor = np.maximum(1 + calibration.level_slope[0] * (values[:-1, 0] - calibration.level_centre[0]), LEVEL_FLOOR)
    assert factor.min() < 0.8 and factor.max() > 1.2  # temp_max's errors grow with the temperature
    raw /= factor
    np.testing.assert_allclose(calibration.scale_start, [raw[399:].mean()], rtol=1e-5)
    scored = raw.astype(np.float32)[None, :, None].copy()
    scored[0, :3] = np.nan
    after = level_path(scored, np.zeros((1, 1), np.float32), calibration.scale_rate,
                       np.array(calibration.scale_start, np.float32))[0, :, 0]
    errors = np.sort(raw[399:] / np.maximum(np.exp(after[398:-1]), SCALE_FLOOR))
    np.testing.assert_allclose([calibration.quantiles[0][0][0], calibration.quantiles[0][0][-1]],
                               [errors[0], errors[-1]], rtol=1e-4)
    plain = calibrate(model, values, 400, steps=6, scale_rate=0.0)
    raw *= factor
    np.testing.assert_allclose([plain.quantiles[0][0][0], plain.quantiles[0][0][-1]],
                               [np.sort(raw[399:])[0], np.sort(raw[399:])[-1]], rtol=1e-5)
    assert "scale_rate" not in plain.to_dict() and "level_slope" not in plain.to_dict() and not plain.normalised


def test_checkpoint_keeps_the_calibration_in_its_version(
    calibrated: tuple[Forecaster, np.ndarray], tmp_path: Path
) -> None:
    model, _ = calibrated
    version = save_checkpoint(model, tmp_path / "with", name="c")
    loaded, meta = load_checkpoint(tmp_path / "with")
    assert loaded.calibration == model.calibration and meta["version"] == version
    bare = Forecaster(model.config)
    bare.load_state_dict(model.state_dict())
    assert save_checkpoint(bare, tmp_path / "without", name="c") != version
    assert load_checkpoint(tmp_path / "without")[0].calibration is None
    assert "calibration" not in json.loads((tmp_path / "without" / "config.json").read_text())
    assert bare.state_size == model.state_size - 3 - len(ANCHORS)  # an uncalibrated layout is unchanged


def test_a_calibration_of_another_width_stops_loading(
    calibrated: tuple[Forecaster, np.ndarray], tmp_path: Path
) -> None:
    model, _ = calibrated
    save_checkpoint(model, tmp_path, name="c")
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["calibration"]["quantiles"] = [[row[0], row[0]] for row in meta["calibration"]["quantiles"]]
    meta["calibration"]["scale_start"] *= 2
    meta["calibration"]["level_centre"] *= 2
    meta["calibration"]["level_slope"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="2 features, the model 1"):
        load_checkpoint(tmp_path)
