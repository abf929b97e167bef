"""`python -m app.serve [streamlit run options]`: the dashboard, with its heavy imports done before anyone opens it.

`streamlit run` imports an app's modules when the first page connects, so the first visitor of a fresh server
waited for PyTorch's lazily imported parts (torch.optim pulls in torch._dynamo), scikit-learn's dataset loaders
and plotly's validators: about 4 of the 6.5 s of the first paint (py-spy on the server, BENCHMARKS.md). This
launcher imports them first, in the server's own process, then hands over to Streamlit's command line; the page's
script finds them loaded.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# OpenMP workers that wait for the next parallel region by spinning a few microseconds, then sleep. GNU OpenMP's
# default spins ~300,000 times (a busy engine's workers then hold a core that pages need); OMP_WAIT_POLICY=PASSIVE
# (no spin) wakes them from sleep for every op, which cost a batch of 8 walks on 2 threads a third of its speed.
# 10,000 spins (tens of microseconds) keep both gains (bench/batch_profile.py, bench/load.py, BENCHMARKS.md).
# libgomp reads this when PyTorch loads it, so it is set before anything imports torch; the environment's wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

ROOT = Path(__file__).resolve().parents[1]


def warm_up() -> None:
    """Import what the first page needs and run the lazy parts once (a few seconds, before serving)."""
    sys.path.insert(0, str(ROOT))
    import pandas as pd
    from sklearn.datasets import load_digits  # noqa: F401
    from sklearn.model_selection import train_test_split  # noqa: F401

    from app import charts  # plotly and its figure validators
    from geodesic import analysis, experiment  # noqa: F401  (torch.optim, which imports torch._dynamo)
    from geodesic.autodiff import warm_up as warm_up_torch

    warm_up_torch()  # torch.func's own lazy imports
    from geodesic.worker import analysis_process

    analysis_process().start()  # the baselines' process imports PyTorch while the server starts, not on a first page
    frame = pd.DataFrame({"step": [0, 1], "accuracy/A": [0.9, 0.9], "loss/A": [0.3, 0.3], "sparsity": [0.0, 0.1],
                          "goal_distance": [1.0, 0.9], "event": ["start", ""]})
    charts.accuracy_and_loss([("main", frame)]).to_json()
    charts.sparsity_and_distance([("main", frame)]).to_json()


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from geodesic.engine import on_a_passing_thread

    # Not on this main thread, which serves pages from now on: an OpenMP team it kept would slow the engine's
    # (geodesic.engine.on_a_passing_thread).
    on_a_passing_thread(warm_up)
    from streamlit.web import cli

    sys.argv = ["streamlit", "run", str(ROOT / "app" / "streamlit_app.py"), *sys.argv[1:]]
    sys.exit(cli.main())


if __name__ == "__main__":
    main()
