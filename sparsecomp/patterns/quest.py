"""Quest (decode): per KV head, the pages of keys whose upper bound of q.k (from each page's
elementwise min and max of K) is highest, then attention over those pages only."""

import torch

from sparsecomp.kernels.decode.selection import page_bounds, page_min_max, page_tokens, top_tokens

from .base import COUNT, POSITIVE, SHARE, Pattern, register
from .selection import SELECTION_HEADS, budget, check_budget, selection_heads


def _pad_to_pages(keys, key_ok, page):
    """Keys and key mask padded to whole pages (the padding is keys no query sees)."""
    n = keys.shape[2]
    pad = -n % page
    ok = torch.ones(keys.shape[0], n, dtype=torch.bool, device=keys.device) if key_ok is None else key_ok
    if pad:
        keys = torch.nn.functional.pad(keys, (0, 0, 0, pad))
        ok = torch.nn.functional.pad(ok, (0, pad), value=False)
    return keys, ok


def _summarize(keys, key_ok, channel_index, *, page, **params):
    """Per page of ``page`` keys the elementwise min and max of its valid keys, (B, Hkv, Np, D) each."""
    kmin, kmax, _ = page_min_max(*_pad_to_pages(keys, key_ok, page), page)
    return kmin, kmax


def _select_from(q, state, keys, key_ok, q_last, channel_index, *, page, ratio, pages, heads):
    kmin, kmax = state
    n_keys = keys.shape[2]
    n_pages = kmin.shape[2]
    ok = torch.ones(q.shape[0], n_keys, dtype=torch.bool, device=q.device) if key_ok is None else key_ok
    page_ok = torch.nn.functional.pad(ok, (0, n_pages * page - n_keys), value=False).view(-1, n_pages, page).any(-1)
    n_sel = selection_heads(heads, q.shape[1], kmin.shape[1])
    bounds = page_bounds(q, kmin, kmax, q_last, page_ok, page, n_sel)
    return page_tokens(top_tokens(bounds, budget(pages, ratio, n_pages)), page)


QUEST = register(
    Pattern(
        "quest",
        params={"page": 16, "ratio": 0.0625, "pages": 0, "heads": "kv"},
        accepts={"page": POSITIVE, "ratio": SHARE, "pages": COUNT, "heads": SELECTION_HEADS},
        doc="decode: the top pages of keys (pages, or ratio of the pages) by their q.k upper bound (Quest)",
        check=check_budget("pages"),
        phases=("decode",),
        summarize=_summarize,
        select_from=_select_from,
        state_unit=lambda params: params["page"],
    )
)
