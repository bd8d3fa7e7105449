"""SampleAttention, estimated per input: a local band of ``window_ratio`` of the keys plus the key
columns that hold ``alpha`` of the attention of a ``sample_ratio`` sample of query rows."""

import math

from sparsecomp.kernels.prefill.adaptive_index import sample_index

from .base import FRACTION, SHARE, Pattern, register


def _candidates(max_len: int, sink: int):
    from sparsecomp.plan import Rule

    return [Rule("sample", alpha=a) for a in (0.8, 0.9, 0.95, 0.98)]


def _index_work(rule, w, blocks):
    return blocks + w.batch * w.q_heads * math.ceil(rule.sample_ratio * w.q_len) * w.kv_len * w.head_dim / 64


SAMPLE = register(
    Pattern(
        "sample",
        params={"alpha": 0.95, "window_ratio": 0.02, "sample_ratio": 0.02},
        accepts={"alpha": FRACTION, "window_ratio": SHARE, "sample_ratio": FRACTION},
        doc="SampleAttention's band + columns holding alpha of sampled rows' attention, per input",
        builder=sample_index,
        per_head=("alpha",),
        square_blocks=True,
        index_work=_index_work,  # no useful block bound: the columns may be anything
        candidates=_candidates,
    )
)
