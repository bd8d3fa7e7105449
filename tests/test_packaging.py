"""Packaging: passes/ and kernels/ are sparsecomp.passes / sparsecomp.kernels, never bare modules."""

import subprocess
import sys
from pathlib import Path

import pytest

import sparsecomp


def test_bare_folder_names_are_inert_from_the_repository_root():
    """transformers probes for a package named "kernels"; from the repository root Python finds our
    folder under that name. Importing it must not register the ops a second time."""
    root = Path(sparsecomp.__file__).resolve().parents[1]
    if not (root / "kernels" / "__init__.py").is_file():
        pytest.skip("sparsecomp is installed, not run from a checkout")
    code = (
        "import sys; sys.path.insert(0, '.'); import torch, sparsecomp, kernels, passes;"
        "assert not hasattr(kernels, 'sparse_attention') and not hasattr(passes, 'find_sites');"
        "print(torch.ops.sparsecomp.sparse_attention.default._schema.name)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "sparsecomp::sparse_attention" in out.stdout


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
