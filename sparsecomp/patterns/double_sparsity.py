"""Double Sparsity (decode): per KV head, the keys scoring highest on a few offline-calibrated
channels (the label cache: those channels of K), then attention over those keys only."""

from sparsecomp.kernels.decode.selection import key_labels, label_scores, query_channels, top_tokens

from .base import COUNT, POSITIVE, SHARE, Pattern, register
from .selection import SELECTION_HEADS, budget, check_budget, selection_heads


def _summarize(keys, key_ok, channel_index, **params):
    """The label cache of ``keys``: their calibrated channels, (B, Hkv, N, C)."""
    return (key_labels(keys, channel_index),)


def _select_from(q, state, keys, key_ok, q_last, channel_index, *, channels, ratio, k, heads):
    (labels,) = state
    n_keys = keys.shape[2]
    n_sel = selection_heads(heads, q.shape[1], labels.shape[1])
    scores = label_scores(query_channels(q, channel_index), labels, q_last, key_ok, n_sel)
    return top_tokens(scores, budget(k, ratio, n_keys))


DOUBLE_SPARSITY = register(
    Pattern(
        "double_sparsity",
        params={"channels": 16, "ratio": 0.0625, "k": 0, "heads": "kv"},
        accepts={"channels": POSITIVE, "ratio": SHARE, "k": COUNT, "heads": SELECTION_HEADS},
        doc="decode: the top-k keys (k, or ratio of the keys) by q.k on calibrated channels (Double Sparsity)",
        check=check_budget("k"),
        phases=("decode",),
        summarize=_summarize,
        select_from=_select_from,
        state_unit=lambda params: 1,
        needs_channels=True,
    )
)
