"""MInference's vertical-slash pattern, estimated per input: the last ``last_q`` queries vote for
``n_vertical`` key columns and ``n_slash`` diagonals (``mass`` < 1: FlexPrefill's cumulative-
attention cut under those budgets), plus ``sink`` first keys and a ``local`` band."""

from sparsecomp.kernels.prefill.adaptive_index import vertical_slash_index

from .base import COUNT, FRACTION, POSITIVE, Pattern, register


def _block_bound(rule, causal, block_n):
    # Each kept diagonal meets at most 2 key blocks of a query block; columns come in tiles.
    bound = 2.0 * (rule.n_slash + rule.local // block_n + 1) + rule.sink / block_n + rule.n_vertical / block_n
    return causal.clamp(max=bound)


def _candidates(max_len: int, sink: int):
    from sparsecomp.plan import Rule

    budgets = ((64, 256), (128, 512), (256, 1024), (512, 2048), (1000, 6096))  # up to MInference's default
    return [Rule("vertical_slash", n_vertical=nv, n_slash=ns) for nv, ns in budgets]


VERTICAL_SLASH = register(
    Pattern(
        "vertical_slash",
        params={"n_vertical": 1000, "n_slash": 6096, "last_q": 64, "sink": 64, "local": 64, "mass": 1.0},
        accepts={
            **dict.fromkeys(("n_vertical", "n_slash", "sink", "local"), COUNT),
            "last_q": POSITIVE,
            "mass": FRACTION,
        },  # fmt: skip
        doc="MInference's vertical + slash lines voted by the last queries, per input",
        builder=vertical_slash_index,
        per_head=("n_vertical", "n_slash"),
        square_blocks=True,
        block_bound=_block_bound,
        index_work=lambda rule, w, blocks: blocks + w.batch * w.q_heads * rule.last_q * w.kv_len * w.head_dim / 64,
        candidates=_candidates,
    )
)
