"""The static index against dense masked SDPA under padding, windows, query offsets and unequal
blocks: it lists exactly the key blocks that hold a kept pair, never more than its proven bound.

Regression: with sink 0, a window, left padding and a query offset (or block_n > block_m), the block
holding the first real key was listed for every query block, as if padding made it a sink; the list
overflowed ``max_blocks`` and the diagonal block was cut (max error 0.64 against SDPA).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from sparsecomp.kernels import block_index_bound, build_block_index, sparse_attention_call, sparse_attention_reference
from sparsecomp.kernels.prefill.block_index import first_valid_key
from sparsecomp.kernels.prefill.block_sparse_attention import kept_pairs, sparse_attention_triton

BLOCKS = [(16, 16), (16, 32), (32, 16)]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: compiled on a GPU, else interpreted


def setup(n_q, n_k, pad, sink, window, block_m, block_n, *, site_window=0, batch=2, heads=(2, 1), d=16, seed=0):
    """Fresh random fp32 inputs; the last batch row has ``pad`` left-padded keys; queries are the
    last n_q of the n_k positions (a chunk after cached keys when n_q < n_k)."""
    hq, hkv = heads
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, n, d, generator=gen) for h, n in ((hq, n_q), (hkv, n_k), (hkv, n_k)))
    key_ok = torch.ones(batch, n_k, dtype=torch.bool)
    key_ok[-1, :pad] = False
    q_pos, k_pos = torch.arange(n_k - n_q, n_k)[None], torch.arange(n_k)[None]
    sinks, windows = [sink] * hq, [window] * hq
    sink_t, win_t = torch.tensor(sinks, dtype=torch.int32), torch.tensor(windows, dtype=torch.int32)
    bound = block_index_bound(
        sinks, windows, causal=True, window=site_window, block_m=block_m, block_n=block_n, positions_are_indices=True
    )
    index = build_block_index(
        q_pos, k_pos, key_ok, sink_t, win_t, causal=True, window=site_window, block_m=block_m, block_n=block_n,
        max_blocks=bound,
    )  # fmt: skip
    start = first_valid_key(key_ok, q.device)
    keep = kept_pairs(q_pos, k_pos, key_ok, start, sink_t, win_t, causal=True, window=site_window)
    args = (q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink_t, win_t, 1 / math.sqrt(d), True, site_window, 0.0)
    return args, index, bound, keep.expand(batch, hq, n_q, n_k)


def call(args, index):
    """The op through its typed call, on ``setup``'s arguments."""
    q, k, v, q_pos, k_pos, key_ok = args[:6]
    sink, win, scale, causal, window, _ = args[12:]
    local = dict(key_ok=key_ok, head_sink=sink, head_window=win, scale=scale, causal=causal, window=window)
    return sparse_attention_call(q, k, v, index, q_pos=q_pos, k_pos=k_pos, **local)


def sdpa_golden(q, k, v, keep, scale):
    """Dense masked SDPA (fp32); rows that keep no key are zeros (the op's documented semantics)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return torch.where(keep.any(-1, keepdim=True), out, 0.0)


def needed_blocks(keep, block_m, block_n):
    """(B, H, nQB, nKB): the block pairs that hold at least one kept pair."""
    b, h, n_q, n_k = keep.shape
    n_qb, n_kb = -(-n_q // block_m), -(-n_k // block_n)
    padded = torch.zeros(b, h, n_qb * block_m, n_kb * block_n, dtype=torch.bool)
    padded[..., :n_q, :n_k] = keep
    return padded.view(b, h, n_qb, block_m, n_kb, block_n).any(-1).any(-2)


def assert_exact_and_bounded(index, bound, keep, block_m, block_n):
    fb, fc, pb, pc = (t.expand(*keep.shape[:2], *t.shape[2:]) for t in index[:4])
    assert fb.shape[-1] == pb.shape[-1] <= (bound or fb.shape[-1])
    if bound is not None:
        assert int((fc + pc).max()) <= bound, "the index overflows its proven bound"
    needed = needed_blocks(keep, block_m, block_n)
    for b, h, qb in torch.cartesian_prod(*(torch.arange(n) for n in fc.shape)).tolist():
        full, part = fb[b, h, qb, : fc[b, h, qb]].tolist(), pb[b, h, qb, : pc[b, h, qb]].tolist()
        want = torch.nonzero(needed[b, h, qb]).flatten().tolist()
        assert sorted(full + part) == want, (b, h, qb, full, part, want)  # nothing dropped, nothing extra


def test_minimal_case_lists_the_diagonal_block():
    """Queries 40..55, keys 0..55 with the first 5 padded, sink 0, window 16, blocks of 16."""
    q_pos, k_pos = torch.arange(40, 56)[None], torch.arange(56)[None]
    key_ok = torch.ones(1, 56, dtype=torch.bool)
    key_ok[:, :5] = False
    sink, win = torch.tensor([0], dtype=torch.int32), torch.tensor([16], dtype=torch.int32)
    bound = block_index_bound([0], [16], causal=True, window=0, block_m=16, block_n=16, positions_are_indices=True)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink, win, causal=True, window=0, block_m=16, block_n=16, max_blocks=bound
    )
    assert bound == 3
    assert index.full_count.tolist() == [[[0]]] and index.part_count.tolist() == [[[3]]]
    assert index.part_blocks[0, 0, 0].tolist() == [1, 2, 3]  # was [0, 1, 2]: block 0 listed, block 3 cut
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for n in (16, 56, 56))
    out = sparse_attention_reference(
        q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink, win, 0.25, True, 0, 0.0, 16, 16
    )
    keep = (k_pos[0] <= q_pos[0][:, None]) & (q_pos[0][:, None] - k_pos[0] < 16) & key_ok[0]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.25)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)  # was 0.64 off


@pytest.mark.parametrize(("block_m", "block_n"), BLOCKS)
@pytest.mark.parametrize("sink", [0, 4])
@pytest.mark.parametrize("window", [8, 16, 40])
@pytest.mark.parametrize("pad", [0, 5, 17])
@pytest.mark.parametrize("offset", [0, 23, 40])
def test_reference_matches_sdpa_and_the_index_its_bound(block_m, block_n, sink, window, pad, offset):
    n_k = 77
    args, index, bound, keep = setup(n_k - offset, n_k, pad, sink, window, block_m, block_n, seed=offset + pad)
    assert_exact_and_bounded(index, bound, keep, block_m, block_n)
    q, k, v = args[:3]
    out = call(args, index)
    torch.testing.assert_close(out, sdpa_golden(q, k, v, keep, args[14]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("block_m", "block_n"), BLOCKS)
@pytest.mark.parametrize(("sink", "window", "site_window"), [(0, 16, 24), (4, 8, 24), (4, 30, 12)])
@pytest.mark.parametrize("pad", [0, 5])
def test_site_window_with_sinks_lists_only_what_is_kept(block_m, block_n, sink, window, site_window, pad):
    """A site's own window (Mistral, Gemma 2) over the head's sinks: sink blocks the site's window
    does not reach are not listed (the sinks' own positions decide, not their block's)."""
    args, index, bound, keep = setup(60, 90, pad, sink, window, block_m, block_n, site_window=site_window)
    assert_exact_and_bounded(index, bound, keep, block_m, block_n)
    out = call(args, index)
    torch.testing.assert_close(out, sdpa_golden(*args[:3], keep, args[14]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("block_m", "block_n"), BLOCKS)
@pytest.mark.parametrize("sink", [0, 4])
def test_triton_interpreter_matches_sdpa(block_m, block_n, sink):
    """The kernel (interpreter on CPU) over the same index: padding 5, a query offset of 40."""
    args, index, bound, keep = setup(24, 64, 5, sink, 16, block_m, block_n, heads=(2, 2))
    assert_exact_and_bounded(index, bound, keep, block_m, block_n)
    on_device = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    poisoned = torch.full_like(on_device[0], float("nan"))
    out = sparse_attention_triton(*on_device, block_m, block_n, out=poisoned).cpu()
    torch.testing.assert_close(out, sdpa_golden(*args[:3], keep, args[14]), atol=1e-5, rtol=1e-5)


def test_non_monotone_positions_never_drop_a_kept_pair():
    """Positions from a tensor (packed or shuffled): the index may list more, never less."""
    gen = torch.Generator().manual_seed(3)
    for trial in range(20):
        n_q, n_k, block_m, block_n = 40, 70, *BLOCKS[trial % 3]
        q_pos, k_pos = torch.randint(0, n_k, (1, n_q), generator=gen), torch.randint(0, n_k, (2, n_k), generator=gen)
        key_ok = torch.rand(2, n_k, generator=gen) > 0.2
        key_ok[:, : trial % 7] = False
        sink = torch.tensor([0, 3, 9], dtype=torch.int32)
        win = torch.tensor([5, 12, 0], dtype=torch.int32)
        index = build_block_index(
            q_pos, k_pos, key_ok, sink, win, causal=True, window=30, block_m=block_m, block_n=block_n, max_blocks=None
        )
        keep = kept_pairs(q_pos, k_pos, key_ok, first_valid_key(key_ok, "cpu"), sink, win, causal=True, window=30)
        needed = needed_blocks(keep, block_m, block_n)
        fb, fc, pb, pc = index[:4]
        listed = torch.zeros_like(needed)
        for lists, count in ((fb, fc), (pb, pc)):
            slot = torch.arange(lists.shape[-1]) < count[..., None]
            ids = torch.where(slot, lists.long(), needed.shape[-1])
            pad = torch.zeros(*listed.shape[:-1], needed.shape[-1] + 1, dtype=torch.bool)
            listed |= pad.scatter_(-1, ids.expand(*listed.shape[:-1], -1), True)[..., :-1]
        assert not (needed & ~listed).any(), trial


def test_llama_streaming_without_sinks_on_a_padded_batch():
    """The model-level case: Llama, plan streaming sink 0 window 16, blocks 16 x 32, a batch of 2
    with 5 left-padded tokens, N = 300 (was 0.57 off)."""
    pytest.importorskip("transformers")
    from test_models import _out, make

    from sparsecomp.compiler.backend import BackendOptions, SparsecompBackend
    from sparsecomp.demo import streaming_sdpa

    model = make("llama", "sdpa").eval()
    n, pad = 300, 5
    ids = torch.randint(0, 100, (2, n))
    mask = torch.ones(2, n, dtype=torch.long)
    mask[-1, :pad] = 0
    options = {"plan": "streaming:sink=0,window=16", "kernel_options": {"block_m": 16, "block_n": 32}}
    compiled = torch.compile(model, backend=SparsecompBackend(BackendOptions.from_any({**options, "inner": "eager"})))
    with torch.no_grad():
        out = _out(compiled(ids, attention_mask=mask))
        with streaming_sdpa(sink=0, window=16):  # exact with padding: no sinks to count from key 0
            ref = _out(model(ids, attention_mask=mask))
    torch.testing.assert_close(out[0], ref[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1, pad:], ref[1, pad:], atol=2e-5, rtol=2e-5)
