"""The state a decode selection pattern keeps beside a static KV cache (Double Sparsity's label
cache, Quest's page min/max), written inside the compiled graphs, never through the host.

A static cache (``cache_implementation="static"``) has a fixed length, so its state is allocated
once per (site, batch, cache length) when the prefill graph is compiled, and passed to each graph
that reads or writes it as extra inputs (``state_inputs``). The prefill graph writes it whole from the site's K (the
cache after the prompt's write); each decode step rewrites the unit (key, or page) holding its new
key, then selects from it. State over keys no query sees (padding, rows not written yet) is never
read: the selection and the kernel mask those keys. Sites without a static length (DynamicCache)
summarize all of K at each step instead (``rewrite_decode_site`` with no state).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sparsecomp.passes.match import default_scale
from sparsecomp.passes.rewrite import channel_values, key_prefix
from sparsecomp.passes.site import AttentionSite, meta_val

from ..patterns import PATTERNS


def new_key_position(key_ok: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """(1,) int64: the cache index of this step's key, the last valid key (a static cache's key mask
    is valid up to the step's position in every batch row; with no mask, the last key)."""
    if key_ok is None:
        return torch.full((1,), k.shape[2] - 1, dtype=torch.int64, device=k.device)
    index = torch.arange(key_ok.shape[-1], device=key_ok.device)
    return (key_ok * index).amax().view(1)


def unit_rows(position: torch.Tensor, unit: int, n_keys: int) -> torch.Tensor:
    """The key indices of the unit (``unit`` keys) holding ``position``, clamped inside the cache."""
    return ((position // unit) * unit + torch.arange(unit, device=position.device)).clamp(max=n_keys - 1)


def summarize_unit(kind: str, keys, key_ok, channel_index, position, unit: int, **params):
    """The state of the unit holding ``position`` alone, from its keys (B, Hkv, unit, D), by the
    pattern of rule kind ``kind``."""
    summarize = PATTERNS[kind].summarize
    rows = unit_rows(position, unit, keys.shape[2])
    ok = None if key_ok is None else key_ok.index_select(1, rows)
    if ok is not None:
        ok = ok & (rows <= position)  # rows after this step's key are not written yet
    return summarize(keys.index_select(2, rows), ok, channel_index, **params)


class DecodeStates:
    """One compiled model's decode state tensors, by (site, batch, cache length, rule)."""

    def __init__(self):
        self.tensors: dict[tuple, tuple[torch.Tensor, ...]] = {}

    @staticmethod
    def key(site: AttentionSite, rule) -> tuple | None:
        """The key of a site's state, or None where its lengths are not static (no state kept)."""
        sh = site.shape
        if not all(isinstance(sh[n], int) for n in ("batch", "kv_len")):
            return None
        return site.name, sh["batch"], sh["kv_len"], str(rule)

    def allocate(self, site: AttentionSite, rule, pattern, params: dict, channels) -> tuple[torch.Tensor, ...]:
        """Zeroed state for a static cache site, shaped by running the pattern's summary on meta tensors."""
        k = meta_val(site.k)
        ch = None if channels is None else torch.tensor(channels, dtype=torch.int64, device="meta")
        shapes = pattern.summarize(torch.empty(k.shape, dtype=k.dtype, device="meta"), None, ch, **params)
        state = tuple(torch.zeros(t.shape, dtype=t.dtype, device=k.device) for t in shapes)
        self.tensors[self.key(site, rule)] = state
        return state


def state_inputs(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The state tensors a rewritten graph takes after its own inputs (the backend passes them)."""
    return list(getattr(gm, "_sparsecomp_state_inputs", {}).values())


def _state_nodes(gm: fx.GraphModule, state: tuple[torch.Tensor, ...]) -> list[fx.Node]:
    """Placeholders for ``state``, after the graph's own inputs (graph buffers would need a source
    in the model for Dynamo's Inductor path; inputs need none, and keep their address: static)."""
    inputs = gm.__dict__.setdefault("_sparsecomp_state_inputs", {})
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    out = []
    for tensor in state:
        name = f"sparsecomp_decode_state_{id(tensor)}"
        if name not in inputs:
            last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
            with gm.graph.inserting_after(last):
                nodes[name] = gm.graph.placeholder(name)
            nodes[name].meta["val"] = tensor
            # static for CUDA graphs (read and written in place, never copied): AOT reads the mark
            # from the placeholder, which has no source in the user's code
            torch._dynamo.mark_static_address(tensor)
            nodes[name]._dynamo_source = None
            nodes[name].meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            inputs[name] = tensor
        out.append(nodes[name])
    return out


def write_prefill_state(
    gm: fx.GraphModule, site: AttentionSite, state, pattern, params: dict, channels, prompt_site=None
) -> None:
    """At the prefill of a static cache: the whole state from the site's K (in-place copies), or,
    for a pattern that summarizes the prompt's attention, from ``prompt_site`` (the site as traced:
    its queries, keys and mask) padded to the state's length."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        ch = None if channels is None else graph.call_function(channel_values, (channels, site.q))
        if pattern.summarize_prompt is not None:
            ps = prompt_site or site
            args = (ps.q, ps.k, ps.mask, bool(ps.causal), ch, state[0].shape[2])
            fresh = graph.call_function(pattern.summarize_prompt, args, {**params, "scale": float(default_scale(ps))})
        else:
            fresh = graph.call_function(pattern.summarize, (site.k, None, ch), params)
        for i, buffer in enumerate(_state_nodes(gm, state)):
            graph.call_method("copy_", (buffer, graph.call_function(operator.getitem, (fresh, i))))


def update_decode_state(
    gm: fx.GraphModule, site: AttentionSite, state, pattern, params: dict, channels
) -> list[fx.Node]:
    """At a decode step: rewrite the unit holding the new key; returns the updated state's nodes
    (the selection reads them, so it runs after the writes)."""
    graph = gm.graph
    unit = pattern.state_unit(params)
    with graph.inserting_before(site.output):
        ch = None if channels is None else graph.call_function(channel_values, (channels, site.q))
        key_ok = site.structure.key_ok
        key_ok_node = None if key_ok is None else graph.call_function(key_prefix, (key_ok, site.k))
        position = graph.call_function(new_key_position, (key_ok_node, site.k))
        fresh = graph.call_function(summarize_unit, (pattern.kind, site.k, key_ok_node, ch, position, unit), params)
        index = graph.call_function(torch.floor_divide, (position, unit))
        return [
            graph.call_method("index_copy_", (buffer, 2, index, graph.call_function(operator.getitem, (fresh, i))))
            for i, buffer in enumerate(_state_nodes(gm, state))
        ]
