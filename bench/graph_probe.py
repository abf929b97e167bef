"""Which of the fused step's operations a CUDA graph can record on this machine (PyTorch, CUDA, cuBLAS, cuSOLVER
versions): each is recorded alone with graphs.Captured and replayed on new inputs against a plain call, and then
the whole fused step of one digits walk and of a batch of 8 (sparsify, constrained). So when the fused step
falls back ("stepping without a CUDA graph" on stderr), one line here names the operation.

Usage: python bench/graph_probe.py      (needs a CUDA GPU)
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, jvp, vmap  # noqa: E402

from geodesic import graphs  # noqa: E402


def _spd(n: int = 160, batch: int = 2) -> torch.Tensor:
    a = torch.randn(batch, n, 3 * n, device="cuda", dtype=torch.float64)
    return a @ a.mT


OPERATIONS = {
    "cholesky_ex (batched, float64)": (lambda x: torch.linalg.cholesky_ex(x["k"])[0], lambda: {"k": _spd()}),
    "cholesky_ex (one matrix)": (lambda x: torch.linalg.cholesky_ex(x["k"])[0], lambda: {"k": _spd(batch=1)[0]}),
    "solve_triangular (batched)": (
        lambda x: torch.linalg.solve_triangular(x["l"], x["b"], upper=False),
        lambda: {"l": torch.linalg.cholesky(_spd()), "b": torch.randn(2, 160, 1, device="cuda", dtype=torch.float64)}),
    "matrix_norm": (lambda x: torch.linalg.matrix_norm(x["k"]), lambda: {"k": _spd()}),
    "topk": (lambda x: torch.topk(x["v"], 2_000, sorted=False).indices.sort().values,  # order: not specified
             lambda: {"v": torch.rand(26_000, device="cuda")}),
    "log_softmax + cross_entropy": (
        lambda x: F.cross_entropy(torch.log_softmax(x["z"], -1), x["y"]),
        lambda: {"z": torch.randn(200, 10, device="cuda"), "y": torch.randint(0, 10, (200,), device="cuda")}),
    "vmap(grad) of a small MLP loss": (
        lambda x: vmap(grad(lambda w, a: torch.tanh(a @ w).pow(2).sum()))(x["w"], x["a"]),
        lambda: {"w": torch.randn(8, 64, 32, device="cuda"), "a": torch.randn(8, 200, 64, device="cuda")}),
    "jvp (forward mode)": (
        lambda x: jvp(lambda w: torch.tanh(x["a"] @ w), (x["w"],), (x["t"],))[1],
        lambda: {"w": torch.randn(64, 32, device="cuda"), "t": torch.randn(64, 32, device="cuda"),
                 "a": torch.randn(16, 64, device="cuda")}),
}


def _same(a, b) -> bool:
    flat_a, flat_b = torch.utils._pytree.tree_flatten(a)[0], torch.utils._pytree.tree_flatten(b)[0]
    return all(torch.allclose(x.double(), y.double(), rtol=1e-6, atol=1e-8) if x.is_floating_point()
               else torch.equal(x, y) for x, y in zip(flat_a, flat_b, strict=True))


def probe(name: str, fn, make) -> None:
    try:
        captured = graphs.Captured(fn, make())
        fresh = make()
        got = torch.utils._pytree.tree_map(lambda t: t.clone(), captured(fresh))
        print(f"{name:40s} recorded; replay {'matches' if _same(got, fn(fresh)) else 'DIFFERS from'} a plain call",
              flush=True)
    except Exception as err:  # noqa: BLE001 - a probe: report and go on
        print(f"{name:40s} NOT recorded: {graphs.describe(err)}", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("graph_probe needs a CUDA GPU")
    graphs.MAX_LIVE = 1_000
    for name, (fn, make) in OPERATIONS.items():
        probe(name, fn, make)
    from geodesic.batch import WalkBatch
    from geodesic.config import GoalConfig, RunConfig, default_walk
    from geodesic.experiment import build

    start = build(RunConfig(goal=GoalConfig(kind="sparsify"), device="cuda",
                            walk=default_walk("sparsify", "constrained"))).walker
    for n in (1, 8):
        batch = WalkBatch([start.branch(0, seed=i) for i in range(n)])
        for _ in range(6):
            batch.step()
        recorded = any(k[0] == "fused" for k in batch._static) and not batch.fused_failed
        label = f"the fused step, {n} walk(s)"
        print(f"{label:40s} {'recorded' if recorded else 'NOT recorded'}", flush=True)


if __name__ == "__main__":
    main()
