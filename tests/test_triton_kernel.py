"""The Triton kernel against the op's PyTorch reference (interpreter on CPU; compiled on GPU)."""

import math

import pytest
import torch
from attention_cases import CASES, add_random_columns, golden, make_case

import sparsecomp
from sparsecomp.kernels import build_block_index, index_positions, sparse_attention_call, sparse_attention_reference
from sparsecomp.kernels.prefill.block_sparse_attention import sparse_attention_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter's bf16 dot multiplies raw bit patterns: bf16 is tested on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def run_both(case, dtype, softcap=0.0, positions=None):
    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    q, k, v, key_ok = (t.to(DEVICE) if t is not None else None for t in make_case(b, hq, hkv, nq, nk, d, dtype, pad))
    q_pos, k_pos = positions or (index_positions(q, 2), index_positions(k, 2))
    sink = torch.tensor(sinks, dtype=torch.int32, device=DEVICE)
    win = torch.tensor(windows, dtype=torch.int32, device=DEVICE)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=causal, window=window, block_m=block, block_n=block, max_blocks=None
    )
    structure = (1 / math.sqrt(d), causal, window, softcap, block, block)
    args = (q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink, win, *structure)
    poisoned = torch.full((b, hq, nq, d), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(*args, out=poisoned)
    return out, sparse_attention_reference(*args), (q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(case, dtype):
    out, ref, _ = run_both(case, dtype)
    assert torch.isfinite(out).all()  # every element written, no NaN from empty rows
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_kernel_softcap_and_head_dims_that_are_not_powers_of_two():
    case = (1, 4, 2, 45, 45, 24, 16, True, 0, [2, 0, 2, 0], [8, 0, 8, 0], 0)
    out, ref, _ = run_both(case, torch.float32, softcap=3.0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_kernel_positions_from_a_tensor_and_larger_key_blocks():
    """Query positions offset by 5 (a chunk after cached keys), index blocks of 32 keys."""
    nq, nk = 27, 32
    q_pos = (torch.arange(nq, device=DEVICE) + 5)[None]
    k_pos = torch.arange(nk, device=DEVICE)[None]
    case = (2, 2, 1, nq, nk, 16, 32, True, 0, [1, 0], [6, 0], 0)
    out, ref, (q, k, v) = run_both(case, torch.float32, positions=(q_pos, k_pos))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    keep = (k_pos[0][None, :] <= q_pos[0][:, None]).expand(2, 2, nq, nk).clone()
    local = (q_pos[0][:, None] - k_pos[0][None, :] < 6) | (k_pos[0][None, :] < 1)
    keep[:, 0] &= local
    torch.testing.assert_close(out.double().cpu(), golden(q, k, v, keep, 0.25).cpu(), atol=1e-5, rtol=1e-5)


gpu_only = pytest.mark.skipif(DEVICE != "cuda", reason="bf16 and compiled kernels are checked on the GPU")


@gpu_only
@pytest.mark.parametrize("sink,window", [(0, 0), (16, 200)])
def test_bf16_error_within_1_5x_of_sdpa(sink, window):
    """Error against an fp64 golden, relative to SDPA's own bf16 error on the same mask."""
    b, hq, hkv, n, d = 1, 8, 2, 1000, 128
    q, k, v, _ = (t.cuda() if t is not None else None for t in make_case(b, hq, hkv, n, n, d, torch.bfloat16))
    i = torch.arange(n, device="cuda")
    keep = i[None, :] <= i[:, None]
    if window:
        keep &= (i[:, None] - i[None, :] < window) | (i[None, :] < sink)
    ref = golden(q, k, v, keep.expand(b, hq, n, n), d**-0.5)
    k_rep, v_rep = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k_rep, v_rep, attn_mask=keep)
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    heads = (
        torch.full((hq,), sink, dtype=torch.int32, device="cuda"),
        torch.full((hq,), window, dtype=torch.int32, device="cuda"),
    )
    index = build_block_index(
        q_pos, k_pos, None, heads[0][:1], heads[1][:1], causal=True, window=0, block_m=128, block_n=128, max_blocks=None
    )
    ours = sparse_attention_call(
        q, k, v, index, q_pos=q_pos, k_pos=k_pos, head_sink=heads[0], head_window=heads[1], scale=d**-0.5, causal=True
    )

    def err(x):
        return ((x.double() - ref).norm() / ref.norm()).item()

    assert err(ours) <= 1.5 * err(sdpa), (err(ours), err(sdpa))


@gpu_only
def test_compiled_model_on_gpu_runs_the_kernel_through_inductor():
    from tiny_models import tiny_llama

    from sparsecomp.demo import streaming_sdpa

    model = tiny_llama(hidden_size=256, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(0, 100, (2, 700), device="cuda")
    compiled = sparsecomp.compile(model, "streaming:sink=8,window=128", dynamic=False, cost_model=False)
    with torch.no_grad():
        out = compiled(ids).logits.float()
        with streaming_sdpa(sink=8, window=128):
            ref = model(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
    assert sparsecomp.counters["rewritten"] == 2


def test_the_op_is_opaque_to_a_users_torch_compile():
    """A plain torch.compile of code calling the op (not through sparsecomp.compile) must run the
    op itself, on the real strides of a batch of 2 with padding, and give eager's output."""
    args = columns_case(torch.float16 if DEVICE == "cuda" else torch.float32, 16, [0, 8, 0, 20], 2, seed=3)
    q, k, v = args[:3]
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # the layout models hand over: (B, N, H, D) storage

    def attend(q, k, v):
        return torch.ops.sparsecomp.sparse_attention(q * 1.0, k, v, *args[3:])

    eager = attend(q_t, k, v)
    compiled = torch.compile(attend, backend="inductor", fullgraph=True)(q_t, k, v)
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    torch.testing.assert_close(eager, sparse_attention_reference(*args), atol=2e-3, rtol=2e-3)


def columns_case(dtype, block, windows, per_query_block, seed):
    """Op arguments on DEVICE: B=2, 4/2 heads, N=150 (6 padded keys), d=32, sinks [4, 0, 4, 0],
    the heads' ``windows``, and random single columns outside the listed blocks."""
    b, hq, hkv, n, d = 2, 4, 2, 150, 32
    q, k, v, key_ok = make_case(b, hq, hkv, n, n, d, dtype, pad=6)
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    sink, win = torch.tensor([4, 0, 4, 0], dtype=torch.int32), torch.tensor(windows, dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=True, window=0, block_m=block, block_n=block, max_blocks=None
    )
    index = add_random_columns(index, n, block, per_query_block=per_query_block, seed=seed)
    to = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    tensors = [to(t) for t in (q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink, win)]
    return tensors + [d**-0.5, True, 0, 0.0, block, block]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols", [5, 40])  # fewer and more columns than a key tile
def test_kernel_gathers_columns(dtype, n_cols):
    b, hq, n, d = 2, 4, 150, 32
    args = columns_case(dtype, block=32, windows=[24, 40, 0, 16], per_query_block=n_cols, seed=n_cols)
    poisoned = torch.full((b, hq, n, d), float("nan"), dtype=dtype, device=DEVICE)
    out = sparse_attention_triton(*args, out=poisoned)
    ref = sparse_attention_reference(*args)
    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


LAUNCHES = [
    {"tile_m": 16},  # four programs per index block of queries
    {"tile_m": 32, "tile_n": 16},
    {"tma": 0},  # pointer loads
] + ([{"tma": 1}, {"tma": 1, "tile_m": 32}] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_launch_options_never_change_the_result(launch):
    """Query tiles smaller than an index block, key tiles smaller than it, TMA or pointer loads:
    the same keys are kept (padding, per-head local rules and columns included)."""
    b, hq, n, d = 2, 4, 150, 32
    args = columns_case(torch.float32, block=64, windows=[24, 80, 0, 16], per_query_block=7, seed=3)
    poisoned = torch.full((b, hq, n, d), float("nan"), device=DEVICE)
    out = sparse_attention_triton(*args, **launch, out=poisoned)
    torch.testing.assert_close(out, sparse_attention_reference(*args), atol=2e-5, rtol=2e-5)


def test_tma_required_where_it_cannot_run_is_an_error():
    """tma=1 off Hopper, or on K/V whose base is not 16-byte aligned, is refused, not ignored."""
    b, h, n, d = 1, 2, 40, 16
    q, k, v = (t.to(DEVICE) for t in make_case(b, h, h, n, n, d, torch.float32)[:3])
    misaligned = torch.empty(k.numel() + 1, device=DEVICE)[1:].view(k.shape)  # 4 bytes off
    misaligned.copy_(k)
    q_pos = index_positions(q, 2)
    zeros = torch.zeros(h, dtype=torch.int32, device=DEVICE)
    index = build_block_index(
        q_pos, q_pos, None, zeros, zeros, causal=True, window=0, block_m=16, block_n=16, max_blocks=None
    )
    args = (q, misaligned, v, q_pos, q_pos, None, *index.tensors, zeros, zeros, d**-0.5, True, 0, 0.0, 16, 16)
    with pytest.raises(ValueError, match="tma=1"):
        sparse_attention_triton(*args, tma=1)


@pytest.mark.parametrize("case", CASES[1:4])
def test_kernel_log_sum_exp_matches_the_reference_and_fp64(case):
    """The kernel's per-row log-sum-exp of its kept scores (RETURN_LSE), the reference's, and the
    fp64 one from explicit kept pairs agree; rows keeping nothing (padding) give -inf both ways."""
    from sparsecomp.kernels.prefill.block_sparse_attention import index_pairs

    b, hq, hkv, nq, nk, d, block, causal, window, sinks, windows, pad = case
    q, k, v, key_ok = (
        t.to(DEVICE) if t is not None else None for t in make_case(b, hq, hkv, nq, nk, d, torch.float32, pad)
    )
    q_pos, k_pos = index_positions(q, 2), index_positions(k, 2)
    sink = torch.tensor(sinks, dtype=torch.int32, device=DEVICE)
    win = torch.tensor(windows, dtype=torch.int32, device=DEVICE)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=causal, window=window, block_m=block, block_n=block, max_blocks=None
    )
    args = (
        q,
        k,
        v,
        q_pos,
        k_pos,
        key_ok,
        *index.tensors,
        sink,
        win,
        1 / math.sqrt(d),
        causal,
        window,
        0.0,
        block,
        block,
    )
    lse = torch.full((b, hq, nq), float("nan"), device=DEVICE)
    sparse_attention_triton(*args, lse=lse)
    ref_lse = torch.empty_like(lse)
    sparse_attention_reference(*args, lse=ref_lse)
    keep = index_pairs(q_pos, k_pos, key_ok, *index.tensors, sink, win, causal=causal, window=window,
                       block_m=block, block_n=block)(0, nq)  # fmt: skip
    s = q.double() @ k.double().repeat_interleave(hq // hkv, 1).transpose(-1, -2) / math.sqrt(d)
    want = s.masked_fill(~keep, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(ref_lse.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_over_split_key_sets_merges_to_the_whole():
    """Attention over two disjoint halves of each row's keys, each with its log-sum-exp, merges to
    the attention over all of them (``merge_attention``), as context parallelism combines ranks."""
    from sparsecomp.kernels.prefill.block_sparse_attention import merge_attention, sparse_attention_with_lse

    b, hq, hkv, n, d, block = 1, 4, 2, 64, 16, 16
    q, k, v, _ = (t.to(DEVICE) if t is not None else None for t in make_case(b, hq, hkv, n, n, d, torch.float32))
    pos = index_positions(q, 2)
    zeros = torch.zeros(hq, dtype=torch.int32, device=DEVICE)
    whole = build_block_index(pos, pos, None, zeros, zeros, causal=True, window=0, block_m=block, block_n=block,
                              max_blocks=None)  # fmt: skip
    full, _ = sparse_attention_with_lse(q, k, v, whole, q_pos=pos, k_pos=pos, causal=True)
    halves = [(pos < n // 2), (pos >= n // 2)]
    outs, lses = [], []
    for part in halves:  # keys outside the part are padding for it
        index = build_block_index(pos, pos, part, zeros, zeros, causal=True, window=0, block_m=block, block_n=block,
                                  max_blocks=None)  # fmt: skip
        out, lse = sparse_attention_with_lse(q, k, v, index, q_pos=pos, k_pos=pos, key_ok=part, causal=True)
        outs.append(out)
        lses.append(lse)
    assert torch.isneginf(lses[1][:, :, : n // 2]).all()  # the first rows see none of the second half
    torch.testing.assert_close(merge_attention(outs, lses), full, atol=2e-5, rtol=2e-5)
