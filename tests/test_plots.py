"""Pictures: the kept-pair map of a site's rules against a token-level reference, the images the
report and the ``inspect`` command write (non-empty PNGs), and their errors."""

import pytest
import torch
from tiny_models import tiny_llama

import sparsecomp
from sparsecomp import cli, plots
from sparsecomp.calibration.observe import site_inputs
from sparsecomp.plan import Plan, Rule

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG) and len(data) > 2000


def test_kept_fraction_of_a_streaming_head_is_its_token_mask_pooled():
    n, sink, window, cell = 96, 8, 16, 4
    rules = [Rule("streaming", sink=sink, window=window), Rule("dense")]
    got = plots.kept_fraction(rules, n, kv_heads=1, block=16, pixels=n // cell)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    causal = j <= i
    kept = causal & ((j < sink) | (i - j < window))
    pooled = kept.double().view(n // cell, cell, n // cell, cell).sum((1, 3))
    allowed = causal.double().view(n // cell, cell, n // cell, cell).sum((1, 3))
    want = (pooled / allowed).where(allowed > 0, float("nan")).float()
    assert torch.allclose(got[0], want, equal_nan=True)
    assert torch.allclose(got[1], torch.ones_like(want).where(allowed > 0, float("nan")), equal_nan=True)


def test_adaptive_rules_need_the_inputs_they_are_drawn_on():
    with pytest.raises(ValueError, match="adaptive rules .*vertical_slash.* give q and k"):
        plots.kept_fraction([Rule("vertical_slash", n_vertical=8, n_slash=8)], 64)


def compiled_tiny(plan):
    model = tiny_llama().eval()
    ids = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(0))
    compiled = sparsecomp.compile(model, plan, dynamic=False)
    with torch.no_grad():
        compiled(ids)
    return model, ids, sparsecomp.inspect(compiled)


def test_report_plots_the_plan_map_and_a_sites_kept_pairs(tmp_path):
    plan = Plan.from_any("prefill=streaming:sink=8,window=32;decode=double_sparsity:channels=4,ratio=0.25")
    _, _, report = compiled_tiny(plan)
    report.plot(tmp_path / "plan.png")
    report.plot(tmp_path / "site.png", site="model.layers.1.self_attn")
    assert is_png(tmp_path / "plan.png") and is_png(tmp_path / "site.png")
    with pytest.raises(KeyError, match="no site named 'model.layers.9.self_attn'"):
        report.plot(tmp_path / "x.png", site="model.layers.9.self_attn")


def test_an_adaptive_site_is_drawn_on_its_own_inputs(tmp_path):
    plan = Plan(default=Rule("vertical_slash", n_vertical=16, n_slash=16, last_q=32, sink=8, local=16))
    model, ids, report = compiled_tiny(plan)
    q, k = site_inputs(model, ids, "model.layers.0.self_attn")
    assert q.shape == (1, 4, 128, 16) and k.shape == (1, 2, 128, 16)
    with pytest.raises(ValueError, match="give q and k"):
        report.plot(tmp_path / "site.png", site="model.layers.0.self_attn")
    report.plot(tmp_path / "site.png", site="model.layers.0.self_attn", q=q, k=k)
    assert is_png(tmp_path / "site.png")
    kept = plots.kept_fraction(plan.rules_for("model.layers.0.self_attn", 4, 2), 128, q=q, k=k, block=16)
    assert 0 < kept.nanmean() < 1  # a budget below the causal pairs keeps some of them


class CharTokenizer:
    def __call__(self, text):
        return {"input_ids": [ord(c) % 100 for c in text]}


def test_inspect_command_prints_the_report_and_writes_the_picture(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(cli, "_load_model", lambda name, **kwargs: (tiny_llama().eval(), CharTokenizer()))
    argv = ["inspect", "--model", str(folder), "--plan", "vertical_slash:n_vertical=16,n_slash=16,last_q=32",
            "--length", "128", "--device", "cpu", "--plot", str(tmp_path / "site.png"),
            "--plot-site", "model.layers.1.self_attn"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 attention sites: 2 sparse_attention" in out and f"wrote {tmp_path / 'site.png'}" in out
    assert is_png(tmp_path / "site.png")
    assert cli.main([*argv[:-1], "model.layers.7.self_attn"]) == 2
    assert "--plot-site 'model.layers.7.self_attn': no such site" in capsys.readouterr().err
    too_long = ["inspect", "--model", str(folder), "--length", str(10**8), "--device", "cpu"]
    assert cli.main(too_long) == 2 and "longer than every calibration document" in capsys.readouterr().err


def import_ttft():
    """benchmarks/ttft.py, a script beside the package."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import ttft

    return ttft


def test_ttft_plots_speedup_and_memory_per_batch(tmp_path):
    ttft = import_ttft()

    rows = [
        {"path": path, "N": n, "batch": b, "ms": ms * n / 1024, "peak_gib": n / 4096}
        for b in (1, 4)
        for n in (1024, 4096)
        for path, ms in (("eager", 2.0), ("streaming", 1.0), ("floor", 0.5))
    ]
    for b in (1, 4):
        for n in (1024, 4096):
            ttft.with_ratios([r for r in rows if r["batch"] == b and r["N"] == n])
    assert {r["vs_best_dense"] for r in rows if r["path"] == "streaming"} == {2.0}
    assert {r["vs_floor"] for r in rows if r["path"] == "streaming"} == {2.0}
    written = ttft.plot(rows, tmp_path / "ttft")
    assert [p.name for p in written] == [f"ttft_{kind}_b{b}.png" for b in (1, 4) for kind in ("speedup", "memory")]
    assert all(is_png(p) for p in written)


def test_ttft_merge_joins_runs_of_one_gpu_and_refuses_others(tmp_path):
    ttft = import_ttft()

    env = {"gpu": "NVIDIA H200", "torch": "2.11.0"}
    long = {"environment": env, "rows": [{"path": p, "N": 131072, "batch": 1, "ms": 9.0} for p in ("eager", "floor")]}
    shapes = [(b, n) for b in (4, 1) for n in (2048, 1024)]
    short = {
        "environment": env,
        "rows": [{"path": p, "N": n, "batch": b, "ms": 1.0} for b, n in shapes for p in ("eager", "floor")],
    }
    merged_env, rows = ttft.merged([long, short])
    assert merged_env == env
    assert [(r["batch"], r["N"], r["path"]) for r in rows] == [
        (1, 1024, "eager"), (1, 1024, "floor"), (1, 2048, "eager"), (1, 2048, "floor"), (1, 131072, "eager"),
        (1, 131072, "floor"), (4, 1024, "eager"), (4, 1024, "floor"), (4, 2048, "eager"), (4, 2048, "floor"),
    ]  # fmt: skip
    rerun = {"environment": env, "rows": [{"path": "floor", "N": 131072, "batch": 1, "ms": 3.0}]}
    _, rows = ttft.merged([long, rerun])  # the later floor row replaces the earlier one; ratios follow
    assert [(r["path"], r["ms"], r["vs_floor"]) for r in rows] == [("eager", 9.0, 3.0), ("floor", 3.0, 1.0)]
    with pytest.raises(ValueError, match="differ in environment"):
        ttft.merged([long, {**short, "environment": {**env, "gpu": "NVIDIA H100 80GB HBM3"}}])
