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
"""
from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
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
class LinearLayerRows(JacobianRows):
    layers: list[_Layer]

    @property
    def n_rows(self) -> int:
        n, c, _ = self.layers[0].deltas.shape
        return n * c

    def gram(self) -> Tensor:
        n, c, _ = self.layers[0].deltas.shape
        kernel = 0
        for layer in self.layers:
            d = layer.deltas.reshape(n * c, -1)
            inputs_gram = layer.inputs @ layer.inputs.T  # (N, N)
            if layer.bias is not None:
                inputs_gram = inputs_gram + 1
            kernel = kernel + ((d @ d.T).view(n, c, n, c) * inputs_gram[:, None, :, None]).view(n * c, n * c)
        return kernel

    def matvec(self, v: Params) -> Tensor:
        out = 0
        for layer in self.layers:
            moved = layer.inputs @ v[layer.weight].T  # (N, out): V a_i
            if layer.bias is not None:
                moved = moved + v[layer.bias]
            out = out + torch.einsum("nco,no->nc", layer.deltas, moved)
        return out.reshape(-1)

    def rmatvec(self, y: Tensor) -> Params:
        n, c, _ = self.layers[0].deltas.shape
        out = {}
        for layer in self.layers:
            summed = torch.einsum("nc,nco->no", y.view(n, c), layer.deltas)  # Σ_c y_ic δ_ic
            out[layer.weight] = summed.T @ layer.inputs
            if layer.bias is not None:
                out[layer.bias] = summed.sum(0)
        return out


# Capture state for the Linear-layer hooks: set only inside `linear_layer_rows`, per thread/context, so a
# module shared between sessions runs unchanged everywhere else.
_CAPTURE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("geodesic_linear_capture", default=None)
_HOOKED = "_geodesic_linear_hook"
_LAYERS = "_geodesic_linear_layers"  # {parameter names: linear_layers(...)}, cached on the module
_VERIFIED = "_geodesic_factored_rows_ok"  # None until checked once against a jvp, then True or False


def _hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    state = _CAPTURE.get()
    if state is None:
        return None
    name = state["names"].get(id(module))
    if name is None or name in state["inputs"] or args[0].dim() != 2:  # called twice, or not (batch, features): give up
        state["failed"] = True
        return None
    state["inputs"][name] = args[0].detach()
    return output + state["shifts"][name]


def linear_layers(module: nn.Module, params: Params) -> dict[str, tuple[str, str | None]] | None:
    """{module name: (weight key, bias key)} if every parameter in `params` belongs to an nn.Linear, else None."""
    layers, covered = {}, set()
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            prefix = f"{name}." if name else ""
            weight, bias = prefix + "weight", (prefix + "bias" if m.bias is not None else None)
            layers[name] = (weight, bias)
            covered |= {weight} | ({bias} if bias else set())
    return layers if layers and covered == set(params) else None


def linear_layer_rows(network, buffers: dict, params: Params, inputs: Tensor,
                      whitening: Callable[[Tensor], Tensor]) -> LinearLayerRows | None:
    """The factored L at `params` for a network made of Linear layers only; None when it does not apply.

    whitening: logits (N, C) -> (N, C, C), whose row i maps the logits of input i to its whitened outputs
    (H_i^½/√N); applied to the logits of the one forward pass the factors come from."""
    layers = factored_layers(network, params)
    if layers is None:
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


def rows_from_factors(layers: dict[str, tuple[str, str | None]], captured: dict[str, Tensor],
                      deltas: dict[str, Tensor]) -> LinearLayerRows:
    return LinearLayerRows([_Layer(w, b, captured[name], deltas[name]) for name, (w, b) in layers.items()])


def linear_layer_factors(network, buffers: dict, params: Params, inputs: Tensor,
                         whitening: Callable[[Tensor], Tensor]) -> tuple[dict, dict, Tensor] | None:
    """(layer inputs {name: (N, in)}, deltas {name: (N, C, out)}, whitening (N, C, C)) from one forward pass
    and C pull-backs, or None if the forward does not fit the factoring. Tensors in, tensors out: this also
    runs under torch.func.vmap over stacked weights and probes (batch.py)."""
    layers = factored_layers(network, params)
    module = network.module
    modules = dict(module.named_modules())
    for name in layers:
        if not getattr(modules[name], _HOOKED, False):
            modules[name].register_forward_hook(_hook)
            setattr(modules[name], _HOOKED, True)
    n = len(inputs)
    state = {"names": {id(modules[name]): name for name in layers}, "inputs": {}, "failed": False}

    def whitened(shifts: dict[str, Tensor]) -> Tensor:
        state["shifts"] = shifts
        state["inputs"].clear()
        logits = network.apply(params, inputs, buffers)
        whiten = whitening(logits.detach())  # a fixed map per input, not differentiated
        return torch.einsum("nkc,nc->nk", whiten, logits), (dict(state["inputs"]), whiten)  # aux leaves the transform

    shifts = {name: torch.zeros(n, modules[name].out_features, dtype=inputs.dtype, device=inputs.device)
              for name in layers}
    token = _CAPTURE.set(state)
    try:
        outputs, pullback, (captured, whiten) = vjp(whitened, shifts, has_aux=True)
        c = outputs.shape[-1]
        # Input i only reaches output row i, so the pull-back of column k of the outputs holds δ_ik in row i.
        cotangents = torch.eye(c, dtype=outputs.dtype, device=outputs.device)[:, None, :].expand(c, n, c)
        (deltas,) = vmap(pullback)(cotangents)  # {name: (C, N, out)}
    finally:
        _CAPTURE.reset(token)
    if state["failed"] or set(captured) != set(layers):
        return None
    return captured, {name: d.transpose(0, 1).contiguous() for name, d in deltas.items()}, whiten


def _agrees_with_jvp(rows: LinearLayerRows, network, buffers, params: Params, inputs: Tensor, whiten: Tensor) -> bool:
    """L v from the factors against the whitened J v of one forward-mode product, for a random v."""
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen).to(p) for k, p in params.items()}
    _, jv = jvp(lambda p: network.apply(p, inputs, buffers), (params,), (v,))
    expected = torch.einsum("nkc,nc->nk", whiten, jv).reshape(-1)
    error = (rows.matvec(v) - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
    return bool(error < 1e-3)
