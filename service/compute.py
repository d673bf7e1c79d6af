"""BatchCompute: the model's side of the engine, run on one compute thread, never on the event loop.

A batch is a few large torch calls, no per-step Python: chunks sorted longest first and padded (the GRU's
batch shrinks as short chunks end), states gathered from the store by row, one forward, one roll-out for the
rows that asked for a forecast, one copy back to the host. A calibrated model also scores every arriving
value and adapts each row's intervals (``Forecaster.observe``); the intervals and scores a chunk asked for
are built here too, off the event loop. Few calls per batch matter on the CPU: the
compute thread and the event loop share the GIL, and each torch call is a chance to hand it over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model import Forecaster
from service.extras import Extras, level_key
from service.sessions.base import Session

log = logging.getLogger("service.engine")
Gather = Callable[[Sequence[Session | None], Any], Tensor]  # the store's gather: records -> (B, S) states


@dataclass(slots=True)
class Computed:
    predictions: list[np.ndarray]  # per chunk, (T, F) float32
    forecasts: list[np.ndarray | None]  # per chunk, (horizon, F) float32; None without a horizon
    states: Tensor  # (B, S), row i = chunk i
    finite: list[bool]  # per chunk: predictions, forecast, intervals and new state all finite
    surprises: list[int]  # per chunk, its answered values with a p-value under ``surprise_p`` (0: no calibration)
    scored: list[int]  # per chunk, its answered values that have a p-value (0: no calibration)
    extras: list[list[dict[str, Any] | None]]  # per chunk, per part: the answer's intervals and scores where it asked


class BatchCompute:
    def __init__(self, forecaster: Forecaster, surprise_p: float = 0.01):
        self.forecaster = forecaster
        self.surprise_p = surprise_p  # a value whose p-value is under it counts as a surprise
        self.device = next(forecaster.parameters()).device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gru-compute")

    async def warm_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)

    async def run(self, values: Sequence[np.ndarray], horizons: Sequence[int], sessions: Sequence[Session | None],
                  gather: Gather, parts: Sequence[Sequence[tuple[int, Extras]]], primed: Sequence[int]) -> Computed:
        """Chunk i's ``values`` from the state of ``sessions[i]`` (a fresh one for None), on the compute thread;
        its first ``primed[i]`` values only prime the state (a replayed upgrade): nothing is answered for them.
        The rest are answered in ``parts[i]``, (steps, extras asked) each: one for a chunk, one per chunk of a
        run (``service.batch_queue``), whose intervals and scores are each part's own."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._compute, values, horizons, sessions, gather, parts,
                                          primed)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def _warm_up(self) -> None:
        """Pay the one-off costs before the first client does: TorchScript's profiling runs on CPU, the
        Triton kernel's compilation on a GPU. Where the kernel fails (Triton's launcher needs a C compiler),
        the GPU serves through the TorchScript recurrence instead of failing every request, and says so."""
        try:
            self._exercise_model()
        except Exception:
            gru = self.forecaster.gru
            if not gru.use_fused or self.device.type != "cuda":
                raise
            log.warning("fused GRU kernel unavailable on %s; serving with the TorchScript recurrence",
                        self.device, exc_info=True)
            gru.use_fused = False
            self._exercise_model()

    def _exercise_model(self) -> None:
        with torch.inference_mode():
            x = torch.zeros(2, 2, self.forecaster.num_features, device=self.device)
            for _ in range(3):  # the TorchScript profiling executor optimises after its second run
                state = self.forecaster.initial_state(2)
                y, state = self.forecaster.predict(x, state, [2, 1])  # ragged, then equal rows in rollout
                self.forecaster.rollout(state, y[:, -1], 2)

    def _compute(self, values: Sequence[np.ndarray], horizons: Sequence[int], sessions: Sequence[Session | None],
                 gather: Gather, parts: Sequence[Sequence[tuple[int, Extras]]], primed: Sequence[int]) -> Computed:
        count = len(values)
        order = sorted(range(count), key=lambda i: -len(values[i]))  # longest first
        lengths = [len(values[i]) for i in order]
        features = self.forecaster.num_features
        same_length = lengths[0] == lengths[-1]  # then ``order`` is the request order (a stable sort)
        if same_length:
            padded = np.stack(values).astype(np.float32, copy=False)  # (B, T, F)
        else:
            padded = np.zeros((count, lengths[0], features), dtype=np.float32)  # (B, T_max, F)
            for row, i in enumerate(order):
                padded[row, : lengths[row]] = values[i]
        sorted_horizons = [horizons[i] for i in order]
        with torch.inference_mode():
            x = torch.from_numpy(padded).to(self.device)
            states = gather([sessions[i] for i in order], self.device)  # (B, S)
            observed = self.forecaster.observe(x, states, None if same_length else lengths)
            y, new_states = observed.predictions, observed.states
            wanting = [row for row, horizon in enumerate(sorted_horizons) if horizon]  # rows asking a forecast
            forecast_host = np.empty((0, 0, features), dtype=np.float32)
            if wanting:  # only those rows roll out, as far as the longest horizon among them
                pick = torch.tensor(wanting, device=self.device)
                ends = torch.tensor([lengths[row] - 1 for row in wanting], device=self.device)
                last = y[pick, ends]  # (b, F): the prediction after each of those rows' last step
                forecast = self.forecaster.rollout(new_states[pick], last, max(sorted_horizons))  # (b, h, F)
                forecast_host = forecast.cpu().numpy()
            y_host = np.ascontiguousarray(y.cpu().numpy())  # so each row's slice is C-contiguous too
            states_out = new_states  # back in request order:
            if not same_length:
                states_out = new_states.index_select(0, torch.tensor(np.argsort(order), device=self.device))
            finite_states: list[bool] = torch.isfinite(states_out).all(dim=1).tolist()
        predictions: list[np.ndarray] = [np.empty(0)] * count
        forecasts: list[np.ndarray | None] = [None] * count
        for row, i in enumerate(order):
            predictions[i] = y_host[row, primed[i]: lengths[row]]
        for picked, row in enumerate(wanting):
            forecasts[order[row]] = np.ascontiguousarray(forecast_host[picked, : sorted_horizons[row]])
        surprises, scored = [0] * count, [0] * count
        asked: list[list[dict[str, Any] | None]] = [[None] * len(p) for p in parts]
        # Intervals are checked too: their half-widths scale by exp of the state's log-scales, which a finite
        # state can hold past float32's range (an imported document); orjson would answer their inf as null.
        unbounded: set[int] = set()  # chunks with an interval bound that is not finite
        if observed.p_values is not None and observed.log_scales is not None:
            surprising = _surprises(observed.p_values, self.surprise_p, [primed[i] for i in order])
            with_p = _scored(observed.p_values, [primed[i] for i in order])
            for row, i in enumerate(order):
                surprises[i], scored[i] = surprising[row], with_p[row]
                start = primed[i]
                for part, (steps, wanted) in enumerate(parts[i]):
                    if wanted:
                        answered = slice(start, start + steps)
                        ends_run = part == len(parts[i]) - 1  # only a run's last chunk may ask a forecast
                        extras = asked[i][part] = self._extras(
                            wanted, y_host[row, answered], forecasts[i] if ends_run else None,
                            observed.p_values[row, answered], observed.log_scales[row, answered])
                        if not _bands_finite(extras):
                            unbounded.add(i)
                    start += steps
        # One check of the whole batch; only a batch with a value that is not finite (rare) is checked by row.
        if np.isfinite(y_host).all() and np.isfinite(forecast_host).all():
            finite = finite_states
        else:
            finite = [ok and _all_finite(predictions[i], forecasts[i]) for i, ok in enumerate(finite_states)]
        if unbounded:
            finite = [ok and i not in unbounded for i, ok in enumerate(finite)]
        return Computed(predictions, forecasts, states_out, finite, surprises, scored, asked)

    def _extras(self, extras: Extras, predictions: np.ndarray, forecast: np.ndarray | None,
                p_values: np.ndarray, log_scales: np.ndarray) -> dict[str, Any]:
        """The answer's ``intervals``, ``forecast_intervals`` and ``scores`` a chunk asked for (the routes
        refuse them for a model without calibration, so here there is one)."""
        calibration = self.forecaster.calibration
        assert calibration is not None
        out: dict[str, Any] = {}
        if extras.levels:
            levels = np.array(extras.levels)
            diff_scale = self.forecaster.diff_scale.cpu().numpy()
            widths = calibration.half_widths(levels, log_scales, diff_scale)
            out["intervals"] = _bands(extras.levels, predictions, widths)
            if forecast is not None:
                widths = calibration.half_widths(levels, log_scales[-1], diff_scale, steps=len(forecast))
                out["forecast_intervals"] = _bands(extras.levels, forecast, widths)
        if extras.scores:
            out["scores"] = p_values
        return out


def _bands(levels: Sequence[float], centre: np.ndarray, half_widths: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """{"80": {"lower": T × F, "upper": T × F}, ...} around ``centre`` (T, F); half_widths (L, T, F)."""
    return {level_key(level): {"lower": centre - width, "upper": centre + width}
            for level, width in zip(levels, half_widths, strict=True)}


def _surprises(p_values: np.ndarray, below: float, primed: Sequence[int]) -> list[int]:
    """Per row of ``p_values`` (B, T, F; NaN where unscored or past the row's end), its values from
    ``primed[row]`` on with a p-value under ``below`` (NaN compares false)."""
    return _count_from(p_values < below, primed)


def _scored(p_values: np.ndarray, primed: Sequence[int]) -> list[int]:
    """Per row of ``p_values``, its values from ``primed[row]`` on that have one: the share of surprises is
    counted over these, each of a step's F values apart (gru_scored_values_total)."""
    return _count_from(~np.isnan(p_values), primed)


def _count_from(mask: np.ndarray, primed: Sequence[int]) -> list[int]:
    """Per row of ``mask`` (B, T, F), its true entries from step ``primed[row]`` on."""
    per_step = np.count_nonzero(mask, axis=2).cumsum(axis=1)  # (B, T): running count
    counts = per_step[:, -1]
    if any(primed):
        starts = np.asarray(primed)
        counts = counts - np.where(starts > 0, per_step[np.arange(len(starts)), np.maximum(starts - 1, 0)], 0)
    return counts.tolist()


def _all_finite(*arrays: np.ndarray | None) -> bool:
    return all(array is None or bool(np.isfinite(array).all()) for array in arrays)


def _bands_finite(extras: dict[str, Any]) -> bool:
    """Whether every bound of a part's ``intervals`` and ``forecast_intervals`` is finite (its scores are
    p-values: NaN, written null, where a value has nothing to be scored against)."""
    return all(_all_finite(band["lower"], band["upper"]) for key in ("intervals", "forecast_intervals")
               for band in extras.get(key, {}).values())
