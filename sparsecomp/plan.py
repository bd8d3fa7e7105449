"""Plan: which rule each attention site and head gets. Plain data, JSON on disk, versioned.

A rule is ``dense`` or ``streaming(sink, window)`` (StreamingLLM / A-shape: the first ``sink`` keys
plus the last ``window`` keys of each query). A site's entry is one rule for all heads, or a list
with one rule per query head or per KV group. Sites the plan does not name get ``default``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
RULE_KINDS = ("dense", "streaming")


@dataclass(frozen=True)
class Rule:
    kind: str = "dense"
    sink: int = 0
    window: int = 0

    def __post_init__(self):
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown rule kind {self.kind!r}; known: {RULE_KINDS}")
        if self.kind == "streaming" and (self.window <= 0 or self.sink < 0):
            raise ValueError(f"streaming needs window > 0 and sink >= 0; got sink={self.sink}, window={self.window}")

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``dense`` or ``streaming:sink=64,window=1024``."""
        kind, _, params = text.strip().partition(":")
        values = {}
        for item in filter(None, params.split(",")):
            key, _, value = item.partition("=")
            if key.strip() not in ("sink", "window"):
                raise ValueError(f"unknown parameter {key!r} in rule {text!r}; known: sink, window")
            values[key.strip()] = int(value)
        return cls(kind.strip(), **values)

    def __str__(self) -> str:
        return "dense" if self.kind == "dense" else f"streaming(sink={self.sink}, window={self.window})"

    def head_params(self) -> tuple[int, int]:
        """(sink, window) as the kernels read them; window <= 0 means unlimited."""
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
            return asdict(r)

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
