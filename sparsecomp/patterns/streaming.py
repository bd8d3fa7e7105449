"""StreamingLLM / A-shape: the first ``sink`` keys plus the last ``window`` keys of each query."""

from .base import COUNT, POSITIVE, Pattern, register


def _candidates(max_len: int, sink: int):
    """Windows below the longest input: 64 and 128, then steps of 1.5x and 4/3x (192, 256, 384,
    512, ...: a density budget needs fine steps)."""
    from sparsecomp.plan import Rule

    rules, window = [], 64
    while window < max_len:
        rules.append(Rule("streaming", sink=sink, window=window))
        if window >= 128 and window * 3 // 2 < max_len:
            rules.append(Rule("streaming", sink=sink, window=window * 3 // 2))
        window *= 2
    return rules


STREAMING = register(
    Pattern(
        "streaming",
        params={"sink": 0, "window": 0},
        accepts={"sink": COUNT, "window": POSITIVE},
        doc="the first `sink` keys plus the last `window` keys of each query (StreamingLLM)",
        local_rule=lambda rule, n_keys: (rule.sink, rule.window),
        candidates=_candidates,
    )
)
