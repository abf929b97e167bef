import os
import struct

import numpy as np
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


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(">u1").tobytes())


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory):
    """A data folder holding torchvision's Fashion-MNIST files (no network here): ten learnable 'garments', each a
    bright band at its own rows of the 28x28 image under noise, laid out as the real files are
    (FashionMNIST/raw/*-ubyte)."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 600), ("t10k", 200)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 90, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 7, 3:25] = 250
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return str(root)
