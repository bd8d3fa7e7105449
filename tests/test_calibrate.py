"""Calibration: per-head plans measured on the model's own attention."""

import json

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp import Plan, Rule
from sparsecomp.calibration.calibrate import Calibrator, SiteStats, allocate, candidate_rules
from sparsecomp.calibration.calibration_data import passkey_prompt

RULES = [Rule("streaming", sink=4, window=16), Rule("streaming", sink=4, window=64), Rule("block_topk", k=2),
         Rule("sample", alpha=0.9, window_ratio=0.1, sample_ratio=0.2)]  # fmt: skip


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (n,), generator=gen) for n in (96, 128)]


def test_calibration_gives_a_valid_plan_that_compiles_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    plan = sparsecomp.calibrate(model, inputs(), target=0.8, rules=RULES, block=16, progress=False)
    assert set(plan.sites) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for name, rules in plan.sites.items():
        assert len(rules) == 4 and all(r in RULES or r == Rule() for r in rules)
        for rule, head in zip(rules, plan.info["measured"][name]["heads"], strict=True):
            assert head["rule"] == str(rule)
            assert head["cra"] >= 0.8 and 0 < head["density"] <= 1 and head["out_err"] >= 0
    assert plan.fingerprint == sparsecomp.model_fingerprint(model)
    assert plan.info["target_cra"] == 0.8 and plan.info["lengths"] == [96, 128]

    path = tmp_path / "plan.json"
    plan.save(path)
    again = Plan.load(path)
    assert again.to_json() == plan.to_json() and again.sites == plan.sites
    assert json.loads(path.read_text())["sites"]["model.layers.0.self_attn"][0] == plan.sites[
        "model.layers.0.self_attn"][0].spec()  # fmt: skip

    compiled = sparsecomp.compile(model, str(path), kernel_options={"block_m": 16, "block_n": 16})
    ids = inputs(1)[1][None]
    with torch.no_grad():
        out = compiled(ids).logits
    assert torch.isfinite(out).all()
    report = sparsecomp.inspect(compiled)
    assert "calibrated for CRA >= 0.8" in str(report)
    assert report.calibrated("model.layers.0.self_attn") != "-"


def test_calibration_is_deterministic_for_a_seed():
    model = tiny_llama().eval()
    a = sparsecomp.calibrate(model, inputs(), target=0.85, rules=RULES, block=16, seed=3, progress=False)
    b = sparsecomp.calibrate(model, inputs(), target=0.85, rules=RULES, block=16, seed=3, progress=False)
    assert a.to_json() == b.to_json()


def test_a_plan_for_another_model_is_refused():
    model = tiny_llama().eval()
    plan = sparsecomp.calibrate(model, inputs(), target=0.9, rules=RULES[:2], block=16, progress=False)
    other = tiny_llama(hidden_size=128).eval()  # head_dim 32 instead of 16
    with pytest.raises(ValueError, match="another model"):
        sparsecomp.compile(other, plan)


def test_choice_is_the_cheapest_candidate_that_reaches_the_target():
    """On synthetic statistics: least density among those reaching the target, static wins ties,
    dense where none reaches it."""
    rules = [Rule("streaming", sink=1, window=8), Rule("block_topk", k=2), Rule("streaming", sink=1, window=32)]
    cal = Calibrator(rules, block=16)
    stats = SiteStats([0, 1, 2])
    cra = torch.tensor([[0.97, 0.96, 0.50], [0.96, 0.96, 0.50], [0.99, 0.99, 0.50]])  # (C, heads)
    density = torch.tensor([[0.2, 0.2, 0.2], [0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    out_err = torch.tensor([[0.05, 0.05, 0.05], [0.30, 0.05, 0.05], [0.05, 0.05, 0.05]])
    stats.add(100, cra, density, out_err)
    cal.sites["s"] = stats
    chosen, measured = cal.choose(0.95)
    assert chosen["s"] == [rules[1], rules[0], Rule()]
    assert measured["s"]["heads"][2] == {"rule": "dense", "cra": 1.0, "density": 1.0, "out_err": 0.0}
    chosen, _ = cal.choose(0.95, max_error=0.1)  # block top-k's output error is too large on head 0
    assert chosen["s"] == [rules[0], rules[0], Rule()]
    # A second length where the short window loses head 0: the rule must serve every length. The
    # elastic span (window 8 at 100 keys, 32 at 200: a + b * N with b = 0.24, a = -16) is cheaper
    # on average than the fixed window 32; without streaming candidates, window 32 it would be.
    cra_long = cra.clone()
    cra_long[0, 0] = 0.90
    stats.add(200, cra_long, density, out_err)
    chosen, measured = cal.choose(0.95, max_error=0.1)
    elastic = Rule("elastic", sink=1, a=-16, b=0.24)
    assert chosen["s"] == [elastic, rules[0], Rule()]
    assert [elastic.head_params(n) for n in (100, 200)] == [(1, 8), (1, 32)]
    assert measured["s"]["heads"][0] == {"rule": str(elastic), "cra": 0.98, "density": 0.35, "out_err": 0.05}


def test_allocation_meets_the_budget_with_the_least_loss():
    """allocate against exhaustive search on random instances (4 heads x 4 options, densities on a
    0.01 grid): the budget holds and the summed loss is the optimum."""
    import itertools

    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        options = []
        for _ in range(4):
            dens = sorted(c / 100 for c in torch.randint(1, 100, (3,), generator=gen).tolist()) + [1.0]
            loss = sorted(torch.rand(3, generator=gen).tolist(), reverse=True) + [0.0]
            options.append(list(zip(dens, loss, strict=True)))
        budget = round(0.3 + 0.5 * torch.rand((), generator=gen).item(), 2)
        if sum(o[0][0] for o in options) > budget * 4:  # even the sparsest exceed it
            with pytest.raises(ValueError, match="no choice of rules meets"):
                allocate(options, budget)
            continue
        pick = allocate(options, budget)
        assert sum(options[j][i][0] for j, i in enumerate(pick)) <= budget * 4 + 1e-9
        best = min(
            sum(options[j][i][1] for j, i in enumerate(c))
            for c in itertools.product(range(4), repeat=4)
            if sum(options[j][i][0] for j, i in enumerate(c)) <= budget * 4 + 1e-9
        )
        assert sum(options[j][i][1] for j, i in enumerate(pick)) == pytest.approx(best)
    with pytest.raises(ValueError, match="sparsest allowed average 0.500"):
        allocate([[(0.5, 1.0), (1.0, 0.0)]] * 2, 0.1)
    assert allocate([], 0.5) == []


def test_budget_gives_density_to_the_heads_whose_loss_depends_on_it():
    """Two heads, the same CRA and density per candidate, but head 1 loses ten times more from the
    narrow window: with a mean budget of 0.5 head 1 gets the wide window, head 0 the narrow one; with
    0.6, head 1 stays dense."""
    rules = [Rule("streaming", sink=1, window=8), Rule("streaming", sink=1, window=32)]
    cal = Calibrator(rules, block=16, influence=True)
    stats = SiteStats([0, 1])
    kept = torch.tensor([[0.9, 0.9], [0.99, 0.99]])
    density = torch.tensor([[0.2, 0.2], [0.8, 0.8]])
    out_err = torch.full((2, 2), 0.05)
    lost = torch.tensor([[1.0, 10.0], [0.1, 1.0]])
    stats.add(100, kept, density, out_err, lost)
    cal.sites["s"] = stats
    chosen, measured = cal.choose_budget(0.5)
    assert chosen["s"] == [rules[0], rules[1]]
    assert measured["s"]["heads"][1] == {"rule": str(rules[1]), "influence": 0.99, "density": 0.8, "out_err": 0.05,
                                         "lost": 1.0}  # fmt: skip
    assert cal.choose_budget(0.6)[0]["s"] == [rules[0], Rule()]
    assert cal.choose_budget(1.0)[0]["s"] == [Rule(), Rule()]  # nothing lost when dense fits
    with pytest.raises(ValueError, match="loosen max_error"):  # no candidate allowed: only dense is left
        cal.choose_budget(0.6, max_error=0.01)


def test_budget_calibration_on_a_tiny_model():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    plan = sparsecomp.calibrate(
        model, inputs(), budget=0.5, influence=True, max_error=None, rules=RULES, block=16, progress=False
    )
    heads = [h for site in plan.info["measured"].values() for h in site["heads"]]
    assert len(heads) == 8 and sum(h["density"] for h in heads) / 8 <= 0.5
    assert plan.info["density_budget"] == 0.5 and plan.info["target_cra"] is None
    compiled = sparsecomp.compile(model, plan, kernel_options={"block_m": 16, "block_n": 16})
    with torch.no_grad():
        compiled(inputs(1)[1][None])
    assert "least lost influence at density <= 0.5" in str(sparsecomp.inspect(compiled))
    with pytest.raises(ValueError, match="budget"):
        sparsecomp.calibrate(model, inputs(), budget=0.0, progress=False)


def test_candidates_and_bad_arguments():
    rules = candidate_rules(("streaming",), max_len=1000)
    assert [r.window for r in rules] == [64, 128, 192, 256, 384, 512, 768]
    with pytest.raises(ValueError, match="unknown candidate"):
        candidate_rules(("magic",))
    model = tiny_llama().eval()
    with pytest.raises(ValueError, match="needs a tokenizer"):
        sparsecomp.calibrate(model, progress=False)
    with pytest.raises(ValueError, match="target"):
        sparsecomp.calibrate(model, inputs(), target=1.5, progress=False)


class CharTokenizer:
    """Enough of a Hugging Face tokenizer for the prompt builder: one id per character."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 100 for c in text]}


def test_passkey_prompt_fits_its_length_and_holds_the_key():
    p = passkey_prompt(CharTokenizer(), 600, seed=1, depth=0.5)
    assert abs(len(p.ids) - 600) <= 1 and p.answer_start == len(p.ids) - len(" " + p.passkey)
    assert len(p.passkey) == 5 and p.ids[p.answer_start :] == CharTokenizer()(" " + p.passkey)["input_ids"]
    needle = CharTokenizer()(f" The pass key is {p.passkey}.")["input_ids"]
    assert any(p.ids[i : i + len(needle)] == needle for i in range(200, 300))  # near half depth


def byte_tokenizer():
    """A byte-level tokenizer (256 ids, no merges) built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_tiny_model(folder) -> None:
    """A 2-layer Llama (4 query / 2 KV heads) and a byte tokenizer saved as a local model folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def test_command_line_calibrates_a_local_model_on_the_default_data(tmp_path, capsys):
    from sparsecomp.cli import main

    save_tiny_model(tmp_path / "model")
    out = tmp_path / "plan.json"
    argv = ["calibrate", "--model", str(tmp_path / "model"), "--lengths", "96", "--block", "16", "--rules",
            "streaming", "block_topk", "--target", "0.8", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(out)
    assert len(plan.sites) == 2 and plan.info["data"].startswith("default: stdlib")
    assert plan.info["inputs"] == 6  # 4 documents + 2 pass key prompts at the one length
    assert plan.info["target_cra"] == 0.8 and plan.info["max_out_err"] == 0.1
    assert "wrote" in capsys.readouterr().out
    argv[4] = "256"  # long enough for windows well below the length
    budget = argv[:-4] + ["--budget", "0.7", "--influence", "--max-error", "none", "--out", str(out), "--device", "cpu"]
    assert main(budget) == 0
    plan = Plan.load(out)
    assert plan.info["density_budget"] == 0.7 and plan.info["max_out_err"] is None
    heads = [h for site in plan.info["measured"].values() for h in site["heads"]]
    assert sum(h["density"] for h in heads) / len(heads) <= 0.7


def test_elastic_plan_runs_the_window_of_its_length():
    """elastic(sink 2, a 4, b 0.25) at 80 keys is streaming(sink 2, window 24)."""
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (1, 80), generator=torch.Generator().manual_seed(5))
    options = {"block_m": 16, "block_n": 16}
    outs, models = [], []
    for plan in ("elastic:sink=2,a=4,b=0.25", "streaming:sink=2,window=24", "streaming:sink=2,window=16"):
        torch._dynamo.reset()
        models.append(sparsecomp.compile(model, plan, kernel_options=options, dynamic=False))
        with torch.no_grad():
            outs.append(models[-1](ids).logits)
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(outs[0], outs[2])  # the window matters at this length
    report = sparsecomp.inspect(models[0])
    assert "elastic(sink=2, a=4, b=0.25)" in str(report)
    assert report.sites[0].density == report.site(report.sites[0].name).density > 0


def test_text_inputs_are_tokenized_and_a_batch_tensor_is_split_into_rows():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()
    texts = ["def f(x):\n    return x + 1\n" * 4, "import os\nprint(os.getcwd())\n" * 3]
    plan = sparsecomp.calibrate(model, texts, tokenizer=byte_tokenizer(), rules=RULES[:2], block=16, progress=False)
    assert plan.info["inputs"] == 2 and plan.info["data"] == "user: 2 inputs"
    assert plan.info["lengths"] == sorted(len(byte_tokenizer()(t)["input_ids"]) for t in texts)
    batch = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(2))
    plan = sparsecomp.calibrate(model, batch, rules=RULES[:2], block=16, progress=False)
    assert plan.info["inputs"] == 3 and plan.info["lengths"] == [64]
    with pytest.raises(ValueError, match="text inputs need a tokenizer"):
        sparsecomp.calibrate(model, texts, progress=False)


def test_kept_influence_is_the_first_order_loss_change_of_dropped_pairs():
    """kept_mass's influence against autograd: I[i, j] = |p_ij * dL/dp_ij - p_ij * sum_n p_in dL/dp_in|
    with dL/dp from a random linear loss on the attention output."""
    from sparsecomp.calibration.recall import kept_mass
    from sparsecomp.kernels import build_block_index, index_positions

    gen = torch.Generator().manual_seed(4)
    b, hq, hkv, n, d = 1, 4, 2, 40, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
    pos = index_positions(q, 2)
    sink, win = torch.tensor([2], dtype=torch.int32), torch.tensor([8], dtype=torch.int32)
    index = build_block_index(pos, pos, None, sink, win, causal=True, window=0, block_m=8, block_n=8, max_blocks=None)
    heads = (sink.expand(hq), win.expand(hq))
    # exact attention with p as a leaf, a random linear loss on its output
    s = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * d**-0.5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1).requires_grad_()
    o = p @ v.repeat_interleave(2, 1)
    weights = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    (o * weights).sum().backward()
    dl_dp = p.grad
    influence = (p * (dl_dp - (p * dl_dp).sum(-1, keepdim=True))).abs().detach()
    kept = causal & ((pos[0][:, None] - pos[0][None, :] < 8) | (pos[0][None, :] < 2))
    want = (influence * kept).sum((0, 2, 3)) / influence.sum((0, 2, 3))
    got = kept_mass(q, k, pos, pos, None, [(index, *heads)], scale=d**-0.5, causal=True, window=0,
                    block_m=8, block_n=8, v=v, out_grad=weights)  # fmt: skip
    torch.testing.assert_close(got.influence[0], want, atol=1e-6, rtol=1e-6)
    o_sparse = torch.softmax(s.masked_fill(~kept, float("-inf")), -1) @ v.repeat_interleave(2, 1)
    lost = (weights * (o_sparse - o.detach())).sum(-1).abs().sum((0, 2))
    torch.testing.assert_close(got.lost_influence[0], lost, atol=1e-9, rtol=1e-6)
    assert (want < 1).all() and (want > 0).all()


def test_influence_calibration_gives_a_valid_plan():
    model = tiny_llama().eval()
    plan = sparsecomp.calibrate(model, inputs(), target=0.8, influence=True, rules=RULES, block=16, progress=False)
    assert plan.info["selected_on"] == "influence" and len(plan.sites) == 2
    heads = [h for site in plan.info["measured"].values() for h in site["heads"]]
    assert len(heads) == 8 and all(h["influence"] >= 0.8 for h in heads)
    assert all(p.grad is None for p in model.parameters())


def test_command_line_chooses_streaming_heads_on_the_default_data(tmp_path, capsys):
    from sparsecomp.cli import main

    save_tiny_model(tmp_path / "model")
    out = tmp_path / "plan.json"
    argv = ["streaming-heads", "--model", str(tmp_path / "model"), "--lengths", "96", "--sink", "4", "--window",
            "16", "--share", "0.5", "--out", str(out), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(out)
    rules = [r for site in plan.decode_sites.values() for r in site]
    assert len(plan.decode_sites) == 2 and len(rules) == 4
    assert sum(r == Rule.parse("streaming:sink=4,window=16") for r in rules) == 2 and rules.count(Rule()) == 2
    assert plan.info["streaming_heads"]["inputs"] == 6  # 4 documents + 2 pass key prompts
    assert "KV heads streaming 2 of 4" in capsys.readouterr().out
