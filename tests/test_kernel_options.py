"""Kernel options and op inputs are validated at the public boundary, the same on every device:
``KernelOptions`` refuses exactly what the Triton launcher refuses, with the field, the value and
the accepted range; the op refuses padding masks that are not bool, empty keys, and an index built
for other block sizes (where its shapes or values tell)."""

import itertools
import math

import numpy as np
import pytest
import torch

from sparsecomp.kernels import (
    SparseIndex,
    build_block_index,
    index_positions,
    sparse_attention,
    sparse_attention_call,
    sparse_attention_reference,
)
from sparsecomp.kernels.prefill.adaptive_index import combine_head_indexes
from sparsecomp.kernels.prefill.block_sparse_attention import launch_config, sparse_attention_triton
from sparsecomp.passes.rewrite import KernelOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel: compiled on a GPU, else interpreted

BAD = [
    # (field, value, words the message must hold)
    ("block_m", 0, "power of two from 16 to 1024"),
    ("block_m", -64, "power of two from 16 to 1024"),
    ("block_m", "64", "power of two"),
    ("block_m", 64.0, "power of two"),
    ("block_m", [64], "power of two"),
    ("block_m", True, "power of two"),
    ("block_m", 7, "power of two"),
    ("block_n", 24, "power of two"),
    ("block_n", 100000, "power of two from 16 to 1024"),
    ("block_n", 2048, "from 16 to 1024"),
    ("block_n", 8, "from 16 to 1024"),
    ("tile_n", 24, "power of two from 16 to 128"),
    ("tile_n", 8, "from 16 to 128"),
    ("tile_n", 256, "<= block_n=128"),
    ("tile_n", -16, "power of two"),
    ("tile_n", 64.0, "power of two"),
    ("tile_m", 48, "power of two from 16 to 128"),
    ("tile_m", 256, "<= block_m=128"),
    ("tile_m", False, "power of two"),
    ("num_warps", 3, "(0, 1, 2, 4, 8, 16, 32)"),
    ("num_warps", 64, "(0, 1, 2, 4, 8, 16, 32)"),
    ("num_warps", -4, "(0, 1, 2, 4, 8, 16, 32)"),
    ("num_warps", 4.0, "(0, 1, 2, 4, 8, 16, 32)"),
    ("num_warps", True, "(0, 1, 2, 4, 8, 16, 32)"),
    ("num_stages", -1, "0 (the default) or a positive integer"),
    ("num_stages", 2.5, "positive integer"),
    ("num_stages", "3", "positive integer"),
    ("tma", 2, "(-1, 0, 1)"),
    ("tma", -2, "(-1, 0, 1)"),
    ("tma", True, "(-1, 0, 1)"),
]


@pytest.mark.parametrize(("field", "value", "accepted"), BAD)
def test_kernel_options_refuse_with_field_value_and_range(field, value, accepted):
    with pytest.raises(ValueError) as err:
        KernelOptions(**{field: value})
    message = str(err.value)
    assert f"KernelOptions.{field}={value!r}" in message and accepted in message, message


def test_default_query_tile_of_a_large_block_is_refused_and_a_smaller_tile_accepted():
    with pytest.raises(ValueError, match=r"KernelOptions.tile_m=0; .*the default \(block_m=512\)"):
        KernelOptions(block_m=512)
    assert KernelOptions(block_m=512, tile_m=128).tile_m == 128
    assert KernelOptions(block_n=1024).block_n == 1024  # the key tile defaults to 128


def test_kernel_options_accept_the_presets_and_numpy_integers():
    from sparsecomp.tuning.cost_model import KERNEL_CONFIGS

    for opts in KERNEL_CONFIGS.values():  # built at import: every preset is valid
        assert KernelOptions(**vars(opts)) == opts
    opts = KernelOptions(block_m=np.int64(64), block_n=np.int32(32), num_warps=np.int64(4))
    assert opts == KernelOptions(block_m=64, block_n=32, num_warps=4) and type(opts.block_m) is int
    for warps in (0, 1, 2, 4, 8, 16, 32):
        KernelOptions(num_warps=warps)
    KernelOptions(block_m=16, block_n=16, tile_n=16, tile_m=16, num_stages=1, tma=0)


def _accepts(fn) -> bool:
    try:
        fn()
    except ValueError:
        return False
    return True


def test_kernel_options_accept_exactly_what_the_launcher_accepts():
    """Over a grid of values, on the CPU: KernelOptions, the launcher's config and the op agree."""
    blocks, tiles, tiles_m = (8, 24, 32, 128, 512, 2048), (0, 8, 24, 32, 256), (0, 16, 64, 512)
    for bm, bn, tn, tm, warps, stages in itertools.product(blocks, blocks, tiles, tiles_m, (0, 3, 8), (0, -1)):
        kw = dict(block_m=bm, block_n=bn, tile_n=tn, tile_m=tm, num_warps=warps, num_stages=stages)
        ours = _accepts(lambda kw=kw: KernelOptions(**kw))
        launcher = _accepts(lambda kw=kw: launch_config(64, **kw))
        assert ours == launcher, kw


def small_case(n_q=40, n_k=40, block_m=16, block_n=16, key_ok=None, d=16, max_blocks=None):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for n in (n_q, n_k, n_k))
    q_pos, k_pos = index_positions(q, 2, n_k - n_q), index_positions(k, 2)
    sink, win = torch.tensor([2, 2], dtype=torch.int32), torch.tensor([8, 8], dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, key_ok, sink[:1], win[:1], causal=True, window=0, block_m=block_m, block_n=block_n,
        max_blocks=max_blocks,
    )  # fmt: skip
    return [q, k, v, q_pos, k_pos, key_ok, *index.tensors, sink, win, 1 / math.sqrt(d), True, 0, 0.0]


def test_the_op_refuses_bad_tiles_on_cpu_as_the_launcher_does():
    args = small_case()
    with pytest.raises(ValueError, match=r"tile_n=24; accepted: 0 \(the default\) or a power of two from 16 to 16"):
        sparse_attention(*args, 16, 16, 24)
    with pytest.raises(ValueError, match=r"num_warps=3"):
        sparse_attention(*args, 16, 16, 0, 3)
    with pytest.raises(ValueError, match=r"tile_n=24"):
        sparse_attention_triton(*args, 16, 16, 24)
    with pytest.raises(ValueError, match=r"block_m=24"):
        sparse_attention(*args, 24, 16)


def test_non_default_tiles_run_and_match_the_reference():
    """Interpreter run: two programs per query block (tile_m 16 of 32), key blocks of 64 walked in
    tiles of 16, one warp."""
    args = small_case(70, 100, 32, 64)
    on_device = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    out = sparse_attention_triton(*on_device, 32, 64, tile_n=16, num_warps=1, num_stages=1, tile_m=16).cpu()
    torch.testing.assert_close(out, sparse_attention_reference(*args, 32, 64), atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter ignores warps; compiled tiles are checked on the GPU")
@pytest.mark.parametrize(
    "options",
    [dict(num_warps=32), dict(num_warps=16, tile_n=64, num_stages=2), dict(block_m=256, tile_n=64, num_stages=2)],
)
def test_edges_of_the_accepted_range_run_on_the_gpu(options):
    """The largest accepted warps and query tile compile and launch (head_dim 128, fp16). The 256-row
    tile needs 2 stages: with 3 (what the defaults pick for it) Triton asks 264 KB of shared memory."""
    opts = KernelOptions(**{"block_m": 128, "block_n": 128, **options})
    args = small_case(600, 600, opts.block_m, opts.block_n, d=128)
    args = [a.to(DEVICE).half() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    args = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    q, k, v, q_pos, k_pos, key_ok = args[:6]
    index = SparseIndex(*args[6:10], opts.block_m, opts.block_n, *args[10:12])
    local = dict(key_ok=key_ok, head_sink=args[12], head_window=args[13], scale=args[14], causal=True)
    out = sparse_attention_call(q, k, v, index, q_pos=q_pos, k_pos=k_pos, **local, options=opts)
    ref = sparse_attention_reference(*args, opts.block_m, opts.block_n)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_key_ok_must_be_bool(dtype):
    key_ok = torch.ones(1, 40, dtype=dtype)
    with pytest.raises(ValueError, match=rf"key_ok has dtype {dtype}; supported: torch.bool"):
        small_case(key_ok=key_ok)  # the index builder
    args = small_case()
    args[5] = key_ok
    with pytest.raises(ValueError, match=rf"key_ok has dtype {dtype}"):
        sparse_attention(*args, 16, 16)  # the op
    with pytest.raises(ValueError, match=rf"key_ok has dtype {dtype}"):
        sparse_attention_triton(*args, 16, 16)


def test_key_ok_of_another_shape_is_refused():
    args = small_case()
    args[5] = torch.ones(40, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"key_ok has shape \(40,\); expected \(B or 1, Nk=40\)"):
        sparse_attention(*args, 16, 16)


def test_no_keys_is_refused():
    q_pos, k_pos = torch.arange(4)[None], torch.arange(0)[None]
    one = torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="got Nk=0 keys"):
        build_block_index(q_pos, k_pos, None, one, one, causal=False, window=0, block_m=16, block_n=16, max_blocks=None)
    with pytest.raises(ValueError, match="got Nk=0 keys"):
        build_block_index(
            q_pos, k_pos, torch.ones(1, 0, dtype=torch.bool), one, one, causal=False, window=0, block_m=16,
            block_n=16, max_blocks=None,
        )  # fmt: skip
    args = small_case()
    q = args[0]
    empty = q.new_zeros(1, 2, 0, q.shape[-1])
    index = [torch.zeros(1, 1, 3, 1, dtype=torch.int32), torch.zeros(1, 1, 3, dtype=torch.int32)] * 2
    op_args = [q, empty, empty, args[3], k_pos, None, *index, None, None, *args[12:]]
    with pytest.raises(ValueError, match="got Nk=0 keys"):
        sparse_attention(*op_args, 16, 16)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_index_built_for_another_block_m_is_refused(path):
    args = small_case(64, 64, block_m=32)  # 2 query blocks of 32
    run = sparse_attention if path == "reference" else sparse_attention_triton
    with pytest.raises(ValueError, match=r"2 query blocks, as Nq=64 has with block_m=32; .* called with block_m=16"):
        run(*args, 16, 16)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_index_built_for_a_smaller_block_n_is_refused(path):
    args = small_case(64, 64, block_n=16)  # lists of 4 key blocks of 16
    run = sparse_attention if path == "reference" else sparse_attention_triton
    with pytest.raises(ValueError, match=r"up to 4 key blocks .* Nk=64 has 2 with block_n=32: .*block_n <= 16"):
        run(*args, 16, 32)


def test_bounded_index_for_a_smaller_block_n_is_refused_by_its_ids():
    """Lists cut to a bound fit the shapes; the reference still sees ids past the key blocks."""
    args = small_case(64, 200, block_n=16, max_blocks=4)  # 13 key blocks of 16, lists of 4
    with pytest.raises(ValueError, match=r"lists key block 12, but Nk=200 has 4 key blocks of block_n=64"):
        sparse_attention(*args, 16, 64)


def test_overflowing_counts_are_refused_by_the_reference():
    args = small_case()
    args[9] = args[9] + args[8].shape[-1]  # part_count past the list length
    with pytest.raises(ValueError, match=r"part_count \d+ exceeds the list length \d+: the index overflowed"):
        sparse_attention(*args, 16, 16)


def test_the_call_refuses_an_index_of_other_block_sizes():
    """The index carries its block sizes; the kernel must run with the same ones."""
    q, k, v, q_pos, k_pos = small_case()[:5]
    one = torch.tensor([0], dtype=torch.int32)
    index = build_block_index(
        q_pos, k_pos, None, one, one, causal=True, window=0, block_m=32, block_n=16, max_blocks=None
    )
    assert (index.block_m, index.block_n) == (32, 16)
    structure = dict(q_pos=q_pos, k_pos=k_pos, causal=True)
    with pytest.raises(
        ValueError, match=r"index has block_m=32, block_n=16 but the kernel options have block_m=16, bl"
    ):
        sparse_attention_call(q, k, v, index, **structure, options=KernelOptions(block_m=16, block_n=16))
    with pytest.raises(ValueError, match=r"different block sizes \(block_m, block_n\) \[\(32, 16\), \(16, 16\)\]"):
        combine_head_indexes([index, index._replace(block_m=16)], [(0,), (1,)], 2)
    # No options: the kernel's defaults at the index's block sizes, the raw op's result bit for bit.
    out = sparse_attention_call(q, k, v, index, **structure)
    zeros = torch.zeros(2, dtype=torch.int32)
    raw = sparse_attention(q, k, v, q_pos, k_pos, None, *index.tensors, zeros, zeros, 16**-0.5, True, 0, 0.0, 32, 16)
    assert torch.equal(out, raw)
