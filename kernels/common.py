"""How the sparse attention kernel runs, never what it keeps: ``KernelOptions`` and its validation.

Like FlexAttention's ``kernel_options``: launch choices only. The block sizes of the sparse index
are also here because a launch needs them, but the index carries its own (``SparseIndex.block_m``,
``block_n``) and ``sparse_attention_call`` refuses options that disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

# What the launcher accepts (``check_kernel_options``; KernelOptions checks the same on any device).
MIN_TILE = 16  # tl.dot's smallest tile side
MAX_TILE = 256  # query / key rows per program: a 256-row tile already needs 2 stages at head_dim 128 (H100)
MAX_BLOCK = 1024  # index block sizes: a key block is walked as block_n / tile_n unrolled tiles
NUM_WARPS = (0, 1, 2, 4, 8, 16, 32)  # 0 = default; Triton: a power of two, at most 1024 threads
TMA_MODES = (-1, 0, 1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _power_of_two(value) -> bool:
    return _is_int(value) and value > 0 and not value & (value - 1)


def check_kernel_options(
    block_m: int, block_n: int, tile_n: int = 0, num_warps: int = 0, num_stages: int = 0, tma: int = -1,
    tile_m: int = 0, *, owner: str = "",
) -> None:  # fmt: skip
    """Raise ValueError, naming the field, its value and what is accepted, unless the launcher can
    take these options: its static requirements, checked the same on every device (the op on CPU,
    ``KernelOptions``). Whether the tiles fit a GPU's shared memory and registers at a given
    head_dim and dtype is only known there (Triton raises OutOfResources)."""

    def fail(name, value, accepted):
        raise ValueError(f"{owner}{name}={value!r}; accepted: {accepted}")

    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if not (_power_of_two(value) and MIN_TILE <= value <= MAX_BLOCK):
            fail(name, value, f"a power of two from {MIN_TILE} to {MAX_BLOCK}")
    for name, value, block, size in (("tile_m", tile_m, "block_m", block_m), ("tile_n", tile_n, "block_n", block_n)):
        # tiles divide their block: with power-of-two blocks, any power of two up to the block
        most = min(MAX_TILE, size)
        if not _is_int(value) or (value and not (_power_of_two(value) and MIN_TILE <= value <= most)):
            fail(name, value, f"0 (the default) or a power of two from {MIN_TILE} to {most} (<= {block}={size})")
    if not tile_m and block_m > MAX_TILE:
        fail("tile_m", tile_m, f"a power of two from {MIN_TILE} to {MAX_TILE}: the default (block_m={block_m}) is "
             f"above the largest query tile")  # fmt: skip
    if not (_is_int(num_warps) and num_warps in NUM_WARPS):
        fail("num_warps", num_warps, f"one of {NUM_WARPS} (0 = the default)")
    if not (_is_int(num_stages) and num_stages >= 0):
        fail("num_stages", num_stages, "0 (the default) or a positive integer")
    if not (_is_int(tma) and tma in TMA_MODES):
        fail("tma", tma, f"one of {TMA_MODES} (-1 = where the GPU allows, 0 = off, 1 = required)")


@dataclass(frozen=True)
class KernelOptions:
    """How the kernel runs, never what it keeps: block sizes of the sparse index, and the Triton
    key tile, warps and pipeline stages (0 = the kernel's default for the head_dim), K/V loads by
    tensor descriptors (-1 = where the GPU allows, 0 = off, 1 = required), and the query rows per
    program (a divisor of block_m; 0 = block_m)."""

    block_m: int = 128
    block_n: int = 128
    tile_n: int = 0
    num_warps: int = 0
    num_stages: int = 0
    tma: int = -1
    tile_m: int = 0

    def __post_init__(self):
        """Refuse, on any device, what the Triton launcher would refuse (one check serves both):
        ValueError naming the field, its value and the accepted range. Integers of other types
        (NumPy's) are taken as Python ints; bools, floats and strings are refused."""
        names = ("block_m", "block_n", "tile_n", "num_warps", "num_stages", "tma", "tile_m")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, Integral) and not isinstance(value, bool | int):
                object.__setattr__(self, name, int(value))
        check_kernel_options(*(getattr(self, name) for name in names), owner="KernelOptions.")
