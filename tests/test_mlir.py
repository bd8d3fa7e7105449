"""report.to_mlir: a rewritten graph in MLIR's torch dialect, the sparse op a custom op (runs
where the mlir extra is installed)."""

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp.report import InspectReport

pytest.importorskip("torch_mlir")
pytest.importorskip("transformers")


def compiled_report(plan):
    model = tiny_llama().eval()
    compiled = sparsecomp.compile(model, plan, dynamic=False)
    with torch.no_grad():
        compiled(torch.randint(0, 100, (1, 64), generator=torch.Generator().manual_seed(0)), use_cache=False)
    return sparsecomp.inspect(compiled)


def test_a_streaming_plan_lowers_with_one_sparse_op_per_layer():
    text = str(compiled_report("streaming:sink=8,window=16").to_mlir())
    ops = [line for line in text.splitlines() if 'torch.operator "torch.sparsecomp.sparse_attention"' in line]
    assert len(ops) == 2  # tiny_llama's two layers
    assert all("!torch.vtensor<[1,4,64,16],f32>" in op for op in ops)  # q in, output out: (B, Hq, N, D)
    assert "torch.aten.mm" in text or "torch.aten.linear" in text  # the rest of the model is there too


def test_the_dense_plan_lowers_with_no_sparse_op():
    text = str(compiled_report("dense").to_mlir())
    assert "func.func @rewritten" in text and "torch.sparsecomp" not in text


def test_nothing_compiled_is_an_error():
    with pytest.raises(ValueError, match="compile and run the model first"):
        InspectReport([]).to_mlir()
