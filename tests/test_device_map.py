"""Models placed by accelerate (``from_pretrained(..., device_map=...)``) compile with sparsecomp: the
same sites, the same logits as the model loaded whole, with accelerate's offloading hooks too."""

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

PLAN = "streaming:sink=4,window=16"
DISK_OFFLOAD = {  # layer 1's weights on disk: accelerate's hooks load them at each forward
    "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
}  # fmt: skip


@pytest.mark.parametrize("device_map", ["auto", "disk-offload"])
def test_placed_models_compile_to_the_same_sites_and_logits(device_map, tmp_path):
    model = tiny_llama().eval()
    model.save_pretrained(tmp_path / "model")
    ids = torch.randint(1, 100, (1, 40))
    with torch.no_grad():
        want = sparsecomp.compile(model, PLAN, cost_model=False)(ids).logits
    torch._dynamo.reset()
    placed = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=DISK_OFFLOAD if device_map == "disk-offload" else "auto",
        offload_folder=tmp_path / "offload", attn_implementation="sdpa",
    ).eval()  # fmt: skip
    hooked = sum(hasattr(m, "_hf_hook") for m in placed.modules())
    assert hooked > 0 if device_map == "disk-offload" else hooked == 0
    compiled = sparsecomp.compile(placed, PLAN, cost_model=False)
    with torch.no_grad():
        got = compiled(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    sites = sparsecomp.inspect(compiled).sites
    assert [s.became for s in sites] == ["sparse_attention", "sparse_attention"], str(sparsecomp.inspect(compiled))
