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
