"""MoA's elastic span: streaming with window = ceil(a + b * N) for N keys (at least 1).

``a`` is an integer number of keys: calibration fits it as a ceiling and ``b`` carries the fraction
(``a=4.5`` is refused rather than truncated; negative ``a`` is fine when ``b * N`` outgrows it)."""

import math

from .base import COUNT, Pattern, Range, register


def _local_rule(rule, n_keys):
    if n_keys is None:
        raise ValueError("an elastic rule's window depends on the number of keys")
    return rule.sink, max(1, math.ceil(rule.a + rule.b * n_keys))


def _check(p):
    if p["a"] <= 0 and p["b"] == 0:
        return "elastic needs a window that grows past 0 (a > 0 or b > 0)"
    return None


ELASTIC = register(
    Pattern(
        "elastic",
        params={"sink": 0, "a": 0, "b": 0.0},
        accepts={"sink": COUNT, "a": Range(), "b": COUNT},
        doc="streaming with window ceil(a + b N) for N keys (MoA's elastic span)",
        check=_check,
        local_rule=_local_rule,
        length_dependent=True,
    )
)
