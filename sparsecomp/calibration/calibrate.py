"""Calibration: measure every attention site on the model's own attention and give each query head
the cheapest rule that keeps enough of it.

The model is captured by Dynamo as for ``compile``, but nothing is rewritten: each site's exact
output is routed through an observer (the graph runs eagerly), which sees the site's Q and K for
every calibration input and measures, per candidate rule and query head, the attention mass kept
(CRA), the density (kept / allowed pairs) and the attention output error (relative L2 vs exact)
with ``sparsecomp.calibration.recall.kept_mass``: chunked over query rows, never N x N, with the index
builders the compiled model runs. After all inputs, each head gets the candidate of least mean
density whose CRA reaches ``target`` (and whose output error stays within ``max_error``, if
given) at every calibration length, each length's inputs averaged; static rules win ties (no
per-input index cost); a head that no candidate serves stays dense (DuoAttention's
"retrieval heads": the others are its streaming heads when the candidates are streaming windows).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparsecomp.kernels import KernelOptions
from sparsecomp.passes.fxutil import eliminate_dead_code
from sparsecomp.passes.rewrite import observe_site
from sparsecomp.passes.site import module_names_by_id

from ..compiler.lower import lower_rules
from ..compiler.prepare import prepare_graph
from ..patterns import PATTERNS
from ..plan import Plan, Rule, model_fingerprint
from .calibration_data import CALIBRATION_FILES, default_calibration_ids
from .recall import kept_mass


def candidate_kinds() -> tuple[str, ...]:
    """The rule kinds calibration can try: every registered pattern that lists candidates."""
    return tuple(kind for kind, p in PATTERNS.items() if p.candidates is not None)


def candidate_rules(kinds=None, max_len: int = 8192, sink: int = 64) -> list[Rule]:
    """The rules calibration tries per head, each pattern's own (``sparsecomp.patterns``): streaming
    windows below the longest input, vertical-slash budgets up to MInference's default,
    SampleAttention alphas, block top-k..."""
    known = candidate_kinds()
    kinds = known if kinds is None else tuple(kinds)
    if unknown := set(kinds) - set(known):
        raise ValueError(f"unknown candidate kinds {sorted(unknown)}; known: {known}")
    return [rule for kind in known if kind in kinds for rule in PATTERNS[kind].candidates(max_len, sink)]


def candidate_index(rule: Rule, q, k, q_pos, k_pos, key_ok, *, scale, causal, window, block: int):
    """(index, head_sink, head_window) of one rule for all heads of a site: what the compiled model
    would run on these inputs."""
    options = KernelOptions(block_m=block, block_n=block)
    rules = [rule] * q.shape[1]
    return lower_rules(rules, q, k, q_pos, k_pos, key_ok, scale=scale, causal=causal, window=window, options=options)


@dataclass
class SiteStats:
    """Per input length, sums over the calibration inputs of each candidate's CRA (or kept
    influence), density, output error and lost loss (``kept_mass``'s lost influence, or the output
    error without gradients) per head ((C, Hq) tensors), and the number of inputs."""

    allowed: list[int]  # candidate ids this site may take
    by_length: dict = field(default_factory=dict)  # length -> [cra, density, out_err, lost, inputs]
    note: str = ""
    heads: tuple[int, int] = (0, 0)  # (query heads, KV heads)

    @property
    def inputs(self) -> int:
        return sum(sums[-1] for sums in self.by_length.values())

    def add(self, length: int, cra, density, out_err, lost=None) -> None:
        new = [t.double().cpu() for t in (cra, density, out_err, out_err if lost is None else lost)]
        sums = self.by_length.setdefault(length, [torch.zeros_like(t) for t in new] + [0])
        for i, t in enumerate(new):
            sums[i] += t
        sums[-1] += 1

    def mean(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CRA, density, output error) per candidate and head, averaged over all inputs."""
        return tuple(sum(sums[i] for sums in self.by_length.values()) / self.inputs for i in range(3))

    def worst(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(CRA, output error) per candidate and head at the length where each is worst (lowest
        CRA, highest error), each length's inputs averaged."""
        per_length = [(sums[0] / sums[-1], sums[2] / sums[-1]) for sums in self.by_length.values()]
        cra = torch.stack([c for c, _ in per_length]).amin(0)
        return cra, torch.stack([e for _, e in per_length]).amax(0)

    def lost(self) -> torch.Tensor:
        """Lost loss per candidate and head: each length's inputs averaged, summed over lengths."""
        return sum(sums[3] / sums[-1] for sums in self.by_length.values())

    def longest_density(self) -> torch.Tensor:
        """Density per candidate and head at the longest calibration length (what a budget bounds)."""
        sums = self.by_length[max(self.by_length)]
        return sums[1] / sums[-1]


@dataclass
class Calibrator:
    """The observer every site calls, and the per-site statistics it gathers."""

    rules: list[Rule]
    block: int
    influence: bool = False  # measure kept loss influence (needs a backward pass) instead of CRA
    sites: dict[str, SiteStats] = field(default_factory=dict)
    names_by_id: dict[int, str] | None = None  # the model's named_modules() names (exact site names)

    def backend(self, gm, example_inputs):
        """Dynamo backend: route each site that a sparse rule could serve through ``observe``."""
        # Observing never replaces the attention: gradients are no reason to skip (hence no_grad).
        with torch.no_grad():
            graph = prepare_graph(gm, Plan(), names_by_id=self.names_by_id)
        for prepared in graph.sites:
            site, structure = prepared.site, prepared.site.structure
            if site.fallback is not None:
                self.sites.setdefault(site.name, SiteStats([], note=f"kept dense: {site.fallback}"))
                continue
            if not structure.causal:
                self.sites.setdefault(site.name, SiteStats([], note="kept dense: sparse rules need a causal site"))
                continue
            allowed = [
                c for c, r in enumerate(self.rules) if structure.positions_are_indices or not r.adaptive
            ]  # adaptive builders assume positions are token indices (as compile does)
            self.sites.setdefault(site.name, SiteStats(allowed))
            observe_site(gm, site, self.observe)
        eliminate_dead_code(gm)  # keeps in-place KV-cache writes
        gm.recompile()
        return gm.forward

    def observe(self, out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, causal, window):
        args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in (q, k, v, q_pos, k_pos, key_ok))
        structure = dict(scale=scale, causal=causal, window=window)
        if not self.influence:
            self._measure(site, *args, structure)
        elif out.requires_grad:  # measured once the loss gradient of this output arrives
            out.register_hook(lambda grad: self._measure(site, *args, structure, out_grad=grad.detach()))
        return out

    def _measure(self, site, q, k, v, q_pos, k_pos, key_ok, structure, out_grad=None):
        stats = self.sites[site]
        with torch.no_grad():
            candidates = [
                candidate_index(self.rules[c], q, k, q_pos, k_pos, key_ok, **structure, block=self.block)
                for c in stats.allowed
            ]
            m = kept_mass(
                q, k, q_pos, k_pos, key_ok, candidates, **structure, block_m=self.block, block_n=self.block, v=v,
                out_grad=out_grad,
            )  # fmt: skip
        if self.influence:
            stats.add(q.shape[2], m.influence, m.density, m.out_err, m.lost_influence)
        else:
            stats.add(q.shape[2], m.cra, m.density, m.out_err)
        stats.heads = (q.shape[1], k.shape[1])

    def choose(self, target: float, max_error: float | None = None) -> tuple[dict, dict]:
        """Per site: one rule per query head, and what was measured for it. A candidate qualifies
        when its CRA reaches ``target`` and (if given) its output error stays within ``max_error``."""
        chosen, measured = {}, {}
        for name, stats in self.sites.items():
            if stats.inputs == 0:
                measured[name] = {"note": stats.note or "never ran"}
                continue
            cra, density, out_err = stats.mean()
            worst_cra, worst_err = stats.worst()  # a rule must serve every calibration length
            qualifies = worst_cra >= target
            if max_error is not None:
                qualifies &= worst_err <= max_error
            rules, rows = [], []
            for h in range(cra.shape[1]):
                # (density, static wins ties, rule, CRA, output error); dense when nothing qualifies
                options = [(1.0, 1, Rule(), 1.0, 0.0)]
                for row, c in enumerate(stats.allowed):
                    if qualifies[row, h]:
                        rule = self.rules[c]
                        options.append((density[row, h].item(), int(rule.adaptive), rule, cra[row, h].item(),
                                        out_err[row, h].item()))  # fmt: skip
                if (elastic := self._elastic(stats, h, target, max_error)) is not None:
                    options.append(elastic)
                dens, _, rule, kept, err = min(options, key=lambda option: option[:2])
                rules.append(rule)
                kept_name = "influence" if self.influence else "cra"  # what the target bounded
                rows.append(
                    {"rule": str(rule), kept_name: round(kept, 4), "density": round(dens, 4), "out_err": round(err, 4)}
                )
            chosen[name], measured[name] = rules, {"heads": rows}
        return chosen, measured

    def choose_budget(self, budget: float, max_error: float | None = None) -> tuple[dict, dict]:
        """Per site: one rule per query head such that the heads' mean density (at the longest
        calibration length) stays within ``budget`` and their summed lost loss (first-order loss
        change of the head's output, or its output error without gradients) is least: MoA's
        allocation across heads, so heads that matter more keep more. Candidates whose output error
        exceeds ``max_error`` (if given) at some length are left out; dense (density 1, nothing
        lost) is always an option."""
        heads, chosen, measured = [], {}, {}
        for name, stats in self.sites.items():
            if stats.inputs == 0:
                measured[name] = {"note": stats.note or "never ran"}
                continue
            kept, _, out_err = stats.mean()
            density, lost = stats.longest_density(), stats.lost()
            _, worst_err = stats.worst()
            for h in range(kept.shape[1]):
                options = [(1.0, 0.0, Rule(), 1.0, 0.0)]  # (density, lost, rule, kept, output error)
                for row, c in enumerate(stats.allowed):
                    if max_error is None or worst_err[row, h] <= max_error:
                        values = (density[row, h], lost[row, h], kept[row, h], out_err[row, h])
                        d, lo, k, e = (v.item() for v in values)
                        options.append((d, lo, self.rules[c], k, e))
                heads.append((name, options))
        picks = allocate([[option[:2] for option in options] for _, options in heads], budget)
        kept_name = "influence" if self.influence else "cra"
        for (name, options), pick in zip(heads, picks, strict=True):
            dens, lost, rule, kept, err = options[pick]
            chosen.setdefault(name, []).append(rule)
            row = {"rule": str(rule), kept_name: round(kept, 4), "density": round(dens, 4), "out_err": round(err, 4)}
            measured.setdefault(name, {"heads": []})["heads"].append(row | {"lost": float(f"{lost:.4g}")})
        return chosen, measured

    def _elastic(self, stats: SiteStats, h: int, target: float, max_error: float | None):
        """MoA's elastic span for head ``h``: at each calibration length the smallest streaming
        window that qualifies there, covered by a line a + b * N through the shortest and longest
        lengths' windows (raised to cover the others). Measured as the grid window at least as
        wide at each length (exact with two lengths). None unless two lengths or more, streaming
        candidates, and a window that grows with N."""
        streaming = [(self.rules[c], row) for row, c in enumerate(stats.allowed) if self.rules[c].kind == "streaming"]
        lengths = sorted(stats.by_length)
        if len(lengths) < 2 or not streaming:
            return None
        sink = streaming[0][0].sink
        windows = sorted((rule.window, row) for rule, row in streaming if rule.sink == sink)
        need = {}
        for n in lengths:
            cra, _, err, _, count = stats.by_length[n]
            ok = [
                w
                for w, row in windows
                if cra[row, h] / count >= target and (max_error is None or err[row, h] / count <= max_error)
            ]
            if not ok:
                return None
            need[n] = ok[0]
        b = round((need[lengths[-1]] - need[lengths[0]]) / (lengths[-1] - lengths[0]), 6)
        if b <= 0:
            return None  # a fixed window serves every length: that streaming candidate covers it
        rule = Rule("elastic", sink=sink, a=math.ceil(max(w - b * n for n, w in need.items())), b=b)
        measured = []
        for n in lengths:
            cra, density, err, _, count = stats.by_length[n]
            width = rule.head_params(n)[1]
            row = next((row for w, row in windows if w >= width), windows[-1][1])
            measured.append((density[row, h].item() / count, cra[row, h].item() / count, err[row, h].item() / count))
        dens, kept, err = (sum(values) / len(measured) for values in zip(*measured, strict=True))
        return dens, 0, rule, kept, err

    @property
    def inputs(self) -> int:
        return max((s.inputs for s in self.sites.values()), default=0)

    def plan(
        self, target: float | None, model, *, data: str, lengths, seed: int = 0, max_error=None, budget=None
    ) -> Plan:  # fmt: skip
        """The plan for ``target`` (or, if given, the density ``budget``) from what was observed (one
        observation serves several targets)."""
        if budget is None:
            chosen, measured = self.choose(target, max_error)
        else:
            chosen, measured = self.choose_budget(budget, max_error)
            target = None
        if not chosen:
            raise ValueError("calibration found no attention site that a sparse rule can serve")
        info = _plan_info(self, target, max_error, measured, data, list(lengths), seed)
        info["density_budget"] = budget
        densities = {name: [h["density"] for h in m["heads"]] for name, m in measured.items() if m.get("heads")}
        return Plan(
            default=Rule(), sites=chosen, fingerprint=model_fingerprint(model), block=self.block, densities=densities,
            info=info,
        )  # fmt: skip


def allocate(options: list[list[tuple[float, float]]], budget: float, resolution: float = 1e-3) -> list[int]:
    """For each item (a head), the index of one of its (density, loss) options such that the mean
    density is at most ``budget`` and the summed loss is least: a multiple-choice knapsack solved
    exactly by dynamic programming over densities rounded up to ``resolution`` (so the budget always
    holds). ValueError if even the sparsest options exceed the budget."""
    if not options:
        return []
    sparsest = sum(min(d for d, _ in o) for o in options) / len(options)
    if sparsest > budget + 1e-12:
        raise ValueError(
            f"no choice of rules meets the density budget {budget}: the sparsest allowed average {sparsest:.3f} "
            "(loosen max_error or add sparser candidates)"
        )

    def units(density: float) -> int:  # rounded up, but not for float noise (at most 1e-3 units)
        return math.ceil(density / resolution - 1e-3)

    capacity = int(budget * len(options) / resolution + 1e-3)
    best = torch.zeros(capacity + 1, dtype=torch.float64)  # least loss of the items so far within c units
    choices = []
    for opts in options:
        new = torch.full_like(best, math.inf)
        choice = torch.full((capacity + 1,), -1, dtype=torch.int16)
        for i, (density, loss) in enumerate(opts):
            w = units(density)
            if w > capacity:
                continue
            candidate = best[: capacity + 1 - w] + loss
            better = candidate < new[w:]
            new[w:] = torch.where(better, candidate, new[w:])
            choice[w:][better] = i
        best = new
        choices.append(choice)
    picks, c = [], capacity
    for opts, choice in zip(reversed(options), reversed(choices), strict=True):
        i = int(choice[c])
        picks.append(i)
        c -= units(opts[i][0])
    return picks[::-1]


def _plan_info(calibrator, target, max_error, measured, data, lengths, seed) -> dict:
    return {
        "made_by": "sparsecomp.calibrate",
        "target_cra": target,  # None when a density budget chose the rules
        "selected_on": "influence" if calibrator.influence else "cra",
        "max_out_err": max_error,
        "candidates": [str(r) for r in calibrator.rules],
        "data": data,
        "inputs": calibrator.inputs,
        "lengths": lengths,
        "block": calibrator.block,
        "seed": seed,
        "measured": measured,
    }


def _as_id_lists(inputs, tokenizer, lengths) -> tuple[list, str]:
    if inputs is None:
        if tokenizer is None:
            raise ValueError("the default calibration set needs a tokenizer (or pass inputs: token ids)")
        files = ", ".join(CALIBRATION_FILES)
        return default_calibration_ids(tokenizer, lengths), f"default: stdlib {files} + pass key prompts"
    if isinstance(inputs, torch.Tensor):
        inputs = list(inputs.reshape(-1, inputs.shape[-1]))
    out = []
    for item in inputs:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("text inputs need a tokenizer")
            item = tokenizer(item)["input_ids"]
        out.append(item)
    return out, f"user: {len(out)} inputs"


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a plain counter on stderr
        return _plain_progress(items, desc)
    return tqdm(items, desc=desc)


def _plain_progress(items, desc):
    for i, item in enumerate(items):
        print(f"\r{desc}: {i + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield item
    print(file=sys.stderr)


def calibrate(
    model: torch.nn.Module,
    inputs=None,
    *,
    target: float = 0.9,
    max_error: float | None = 0.1,
    influence: bool = False,
    budget: float | None = None,
    rules=None,
    lengths=(2048, 4096),
    tokenizer=None,
    block: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Plan:
    """A Plan giving each site and query head the cheapest candidate rule whose attention mass kept
    (CRA, averaged over the inputs of each length) reaches ``target`` at every input length and, if
    ``max_error`` is given, whose attention output error (relative L2 vs exact) stays within it.

    ``inputs``: token id tensors / lists, or strings with ``tokenizer``; default: standard library
    sources and pass key prompts at each of ``lengths`` (needs ``tokenizer``). ``rules``: the
    candidate kinds (see ``candidate_rules``) or a list of Rules. ``block``: the sparse index
    block size the plan is measured at (use the compile's ``kernel_options`` block size). The
    defaults (CRA 0.9, output error 0.1) gave the best accuracy per density on SmolLM2
    (docs/internals/calibration-notes.md); ``max_error=None`` selects on CRA alone. ``influence=True``: MoA's
    attention x gradient influence (``recall.kept_mass``) replaces CRA as what ``target`` bounds;
    each input then also runs backward from its next-token loss.

    ``budget`` (a mean attention density in (0, 1]) replaces the per-head target with MoA's
    allocation across heads (``Calibrator.choose_budget``): least summed lost influence (with
    ``influence``; else output error) within the budget. Best with ``influence=True``: the lost
    influence weighs each head by how much the model's loss depends on it."""
    if budget is None and not 0 < target <= 1:
        raise ValueError(f"target={target}; the attention mass to keep is in (0, 1]")
    if budget is not None and not 0 < budget <= 1:
        raise ValueError(f"budget={budget}; a mean attention density is in (0, 1]")
    torch.manual_seed(seed)
    ids, data = _as_id_lists(inputs, tokenizer, lengths)
    if not ids:
        raise ValueError("no calibration inputs (documents shorter than every length?)")
    longest = max(len(x) for x in ids)
    candidates = list(rules) if rules and isinstance(next(iter(rules)), Rule) else candidate_rules(rules, longest)
    calibrator = observe(model, ids, candidates, block, progress=progress, influence=influence)
    lengths = sorted({len(x) for x in ids})
    return calibrator.plan(target, model, data=data, lengths=lengths, seed=seed, max_error=max_error, budget=budget)


def observe(
    model: torch.nn.Module, ids, rules: list[Rule], block: int, *, progress: bool = False, influence: bool = False
) -> Calibrator:  # fmt: skip
    """Run the model on each input (token ids) with every site observed; the Calibrator holds the
    per-site, per-candidate, per-head CRA (or, with ``influence``, kept loss influence: each input
    also runs backward from its next-token loss), density and output error."""
    calibrator = Calibrator(list(rules), block, influence=influence, names_by_id=module_names_by_id(model))
    device = next(model.parameters()).device
    observed = torch.compile(model, backend=calibrator.backend, dynamic=False)
    for item in _progress(ids, progress, "calibrating"):
        x = torch.as_tensor(item, device=device)
        x = x[None] if x.dim() == 1 else x
        if not influence:
            with torch.no_grad():
                observed(x)
            continue
        out = observed(x)
        logits = getattr(out, "logits", out)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        loss.backward()  # the output hooks measure each site as its gradient arrives
        model.zero_grad(set_to_none=True)
    return calibrator


def measure_plan(model: torch.nn.Module, plan: Plan, ids, block: int) -> dict:
    """Mean attention density, CRA and output error of ``plan`` over the heads of every site a sparse
    rule may serve, measured on ``ids`` (dense heads count as density 1, CRA 1, error 0)."""
    entries = [r for v in plan.sites.values() for r in (v if isinstance(v, list) else [v])] + [plan.default]
    rules = sorted({r for r in entries if r.kind != "dense"}, key=str)
    calibrator = observe(model, ids, rules, block)
    per_head = []  # (density, CRA, output error) of each head's rule
    for name, stats in calibrator.sites.items():
        if stats.inputs == 0:
            continue
        cra, density, out_err = stats.mean()
        hq, hkv = stats.heads
        for h, rule in enumerate(plan.rules_for(name, hq, hkv)):
            if rule.kind == "dense" or rules.index(rule) not in stats.allowed:
                per_head.append((1.0, 1.0, 0.0))
            else:
                row = stats.allowed.index(rules.index(rule))
                per_head.append((density[row, h].item(), cra[row, h].item(), out_err[row, h].item()))
    n = max(1, len(per_head))
    mean = [sum(values) / n for values in zip(*per_head, strict=True)] if per_head else [1.0, 1.0, 0.0]
    return {"density": mean[0], "cra": mean[1], "out_err": mean[2], "heads": len(per_head)}
