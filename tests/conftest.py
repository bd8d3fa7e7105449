import pytest
import torch

import sparsecomp


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    sparsecomp.counters.clear()
    torch.manual_seed(0)
    yield
