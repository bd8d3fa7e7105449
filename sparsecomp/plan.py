"""Plan: which rule each attention site and head gets. Plain data, JSON on disk, versioned.

A rule is a kind and its parameters: ``dense``, ``streaming(sink, window)``, ``elastic(sink, a, b)``,
``vertical_slash(n_vertical, n_slash, last_q, sink, local, mass)``, ``sample(alpha, window_ratio,
sample_ratio)``, ``block_topk(k, coverage, pool)``, and any kind registered later: each kind is
a pattern module in ``sparsecomp.patterns`` (its parameters, defaults and accepted values live
there). A site's entry is one rule for all heads, or a list with one rule per query head or per
KV group. Sites the plan does not name get ``default``.

Parameters are exact: an int parameter takes an integer (an integral float such as 8.0 is taken
as 8, 8.7 is refused), a float parameter a finite number, ``pool`` one of its names; never a bool.
Elastic's ``a`` is an integer number of keys: calibration fits it as a ceiling, the window is a
whole number of keys, and ``b`` carries the fraction of the span (so ``a=4.5`` is refused rather
than truncated, and plans keep writing ``a=-1024`` that every reader of schema 1 parses).
Site names are spelled as ``named_modules()`` spells them (``canonical_site_name``).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .patterns import PATTERNS

SCHEMA_VERSION = 2  # 2 added decode rules; a plan without them is still written as version 1
READABLE_VERSIONS = (1, 2)
PHASES = ("prefill", "decode")


class _PatternView(Mapping):
    """``kind -> the pattern's params`` (or accepts): a live view of the registry, so that a pattern
    registered after import is known to plans at once."""

    def __init__(self, attr: str):
        self._attr = attr

    def __getitem__(self, kind):
        return getattr(PATTERNS[kind], self._attr)

    def __iter__(self):
        return iter(PATTERNS)

    def __len__(self):
        return len(PATTERNS)


# Each parameter's default (its type is the parameter's) and what it accepts, per rule kind.
RULE_PARAMS: Mapping[str, dict[str, object]] = _PatternView("params")
RULE_ACCEPTS: Mapping[str, dict] = _PatternView("accepts")


def _kinds() -> tuple[str, ...]:
    return tuple(PATTERNS)


def _accepted(kind: str, name: str) -> str:
    """What ``kind``'s parameter ``name`` accepts, in words: ``an integer >= 1``."""
    accepts, default = RULE_ACCEPTS[kind][name], RULE_PARAMS[kind][name]
    if isinstance(accepts, tuple):
        return f"one of {accepts}"
    word = "an integer" if isinstance(default, int) else "a finite number"
    return f"{word} {accepts}".rstrip()


def _exact_number(value, integer: bool):
    """``value`` as an int (``integer``) or a float when that is exact, else None. Bools are not
    numbers here (``window=True`` is a mistake, not 1); numpy scalars register as numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    if isinstance(value, numbers.Integral):
        return int(value) if integer else float(value)
    value = float(value)
    if not math.isfinite(value):
        return None
    if integer:
        return int(value) if value.is_integer() else None
    return value


def _exact(kind: str, name: str, value):
    """``value`` for ``kind``'s parameter ``name``, exactly, or None if it does not accept it."""
    accepts, default = RULE_ACCEPTS[kind][name], RULE_PARAMS[kind][name]
    if isinstance(default, str):
        return value if isinstance(value, str) and value in accepts else None
    exact = _exact_number(value, isinstance(default, int))
    return exact if exact is not None and exact in accepts else None


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def _from_text(kind: str, name: str, text: str):
    """A parameter's value from rule text (``Rule.parse``): an int literal for an int parameter,
    a float literal for a float one (finiteness is checked with the rest), the text for a string."""
    default = RULE_PARAMS[kind][name]
    if isinstance(default, str):
        return text
    if isinstance(default, int):
        if _INT_TEXT.fullmatch(text):
            return int(text)
    else:
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"{kind} {name} must be {_accepted(kind, name)}; got {text!r}")


class Rule:
    """A rule kind and all of its parameters (given positionally in the order of RULE_PARAMS, or by
    name; the rest take their defaults). Immutable and hashable; ``rule.sink`` reads a parameter."""

    __slots__ = ("kind", "params")

    def __init__(self, kind: str = "dense", *args, **params):
        if not isinstance(kind, str) or kind not in RULE_PARAMS:
            raise ValueError(f"unknown rule kind {kind!r}; known: {_kinds()}")
        schema = RULE_PARAMS[kind]
        if len(args) > len(schema):
            raise ValueError(f"{kind} takes at most {len(schema)} parameters {tuple(schema)}; got {args}")
        given = dict(zip(schema, args, strict=False))
        if unknown := set(params) - set(schema):
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {kind}; known: {tuple(schema)}")
        if twice := set(given) & set(params):
            raise ValueError(f"{kind} got {sorted(twice)} both by position and by name")
        given.update(params)
        values = {}
        for name, default in schema.items():
            value = given.get(name, default)
            values[name] = _exact(kind, name, value)
            if values[name] is None and name not in given:  # the default is a placeholder (streaming's window)
                raise ValueError(f"{kind} needs {name}, {_accepted(kind, name)}")
            if values[name] is None:
                raise ValueError(f"{kind} {name} must be {_accepted(kind, name)}; got {value!r}")
        if (reason := PATTERNS[kind].check(values)) is not None:
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
        if not isinstance(text, str):
            raise TypeError(f"a rule spec is a string such as 'streaming:sink=64,window=1024'; got {text!r}")
        kind, _, body = text.strip().partition(":")
        kind = kind.strip()
        if kind not in RULE_PARAMS:  # before the parameters: a misspelled kind knows none of them
            raise ValueError(f"unknown rule kind {kind!r}; known: {_kinds()}")
        schema, values = RULE_PARAMS[kind], {}
        for item in filter(None, (item.strip() for item in body.split(","))):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key:
                raise ValueError(f"rule {text!r}: {item!r} is not name=value; {kind} takes {tuple(schema)}")
            if key not in schema:
                raise ValueError(f"unknown parameter {key!r} in rule {text!r}; known: {tuple(schema)}")
            if key in values:
                raise ValueError(f"rule {text!r} gives {key} twice")
            values[key] = _from_text(kind, key, value)
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
        return PATTERNS[self.kind].adaptive

    def head_params(self, n_keys: int | None = None) -> tuple[int, int]:
        """(sink, window) of the kernel's per-head local rule for ``n_keys`` keys; window <= 0 means
        unlimited. Adaptive rules select whole blocks and columns, so their local rule is (0, 0)."""
        return PATTERNS[self.kind].local_rule(self, n_keys)


# The root of a site name as older naming spelled Dynamo's source path (``L['args'][0].model...``
# became ``L.args.0.model...``): ``L`` then a local of the compiled frame, namely ``self``, a
# ``*args`` position, a ``**kwargs`` key, or a module passed to a function under one of the usual
# names. Only this exact, leading prefix is stripped: later indices are module names
# (``L.self.0.attn`` of a Sequential is ``0.attn``).
_DYNAMO_ROOT = re.compile(r"L\.(?:args\.[0-9]+|kwargs\.[A-Za-z_][A-Za-z_0-9]*|self|fn|mod|model|module)(?:\.|$)")


def canonical_site_name(name: str) -> str:
    """``name`` as ``named_modules()`` spells it: ``L.args.0.model.layers.0.self_attn`` (a Dynamo
    root prefix, as torch.compile under transformers >= 5.2 produced it) is
    ``model.layers.0.self_attn``; any other name is returned as it is."""
    if not isinstance(name, str):
        raise TypeError(f"a site name is a string; got {name!r}")
    root = _DYNAMO_ROOT.match(name)
    return name[root.end() :] if root else name


def _json_kind(obj) -> str:
    """How JSON calls ``obj``'s type, for messages: a list, an object, a number, ..."""
    for types, word in ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string")):
        if isinstance(obj, types):
            return word
    return "null" if obj is None else "a number" if isinstance(obj, (int, float)) else type(obj).__name__


def _rule_from_json(obj, where: str) -> Rule:
    """A rule as plans store it: its spec string, or (the first plan format) an object with its kind."""
    if not isinstance(obj, (str, dict)):
        raise ValueError(
            f"{where}: a rule is a spec string such as 'streaming:sink=64,window=1024' or an object "
            f"with 'kind'; got {_json_kind(obj)} ({obj!r})"
        )
    if isinstance(obj, dict) and "kind" not in obj:
        raise ValueError(f"{where}: a rule object needs 'kind' (one of {_kinds()}); got {obj!r}")
    try:
        return Rule.parse(obj) if isinstance(obj, str) else Rule(**obj)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _entry_from_json(obj, where: str) -> Rule | list[Rule]:
    if isinstance(obj, list):
        if not obj:
            raise ValueError(f"{where}: an empty list of rules (give one rule, or one per head or KV group)")
        return [_rule_from_json(r, f"{where} rule {i}") for i, r in enumerate(obj)]
    return _rule_from_json(obj, where)


def _site_entries(sites, what: str) -> dict:
    """``sites`` checked (a dict of site name -> Rule or non-empty list of Rules), names canonical."""
    if not isinstance(sites, dict):
        raise TypeError(f"plan {what} must be a dict of site name -> Rule or list of Rules; got {sites!r}")
    for name, entry in sites.items():
        if not (isinstance(entry, Rule) or (entry and isinstance(entry, (list, tuple)) and _all_rules(entry))):
            raise TypeError(f"plan {what} {name!r} must have a Rule or a non-empty list of Rules; got {entry!r}")
    return _by_site_name({k: v if isinstance(v, Rule) else list(v) for k, v in sites.items()}, what)


_PLAN_FIELDS = (
    "version", "fingerprint", "default", "sites", "decode_default", "decode_sites", "block", "densities", "channels",
    "info",
)  # fmt: skip


@dataclass
class Plan:
    default: Rule = field(default_factory=Rule)
    sites: dict[str, Rule | list[Rule]] = field(default_factory=dict)
    fingerprint: dict | None = None
    # Decode steps (a few query rows against the KV cache) get these rules where given, else the
    # prefill ones above: e.g. dense prefill with a streaming decode (StreamingLLM).
    decode_default: Rule | None = None
    decode_sites: dict[str, Rule | list[Rule]] = field(default_factory=dict)
    # What decisions read (calibration writes them): the sparse-index block size the rules were
    # measured at, and each site's measured kept density per query head (the cost model's work).
    block: int | None = None
    densities: dict[str, list[float]] = field(default_factory=dict)
    # Double Sparsity's calibrated channels of K: per site, per KV head, the channel indices.
    channels: dict[str, list[list[int]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # how it was made (for people): target, data, tool version
    version: int = SCHEMA_VERSION

    def __post_init__(self):
        # Check the types here, once, so that a bad plan fails where it is made, not at compile time.
        if not isinstance(self.default, Rule):
            raise TypeError(f"plan default must be a Rule; got {self.default!r}")
        if self.decode_default is not None and not isinstance(self.decode_default, Rule):
            raise TypeError(f"plan decode_default must be a Rule or None; got {self.decode_default!r}")
        self.sites = _site_entries(self.sites, "sites")
        self.decode_sites = _site_entries(self.decode_sites, "decode_sites")
        if isinstance(self.info, dict) and isinstance(self.info.get("measured"), dict):  # calibration's, per site
            self.info = {**self.info, "measured": _by_site_name(self.info["measured"], "info.measured")}
        self._typed_from_info()
        if self.block is not None and (type(self.block) is not int or self.block < 1):
            raise ValueError(f"plan block must be an integer >= 1 (a sparse-index block size); got {self.block!r}")
        if not isinstance(self.densities, dict) or not all(
            isinstance(v, list) and all(isinstance(d, int | float) and 0 <= d <= 1 for d in v)
            for v in self.densities.values()
        ):
            raise ValueError(
                f"plan densities must map site names to lists of densities in [0, 1]; got {self.densities!r}"
            )
        self.densities = _by_site_name(self.densities, "densities")
        self.channels = _by_site_name(_checked_channels(self.channels), "channels")
        self._check_phases()

    def _check_phases(self) -> None:
        """A decode-only kind (Double Sparsity, Quest) among the prefill rules is an error."""
        for where, entry in (("default", self.default), *((f"site {k!r}", v) for k, v in self.sites.items())):
            for r in [entry] if isinstance(entry, Rule) else entry:
                if "prefill" not in PATTERNS[r.kind].phases:
                    raise ValueError(
                        f"plan {where}: {r.kind} is a decode rule; give it as a decode rule "
                        f"('prefill=<rule>;decode={r.spec()}', decode_default or decode_sites)"
                    )

    def _typed_from_info(self) -> None:
        """Plans saved before the typed fields kept them in ``info`` (calibration's "block" and
        "measured"): read them from there."""
        info = self.info if isinstance(self.info, dict) else {}
        if self.block is None and type(info.get("block")) is int:
            self.block = info["block"]
        if not self.densities and isinstance(info.get("measured"), dict):
            self.densities = {
                name: [h["density"] for h in m.get("heads", []) if isinstance(h, dict) and "density" in h]
                for name, m in info["measured"].items()
                if isinstance(m, dict) and m.get("heads")
            }

    @classmethod
    def from_any(cls, plan) -> Plan:
        """A Plan, a preset string (``"dense"``, ``"streaming:sink=64,window=1024"``), or a path."""
        if plan is None:
            return cls()
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, os.PathLike) or (isinstance(plan, str) and plan.endswith(".json")):
            return cls.load(plan)
        if not isinstance(plan, str):
            raise TypeError(f"plan must be a Plan, a preset string or a .json path; got {type(plan).__name__}")
        if "=" in plan.partition(":")[0]:  # "prefill=<rule>;decode=<rule>"
            return cls._from_phase_preset(plan)
        if (kind := plan.partition(":")[0].strip()) not in RULE_PARAMS:
            raise ValueError(
                f"plan {plan!r} is neither a .json plan file nor a preset (a rule such as "
                f"'streaming:sink=64,window=1024'): unknown rule kind {kind!r}; known: {_kinds()}"
            )
        try:
            return cls(default=Rule.parse(plan), info={"preset": plan})
        except ValueError as e:
            raise ValueError(f"plan preset {plan!r}: {e}") from None

    @classmethod
    def _from_phase_preset(cls, text: str) -> Plan:
        """``prefill=<rule>;decode=<rule>`` (either part may be left out: prefill then is dense, decode
        follows prefill)."""
        rules: dict[str, Rule] = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            phase, _, spec = (x.strip() for x in part.partition("="))
            if phase not in PHASES:
                raise ValueError(f"plan preset {text!r}: {phase!r} is not a phase; give prefill=<rule>;decode=<rule>")
            if phase in rules:
                raise ValueError(f"plan preset {text!r} gives {phase} twice")
            try:
                rules[phase] = Rule.parse(spec)
            except ValueError as e:
                raise ValueError(f"plan preset {text!r}, {phase}: {e}") from None
        if not rules:
            raise ValueError(f"plan preset {text!r} gives no rule; give prefill=<rule>;decode=<rule>")
        return cls(default=rules.get("prefill", Rule()), decode_default=rules.get("decode"), info={"preset": text})

    def rules_for(self, site: str, q_heads: int, kv_heads: int, phase: str = "prefill") -> list[Rule]:
        """One rule per query head for ``site`` in ``phase`` ("prefill", or "decode": the decode rules
        where the plan gives them, else the prefill ones)."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; known: {PHASES}")
        name = canonical_site_name(site)
        entry = self.sites.get(name, self.default)
        if phase == "decode" and (name in self.decode_sites or self.decode_default is not None):
            entry = self.decode_sites.get(name, self.decode_default)
        if isinstance(entry, Rule):
            return [entry] * q_heads
        if len(entry) == q_heads:
            return list(entry)
        if len(entry) == kv_heads:
            groups = q_heads // kv_heads
            return [r for r in entry for _ in range(groups)]
        raise ValueError(f"plan gives {len(entry)} rules for {site}; it has {q_heads} query and {kv_heads} KV heads")

    def for_shard(self, rank: int, size: int) -> Plan:
        """The plan as one of ``size`` tensor-parallel ranks sees it: heads split contiguously
        (rank r holds query heads [r Hq/size, (r+1) Hq/size) and their KV heads), so every per-head
        list keeps the rank's slice, by global head index: rules, calibrated densities (per query
        head) and channels (per KV head)."""
        if size == 1:
            return self

        def part(name: str, entry, what: str):
            if isinstance(entry, Rule):
                return entry
            if len(entry) % size:
                raise ValueError(f"plan {what} for {name}: {len(entry)} heads do not split over {size} ranks")
            n = len(entry) // size
            return list(entry[rank * n : (rank + 1) * n])

        return dataclasses.replace(
            self,
            sites={n: part(n, e, "rules") for n, e in self.sites.items()},
            decode_sites={n: part(n, e, "decode rules") for n, e in self.decode_sites.items()},
            channels={n: part(n, e, "channels") for n, e in self.channels.items()},
            densities={n: part(n, e, "densities") for n, e in self.densities.items()},
            info={**self.info, "tensor_parallel": {"rank": rank, "size": size}},
        )

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

        def entries(sites):
            return {k: [rule(r) for r in v] if isinstance(v, list) else rule(v) for k, v in sites.items()}

        has_decode = self.decode_default is not None or bool(self.decode_sites) or bool(self.channels)
        return {
            "version": SCHEMA_VERSION if has_decode else 1,  # readers of version 1 may load it
            "fingerprint": self.fingerprint,
            "default": rule(self.default),
            "sites": entries(self.sites),
            **({"decode_default": self.decode_default and rule(self.decode_default)} if has_decode else {}),
            **({"decode_sites": entries(self.decode_sites)} if has_decode else {}),
            "block": self.block,
            "densities": self.densities,
            **({"channels": self.channels} if self.channels else {}),
            "info": self.info,
        }

    @classmethod
    def from_json(cls, obj: dict) -> Plan:
        if not isinstance(obj, dict):
            raise ValueError(f"a plan is a JSON object with {_PLAN_FIELDS}; got {_json_kind(obj)}")
        if unknown := set(obj) - set(_PLAN_FIELDS):  # a misspelled field would silently mean "all default"
            raise ValueError(f"unknown plan field(s) {sorted(unknown)}; known: {_PLAN_FIELDS}")
        version = obj.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ValueError(f"plan schema version {version!r}; this sparsecomp reads versions {READABLE_VERSIONS}")
        sites, fingerprint, info = obj.get("sites", {}), obj.get("fingerprint"), obj.get("info", {})
        decode_sites, decode_default = obj.get("decode_sites") or {}, obj.get("decode_default")
        for what, value in (
            ("sites", sites),
            ("decode_sites", decode_sites),
            ("fingerprint", {} if fingerprint is None else fingerprint),
            ("info", info),
        ):
            if not isinstance(value, dict):
                detail = " {site name: rule or list of rules}" if what.endswith("sites") else ""
                raise ValueError(f"plan {what!r} must be an object{detail}; got {_json_kind(value)}")
        return cls(
            default=_rule_from_json(obj.get("default", "dense"), "plan default"),
            sites={k: _entry_from_json(v, f"plan site {k!r}") for k, v in sites.items()},
            decode_default=None if decode_default is None else _rule_from_json(decode_default, "plan decode_default"),
            decode_sites={k: _entry_from_json(v, f"plan decode site {k!r}") for k, v in decode_sites.items()},
            fingerprint=fingerprint,
            block=obj.get("block"),
            densities=obj.get("densities") or {},
            channels=obj.get("channels") or {},
            info=info,
            version=version,
        )

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path) -> Plan:
        """The plan saved at ``path``; errors name the path and what is wrong with the file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "plan file not found", str(path)) from None
        except IsADirectoryError:
            raise ValueError(f"plan file {path} is a directory") from None
        if not data.strip():
            raise ValueError(f"plan file {path} is empty; a plan is a JSON object (see Plan.save)")
        try:
            obj = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError:
            raise ValueError(f"plan file {path} is not UTF-8 text (a binary file?); a plan is a JSON object") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"plan file {path} is not valid JSON (truncated?): {e.msg} at line {e.lineno} column {e.colno}"
            ) from None
        try:
            return cls.from_json(obj)
        except ValueError as e:
            raise ValueError(f"plan file {path}: {e}") from None


def _checked_channels(channels) -> dict:
    ok = isinstance(channels, dict) and all(
        isinstance(heads, list)
        and heads
        and all(isinstance(h, list) and h and all(type(c) is int and c >= 0 for c in h) for h in heads)
        and len({len(h) for h in heads}) == 1
        for heads in channels.values()
    )
    if not ok:
        raise ValueError(
            "plan channels must map site names to one list of channel indices per KV head, all of one "
            f"length; got {channels!r}"
        )
    return channels


def _all_rules(entries: list) -> bool:
    return all(isinstance(r, Rule) for r in entries)


def _by_site_name(entries: dict, what: str) -> dict:
    """``entries`` keyed by ``canonical_site_name``; two keys for one site are an error, not a pick."""
    out, given_as = {}, {}
    for name, entry in entries.items():
        key = canonical_site_name(name)
        if key in out:
            raise ValueError(f"plan {what} {given_as[key]!r} and {name!r} both name site {key!r}")
        out[key], given_as[key] = entry, name
    return out


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
