"""Pure plotly builders: plain tables and arrays in, figures out. No Streamlit, no tensors.

`runs` arguments are lists of (label, frame) so branches and compared runs share every chart.
Events (step-size changes, branches, projection) are drawn as vertical dotted lines on step axes.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04"]
Runs = list[tuple[str, pd.DataFrame]]


def _layout(fig: go.Figure, title: str, height: int = 340) -> go.Figure:
    fig.update_layout(title=dict(text=title, x=0.01, font=dict(size=15)), height=height, template="plotly_white",
                      margin=dict(l=50, r=20, t=50, b=40), legend=dict(orientation="h", y=-0.2),
                      uirevision="keep")  # keep zoom and legend state across live refreshes
    return fig


def _events(fig: go.Figure, frame: pd.DataFrame, row: int | None = None, col: int | None = None) -> None:
    if "event" not in frame:
        return
    for step, event in frame.loc[frame["event"].fillna("") != "", ["step", "event"]].itertuples(index=False):
        if event == "start":
            continue
        kwargs = dict(row=row, col=col) if row else {}
        fig.add_vline(x=step, line=dict(color="#64748b", dash="dot", width=1), **kwargs)
        fig.add_annotation(x=step, y=1, yref="y domain" if not row else f"y{'' if row == 1 else row} domain",
                           text=event, showarrow=False, textangle=-90, xanchor="right", yanchor="top",
                           font=dict(size=10, color="#475569"))


def source(run: int, x: str | list, y: str | list, text: str | list | None = None, start: int = 0,
           z: str | None = None, color: str | None = None, last: bool = False) -> dict:
    """A trace's `meta`: how its points come from run `run`'s table (rows `start` on), so a live chart can append
    a growing path's new rows without rebuilding the figure (app/live_chart.py). x, y, z: a column, or [column,
    scale] or [column, "sqrt"]; text: a column or [column, format]; color: the column of the marker colours;
    last: the trace shows only the table's last row (a "current point" marker)."""
    return {"src": {"run": run, "x": x, "y": y, "z": z, "text": text, "color": color, "start": start, "last": last}}


def column_values(frame: pd.DataFrame, spec) -> list:
    """The values a `source` spec names, for the rows of `frame` (the same numbers the figure shows)."""
    if isinstance(spec, str):
        return frame[spec].tolist()
    column, how = spec
    values = frame[column]
    if how == "sqrt":
        return np.sqrt(values.clip(lower=0)).tolist()
    if isinstance(how, str):
        return [how.format(v) for v in values]
    return (how * values).tolist()


def _tasks(frame: pd.DataFrame, prefix: str) -> list[str]:
    return [c.split("/", 1)[1] for c in frame.columns if c.startswith(prefix + "/")]


# A log axis for ε and ρ, ticked at round values written out (0.05, 0.1, 0.2). Plotly's own ticks under one decade
# fall at 10^(k·d) (0.0956, 0.1477, ...), and its "D2" ticks write 0.2 as a small "2". Fixed values, so a live chart
# whose range grows keeps them; how many per decade follows the span of the values at hand, so that a fan from
# ε = 0.01 to 1000 is not ticked 18 times on a short panel, and ρ = 0.3 (sparsify's default) gets its label.
def log_ticks(*series, mantissas: tuple[int, ...] | None = None) -> dict:
    """A log axis's ticks for the values in `series`: more in each decade the fewer decades they span (or at
    `mantissas` × powers of ten, whatever the values)."""
    values = [float(v) for s in series for v in s if v == v and v > 0]  # (v == v: not NaN)
    decades = math.log10(max(values) / min(values)) if values else 0.0
    if mantissas is None:
        mantissas = (1, 2, 3, 5) if decades <= 1 else (1, 2, 5) if decades <= 2.5 else (1,)
    every = 1 if decades <= 6 else math.ceil(decades / 6)  # powers of ten, every few when they would crowd
    # (from text: 0.3, where 3 * 10.0 ** -1 is 0.30000000000000004)
    vals = [float(f"{m}e{n}") for n in range(-9, 10) if n % every == 0 for m in mantissas]
    return dict(type="log", tickmode="array", tickvals=vals, ticktext=[f"{v:g}" for v in vals])


FEW_STEPS = 8


def few_steps(runs: Runs) -> bool:
    """Whether the walks' steps span fewer than FEW_STEPS: their step axes are then ticked at every step. A live
    chart is drawn again from scratch when this changes (live_chart.runs_signature): a walk run from step 0 kept its
    first figure's tick at every step, a smear of numbers and grid lines, until the walk stopped."""
    steps = [frame["step"] for _, frame in runs if len(frame)]
    span = max(s.max() for s in steps) - min(s.min() for s in steps) if steps else 0
    return span < FEW_STEPS


def step_ticks(runs: Runs) -> dict:
    """A step axis's ticks: at whole steps while the axis spans only a few (the first clicks of Step), where Plotly's
    own ticks fell at 0.5, 1.5, ...; Plotly's ticks beyond that (it has no integer-only mode: plotly.py#4697). Steps
    are never negative: a walk at step 0 alone was autoranged from -1 to 1 and showed a step "-1"."""
    return {"rangemode": "nonnegative", **({"dtick": 1} if few_steps(runs) else {})}


def accuracy_and_loss(runs: Runs, baselines: dict | None = None) -> go.Figure:
    """Test accuracy per task (top) and test loss (bottom) along the path, with baselines overlaid."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.62, 0.38],
                        specs=[[{}], [{"secondary_y": True}]])
    show_eps = any(_varies(frame, "step_size") for _, frame in runs)  # an adaptive or hand-changed ε
    for i, (label, frame) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        for j, task in enumerate(_tasks(frame, "accuracy")):
            dash = ["solid", "dash", "dot"][j % 3]
            fig.add_trace(go.Scatter(x=frame["step"], y=100 * frame[f"accuracy/{task}"], name=f"{label}: task {task}",
                                     line=dict(color=color, dash=dash),
                                     meta=source(i, "step", [f"accuracy/{task}", 100])), row=1, col=1)
            fig.add_trace(go.Scatter(x=frame["step"], y=frame[f"loss/{task}"], name=f"{label}: loss {task}",
                                     line=dict(color=color, dash=dash), showlegend=False,
                                     meta=source(i, "step", f"loss/{task}")), row=2, col=1)
        for task in _tasks(frame, "prune_now_accuracy"):
            fig.add_trace(go.Scatter(x=frame["step"], y=100 * frame[f"prune_now_accuracy/{task}"],
                                     name=f"{label}: prune now ({task})", line=dict(color=color, width=1),
                                     opacity=0.5, meta=source(i, "step", [f"prune_now_accuracy/{task}", 100])),
                          row=1, col=1)
        if show_eps:
            fig.add_trace(go.Scatter(x=frame["step"], y=frame["step_size"], name=f"{label}: ε",
                                     line=dict(color=color, width=1, shape="hv"), opacity=0.7,
                                     meta=source(i, "step", "step_size")), row=2, col=1, secondary_y=True)
        if i == 0:
            _events(fig, frame, row=1, col=1)
    if show_eps:
        fig.update_yaxes(title_text="step size ε", **log_ticks(*(f["step_size"] for _, f in runs)), row=2, col=1,
                         secondary_y=True)
    for name, value in (baselines or {}).get("lines", {}).items():
        fig.add_hline(y=100 * value, line=dict(color="#0f172a", dash="dash", width=1), row=1, col=1,
                      # at the left: a finished walk's last event ("projected") is marked at the right edge, and
                      # its label ran into these
                      annotation_text=f"{name}: {100 * value:.1f}%", annotation_position="bottom left")
    for name, curve in (baselines or {}).get("curves", {}).items():
        for task in _tasks(curve, "accuracy"):
            fig.add_trace(go.Scatter(x=curve["step"], y=100 * curve[f"accuracy/{task}"], name=f"{name}: task {task}",
                                     line=dict(color="#0f172a", dash="dashdot", width=1.5)), row=1, col=1)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    # not the ε axis on the right; a loss is never below zero, where the one point of step 0 drew an axis from -1
    fig.update_yaxes(title_text="test loss", rangemode="nonnegative", row=2, col=1, secondary_y=False)
    fig.update_xaxes(title_text="step", row=2, col=1)
    # both panels' (shared) step axes, the grid lines too; a baseline's curve (e.g. fine-tuning) widens the axis
    fig.update_xaxes(**step_ticks([*runs, *(baselines or {}).get("curves", {}).items()]))
    return _layout(fig, "Accuracy and loss along the path", height=460)


def path_projection(coords: dict[str, np.ndarray], title: str, axis_labels: list[str],
                    steps: dict[str, np.ndarray], residual: dict[str, np.ndarray] | None = None,
                    goal_point: np.ndarray | None = None, contour: dict | None = None,
                    hover: dict[str, list[str]] | None = None, live: bool = False) -> go.Figure:
    """The path in 2-D or 3-D (coords[label]: (n, 2|3)); start, current and goal marked.

    residual[label]: ‖w − proj(w)‖ per point, shown as colour and hover (what the projection loses).
    contour: {"a", "b", "loss"} drawn behind a 2-D path and labelled as the loss on that plane.
    hover[label]: the hover texts, if already made; live: the traces name their columns ("pc1", "pc2", "pc3",
    "residual", "hover") of per-walk tables in the order of coords, for a live chart (app/live_chart.py)."""
    dims = next(iter(coords.values())).shape[1] if coords else 2
    fig = go.Figure()
    if contour is not None and dims == 2:
        fig.add_trace(go.Contour(x=contour["a"], y=contour["b"], z=contour["loss"], colorscale="Greys", opacity=0.5,
                                 name="test loss on this plane", showscale=True,
                                 colorbar=dict(title=dict(text="loss on plane", side="right"), x=1.02),
                                 contours=dict(showlabels=True)))
    for i, (label, xyz) in enumerate(coords.items()):
        color = PALETTE[i % len(PALETTE)]
        texts = hover[label] if hover else [
            f"step {s}" + (f"<br>residual {r:.3g}" if residual else "")
            for s, r in zip(steps[label], residual[label] if residual else np.zeros(len(xyz)), strict=False)]
        marker = dict(size=4, color=color)
        if residual:  # one colour scale for every walk (the layout's coloraxis, below)
            marker = dict(size=5, color=residual[label], coloraxis="coloraxis")
        scatter = go.Scatter3d if dims == 3 else go.Scatter
        axes = dict(x=xyz[:, 0], y=xyz[:, 1], **({"z": xyz[:, 2]} if dims == 3 else {}))
        z = "pc3" if dims == 3 else None
        meta = source(i, "pc1", "pc2", "hover", z=z, color="residual" if residual else None) if live else None
        fig.add_trace(scatter(**axes, mode="lines+markers", name=label, line=dict(color=color), marker=marker,
                              text=texts, hoverinfo="text", meta=meta))
        for idx, name, symbol in ((0, "start", "circle-open" if dims == 3 else "star"),
                                  (-1, "current", "diamond")):
            point = dict(x=[xyz[idx, 0]], y=[xyz[idx, 1]], **({"z": [xyz[idx, 2]]} if dims == 3 else {}))
            meta = source(i, "pc1", "pc2", z=z, last=True) if live and name == "current" else None
            fig.add_trace(scatter(**point, mode="markers", name=f"{label}: {name}",
                                  marker=dict(size=12 if dims == 2 else 6, color=color, symbol=symbol,
                                              line=dict(color="black", width=1)), showlegend=(i == 0), meta=meta))
    if goal_point is not None:
        gp = dict(x=[goal_point[0]], y=[goal_point[1]], **({"z": [goal_point[2]]} if dims == 3 else {}))
        fig.add_trace((go.Scatter3d if dims == 3 else go.Scatter)(**gp, mode="markers", name="goal",
                                                                   marker=dict(size=12 if dims == 2 else 6,
                                                                               color="black", symbol="x")))
    if residual:
        # Shared by all walks' points: with a scale per trace, each walk had its own range and the bar showed the
        # first walk's (a fan launched at step 3: the bar read 0.2f-1.2f, the three points the basis was fitted
        # on, while the fan's colours meant 0.2-1.2). The range follows the points as the live chart adds them.
        fig.update_layout(coloraxis=dict(colorscale="Viridis", colorbar=dict(
            title=dict(text="residual ‖w − proj(w)‖", side="right"),  # along the bar: two titles side by side
            x=1.16 if contour else 1.0)))                               # ran into each other
    if dims == 3:
        fig.update_layout(scene=dict(xaxis_title=axis_labels[0], yaxis_title=axis_labels[1],
                                     zaxis_title=axis_labels[2]))
    else:
        fig.update_xaxes(title_text=axis_labels[0])
        fig.update_yaxes(title_text=axis_labels[1])
    return _layout(fig, title, height=440)


def _varies(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].nunique(dropna=True) > 1


def step_lengths(runs: Runs) -> go.Figure:
    """Functional step √(θᵀgθ) against Euclidean step ‖θ‖ (left), cumulative lengths (middle), and the step size
    ε and restoring weight ρ in force at every step (right: what `--step-size auto` chose, or the user's changes)."""
    # ρ is the constrained rule's: a penalty walk's panel names ε alone
    with_rho = any("restoring_weight" in frame and frame["restoring_weight"].notna().any() for _, frame in runs)
    fig = make_subplots(rows=1, cols=3, subplot_titles=("per step", "cumulative",
                                                        "ε and ρ per step" if with_rho else "ε per step"))
    for i, (label, frame) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        steps = frame.iloc[1:]
        fig.add_trace(go.Scatter(x=steps["step_norm"], y=np.sqrt(steps["functional_step"].clip(lower=0)),
                                 mode="markers", name=f"{label}", marker=dict(color=color, size=5, opacity=0.6),
                                 text=[f"step {s}" for s in steps["step"]],
                                 meta=source(i, "step_norm", ["functional_step", "sqrt"], ["step", "step {}"], 1)),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=frame["step"], y=frame["euclidean_length"], name=f"{label}: Σ‖θ‖",
                                 line=dict(color=color), meta=source(i, "step", "euclidean_length")), row=1, col=2)
        fig.add_trace(go.Scatter(x=frame["step"], y=frame["functional_length"], name=f"{label}: Σ√(θᵀgθ)",
                                 line=dict(color=color, dash="dash"), meta=source(i, "step", "functional_length")),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=frame["step"], y=frame["step_size"], name=f"{label}: ε", line=dict(color=color,
                                 shape="hv"), meta=source(i, "step", "step_size")), row=1, col=3)
        if "restoring_weight" in frame and frame["restoring_weight"].notna().any():
            fig.add_trace(go.Scatter(x=frame["step"], y=frame["restoring_weight"], name=f"{label}: ρ",
                                     # wider than ε's line: the defaults for connect and a new task have ρ = ε,
                                     # where a dotted line of the same width vanished under the solid one
                                     line=dict(color=color, dash="dot", shape="hv", width=4),
                                     meta=source(i, "step", "restoring_weight")), row=1, col=3)
    fig.update_xaxes(title_text="step", **step_ticks(runs), row=1, col=3)
    spans = [f[c] for _, f in runs for c in ("step_size", "restoring_weight") if c in f]
    fig.update_yaxes(title_text="ε (solid), ρ (dotted)" if with_rho else "step size ε", **log_ticks(*spans), row=1,
                     col=3)
    # Both from zero: the panel compares the two lengths, and a walk whose every step is ε long (the constrained
    # rule away from its goal) otherwise got an x axis a millionth of ε wide, ticked 0.0999998 and 0.1.
    fig.update_xaxes(title_text="Euclidean step ‖θ‖", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="functional step √(θᵀgθ)", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(title_text="step", **step_ticks(runs), row=1, col=2)
    fig.update_yaxes(title_text="path length", row=1, col=2)
    return _layout(fig, "Large weight moves, small output moves", height=360)


PRUNING_NOW = "pruning-now"  # the current point's pruning curve: restyled in place as the walk moves (live_chart)


def pruning_now(pruning: dict) -> dict:
    """The plotly.js attributes of the current point's pruning curve that change as the walk moves."""
    walk = f"{pruning['label']}: " if pruning.get("label") else ""
    return {"y": (100 * np.asarray(pruning["now"])).tolist(),
            "name": f"{walk}step {pruning['step']}, pruned now to each sparsity"}


def sparsity_and_distance(runs: Runs, pruning: dict | None = None) -> go.Figure:
    """Accuracy against sparsity, and distance to the goal against step.

    A sparsify walk keeps its weights dense until it arrives (sparsity is exact zeros), so its own points sit at 0%
    until the last one: pruning (analysis.pruning_curve) adds what the walk changes on the way, the accuracy of the
    start network and of the current point if pruned now to each sparsity ({levels, start, now, step, target,
    color}; start or now None while not computed)."""
    # spaced for the right panel's axis title and ticks, which overlapped the left panel's 100% at 820 pixels
    fig = make_subplots(rows=1, cols=2, subplot_titles=("accuracy vs sparsity", "distance to goal"),
                        horizontal_spacing=0.14)
    if pruning is not None:
        levels = 100 * np.asarray(pruning["levels"])
        used, of = pruning.get("examples") or (0, 0)
        if used < of:
            fig.add_annotation(text=f"pruned: on the first {used:,} of {of:,} test examples", showarrow=False,
                               xref="x domain", yref="y domain", x=0, y=1.02, xanchor="left", yanchor="bottom",
                               font=dict(size=10, color="#64748b"))
        if pruning.get("start") is not None:
            fig.add_trace(go.Scatter(x=levels, y=100 * np.asarray(pruning["start"]), mode="lines+markers",
                                     name="start, pruned now to each sparsity", marker=dict(size=4),
                                     line=dict(color="#64748b", dash="dash")), row=1, col=1)
        if pruning.get("now") is not None:
            fig.add_trace(go.Scatter(x=levels, mode="lines+markers", marker=dict(size=4), meta={"side": PRUNING_NOW},
                                     line=dict(color=PALETTE[pruning.get("color", 0) % len(PALETTE)], width=3),
                                     **pruning_now(pruning)), row=1, col=1)
        fig.add_vline(x=100 * pruning["target"], line=dict(color="#94a3b8", dash="dot", width=1), row=1, col=1,
                      annotation_text="target", annotation_position="bottom left")
    for i, (label, frame) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        fig.add_trace(go.Scatter(x=100 * frame["sparsity"], y=100 * frame["accuracy/A"], mode="markers",
                                 name=f"{label}: accuracy at its sparsity (exact zeros)",
                                 marker=dict(size=6, color=color, symbol="circle-open"),
                                 meta=source(i, ["sparsity", 100], ["accuracy/A", 100])), row=1, col=1)
        fig.add_trace(go.Scatter(x=frame["step"], y=frame["goal_distance"], name=f"{label}: distance",
                                 line=dict(color=color), meta=source(i, "step", "goal_distance")), row=1, col=2)
    fig.update_xaxes(title_text="sparsity (%)", range=[-3, 103], row=1, col=1)
    fig.update_yaxes(title_text="test accuracy (%)", row=1, col=1)
    fig.update_xaxes(title_text="step", **step_ticks(runs), row=1, col=2)
    # Ticks for the decades a walk crosses (1, 2, 5 in each), not the first point's: a live chart keeps the axis it was
    # first drawn with while the distance falls from about 10 to the tolerance, and Plotly's own ticks then labelled
    # every digit (10, 9, 8, ... 2, 1, 9, 8, ...) in 250 pixels.
    fig.update_yaxes(title_text="‖w − w_sparse‖", **log_ticks(mantissas=(1, 2, 5)), row=1, col=2)
    return _layout(fig, "Sparsity and distance to the goal", height=360)


def accuracy_vs_alpha(runs: list[tuple[str, np.ndarray, np.ndarray]], line: pd.DataFrame | None,
                      matched: pd.DataFrame | None = None) -> go.Figure:
    """Connect: test accuracy against position α ∈ [0, 1] for the walk(s), the straight line and (matched) the
    straight line to B with its hidden units lined up with A's."""
    fig = go.Figure()
    for i, (label, alpha, accuracy) in enumerate(runs):
        fig.add_trace(go.Scatter(x=alpha, y=100 * accuracy, name=f"{label}: walk", line=dict(color=PALETTE[i])))
    if line is not None:
        fig.add_trace(go.Scatter(x=line["alpha"], y=100 * line["accuracy"], name="straight line",
                                 line=dict(color="#0f172a", dash="dash"), mode="lines+markers"))
    if matched is not None:
        fig.add_trace(go.Scatter(x=matched["alpha"], y=100 * matched["accuracy"],
                                 name="straight line, B's units matched to A's",
                                 line=dict(color="#64748b", dash="dot"), mode="lines+markers"))
    fig.update_xaxes(title_text="position along the path α (by Euclidean length)")
    fig.update_yaxes(title_text="test accuracy (%)")
    return _layout(fig, "Connect: the walk against the straight line")


def per_task_accuracy(runs: Runs, baseline: pd.DataFrame | None = None, joint: dict | None = None,
                      joint_steps: int | None = None) -> go.Figure:
    """New task: accuracy on every task against step, naive fine-tuning overlaid, and joint training's end accuracy
    on every task (the upper bound: task A's data all kept) as a dotted line each."""
    fig = go.Figure()
    for i, (label, frame) in enumerate(runs):
        for j, task in enumerate(_tasks(frame, "accuracy")):
            fig.add_trace(go.Scatter(x=frame["step"], y=100 * frame[f"accuracy/{task}"], name=f"{label}: {task}",
                                     line=dict(color=PALETTE[(2 * i + j) % len(PALETTE)]),
                                     meta=source(i, "step", [f"accuracy/{task}", 100])))
    if baseline is not None:
        for task in _tasks(baseline, "accuracy"):
            fig.add_trace(go.Scatter(x=baseline["step"], y=100 * baseline[f"accuracy/{task}"],
                                     name=f"naive fine-tuning: {task}", line=dict(color="#0f172a", dash="dash")))
    if joint:  # one label for the lines (they lie close together): above the higher one
        for value in joint.values():
            fig.add_hline(y=100 * value, line=dict(color="#64748b", dash="dot", width=1))
        fig.add_annotation(x=0, xref="x domain", y=100 * max(joint.values()), yanchor="bottom", xanchor="left",
                           showarrow=False, font=dict(size=11, color="#475569"),
                           text=f"joint training on A and B, {joint_steps} steps (the upper bound): "
                                + ", ".join(f"{task} {100 * v:.1f}%" for task, v in joint.items()))
    fig.update_xaxes(title_text="step (fine-tuning: optimiser steps)")
    fig.update_yaxes(title_text="test accuracy (%)")
    return _layout(fig, "New task: every task along the path")


def heatmap(steps: np.ndarray, probs: np.ndarray) -> go.Figure:
    """Rows: networks along the path; columns: test examples; cell: p(true class)."""
    fig = go.Figure(go.Heatmap(z=probs, y=[str(s) for s in steps], colorscale="RdYlGn", zmin=0, zmax=1,
                               colorbar=dict(title="p(true)"), hovertemplate="step %{y}, example %{x}: %{z:.2f}"))
    fig.update_xaxes(title_text="test example (sorted by the start network's confidence)")
    fig.update_yaxes(title_text="step", type="category", autorange="reversed")
    return _layout(fig, "Per-example probability of the true class", height=420)


def spectrum(spectra: list[dict], n_params: int) -> go.Figure:
    """Each spectrum computed ({values, probe, step}) as one line, labelled by its step (and probe, if they differ)."""
    probes = {x["probe"] for x in spectra}
    fig = go.Figure([go.Scatter(x=np.arange(1, len(x["values"]) + 1), y=np.maximum(x["values"], 1e-12),
                                mode="lines+markers",
                                name=f"step {x['step']}" + (f", probe {x['probe']}" if len(probes) > 1 else ""))
                     for x in spectra])
    fig.update_yaxes(type="log", title_text="eigenvalue of g", exponentformat="power")  # 10⁻⁶, not "1μ"
    fig.update_xaxes(title_text="rank")
    probe = f"probe of {next(iter(probes))} inputs" if len(probes) == 1 else "probes as labelled"
    steps = ", ".join(str(x["step"]) for x in spectra)
    return _layout(fig, f"Metric spectrum at step{'s' if len(spectra) > 1 else ''} {steps} ({probe}; "
                        f"rank ≤ N·C of {n_params:,} directions)")


def decision_boundary(grid: dict) -> go.Figure:
    fig = go.Figure(go.Contour(x=grid["x"], y=grid["y"], z=grid["p"], colorscale="RdBu", zmin=0, zmax=1,
                               contours=dict(start=0, end=1, size=0.1), colorbar=dict(title="p(class 1)"),
                               name="current network", showlegend=False))
    start = grid.get("p_start")
    if start is not None:  # what the walk is to keep: the start network's p = 0.5 line, over the current regions
        fig.add_trace(go.Contour(x=grid["x"], y=grid["y"], z=start, contours=dict(start=0.5, end=0.5, size=1,
                                 coloring="none"), line=dict(color="#111827", width=2, dash="dash"),
                                 showscale=False, showlegend=True, name="start network's boundary",
                                 hoverinfo="skip"))
    pts, labels = grid["points"], grid["labels"]
    for c, color in ((0, "#b91c1c"), (1, "#1d4ed8")):
        mask = labels == c
        fig.add_trace(go.Scatter(x=pts[mask, 0], y=pts[mask, 1], mode="markers", name=f"class {c}",
                                 marker=dict(size=4, color=color, line=dict(color="white", width=0.5))))
    title = "Decision boundary of the current network" + ("" if start is None else " (dashed: where it started)")
    return _layout(fig, title, height=420)
