"""Networks as pure functions of their parameters.

`Network` keeps an `nn.Module` only for its structure; every forward pass goes through
`torch.func.functional_call(module, (params, buffers), x)`, so the weights being walked are
a plain `Params` dict that the engine owns, never the module's own tensors.
VGG and ResNet come from torchvision, adapted to small images (8x8, 28x28, 32x32): no pooling below 1x1.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, DataError
from .params import Params, clone

MODEL_NAMES = ("mlp", "lenet5", "vgg11", "vgg16", "resnet18")


class MLP(nn.Module):
    """Flatten, then Linear-ReLU blocks of the given widths, then a Linear head."""

    def __init__(self, n_inputs: int, hidden: tuple[int, ...], n_classes: int):
        super().__init__()
        widths = (n_inputs, *hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], n_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5 (ReLU, max-pool) for 1- or 3-channel square images of 8 to 32 pixels: 28x28 is padded to the
    classic 32x32, and images smaller than 16 keep their size through both 5x5 convolutions (padding 2)."""

    def __init__(self, in_channels: int, image_size: int, n_classes: int):
        super().__init__()
        pad1 = 0 if image_size >= 32 else 2
        pad2 = 2 if image_size < 16 else 0
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        with torch.no_grad():
            n_features = self.features(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        self.classifier = nn.Sequential(
            nn.Linear(n_features, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _vgg(name: str, in_channels: int, image_size: int, n_classes: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=n_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    # 32x32 inputs leave 512x1x1 after five max-pools; smaller images keep only the pools that leave at least
    # 1x1 (8x8: three, 28x28: four). Then no 7x7 pool and no 4096-wide head: one Linear on the 512 features.
    size = image_size
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d):
            if size // 2 >= 1:
                size //= 2
            else:
                model.features[i] = nn.Identity()
    model.avgpool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()) if size > 1 else nn.Flatten()
    model.classifier = nn.Linear(512, n_classes)
    return model


def _resnet18(in_channels: int, n_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=n_classes)
    # CIFAR-style stem: a 3x3 stride-1 conv and no max-pool keep resolution on 32x32 inputs.
    model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def check_takes(name: str, input_shape: tuple[int, ...]) -> None:
    """Refuse (ConfigError) a model that cannot take these inputs: a conv net on flat inputs, or on images that are
    not square or not 8 to 32 pixels a side. The MLP takes any input (it flattens it)."""
    if name == "mlp":
        return
    if name not in MODEL_NAMES:
        raise ConfigError("model", name, ", ".join(MODEL_NAMES))
    if len(input_shape) != 3:
        raise ConfigError("model", name, f"'mlp' for flat inputs of shape {input_shape}; "
                          f"{name} needs images (channels, height, width)")
    _, height, width = input_shape
    if height != width or not 8 <= height <= 32:
        raise ConfigError("model", name, f"{name} is adapted to square images of 8 to 32 pixels; got {height}x{width}")


def build_module(config: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    name = config.name
    check_takes(name, input_shape)
    if name == "mlp":
        return MLP(int(torch.tensor(input_shape).prod()), tuple(config.hidden), n_classes)
    channels, height = input_shape[0], input_shape[1]
    if name == "lenet5":
        return LeNet5(channels, height, n_classes)
    if name in ("vgg11", "vgg16"):
        return _vgg(name, channels, height, n_classes)
    return _resnet18(channels, n_classes)


@dataclass
class Network:
    """A model as a pure function `apply(params, x, buffers) -> logits` plus what the engine needs to know.

    `prunable` lists the weights of Linear and Conv layers (biases and normalisation are not pruned).
    `buffers` holds BatchNorm running statistics (empty for models without BatchNorm); a walker keeps its
    own copy because moving the weights makes them stale.
    """

    module: nn.Module
    input_shape: tuple[int, ...]
    n_classes: int
    prunable: tuple[str, ...]
    buffers: dict[str, Tensor] = field(default_factory=dict)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.module.modules())

    def apply(self, params: Params, x: Tensor, buffers: dict[str, Tensor] | None = None) -> Tensor:
        return functional_call(self.module, (params, self.buffers if buffers is None else buffers), (x,))

    def init_params(self, seed: int) -> Params:
        """Fresh initial weights drawn from `seed` without touching the global RNG, on the module's device.

        Drawn on the CPU whatever the device: CUDA's generator gives other numbers for the same seed, and
        a seed should mean the same start network on every machine (found by the GPU check)."""
        module = copy.deepcopy(self.module).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)  # the CPU generator only (no CUDA side effects)
            for m in module.modules():
                if hasattr(m, "reset_parameters") and m is not module:
                    m.reset_parameters()
            params = clone(dict(module.named_parameters()))
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        return {k: v.to(device) for k, v in params.items()}

    def to(self, device: torch.device) -> Network:
        self.module.to(device)
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self


@dataclass(frozen=True, eq=False)
class NetworkFunction:
    """`network` with the BatchNorm statistics `buffers` as a pure function (params, x) -> logits.

    A plain callable would do for the forward pass; this one also tells the metric which network it is,
    so it can use the factored Jacobian for Linear-only networks (rows.py).

    head: only the output columns [lo, hi) (a task with a head of its own, data.Dataset.head); None: all of them.
    """

    network: Network
    buffers: dict[str, Tensor]
    head: tuple[int, int] | None = None

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        logits = self.network.apply(params, x, self.buffers)
        return logits if self.head is None else logits[..., self.head[0]:self.head[1]]

    def with_head(self, head: tuple[int, int] | None) -> NetworkFunction:
        """The same network scored on the columns `head` (None: all outputs)."""
        return self if head == self.head else dataclasses.replace(self, head=head)


def check_fits(network: Network, params: Params, data, role: str = "") -> None:
    """Python API: refuse, saying what to change, weights and a dataset the engine cannot walk together.

    The CLI and the app build both themselves; `Goal.for_network` and `Walker` take them from the user, where a
    mismatch used to surface steps later as PyTorch's own error ("Target 1 is out of bounds", "mat1 and mat2 must
    have the same dtype"). One forward pass on two of `data`'s training inputs. `role` names the argument (task_b)."""
    task = f"{role} ({data.name})" if role else data.name
    if not isinstance(params, dict) or not params:
        raise CheckpointError(f"weights: expected a non-empty dict of tensors (network_from_module's second value), "
                              f"got {type(params).__name__}{' (empty)' if isinstance(params, dict) else ''}")
    for name, value in params.items():
        if not isinstance(value, Tensor) or value.dtype != torch.float32:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise CheckpointError(f"weights: {name!r} is {got}; the engine walks float32 weights (its data are "
                                  f"float32): call module.float() before network_from_module")
        bad = int((~torch.isfinite(value)).sum())
        if bad:  # (a file's weights are checked so when read: checkpoint.match_params)
            raise CheckpointError(f"weights: {name!r} holds {bad:,} NaN or infinite value{'s' * (bad > 1)} (of "
                                  f"{value.numel():,}): these weights cannot be walked")
    x = data.train.x[:2]
    devices = {str(v.device) for v in params.values()}
    if devices != {str(x.device)}:
        raise CheckpointError(f"weights on {', '.join(sorted(devices))} but {task}'s inputs on {x.device}: "
                              f"put both on one device (data.to(device), module.to(device))")
    try:
        with torch.no_grad():
            out = network.apply(params, x)
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{task}: the network cannot take its inputs of shape {tuple(x.shape[1:])} "
                        f"({first})") from err
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != len(x):
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise DataError(f"{task}: the network must return logits of shape (inputs, classes); it returned {got}")
    needed = data.head[1] if data.head is not None else data.n_classes
    if out.shape[1] < needed:
        scored = (f"a head on outputs {data.head[0]}..{data.head[1] - 1}" if data.head is not None
                  else f"labels 0..{data.n_classes - 1}")
        raise DataError(f"{task}: the network has {out.shape[1]} output{'s' if out.shape[1] != 1 else ''}; "
                        f"the task needs {needed} ({scored})")


def build_network(config: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> Network:
    module = build_module(config, input_shape, n_classes).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    prunable = tuple(
        f"{name}.weight" if name else "weight"
        for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return Network(module, tuple(input_shape), n_classes, prunable, buffers)


@torch.no_grad()
def recompute_batchnorm(network: Network, params: Params, inputs: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Fresh BatchNorm statistics for `params`: a cumulative average over `inputs` in train mode.

    Returns new buffers (the network's own are untouched); models without BatchNorm get theirs back.
    """
    if not network.has_batchnorm:
        return network.buffers
    module = network.module
    saved_momentum = {}
    buffers = {k: v.clone() for k, v in network.buffers.items()}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved_momentum[name] = m.momentum
            m.momentum = None  # cumulative moving average over the batches below
            prefix = f"{name}." if name else ""
            buffers[prefix + "running_mean"].zero_()
            buffers[prefix + "running_var"].fill_(1.0)
            buffers[prefix + "num_batches_tracked"].zero_()
    module.train()
    try:
        for start in range(0, len(inputs), batch_size):
            functional_call(module, (params, buffers), (inputs[start:start + batch_size],))
    finally:
        module.eval()
        for name, m in module.named_modules():
            if name in saved_momentum:
                m.momentum = saved_momentum[name]
    return buffers


def network_from_module(module: nn.Module, input_shape: tuple[int, ...] | None = None,
                        n_classes: int | None = None) -> tuple[Network, Params]:
    """(Network, its current params) for your own nn.Module: the weights are copied out, the module
    keeps only its structure. Linear and Conv2d weights are prunable."""
    params = clone(dict(module.named_parameters()))
    module = module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    prunable = tuple(f"{name}.weight" if name else "weight"
                     for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    buffers = {k: v.detach().clone() for k, v in module.named_buffers()}
    return Network(module, tuple(input_shape or ()), n_classes or 0, prunable, buffers), params
