"""The cost model, per-site decisions and autotune storage, on synthetic coefficient tables (CPU)."""

import itertools

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp import CostModel, Plan, Rule
from sparsecomp.compiler.decide import shape_bucket
from sparsecomp.kernels import build_block_index
from sparsecomp.passes.rewrite import KernelOptions
from sparsecomp.patterns.local import local_rule_block_counts
from sparsecomp.tuning.autotune import autotune
from sparsecomp.tuning.cost_model import (
    DENSE,
    KERNEL_CONFIGS,
    Workload,
    fit_coefficients,
    static_block_counts,
)
from sparsecomp.tuning.tuning_cache import TuningCache

ODD = [(1, 1), (63, 63), (100, 137), (257, 257), (640, 700)]


@pytest.mark.parametrize(("n_q", "n_k"), ODD)
@pytest.mark.parametrize(
    ("sink", "window", "site_window"), [(0, 0, 0), (4, 16, 0), (64, 100, 0), (130, 300, 200), (4, 0, 50)]
)
@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (64, 32), (32, 64)])
def test_closed_form_block_counts_equal_the_index_builder(n_q, n_k, sink, window, site_window, block_m, block_n):
    assert_counts_equal_the_index(n_q, n_k, sink, window, site_window, block_m, block_n)


def assert_counts_equal_the_index(n_q, n_k, sink, window, site_window, block_m, block_n):
    q_pos, k_pos = torch.arange(n_k - n_q, n_k)[None], torch.arange(n_k)[None]
    index = build_block_index(
        q_pos, k_pos, None, torch.tensor([sink]), torch.tensor([window]), causal=True, window=site_window,
        block_m=block_m, block_n=block_n, max_blocks=None,
    )  # fmt: skip
    full, part = local_rule_block_counts(
        n_q, n_k, sink, window, block_m=block_m, block_n=block_n, site_window=site_window
    )
    case = dict(n_q=n_q, n_k=n_k, sink=sink, window=window, site_window=site_window, block_m=block_m, block_n=block_n)
    assert torch.equal(full, index.full_count[0, 0].float()), case
    assert torch.equal(part, index.part_count[0, 0].float()), case


def test_fit_recovers_known_nonnegative_coefficients():
    gen = torch.Generator().manual_seed(0)
    features = [[1.0, *torch.rand(3, generator=gen).tolist()] for _ in range(20)]
    truth = [0.02, 3.0, 0.0, 0.5]
    times = [sum(c * f for c, f in zip(truth, row, strict=True)) for row in features]
    assert fit_coefficients(features, times) == pytest.approx(truth, abs=1e-6)
    # Time that falls as a feature grows would need a negative rate: that feature gets 0 instead.
    falling = [t - 0.4 * row[2] for t, row in zip(times, features, strict=True)]
    coef = fit_coefficients(features, falling)
    assert coef[2] == 0 and min(coef) >= 0


def synthetic_model(sparse_launch: float = 0.05, index_ms: float = 0.0) -> CostModel:
    """Dense and sparse kernels at the same rate per block; the sparse kernel pays a launch overhead,
    so dense wins on short inputs and sparse rules win past a crossover."""
    dense = [0.0, 10.0, 0.0, 0.0]
    sparse = [sparse_launch, 10.0, 0.0, 0.0]
    engines = {"sdpa": {16: dense}, "sdpa_masked": {16: [0.0, 20.0, 0.0, 0.0]}}
    engines |= {name: {16: sparse} for name in KERNEL_CONFIGS}
    index = {kind: [index_ms, 0.0] for kind in ("static", "vertical_slash", "sample", "block_topk")}
    return CostModel(engines, index, sms=1, info={"synthetic": True})


STREAMING = [Rule("streaming", sink=4, window=32)] * 4


def test_decisions_on_a_synthetic_table():
    model = synthetic_model()
    w = Workload(1, 4, 2, 1024, 1024, 16, "float32")
    crossover = model.crossover(w, STREAMING, KERNEL_CONFIGS)
    assert crossover is not None and 128 < crossover < 1 << 16

    def best(n, rules=STREAMING, configs=KERNEL_CONFIGS):
        return model.predictions(Workload(1, 4, 2, n, n, 16, "float32"), rules, configs)[0].option

    assert best(crossover - 128) == DENSE and best(crossover) != DENSE and best(4 * crossover) != DENSE
    # Dense rules at dense's own block size never pay: the same work at the same rate, plus a launch.
    assert best(1 << 15, [Rule()] * 4, {"b128": KERNEL_CONFIGS["b128"]}) == DENSE
    # A mask tensor sends dense SDPA down its slower masked path: the sparse kernel wins sooner.
    assert (
        model.crossover(Workload(1, 4, 2, 1024, 1024, 16, "float32", masked=True), STREAMING, KERNEL_CONFIGS)
        < crossover
    )
    # Index building counts: an expensive index moves the crossover out.
    assert synthetic_model(index_ms=0.5).crossover(w, STREAMING, KERNEL_CONFIGS) > crossover
    # Finer blocks hug a narrow window: b64 computes fewer pairs than b128 there.
    b64 = static_block_counts(w, STREAMING, KERNEL_CONFIGS["b64"])
    b128 = static_block_counts(w, STREAMING, KERNEL_CONFIGS["b128"])
    assert b64.blocks * 64 * 64 < b128.blocks * 128 * 128


def test_json_round_trip_keeps_predictions():
    model = synthetic_model()
    again = CostModel.from_json(model.to_json())
    w = Workload(2, 4, 2, 3000, 3000, 16, "float32")
    assert again.predictions(w, STREAMING, KERNEL_CONFIGS) == model.predictions(w, STREAMING, KERNEL_CONFIGS)


def compile_tiny(**kwargs):
    model = tiny_llama()
    plan = Plan(default=STREAMING[0])
    # A launch this costly puts the crossover at 512 tokens or more, with or without a mask tensor.
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=synthetic_model(0.2), **kwargs)
    return model, compiled


def run_length(model, compiled, n):
    ids = torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return compiled(ids).logits, model(ids).logits


def test_compile_keeps_dense_below_the_crossover_and_goes_sparse_above():
    model, compiled = compile_tiny(dynamic=False, tuning_cache=False)
    run_length(model, compiled, 512)
    crossover = sparsecomp.inspect(compiled).sites[0].decision.crossover  # masked or not: the site's own
    assert crossover is not None
    # The dense side is SDPA's fused causal kernel: the proven causal mask needs no N x N tensor.
    for n, became in ((crossover - 128, "sdpa_causal"), (crossover + 128, "sparse_attention")):
        out, _ = run_length(model, compiled, n)
        report = sparsecomp.inspect(compiled)
        site = report.sites[0]
        assert site.became == became, str(report)
        assert site.decision.crossover == crossover and site.decision.runner_up is not None
        assert ("dense is faster" in site.reason) == (became == "sdpa_causal")
        assert "decided by: cost model (given)" in str(report)
        choice, ms, runner = site.choice()
        assert choice.startswith(DENSE if became == "sdpa_causal" else "b") and float(ms) > 0 and runner != "-"
        assert torch.isfinite(out).all()


def test_dynamic_lengths_compile_once_per_side_of_the_crossover():
    model, compiled = compile_tiny(dynamic=True, tuning_cache=False)
    run_length(model, compiled, 256)
    crossover = sparsecomp.inspect(compiled).sites[0].decision.crossover
    assert crossover >= 512
    for n in [crossover - 256, crossover - 128, crossover + 128, crossover + 384, crossover - 200]:
        out, _ = run_length(model, compiled, n)
        assert torch.isfinite(out).all()
    graphs = sparsecomp.inspect(compiled).graphs
    became = [g.sites[0].became for g in graphs]
    assert became == ["sdpa_causal", "sparse_attention"], became  # two graphs for six lengths


def test_dense_side_is_exact_and_sparse_side_follows_the_plan():
    model, compiled = compile_tiny(dynamic=False, tuning_cache=False)
    out, ref = run_length(model, compiled, 256)
    assert sparsecomp.inspect(compiled).sites[0].became == "sdpa_causal"
    torch.testing.assert_close(out, ref)


def test_forced_kernel_options_are_kept_and_named():
    _, compiled = compile_tiny(dynamic=False, tuning_cache=False, kernel_options={"block_m": 64, "block_n": 64})
    run_length(_, compiled, 2048)
    site = sparsecomp.inspect(compiled).sites[0]
    assert site.decision.option == "forced" and site.decision.options == KernelOptions(block_m=64, block_n=64)


def test_cost_model_off_follows_the_plan():
    model = tiny_llama()
    compiled = sparsecomp.compile(model, Plan(default=STREAMING[0]), inner="eager", dynamic=False)
    run_length(model, compiled, 128)  # CPU: "auto" has no cost model here
    report = sparsecomp.inspect(compiled)
    assert report.sites[0].became == "sparse_attention"
    assert "no cost model on cpu" in str(report)


@pytest.mark.parametrize(
    "gpu, fit", [("NVIDIA H200", "H200 fit"), ("NVIDIA H100 80GB HBM3", "H100 fit"), ("NVIDIA GH200 480GB", "H100 fit")]
)
def test_auto_uses_the_shipped_fit_of_the_gpu_on_hopper_only(monkeypatch, gpu, fit):
    """No fit of this GPU's own: a Hopper GPU decides with the shipped coefficients of its name (the
    H200's on an H200, the H100's on the others), another follows the plan until tuned (the device is
    only asked its capability and name)."""
    from sparsecomp.compiler.decide import load_cost_model
    from sparsecomp.tuning.cost_defaults import H100_COST_MODEL, H200_COST_MODEL, H200_DECODE_COST_MODEL

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    model, source = load_cost_model("auto", cuda, None)
    prefill = H200_COST_MODEL if fit == "H200 fit" else H100_COST_MODEL
    shipped = CostModel.from_json({**prefill, "decode": H200_DECODE_COST_MODEL})
    assert model.to_json() == shipped.to_json() and fit in source and model.decode is not None
    assert gpu.split()[1] in prefill["info"]["gpu"] or fit == "H100 fit"
    w = Workload(1, 32, 8, 65536, 65536, 128)
    counts = static_block_counts(w, [Rule("streaming", sink=64, window=1024)] * 32, KERNEL_CONFIGS["b128"])
    assert model.kernel_ms("b128", w, counts) < model.dense_ms(w) / 5  # long streaming: sparse by far
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    model, source = load_cost_model("auto", cuda, None)
    assert model is None and "run sparsecomp autotune" in source


def scripted_timer(values):
    """Runs each timed call once (it must work) and returns the next scripted time."""
    script = itertools.cycle(values)

    def timer(fn):
        out = fn()
        assert torch.isfinite(out).all()
        return next(script)

    return timer


def test_autotune_stores_measured_choices_that_compile_uses(tmp_path):
    model = tiny_llama()
    cache = TuningCache({"gpu": "test"}, tmp_path)
    cache.put("cost_model", synthetic_model().to_json())
    plan = Plan(default=STREAMING[0])
    ids = torch.randint(0, 100, (1, 256), generator=torch.Generator().manual_seed(1))
    # dense, then each config in KERNEL_CONFIGS order: the last one measures fastest
    times = [5.0, 4.0, 3.0, 2.0, 1.0]
    report = autotune(model, (ids,), plan, cache=cache, progress=False, timer=scripted_timer(times))
    (row,) = report.rows  # both layers share one shape bucket
    assert row["choice"] == list(KERNEL_CONFIGS)[-1] and row["sites"] == 2
    assert row["speedup_vs_default"] == pytest.approx(4.0)
    form = "masked" if "masked" in row["bucket"] else "causal"  # transformers versions differ: mask tensor or not
    masked = form == "masked"
    assert row["bucket"] == shape_bucket(Workload(1, 4, 2, 256, 256, 16, "float32", masked=masked), [STREAMING[0]] * 4)
    assert cache.get(row["bucket"])["choice"] == row["choice"]
    assert "x default" in str(report)

    compiled = sparsecomp.compile(model, plan, inner="eager", dynamic=False, cost_model=synthetic_model(),
                                  tuning_cache=cache)  # fmt: skip
    out, ref = run_length(model, compiled, 256)
    site = sparsecomp.inspect(compiled).sites[0]
    assert site.became == "sparse_attention" and site.decision.option == row["choice"]
    assert site.decision.source.startswith("autotune") and site.decision.predicted_ms == pytest.approx(1.0)
    assert site.decision.runner_up == list(KERNEL_CONFIGS)[-2]


def test_autotune_refuses_cpu_without_a_timer():
    with pytest.raises(RuntimeError, match="CUDA"):
        autotune(tiny_llama(), (torch.zeros(1, 8, dtype=torch.long),), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times GPU kernels")
def test_gpu_fit_and_autotune_then_compile_uses_the_cache(tmp_path):
    from sparsecomp.tuning.autotune import fit_cost_model

    fit = fit_cost_model((16,), dtype=torch.float16, lengths=(256, 1024), densities=(0.3, 1.0),
                         index_lengths=(), progress=False)  # fmt: skip
    assert set(fit.model.engines) >= {"sdpa", *KERNEL_CONFIGS} and all(r["ms"] > 0 for r in fit.rows)
    cache = TuningCache({"gpu": "test"}, tmp_path)
    cache.put("cost_model", fit.model.to_json())
    model = tiny_llama(dtype=torch.float16).cuda()
    plan = Plan(default=Rule("streaming", sink=16, window=128))
    ids = torch.randint(0, 100, (1, 2048), device="cuda")
    report = autotune(model, (ids,), plan, cache=cache, progress=False)
    (row,) = report.rows
    assert set(row["ms"]) == {DENSE, *KERNEL_CONFIGS} and all(t > 0 for t in row["ms"].values())
    compiled = sparsecomp.compile(model, plan, dynamic=False, tuning_cache=cache)
    with torch.no_grad():
        out = compiled(ids).logits
    site = sparsecomp.inspect(compiled).sites[0]
    assert site.decision.option == row["choice"] and site.decision.source.startswith("autotune")
    assert torch.isfinite(out).all()


def test_command_line_autotune_needs_a_gpu(tmp_path, capsys):
    from test_calibrate import byte_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsecomp.cli import main

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    capsys.readouterr()  # what saving the model printed
    args = ["autotune", "--model", str(tmp_path / "model"), "--lengths", "64", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # one line, no traceback: no GPU at all, or (on a GPU machine) the CPU device asked for
    assert len(err) == 1 and ("autotune needs a CUDA" in err[0] or "got --device cpu" in err[0]), err


def test_a_selection_refined_to_smaller_blocks_keeps_the_same_pairs():
    from sparsecomp.tuning.autotune import random_selection, run_sparse, selection_index

    n, gen = 300, torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    selection = random_selection(2, n, 0.4, 128, "cpu", seed=1)
    outs = []
    for block in (128, 64):
        index, counts = selection_index(selection, 128, block, n)
        assert counts.programs == 2 * -(-n // block) and counts.part == 2 * -(-n // block)
        outs.append(run_sparse(q, k, v, index, KernelOptions(block_m=block, block_n=block)))
    torch.testing.assert_close(outs[0], outs[1])


def test_closed_form_block_counts_equal_the_index_builder_on_random_streaming_rules():
    """Random lengths, sinks, head and site windows and block shapes (the fixed cases above missed a
    sink block whose sink keys lie before the site window while the block reaches into it)."""
    gen = torch.Generator().manual_seed(7)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    for _ in range(300):
        n_k = draw(1, 700)
        n_q = draw(1, n_k)
        sink, window, site_window = draw(0, 200), draw(0, 400), draw(0, 1) * draw(1, 500)
        block_m, block_n = 16 * 2 ** draw(0, 2), 16 * 2 ** draw(0, 2)
        assert_counts_equal_the_index(n_q, n_k, sink, window, site_window, block_m, block_n)


class CausalMaskAttention(torch.nn.Module):
    """Attention given an explicit causal mask tensor (no ``is_causal``): 4 heads of 16."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(64, 3 * 64)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
        pos = torch.arange(n, device=x.device)
        mask = pos[:, None] >= pos[None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_mask_proven_causal_is_priced_as_the_fused_causal_kernel_dense_becomes():
    """Dense at such a site is SDPA's fused causal kernel (the mask dropped), not its masked path:
    the decision prices that, so the crossover is the unmasked one and dense below it is exact."""
    model = CausalMaskAttention()
    cost = synthetic_model(0.2)
    compiled = sparsecomp.compile(model, Plan(default=STREAMING[0]), inner="eager", dynamic=False, cost_model=cost,
                                  tuning_cache=False)  # fmt: skip
    x = torch.randn(1, 256, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = compiled(x)
    site = sparsecomp.inspect(compiled).sites[0]
    unmasked = cost.crossover(Workload(1, 4, 4, 256, 256, 16, "float32"), STREAMING, KERNEL_CONFIGS)
    masked = cost.crossover(Workload(1, 4, 4, 256, 256, 16, "float32", masked=True), STREAMING, KERNEL_CONFIGS)
    assert masked < unmasked and site.decision.crossover == unmasked, str(sparsecomp.inspect(compiled))
    assert site.became == "sdpa_causal" and "dense is faster" in site.reason
    torch.testing.assert_close(out, model(x))
