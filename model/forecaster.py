"""Forecaster: per-feature scaling + GRU + linear head, predicting the next step of a multivariate series.

It predicts the next *difference* and adds it back, so a level shift or a trend costs it nothing and an
untrained head already equals "tomorrow equals today" (persistence). At step t, with x_t the raw values:

    d_t   = x_t − x_{t−1}                                   (first step of a session: d = 0)
    u_t   = [(x_t − μ) / σ,  d_t / σ_d]                     GRU input, scaled per feature   (2F)
    h_t   = GRU(u_t, h_{t−1})
    ŷ_t+1 = x_t + σ_d ⊙ (W_o h_t + b_o + A [d_t, …, d_{t−K+1}] / σ_d)

μ, σ, σ_d are fitted on the training split (model.data). The linear term A over the last K differences is
an autoregression on differences, the strong classical baseline; the GRU learns what it misses.

The state carried between chunks is one flat vector per series, opaque to whoever stores it:
``[h (L·H) | last K raw values (K·F) | seen (1)]``, and with a calibration (model.conformal) also
``[values seen, up to K + 1 (1) | last one-step prediction (F) | log-scales (F·A)]``, and when it
normalises its scores ``[log running error level (F)]``: what scoring the next value and the online
adaptation of its intervals need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from model import float32
from model.cell import Variant
from model.conformal import LOG_SCALE_LIMIT, Calibration
from model.gru import GRU

# How far past ±1 a GRU's hidden value may be written: its kernels mix in float32 (a lerp, then 2q − 1 in
# sigmoid form), each step's rounding a few ulps at most; a value past this was written by no kernel.
HIDDEN_SLACK = 1e-5


@dataclass(frozen=True)
class ForecasterConfig:
    features: tuple[str, ...]  # column names, in input order; F = len(features)
    hidden_size: int = 64
    num_layers: int = 2
    variant: Variant = "seed"
    lags: int = 12  # K: differences seen by the linear autoregressive term (>= 1)
    mean: tuple[float, ...] = ()  # μ per feature; empty means 0
    scale: tuple[float, ...] = ()  # σ per feature; empty means 1
    diff_scale: tuple[float, ...] = ()  # σ_d, spread of one-step differences; empty means 1

    def __post_init__(self) -> None:
        """Refuse what would build a model that answers nothing but NaN, or fails on its first call: a
        checkpoint's config.json is input like any other."""
        # A list (a tuple once read), not a string or an object: "xy" would be the two features x and y.
        features = self.features
        if not isinstance(features, tuple) or not features or not all(isinstance(f, str) and f for f in features):
            shown = list(features) if isinstance(features, tuple) else features
            raise ValueError(f"features must be a non-empty list of column names, got {shown!r}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"features must be distinct, got {list(self.features)!r}")
        for name in ("hidden_size", "num_layers", "lags"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name, positive in (("mean", False), ("scale", True), ("diff_scale", True)):
            values = getattr(self, name)
            if values and len(values) != len(self.features):
                raise ValueError(f"{name} has {len(values)} values for {len(self.features)} features")
            for value in values:
                if not float32.holds(value, positive=positive):  # judged as the float32 the buffers hold
                    raise ValueError(f"{name} values must be finite float32 numbers"
                                     f"{f' of at least {float32.TINY:.3g}' if positive else ''}, got {value!r}")

    @property
    def num_features(self) -> int:
        return len(self.features)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> ForecasterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**values)  # type: ignore[arg-type]


@dataclass(slots=True)
class Observation:
    """What ``observe`` makes of a batch: predictions and states as ``predict``'s, and with a calibration
    the p-value of every arriving value and the log-scales after each step (host arrays)."""

    predictions: Tensor  # (B, T, F)
    states: Tensor  # (B, S)
    p_values: np.ndarray | None  # (B, T, F) float32; NaN: nothing to score against, or past the row's end
    log_scales: np.ndarray | None  # (B, T, F, A) float32: an interval's log-scale, u's and g's included


class Forecaster(nn.Module):
    """predict(x (B, T, F), state (B, S)) -> (ŷ (B, T, F), state'); rollout(state, last, n) -> (B, n, F);
    observe(x, state): predict, plus scores and adaptation when the model carries a calibration."""

    mean: Tensor  # buffers, (F,) each: the scaler fitted at training
    scale: Tensor
    diff_scale: Tensor
    # Vectors of H floats per layer that the recurrent core carries between calls: the GRU's h. A subclass
    # with another core (bench.gru_vs_lstm's LSTM: h and c) sets its own count and overrides _recurrence.
    core_states = 1

    def __init__(self, config: ForecasterConfig, calibration: Calibration | None = None):
        super().__init__()
        features = config.num_features
        self.config = config
        if calibration is not None and calibration.features != features:
            raise ValueError(f"calibration has {calibration.features} features, the model {features}")
        self.calibration = calibration
        self.gru = GRU(2 * features, config.hidden_size, config.num_layers, config.variant)
        self.head = nn.Linear(config.hidden_size, features)
        self.autoregression = nn.Linear(config.lags * features, features, bias=False)
        with torch.no_grad():  # start as persistence: the GRU has to earn every departure from it
            self.head.weight.mul_(0.01)
            self.head.bias.zero_()
            self.autoregression.weight.zero_()
        self.register_buffer("mean", self._vector(config.mean, 0.0), persistent=False)
        self.register_buffer("scale", self._vector(config.scale, 1.0), persistent=False)
        self.register_buffer("diff_scale", self._vector(config.diff_scale, 1.0), persistent=False)

    def _vector(self, values: tuple[float, ...], default: float) -> Tensor:
        features = self.config.num_features
        if not values:
            return torch.full((features,), default)
        return torch.tensor(values, dtype=torch.float32)

    @property
    def num_features(self) -> int:
        return self.config.num_features

    @property
    def state_size(self) -> int:
        """S: floats carried per series between calls."""
        cfg = self.config
        return (cfg.num_layers * self.core_states * cfg.hidden_size + cfg.lags * cfg.num_features + 1
                + self._tail_size)

    @property
    def _tail_size(self) -> int:
        """Floats after ``seen``, only with a calibration: the count, the last prediction, the log-scales
        and, when it normalises, the log running error level."""
        calibration = self.calibration
        if calibration is None:
            return 0
        return 1 + self.num_features * (1 + len(calibration.anchors) + calibration.normalised)

    def unreachable(self, state: np.ndarray, position: int) -> str | None:
        """Why ``state`` (S,), finite, is not one this model's updates can reach in ``position`` steps; None
        when it is fine. For states from outside, such as an import: a state no history reaches would make the
        session answer as no series could have it answer. Checked: what the updates bound (a GRU's hidden
        values within ±1, being mixes of tanh outputs; the calibration's log-scales and log level within
        ±LOG_SCALE_LIMIT, past which an interval passes float32's range), and what the position decides (at
        0 the initial state; after that ``seen`` is 1, below K steps the window's values before the first one
        seen are that value, as ``predict`` fills a new series' window with it, and the count of values seen is
        a whole number no larger than the position, nor than K + 1)."""
        cfg = self.config
        if position == 0:
            return None if not state.any() else "it is not the initial state (all zeros), at position 0"
        hidden_end = cfg.num_layers * self.core_states * cfg.hidden_size
        seen_at = hidden_end + cfg.lags * cfg.num_features
        if self.core_states == 1:  # a GRU's h; a core carrying more (bench's LSTM: an unbounded c) is not checked
            largest = float(np.abs(state[:hidden_end]).max())
            if largest > 1 + HIDDEN_SLACK:
                return f"its hidden values reach {largest:.6g}, beyond the ±1 of a GRU's"
        if state[seen_at] != 1:
            return f"its seen flag is {state[seen_at]:.6g} at position {position}, where any value seen sets it to 1"
        if position < cfg.lags:
            window = state[hidden_end:seen_at].reshape(cfg.lags, cfg.num_features)  # (K, F), oldest first
            first = cfg.lags - position  # the row of the first value seen
            if (window[:first] != window[first]).any():
                return (f"its window's {first} values before the first value seen differ from it at position"
                        f" {position}, where a series' first value fills them")
        if not self._tail_size:
            return None
        count = float(state[seen_at + 1])
        if count != int(count) or not 0 <= count <= min(position, cfg.lags + 1):
            return (f"it counts {count:.6g} values seen, not a whole number from 0 to {min(position, cfg.lags + 1)}"
                    f" at position {position}")
        carry = state[-(self._tail_size - 1 - self.num_features):]  # after the count and the last prediction
        largest = float(np.abs(carry).max())
        if largest > LOG_SCALE_LIMIT:
            return (f"its interval log-scales reach {largest:.6g}, beyond the ±{LOG_SCALE_LIMIT:g} this model"
                    " keeps them within")
        return None

    def initial_state(self, batch: int) -> Tensor:
        """The state of a series that has seen nothing: (B, S) zeros."""
        return torch.zeros(batch, self.state_size, device=self.mean.device)

    def primed_state(self, prior: Tensor) -> Tensor:
        """The state of a series that has seen the K values ``prior`` (B, K, F), with the GRU still at zeros
        (training starts windows from it: their first steps already have their differences)."""
        batch = prior.size(0)
        cfg = self.config
        h = prior.new_zeros(cfg.num_layers, batch, self.core_states * cfg.hidden_size)  # (L, B, core_states·H)
        return self._join(h, prior, prior.new_ones(batch, 1), prior.new_zeros(batch, self._tail_size))

    def _split(self, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cfg = self.config
        batch = state.size(0)
        width = self.core_states * cfg.hidden_size
        hidden_end = cfg.num_layers * width
        seen_at = hidden_end + cfg.lags * cfg.num_features
        h = state[:, :hidden_end].reshape(batch, cfg.num_layers, width).transpose(0, 1)  # (L, B, core_states·H)
        window = state[:, hidden_end:seen_at].reshape(batch, cfg.lags, cfg.num_features)  # (B, K, F)
        seen = state[:, seen_at : seen_at + 1]  # (B, 1)
        tail = state[:, seen_at + 1 :]  # (B, 1 + F + F·A [+ F]), or (B, 0) without a calibration
        return h, window, seen, tail

    def _join(self, h: Tensor, window: Tensor, seen: Tensor, tail: Tensor) -> Tensor:
        batch = window.size(0)
        return torch.cat([h.transpose(0, 1).reshape(batch, -1), window.reshape(batch, -1), seen, tail], dim=1)

    def predict(
        self, x: Tensor, state: Tensor, lengths: Tensor | list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """One-step-ahead prediction after every step of x; rows of unequal ``lengths`` sorted longest first.

        Predictions past a row's length are placeholders. The caller's ``state`` is never modified.
        """
        batch, steps, features = x.shape
        lags = self.config.lags
        h0, window, seen, tail = self._split(state)
        # A series' first value has no predecessor: pretend it was always there, so its difference is 0.
        window = torch.where(seen[:, :, None] > 0, window, x[:, :1].expand(-1, lags, -1))
        series = torch.cat([window, x], dim=1)  # (B, K + T, F)
        diffs = series[:, 1:] - series[:, :-1]  # (B, K + T − 1, F)
        scaled_diffs = diffs / self.diff_scale
        current = scaled_diffs[:, lags - 1 :]  # (B, T, F): d_t / σ_d
        gru_input = torch.cat([(x - self.mean) / self.scale, current], dim=2)  # (B, T, 2F)
        out, h_n = self._recurrence(gru_input, h0.contiguous(), lengths)  # (B, T, H), like h0
        # (B, T, F, K) windows, newest difference last, flattened as (F·K) for the linear term
        lagged = scaled_diffs.unfold(1, lags, 1).reshape(batch, steps, features * lags)
        step = self.head(out) + self.autoregression(lagged)  # (B, T, F), in units of σ_d
        prediction = x + step * self.diff_scale
        if lengths is None:
            next_window = series[:, -lags:]
        else:
            ends = torch.as_tensor(lengths, device=x.device).view(batch, 1, 1)
            index = (ends + torch.arange(lags, device=x.device).view(1, lags, 1)).expand(-1, -1, features)
            next_window = series.gather(1, index)  # (B, K, F): each row's last K values
        if tail.size(1):  # values seen, and the prediction after each row's last step, for scoring the next value
            counts = torch.as_tensor(lengths if lengths is not None else [steps] * batch, device=x.device)
            last = prediction[torch.arange(batch, device=x.device), counts - 1]  # (B, F)
            seen_count = (tail[:, :1] + counts[:, None]).clamp(max=lags + 1)  # exact in float32
            tail = torch.cat([seen_count, last, tail[:, 1 + features :]], dim=1)
        return prediction, self._join(h_n, next_window, torch.ones_like(seen), tail)

    @torch.no_grad()
    def observe(self, x: Tensor, state: Tensor, lengths: list[int] | None = None) -> Observation:
        """``predict``, and with a calibration: each arriving value's p-value against the one-step
        prediction made before it (the state's for the first step), and the online adaptation of the
        log-scales, written into the new state. A series' first K + 1 values get none and adapt nothing: the
        predictions before them had no full lag window, unlike every one the calibration scored."""
        predictions, states = self.predict(x, state, lengths)
        calibration = self.calibration
        if calibration is None:
            return Observation(predictions, states, None, None)
        batch, steps, features = x.shape
        _, window, _, tail = self._split(state)
        before = torch.cat([tail[:, None, 1 : 1 + features], predictions[:, :-1]], dim=1)  # (B, T, F)
        scores = ((x - before).abs() / self.diff_scale).cpu().numpy()
        host_tail = tail.cpu().numpy()  # one copy off the device for the count and the adaptation
        index = host_tail[:, :1] + np.arange(steps)[None, :]  # (B, T): values the series saw before
        ends = np.asarray(lengths if lengths is not None else [steps] * batch)
        scores[(index <= self.config.lags) | (np.arange(steps)[None, :] >= ends[:, None])] = np.nan
        series = torch.cat([window[:, -1:], x], dim=1).cpu().numpy()  # (B, T + 1, F): the value before each
        scores, path, carried = calibration.follow(scores, host_tail[:, 1 + features :], series)
        final = torch.from_numpy(carried[np.arange(batch), ends - 1]).to(states.device)
        states = torch.cat([states[:, : states.size(1) - final.size(1)], final], dim=1)
        return Observation(predictions, states, calibration.p_values(scores), path)

    def _recurrence(self, x: Tensor, h0: Tensor, lengths: Tensor | list[int] | None) -> tuple[Tensor, Tensor]:
        """The recurrent core over x (B, T, 2F) from h0 (L, B, core_states·H): out (B, T, H), h_n like h0."""
        return self.gru(x, h0, lengths)

    @torch.no_grad()
    def rollout(self, state: Tensor, last: Tensor, steps: int) -> Tensor:
        """Forecast ``steps`` ahead by feeding predictions back: (B, S), (B, F) -> (B, steps, F).

        ``last`` is the one-step prediction made after the final observed step, so forecast[:, 0] == last.
        Works on copies: the caller's state is untouched.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if steps == 0:
            return last.new_empty(last.size(0), 0, last.size(1))
        outputs = [last]
        for _ in range(steps - 1):
            prediction, state = self.predict(outputs[-1][:, None], state)
            outputs.append(prediction[:, 0])
        return torch.stack(outputs, dim=1)
