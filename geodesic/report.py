"""The sweep's HTML report: accuracy kept along the path for every cell, and the best cell of each goal.

The only module of the engine's package that uses plotly, imported only when a sweep writes its report; the
report embeds plotly.js (from the installed plotly package), so it opens offline.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def best_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Per goal, the cell that kept the most accuracy on task A among those that reached the goal (if none did,
    among all): its lowest accuracy along the path first, then its end accuracy, then fewer steps."""
    rows = []
    for _, cells in table.groupby("goal", sort=True):
        pool = cells[cells["reached_goal"]] if cells["reached_goal"].any() else cells
        pool = pool.sort_values(["min_accuracy/A", "end_accuracy/A", "steps"], ascending=[False, False, True])
        rows.append(pool.iloc[0])
    return pd.DataFrame(rows)


def write_sweep_report(out: Path, table: pd.DataFrame, paths: dict[str, pd.DataFrame]) -> Path:
    """DIR/sweep.html from the sweep's table and each cell's per-step table (paths[cell])."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, row_heights=[0.7, 0.3], vertical_spacing=0.12,
                        specs=[[{"type": "xy"}], [{"type": "table"}]],
                        subplot_titles=("Test accuracy (task A) along the path, one line per cell",
                                        "Best cell per goal (lowest accuracy kept, then end accuracy, then steps)"))
    for name, frame in paths.items():
        fig.add_trace(go.Scatter(x=frame["step"], y=100 * frame["accuracy/A"], name=name, mode="lines"), row=1, col=1)
    best = best_cells(table)
    columns = [c for c in best.columns if c not in ("stop_reason",)]
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in best[c]] for c in columns]
    fig.add_trace(go.Table(header=dict(values=columns), cells=dict(values=cells)), row=2, col=1)
    fig.update_xaxes(title_text="step", row=1, col=1)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    fig.update_layout(height=900, template="plotly_white", title=f"Sweep: {len(table)} cells ({out})")
    path = out / "sweep.html"
    tmp = out / "sweep.html.tmp"
    fig.write_html(tmp, include_plotlyjs=True)
    tmp.replace(path)
    return path
