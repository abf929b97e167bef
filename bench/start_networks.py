"""A class opening one link: N sessions build the same walk at once while its start network is not cached yet.

Reference in the same run: one session alone building the same walk from an empty cache (and the embedded data
not read yet). Prints the wall time until every session has its walk, and the process's CPU seconds, for both;
with the start network trained once (geodesic/training.py) and the data read once (geodesic/data.py), N sessions
at once take about as long as one alone.

Usage: python bench/start_networks.py [--sessions 4] [--dataset mnist-sample]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodesic import data  # noqa: E402
from geodesic.config import DataConfig, GoalConfig, RunConfig  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def at_once(config: RunConfig, n_sessions: int) -> dict:
    """n_sessions threads build `config` at once with an empty start-network cache."""
    os.environ["GEODESIC_CACHE"] = tempfile.mkdtemp(prefix="geodesic-bench-cache-")
    if hasattr(data, "_embedded_arrays"):  # as in a fresh server: the embedded data not read yet either
        data._embedded_arrays.cache_clear()
    barrier, errors = threading.Barrier(n_sessions), []

    def session() -> None:
        barrier.wait()
        try:
            build(config)
        except Exception as err:  # noqa: BLE001 - counted and printed
            errors.append(repr(err))

    threads = [threading.Thread(target=session) for _ in range(n_sessions)]
    cpu, t0 = _cpu_seconds(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"sessions": n_sessions, "all_ready_s": round(time.perf_counter() - t0, 2),
            "cpu_s": round(_cpu_seconds() - cpu, 1), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--dataset", default="mnist-sample")
    args = parser.parse_args()
    config = RunConfig(goal=GoalConfig(kind="sparsify"), data=DataConfig(name=args.dataset))
    build(RunConfig(goal=GoalConfig(kind="sparsify"), data=DataConfig(name="moons")))  # imports, lazy parts
    lone = at_once(config, 1)
    many = at_once(config, args.sessions)
    print(json.dumps({"dataset": args.dataset, "lone": lone, "at_once": many,
                      "at_once_over_lone_wall": round(many["all_ready_s"] / lone["all_ready_s"], 2),
                      "at_once_over_lone_cpu": round(many["cpu_s"] / lone["cpu_s"], 2)}))


if __name__ == "__main__":
    main()
