"""The inspect report: for every attention site, what it became and why."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

# What a rewritten site became: the sparse kernel with sparse heads; the same kernel with every head
# dense (the mask made structure); SDPA's fused causal kernels (a mask proven plain causal).
REWRITTEN = ("sparse_attention", "sparse_decode", "dense_attention", "sdpa_causal")


@dataclass
class SiteReport:
    name: str
    form: str
    shape: dict
    dtype: str
    became: str  # one of REWRITTEN, or "kept" (the original attention, exactly)
    reason: str  # why (the fallback reason, or what the rewrite did)
    mask: str = "-"
    rules: list[str] = field(default_factory=list)
    density: float | None = None  # kept fraction of the attention pairs, at the traced length
    gqa_folded: bool = False
    phase: str = "prefill"  # or "decode": a few query rows against a longer KV cache
    decision: object = None  # the sparsecomp.compiler.decide.Decision behind "became" (None: never decided)

    def choice(self) -> tuple[str, str, str]:
        """(choice, its predicted or measured ms, the runner-up and its ms) for the table."""
        d = self.decision
        if d is None:
            return "-", "-", "-"

        def ms(value):
            return "-" if value is None else f"{value:.3g}"

        choice = d.option + (f" (N>={d.crossover} sparse)" if d.crossover else "")
        runner = "-" if d.runner_up is None else f"{d.runner_up} {ms(d.runner_up_ms)}"
        return choice, ms(d.predicted_ms), runner

    def rules_summary(self) -> str:
        if not self.rules:
            return "-"
        distinct = sorted(set(self.rules), key=self.rules.index)
        if len(distinct) == 1:
            return f"{distinct[0]} x{len(self.rules)}"
        return ", ".join(f"{r} x{self.rules.count(r)}" for r in distinct)


@dataclass
class GraphReport:
    graph_module: fx.GraphModule
    sites: list[SiteReport]
    warnings: list[str] = field(default_factory=list)  # e.g. plan sites this graph does not have

    def code(self) -> str:
        return self.graph_module.code

    def phase(self) -> str:
        """ "decode" when every site is a decode step (``SiteReport.phase``), else "prefill"."""
        return "decode" if self.sites and all(s.phase == "decode" for s in self.sites) else "prefill"


class InspectReport:
    """What ``sparsecomp.inspect`` returns. The latest compiled graph is the default view."""

    def __init__(self, graphs: list[GraphReport], plan=None, states=None, step_graphs=()):
        self.graphs = graphs
        self.plan = plan
        self.states = states  # the decode state kept beside static caches (DecodeStates)
        self.step_graphs = list(step_graphs)  # DecodeStepGraphs of a compile(..., cuda_graphs=True)

    def memory(self, cache):
        """Per decoder layer and in total, the bytes of ``cache``'s K/V on the GPU and on the host and
        of the decode state this model keeps beside it, against a dense GPU cache (``MemoryReport``)."""
        from .runtime.kv_memory import kv_memory

        return kv_memory(cache, self.states)

    def plan_summary(self) -> str:
        """Where the plan came from: a preset, a calibration (its target and data), or the default."""
        if self.plan is None:
            return "plan: -"
        info = self.plan.info
        if info.get("made_by") == "sparsecomp.calibrate":
            by_influence = info.get("selected_on") == "influence"
            if info.get("density_budget") is not None:  # a budget minimizes a loss, no target
                loss = "lost influence" if by_influence else "output error"
                goal = f"least {loss} at density <= {info['density_budget']}"
            else:
                goal = f"{'INFLUENCE' if by_influence else 'CRA'} >= {info.get('target_cra')}"
            return (
                f"plan: calibrated for {goal} on {info.get('inputs')} inputs "
                f"({info.get('data')}; lengths {info.get('lengths')}; blocks of {info.get('block')})"
            )
        if "preset" in info:
            return f"plan: preset {info['preset']!r}"
        return f"plan: default rule {self.plan.default}" + (
            f", {len(self.plan.sites)} sites named" if self.plan.sites else ""
        )

    def calibrated(self, site: str) -> str:
        """Mean over the site's heads of the CRA and density calibration measured for its rules."""
        heads = (self.plan.info.get("measured", {}).get(site, {}).get("heads") if self.plan else None) or []
        if not heads:
            return "-"
        cra = sum(h.get("cra", h.get("influence", 0.0)) for h in heads) / len(heads)
        density = sum(h["density"] for h in heads) / len(heads)
        return f"{cra:.3f} / {density:.1%}"

    @property
    def sites(self) -> list[SiteReport]:
        """Every site of every graph (a model split by graph breaks compiles into several), in the
        order first seen; a site compiled again (a recompile for new shapes) shows its latest."""
        latest: dict[str, SiteReport] = {}
        for graph in self.graphs:
            for site in graph.sites:
                latest[site.name] = site
        return list(latest.values())

    def site(self, name: str) -> SiteReport:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(f"no site named {name!r}; sites: {[s.name for s in self.sites]}")

    def code(self) -> str:
        """The rewritten FX code of the latest graph."""
        return self.graphs[-1].code() if self.graphs else ""

    def to_networkx(self):
        """The rewritten graph as a networkx DiGraph; nodes carry op, target and site annotations."""
        import networkx as nx

        g = nx.DiGraph()
        if not self.graphs:
            return g
        for node in self.graphs[-1].graph_module.graph.nodes:
            attrs = {"op": node.op, "target": str(node.target)}
            if "sparsecomp_site" in node.meta:
                attrs["site"] = node.meta["sparsecomp_site"]
            g.add_node(node.name, **attrs)
            for inp in node.all_input_nodes:
                g.add_edge(inp.name, node.name)
        return g

    def to_mlir(self, graph: int = -1):
        """Graph ``graph`` (default: the latest) as an MLIR module of the torch dialect, the sparse
        ops as custom ops (torch-mlir: ``pip install 'sparsecomp[mlir]'``); ``str()`` gives its text."""
        from .mlir_export import to_mlir

        if not self.graphs:
            raise ValueError("nothing to lower: compile and run the model first")
        return to_mlir(self.graphs[graph].graph_module)

    def plot(self, path, site: str | None = None, length: int | None = None, *, q=None, k=None, pixels: int = 128):
        """Write a picture to ``path`` (matplotlib): with ``site``, per head the pairs its prefill rules
        keep at ``length`` keys (default: the traced length; adaptive rules on that site's ``q`` and
        ``k``); without, a site x head map of the plan's rules and calibrated densities."""
        from . import plots

        if self.plan is None or not self.sites:
            raise ValueError("nothing to plot: compile and run the model first")
        heads = {s.name: (s.shape["q_heads"], s.shape["kv_heads"]) for s in self.sites}
        if site is None:
            return plots.plot_plan(path, self.plan, [(name, *h) for name, h in heads.items()])
        s = self.site(site)
        length = length or s.shape["kv_len"]
        if not isinstance(length, int):
            raise ValueError(f"site {site} was traced with a symbolic length {length}: give length=")
        rules = self.plan.rules_for(site, *heads[site])
        plots.plot_kept(
            path, rules, length, q=q, k=k, kv_heads=heads[site][1], head_dim=s.shape["head_dim"], pixels=pixels,
            title=f"{site}: kept pairs at N={length} (rows: queries, columns: keys)",
        )  # fmt: skip

    def _table(self, sites: list[SiteReport]) -> list[str]:
        header = ("site", "form", "B,Hq/Hkv,Nq,Nk,D", "dtype", "became", "rules", "density", "calib. CRA / density",
                  "choice", "ms", "runner-up ms", "mask / reason")  # fmt: skip
        rows = []
        for s in sites:
            sh = s.shape
            shape = f"{sh['batch']},{sh['q_heads']}/{sh['kv_heads']},{sh['q_len']},{sh['kv_len']},{sh['head_dim']}"
            density = "-" if s.density is None else f"{s.density:.1%}"
            why = s.mask if s.became in REWRITTEN else s.reason
            if s.became in REWRITTEN and s.reason:
                why = f"{s.reason}; {why}"
            calib = self.calibrated(s.name)
            rows.append((s.name, s.form, shape, s.dtype, s.became, s.rules_summary(), density, calib, *s.choice(), why))
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        counts = {b: sum(s.became == b for s in sites) for b in dict.fromkeys(s.became for s in sites)}
        lines.append(f"{len(sites)} attention sites: " + ", ".join(f"{n} {b}" for b, n in counts.items()))
        return lines

    def __str__(self) -> str:
        if not self.graphs:
            return "sparsecomp: no compiled graph yet (run the compiled model once)"
        lines = []
        for i, graph in enumerate(self.graphs):
            lines.append(f"graph {i} ({graph.phase()}):")
            lines.extend(self._table(graph.sites) if graph.sites else ["no attention sites"])
            lines.extend(f"warning: {w}" for w in graph.warnings)
            lines.append("")
        n_sparse = sum(s.became in ("sparse_attention", "sparse_decode") for s in self.sites)
        lines.append(f"{len(self.sites)} attention sites: {n_sparse} with sparse heads")
        lines.append(self.plan_summary())
        sources = sorted({s.decision.source for s in self.sites if s.decision is not None})
        lines.extend(f"decided by: {source}" for source in sources)
        lines.extend(steps.summary() for steps in self.step_graphs)
        return "\n".join(lines)

    __repr__ = __str__
