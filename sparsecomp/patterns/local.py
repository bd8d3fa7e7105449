"""The arithmetic of a local rule (the first ``sink`` keys plus the last ``window`` keys of each
query), which every static pattern lowers to: kept density and key blocks per query block in closed
form, equal to what ``kernels.build_block_index`` lists (tests check both against it)."""

from __future__ import annotations

import torch


def local_rule_density(n: int, sink: int, window: int) -> float:
    """Kept fraction of the causal pairs of one length-n sequence under a local rule: rows keep
    sink + window keys (window <= 0: every key)."""
    if n <= 0 or window <= 0:
        return 1.0
    kept = 0
    total = n * (n + 1) // 2
    # rows i < window keep i + 1 keys; later rows keep window + min(sink, i + 1 - window)
    w = min(window, n)
    kept += w * (w + 1) // 2
    rest = n - w
    if rest > 0:
        ramp = max(0, min(rest, sink))  # rows where the sink is still filling up
        kept += rest * window + ramp * (ramp + 1) // 2 + (rest - ramp) * sink
    return kept / total


def local_rule_block_counts(
    n_q: int, n_k: int, sink: int, window: int, *, block_m: int, block_n: int, causal: bool = True, site_window: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the (full, part) key blocks of one head with local rule (sink, window) at a
    causal site whose positions are indices (queries are the last n_q of n_k keys): the counts
    ``build_block_index`` gives, in closed form (O(n_q / block_m), no block matrix).

    A block is kept when some row keeps some key of it: key blocks [first_seen, last_seen] of the
    tightest window, or sink blocks inside the site's window; it is full when every row keeps every
    key of it."""
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    if not causal:
        return torch.full((n_qb,), float(n_kb)), torch.zeros(n_qb)
    r0 = torch.arange(n_qb) * block_m + (n_k - n_q)  # key index of each query block's first row
    r1 = torch.clamp(r0 + block_m - 1, max=n_k - 1)  # and of its last row

    def first_block(row, span, some: bool):
        """First key block that ``row``'s window reaches (some), or lies in entirely (every)."""
        if span <= 0:
            return torch.zeros_like(row)
        first_key = torch.clamp(row - span + 1, min=0)
        return first_key // block_n if some else -(-first_key // block_n)

    unlimited = window <= 0
    sink = 0 if unlimited else sink
    # some: [max(site, head), last] plus sink blocks in [site, head)
    last = r1 // block_n
    site_lo, head_lo = first_block(r0, site_window, True), first_block(r0, window, True)
    lo = torch.maximum(site_lo, head_lo)
    sink_some = torch.clamp(torch.minimum(torch.clamp(head_lo, max=-(-sink // block_n)), last + 1) - site_lo, min=0)
    # ... but only when some sink key is inside the site window: its first key can fall after the
    # sinks in the same block as the last of them.
    site_first_key = torch.clamp(r0 - site_window + 1, min=0) if site_window > 0 else torch.zeros_like(r0)
    sink_some = torch.where(site_first_key <= sink - 1, sink_some, 0)
    keep = torch.clamp(last - lo + 1, min=0) + sink_some
    # every: [max(site, head), last_full] plus whole sink blocks in [site, head)
    last_full = torch.clamp((r0 + 1) // block_n - 1, max=n_k // block_n - 1)  # a partial key block is never full
    site_full, head_full = first_block(r1, site_window, False), first_block(r1, window, False)
    full_lo = torch.maximum(site_full, head_full)
    sink_full = torch.minimum(torch.clamp(head_full, max=sink // block_n), last_full + 1)
    full = torch.clamp(last_full - full_lo + 1, min=0) + torch.clamp(sink_full - site_full, min=0)
    return full.float(), (keep - full).float()
