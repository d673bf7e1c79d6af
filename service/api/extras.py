"""A request's ``levels`` and ``scores``, checked beyond what the schema says: distinct levels, and a model
that carries a calibration to answer them with."""

from __future__ import annotations

from model import Forecaster
from service.extras import NO_EXTRAS, Extras, repeats_a_level
from service.problems import Problem

NOT_CALIBRATED = (
    "the served model has no calibration, so it has no intervals or scores to give; retrain it with"
    " `python -m model.train`, which calibrates it on its validation tail and writes the calibration into"
    " the checkpoint's config.json (docs/model.md, \"Intervals and surprise scores\")"
)


def requested(levels: list[float] | None, scores: bool, forecaster: Forecaster, loc: list[str]) -> Extras:
    """The chunk's ``Extras``; a 422 for repeated levels or a model without calibration. ``loc`` is where
    the request's fields sit (["body"], a batch item's)."""
    if not levels and not scores:
        return NO_EXTRAS
    if levels and repeats_a_level(levels):
        detail = (f"levels {levels} repeat a level (intervals are named by format(level, 'g'), 6 significant"
                  " digits); each interval is asked for once")
        raise Problem(422, "invalid-request", detail,
                      errors=[{"loc": [*loc, "levels"], "msg": detail, "type": "value_error"}])
    if forecaster.calibration is None:
        raise Problem(422, "not-calibrated", NOT_CALIBRATED)
    return Extras(tuple(float(level) for level in levels or ()), scores)
