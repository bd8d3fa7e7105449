"""Quest (decode): per KV head, the pages of keys whose upper bound of q.k (from each page's
elementwise min and max of K) is highest, then attention over those pages only."""

import torch

from sparsecomp.kernels.decode.selection import page_bounds, page_min_max, page_tokens, top_tokens

from .base import COUNT, POSITIVE, SHARE, Pattern, register
from .selection import SELECTION_HEADS, budget, check_budget, selection_heads


def _select(q, k, key_ok, q_last, channel_index, *, page, ratio, pages, heads):
    n = k.shape[2]
    n_pages = -(-n // page)
    pad = n_pages * page - n
    if pad:  # the last page is partial: pad it with keys that no query sees
        k = torch.nn.functional.pad(k, (0, 0, 0, pad))
        ok = torch.ones(k.shape[0], n, dtype=torch.bool, device=k.device) if key_ok is None else key_ok
        key_ok = torch.nn.functional.pad(ok, (0, pad), value=False)
    kmin, kmax, page_ok = page_min_max(k, key_ok, page)
    n_sel = selection_heads(heads, q.shape[1], k.shape[1])
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
        select=_select,
    )
)
