"""Plan: which rule each attention site and head gets. Plain data, JSON on disk, versioned.

A rule is a kind and its parameters (defaults below):
    dense
    streaming(sink, window)            StreamingLLM / A-shape: the first ``sink`` keys plus the last
                                       ``window`` keys of each query (window > 0)
    elastic(sink, a, b)                MoA's elastic span: streaming with window = ceil(a + b * N) for
                                       N keys (at least 1); the graph specializes on N
    vertical_slash(n_vertical, n_slash, last_q, sink, local, mass)
                                       MInference, estimated per input (mass < 1: FlexPrefill's
                                       cumulative-attention cut under the budgets)
    sample(alpha, window_ratio, sample_ratio)                     SampleAttention, per input
    block_topk(k, coverage, pool)      MoBA / Quest-style prefill block selection, per input
(the adaptive kinds are defined in ``sparsecomp.kernels.adaptive_index``). A site's entry is one
rule for all heads, or a list with one rule per query head or per KV group. Sites the plan does
not name get ``default``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RULE_PARAMS: dict[str, dict[str, object]] = {
    "dense": {},
    "streaming": {"sink": 0, "window": 0},
    "elastic": {"sink": 0, "a": 0, "b": 0.0},
    "vertical_slash": {"n_vertical": 1000, "n_slash": 6096, "last_q": 64, "sink": 64, "local": 64, "mass": 1.0},
    "sample": {"alpha": 0.95, "window_ratio": 0.02, "sample_ratio": 0.02},
    "block_topk": {"k": 16, "coverage": 0.0, "pool": "mean"},
}
RULE_KINDS = tuple(RULE_PARAMS)
ADAPTIVE_KINDS = ("vertical_slash", "sample", "block_topk")


def _check_rule(kind: str, p: dict) -> str | None:
    """Why these parameters are invalid, or None."""
    if kind == "streaming" and (p["window"] <= 0 or p["sink"] < 0):
        return "streaming needs window > 0 and sink >= 0"
    if kind == "elastic" and (p["sink"] < 0 or p["b"] < 0 or (p["a"] <= 0 and p["b"] == 0)):
        return "elastic needs sink >= 0, b >= 0 and a window that grows past 0 (a > 0 or b > 0)"
    if kind == "vertical_slash" and (
        min(p["n_vertical"], p["n_slash"], p["sink"], p["local"]) < 0 or p["last_q"] < 1 or not 0 < p["mass"] <= 1
    ):
        return "vertical_slash needs budgets >= 0, last_q >= 1 and 0 < mass <= 1"
    if kind == "sample" and not (0 < p["alpha"] <= 1 and 0 <= p["window_ratio"] <= 1 and 0 < p["sample_ratio"] <= 1):
        return "sample needs 0 < alpha <= 1, 0 <= window_ratio <= 1, 0 < sample_ratio <= 1"
    if kind == "block_topk" and (p["k"] < 0 or not 0 <= p["coverage"] <= 1 or p["pool"] not in ("mean", "minmax")):
        return "block_topk needs k >= 0, 0 <= coverage <= 1, pool 'mean' or 'minmax'"
    if kind == "block_topk" and p["k"] == 0 and p["coverage"] == 0:
        return "block_topk needs k > 0 or coverage > 0"
    return None


class Rule:
    """A rule kind and all of its parameters (given positionally in the order of RULE_PARAMS, or by
    name; the rest take their defaults). Immutable and hashable; ``rule.sink`` reads a parameter."""

    __slots__ = ("kind", "params")

    def __init__(self, kind: str = "dense", *args, **params):
        if kind not in RULE_PARAMS:
            raise ValueError(f"unknown rule kind {kind!r}; known: {RULE_KINDS}")
        schema = RULE_PARAMS[kind]
        if len(args) > len(schema):
            raise ValueError(f"{kind} takes at most {len(schema)} parameters {tuple(schema)}; got {args}")
        given = dict(zip(schema, args, strict=False))
        if unknown := set(params) - set(schema):
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {kind}; known: {tuple(schema)}")
        given.update(params)
        values = {name: type(default)(given.get(name, default)) for name, default in schema.items()}
        if (reason := _check_rule(kind, values)) is not None:
            raise ValueError(f"{reason}; got {values}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "params", tuple(values.items()))

    def __setattr__(self, name, value):
        raise AttributeError("Rule is immutable")

    def __getattr__(self, name):
        for key, value in object.__getattribute__(self, "params"):
            if key == name:
                return value
        raise AttributeError(f"{self.kind} has no parameter {name!r}")

    def __eq__(self, other):
        return isinstance(other, Rule) and (self.kind, self.params) == (other.kind, other.params)

    def __hash__(self):
        return hash((self.kind, self.params))

    def __repr__(self):
        return f"Rule({self})"

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``dense``, ``streaming:sink=64,window=1024``, ``vertical_slash:n_vertical=500``, ..."""
        kind, _, params = text.strip().partition(":")
        kind = kind.strip()
        values = {}
        for item in filter(None, params.split(",")):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in RULE_PARAMS.get(kind, {}):
                known = tuple(RULE_PARAMS.get(kind, {}))
                raise ValueError(f"unknown parameter {key!r} in rule {text!r}; known: {known}")
            values[key] = value.strip()
        return cls(kind, **values)

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        return f"{self.kind}(" + ", ".join(f"{k}={v}" for k, v in self.params) + ")"

    def to_json(self) -> dict:
        return {"kind": self.kind, **dict(self.params)}

    def spec(self) -> str:
        """The text ``Rule.parse`` reads back: ``kind:name=value,...`` (plans store rules so)."""
        return self.kind + (":" + ",".join(f"{k}={v}" for k, v in self.params) if self.params else "")

    @property
    def adaptive(self) -> bool:
        """Estimated from each input (Q, K) inside the graph, not fixed by positions alone."""
        return self.kind in ADAPTIVE_KINDS

    def head_params(self, n_keys: int | None = None) -> tuple[int, int]:
        """(sink, window) of the kernel's per-head local rule for ``n_keys`` keys; window <= 0 means
        unlimited. Adaptive rules select whole blocks and columns, so their local rule is (0, 0)."""
        if self.kind == "elastic":
            if n_keys is None:
                raise ValueError("an elastic rule's window depends on the number of keys")
            return self.sink, max(1, math.ceil(self.a + self.b * n_keys))
        return (self.sink, self.window) if self.kind == "streaming" else (0, 0)


def _rule_from_json(obj) -> Rule:
    return Rule.parse(obj) if isinstance(obj, str) else Rule(**obj)


@dataclass
class Plan:
    default: Rule = field(default_factory=Rule)
    sites: dict[str, Rule | list[Rule]] = field(default_factory=dict)
    fingerprint: dict | None = None
    info: dict = field(default_factory=dict)  # how it was made: target, data, tool version
    version: int = SCHEMA_VERSION

    @classmethod
    def from_any(cls, plan) -> Plan:
        """A Plan, a preset string (``"dense"``, ``"streaming:sink=64,window=1024"``), or a path."""
        if plan is None:
            return cls()
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, Path) or (isinstance(plan, str) and plan.endswith(".json")):
            return cls.load(plan)
        if isinstance(plan, str):
            return cls(default=Rule.parse(plan), info={"preset": plan})
        raise TypeError(f"plan must be a Plan, a preset string or a .json path; got {type(plan).__name__}")

    def rules_for(self, site: str, q_heads: int, kv_heads: int) -> list[Rule]:
        """One rule per query head for ``site``."""
        entry = self.sites.get(site, self.default)
        if isinstance(entry, Rule):
            return [entry] * q_heads
        if len(entry) == q_heads:
            return list(entry)
        if len(entry) == kv_heads:
            groups = q_heads // kv_heads
            return [r for r in entry for _ in range(groups)]
        raise ValueError(f"plan gives {len(entry)} rules for {site}; it has {q_heads} query and {kv_heads} KV heads")

    def check_fingerprint(self, actual: dict) -> None:
        """Refuse a plan made for another model: every field both sides know must agree."""
        if not self.fingerprint:
            return
        diff = {k: (v, actual[k]) for k, v in self.fingerprint.items() if k in actual and actual[k] != v}
        if diff:
            detail = ", ".join(f"{k}: plan {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"this plan was made for another model ({detail})")

    def to_json(self) -> dict:
        def rule(r):
            return r.spec()

        return {
            "version": self.version,
            "fingerprint": self.fingerprint,
            "default": rule(self.default),
            "sites": {k: [rule(r) for r in v] if isinstance(v, list) else rule(v) for k, v in self.sites.items()},
            "info": self.info,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Plan:
        version = obj.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema version {version!r}; this sparsecomp reads version {SCHEMA_VERSION}")
        sites = {
            k: [_rule_from_json(r) for r in v] if isinstance(v, list) else _rule_from_json(v)
            for k, v in obj.get("sites", {}).items()
        }
        return cls(
            default=_rule_from_json(obj.get("default", "dense")),
            sites=sites,
            fingerprint=obj.get("fingerprint"),
            info=obj.get("info", {}),
            version=version,
        )

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> Plan:
        return cls.from_json(json.loads(Path(path).read_text()))


def model_fingerprint(model) -> dict:
    """What a plan must agree on: architecture and attention shape, from an HF config if any."""
    cfg = getattr(model, "config", None)
    fp = {"architecture": type(model).__name__}
    if cfg is not None:
        get = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = getattr(get, "num_attention_heads", None)
        hidden = getattr(get, "hidden_size", None)
        fp.update(
            {
                "num_layers": getattr(get, "num_hidden_layers", None),
                "num_attention_heads": heads,
                "num_key_value_heads": getattr(get, "num_key_value_heads", heads),
                "head_dim": getattr(get, "head_dim", None) or (hidden // heads if hidden and heads else None),
            }
        )
    return {k: v for k, v in fp.items() if v is not None}
