"""Dynamo backends that watch a model's attention without changing it: each causal site's real
inputs go through an ``observe(out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, causal, window)``
call that returns ``out`` (channel calibration, the inputs a site's picture is drawn on)."""

from __future__ import annotations

import torch

from sparsecomp.passes.fxutil import eliminate_dead_code
from sparsecomp.passes.rewrite import observe_site
from sparsecomp.passes.site import module_names_by_id

from ..compiler.prepare import prepare_graph
from ..plan import Plan


def observing_backend(observe, names_by_id, accept=lambda site: True):
    """A backend routing every causal site that ``accept(site)`` through ``observe``."""

    def backend(gm, example_inputs):
        with torch.no_grad():
            graph = prepare_graph(gm, Plan(), names_by_id=names_by_id)
        for prepared in graph.sites:
            site = prepared.site
            if site.fallback is None and site.structure.causal and accept(site):
                observe_site(gm, site, observe)
        eliminate_dead_code(gm)  # keeps in-place KV-cache writes
        gm.recompile()
        return gm.forward

    return backend


def is_prefill(site) -> bool:
    """A site whose queries are its keys (a prompt's attention, not a decode step)."""
    return str(site.shape["q_len"]) == str(site.shape["kv_len"])


def observe_prefill(model: torch.nn.Module, observe, inputs, *, shortest: int = 1, why: str = "") -> None:
    """Run ``model`` on each of ``inputs`` (token-id tensors, (N,) or (B, N)) with every causal
    prefill site routed through ``observe``; an input of fewer than ``shortest`` tokens is refused
    (``why`` says why)."""
    observed = torch.compile(model, backend=observing_backend(observe, module_names_by_id(model), is_prefill),
                             dynamic=False)  # fmt: skip
    device = next(model.parameters()).device
    with torch.no_grad():
        for item in inputs:
            x = torch.as_tensor(item, device=device)
            x = x[None] if x.dim() == 1 else x
            if x.shape[1] < shortest:
                raise ValueError(f"an input of {x.shape[1]} tokens: {why}")
            observed(x)
    torch._dynamo.reset()  # the observing graphs are of no further use


def site_inputs(model: torch.nn.Module, ids: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k) that the attention site ``name`` sees when ``model`` runs on token ids ``ids``."""
    captured = {}

    def observe(out, q, k, v, q_pos, k_pos, key_ok, *, site, scale, causal, window):
        if site == name:
            captured[site] = (q.detach(), k.detach())
        return out

    observed = torch.compile(model, backend=observing_backend(observe, module_names_by_id(model)), dynamic=False)
    with torch.no_grad():
        observed(ids)
    torch._dynamo.reset()  # the observing graphs are of no further use
    if name not in captured:
        raise ValueError(f"no causal attention site named {name!r} ran")
    return captured[name]
