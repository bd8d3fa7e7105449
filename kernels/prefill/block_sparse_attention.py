"""Block-sparse attention over the sparse index: the op every prefill pattern lowers to.

Notation (see ``block_index.py`` for the index and the kept-pair rule):
    q (B, Hq, Nq, D), k / v (B, Hkv, Nk, D): GQA-native, query head h reads KV head h // (Hq / Hkv).
    s[i, j] = scale * q[i] . k[j]; with softcap c > 0: s = c * tanh(s / c)   (Gemma 2)
    out[i] = sum_j p[i, j] v[j],  p = softmax over the kept keys j of row i.
    A kept key passes the structure mask (causal, window, padding) and either lies in one of the
    row's listed blocks (``full`` or ``part``) and passes the head's local rule (sink / window), or
    is one of the row's listed single columns (vertical stripes; never inside a listed block).
    Rows that keep no key give zeros, never NaN.

Three layers in one file: the ``@triton.jit`` kernel (one program = one query block of one
batch row and query head; it walks the listed key blocks, ``full`` ones without an element mask,
``part`` ones with it, in tiles of BLOCK_N keys, then gathers the listed columns BLOCK_N at a
time; online softmax in fp32 base 2:
    s2 = (q . k) * scale * log2(e);  m' = max(m, rowmax(s2));  p = 2^(s2 - m')
    l' = l * 2^(m - m') + rowsum(p);  acc' = acc * 2^(m - m') + p @ v;  out = acc / l (0 if l = 0)
and head_dim padded to a power of two inside the kernel by masked loads), its launcher (grid,
tiles, warps, stages from the kernel options), the op registration, and ``sparse_attention_call``,
the typed call (a SparseIndex and KernelOptions) that every caller uses. Beside them, the PyTorch
reference: the same semantics computed in chunks of query rows (memory O(chunk * Nk), never
Nq x Nk), which is the op's implementation off CUDA and the oracle of the tests.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from ..common import MAX_BLOCK, MIN_TILE, KernelOptions, check_kernel_options
from .block_index import SparseIndex, check_keys, first_valid_key

LOG2E = math.log2(math.e)


# fmt: off
@triton.jit
def _kv_tile(Ptr, desc, base, offs_n, valid, stride_n, stride_d, b, kvh, n0,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
             USE_TMA: tl.constexpr, IN_RANGE: tl.constexpr):
    """Keys or values ``offs_n`` as a (BLOCK_N, BLOCK_D) tile: by the tensor-memory accelerator
    (contiguous tiles on Hopper; out-of-range rows and padded head_dim come back as zeros), or by
    pointers (masked unless the tile is known to lie inside the tensor)."""
    if USE_TMA:
        return desc.load([b, kvh, n0, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = Ptr + base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
        if IN_RANGE and HEAD_DIM == BLOCK_D:
            return tl.load(ptrs)
        else:
            return tl.load(ptrs, mask=valid[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _softmax_step(
    acc, m_i, l_i, q, k, v, q_pos, offs_n, valid, KPos, KeyOk, kpos_base, keyok_base,
    scale2, softcap, window, sink_h, win_h, key_start,
    MASKED: tl.constexpr, LOCAL: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_OK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over the key tile ``k``/``v`` at ``offs_n``. MASKED applies the
    structure mask, LOCAL also the head's sink/window rule (blocks, not columns). Unmasked tiles
    keep every pair, so their row maxima are finite and need no guard."""
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if HAS_SOFTCAP:
        # softcap * tanh(s * scale / softcap), tanh(x) = 2 sigmoid(2x) - 1; then to base 2
        x = s * (scale2 / 1.4426950408889634) / softcap
        s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0) * 1.4426950408889634
        scale_s = 1.0
    else:
        scale_s = scale2
    if MASKED:
        k_pos = tl.load(KPos + kpos_base + offs_n, mask=valid, other=0)
        dist = q_pos[:, None] - k_pos[None, :]
        keep = valid[None, :]
        if LOCAL:
            keep = keep & ((win_h <= 0) | (dist < win_h) | ((offs_n[None, :] - key_start) < sink_h))
        if CAUSAL:
            keep = keep & (dist >= 0)
        if HAS_WINDOW:
            keep = keep & (dist < window)
        if HAS_KEY_OK:
            ok = tl.load(KeyOk + keyok_base + offs_n, mask=valid, other=0)
            keep = keep & (ok[None, :] != 0)
        s = tl.where(keep, s * scale_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing kept yet
        p = tl.math.exp2(s - m_use[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_s)
        m_use = m_new
        p = tl.math.exp2(s * scale_s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, m_new, l_i


@triton.jit
def _attend_block(
    acc, m_i, l_i, q, q_pos, kb, tile, n_k, K, V, DescK, DescV, KPos, KeyOk, b, kvh,
    k_base, v_base, kpos_base, keyok_base, stride_kn, stride_kd, stride_vn, stride_vd,
    scale2, softcap, window, sink_h, win_h, key_start,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
    USE_TMA: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
    HAS_KEY_OK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
):
    """The listed key block ``kb``, SUB_N key tiles of BLOCK_N. Full blocks (MASKED False) lie inside
    the tensor and keep every pair; part blocks get the structure mask and the head's local rule."""
    for sub in tl.static_range(SUB_N):
        n0 = (kb * SUB_N + sub) * BLOCK_N
        offs_n = n0 + tile
        in_k = offs_n < n_k
        k = _kv_tile(K, DescK, k_base, offs_n, in_k, stride_kn, stride_kd, b, kvh, n0,
                     HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, not MASKED)
        v = _kv_tile(V, DescV, v_base, offs_n, in_k, stride_vn, stride_vd, b, kvh, n0,
                     HEAD_DIM, BLOCK_D, BLOCK_N, USE_TMA, not MASKED)
        acc, m_i, l_i = _softmax_step(
            acc, m_i, l_i, q, k, v, q_pos, offs_n, in_k, KPos, KeyOk, kpos_base, keyok_base,
            scale2, softcap, window, sink_h, win_h, key_start,
            MASKED, MASKED, CAUSAL, HAS_WINDOW, HAS_KEY_OK, HAS_SOFTCAP, IEEE)
    return acc, m_i, l_i


@triton.jit
def _sparse_attention_fwd(
    Q, K, V, DescK, DescV, Out, Lse, QPos, KPos, KeyOk, KeyStart, FullBlocks, FullCount, PartBlocks, PartCount,
    Columns, ColumnCount, HeadSink, HeadWindow,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
    stride_qpb, stride_kpb, stride_kob, stride_ksb,
    stride_ib, stride_ih, stride_iq, stride_cb, stride_ch,          # block lists, their counts
    stride_colb, stride_colh, stride_colq, stride_ccb, stride_cch,  # columns, their counts
    n_heads, n_q, n_k, groups, scale2, softcap, window,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SUB_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KEY_OK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_COLUMNS: tl.constexpr, IEEE: tl.constexpr, USE_TMA: tl.constexpr,
    SUB_M: tl.constexpr, RETURN_LSE: tl.constexpr = False,
):
    # Scalars may arrive as fp64 (Inductor passes Python floats so): keep the math in fp32.
    scale2 = tl.cast(scale2, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    # Last query tiles first: under causal masks they have the most keys (less tail at the end).
    # A program takes BLOCK_M query rows, 1 / SUB_M of an index block's rows.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    index_row = pid_m // SUB_M
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    kvh = h // groups
    # element offsets of a batch row and head pass 2^31 on long inputs (TMA coordinates stay int32)
    b64, h64, kvh64 = b.to(tl.int64), h.to(tl.int64), kvh.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_q = offs_m < n_q
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=in_q[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    q_pos = tl.load(QPos + b * stride_qpb + offs_m, mask=in_q, other=0)
    sink_h = tl.load(HeadSink + h)
    win_h = tl.load(HeadWindow + h)
    key_start = tl.load(KeyStart + b * stride_ksb)
    k_base = b64 * stride_kb + kvh64 * stride_kh
    v_base = b64 * stride_vb + kvh64 * stride_vh
    kpos_base = b * stride_kpb
    keyok_base = b * stride_kob

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    list_base = b * stride_ib + h * stride_ih + index_row * stride_iq
    count_at = b * stride_cb + h * stride_ch + index_row
    tile = tl.arange(0, BLOCK_N)

    # Blocks that keep every pair (and lie inside the tensor): no element mask.
    n_full = tl.load(FullCount + count_at)
    for t in range(0, n_full):
        kb = tl.load(FullBlocks + list_base + t)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, q_pos, kb, tile, n_k, K, V, DescK, DescV, KPos, KeyOk, b, kvh,
            k_base, v_base, kpos_base, keyok_base, stride_kn, stride_kd, stride_vn, stride_vd,
            scale2, softcap, window, sink_h, win_h, key_start,
            HEAD_DIM, BLOCK_D, BLOCK_N, SUB_N, USE_TMA, False, CAUSAL, HAS_WINDOW, HAS_KEY_OK, HAS_SOFTCAP, IEEE)
    # Blocks that keep some pairs: element mask (structure and the head's local rule).
    n_part = tl.load(PartCount + count_at)
    for t in range(0, n_part):
        kb = tl.load(PartBlocks + list_base + t)
        acc, m_i, l_i = _attend_block(
            acc, m_i, l_i, q, q_pos, kb, tile, n_k, K, V, DescK, DescV, KPos, KeyOk, b, kvh,
            k_base, v_base, kpos_base, keyok_base, stride_kn, stride_kd, stride_vn, stride_vd,
            scale2, softcap, window, sink_h, win_h, key_start,
            HEAD_DIM, BLOCK_D, BLOCK_N, SUB_N, USE_TMA, True, CAUSAL, HAS_WINDOW, HAS_KEY_OK, HAS_SOFTCAP, IEEE)
    # Single key columns (vertical stripes), gathered BLOCK_N at a time, with the element mask.
    if HAS_COLUMNS:
        col_base = b * stride_colb + h * stride_colh + index_row * stride_colq
        n_cols = tl.load(ColumnCount + b * stride_ccb + h * stride_cch + index_row)
        for c0 in range(0, n_cols, BLOCK_N):
            slot = c0 + tile
            cols = tl.load(Columns + col_base + slot, mask=slot < n_cols, other=0)
            valid = (slot < n_cols) & (cols < n_k)
            k = _kv_tile(K, DescK, k_base, cols, valid, stride_kn, stride_kd, b, kvh, 0,
                         HEAD_DIM, BLOCK_D, BLOCK_N, False, False)
            v = _kv_tile(V, DescV, v_base, cols, valid, stride_vn, stride_vd, b, kvh, 0,
                         HEAD_DIM, BLOCK_D, BLOCK_N, False, False)
            acc, m_i, l_i = _softmax_step(
                acc, m_i, l_i, q, k, v, q_pos, cols, valid, KPos, KeyOk, kpos_base, keyok_base,
                scale2, softcap, window, sink_h, win_h, key_start,
                True, False, CAUSAL, HAS_WINDOW, HAS_KEY_OK, HAS_SOFTCAP, IEEE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=in_q[:, None] & (offs_d < HEAD_DIM)[None, :])
    if RETURN_LSE:  # log of the softmax denominator, natural units (-inf: no key kept): to merge partials
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # m and the exponents are in log2 units
        tl.store(Lse + (b64 * n_heads + h64) * n_q + offs_m, lse, mask=in_q)
# fmt: on


def _batch_stride(t: torch.Tensor, dim: int = 0) -> int:
    """A dimension of size 1 (batch or head) is shared by every row of it: stride 0."""
    return t.stride(dim) if t.shape[dim] > 1 else 0


_SHARED_MEMORY_BYTES = 227 * 1024  # per program on Hopper (other GPUs: read off the device)


def launch_config(
    head_dim: int, block_m: int, block_n: int, tile_n: int = 0, num_warps: int = 0, num_stages: int = 0,
    tile_m: int = 0, element_size: int = 2, shared_memory: int = _SHARED_MEMORY_BYTES,
) -> dict:  # fmt: skip
    """Tile and launch parameters: the kernel options' values, or defaults for 0. A program takes
    ``tile_m`` query rows (a divisor of block_m) and walks keys ``tile_n`` at a time.

    Defaults, from the H100 sweeps (benchmarks/results/prefill_attention_tuning.log): 128 x 128
    tiles, 8 warps, 3 stages; fewer stages, then a smaller key tile, where the Q tile and the K/V
    stages would not fit in shared memory (fp32, head_dim 256)."""
    check_kernel_options(block_m, block_n, tile_n, num_warps, num_stages, tile_m=tile_m)
    tile_m = tile_m or block_m
    block_d = max(16, triton.next_power_of_2(head_dim))

    def fits(n_tile, stages):
        return (tile_m + 2 * stages * n_tile) * block_d * element_size <= shared_memory

    if not tile_n:
        tile_n = min(block_n, 128)
        while tile_n > 16 and not fits(tile_n, num_stages or 2):
            tile_n //= 2
    if not num_stages:
        num_stages = next((st for st in (3, 2) if fits(tile_n, st)), 1)
    big = tile_m >= 128 and head_dim >= 64
    return {
        "BLOCK_M": tile_m,
        "SUB_M": block_m // tile_m,
        "BLOCK_N": tile_n,
        "SUB_N": block_n // tile_n,
        "num_warps": num_warps or (8 if big else 4),
        "num_stages": num_stages,
    }


def _shared_memory_bytes(device: torch.device) -> int:
    """Shared memory a program may use on this GPU (its opt-in limit)."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or _SHARED_MEMORY_BYTES


def _tma_descriptor(t: torch.Tensor, block_n: int, block_d: int):
    """A host-side tensor descriptor of K or V (B, H, N, D) with (1, 1, block_n, block_d) boxes, or
    None where the tensor-memory accelerator cannot read it: not Hopper or newer, an interpreter
    run, or strides/base not 16-byte aligned (it needs unit stride along head_dim)."""
    if not t.is_cuda or torch.cuda.get_device_capability(t.device)[0] < 9:
        return None
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    size = t.element_size()
    # A dimension of size 1 is never stepped along: give it any aligned stride.
    strides = [s if n > 1 else t.shape[-1] for n, s in zip(t.shape, t.stride(), strict=True)]
    if strides[-1] != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in strides[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, block_n, block_d])


def _block_sizes_for(n: int, n_blocks: int, at_least: bool = False) -> list[int]:
    """The accepted block sizes that cut ``n`` rows into ``n_blocks`` blocks (or at least that many)."""
    sizes = [1 << i for i in range(MIN_TILE.bit_length() - 1, MAX_BLOCK.bit_length())]
    return [p for p in sizes if (-(-n // p) >= n_blocks if at_least else -(-n // p) == n_blocks)]


def _check_index(
    full_blocks, full_count, part_blocks, part_count, columns, column_count, b, hq, nq, nk, block_m, block_n
):  # fmt: skip
    """The index's shapes against the op's: batch, heads, query blocks (Nq / block_m) and a list no
    longer than Nk / block_n. Block sizes travel as the op's arguments, not with the index: an
    index built for other block sizes is refused where its shapes tell (they do unless the lengths
    fit in one block of both sizes)."""
    n_qb, n_kb = -(-nq // block_m), -(-nk // block_n)
    rows = full_count.shape[2] if full_count.dim() == 3 else None
    if rows is not None and rows != n_qb:
        built = _block_sizes_for(nq, rows)
        built = f"block_m={built[0]}" if len(built) == 1 else f"block_m in {built}" if built else "no block_m"
        raise ValueError(
            f"the sparse index has {rows} query blocks, as Nq={nq} has with {built}; the op was called with "
            f"block_m={block_m} ({n_qb} query blocks): build the index with the op's block sizes"
        )
    if full_blocks.dim() == 4 and full_blocks.shape[-1] > n_kb:
        width = full_blocks.shape[-1]
        built = _block_sizes_for(nk, width, at_least=True)
        built = f"block_n <= {built[-1]}" if built else "a smaller block_n"
        raise ValueError(
            f"the sparse index lists up to {width} key blocks per query block, but Nk={nk} has {n_kb} with "
            f"block_n={block_n}: it was built for {built}; build the index with the op's block sizes"
        )

    def fits(lists, counts, shared_rows=False):
        return (
            lists.dim() == 4
            and (lists.shape[2] == n_qb or (shared_rows and lists.shape[2] == 1))
            and lists.shape[1] in (1, hq)
            and lists.shape[0] in (1, b)
            and counts.shape[:2] == lists.shape[:2]
            and counts.shape[2] == n_qb
        )

    ok = fits(full_blocks, full_count) and fits(part_blocks, part_count) and full_blocks.shape == part_blocks.shape
    if columns is not None:
        ok = ok and column_count is not None and fits(columns, column_count, shared_rows=True)
    if not ok:
        shapes = [
            tuple(t.shape)
            for t in (full_blocks, full_count, part_blocks, part_count, columns, column_count)
            if t is not None
        ]
        raise ValueError(f"sparse index shapes {shapes} do not fit B={b}, Hq={hq}, {n_qb} query blocks of {block_m}")


def _check_index_values(blocks, count, n_k: int, block_n: int, name: str) -> None:
    """Counts within the lists and listed ids inside the keys: the reference's data check, when it
    runs eagerly (traced into a compiled graph, as Inductor does with this op's body, it would need
    the values on the host; the kernel cannot afford it either: it would read past the lists)."""
    if torch.compiler.is_compiling() or is_fake(count) or is_fake(blocks):
        return
    width, n_kb = blocks.shape[-1], -(-n_k // block_n)
    most = int(count.max()) if count.numel() else 0
    if most > width:
        raise ValueError(
            f"{name}_count {most} exceeds the list length {width}: the index overflowed its bound "
            "(blocks past the list would be dropped)"
        )
    listed = blocks[torch.arange(width, device=blocks.device) < count[..., None]]
    if listed.numel() and (int(listed.min()) < 0 or int(listed.max()) >= n_kb):
        bad = int(listed.max()) if int(listed.max()) >= n_kb else int(listed.min())
        raise ValueError(
            f"{name}_blocks lists key block {bad}, but Nk={n_k} has {n_kb} key blocks of block_n={block_n} "
            "(was the index built for a smaller block_n?)"
        )


# fmt: off
def sparse_attention_triton(
    q, k, v, q_pos, k_pos, key_ok, full_blocks, full_count, part_blocks, part_count, columns, column_count,
    head_sink, head_window, scale: float, causal: bool, window: int, softcap: float, block_m: int, block_n: int,
    tile_n: int = 0, num_warps: int = 0, num_stages: int = 0, tma: int = -1, tile_m: int = 0,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> torch.Tensor:
    # fmt: on
    """Launch the kernel. ``tma``: 1 = K/V tiles by tensor descriptors (error if they cannot be
    made), 0 = by pointers, -1 = descriptors where the GPU and layout allow. ``out`` lets tests pass a
    poisoned buffer to prove every element is written (and callers an fp32 one); ``lse``, a
    contiguous float32 (B, Hq, Nq) tensor, receives each row's log-sum-exp of its kept scores."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    check_kernel_options(block_m, block_n, tile_n, num_warps, num_stages, tma, tile_m)
    index = (full_blocks, full_count, part_blocks, part_count, columns, column_count)
    _check_index(*index, b, hq, nq, nk, block_m, block_n)
    if out is None:
        out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    if lse is not None and (lse.shape != (b, hq, nq) or lse.dtype != torch.float32 or not lse.is_contiguous()):
        got = f"{lse.dtype} {tuple(lse.shape)}"
        raise ValueError(f"lse must be a contiguous float32 ({b}, {hq}, {nq}) tensor; got {got}")
    # The kernel reads these small tensors with unit last-dim stride and one stride set per pair
    # (compiled graphs may hand them over in other layouts): make that true, cheaply.
    q_pos, k_pos, head_sink, head_window = (t.contiguous() for t in (q_pos, k_pos, head_sink, head_window))
    full_blocks, full_count, part_blocks, part_count = (
        t.contiguous() for t in (full_blocks, full_count, part_blocks, part_count)
    )
    if columns is not None:
        columns, column_count = columns.contiguous(), column_count.contiguous()
    key_ok = key_ok.contiguous() if key_ok is not None else None
    key_start = first_valid_key(key_ok, q.device)
    cols, col_count = (columns, column_count) if columns is not None else (full_blocks, full_count)  # unread
    smem = _shared_memory_bytes(q.device) if q.is_cuda else _SHARED_MEMORY_BYTES
    cfg = launch_config(d, block_m, block_n, tile_n, num_warps, num_stages, tile_m, q.element_size(), smem)
    block_d = max(16, triton.next_power_of_2(d))
    desc_k = desc_v = None
    if tma != 0:
        desc_k, desc_v = (_tma_descriptor(t, cfg["BLOCK_N"], block_d) for t in (k, v))
        if tma == 1 and (desc_k is None or desc_v is None):
            raise ValueError("tma=1 but K/V cannot be read by tensor descriptors on this device and layout")
    use_tma = desc_k is not None and desc_v is not None
    _sparse_attention_fwd[(triton.cdiv(nq, cfg["BLOCK_M"]), b * hq)](
        q,
        k,
        v,
        desc_k if use_tma else k,  # unread without TMA
        desc_v if use_tma else v,
        out,
        lse if lse is not None else out,  # unwritten without RETURN_LSE
        q_pos,
        k_pos,
        key_ok.view(torch.uint8) if key_ok is not None else key_start,
        key_start,
        full_blocks,
        full_count,
        part_blocks,
        part_count,
        cols,
        col_count,
        head_sink,
        head_window,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        _batch_stride(q_pos),
        _batch_stride(k_pos),
        _batch_stride(key_ok) if key_ok is not None else 0,
        _batch_stride(key_start),
        _batch_stride(full_blocks),
        _batch_stride(full_blocks, 1),
        full_blocks.stride(2),
        _batch_stride(full_count),
        _batch_stride(full_count, 1),
        _batch_stride(cols),
        _batch_stride(cols, 1),
        _batch_stride(cols, 2),
        _batch_stride(col_count),
        _batch_stride(col_count, 1),
        hq,
        nq,
        nk,
        hq // hkv,
        scale * LOG2E,
        softcap,
        window,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        CAUSAL=causal,
        HAS_WINDOW=window > 0,
        HAS_KEY_OK=key_ok is not None,
        HAS_SOFTCAP=softcap > 0,
        HAS_COLUMNS=columns is not None,
        IEEE=q.dtype == torch.float32,
        USE_TMA=use_tma,
        RETURN_LSE=lse is not None,
        **cfg,
    )
    return out


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_CHUNK_ELEMENTS = 1 << 26  # scores held at once by the reference: 256 MiB of fp32


def check_head_dim(head_dim: int) -> str | None:
    """Why a head dimension cannot run, or None. Non powers of two are padded by the kernel."""
    if head_dim < 16 or head_dim > _MAX_HEAD_DIM or head_dim % 8:
        return f"head_dim={head_dim}; supported: multiples of 8 from 16 to {_MAX_HEAD_DIM}"
    return None


def _check_inputs(q, k, v, q_pos, k_pos, key_ok, head_sink, head_window):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or v.shape[:3] != k.shape[:3] or k.shape[-1] != d:
        raise ValueError(f"k/v shapes {tuple(k.shape)} / {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({k.shape[1]})")
    if v.shape[-1] != d:
        raise ValueError(f"value head_dim {v.shape[-1]} differs from query head_dim {d}; not supported")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"dtypes q={q.dtype} k={k.dtype} v={v.dtype}; supported: one of {SUPPORTED_DTYPES}")
    if (reason := check_head_dim(d)) is not None:
        raise ValueError(reason)
    check_keys(k.shape[2], key_ok)
    positions_fit = all(p.dim() == 2 and p.shape[0] in (1, b) for p in (q_pos, k_pos))
    if not positions_fit or q_pos.shape[-1] != nq or k_pos.shape[-1] != k.shape[2]:
        raise ValueError(
            f"positions {tuple(q_pos.shape)} / {tuple(k_pos.shape)} do not fit (B or 1, Nq={nq}) / "
            f"(B or 1, Nk={k.shape[2]})"
        )
    if key_ok is not None and key_ok.shape[0] not in (1, b):
        raise ValueError(f"key_ok {tuple(key_ok.shape)} does not fit (B={b} or 1, Nk={k.shape[2]})")
    if head_sink.numel() != hq or head_window.numel() != hq:
        raise ValueError(f"per-head rules have {head_sink.numel()} / {head_window.numel()} entries; Hq={hq}")


def structure_pairs(q_pos_rows, k_pos, key_ok, *, causal: bool, window: int) -> torch.Tensor:
    """The model's own mask (causal, window, padding) for some query rows: (B', 1, rows, Nk)."""
    qp = q_pos_rows[:, None, :, None].to(torch.int64)
    kp = k_pos[:, None, None, :].to(torch.int64)
    keep = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q_pos_rows.device)
    if causal:
        keep = keep & (kp <= qp)
    if window > 0:
        keep = keep & (qp - kp < window)
    if key_ok is not None:
        keep = keep & key_ok[:, None, None, :]
    return keep


def local_pairs(q_pos_rows, k_pos, start, head_sink, head_window) -> torch.Tensor:
    """Each head's local rule (sinks counted from the first existing key, or its window):
    (B', Hq, rows, Nk). It applies to listed blocks, not to listed columns."""
    qp = q_pos_rows[:, None, :, None].to(torch.int64)
    kp = k_pos[:, None, None, :].to(torch.int64)
    w = head_window.to(torch.int64)[None, :, None, None]
    s = head_sink.to(torch.int64)[None, :, None, None]
    key_idx = torch.arange(k_pos.shape[-1], device=k_pos.device)[None, None, None, :]
    return (w <= 0) | (qp - kp < w) | (key_idx - start[:, None, None, None] < s)


def kept_pairs(q_pos_rows, k_pos, key_ok, start, head_sink, head_window, *, causal: bool, window: int) -> torch.Tensor:
    """Structure mask and per-head local rule for some query rows: (B', Hq, rows, Nk) bool."""
    return structure_pairs(q_pos_rows, k_pos, key_ok, causal=causal, window=window) & local_pairs(
        q_pos_rows, k_pos, start, head_sink, head_window
    )


def _listed(blocks, count, n_k_blocks):
    """(B', Hq, nQB, L) lists → (B', Hq, nQB, nKB) membership."""
    slot = torch.arange(blocks.shape[-1], device=blocks.device)
    ids = torch.where(slot < count[..., None], blocks.to(torch.int64), n_k_blocks)
    member = torch.zeros(*blocks.shape[:-1], n_k_blocks + 1, dtype=torch.bool, device=blocks.device)
    return member.scatter_(-1, ids, True)[..., :n_k_blocks]


def _listed_columns(columns, column_count, qbs, n_k):
    """Columns listed for the query blocks ``qbs``: (B', Hq, len(qbs), Nk) membership."""
    cols, count = columns[:, :, qbs.clamp_max(columns.shape[2] - 1)], column_count[:, :, qbs]
    slot = torch.arange(cols.shape[-1], device=cols.device)
    ids = torch.where(slot < count[..., None], cols.to(torch.int64).clamp(0, n_k), n_k)
    member = torch.zeros(*cols.shape[:-1], n_k + 1, dtype=torch.bool, device=cols.device)
    return member.scatter_(-1, ids, True)[..., :n_k]


def index_pairs(
    q_pos, k_pos, key_ok, full_blocks, full_count, part_blocks, part_count, columns, column_count,
    head_sink, head_window, *, causal: bool, window: int, block_m: int, block_n: int,
):  # fmt: skip
    """The kept pairs of a sparse index, for query rows on demand: returns ``rows(r0, r1)`` ->
    (B', Hq, r1 - r0, Nk) bool (never all Nq rows at once). Raises if a listed column lies inside
    a listed block of its query block (the kernel would count it twice)."""
    nk = k_pos.shape[-1]
    n_kb = -(-nk // block_n)
    listed = _listed(full_blocks, full_count, n_kb) | _listed(part_blocks, part_count, n_kb)
    start = first_valid_key(key_ok, k_pos.device)

    def rows(r0: int, r1: int) -> torch.Tensor:
        qbs = torch.arange(r0, r1, device=k_pos.device) // block_m
        in_index = listed[:, :, qbs].repeat_interleave(block_n, dim=-1)[..., :nk]
        keep = in_index & local_pairs(q_pos[:, r0:r1], k_pos, start, head_sink, head_window)
        if columns is not None:
            in_columns = _listed_columns(columns, column_count, qbs, nk)
            if (in_columns & in_index).any():
                raise ValueError("a listed column lies inside a listed block of the same query block")
            keep = keep | in_columns
        return keep & structure_pairs(q_pos[:, r0:r1], k_pos, key_ok, causal=causal, window=window)

    return rows


# fmt: off
def sparse_attention_reference(
    q, k, v, q_pos, k_pos, key_ok, full_blocks, full_count, part_blocks, part_count, columns, column_count,
    head_sink, head_window, scale: float, causal: bool, window: int, softcap: float, block_m: int, block_n: int,
    out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
) -> torch.Tensor:
    # fmt: on
    """Plain PyTorch semantics of ``sparse_attention`` (fp32 math), chunked over query rows; ``out``
    and ``lse`` as the kernel's launcher takes them.

    Columns must not fall inside a listed block of the same query block (the kernel would count
    them twice); this is the index builders' invariant, and the reference checks it."""
    _check_inputs(q, k, v, q_pos, k_pos, key_ok, head_sink, head_window)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    groups = hq // hkv
    index = (full_blocks, full_count, part_blocks, part_count, columns, column_count)
    _check_index(*index, b, hq, nq, nk, block_m, block_n)
    _check_index_values(full_blocks, full_count, nk, block_n, "full")
    _check_index_values(part_blocks, part_count, nk, block_n, "part")
    kept_rows = index_pairs(
        q_pos, k_pos, key_ok, full_blocks, full_count, part_blocks, part_count, columns, column_count,
        head_sink, head_window, causal=causal, window=window, block_m=block_m, block_n=block_n,
    )  # fmt: skip
    kf = k.float()[:, :, None]  # (B, Hkv, 1, Nk, D)
    vf = v.float()[:, :, None]
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=q.device) if out is None else out
    rows_per_chunk = max(block_m, (_CHUNK_ELEMENTS // max(1, b * hq * nk)) // block_m * block_m)
    for r0 in range(0, nq, rows_per_chunk):
        r1 = min(nq, r0 + rows_per_chunk)
        qc = q[:, :, r0:r1].float().view(b, hkv, groups, r1 - r0, d)
        s = (qc @ kf.transpose(-1, -2)).view(b, hq, r1 - r0, nk) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        keep = kept_rows(r0, r1)
        s = s.masked_fill(~keep, float("-inf"))
        # A row that keeps nothing has max -inf: shift by a finite number instead, so p = 0 there.
        # (clamp_min and the division propagate NaN: a NaN or inf in a kept score stays NaN, as in
        # the kernel and SDPA; only an exact zero sum, no kept key, gives zeros.)
        row_max = s.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
        p = torch.exp(s - row_max)
        denom = p.sum(-1, keepdim=True)
        o = (p.view(b, hkv, groups, r1 - r0, nk) @ vf).view(b, hq, r1 - r0, d)
        out[:, :, r0:r1] = torch.where(denom == 0, 0.0, o / denom).to(out.dtype)
        if lse is not None:
            lse[:, :, r0:r1] = (row_max + denom.log()).squeeze(-1)  # log(0) = -inf: no key kept
    return out


@torch.library.custom_op("sparsecomp::sparse_attention", mutates_args=())
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None,
    full_blocks: torch.Tensor,
    full_count: torch.Tensor,
    part_blocks: torch.Tensor,
    part_count: torch.Tensor,
    columns: torch.Tensor | None,
    column_count: torch.Tensor | None,
    head_sink: torch.Tensor,
    head_window: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    softcap: float,
    block_m: int,
    block_n: int,
    tile_n: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
    tma: int = -1,
    tile_m: int = 0,
) -> torch.Tensor:
    """Block-sparse attention (see the notation above): the Triton kernel on CUDA, the reference
    elsewhere. ``tile_n``, ``num_warps``, ``num_stages``, ``tma``, ``tile_m`` tune the kernel
    (0 / -1 = default); they never change the result."""
    args = (
        q,
        k,
        v,
        q_pos,
        k_pos,
        key_ok,
        full_blocks,
        full_count,
        part_blocks,
        part_count,
        columns,
        column_count,
        head_sink,
        head_window,
        scale,
        causal,
        window,
        softcap,
        block_m,
        block_n,
    )
    check_kernel_options(block_m, block_n, tile_n, num_warps, num_stages, tma, tile_m)  # on every device alike
    if q.is_cuda:
        _check_inputs(q, k, v, q_pos, k_pos, key_ok, head_sink, head_window)
        return sparse_attention_triton(
            *args, tile_n, num_warps, num_stages, tma, tile_m
        )
    return sparse_attention_reference(*args)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, *args):
    return q.new_empty(q.shape)


def sparse_attention_with_lse(q, k, v, index: SparseIndex, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_attention_call``'s attention as float32 (B, Hq, Nq, D), and each row's log-sum-exp
    of its kept scores (B, Hq, Nq), -inf where it keeps no key: attention over several key sets is
    then merged exactly (``merge_attention``). The kernel on CUDA, the reference elsewhere (an
    eager call: context parallelism's op runs it)."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    args = _call_arguments(q, k, v, index, **kwargs)
    if q.is_cuda:
        _check_inputs(*args[:6], *args[12:14])
        sparse_attention_triton(*args, out=out, lse=lse)
    else:
        sparse_attention_reference(*args[:20], out=out, lse=lse)
    return out, lse


def merge_attention(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Attention over the union of disjoint key sets from each set's (float32 output, log-sum-exp):
    each output weighed by its share of the softmax mass; zeros for rows that keep no key."""
    top = torch.stack(lses).amax(0)
    top = top.where(torch.isfinite(top), 0.0)
    weights = [torch.exp(lse - top) for lse in lses]
    total = sum(weights)
    merged = sum(w[..., None] * o for w, o in zip(weights, outs, strict=True))
    return torch.where(total[..., None] > 0, merged / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None], 0.0)


def _call_arguments(q, k, v, index: SparseIndex, *, q_pos, k_pos, key_ok=None, head_sink=None, head_window=None,
                    scale=None, causal: bool, window: int = 0, softcap: float = 0.0,
                    options: KernelOptions | None = None) -> tuple:  # fmt: skip
    """The raw op's arguments for ``sparse_attention_call``'s keywords."""
    if options is None:
        options = KernelOptions(block_m=index.block_m, block_n=index.block_n)
    if (index.block_m, index.block_n) != (options.block_m, options.block_n):
        raise ValueError(
            f"the index has block_m={index.block_m}, block_n={index.block_n} but the kernel options have "
            f"block_m={options.block_m}, block_n={options.block_n}: build the index with the options' block sizes"
        )
    if head_sink is None or head_window is None:
        zeros = torch.zeros(q.shape[1], dtype=torch.int32, device=q.device)
        head_sink = zeros if head_sink is None else head_sink
        head_window = zeros if head_window is None else head_window
    o = options
    return (
        q, k, v, q_pos, k_pos, key_ok, *index.tensors, head_sink, head_window,
        q.shape[-1] ** -0.5 if scale is None else scale, causal, window, softcap,
        o.block_m, o.block_n, o.tile_n, o.num_warps, o.num_stages, o.tma, o.tile_m,
    )  # fmt: skip


def sparse_attention_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    key_ok: torch.Tensor | None = None,
    head_sink: torch.Tensor | None = None,
    head_window: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool,
    window: int = 0,
    softcap: float = 0.0,
    options: KernelOptions | None = None,
) -> torch.Tensor:
    """Block-sparse attention of q, k, v over ``index``: the one caller of the raw op.

    The structure (positions, padding ``key_ok``, ``causal``, ``window``, ``softcap``) and the
    heads' local rules (``head_sink``, ``head_window``: (Hq,) int32, None = none) say what is kept
    inside the listed blocks; ``options`` says how the kernel runs (None: its defaults at the
    index's block sizes); ``scale`` None is head_dim ** -0.5, as in SDPA. In an FX graph, call it
    with the index as one node (a builder's output): nodes inside dataclasses are not seen by FX."""
    args = _call_arguments(
        q, k, v, index, q_pos=q_pos, k_pos=k_pos, key_ok=key_ok, head_sink=head_sink, head_window=head_window,
        scale=scale, causal=causal, window=window, softcap=softcap, options=options,
    )  # fmt: skip
    return sparse_attention(*args)
