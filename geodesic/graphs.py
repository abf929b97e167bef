"""CUDA graphs for the small models' steps: a pure function of tensors recorded once, replayed every step.

A constrained step of the digits MLP is about 500 small GPU kernels, each launched from Python: on an H200 it
took 11 ms against 1.4 ms for an SGD step (BENCHMARKS.md, issue 12), nearly all of it launch overhead and waits.
PyTorch's CUDA graphs (`torch.cuda.CUDAGraph`) record the kernels of one call and replay them with one launch. What
is recorded must not wait for the device or read from host memory, and its inputs must sit at fixed addresses: so
`Captured` keeps static input buffers, copies each call's inputs into them and replays. `WalkBatch` captures its
fused step (batch.py: the rule, the guard's first try and the measurements, with no wait for the device) this way.

Why not `torch.compile(mode="reduce-overhead")`, which does the same through its own capture: the step runs under
`torch.func.vmap` and `grad`, and compiling it takes tens of seconds per set-up before a page's first step; the
graph here records the eager kernels as they are, in the time of three calls.

The setting (environment `GEODESIC_CUDA_GRAPHS`, or `MODE` from Python): 'auto' (the default) uses graphs on a
CUDA device for models of at most `AUTO_MAX_PARAMS` weights, where launches dominate a step; 'on' for any model;
'off' never. A capture that fails (an operation a graph cannot hold) is reported once and that set-up steps as
before, so a graph never stops a walk.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

MODE = os.environ.get("GEODESIC_CUDA_GRAPHS", "auto")
AUTO_MAX_PARAMS = 2_000_000  # the models whose steps launches dominate: the MLPs and LeNet-5, not VGG or ResNet
WARMUP_CALLS = 2  # before capture, on a side stream (cuBLAS and cuSOLVER set up their workspaces there)
# A graph keeps the memory of one whole step of its batch (its own pool) for as long as it lives: a LeNet-5 batch of
# 32 walks holds its guard's and measurements' activations for 32 × 1,024 inputs. So at most MAX_LIVE graphs live
# in the process; one not replayed for IDLE_SECONDS makes room for a new one, and while every live graph is in use
# a new batch steps without one.
MAX_LIVE = 16
IDLE_SECONDS = 10.0
_LOCK = threading.RLock()  # captures, replays and the registry: one at a time in the process
# id -> the recorded graphs, held weakly (a batch that is dropped frees its own), oldest use first
_LIVE: dict[int, weakref.ref] = {}
_REPORTED: set[str] = set()


class CaptureFailed(RuntimeError):
    """The function could not be recorded as a CUDA graph (it is then run as before)."""


class NoRoom(RuntimeError):
    """MAX_LIVE graphs are live and in use: record this one later."""


class Released(RuntimeError):
    """This graph made room for another one: record it again to use it."""


def wanted(device: torch.device, n_params: int) -> bool:
    """Whether steps on `device` of a model with `n_params` weights should run as CUDA graphs (MODE)."""
    mode = MODE
    if mode not in ("auto", "on", "off"):
        report_once(f"GEODESIC_CUDA_GRAPHS={mode!r} is not auto, on or off; auto is used", prefix="geodesic")
        mode = "auto"
    if device.type != "cuda" or mode == "off":
        return False
    return mode == "on" or n_params <= AUTO_MAX_PARAMS


def describe(err: BaseException) -> str:
    """An error's type and the first line of its message."""
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def report_once(reason: str, prefix: str = "geodesic: stepping without a CUDA graph") -> None:
    """Say on stderr, once per reason, why a step runs without a graph (or what was wrong with the setting)."""
    if reason not in _REPORTED:
        _REPORTED.add(reason)
        print(f"{prefix}: {reason}", file=sys.stderr)


class Captured:
    """`fn(inputs)` recorded once for inputs shaped like `example`, replayed on every call.

    inputs: a pytree (dicts, tuples, lists) of tensors and other leaves; the tensors are copied into buffers
    of the same shapes, dtypes and devices, the other leaves must equal the example's. The result is the
    graph's own output tensors, overwritten by the next call: read or copy them before calling again.
    `record` (tests) replaces the CUDA recording with a plain call on the static buffers, so the buffer
    handling can be checked on a machine without a GPU.
    """

    def __init__(self, fn: Callable, example: object, record: bool = True):
        leaves, self._spec = tree_flatten(example)
        self._kinds = [_kind(leaf) for leaf in leaves]
        self._fn, self._graph, self._record, self.released = fn, None, record, False
        self.last_used = time.monotonic()
        with _LOCK:
            if record:
                _make_room()
            self._static = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
            if record:
                self._capture()
                _register(self)

    def release(self) -> None:
        """Drop the graph, its memory and its buffers (the next call raises Released)."""
        with _LOCK:
            _LIVE.pop(id(self), None)
            self.released, self._graph, self._out, self._static = True, None, None, []

    def _capture(self) -> None:
        """Warm up and record (the caller holds _LOCK)."""
        inputs = tree_unflatten(self._static, self._spec)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._fn(inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # Recorded on the stream it warmed up on: libraries keep handles and workspaces per stream, and one
            # created during the capture would be an allocation the capture cannot hold (PyTorch's
            # make_graphed_callables does the same). thread_local: other threads (other sessions' pages) may go
            # on using the device meanwhile.
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self._out = self._fn(inputs)
        except Exception as err:  # noqa: BLE001 - any failure to record means: run it the eager way
            torch.cuda.synchronize()
            raise CaptureFailed(describe(err)) from err
        self._graph = graph

    def matches(self, inputs: object) -> bool:
        """Whether `inputs` has the example's structure, shapes, dtypes, devices and non-tensor leaves."""
        leaves, spec = tree_flatten(inputs)
        return spec == self._spec and [_kind(leaf) for leaf in leaves] == self._kinds

    def __call__(self, inputs: object) -> object:
        if not self.matches(inputs):
            raise ValueError("these inputs differ in structure or shape from the ones the graph was recorded for")
        leaves = tree_flatten(inputs)[0]
        with _LOCK:
            if self.released:
                raise Released("this graph was released to make room for another one")
            self.last_used = time.monotonic()
            if id(self) in _LIVE:
                _LIVE[id(self)] = _LIVE.pop(id(self))  # now the most recently used
            for buffer, leaf in zip(self._static, leaves, strict=True):
                if isinstance(buffer, Tensor):
                    buffer.copy_(leaf)
            if not self._record:  # as a replay does: the same output tensors, overwritten in place
                fresh = self._fn(tree_unflatten(self._static, self._spec))
                if self._graph is None:
                    self._out, self._graph = fresh, "plain"
                else:
                    for old, new in zip(tree_flatten(self._out)[0], tree_flatten(fresh)[0], strict=True):
                        if isinstance(old, Tensor):
                            old.copy_(new)
                return self._out
            self._graph.replay()
            return self._out


def _register(graph: Captured) -> None:
    key = id(graph)

    def forget(ref: weakref.ref) -> None:  # the graph was collected: its entry goes (not a later one's)
        if _LIVE.get(key) is ref:
            _LIVE.pop(key, None)

    with _LOCK:
        _LIVE[key] = weakref.ref(graph, forget)


def _make_room() -> None:
    """Release the graphs idle for IDLE_SECONDS, oldest first, until fewer than MAX_LIVE live; raise NoRoom if
    every live graph is still in use (under _LOCK)."""
    now = time.monotonic()
    for key, ref in list(_LIVE.items()):
        graph = ref()
        if graph is None:
            _LIVE.pop(key, None)
        elif len(_LIVE) >= MAX_LIVE and now - graph.last_used >= IDLE_SECONDS:
            graph.release()
    if len(_LIVE) >= MAX_LIVE:
        raise NoRoom(f"{len(_LIVE)} CUDA graphs are in use (at most {MAX_LIVE})")


def _kind(leaf: object) -> object:
    if isinstance(leaf, Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    return ("value", leaf)
