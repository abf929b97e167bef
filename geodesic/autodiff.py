"""Forward-mode AD that is safe to call from several threads.

`torch.func.jvp` keeps its dual-number levels in process-global state, so two threads running a jvp at
once fail with `RuntimeError: Trying to create a dual Tensor for forward AD but no level exists` or `... with
an invalid index` (measured: 8 threads stepping penalty walks for 5 s, 7 of 8 crashed; the app runs every
browser session in its own thread). Reverse mode, vmap and grad keep thread-local state and need no guard.
Every jvp in the engine goes through `jvp` below, which holds one process-wide lock for the call: the engine
(engine.py) already steps every walk of a server on one thread, and this keeps the Python API, the CLI and
any caller with its own threads safe as well.
"""
from __future__ import annotations

import threading

import torch.func

FORWARD_AD_LOCK = threading.RLock()  # re-entrant: a jvp may run inside a vmap that another jvp called


def jvp(func, primals, tangents, **kwargs):
    """torch.func.jvp under the process-wide forward-AD lock."""
    with FORWARD_AD_LOCK:
        return torch.func.jvp(func, primals, tangents, **kwargs)


def warm_up() -> None:
    """Run torch.func once: its first call imports parts of PyTorch (torch._dynamo) lazily, seconds on some
    machines, and the first forward-mode product compiles PyTorch's jvp decompositions with TorchScript (0.26 s
    here; py-spy found a server's first walk there for its first half second); a server calls this before its
    first visitor."""
    torch.func.grad(lambda x: (x * x).sum())(torch.ones(2))
    torch.func.jvp(lambda x: torch.log_softmax(x, -1), (torch.ones(3),), (torch.ones(3),))
