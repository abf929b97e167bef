"""The sweep's HTML report: accuracy along the path for every cell, the accuracy each kept against its steps,
the best cell of each goal and problem, and a table of every cell.

The engine stays free of UI libraries: the report is a static page built from plain JSON, drawn by plotly.js
(the file the installed plotly package ships, found without importing the package and embedded, so the
report opens offline). Nothing here runs in the dashboard.
"""
from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

import pandas as pd

# Settings that make a cell another problem, not another way of walking the same one: a best cell is chosen among
# the cells of one goal *and* one of each of these (where the sweep varies them). Across them, "best" compared a
# task-incremental walk with a class-incremental one, an easy target sparsity with a hard one.
PROBLEM = ("dataset", "model", "new-task", "target-sparsity")


def problem_of(row) -> dict:
    """The problem-defining settings (PROBLEM) that a sweep varied and that this cell has, by flag."""
    return {k: row[k] for k in PROBLEM if k in row and not (row[k] is None or pd.isna(row[k]))}


def best_cells(table: pd.DataFrame) -> pd.DataFrame:
    """Per goal and problem (PROBLEM), the best cell by summary.outcome_rank: one that kept the function and reached
    the goal, for a new task with the best average end accuracy over A and B, with the most accuracy kept on task A
    along the path (then at the end, then in fewer steps); a cell that reached its goal by falling to one-shot
    pruning's accuracy is no best cell while another kept the function."""
    from .summary import outcome_rank

    keys = ["goal", *[k for k in PROBLEM if k in table]]
    rows = []
    for _, cells in table.groupby(keys, sort=True, dropna=False):
        goal = cells["goal"].iloc[0]
        end_b = cells["end_accuracy/B"] if goal == "new-task" and "end_accuracy/B" in cells else [None] * len(cells)
        ranks = [outcome_rank(*r) for r in zip(cells["start_accuracy/A"], cells["min_accuracy/A"],
                                               cells["end_accuracy/A"], cells["reached_goal"], cells["steps"],
                                               end_b, strict=True)]
        rows.append(cells.iloc[max(range(len(ranks)), key=ranks.__getitem__)])
    return pd.DataFrame(rows)


# plotly.js's default colourway, given per cell so that its task-A and task-B lines share one
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def plotly_js() -> str:
    """The plotly.js of the installed plotly package (its file, not the Python package)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the plotly package (requirements.txt) is needed for the sweep's HTML report")
    return (Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js").read_text()


def _whole_ticks(steps) -> dict:
    """A step axis spanning only a few steps is ticked at whole steps (plotly.js put ticks at 14.5, 15.5)."""
    steps = list(steps)
    return {"dtick": 1} if steps and max(steps) - min(steps) < 8 else {}


def write_sweep_report(out: Path, table: pd.DataFrame, paths: dict[str, pd.DataFrame]) -> Path:
    """DIR/sweep.html from the sweep's table and each cell's per-step table (paths[cell])."""
    traces = []
    for i, (name, frame) in enumerate(paths.items()):  # a new task's cells also draw what they learned: B, dashed
        tasks = [t for t in ("A", "B") if f"accuracy/{t}" in frame and frame[f"accuracy/{t}"].notna().any()]
        colour = COLOURS[i % len(COLOURS)]  # a cell's two lines in one colour
        traces += [{"type": "scatter", "mode": "lines", "name": name if t == "A" else f"{name} (task B)",
                    "legendgroup": name, "line": {"dash": "solid" if t == "A" else "dash", "color": colour},
                    "x": frame["step"].tolist(), "y": (100 * frame[f"accuracy/{t}"]).round(3).tolist()}
                   for t in tasks]
    title = "Test accuracy (task A) along the path, one line per cell" + (
        "; task B dashed" if any(t["line"]["dash"] == "dash" for t in traces) else "")
    longest = max((len(frame) for frame in paths.values()), default=0)
    layout = {"title": {"text": title}, "height": 560,
              "xaxis": {"title": {"text": "step"}, **_whole_ticks(range(longest))},
              "yaxis": {"title": {"text": "test accuracy (%)"}},
              "template": {"layout": {"plot_bgcolor": "white"}}}
    # Each cell as one point: the steps it took against the accuracy it kept all along (its lowest point), and
    # where it ended; cells that did not reach their goal are hollow, a new task's (no goal of its own) diamonds.
    kept = []
    groups = (("reached the goal", table["reached_goal"] == True, "circle"),  # noqa: E712 (a column, not a bool)
              ("did not", table["reached_goal"] == False, "circle-open"),  # noqa: E712
              ("a new task (no goal of its own)", table["reached_goal"].isna(), "diamond-open"))
    for name, chosen, symbol in groups:
        part = table[chosen]
        if len(part):
            kept.append({"type": "scatter", "mode": "markers", "name": name,
                         "x": part["steps"].tolist(), "y": (100 * part["min_accuracy/A"]).round(3).tolist(),
                         "text": part["cell"].tolist(), "hovertemplate": "%{text}<br>%{x} steps, lowest %{y}%",
                         "marker": {"size": 11, "symbol": symbol}})
    kept_layout = {"title": {"text": "Accuracy kept (lowest test accuracy A along the path) against steps, "
                                     "one point per cell"}, "height": 420,
                   "xaxis": {"title": {"text": "steps"}, **_whole_ticks(table["steps"])},
                   "yaxis": {"title": {"text": "lowest test accuracy (%)"}},
                   "template": {"layout": {"plot_bgcolor": "white"}}}
    best = best_cells(table).drop(columns=["stop_reason"], errors="ignore")

    def cell(value) -> str:  # a setting or number a cell's goal does not have (a connect cell's sparsity): a dash
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        return html.escape(f"{value:.4g}" if isinstance(value, float) else str(value))

    def html_table(frame: pd.DataFrame) -> str:
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
        body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                       for row in frame.itertuples(index=False))
        return f"<table><tr>{head}</tr>{body}</table>"

    every = table.sort_values(["goal", "min_accuracy/A"], ascending=[True, False])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Sweep: {len(table)} cells</title>
<style>body{{font-family:sans-serif;margin:24px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{white-space:nowrap;text-align:left}}</style>
<script>{plotly_js()}</script></head>
<body><h1>Sweep: {len(table)} cells ({html.escape(str(out))})</h1>
<div id="paths"></div>
<div id="kept"></div>
<h2>Best cell per goal{" and " + ", ".join(k for k in PROBLEM if k in table) if any(k in table for k in PROBLEM)
                         else ""} (lowest accuracy kept, then end accuracy, then steps)</h2>
{html_table(best)}
<h2>Every cell (by goal, most accuracy kept first)</h2>
{html_table(every)}
<script>Plotly.newPlot("paths", {json.dumps(traces)}, {json.dumps(layout)}, {{"displaylogo": false}});
Plotly.newPlot("kept", {json.dumps(kept)}, {json.dumps(kept_layout)}, {{"displaylogo": false}});</script>
</body></html>
"""
    path, tmp = out / "sweep.html", out / "sweep.html.tmp"
    tmp.write_text(page)
    tmp.replace(path)
    return path
