"""Shipped cost model coefficients, used on a Hopper GPU that has no fit of its own yet
(``sparsecomp autotune`` fits one and stores it in the tuning cache); ``shipped_fit`` picks one by
GPU name.

- ``H200_COST_MODEL``: fitted on an H200 by ``benchmarks/cost_model.py`` (torch 2.11, triton 3.6),
  stored beside this module as ``h200_cost_model.json`` (its ``info`` names the grid it was fitted
  on); the H200's end-to-end decisions: ``benchmarks/results/ttft.md``.
- ``H100_COST_MODEL``: fitted on an H100 80GB HBM3 (torch 2.11, triton 3.6;
  ``benchmarks/results/cost_model.md``), used on every other Hopper GPU. The fit: kernels from
  random and streaming selections at 1K-64K; index builders compiled whole (dynamic shapes, sparse
  ops opaque) and timed as CUDA-graph replays, refitted after the vertical-slash builder got 1.8x
  faster (``benchmarks/results/cost_model_index_refit.json``).
"""

import json
import re
from pathlib import Path

H100_COST_MODEL = {
    "sms": 132,
    "engines": {
        "sdpa": {
            "64": [0.004552403789314991, 1.1368363403740276, 221.07265311165864, 0.0],
            "128": [0.001529012024858125, 0.8364896894838352, 448.5188124046939, 0.0],
        },
        "sdpa_masked": {
            "64": [0.007696429613759768, 2.056626400117355, 0.0321347875034795, 334.71475413957904],
            "128": [0.01367231059914907, 1.647572943459798, 0.012871663620779678, 0.0],
        },
        "b128": {
            "64": [0.007235576051483724, 1.6526943176776852, 145.73761910754934, 457.4706433392674],
            "128": [0.006892148260312244, 1.0665758431700458, 121.18090367095566, 420.0616906264037],
        },
        "b128-n64-w4": {
            "64": [0.008202959911056162, 1.9381187314438768, 223.0417080543389, 524.0414146489354],
            "128": [0.012283856135969664, 1.5380431904723142, 507.8849337327129, 443.0299645412984],
        },
        "b128-m64-w4": {
            "64": [0.0077962037256416854, 1.4043567668197348, 117.91244592238355, 373.54767378035143],
            "128": [0.005491904448594194, 1.440438214237412, 161.7714186224299, 536.9544481328228],
        },
        "b64": {
            "64": [0.008748604441442955, 1.4938586531940627, 22.69873714314726, 310.59079510590266],
            "128": [0.004767089218686911, 1.8426198639854838, 0.0, 516.6711698170769],
        },
    },
    "index": {  # refit (benchmarks/results/cost_model_index_refit.json)
        "static": [0.024905272414018603, 140.84849220836404],
        "vertical_slash": [0.141805076328991, 5.178990956207412],
        "sample": [0.11572939096755619, 1.411484406769767],
        "block_topk": [0.05912125257536951, 104.48126337396516],
    },
    "info": {
        "gpu": "NVIDIA H100 80GB HBM3",
        "head_dims": [64, 128],
        "heads": [32, 8],
        "dtype": "bfloat16",
        "lengths": [1024, 2048, 4096, 16384, 65536],
        "densities": [0.05, 0.3, 1.0],
    },
}

# Decode steps (sparsecomp/tuning/decode_cost.py), fitted on an H200 by benchmarks/decode_cost_fit.py
# (benchmarks/results/decode_cost_fit.md); used on Hopper GPUs, the H100 included (its lower
# bandwidth slows dense and selection steps alike, so their crossover moves little).
H200_DECODE_COST_MODEL = {
    "coefficients": {
        "dense": [0.008273025295413461, 2.189404662268104e-10],
        "summary": [0.0013617119860913377, 3.5101718763072636e-10],
        "top_k": [0.055220136322145695, 1.3931637504611514e-08],
        "attention": [0.004609009115537958, 2.9280660834333595e-10],
    },
    "info": {
        "gpu": "NVIDIA H200",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "fitted_on": "benchmarks/results/decode_attention.json",
    },
}

H200_COST_MODEL = json.loads((Path(__file__).parent / "h200_cost_model.json").read_text())


def shipped_fit(gpu_name: str) -> tuple[dict, str]:
    """The shipped prefill fit for a Hopper GPU of this name, and the fit's name for the report."""
    if re.search(r"\bH200\b", gpu_name):  # the H200 only (not a GH200: another board, not measured)
        return H200_COST_MODEL, "H200 fit"
    return H100_COST_MODEL, "H100 fit"
