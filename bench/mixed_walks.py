"""A light walk beside a heavy one through one engine: what each gets with fair_share 'steps' and 'time'.

A class server where one student opens a big conv net and the others walk the default MLP: with one step each
per round ('steps') the MLP walks move at the conv net's pace; sharing the engine's seconds ('time') gives each
walk about half. Prints, per policy, each walk's steps/s and its share of the engine's time, beside the same
walk alone in the same run. The light walk is the digits MLP's new-task walk (it has no end point); the heavy one
a sparsify walk of --heavy on --dataset.

Usage: python bench/mixed_walks.py [--heavy vgg11] [--dataset digits-images] [--seconds 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from geodesic.config import DataConfig, GoalConfig, ModelConfig, RunConfig, default_walk  # noqa: E402
from geodesic.engine import Engine, EngineSettings  # noqa: E402
from geodesic.experiment import build  # noqa: E402


def rates(engine: Engine, walkers: dict, seconds: float) -> dict:
    handles = {name: engine.open(w, name) for name, w in walkers.items()}
    start = {name: w.n_steps for name, w in walkers.items()}
    for h in handles.values():
        h.run()
    time.sleep(seconds)
    for h in handles.values():
        h.pause()
    total = sum(h.engine_seconds for h in handles.values()) or 1.0
    out = {name: {"steps_per_s": round((walkers[name].n_steps - start[name]) / seconds, 2),
                  "engine_share": round(h.engine_seconds / total, 2)} for name, h in handles.items()}
    for h in handles.values():
        h.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heavy", default="vgg11")
    parser.add_argument("--dataset", default="digits-images")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    def heavy():  # a fresh walk from the cached start network each time (big models keep no points to branch from)
        return build(RunConfig(goal=GoalConfig(kind="sparsify"), data=DataConfig(name=args.dataset),
                               model=ModelConfig(name=args.heavy),
                               walk=default_walk("sparsify", "constrained", model=args.heavy, n_steps=10**6))).walker

    def light():  # the digits new-task walk: it has no end point, so it walks the whole time
        return build(RunConfig(goal=GoalConfig(kind="new-task"),
                               walk=default_walk("new-task", "constrained", n_steps=10**6))).walker

    rows = []
    for policy in ("steps", "time"):
        engine = Engine(EngineSettings(fair_share=policy))
        try:
            alone_light = rates(engine, {"light": light()}, args.seconds)["light"]
            alone_heavy = rates(engine, {"heavy": heavy()}, args.seconds)["heavy"]
            both = rates(engine, {"light": light(), "heavy": heavy()}, args.seconds)
        finally:
            engine.stop()
        row = {"fair_share": policy, "light_alone": alone_light["steps_per_s"],
               "heavy_alone": alone_heavy["steps_per_s"],
               "light_beside": both["light"]["steps_per_s"], "heavy_beside": both["heavy"]["steps_per_s"],
               "light_share": both["light"]["engine_share"], "heavy_share": both["heavy"]["engine_share"]}
        row["light_ratio"] = round(row["light_beside"] / max(row["light_alone"], 1e-9), 3)
        row["heavy_ratio"] = round(row["heavy_beside"] / max(row["heavy_alone"], 1e-9), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
