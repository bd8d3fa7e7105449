"""Decode-step cost: dense attention against a selection rule, predicted from what a step reads.

A decode step is memory-bound; each term is  a + b * x,  x what its kernel touches:
    dense      K and V of every key:                    2 B Hkv N d e bytes
    summary    Double Sparsity's label cache:           B Hs N C e bytes
               Quest's page min and max:                2 B Hs (N / P) d e bytes
    top_k      scores ranked (torch.topk):              B Hs N (Double Sparsity) or B Hs N / P (Quest)
    attention  K and V of the selected keys:            2 B Hs S d e bytes
(B batch, Hkv KV heads, Hs selection heads, each reading its KV head's summary; N keys, d head_dim,
e bytes per element, C channels, P keys per page, S selected keys). A selection step is summary +
top_k + attention, fitted on ``benchmarks/decode_attention.py``'s rows (``fit``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cost_model import first_winning_length, fit_coefficients

TERMS = ("dense", "summary", "top_k", "attention")


@dataclass(frozen=True)
class DecodeWork:
    """One decode site's shape and selection rule. ``selected``: keys attended to (S)."""

    batch: int
    kv_heads: int
    sel_heads: int
    n_keys: int
    head_dim: int
    element_bytes: int
    selected: int
    kind: str  # "double_sparsity", "quest", "snapkv" or "h2o"
    channels: int = 0
    page: int = 0


def work_terms(w: DecodeWork) -> dict[str, float]:
    """x of each term (see the module notes)."""
    per_sel = w.batch * w.sel_heads * w.element_bytes
    if w.kind == "double_sparsity":
        summary, ranked = per_sel * w.n_keys * w.channels, w.batch * w.sel_heads * w.n_keys
    elif w.kind in ("snapkv", "h2o"):  # one float32 vote per key, ranked like Double Sparsity's scores
        summary, ranked = w.batch * w.sel_heads * w.n_keys * 4, w.batch * w.sel_heads * w.n_keys
        if w.kind == "h2o":  # and rewritten: the step's weights added, the rest evicted
            summary *= 2
    elif w.kind == "quest":
        pages = -(-w.n_keys // w.page)
        summary, ranked = 2 * per_sel * pages * w.head_dim, w.batch * w.sel_heads * pages
    else:
        raise ValueError(f"no decode cost terms for {w.kind!r}")
    return {
        "dense": 2 * w.batch * w.kv_heads * w.element_bytes * w.n_keys * w.head_dim,
        "summary": summary,
        "top_k": ranked,
        "attention": (3 if w.kind == "h2o" else 2) * w.batch * w.sel_heads * w.selected * w.head_dim * w.element_bytes,
    }  # H2O reads the selected keys once more, for its weights


class DecodeCostModel:
    """ms = a + b * x per term (``coefficients[term] = [a, b]``)."""

    def __init__(self, coefficients: dict[str, list[float]], info: dict | None = None):
        missing = set(TERMS) - set(coefficients)
        if missing:
            raise ValueError(f"decode cost model lacks terms {sorted(missing)}")
        self.coefficients = {t: [float(c) for c in coefficients[t]] for t in TERMS}
        self.info = dict(info or {})

    def _term(self, term: str, x: float) -> float:
        a, b = self.coefficients[term]
        return a + b * x

    def dense_ms(self, w: DecodeWork) -> float:
        return self._term("dense", work_terms(w)["dense"])

    def selection_ms(self, w: DecodeWork) -> float:
        x = work_terms(w)
        return sum(self._term(t, x[t]) for t in ("summary", "top_k", "attention"))

    def crossover(self, work_at) -> int | None:
        """The smallest key count (a multiple of 128, up to 2^24) at which the selection is predicted
        faster; ``work_at(n)`` is the site's DecodeWork at n keys. None: dense wins throughout."""

        def sparse_wins(n: int) -> bool:
            w = work_at(n)
            return self.selection_ms(w) < self.dense_ms(w)

        return first_winning_length(sparse_wins, 1 << 24)

    def to_json(self) -> dict:
        return {"coefficients": self.coefficients, "info": self.info}

    @classmethod
    def from_json(cls, obj: dict) -> DecodeCostModel:
        return cls(obj["coefficients"], obj.get("info"))


# benchmarks/decode_attention.py's head layout
BENCHMARK_SHAPE = {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "channels": 16, "page": 16}


def benchmark_work(row: dict, fraction: int, kind: str = "double_sparsity", per_query_head: bool = False) -> DecodeWork:
    """The DecodeWork of a ``benchmarks/decode_attention.py`` row selecting 1/fraction of its keys."""
    shape, n = BENCHMARK_SHAPE, row["kv_len"]
    return DecodeWork(
        batch=row["batch"], kv_heads=shape["kv_heads"], sel_heads=shape["q_heads" if per_query_head else "kv_heads"],
        n_keys=n, head_dim=shape["head_dim"], element_bytes=2, selected=n // fraction, kind=kind,
        channels=shape["channels"], page=shape["page"],
    )  # fmt: skip


def fit(rows: list[dict], info: dict | None = None) -> DecodeCostModel:
    """Dense on the best dense times; summary and attention on the label-score and attention times
    (each timed alone, attention at 1/8 and 1/16); top_k on what the whole Double Sparsity steps
    (1/8, 1/16) take beyond those two, so it carries the step's small ops too (query channels, the
    index cast, gaps between kernels)."""

    def terms_fit(term, samples):
        x, y = zip(*samples, strict=True)
        return fit_coefficients([[1.0, work_terms(w)[term]] for w in x], list(y))

    w16 = [(benchmark_work(r, 16), r) for r in rows]
    w8 = [(benchmark_work(r, 8), r) for r in rows]
    coefficients = {
        "dense": terms_fit("dense", [(w, r["best_dense_ms"]) for w, r in w16]),
        "summary": terms_fit("summary", [(w, r["ds16_scores_ms"]) for w, r in w16]),
        "attention": terms_fit(
            "attention", [(w, r["ds16_attention_ms"]) for w, r in w16] + [(w, r["ds8_attention_ms"]) for w, r in w8]
        ),
    }
    partial = DecodeCostModel({**coefficients, "top_k": [0.0, 0.0]})
    steps = [(w, r["ds16_ms"]) for w, r in w16] + [(w, r["ds8_ms"]) for w, r in w8]
    rest = [(w, ms - partial.selection_ms(w)) for w, ms in steps]
    coefficients["top_k"] = terms_fit("top_k", rest)
    return DecodeCostModel(coefficients, info)
