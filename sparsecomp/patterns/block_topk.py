"""MoBA / Quest-style block selection, estimated per input: per query block the ``k`` key blocks
with the highest pooled score (``coverage`` > 0: the fewest blocks holding that share of it)."""

from sparsecomp.kernels.prefill.adaptive_index import block_topk_index

from .base import COUNT, SHARE, Pattern, register


def _block_bound(rule, causal, block_n):
    if rule.coverage:
        return causal  # a coverage may keep anything
    return causal.clamp(max=rule.k + 2.0)  # top-k, the diagonal and the first block


def _candidates(max_len: int, sink: int):
    from sparsecomp.plan import Rule

    return [Rule("block_topk", k=k) for k in (4, 8, 16, 32)]


BLOCK_TOPK = register(
    Pattern(
        "block_topk",
        params={"k": 16, "coverage": 0.0, "pool": "mean"},
        accepts={"k": COUNT, "coverage": SHARE, "pool": ("mean", "minmax")},
        doc="the top-k key blocks per query block by pooled score (MoBA / Quest-style), per input",
        check=lambda p: "block_topk needs k > 0 or coverage > 0" if p["k"] == 0 and p["coverage"] == 0 else None,
        builder=block_topk_index,
        per_head=("k",),
        block_bound=_block_bound,
        index_work=lambda rule, w, blocks: blocks * w.head_dim / 64 + w.batch * w.q_heads * w.kv_len,
        candidates=_candidates,
    )
)
