"""The decode cost model: its fit, its crossover, and compile following it (dense decode steps
where the selection is predicted slower, the selection where faster)."""

from dataclasses import replace

import pytest
from test_decode_rules import decode_plan
from test_generate import assert_same_generation, generate, prompt
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp.tuning.cost_defaults import H100_COST_MODEL, H200_DECODE_COST_MODEL
from sparsecomp.tuning.cost_model import CostModel
from sparsecomp.tuning.decode_cost import DecodeCostModel, benchmark_work, fit, work_terms

pytest.importorskip("transformers")

TRUE = {"dense": [0.01, 2e-10], "summary": [0.002, 4e-10], "top_k": [0.05, 1e-8], "attention": [0.005, 3e-10]}


def synthetic_rows(model: DecodeCostModel) -> list[dict]:
    """decode_attention.py's rows as ``model`` would time them."""
    rows = []
    for b in (1, 8):
        for n in (32768, 131072, 524288):
            w16, w8 = benchmark_work({"batch": b, "kv_len": n}, 16), benchmark_work({"batch": b, "kv_len": n}, 8)
            x16 = work_terms(w16)
            rows.append({
                "batch": b, "kv_len": n,
                "best_dense_ms": model.dense_ms(w16),
                "ds16_scores_ms": model._term("summary", x16["summary"]),
                "ds16_attention_ms": model._term("attention", x16["attention"]),
                "ds8_attention_ms": model._term("attention", work_terms(w8)["attention"]),
                "ds16_ms": model.selection_ms(w16),
                "ds8_ms": model.selection_ms(w8),
            })  # fmt: skip
    return rows


def test_fit_recovers_the_terms_and_predicts_other_layouts():
    truth = DecodeCostModel(TRUE)
    fitted = fit(synthetic_rows(truth))
    for kind, per_q in (("double_sparsity", True), ("quest", False)):  # layouts the fit never saw
        w = benchmark_work({"batch": 4, "kv_len": 65536}, 16, kind, per_q)
        assert fitted.selection_ms(w) == pytest.approx(truth.selection_ms(w), rel=1e-3)
    assert fitted.dense_ms(w) == pytest.approx(truth.dense_ms(w), rel=1e-3)


def test_crossover_is_where_the_selection_starts_to_win():
    model = DecodeCostModel.from_json(H200_DECODE_COST_MODEL)

    def work_at(n, b=1):
        return replace(benchmark_work({"batch": b, "kv_len": n}, 16), selected=max(1, n // 16))

    n = model.crossover(work_at)
    assert 32768 < n < 131072  # the H200 measured: dense wins at 32K keys, the selection at 128K (B=1)
    assert model.selection_ms(work_at(n)) < model.dense_ms(work_at(n))
    assert model.selection_ms(work_at(n - 128)) >= model.dense_ms(work_at(n - 128))
    assert model.crossover(lambda n: work_at(n, b=8)) < n  # a batch amortizes the fixed costs
    never = DecodeCostModel({**TRUE, "top_k": [1.0, 1e-6]})
    assert never.crossover(work_at) is None


def _cost_model(decode: dict) -> CostModel:
    return CostModel.from_json({**H100_COST_MODEL, "decode": decode})


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_compile_keeps_the_dense_decode_step_where_it_is_predicted_faster(cache):
    """A few dozen keys: the H200 fit keeps the dense step, and generation is eager's exactly."""
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    ref = generate(model, ids, mask, cache, scores=True)
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=_cost_model(H200_DECODE_COST_MODEL))
    out = generate(compiled, ids, mask, cache, scores=True)
    assert_same_generation(out, ref)
    decode = [s for g in sparsecomp.inspect(compiled).graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became != "sparse_decode" and "dense step is faster" in s.reason for s in decode)


def test_compile_selects_where_the_selection_is_predicted_faster():
    free_selection = {**TRUE, "summary": [0.0, 0.0], "top_k": [0.0, 0.0], "attention": [0.0, 0.0]}
    model = tiny_llama().eval()
    ids, mask = prompt(2)
    plan = decode_plan("double_sparsity:channels=4,ratio=0.25")
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=_cost_model({"coefficients": free_selection}))
    generate(compiled, ids, mask, "static")
    decode = [s for g in sparsecomp.inspect(compiled).graphs if g.phase() == "decode" for s in g.sites]
    assert decode and all(s.became == "sparse_decode" and "predicted" in s.reason for s in decode)
