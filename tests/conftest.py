import os

import torch

# Triton kernels run in the interpreter where there is no GPU; the variable must be set before
# any @triton.jit function is created, so before sparsecomp is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sparsecomp  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    sparsecomp.counters.clear()
    torch.manual_seed(0)
    yield
