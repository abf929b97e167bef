"""The sweep's Ray backend: cells walked as Ray tasks, on a cluster or on a local Ray instance.

    python -m geodesic sweep ... --backend ray                        # starts a local Ray instance
    python -m geodesic sweep ... --backend ray --ray-address HOST:6379  # joins a cluster (`ray start --head`)

Compatible cells (those a WalkBatch can step together: same data, model, step rule, probe and batch sizes) are
grouped, and each group is split into as many tasks as the cluster has slots for, so that a sweep uses every
node while cells in one task still share one batched computation. A task runs the local backend's own loop
(`sweep.walk_cells`) into a scratch folder and returns the files of its run folders; the driver writes them
into DIR/cells/NAME/ (a whole folder at a time, renamed into place), so the layout, the table and the report
are the local backend's, and a sweep stopped mid-way resumes with either backend. Ray does the scheduling,
the shipping of the `geodesic` package to the workers (`runtime_env` py_modules) and the transport: no
scheduler or RPC of our own. Ray is optional: `pip install -r requirements-ray.txt`.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ConfigError, GeodesicError


def group_key(cell) -> tuple:
    """Settings that decide whether cells can share a WalkBatch (the run-level part of batch.batch_key)."""
    a = cell.args
    return (a.dataset, a.model, a.hidden, a.solver, a.metric, a.probe_size, a.batch_size, a.goal,
            a.target_sparsity, a.new_task, a.memory_size, a.device, a.epochs, a.data_root)


def plan_tasks(cells: list, slots: int) -> list[list]:
    """Cells grouped by group_key, each group cut into near-equal tasks so that there are about `slots` tasks in
    all (at least one per group, at most one per cell)."""
    groups: dict[tuple, list] = {}
    for cell in cells:
        groups.setdefault(group_key(cell), []).append(cell)
    tasks = []
    for group in groups.values():
        share = max(1, round(slots * len(group) / len(cells)))
        n_tasks = min(len(group), share)
        size = math.ceil(len(group) / n_tasks)
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    return tasks


def walk_remote(cells: list) -> dict[str, dict[str, bytes]]:
    """In a Ray worker: walk `cells` into a scratch folder and return each cell's run folder as {path: bytes}."""
    from .sweep import walk_cells

    scratch = Path(tempfile.mkdtemp(prefix="geodesic-sweep-"))
    try:
        walk_cells(cells, scratch)
        result = {}
        for cell in cells:
            folder = scratch / "cells" / cell.name
            result[cell.name] = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
                                 if p.is_file()}
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_cell(out: Path, name: str, files: dict[str, bytes]) -> None:
    """Put a cell's returned files in out/cells/NAME, all at once (a folder renamed into place)."""
    cells_dir = out / "cells"
    incoming = cells_dir / f".incoming-{name}"
    shutil.rmtree(incoming, ignore_errors=True)
    for rel, data in files.items():
        path = (incoming / rel).resolve()
        if incoming.resolve() not in path.parents:  # a path from a worker never leaves its cell's folder
            raise GeodesicError(f"cell {name}: a worker returned a file outside its folder ({rel})")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    final = cells_dir / name
    if final.exists():
        shutil.rmtree(final)
    incoming.rename(final)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, with the address in the message, when nothing listens there (ray.init would retry for
    minutes). 'auto' (the cluster this machine's `ray start` joined) is left to Ray."""
    import socket

    if address == "auto":
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("ray-address", address, "HOST:PORT of a Ray head node (`ray start --head` prints it), "
                          "or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as err:
        raise GeodesicError(f"--ray-address {address}: no Ray head node answers there ({err.strerror or err}); "
                            "start one with `ray start --head` or leave --ray-address out for a local instance"
                            ) from None


def run_on_ray(args, cells: list, out: Path, on_done=None) -> list[str]:
    """Walk `cells` as Ray tasks and write their folders under `out` (on_done(cell) as each lands); returns one
    message per failed task."""
    try:
        import ray
    except ImportError:
        raise GeodesicError("--backend ray needs Ray, an optional dependency: pip install -r requirements-ray.txt"
                            ) from None
    import geodesic

    cpus = args.ray_cpus_per_task
    gpus = args.ray_gpus_per_task if args.ray_gpus_per_task is not None else (1 if args.device == "cuda" else 0)
    if cpus <= 0 or gpus < 0:
        raise ConfigError("ray-cpus-per-task" if cpus <= 0 else "ray-gpus-per-task", cpus if cpus <= 0 else gpus,
                          "a number > 0 (CPUs) or >= 0 (GPUs)")
    env = {k: os.environ[k] for k in ("GEODESIC_CACHE",) if k in os.environ}
    runtime_env = {"py_modules": [geodesic], "env_vars": env}
    started_here = not ray.is_initialized()
    if started_here and args.ray_address:
        check_reachable(args.ray_address)
    if started_here:
        ray_log = logging.getLogger("ray")
        level = ray_log.level
        if args.quiet:  # Ray's notices on starting (e.g. "Token authentication is enabled ...") too; errors stay
            ray_log.setLevel(logging.ERROR)
        try:
            ray.init(address=args.ray_address, num_cpus=None if args.ray_address else args.ray_num_cpus,
                     runtime_env=runtime_env, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            hint = ""
            if args.ray_address and os.environ.get("RAY_AUTH_MODE") != "token":
                hint = ("; a cluster started with token authentication (what `ray start` does from Ray 2.59 on) needs "
                        "RAY_AUTH_MODE=token and its token here too (see the README)")
            raise GeodesicError(f"Ray did not start ({str(err).strip().splitlines()[-1]}){hint}") from None
        finally:
            ray_log.setLevel(level)
    try:
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
        remote = ray.remote(walk_remote).options(num_cpus=cpus, num_gpus=gpus, max_retries=1,
                                                 runtime_env=runtime_env)
        pending = {remote.remote(task): task for task in plan_tasks(cells, slots)}
        failed = []
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # a task that failed loses only its own cells: they run again next time
                first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                failed.append(f"cells {', '.join(c.name for c in task)} failed on Ray: {first_line}")
                continue
            for cell in task:
                write_cell(out, cell.name, result[cell.name])
                if on_done is not None:
                    on_done(cell)
        return failed
    finally:
        if started_here:
            ray.shutdown()
