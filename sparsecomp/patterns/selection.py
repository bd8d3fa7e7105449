"""What the decode selection patterns share: a budget (a count, or a ratio of the keys) and the
selection head layout (one selection per KV group, or per query head)."""

from __future__ import annotations

import math

import torch

SELECTION_HEADS = ("kv", "query")


def budget(count: int, ratio: float, n: int) -> int:
    """``count`` if given, else ``ceil(ratio * n)``; at least 1, at most ``n``."""
    want = count if count else math.ceil(ratio * n)  # n may be a SymInt (dynamic decode lengths)
    return torch.sym_max(1, torch.sym_min(n, want))


def selection_heads(heads: str, q_heads: int, kv_heads: int) -> int:
    return kv_heads if heads == "kv" else q_heads


def check_budget(count_name: str):
    def check(values: dict) -> str | None:
        if not values[count_name] and not values["ratio"]:
            return f"give {count_name} > 0 or ratio > 0"
        return None

    return check


def mixed_group(rules: list, group: int) -> tuple[int, list[str]] | None:
    """The first run of ``group`` consecutive heads (a KV head's query heads, or a selection's) whose
    rules differ: (its index, their rules as text), or None where every run shares one rule."""
    for g in range(len(rules) // group):
        shared = set(rules[g * group : (g + 1) * group])
        if len(shared) > 1:
            return g, sorted(map(str, shared))
    return None
