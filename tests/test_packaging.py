"""Packaging: passes/ and kernels/ are sparsecomp.passes / sparsecomp.kernels, never bare modules."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import sparsecomp


def test_bare_folder_names_are_inert_from_the_repository_root():
    """From the repository root Python finds our folders under bare names. Importing them must not
    register the ops a second time, and where Hugging Face's package named "kernels" is installed
    (transformers 5.25 requires and imports it) that name must be theirs."""
    root = Path(sparsecomp.__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        pytest.skip("sparsecomp is installed, not run from a checkout")
    code = (
        "import sys, importlib.metadata as meta; from pathlib import Path; sys.path.insert(0, '.');"
        "import torch, sparsecomp, kernels, passes;"
        "assert not hasattr(kernels, 'sparse_attention') and not hasattr(passes, 'find_sites');"
        "theirs = any(d.metadata['Name'] == 'kernels' for d in meta.distributions());"
        "ours = Path(kernels.__file__).resolve().parent == Path('kernels').resolve();"
        "assert ours != theirs, (kernels.__file__, theirs);"
        "print(torch.ops.sparsecomp.sparse_attention.default._schema.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sparsecomp::sparse_attention" in out.stdout
    if importlib.util.find_spec("transformers") is not None:  # transformers imports from the root too
        out = subprocess.run(
            [sys.executable, "-c", "import transformers.modeling_utils, sparsecomp.kernels"],
            cwd=root, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr


def test_backend_is_registered_by_name():
    import torch

    assert "sparsecomp" in torch._dynamo.list_backends(exclude_tags=())


def test_every_package_folder_is_installed():
    """pyproject lists packages one by one (passes/ and kernels/ are mapped into sparsecomp): a new
    subpackage missing from the list would be absent from a (non-editable) install."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(sparsecomp.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        pytest.skip("sparsecomp is installed, not run from a checkout")
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {
        ".".join((name, *init.parent.relative_to(root / path).parts))
        for name, path in tool["package-dir"].items()
        for init in (root / path).rglob("__init__.py")
    }
    assert found == set(tool["packages"]), sorted(found ^ set(tool["packages"]))
