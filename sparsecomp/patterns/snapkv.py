"""SnapKV (decode): at the end of the prompt, the last ``observe`` queries vote, per KV head, for the
prompt keys they attend to most (softmax weights summed over the window and the KV group's query
heads, then max-pooled over ``pool`` neighbouring keys so that kept keys come with their
neighbours); every decode step attends to the top-voted keys plus the ``window`` most recent ones.
The votes are taken once, in the prompt's graph, and kept beside a static cache (one float per
key); keys written later never gain votes: they are read while in the window (``decoded="window"``),
or kept before any prompt key, the most recent first (``decoded="kept"``: SnapKV keeps every
generated key; within a fixed budget they push out the lowest-voted prompt keys)."""

import torch

from sparsecomp.kernels.decode.selection import top_tokens, window_tokens
from sparsecomp.kernels.prefill.block_index import last_valid_key

from .base import COUNT, POSITIVE, SHARE, Pattern, register
from .selection import budget, check_budget


def row_attention_sums(q, keys, mask, causal: bool, first: int, last: int, scale: float):
    """The softmax weights of query rows [first, last) summed per key over those rows and each KV
    group's query heads, (B, Hkv, N) float32, and which keys any of them sees, (B or 1, 1, N) bool.
    A row sees the keys the attention's own ``mask`` (bool; None: ``causal`` or not) lets it see."""
    b, hq, nq, d = q.shape
    hkv, n = keys.shape[1], keys.shape[2]
    rows = q[:, :, first:last].float().reshape(b, hkv, (hq // hkv) * (last - first), d)  # a KV group's rows
    scores = (rows @ keys.float().transpose(-1, -2)) * scale  # (B, Hkv, G*R, N)
    if mask is not None:  # (B or 1, 1 or Hq, Nq, >= N): as the attention read it
        seen = mask[..., first:last, :n].amax(1)  # a key one of the heads' rows sees
    else:
        position = torch.arange(first, last, device=keys.device)[:, None] + (n - nq)
        seen = ((torch.arange(n, device=keys.device) <= position) | (not causal))[None]
    seen = seen.repeat(1, hq // hkv, 1)[:, None]  # (B or 1, 1, G*R, N), rows as in ``rows``
    weights = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return weights.sum(2), seen.any(2)


def prompt_votes(q, keys, mask, causal: bool, channel_index, n_state: int, *, observe, pool, scale, **params):
    """(B, Hkv, n_state) float32: each key's votes from the prompt's last ``observe`` queries (their
    summed weights, max-pooled); -inf for keys none of them sees (padding, slots past the prompt)."""
    nq, n = q.shape[2], keys.shape[2]
    sums, seen = row_attention_sums(q, keys, mask, causal, nq - min(observe, nq), nq, scale)
    votes = torch.nn.functional.max_pool1d(sums, pool, stride=1, padding=pool // 2)
    votes = votes.masked_fill(~seen, float("-inf"))
    return (torch.nn.functional.pad(votes, (0, n_state - n), value=float("-inf")),)


_KEPT = float("inf")  # the vote of a key written by a decode step under decoded="kept"
_RECENT_FIRST = 2.0**20  # kept decoded keys rank above every vote, the most recent first


def _summarize(keys, key_ok, channel_index, *, decoded="window", **params):
    """A decode step's new key (and the allocation) has no votes: read while in the window
    (``decoded="window"``), or kept before any prompt key (``"kept"``, SnapKV's growing cache
    within the fixed budget)."""
    vote = _KEPT if decoded == "kept" else float("-inf")
    return (torch.full(keys.shape[:3], vote, dtype=torch.float32, device=keys.device),)


def select_voted(q, state, keys, key_ok, q_last, channel_index, *, ratio, k, window, **params):
    """The top-scoring keys of the state (one float per key, -inf: never kept) outside the window,
    then the window's keys: k (or ratio of the keys) in all, each once, -1 for unused slots (a
    budget below the window is all window)."""
    (votes,) = state
    n_keys, hkv = keys.shape[2], votes.shape[1]
    total = budget(k, ratio, n_keys)
    window = torch.sym_min(window, total)
    voted = total - window
    last = (
        torch.full((1, 1), n_keys - 1, device=keys.device) if key_ok is None else last_valid_key(key_ok)
    )  # (B or 1, 1): the step's key
    index = torch.arange(n_keys, device=keys.device)
    in_window = index[None, :] > last - window  # listed by the window
    ranked = votes.where(votes != _KEPT, _RECENT_FIRST + index.float())  # exact in fp32 below 2^24 keys
    ranked = ranked.masked_fill(in_window[:, None, :], float("-inf"))
    chosen = top_tokens(ranked, voted)
    chosen = chosen.where(torch.gather(ranked, -1, chosen.long()) > float("-inf"), -1)  # no vote: not kept
    return torch.cat([chosen, window_tokens(key_ok, keys, hkv, 0, window)], -1)


SNAPKV = register(
    Pattern(
        "snapkv",
        params={"ratio": 0.0625, "k": 0, "window": 64, "observe": 32, "pool": 7, "decoded": "window", "heads": "kv"},
        accepts={
            "ratio": SHARE,
            "k": COUNT,
            "window": POSITIVE,
            "observe": POSITIVE,
            "pool": POSITIVE,
            "decoded": ("window", "kept"),
            "heads": ("kv",),
        },  # fmt: skip
        doc="decode: the keys the prompt's last `observe` queries vote for, plus the last `window` keys; "
        "k (or ratio of the keys) in all; keys written while decoding: read in the window, or (decoded=kept) "
        "kept first, the most recent first (SnapKV)",
        check=lambda v: check_budget("k")(v) or (None if v["pool"] % 2 else "pool must be odd"),
        phases=("decode",),
        summarize=_summarize,
        select_from=select_voted,
        state_unit=lambda params: 1,
        summarize_prompt=prompt_votes,
    )
)
