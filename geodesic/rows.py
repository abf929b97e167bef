"""L, the N·C × n matrix with g = LᵀL (rows: probe input i, whitened output c), as the constrained step and
the spectrum use it: through three products only, so it never has to be written out when a cheaper form exists.

    gram()       K = L Lᵀ            (m, m), m = N·C
    matvec(v)    L v                 (m,)    for v in Params
    rmatvec(y)   Lᵀ y                Params  for y of shape (m,)

`DenseRows` holds L per parameter (from vmap(jacrev), any model). `LinearLayerRows` is exact for networks
whose every parameter belongs to an `nn.Linear` (MLPs): the per-example gradient of a Linear layer's output
row r with respect to its weight is the outer product δ_r a_iᵀ of the back-propagated vector δ_r (at the
layer's output) and the layer's input a_i, so

    K[r, s] = Σ_layers (δ_r · δ_s) (a_i · a_j + 1_bias)          (r from input i, s from input j)

costs m²·(width) instead of m²·n, and L v, Lᵀ y are a few small matrix products. On the digits MLP
(n = 26k, m = 160) this replaced a 7.4 ms kernel product by well under a millisecond (BENCHMARKS.md). This is
the per-layer factorisation used for empirical NTKs and K-FAC; no maintained library exposes it for
functional (torch.func) models, hence written here and checked against `DenseRows` in the tests.

Conv2d layers (LeNet-5, and a VGG's convolutions) are in the same pass: a conv's weight gradient for row r
is Σ_p δ_r[:, p] u_i[:, p]ᵀ over output positions p, with u_i[:, p] the input patch at p (F.unfold), no
longer one outer product, so its rows are written out, (m, out·in·k²) per layer, from one einsum of the
back-propagated δ and the patches: no per-row backward pass. Conv layers hold few weights (LeNet-5 on 28×28:
2.6k of 44k), so that costs little beside the Linear layers' factors; `conv_rows_fit` keeps it out of the
way when the convolutions are large (VGG on the CPU).

A BatchNorm2d layer in eval mode is y = γ x̂ + b per channel, with x̂ fixed by the running statistics, so its
rows are Σ_p δ_r x̂_i and Σ_p δ_r per channel, written out (m × 2·channels): ResNet-18 takes the factored rows.

A deep conv layer has many weights but few output positions (VGG11's last four on 32×32 inputs: 2.4M weights
each, 4 or 16 positions). There the rows are not written out: the layer keeps δ and the patches, and

    K[r, s] = Σ_p Σ_q (δ_r[:, p] · δ_s[:, q]) (u_i[:, p] · u_j[:, q] + 1_bias),

m²·P² products of small vectors instead of m²·(out·in·k²) (the "ghost" form of per-example gradient norms,
Goodfellow 2015; Li et al. 2022), with L v and Lᵀ y as one convolution-sized product each. `_conv_forms`
picks the form with fewer operations per layer; both are checked against the dense Jacobian in float64.
"""
from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from .autodiff import jvp
from .params import Params


class JacobianRows:
    n_rows: int

    def gram(self) -> Tensor:
        raise NotImplementedError

    def matvec(self, v: Params) -> Tensor:
        raise NotImplementedError

    def rmatvec(self, y: Tensor) -> Params:
        raise NotImplementedError


@dataclass
class DenseRows(JacobianRows):
    """L as blocks {name: (m, numel)} in the key order of the point (g = Σ_k L_kᵀ L_k)."""

    blocks: dict[str, Tensor]

    @property
    def n_rows(self) -> int:
        return next(iter(self.blocks.values())).shape[0]

    def gram(self) -> Tensor:
        return sum(b @ b.T for b in self.blocks.values())

    def matvec(self, v: Params) -> Tensor:
        return sum(b @ v[k].reshape(-1) for k, b in self.blocks.items())

    def rmatvec(self, y: Tensor) -> Params:
        return {k: b.T @ y for k, b in self.blocks.items()}  # flat: callers reshape with view_as


@dataclass
class _Layer:
    weight: str
    bias: str | None
    inputs: Tensor  # a: (N, in), the layer's input for each probe input
    deltas: Tensor  # δ: (N, C, out), ∂(whitened output c of input i)/∂(layer output of input i)


@dataclass
class _ConvLayer:
    weight: str
    bias: str | None
    weight_rows: Tensor  # (N, C, out·in·kh·kw): the rows of L for this layer's weight, written out
    bias_rows: Tensor  # (N, C, out): Σ over positions of δ, the rows for its bias


@dataclass
class _PatchConvLayer:
    weight: str
    bias: str | None
    patches: Tensor  # u: (N, in·kh·kw, P), the layer's input patches for each probe input (F.unfold)
    deltas: Tensor  # δ: (N, C, out, P), back-propagated to the layer's output positions


@dataclass
class LinearLayerRows(JacobianRows):
    """Factored rows for Linear layers and written-out rows for Conv2d layers, summed (one L, split by layer)."""

    layers: list[_Layer | _ConvLayer | _PatchConvLayer]

    @property
    def _nc(self) -> tuple[int, int]:
        first = self.layers[0]
        n, c = (first.bias_rows if isinstance(first, _ConvLayer) else first.deltas).shape[:2]
        return n, c

    @property
    def n_rows(self) -> int:
        n, c = self._nc
        return n * c

    def gram(self) -> Tensor:
        n, c = self._nc
        kernel = 0
        for layer in self.layers:
            if isinstance(layer, _PatchConvLayer):
                positions = layer.deltas.shape[-1]
                d = layer.deltas.transpose(2, 3).reshape(n * c * positions, -1)  # rows (i, c, p): δ at p
                u = layer.patches.transpose(1, 2).reshape(n * positions, -1)  # rows (i, p): the patch at p
                dd = (d @ d.T).view(n, c, positions, n, c, positions)
                uu = (u @ u.T).view(n, positions, n, positions)
                if layer.bias is not None:
                    uu = uu + 1
                kernel = kernel + torch.einsum("icpjdq,ipjq->icjd", dd, uu).reshape(n * c, n * c)
                continue
            if isinstance(layer, _ConvLayer):
                w = layer.weight_rows.reshape(n * c, -1)
                kernel = kernel + w @ w.T
                if layer.bias is not None:
                    b = layer.bias_rows.reshape(n * c, -1)
                    kernel = kernel + b @ b.T
                continue
            d = layer.deltas.reshape(n * c, -1)
            inputs_gram = layer.inputs @ layer.inputs.T  # (N, N)
            if layer.bias is not None:
                inputs_gram = inputs_gram + 1
            kernel = kernel + ((d @ d.T).view(n, c, n, c) * inputs_gram[:, None, :, None]).view(n * c, n * c)
        return kernel

    def matvec(self, v: Params) -> Tensor:
        n, c = self._nc
        out = 0
        for layer in self.layers:
            if isinstance(layer, _PatchConvLayer):
                weight = v[layer.weight]
                moved = torch.einsum("nkp,ok->nop", layer.patches, weight.reshape(weight.shape[0], -1))  # V u_p
                if layer.bias is not None:
                    moved = moved + v[layer.bias][:, None]
                out = out + torch.einsum("ncop,nop->nc", layer.deltas, moved)
                continue
            if isinstance(layer, _ConvLayer):
                part = layer.weight_rows.reshape(n * c, -1) @ v[layer.weight].reshape(-1)
                if layer.bias is not None:
                    part = part + layer.bias_rows.reshape(n * c, -1) @ v[layer.bias]
                out = out + part.view(n, c)
                continue
            moved = layer.inputs @ v[layer.weight].T  # (N, out): V a_i
            if layer.bias is not None:
                moved = moved + v[layer.bias]
            out = out + torch.einsum("nco,no->nc", layer.deltas, moved)
        return out.reshape(-1)

    def rmatvec(self, y: Tensor) -> Params:
        n, c = self._nc
        out = {}
        for layer in self.layers:
            if isinstance(layer, _PatchConvLayer):
                summed = torch.einsum("nc,ncop->nop", y.view(n, c), layer.deltas)  # Σ_c y_ic δ_ic
                out[layer.weight] = torch.einsum("nop,nkp->ok", summed, layer.patches).reshape(-1)  # flat
                if layer.bias is not None:
                    out[layer.bias] = summed.sum((0, 2))
                continue
            if isinstance(layer, _ConvLayer):
                out[layer.weight] = y @ layer.weight_rows.reshape(n * c, -1)  # flat: callers reshape with view_as
                if layer.bias is not None:
                    out[layer.bias] = y @ layer.bias_rows.reshape(n * c, -1)
                continue
            summed = torch.einsum("nc,nco->no", y.view(n, c), layer.deltas)  # Σ_c y_ic δ_ic
            out[layer.weight] = summed.T @ layer.inputs
            if layer.bias is not None:
                out[layer.bias] = summed.sum(0)
        return out


# The most entries the conv layers' rows may hold on the CPU (conv_rows_fit says why).
CPU_CONV_ENTRIES = 2e8

# "written" or "patches" makes every conv layer take that form (the tests); None: `_conv_forms` picks per layer.
FORCE_CONV_FORM: str | None = None

# Capture state for the Linear-layer hooks: set only inside `linear_layer_rows`, per thread/context, so a
# module shared between sessions runs unchanged everywhere else.
_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("geodesic_linear_capture", default=None)
_HOOKED = "_geodesic_linear_hook"
_HOOK_LOCK = threading.Lock()  # sessions share modules: two registering at once would hook a layer twice
_LAYERS = "_geodesic_linear_layers"  # {parameter names: linear_layers(...)}, cached on the module
_VERIFIED = "_geodesic_factored_rows_ok"  # None until checked once against a jvp, then True or False


def _hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    state = _CAPTURE.get()
    if state is None:
        return None
    name = state["names"].get(id(module))
    expected = 4 if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)) else 2  # (batch, channels, h, w) or (batch, in)
    if name is None or name in state["inputs"] or args[0].dim() != expected or module.training:
        state["failed"] = True  # called twice, other shapes, or a BatchNorm mixing the batch's inputs
        return None
    x = args[0].detach()
    if isinstance(module, nn.BatchNorm2d):  # its weight multiplies the normalised input x̂, per channel
        scale = torch.rsqrt(module.running_var + module.eps)  # the buffers of this call (functional_call)
        x = (x - module.running_mean[:, None, None]) * scale[:, None, None]
    state["inputs"][name] = x
    if "shapes" in state:  # the shape pass: only the output shapes are wanted
        state["shapes"][name] = tuple(output.shape[1:])
        return None
    return output + state["shifts"][name]


def _factorable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.BatchNorm2d):  # in eval mode (the hook checks): y = γ x̂ + b per channel, x̂ fixed by the buffers
        return m.affine and m.track_running_stats
    # a plain convolution: unfold's patches then match the weight's (in, kh, kw) layout exactly
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)


def linear_layers(module: nn.Module, params: Params) -> dict[str, tuple[str, str | None]] | None:
    """{module name: (weight key, bias key)} if every parameter in `params` belongs to an nn.Linear or a plain
    nn.Conv2d, else None."""
    layers, covered = {}, set()
    for name, m in module.named_modules():
        if _factorable(m):
            prefix = f"{name}." if name else ""
            weight, bias = prefix + "weight", (prefix + "bias" if m.bias is not None else None)
            layers[name] = (weight, bias)
            covered |= {weight} | ({bias} if bias else set())
    return layers if layers and covered == set(params) else None


def linear_layer_rows(network, buffers: dict, params: Params, inputs: Tensor,
                      whitening: Callable[[Tensor], Tensor], size_rule: bool = True) -> LinearLayerRows | None:
    """The factored L at `params` for a network made of Linear layers only; None when it does not apply.

    whitening: logits (N, C) -> (N, C, C), whose row i maps the logits of input i to its whitened outputs
    (H_i^½/√N); applied to the logits of the one forward pass the factors come from. size_rule=False skips
    `conv_rows_fit` (the caller asked for the exact step whatever its size)."""
    layers = factored_layers(network, params)
    if layers is None or (size_rule and not conv_rows_fit(network, params, len(inputs) * network.n_classes,
                                                          inputs.device, inputs)):
        return None
    factors = linear_layer_factors(network, buffers, params, inputs, whitening)
    if factors is None:
        return None
    captured, deltas, whiten = factors
    rows = rows_from_factors(layers, captured, deltas)
    module = network.module
    verdict = getattr(module, _VERIFIED, None)
    if verdict is None:  # once per module: a forward that mixes inputs (x − x.mean(0), say) breaks the factoring
        verdict = _agrees_with_jvp(rows, network, buffers, params, inputs, whiten)
        setattr(module, _VERIFIED, verdict)
    return rows if verdict else None


def factored_layers(network, params: Params) -> dict[str, tuple[str, str | None]] | None:
    """{module name: (weight key, bias key)} when the factored rows apply to `network` (None: they do not, or
    the check against a jvp failed for this module)."""
    module = network.module
    if getattr(module, _VERIFIED, None) is False:
        return None
    cache = module.__dict__.setdefault(_LAYERS, {})  # the structure does not change: found once per key set
    key = tuple(params)
    if key not in cache:
        cache[key] = linear_layers(module, params)
    return cache[key]


def conv_rows_fit(network, params: Params, n_rows: int, device: torch.device, inputs: Tensor | None = None,
                  n_walks: int = 1) -> bool:
    """Whether the conv layers' rows are small enough: the dense Jacobian's own rule (step.dense_jacobian_fits)
    applied to the conv part only, the written-out layers' n_rows × weights plus the patch-form layers' (N·C·P)²
    products (`inputs`, the probe, picks each layer's form; without it every conv layer counts as written out).
    n_rows counts the rows of all `n_walks` walks."""
    modules = dict(network.module.named_modules())
    layers = factored_layers(network, params) or {}
    conv = {name: keys for name, keys in layers.items() if isinstance(modules[name], nn.Conv2d)}
    if not conv:
        return True
    forms = {}
    if inputs is not None:
        shapes = _output_shapes(network, network.buffers, params, inputs, {id(modules[name]): name for name in layers})
        forms = _conv_forms(modules, conv, shapes, len(inputs), n_rows // (n_walks * len(inputs))) if shapes else {}
    entries = 0
    for name, keys in conv.items():
        if name in forms and forms[name][0] == "patches":
            entries += n_walks * forms[name][1]
        else:
            entries += n_rows * sum(params[k].numel() for k in keys if k is not None)
    if device.type == "cpu":
        # Up to 2e8 entries (800 MB) on the CPU, not the dense L's 5e7: measured on 2 cores with 16 probe inputs
        # (bench/step_profile.py --fit-any, BENCHMARKS.md), the exact step through these rows beat CG's 10
        # products for ResNet-18 on 8×8 images (5.6e7 entries: 583 against 1,187 ms) and VGG11 on 32×32 (1.7e8:
        # 3.4× against 3.7× SGD), and lost to it for VGG16 (3.0e8: 4.1× against 2.6×) and ResNet-18 on 32×32
        # (4.8e8: 3.2× against 2.9×).
        return entries <= CPU_CONV_ENTRIES
    return dense_jacobian_fits(1, entries, device)


def _conv_forms(modules: dict, conv: dict, shapes: dict, n: int, c: int) -> dict[str, tuple[str, int]]:
    """{conv layer: ("written" or "patches", the entries it holds)}, per layer the form with fewer operations for
    N = n probe inputs and C = c outputs: written-out rows cost m·W·(P + m) (the einsum and K), the patch form
    (m·P)²·out + (n·P)²·in·k² + (m·P)² (its two products and their contraction), m = n·c, W weights."""
    forms = {}
    m = n * c
    for name in conv:
        module = modules[name]
        out, positions = shapes[name][0], int(torch.tensor(shapes[name][1:]).prod())
        patch = module.weight[0].numel()  # in·kh·kw
        weights = out * patch
        written = m * weights * (positions + m)
        by_patches = (m * positions) ** 2 * (out + 1) + (n * positions) ** 2 * patch
        if by_patches < written:
            forms[name] = ("patches", (m * positions) ** 2 + (n * positions) ** 2 + n * c * out * positions)
        else:
            forms[name] = ("written", m * weights)
    return forms


def dense_jacobian_fits(n_rows: int, n_params: int, device: torch.device) -> bool:
    """Whether `linear_solver='auto'` may write L out densely (n_rows × n_params floats).

    On a GPU when L and as much again for computing it take at most half the free memory: measured on an H100,
    the exact solve through the dense L beat 10 CG iterations 2–3.5× on VGG11 and ResNet-18 (BENCHMARKS.md).
    On the CPU only while L is small (≤ 5e7 entries, 200 MB): there CG's few products are cheaper."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 2 * 4 * n_rows * n_params <= 0.5 * free
    return n_rows * n_params <= 5e7


def rows_from_factors(layers: dict[str, tuple[str, str | None]], captured: dict[str, Tensor],
                      deltas: dict[str, Tensor]) -> LinearLayerRows:
    """The rows from linear_layer_factors' output. A Linear layer's `captured` entry is its inputs (N, in); a conv
    layer's is its weight rows (N, C, out·in·k²), with its bias rows in `deltas`, or in the patch form its
    patches (N, in·k², P), with δ (N, C, out, P) in `deltas`."""
    def layer(name, w, b):
        if deltas[name].dim() == 4:
            return _PatchConvLayer(w, b, captured[name], deltas[name])
        if captured[name].dim() == 3:
            return _ConvLayer(w, b, captured[name], deltas[name])
        return _Layer(w, b, captured[name], deltas[name])

    return LinearLayerRows([layer(name, w, b) for name, (w, b) in layers.items()])


def linear_layer_factors(network, buffers: dict, params: Params, inputs: Tensor,
                         whitening: Callable[[Tensor], Tensor]) -> tuple[dict, dict, Tensor] | None:
    """(per layer: Linear inputs (N, in) or conv weight rows (N, C, out·in·k²); Linear deltas (N, C, out) or conv
    bias rows (N, C, out); whitening (N, C, C)) from one forward pass and C pull-backs, or None if the forward
    does not fit the factoring. Tensors in, tensors out: this also runs under torch.func.vmap over stacked
    weights and probes (batch.py)."""
    layers = factored_layers(network, params)
    modules = dict(network.module.named_modules())
    n = len(inputs)
    names = {id(modules[name]): name for name in layers}
    shapes = _output_shapes(network, buffers, params, inputs, names)
    if shapes is None:
        return None
    state = {"names": names, "inputs": {}, "failed": False}

    def whitened(shifts: dict[str, Tensor]) -> Tensor:
        state["shifts"] = shifts
        state["inputs"].clear()
        logits = network.apply(params, inputs, buffers)
        whiten = whitening(logits.detach())  # a fixed map per input, not differentiated
        return torch.einsum("nkc,nc->nk", whiten, logits), (dict(state["inputs"]), whiten)  # aux leaves the transform

    shifts = {name: torch.zeros(n, *shapes[name], dtype=inputs.dtype, device=inputs.device) for name in layers}
    token = _CAPTURE.set(state)
    try:
        outputs, pullback, (captured, whiten) = vjp(whitened, shifts, has_aux=True)
        c = outputs.shape[-1]
        # Input i only reaches output row i, so the pull-back of column k of the outputs holds δ_ik in row i.
        cotangents = torch.eye(c, dtype=outputs.dtype, device=outputs.device)[:, None, :].expand(c, n, c)
        (deltas,) = vmap(pullback)(cotangents)  # {name: (C, N, *output shape)}
    finally:
        _CAPTURE.reset(token)
    if state["failed"] or set(captured) != set(layers):
        return None
    deltas = {name: d.transpose(0, 1) for name, d in deltas.items()}  # (N, C, ...)
    conv = {name: keys for name, keys in layers.items() if isinstance(modules[name], nn.Conv2d)}
    forms = _conv_forms(modules, conv, shapes, n, c) if conv else {}
    for name in layers:
        m = modules[name]
        if isinstance(m, nn.BatchNorm2d):  # rows written out, 2 per channel: Σ_p δ x̂ for γ, Σ_p δ for b
            d = deltas[name].flatten(3)  # (N, C, channels, P)
            captured[name] = torch.einsum("ncop,nop->nco", d, captured[name].flatten(2))
            deltas[name] = d.sum(-1)
            continue
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(captured[name], m.kernel_size, m.dilation, m.padding, m.stride)  # (N, in·k², P)
            d = deltas[name].flatten(3)  # (N, C, out, P)
            if (FORCE_CONV_FORM or forms[name][0]) == "patches":
                captured[name], deltas[name] = patches, d
                continue
            # the written-out rows: Σ_p δ[:, p] ⊗ patch_p, one einsum for all rows
            captured[name] = torch.einsum("ncop,nkp->ncok", d, patches).flatten(2)
            deltas[name] = d.sum(-1)
        else:
            deltas[name] = deltas[name].contiguous()
    return captured, deltas, whiten


def _hook_layers(module: nn.Module, names: dict) -> None:
    """The capture hook on each layer in `names` (by id), once: inert outside `_CAPTURE`. Under a lock, so that
    two threads that meet a fresh module at once (the Python API; the server steps on one thread) hook it once."""
    with _HOOK_LOCK:
        for layer in module.modules():
            if id(layer) in names and not getattr(layer, _HOOKED, False):
                layer.register_forward_hook(_hook)
                setattr(layer, _HOOKED, True)


def _output_shapes(network, buffers: dict, params: Params, inputs: Tensor, names: dict) -> dict | None:
    """{layer name: its output's shape per input}, from one forward pass (cached per input shape)."""
    cache = network.module.__dict__.setdefault("_geodesic_output_shapes", {})
    key = (tuple(inputs.shape[1:]), tuple(params))
    if key not in cache:
        _hook_layers(network.module, names)
        state = {"names": names, "inputs": {}, "failed": False, "shapes": {}}
        token = _CAPTURE.set(state)
        try:
            with torch.no_grad():
                network.apply(params, inputs[:1], buffers)
        finally:
            _CAPTURE.reset(token)
        cache[key] = None if state["failed"] or set(state["shapes"]) != set(names.values()) else state["shapes"]
    return cache[key]


def _agrees_with_jvp(rows: LinearLayerRows, network, buffers, params: Params, inputs: Tensor, whiten: Tensor) -> bool:
    """L v from the factors against the whitened J v of one forward-mode product, for a random v."""
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen).to(p) for k, p in params.items()}
    _, jv = jvp(lambda p: network.apply(p, inputs, buffers), (params,), (v,))
    expected = torch.einsum("nkc,nc->nk", whiten, jv).reshape(-1)
    error = (rows.matvec(v) - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
    return bool(error < 1e-3)
