"""A synthetic task for the analysis's property tests: its outcome and its failures depend on parameters
that the test chooses, through the spec's ``fixed`` constants.

``run(params, ctx)`` reads, from ``params`` (the row's parameters plus ``fixed``):

* ``effects``: ``{param: {value_json: effect}}``; ``score`` is the sum of the effects of the row's values
  (a value not listed adds 0), plus ``slope[param] * value`` for numeric parameters in ``slope``;
* ``noise``: the standard deviation of Gaussian noise, seeded by the row id (default 0.05);
* ``fail_when``: ``{param: value_json}``; a row whose values match every entry raises ``RuntimeError``
  (an empty or missing mapping never fails);
* ``fail_share``: a share of the remaining rows, drawn by the row id, that raise as well (failures that
  follow no rule).

``value_json`` is the value as canonical JSON (``true``, ``"ssim"``, ``null``, ``[1, 2]``), so that every
value type can be a key. It returns ``score`` and ``aux`` (``score`` squared, an outcome the tests do not
model, or ``score`` itself where its square would overflow; ``aux_name`` in ``params`` renames it) and logs a short curve with ``loss`` and ``val_ssim``.
"""
from __future__ import annotations

import json
import random


def value_key(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def run(params: dict, ctx) -> dict:
    rng = random.Random(ctx.row_id)
    fail_when = params.get("fail_when") or {}
    if fail_when and all(name in params and value_key(params[name]) == value for name, value in fail_when.items()):
        raise RuntimeError("planted failure: " + ", ".join(f"{k}={v}" for k, v in sorted(fail_when.items())))
    if rng.random() < float(params.get("fail_share", 0.0)):
        raise RuntimeError("failure at random")
    score = 0.0
    for name, effects in (params.get("effects") or {}).items():
        if name in params:
            score += float(effects.get(value_key(params[name]), 0.0))
    for name, slope in (params.get("slope") or {}).items():
        value = params.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            score += float(slope) * value
    score += rng.gauss(0.0, float(params.get("noise", 0.05)))
    for step in range(3):
        ctx.log(step, loss=1.0 / (step + 1) + score * 0.01, val_ssim=0.5 + 0.1 * step)
    aux = score * score if abs(score) < 1e150 else score  # a score near 1e308 has no finite square
    return {"score": score, params.get("aux_name", "aux"): aux}
