"""Tensor parallelism (transformers' tp_plan="auto", 2 and 4 CPU processes over gloo): each rank's sites
see their local heads, the plan's per-head rules and channels map to them by global head index,
and the compiled sharded model gives the single-process compiled model's logits and generated
tokens (Double Sparsity's decode steps too, each rank reading its KV heads' channels)."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sparsecomp
from sparsecomp.plan import Plan, Rule

pytest.importorskip("transformers")

DENSE, STREAM = Rule("dense"), Rule.parse("streaming:sink=4,window=8")
# Per KV group (4 groups of 2 query heads): on 2 ranks, rank 0 holds the dense groups; on 4, one
# group each. A plan sliced wrongly gives other logits.
PER_HEAD = Plan(sites={f"model.layers.{i}.self_attn": [DENSE, STREAM, DENSE, STREAM][:: 1 - 2 * i] for i in range(2)})


def _tiny(path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model.save_pretrained(path)
    return model


def _logits(model, plan, ids):
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    with torch.no_grad():
        return compiled(ids).logits, sparsecomp.inspect(compiled)


def _generated_logits(model, plan, ids):
    compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False)
    out = compiled.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                            return_dict_in_generate=True)  # fmt: skip
    if isinstance(plan, Plan) and plan.channels:  # the decode steps ran Double Sparsity's selection
        assert {s.became for s in sparsecomp.inspect(compiled).graphs[-1].sites} == {"sparse_decode"}
    return out.sequences, torch.stack(out.logits)


def _worker(rank, world, path, init_file, out, ds_plan_file):
    import os

    from transformers import AutoModelForCausalLM

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # what tp_plan reads
    # a file store: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()  # fmt: skip
        assert sparsecomp.api.tensor_parallel_shard(model) == (rank, world)
        ids = torch.arange(1, 41)[None]
        for name, plan in (("dense", "dense"), ("per_head", PER_HEAD)):
            logits, report = _logits(model, plan, ids)
            assert {s.shape["q_heads"] for s in report.graphs[0].sites} == {8 // world}
            if name == "per_head":  # every rank holds a streaming group in one of the layers
                assert any(s.became != "kept" for s in report.graphs[0].sites)
            torch.save(logits, f"{out}/{name}{rank}.pt")
        torch.save(_generated_logits(model, PER_HEAD, ids), f"{out}/tokens{rank}.pt")
        torch.save(_generated_logits(model, Plan.load(ds_plan_file), ids), f"{out}/ds{rank}.pt")  # each rank's channels
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_a_tensor_parallel_model_compiles_to_the_single_process_logits(world, tmp_path):
    model = _tiny(tmp_path / "model")
    ids = torch.arange(1, 41)[None]
    calibration = [torch.randint(1, 128, (64,), generator=torch.Generator().manual_seed(3))]
    preset = "prefill=dense;decode=double_sparsity:channels=4,ratio=0.25"
    ds_plan = sparsecomp.calibrate_channels(model, calibration, preset)
    ds_plan.save(tmp_path / "ds_plan.json")  # Rules do not pickle into spawned processes
    args = (world, str(tmp_path / "model"), str(tmp_path / "store"), str(tmp_path), str(tmp_path / "ds_plan.json"))
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    dense, _ = _logits(model, "dense", ids)
    per_head, _ = _logits(model, PER_HEAD, ids)
    assert not torch.allclose(dense, per_head, atol=1e-3)  # the streaming heads matter at 40 tokens
    tokens, _ = _generated_logits(model, PER_HEAD, ids)
    ds_tokens, ds_logits = _generated_logits(model, ds_plan, ids)
    for rank in range(world):
        assert torch.equal(torch.load(tmp_path / f"tokens{rank}.pt")[0], tokens)  # decode steps sharded too
        rank_tokens, rank_logits = torch.load(tmp_path / f"ds{rank}.pt")
        assert torch.equal(rank_tokens, ds_tokens)
        torch.testing.assert_close(rank_logits, ds_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.load(tmp_path / f"dense{rank}.pt"), dense, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.load(tmp_path / f"per_head{rank}.pt"), per_head, rtol=1e-4, atol=1e-4)


def test_per_head_lists_split_by_global_head_index():
    plan = Plan(sites={"a": [Rule("dense"), STREAM, STREAM, DENSE]}, channels={"a": [[0, 1], [2, 3]]},
                densities={"a": [1.0, 0.25, 0.5, 1.0]})  # fmt: skip
    shard = plan.for_shard(1, 2)
    assert shard.sites["a"] == [STREAM, DENSE] and shard.channels["a"] == [[2, 3]]
    assert shard.densities["a"] == [0.5, 1.0]
    with pytest.raises(ValueError, match="do not split over 4 ranks"):
        Plan(sites={"a": [DENSE] * 6}).for_shard(0, 4)
