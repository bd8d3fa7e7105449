"""What a pattern is, in one place: its parameters and what they accept, how a rule of it lowers to
the sparse index (a local sink + window rule, or an index builder run on each input), the cost
model's bound on what it keeps, and the rules calibration tries. ``register`` adds one; everything
else (plans, compile, the cost model, calibration, autotune) iterates the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Range:
    """The numbers a parameter accepts: ``lo`` (open or closed) up to ``hi`` (closed); None: no bound."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False

    def __contains__(self, v) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        return above and (self.hi is None or v <= self.hi)

    def __str__(self) -> str:
        if self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}]"
        return "" if self.lo is None else f"{'>' if self.lo_open else '>='} {self.lo}"


COUNT, POSITIVE, FRACTION, SHARE = Range(0), Range(1), Range(0, 1, lo_open=True), Range(0, 1)


def _no_local_rule(rule, n_keys):
    return 0, 0


@dataclass(frozen=True)
class Pattern:
    """One rule kind. ``params`` maps each parameter to its default (whose type is the parameter's;
    a default outside ``accepts`` is a placeholder the user must replace); ``accepts`` maps it to a
    Range or a tuple of accepted strings."""

    kind: str
    params: dict[str, object]
    accepts: dict[str, Range | tuple[str, ...]]
    doc: str  # one line for the plan format reference
    check: Callable[[dict], str | None] = lambda values: None  # why values are invalid together
    # Static patterns: (sink, window) of the kernel's per-head local rule for a rule and N keys.
    local_rule: Callable = _no_local_rule
    length_dependent: bool = False  # the local rule reads N: the graph specializes on the length
    # Adaptive patterns: an index builder run on each input inside the graph (kernels/), the
    # parameters that may differ per head (passed one value per query head), and whether it needs
    # square blocks.
    builder: Callable | None = None
    per_head: tuple[str, ...] = ()
    square_blocks: bool = False
    # The cost model's bound on key blocks per query block for a rule when calibration measured no
    # density: f(rule, causal_blocks, block_n) -> tensor (None: anything up to causal).
    block_bound: Callable | None = None
    # The element count that dominates the builder's time, f(rule, workload, query-key blocks) (the
    # cost model fits a rate per kind; autotune times the builder on the pattern's default rule).
    index_work: Callable | None = None
    # Calibration's candidates: f(max_len, sink) -> rules (None: not a calibration candidate).
    candidates: Callable | None = None
    # The phases a rule of this kind may serve ("prefill", "decode").
    phases: tuple[str, ...] = ("prefill", "decode")
    # Decode selection patterns, in the graph: ``summarize(k, key_ok, channels, **params)`` -> the
    # state kept beside the KV cache (tensors with keys, or units of ``state_unit(params)`` keys,
    # along dim 2); ``select_from(q, state, k, key_ok, q_last, channels, **params)`` -> the
    # tokens a step attends to, (B, Hs, S) int32 (kernels/decode).
    summarize: Callable | None = None
    select_from: Callable | None = None
    state_unit: Callable | None = None
    # A state taken from the prompt's attention, in the prefill graph: ``summarize_prompt(q, k,
    # mask, causal, channels, n_state, scale=..., **params)`` (SnapKV's votes); such a rule needs a
    # static cache to keep it in, and ``summarize`` gives what keys written later get.
    summarize_prompt: Callable | None = None
    # A state that learns from each step's attention (H2O's accumulated weights), run after the
    # selection: ``observe_step(q, state, k, tokens, key_ok, q_last, scale, **params)`` -> the new
    # state, written back in place.
    observe_step: Callable | None = None
    needs_channels: bool = False  # the rule reads calibrated channels of K (the plan's ``channels``)

    @property
    def selects(self) -> bool:
        """A decode selection pattern (its steps attend to chosen tokens only)."""
        return self.select_from is not None

    def select(self, q, keys, key_ok, q_last, channel_index, **params):
        """The tokens a step attends to, its state summarized from all of ``keys`` (no cache kept)."""
        state = self.summarize(keys, key_ok, channel_index, **params)
        return self.select_from(q, state, keys, key_ok, q_last, channel_index, **params)

    @property
    def adaptive(self) -> bool:
        """Estimated from each input (Q, K) inside the graph, not fixed by positions alone."""
        return self.builder is not None


PATTERNS: dict[str, Pattern] = {}


def register(pattern: Pattern) -> Pattern:
    """Add a pattern (a plan can name its kind from then on). A kind is registered once."""
    if pattern.kind in PATTERNS:
        raise ValueError(f"a pattern {pattern.kind!r} is registered already")
    if set(pattern.params) != set(pattern.accepts):
        raise ValueError(f"pattern {pattern.kind!r}: params {sorted(pattern.params)} and accepts differ")
    PATTERNS[pattern.kind] = pattern
    return pattern


def unregister(kind: str) -> None:
    """Remove a pattern (tests register their own and take it out again)."""
    PATTERNS.pop(kind)


def pattern(kind: str) -> Pattern:
    try:
        return PATTERNS[kind]
    except KeyError:
        raise ValueError(f"unknown rule kind {kind!r}; known: {tuple(PATTERNS)}") from None
