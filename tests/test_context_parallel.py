"""Context-parallel sparse prefill over gloo (2 and 4 CPU processes): each rank's output equals
its rows of the single-process op, for streaming, block top-k and vertical-slash indexes, and the
K/V bytes it receives are exactly those of the key blocks its index lists outside its chunk; a model
compiled with context_parallel=True gives, rank by rank, the single-process logits."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecomp.kernels import KernelOptions
from sparsecomp.kernels.prefill.adaptive_index import block_topk_index, sample_index, vertical_slash_index
from sparsecomp.kernels.prefill.block_index import build_block_index
from sparsecomp.kernels.prefill.block_sparse_attention import sparse_attention_call
from sparsecomp.parallel import (
    ContextChunk,
    block_topk_index_for_chunk,
    context_parallel_attention,
    index_for_chunk,
    sample_index_for_chunk,
    vertical_slash_index_for_chunk,
)
from sparsecomp.plan import Plan, Rule

N, B, HQ, HKV, D, BLOCK = 512, 2, 4, 2, 16, 64
SCALE = D**-0.5


def _inputs():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (HQ, HKV, HKV))
    return q, k, v


def _global_index(kind, q, k, pos, sink, window):
    common = dict(causal=True, window=0, block_m=BLOCK, block_n=BLOCK)
    if kind == "streaming":
        return build_block_index(pos, pos, None, sink, window, max_blocks=None, **common)
    if kind == "block_topk":
        return block_topk_index(q, k, pos, pos, None, 2, coverage=0.0, pool="mean", scale=SCALE, **common)
    if kind == "sample":
        return sample_index(q, k, pos, pos, None, 0.8, window_ratio=0.1, sample_ratio=0.05, scale=SCALE, **common)
    return vertical_slash_index(q, k, pos, pos, None, 24, 40, last_q=64, sink=16, local=32, scale=SCALE, **common)


def _listed_outside(index, chunk):
    """Key blocks the rank's index reads, by plain loops, that another rank holds."""
    listed = set()
    for blocks, count in ((index.full_blocks, index.full_count), (index.part_blocks, index.part_count)):
        for row, n in zip(blocks.reshape(-1, blocks.shape[-1]).tolist(), count.flatten().tolist(), strict=True):
            listed.update(row[:n])
    if index.columns is not None:
        cols = index.columns.expand(*index.column_count.shape, index.columns.shape[-1])
        for row, n in zip(cols.reshape(-1, cols.shape[-1]).tolist(), index.column_count.flatten().tolist(),
                          strict=True):  # fmt: skip
            listed.update(c // BLOCK for c in row[:n] if c < N)
    return {b for b in listed if not chunk.start <= b * BLOCK < chunk.stop}


def _assert_same_lists(a, b):
    """Two indexes list the same key blocks for every query block and head (in any order)."""
    pairs = [((a.full_blocks, a.full_count), (b.full_blocks, b.full_count)),
             ((a.part_blocks, a.part_count), (b.part_blocks, b.part_count))]  # fmt: skip
    for (blocks, count), (other, other_count) in pairs:
        assert torch.equal(count, other_count)
        rows = zip(blocks.flatten(0, -2).tolist(), other.flatten(0, -2).tolist(), count.flatten().tolist(), strict=True)
        for row, o, n in rows:
            assert sorted(row[:n]) == sorted(o[:n])


def _assert_same_columns(a, b):
    """Two indexes gather the same single columns for every query block and head."""
    assert torch.equal(a.column_count, b.column_count)
    ca = a.columns.expand(*a.column_count.shape, a.columns.shape[-1])
    cb = b.columns.expand(*b.column_count.shape, b.columns.shape[-1])
    for x, y, n in zip(ca.flatten(0, -2).tolist(), cb.flatten(0, -2).tolist(), a.column_count.flatten().tolist(),
                       strict=True):  # fmt: skip
        assert sorted(x[:n]) == sorted(y[:n])


def _worker(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q, k, v = _inputs()
        pos = torch.arange(N)[None]
        chunk = ContextChunk(N, rank, world, BLOCK)
        rows = slice(chunk.start, chunk.stop)
        for kind in ("streaming", "block_topk", "vertical_slash", "sample"):
            sink = torch.full((HQ,), 64 if kind == "streaming" else 0, dtype=torch.int32)
            window = torch.full((HQ,), 96 if kind == "streaming" else 0, dtype=torch.int32)
            whole = _global_index(kind, q, k, pos, sink, window)
            want = sparse_attention_call(q, k, v, whole, q_pos=pos, k_pos=pos, head_sink=sink, head_window=window,
                                         scale=SCALE, causal=True)[:, :, rows]  # fmt: skip
            if kind == "streaming":  # a static index: the rank builds its own rows alone
                index = build_block_index(pos[:, rows], pos, None, sink, window, causal=True, window=0,
                                          block_m=BLOCK, block_n=BLOCK, max_blocks=None)  # fmt: skip
            elif kind == "block_topk":  # from its own queries and every rank's pooled key blocks
                index, pooled_bytes = block_topk_index_for_chunk(q[:, :, rows], k[:, :, rows], chunk, 2,
                    coverage=0.0, pool="mean", scale=SCALE, block_m=BLOCK, block_n=BLOCK)  # fmt: skip
                assert pooled_bytes == (world - 1) * B * HKV * (chunk.size // BLOCK) * D * 4
                _assert_same_lists(index, index_for_chunk(whole, chunk))
            elif kind == "sample":  # from the sampled rows, summed over the ranks, and every rank's column mass
                index, _ = sample_index_for_chunk(q[:, :, rows], k[:, :, rows], chunk, 0.8, window_ratio=0.1,
                    sample_ratio=0.05, scale=SCALE, block_m=BLOCK, block_n=BLOCK)  # fmt: skip
                _assert_same_lists(index, index_for_chunk(whole, chunk))
                _assert_same_columns(index, index_for_chunk(whole, chunk))
            else:  # from the last rank's last queries and every rank's scores of its own keys
                index, _ = vertical_slash_index_for_chunk(q[:, :, rows], k[:, :, rows], chunk, 24, 40, last_q=64,
                    sink=16, local=32, scale=SCALE, block_m=BLOCK, block_n=BLOCK)  # fmt: skip
                _assert_same_lists(index, index_for_chunk(whole, chunk))
                _assert_same_columns(index, index_for_chunk(whole, chunk))
            out, received = context_parallel_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], index, chunk,
                                                       head_sink=sink, head_window=window, scale=SCALE)  # fmt: skip
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"{kind} rank {rank}")
            outside = _listed_outside(index, chunk)
            assert received == len(outside) * 2 * B * HKV * BLOCK * D * 4, (kind, rank, received, outside)
            if kind == "streaming" and rank > 0:  # the sink block and the window's blocks before the chunk
                assert outside == {0} | {(chunk.start - 96) // BLOCK, chunk.start // BLOCK - 1}, outside
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_computes_its_rows_from_only_the_blocks_its_index_lists(world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "store")), nprocs=world, join=True)


def test_a_sequence_that_does_not_split_into_whole_blocks_is_refused():
    with pytest.raises(ValueError, match="pad the sequence to a multiple of 256"):
        ContextChunk(500, 0, 4, 64)


def _compiled_worker(rank, world, init_file, path, out):
    from transformers import AutoModelForCausalLM

    import sparsecomp
    from sparsecomp.parallel.compiled import received_bytes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        chunk = ContextChunk(N, rank, world, BLOCK)
        ids = torch.arange(N)[None] % 120 + 1
        for name, plan in PLANS.items():
            compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False, context_parallel=True,
                                          kernel_options=BLOCKS_OF_64)  # fmt: skip
            rows = torch.arange(chunk.start, chunk.stop)[None]  # this rank's tokens, at their global positions
            with torch.no_grad():
                logits = compiled(ids[:, rows[0]], position_ids=rows).logits  # with a cache: no packed-sequence mask
            sites = sparsecomp.inspect(compiled).graphs[0].sites
            assert {s.became for s in sites} == {"context_parallel"}, [s.reason for s in sites]
            received = [received_bytes[s.name] for s in sites]
            if name == "dense":  # every earlier key: K and V of the ranks before (1 row, 4 KV heads, d 16)
                assert received == [2 * 4 * chunk.start * 16 * 4] * len(sites)
            elif name == "streaming":  # the sink's block and the window's two blocks before the chunk
                assert received == [2 * 4 * min(chunk.start, 3 * BLOCK) * 16 * 4] * len(sites)
            else:  # adaptive: pooled keys or scores from the other ranks, then the listed blocks' K/V
                assert all(r > 0 for r in received) or world == 1
            torch.save(logits, f"{out}/{name}{rank}.pt")
        with pytest.raises(ValueError, match="does not run transformers' generate"):  # local positions
            compiled.generate(ids[:, rows[0]], max_new_tokens=2, do_sample=False)
    finally:
        dist.destroy_process_group()


BLOCKS_OF_64 = KernelOptions(block_m=64, block_n=64)  # 8 key blocks: adaptive rules drop some
_VS = "vertical_slash:n_vertical=8,n_slash=8,last_q=32,sink=16,local=16"
PLANS = {
    "dense": "dense",
    "streaming": "streaming:sink=16,window=96",
    "block_topk": "block_topk:k=1",
    "vertical_slash": _VS,
    "sample": "sample:alpha=0.8,window_ratio=0.1,sample_ratio=0.05",
    # per KV group: two adaptive kinds beside static rules in one site
    "mixed": Plan(sites={
        "model.layers.0.self_attn": [Rule("block_topk", k=1, pool="minmax"), Rule.parse("streaming:sink=16,window=96"),
                                     Rule.parse(_VS), Rule()],
        "model.layers.1.self_attn": [Rule.parse(_VS)] * 4,
    }),
}  # fmt: skip


@pytest.mark.parametrize("world", [2, 4])
def test_a_compiled_model_prefills_a_sequence_split_over_ranks_as_one_process_does(world, tmp_path):
    from test_tensor_parallel import _tiny

    import sparsecomp

    model = _tiny(tmp_path / "model")
    mp.spawn(_compiled_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "model"), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    ids = torch.arange(N)[None] % 120 + 1
    dense = None
    for name, plan in PLANS.items():
        with torch.no_grad():
            compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False, kernel_options=BLOCKS_OF_64)
            whole = compiled(ids, use_cache=False).logits
        parts = torch.cat([torch.load(tmp_path / f"{name}{r}.pt") for r in range(world)], 1)
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4, msg=name)
        dense = whole if dense is None else dense
        assert name == "dense" or (whole - dense).abs().max() > 1e-3, f"{name} kept every key: the check is vacuous"


def _decode_worker(rank, world, init_file, path, out):
    from transformers import AutoModelForCausalLM

    import sparsecomp
    from sparsecomp.parallel import gather_cache, gather_streaming_cache

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        chunk = ContextChunk(N, rank, world, BLOCK)
        ids = torch.arange(N + 1)[None] % 120 + 1  # the prefill covers N tokens, the last one starts decoding
        prefill = sparsecomp.compile(model, PLANS["streaming"], inner="eager", cost_model=False, context_parallel=True)
        rows = torch.arange(chunk.start, chunk.stop)[None]
        with torch.no_grad():
            local = prefill(ids[:, rows[0]], position_ids=rows).past_key_values
        cache = gather_cache(local, chunk, dst=0)
        ring = gather_streaming_cache(local, chunk, model.config, N + 8, sink=16, window=96, dst=0)
        if rank == 0:
            torch.save([layer.keys.clone() for layer in ring.layers], f"{out}/ring_keys.pt")
            decode = sparsecomp.compile(model, PLANS["streaming"], inner="eager", cost_model=False)
            tokens = decode.generate(ids, past_key_values=ring, max_new_tokens=4, do_sample=False)
            assert ring.layers[0].keys.shape[2] == 16 + 96  # only the kept tokens moved
            torch.save(tokens, f"{out}/ring_tokens.pt")
            torch.save([(layer.keys, layer.values) for layer in cache.layers], f"{out}/gathered.pt")
            decode = sparsecomp.compile(model, PLANS["streaming"], inner="eager", cost_model=False)
            tokens = decode.generate(ids, past_key_values=cache, max_new_tokens=4, do_sample=False)
            phases = {g.phase() for g in sparsecomp.inspect(decode).graphs}
            assert phases == {"decode"}, phases  # the gathered cache was read: no prefill ran here
            torch.save(tokens, f"{out}/tokens.pt")
        else:
            assert cache is None and ring is None
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2])
def test_decoding_after_a_context_parallel_prefill_gives_the_tokens_of_one_process(world, tmp_path):
    """gather_cache joins the ranks' chunks on rank 0: the same K/V as one process's prefill, and
    the tokens one process generates from the whole prompt; gather_streaming_cache moves only the
    sink and window keys, into a ring that decodes the same tokens with the streaming rule."""
    from test_tensor_parallel import _tiny

    import sparsecomp

    model = _tiny(tmp_path / "model")
    mp.spawn(_decode_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "model"), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    ids = torch.arange(N + 1)[None] % 120 + 1
    compiled = sparsecomp.compile(model, PLANS["streaming"], inner="eager", cost_model=False)
    with torch.no_grad():
        whole = compiled(ids[:, :N]).past_key_values
    for (k, v), layer in zip(torch.load(tmp_path / "gathered.pt"), whole.layers, strict=True):
        torch.testing.assert_close(k, layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, layer.values, rtol=1e-5, atol=1e-5)
    from sparsecomp.runtime.streaming_cache import kept_positions

    kept = kept_positions(N, 16, 96)  # the ring's slots: sinks, then the window wrapped at N
    slots = [p if p < 16 else 16 + (p - 16) % 96 for p in kept]
    for ring_keys, layer in zip(torch.load(tmp_path / "ring_keys.pt"), whole.layers, strict=True):
        torch.testing.assert_close(ring_keys[:, :, slots], layer.keys[:, :, kept], rtol=1e-5, atol=1e-5)
    want = compiled.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), want)
    assert torch.equal(torch.load(tmp_path / "ring_tokens.pt"), want)  # sink and window alone decode the same


def _spread_decode_worker(rank, world, init_file, path, out):
    from transformers import AutoModelForCausalLM

    import sparsecomp
    from sparsecomp.parallel import generate_context_parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        chunk = ContextChunk(N, rank, world, BLOCK)
        ids = torch.arange(N + 1)[None] % 120 + 1
        rows = torch.arange(chunk.start, chunk.stop)[None]
        for name, plan in DECODE_PLANS.items():
            torch._dynamo.reset()
            compiled = sparsecomp.compile(model, plan, inner="eager", cost_model=False, context_parallel=True)
            with torch.no_grad():
                cache = compiled(ids[:, rows[0]], position_ids=rows).past_key_values
            tokens = generate_context_parallel(compiled, cache, ids[:, N:], chunk, 4)
            decode = [s for g in sparsecomp.inspect(compiled).graphs if g.phase() == "decode" for s in g.sites]
            assert decode and {s.became for s in decode} == {"context_parallel"}, [s.reason for s in decode]
            assert cache.get_seq_length() == chunk.size + 4  # no rank holds more than its chunk and the new tokens
            torch.save(tokens, f"{out}/spread_{name}{rank}.pt")
        with torch.no_grad():
            cache = compiled(ids[:, rows[0]], position_ids=rows).past_key_values
        sampler = torch.Generator().manual_seed(rank)  # each rank its own stream: only rank 0's is used

        def sample(logits):
            return torch.multinomial(logits.softmax(-1), 1, generator=sampler)

        sampled = generate_context_parallel(compiled, cache, ids[:, N:], chunk, 4, pick=sample)
        torch.save(sampled, f"{out}/sampled{rank}.pt")
        selection = sparsecomp.compile(model, "prefill=dense;decode=h2o:ratio=0.25", inner="eager",
                                       cost_model=False, context_parallel=True)  # fmt: skip
        with torch.no_grad():
            cache = selection(ids[:, rows[0]], position_ids=rows).past_key_values
        with pytest.raises(Exception, match="context parallel decoding takes"):  # would read this chunk only
            generate_context_parallel(selection, cache, ids[:, N:], chunk, 1)
    finally:
        dist.destroy_process_group()


def _greedy_after_prefill(model, ids, steps):
    """One process's tokens as the ranks make them: the first N tokens prefilled, then token N and
    the greedy ones fed as decode steps (a selection rule reads its keys there, not in the prefill)."""
    out = []
    with torch.no_grad():
        cache = model(ids[:, :N]).past_key_values
        token = ids[:, N:]
        for step in range(steps):
            at = torch.tensor([[N + step]])
            logits = model(input_ids=token, position_ids=at, cache_position=at[0], past_key_values=cache).logits
            token = logits[:, -1:].argmax(-1)
            out.append(token)
    return torch.cat(out, 1)


# Double Sparsity and Quest keep a quarter of the keys, chosen over the whole sequence (ranks' best scores gathered)
DECODE_PLANS = {
    "dense": "dense",
    "streaming": PLANS["streaming"],
    "double_sparsity": Plan(decode_default=Rule.parse("double_sparsity:channels=4,ratio=0.25"),
                            channels={f"model.layers.{i}.self_attn": [[0, 3, 5, 9], [1, 2, 8, 15], [4, 6, 7, 12],
                                                                      [10, 11, 13, 14]] for i in range(2)}),
    "quest": "prefill=dense;decode=quest:page=16,ratio=0.25",
}  # fmt: skip


@pytest.mark.parametrize("world", [2])
def test_decoding_spread_over_the_ranks_gives_the_tokens_of_one_process(world, tmp_path):
    """Each rank attends over its own chunk and the partial results merge: every rank gets the
    tokens one process generates, for the dense, streaming, Double Sparsity and Quest rules; sampled
    tokens are rank 0's on every rank; H2O (no spread selection) is refused."""
    from test_tensor_parallel import _tiny

    import sparsecomp

    model = _tiny(tmp_path / "model")
    mp.spawn(_spread_decode_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "model"), str(tmp_path)),
             nprocs=world, join=True)  # fmt: skip
    ids = torch.arange(N + 1)[None] % 120 + 1
    wants = {}
    for name, plan in DECODE_PLANS.items():
        torch._dynamo.reset()
        want = _greedy_after_prefill(sparsecomp.compile(model, plan, inner="eager", cost_model=False), ids, 4)
        for rank in range(world):
            assert torch.equal(torch.load(tmp_path / f"spread_{name}{rank}.pt"), want), (name, rank)
        wants[name] = want
    for name in ("double_sparsity", "quest"):  # the selection changed the tokens: the check is not vacuous
        assert not torch.equal(wants[name], wants["dense"]), name
    sampled = [torch.load(tmp_path / f"sampled{rank}.pt") for rank in range(world)]
    assert all(torch.equal(s, sampled[0]) for s in sampled)  # rank 0's sample fed on every rank


@pytest.mark.parametrize("sink, window", [(0, 0), (16, 96)])
def test_partial_decode_attentions_merge_to_attention_over_the_whole_sequence(sink, window):
    """Each rank's partial over its chunk plus the decoded tokens (which every rank holds, the last
    one counts) merges into the attention of one process over all keys, under the local rule."""
    from sparsecomp.parallel.compiled import merge_partials, partial_decode_attention

    world, decoded, scale = 4, 3, 0.25
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, 1, D, generator=g)
    k, v = (torch.randn(B, HKV, N + decoded, D, generator=g) for _ in range(2))
    outs, lses = [], []
    for rank in range(world):
        chunk = ContextChunk(N, rank, world, BLOCK)
        mine = torch.cat([torch.arange(chunk.start, chunk.stop), torch.arange(N, N + decoded)])
        out, lse = partial_decode_attention(q, k[:, :, mine], v[:, :, mine], chunk, [sink] * HQ, [window] * HQ, scale)
        outs.append(out)
        lses.append(lse)
    got = merge_partials(torch.stack(outs), torch.stack(lses))
    pos = torch.arange(N + decoded)
    keep = (pos < sink) | (N + decoded - 1 - pos < window) if window else torch.ones_like(pos, dtype=torch.bool)
    kf, vf = (t.repeat_interleave(HQ // HKV, dim=1)[:, :, keep] for t in (k, v))
    want = torch.softmax((q @ kf.transpose(-1, -2)) * scale, dim=-1) @ vf
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
