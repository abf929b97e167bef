import os

import pytest
import torch

from geodesic.config import ModelConfig
from geodesic.models import build_network


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Start networks are cached in a folder of the test session, never in the user's cache."""
    os.environ["GEODESIC_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def tiny():
    """A 3-4-3 MLP in float64 with its params, and a probe of 5 inputs: small enough for dense oracles."""
    torch.manual_seed(0)
    net = build_network(ModelConfig(name="mlp", hidden=(4,)), (3,), 3)
    params = {k: v.double() for k, v in net.init_params(0).items()}
    net.module.double()
    x = torch.randn(5, 3, dtype=torch.float64)
    return net, params, x
