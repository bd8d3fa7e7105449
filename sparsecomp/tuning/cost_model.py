"""The cost model: predicted time of each way to run an attention site, on this GPU.

Options for a site: ``dense`` (the original attention, kept: SDPA's fused kernel, or its masked
path when the site carries a mask tensor) or our sparse kernel under one of the kernel configs
(``KERNEL_CONFIGS``), plus the index builders it needs.

Roofline form, per engine (dense SDPA, SDPA with a mask, each kernel config), with coefficients
fitted per GPU and head_dim by a short micro-benchmark (``sparsecomp.tuning.autotune.fit_cost_model``):

    t = c_launch + c_compute * max(T / S, L) * BM * BN * Dp          (tensor-core work per SM)
                 + c_mask * (M / S) * BM * BN                          (element masks)
                 + c_program * ceil(P / S) * BM * Dp                   (Q loads, output stores)

T = blocks computed over all programs (gathered column tiles count as blocks), L = blocks of the
longest program, M = blocks that need an element mask, P = programs, S = the GPU's SMs,
Dp = head_dim padded to a power of two. ``max(T / S, L)`` is the parallel time in blocks: the work
per SM, or the longest program when there are few. Index building:

    t_index = i_launch + i_work * W_kind          (W: the builder's dominant element count)

Everything a prediction needs from the site is in ``Workload`` and ``BlockCounts``; static rules'
block counts are exact (closed form, equal to ``build_block_index``), adaptive rules' come from the
plan's calibration (measured density) or else a stated upper bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from sparsecomp.passes.rewrite import KernelOptions

from ..patterns import PATTERNS
from ..patterns.local import local_rule_block_counts
from ..plan import Rule

# Named kernel configs the autotuner and the cost model choose among (FlexAttention style: how the
# kernel runs, never what it keeps). Block sizes change the index granularity, so configs with other
# block sizes only serve sites whose rules are exact at any block size (static rules).
KERNEL_CONFIGS: dict[str, KernelOptions] = {
    "b128": KernelOptions(),  # the defaults: 128 x 128 tiles, 8 warps, 3 stages (H100 sweep)
    "b128-n64-w4": KernelOptions(tile_n=64, num_warps=4),  # smaller key tile: less work wasted per block
    "b128-m64-w4": KernelOptions(tile_m=64, num_warps=4),  # two programs per query block: more parallel
    "b64": KernelOptions(block_m=64, block_n=64, num_warps=4),  # finer blocks: tighter windows, less waste
}
DEFAULT_CONFIG = "b128"
DENSE = "dense"
# A sparse option must be predicted this much faster than dense to be chosen: within it the model's
# error decides (median 3-4%, benchmarks/results/cost_model.md), and dense is exact and robust.
DENSE_MARGIN = 0.03


def ranked(times: dict[str, float]) -> list[str]:
    """Option names best first by time, dense's time reduced by ``DENSE_MARGIN``."""
    return sorted(times, key=lambda o: (times[o] * (1 - DENSE_MARGIN) if o == DENSE else times[o], o != DENSE))


ENGINE_FEATURES = ("launch", "compute", "mask", "program")
INDEX_FEATURES = ("launch", "work")


@dataclass(frozen=True)
class Workload:
    """The shape of one attention call."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str = "bfloat16"
    causal: bool = True
    masked: bool = False  # the original site carries a mask tensor: dense SDPA takes its masked path

    @property
    def padded_dim(self) -> int:
        return max(16, 1 << (self.head_dim - 1).bit_length())


@dataclass(frozen=True)
class BlockCounts:
    """What the kernel computes for one call, summed over (batch, head, query block)."""

    block_m: int
    block_n: int
    full: float  # blocks computed without an element mask
    part: float  # blocks computed with it
    longest: float  # blocks of the busiest query block (one program's work)
    programs: int
    tile_m: int  # query rows per program (a divisor of block_m)

    @property
    def blocks(self) -> float:
        return self.full + self.part

    def density(self, w: Workload) -> float:
        """Computed fraction of the causal (or full) block pairs."""
        if w.causal:
            pairs = float(causal_row_blocks(w, self.block_m, self.block_n).sum())
        else:
            pairs = -(-w.q_len // self.block_m) * -(-w.kv_len // self.block_n)
        return self.blocks / max(1.0, pairs * w.batch * w.q_heads)


def causal_row_blocks(w: Workload, block_m: int, block_n: int) -> torch.Tensor:
    """Key blocks each query block sees under the causal mask (queries are the last q_len keys)."""
    last_key = torch.arange(-(-w.q_len // block_m)) * block_m + block_m - 1 + w.kv_len - w.q_len
    return torch.clamp(last_key // block_n + 1, max=-(-w.kv_len // block_n)).float()


def static_block_counts(w: Workload, rules: list[Rule], options: KernelOptions, site_window: int = 0) -> BlockCounts:
    """Exact counts for static rules (dense, streaming, elastic) over every head."""
    full = part = 0.0
    longest = 0.0
    cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for rule in rules:
        sink, window = rule.head_params(w.kv_len)
        if (sink, window) not in cache:
            cache[(sink, window)] = local_rule_block_counts(
                w.q_len, w.kv_len, sink, window, block_m=options.block_m, block_n=options.block_n,
                causal=w.causal, site_window=site_window,
            )  # fmt: skip
        f, p = cache[(sink, window)]
        full += float(f.sum())
        part += float(p.sum())
        longest = max(longest, float((f + p).max()))
    return _counts(w, options, full * w.batch, part * w.batch, longest)


def _counts(w: Workload, options: KernelOptions, full: float, part: float, longest: float) -> BlockCounts:
    tile_m = options.tile_m or options.block_m
    programs = w.batch * w.q_heads * -(-w.q_len // tile_m)
    return BlockCounts(options.block_m, options.block_n, full, part, longest, programs, tile_m)


def adaptive_head_blocks(rule: Rule, w: Workload, options: KernelOptions, density: float | None) -> torch.Tensor:
    """Blocks per query block of one head with an adaptive rule: the calibrated ``density`` of the
    causal blocks where the plan measured one, else an upper bound from the rule's budget."""
    bn = options.block_n
    causal = causal_row_blocks(w, options.block_m, bn)
    if density is not None:
        return torch.maximum(torch.ones_like(causal), causal * density)
    bound = PATTERNS[rule.kind].block_bound
    return causal if bound is None else torch.minimum(causal, bound(rule, causal, bn))


def site_block_counts(
    w: Workload, rules: list[Rule], options: KernelOptions, densities: list[float] | None = None, site_window: int = 0
) -> BlockCounts:
    """Counts for a site's per-head rules: exact for static heads, estimated for adaptive ones.
    ``densities``: the calibrated density of each head, where the plan measured it."""
    static = [r for r in rules if not r.adaptive]
    counts = static_block_counts(w, static, options, site_window) if static else None
    full = counts.full if counts else 0.0
    part = counts.part if counts else 0.0
    longest = counts.longest if counts else 0.0
    for h, rule in enumerate(rules):
        if rule.adaptive:
            blocks = adaptive_head_blocks(rule, w, options, densities[h] if densities else None)
            diagonal = float(blocks.numel())  # the diagonal block of each query block needs a mask
            part += diagonal * w.batch
            full += float(blocks.sum() - diagonal) * w.batch
            longest = max(longest, float(blocks.max()))
    return _counts(w, options, full, part, longest)


def dense_counts(w: Workload, block: int = 128) -> BlockCounts:
    """What a fused dense kernel (SDPA) computes: every causal block, the diagonal ones masked; with
    a mask tensor, every block (masked)."""
    options = KernelOptions(block_m=block, block_n=block)
    if w.masked:
        n_qb, n_kb = -(-w.q_len // block), -(-w.kv_len // block)
        total = float(n_qb * n_kb * w.batch * w.q_heads)
        return _counts(w, options, 0.0, total, float(n_kb))
    return static_block_counts(w, [Rule()] * w.q_heads, options)


def engine_features(w: Workload, counts: BlockCounts, sms: int) -> list[float]:
    """ENGINE_FEATURES of one call (see the module notes), in units of 1e9 elements."""
    tile = counts.tile_m * counts.block_n  # one program's share of a block
    tiles = counts.blocks * (counts.block_m // counts.tile_m)
    return [
        1.0,
        max(tiles / sms, counts.longest) * tile * w.padded_dim * 1e-9,
        counts.part * (counts.block_m // counts.tile_m) / sms * tile * 1e-9,
        math.ceil(counts.programs / sms) * counts.tile_m * w.padded_dim * 1e-9,
    ]


def index_work(kind: str, w: Workload, rule: Rule | None, block: int) -> float:
    """The element count that dominates an index builder's time (see the module notes)."""
    n_qb, n_kb = -(-w.q_len // block), -(-w.kv_len // block)
    blocks = w.batch * w.q_heads * n_qb * n_kb
    if kind == "static":
        return w.batch * n_qb * n_kb * 1.0  # uniform rules share one head (the usual case)
    pattern = PATTERNS.get(kind)
    if pattern is None or pattern.index_work is None:
        raise ValueError(f"no index builder {kind!r}; known: static, {[k for k, p in PATTERNS.items() if p.adaptive]}")
    return pattern.index_work(rule or Rule(kind), w, blocks)


@dataclass
class Prediction:
    option: str  # DENSE or a KERNEL_CONFIGS name
    ms: float
    kernel_ms: float
    index_ms: float


class CostModel:
    """Fitted coefficients of one GPU: ``engines[name][head_dim]`` -> ENGINE_FEATURES coefficients
    (names: "sdpa", "sdpa_masked", and the KERNEL_CONFIGS names), ``index[kind]`` -> INDEX_FEATURES
    coefficients, ``sms``: the GPU's multiprocessors; ``info``: where they came from; ``decode``: the
    decode-step model (``decode_cost.DecodeCostModel``) or None."""

    def __init__(self, engines: dict, index: dict, sms: int, info: dict | None = None, decode=None):
        self.engines = {name: {int(d): list(c) for d, c in by_dim.items()} for name, by_dim in engines.items()}
        self.index = {kind: list(c) for kind, c in index.items()}
        self.sms = sms
        self.info = dict(info or {})
        self.decode = decode
        self._crossovers: dict[tuple, int | None] = {}  # every layer of a model asks the same question

    def _coefficients(self, engine: str, head_dim: int) -> list[float]:
        """Coefficients fitted at the nearest head_dim (the features scale with the padded head_dim,
        so a head_dim never fitted borrows its neighbour's rates)."""
        by_dim = self.engines.get(engine)
        if not by_dim:
            raise KeyError(f"no coefficients for {engine!r}; fitted: {sorted(self.engines)}")
        padded = max(16, 1 << (head_dim - 1).bit_length())
        nearest = min(by_dim, key=lambda d: (abs(math.log2(d) - math.log2(padded)), -d))
        return by_dim[nearest]

    def engine_for(self, name: str, options: KernelOptions) -> str:
        """The fitted engine of a config: its own, or one with the same options (a user's forced
        kernel_options), or else the default config's rates."""
        if name in self.engines:
            return name
        same = [n for n, o in KERNEL_CONFIGS.items() if o == options and n in self.engines]
        return same[0] if same else DEFAULT_CONFIG

    def kernel_ms(self, engine: str, w: Workload, counts: BlockCounts) -> float:
        coef = self._coefficients(engine, w.head_dim)
        return sum(c * f for c, f in zip(coef, engine_features(w, counts, self.sms), strict=True))

    def dense_ms(self, w: Workload) -> float:
        return self.kernel_ms("sdpa_masked" if w.masked else "sdpa", w, dense_counts(w))

    def index_ms(self, kind: str, w: Workload, rule: Rule | None, block: int) -> float:
        coef = self.index.get(kind)
        if coef is None:
            return 0.0
        return coef[0] + coef[1] * index_work(kind, w, rule, block) * 1e-9

    def sparse_ms(
        self, config: str, w: Workload, rules: list[Rule], options: KernelOptions,
        densities: list[float] | None = None, static_share: int = 1, site_window: int = 0,
    ) -> Prediction:  # fmt: skip
        """Kernel plus index building; the static index is shared by ``static_share`` sites (every
        layer of a model usually shares one), so each pays its share."""
        counts = site_block_counts(w, rules, options, densities, site_window)
        kernel = self.kernel_ms(self.engine_for(config, options), w, counts)
        index = 0.0
        if any(not r.adaptive for r in rules):
            index += self.index_ms("static", w, None, options.block_m) / max(1, static_share)
        for kind in dict.fromkeys(r.kind for r in rules if r.adaptive):
            index += self.index_ms(kind, w, next(r for r in rules if r.kind == kind), options.block_m)
        return Prediction(config, kernel + index, kernel, index)

    def predictions(
        self, w: Workload, rules: list[Rule], configs: dict[str, KernelOptions],
        densities: list[float] | None = None, static_share: int = 1, site_window: int = 0,
    ) -> list[Prediction]:  # fmt: skip
        """Every option, best first (``ranked``: dense wins unless beaten by ``DENSE_MARGIN``)."""
        dense = self.dense_ms(w)
        preds = [Prediction(DENSE, dense, dense, 0.0)]
        for name, options in configs.items():
            preds.append(self.sparse_ms(name, w, rules, options, densities, static_share, site_window))
        order = ranked({p.option: p.ms for p in preds})
        return sorted(preds, key=lambda p: order.index(p.option))

    def crossover(
        self, w: Workload, rules: list[Rule], configs: dict[str, KernelOptions],
        densities: list[float] | None = None, static_share: int = 1, site_window: int = 0,
        max_len: int = 1 << 22,
    ) -> int | None:  # fmt: skip
        """The shortest sequence length (a multiple of 128, queries = keys) from which some sparse
        option is ranked before dense, assuming it stays so above (None: never, up to
        ``max_len``). Sparse gains with length: the work kept grows slower than N^2."""
        key = (
            replace(w, q_len=0, kv_len=0),
            tuple(rules),
            tuple(configs.items()),
            tuple(densities or ()),
            static_share,
            site_window,
            max_len,
        )
        if key not in self._crossovers:
            self._crossovers[key] = self._crossover(w, rules, configs, densities, static_share, site_window, max_len)
        return self._crossovers[key]

    def _crossover(self, w, rules, configs, densities, static_share, site_window, max_len) -> int | None:
        def sparse_wins(n: int) -> bool:
            at = Workload(w.batch, w.q_heads, w.kv_heads, n, n, w.head_dim, w.dtype, w.causal, w.masked)
            return self.predictions(at, rules, configs, densities, static_share, site_window)[0].option != DENSE

        return first_winning_length(sparse_wins, max_len)

    def to_json(self) -> dict:
        return {
            "sms": self.sms,
            "engines": {name: {str(d): c for d, c in by_dim.items()} for name, by_dim in self.engines.items()},
            "index": self.index,
            "info": self.info,
            **({"decode": self.decode.to_json()} if self.decode is not None else {}),
        }

    @classmethod
    def from_json(cls, obj: dict) -> CostModel:
        from .decode_cost import DecodeCostModel  # (it imports this module's fit)

        decode = DecodeCostModel.from_json(obj["decode"]) if obj.get("decode") else None
        return cls(obj["engines"], obj["index"], int(obj["sms"]), obj.get("info"), decode)


def first_winning_length(wins, max_len: int) -> int | None:
    """The smallest multiple of 128 (up to ``max_len``) at which ``wins(n)`` holds, by doubling then
    bisection (``wins`` holds from some length on); None if it never does."""
    lo, hi = 128, 128
    while not wins(hi):
        if hi >= max_len:
            return None
        lo, hi = hi, hi * 2
    if hi == 128:
        return 128
    while hi - lo > 128:  # bisect on multiples of 128
        mid = (lo + hi) // 256 * 128
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


def fit_coefficients(features: list[list[float]], times: list[float]) -> list[float]:
    """Non-negative least squares on relative error (rows weighted by 1 / measured time): features
    whose coefficient comes out negative are dropped and the rest refitted."""
    x = torch.tensor(features, dtype=torch.float64)
    t = torch.tensor(times, dtype=torch.float64)
    x, y = x / t[:, None], torch.ones_like(t)
    active = list(range(x.shape[1]))
    while active:
        sol = torch.linalg.lstsq(x[:, active], y[:, None]).solution[:, 0]
        if (sol >= 0).all():
            coef = [0.0] * x.shape[1]
            for i, c in zip(active, sol.tolist(), strict=True):
                coef[i] = c
            return coef
        active.pop(int(sol.argmin()))
    return [0.0] * x.shape[1]
