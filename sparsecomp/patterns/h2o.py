"""H2O, heavy-hitter eviction (decode): each KV head keeps the keys with the most attention
accumulated so far (the prompt's queries' softmax weights, summed, then every decode step's) plus
the ``window`` most recent keys, ``k`` (or ``ratio`` of the keys) in all; a key that drops out of
that set is evicted for good. Kept beside a static cache as one float per key: the accumulated
attention, -inf once evicted (or never seen). Each step selects from it (as SnapKV does from its
votes), attends, then adds its own attention weights on the kept keys and evicts the rest."""

import torch

from .base import COUNT, POSITIVE, SHARE, Pattern, register
from .selection import check_budget
from .snapkv import row_attention_sums, select_voted

_CHUNK_ELEMENTS = 1 << 26  # float32 weights per chunk of prompt queries (256 MiB)


def prompt_attention(q, keys, mask, causal: bool, channel_index, n_state: int, *, scale, **params):
    """(B, Hkv, n_state) float32: each key's attention summed over all the prompt's queries (and
    the KV group's query heads), -inf for keys none sees; in chunks of query rows, so that no
    N x N tensor is held at once (one chunk where the prompt's length is symbolic)."""
    b, hq, nq, _ = q.shape
    n = keys.shape[2]
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * hq * n)) if isinstance(nq, int) else nq
    total, seen = 0.0, False
    for first in range(0, nq, rows) if isinstance(nq, int) else [0]:
        last = min(nq, first + rows) if isinstance(nq, int) else nq
        part, part_seen = row_attention_sums(q, keys, mask, causal, first, last, scale)
        total, seen = total + part, seen | part_seen
    total = total.masked_fill(~seen, float("-inf"))
    return (torch.nn.functional.pad(total, (0, n_state - n), value=float("-inf")),)


def _summarize(keys, key_ok, channel_index, **params):
    """A key written by a decode step starts with no attention (it is in the window)."""
    return (torch.zeros(keys.shape[:3], dtype=torch.float32, device=keys.device),)


def observe_step(q, state, keys, tokens, key_ok, q_last, scale: float, **params):
    """The state after a step: the step's softmax weights (its last query row, summed over each KV
    group's query heads) added to the keys it attended to; every other key is evicted (-inf)."""
    (scores,) = state
    b, hq, _, d = q.shape
    hkv = keys.shape[1]
    listed = tokens >= 0  # (B, Hkv, S)
    index = tokens.clamp(min=0).long()
    picked = torch.gather(keys, 2, index[..., None].expand(-1, -1, -1, d)).float()  # (B, Hkv, S, D)
    rows = q[:, :, -1].float().reshape(b, hkv, hq // hkv, d)
    logits = (rows @ picked.transpose(-1, -2)) * scale  # (B, Hkv, G, S)
    weights = torch.softmax(logits.masked_fill(~listed[:, :, None], float("-inf")), -1).sum(2)
    weights = weights.masked_fill(~listed, 0.0)
    kept = torch.zeros(scores.shape, dtype=torch.int32, device=scores.device)
    kept = kept.scatter_add(2, index, listed.to(torch.int32)) > 0
    grown = scores.scatter_add(2, index, weights)
    return (grown.masked_fill(~kept, float("-inf")),)


H2O = register(
    Pattern(
        "h2o",
        params={"ratio": 0.0625, "k": 0, "window": 64, "heads": "kv"},
        accepts={"ratio": SHARE, "k": COUNT, "window": POSITIVE, "heads": ("kv",)},
        doc="decode: the keys with the most accumulated attention (evicted for good once dropped) plus "
        "the last `window` keys; k (or ratio of the keys) in all (H2O)",
        check=check_budget("k"),
        phases=("decode",),
        summarize=_summarize,
        select_from=select_voted,
        state_unit=lambda params: 1,
        summarize_prompt=prompt_attention,
        observe_step=observe_step,
    )
)
