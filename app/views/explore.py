"""Explore: set up a walk, drive it (Step, Run/Pause, Reset, ε mid-walk, branch) and watch it live."""
from __future__ import annotations

import dataclasses
import math
import time
import weakref

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, controls, session
from app.live_chart import live_plotly_chart, live_runs_chart, thin_for_drawing
from app.views import replace
from geodesic import analysis, worker
from geodesic.config import MAX_SEED, SCENARIOS
from geodesic.engine import CapacityError
from geodesic.errors import ConfigError, GeodesicError
from geodesic.experiment import build, preflight
from geodesic.path import distinct_rows
from geodesic.projection import fit_pca, trustworthiness, umap_embed
from geodesic.summary import CONNECTED_POINTS, connect_barriers, connected, function_lost, outcome_rank
from geodesic.training import PhaseClock

REFRESH_SECONDS = 0.3
SPEEDS = {"1 step/s": 1.0, "2 steps/s": 2.0, "5 steps/s": 5.0, "10 steps/s": 10.0, "20 steps/s": 20.0,
          "as fast as possible": None}
VIEWS = ("Overview", "Path", "Steps", "Examples", "Metric", "Boundary", "Data")
# The views' own controls, kept while another view or page is shown (controls.keep_values): a 3-D path, a contour, a
# UMAP's parameters or a spectrum's probe went back to their defaults on a look at another view, beside the chart
# they had made.
VIEW_KEYS = ("view", "pca_dims", "contour_on", "umap_nn", "umap_md", "umap_dims", "spec_probe", "spec_step", "fan_kind",
             "fan_from_step")
PLOT_CONFIG = {"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}}


def _build(config) -> None:
    """Build a walk (training start networks if needed, with progress) and show it."""
    bar = st.progress(0.0, text="preparing the walk")
    clock = PhaseClock()

    def progress(what: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        bar.progress(fraction, text=clock.text(what, fraction))  # with the time left, once it can be told

    device = session.engine().settings.device
    if config.device == "auto" and device not in ("", "auto"):  # the server's choice for walks set to auto
        config = config.replace(device=device)
    experiment = build(config, progress=progress)
    bar.empty()
    # The baselines take about a second: the page is drawn first and they join the charts when ready; they
    # are computed in a process of their own beside the engine (geodesic/worker.py), so a Run clicked meanwhile
    # starts at once and walks at full speed; pages that open the same walk (a class at the teacher's link) share
    # one computation.
    session.install(experiment, worker.shared_goal_baselines_in_process)


def _start_walk(config) -> None:
    s = session.state()
    try:
        _build(config)
        controls.write_url(config, teach=controls.teach_mode())
    except GeodesicError as err:  # a setting, data folder missing or corrupt, bad weights: keep the current walk
        s.errors = _errors_for(err)


def _errors_for(err: GeodesicError) -> dict:
    if isinstance(err, ConfigError):
        return controls.errors_for(err)
    return controls.error_at("data_root" if "data" in str(err).lower() else "other", str(err))


def _runs(s, thin: bool = True) -> list[tuple[str, object]]:
    """(label, table) per branch; thin: long paths thinned for drawing (tables and exports keep every step)."""
    frames = [(b.label, b.walker.record.to_frame()) for b in s.branches]
    return [(label, f.iloc[thin_for_drawing(len(f))]) for label, f in frames] if thin else frames


def _chart(fig, key: str) -> None:
    """A chart that updates live: the browser receives only the points added since its last refresh."""
    live_plotly_chart(fig, key, PLOT_CONFIG)


def _runs_chart(build, runs, key: str, extra: object = None, side: dict | None = None) -> None:
    """A live chart of the walks' tables: while they only grow, their new rows are sent without building the
    figure (a refresh then costs the server about a millisecond, not the figure's tens). side: small traces that
    change in place (live_chart.runs_update)."""
    live_runs_chart(build, runs, key, PLOT_CONFIG, extra, side)


def _baseline_overlays(s) -> dict:
    b = s.baselines
    if "one_shot_accuracy" in b:
        return {"lines": {"one-shot pruning": b["one_shot_accuracy"],
                          f"masked fine-tuning ({b['masked_fine_tune_steps']} steps)": b["masked_fine_tune_accuracy"]}}
    if "naive_fine_tune" in b:
        return {"curves": {"naive fine-tuning": b["naive_fine_tune"]}}
    return {}


def _overview(s, runs) -> None:
    _runs_chart(lambda: charts.accuracy_and_loss(runs, _baseline_overlays(s)), runs, "acc", id(s.baselines))
    goal = s.config.goal.kind
    if goal == "sparsify":
        pruning = _pruning_curves(s)
        # the curves' shape in the signature; the current point's curve, as it moves, is restyled (side), not redrawn
        shape = pruning and (tuple(pruning["levels"]), pruning["target"], pruning["examples"], pruning["color"],
                             pruning["label"], None if pruning["start"] is None else tuple(pruning["start"]),
                             pruning["now"] is None)
        _runs_chart(lambda: charts.sparsity_and_distance(runs, pruning), runs, "sparsity", shape,
                    pruning and pruning["now"] is not None and {charts.PRUNING_NOW: charts.pruning_now(pruning)})
    elif goal == "new-task":
        _runs_chart(lambda: charts.per_task_accuracy(runs, s.baselines.get("naive_fine_tune"),
                                                     s.baselines.get("joint_training"),
                                                     s.baselines.get("joint_training_steps")), runs, "tasks",
                    id(s.baselines))
    else:
        walks = [(label, analysis.path_position(f), f["accuracy/A"].to_numpy()) for label, f in runs]
        _chart(charts.accuracy_vs_alpha(walks, s.baselines.get("straight_line"), s.baselines.get("matched_line")),
               "alpha")
        _barriers(s)


# A running walk's pruning curve is measured again at most this often, and never for more than a twentieth of the
# time: on the engine's thread between two steps (about 20 ms for the digits MLP, 70 ms for LeNet-5 on
# digits-images, 10 s for ResNet-18), a slice of PRUNING_SLICE_SECONDS (or one level) per refresh of the page.
PRUNING_REFRESH_SECONDS = 2.0
PRUNING_SLICE_SECONDS = 0.1


def _pruning_curves(s) -> dict | None:
    """The accuracy of the start network and of the current point if pruned now to each sparsity (for the Overview's
    accuracy-vs-sparsity chart: the walk's own weights stay dense until it arrives): the start's measured once, the
    current point's again when it has moved (while the walk runs, every PRUNING_REFRESH_SECONDS at most). A curve
    being measured (analysis.PruningCurve) advances a slice per refresh; the chart keeps the last one finished."""
    walker, runner = s.walker, s.runner
    kept = s.pruning if s.pruning is not None and s.pruning["walker"]() is walker else None
    try:
        if kept is None:
            levels = analysis.pruning_levels(walker.goal.target_sparsity)
            n_test = len(walker.tasks["A"].test.y)
            kept = s.pruning = {"walker": weakref.ref(walker), "levels": levels, "target": walker.goal.target_sparsity,
                                "examples": (min(n_test, analysis.PRUNING_EXAMPLES), n_test), "start": None,
                                "now": None, "step": None, "at": -math.inf, "every": PRUNING_REFRESH_SECONDS,
                                "measuring": {}}
            try:
                kept["measuring"]["start"] = runner.call(analysis.PruningCurve, walker, levels, 0)
            except ConfigError:  # a long path let the start's weights go
                pass
        measuring = kept["measuring"]
        due = not runner.is_running or time.monotonic() - kept["at"] >= kept["every"]
        start = measuring.get("start")
        if "now" not in measuring and kept["step"] != walker.n_steps and due and (
                start is None or start.step != walker.n_steps):  # at step 0 the start's curve is the current one
            measuring["now"] = runner.call(analysis.PruningCurve, walker, kept["levels"])
        for name, curve in list(measuring.items()):
            # While the walk runs, a slice per refresh. Otherwise no refresh comes (restarting the page's timer for
            # it reran the page and lost that run's toast): measured now, still a slice per call, so that the
            # server's other walks step between two slices.
            if not curve.done:
                runner.call(curve.advance, PRUNING_SLICE_SECONDS)
            if not curve.done and not runner.is_running:
                with st.spinner("Measuring the pruning curves: a pass over the test examples for each sparsity"):
                    while not curve.done and not runner.is_running:
                        runner.call(curve.advance, PRUNING_SLICE_SECONDS)
            if curve.done:
                del measuring[name]
                if name == "start":
                    kept["start"] = curve.values
                if name == "now" or curve.step == walker.n_steps:
                    # at most a twentieth of the engine's time while the walk runs, however slow the model
                    kept.update(now=curve.values, step=curve.step, at=time.monotonic(),
                                every=max(PRUNING_REFRESH_SECONDS, 20 * curve.seconds))
    except GeodesicError as err:  # not on the chart; the walk itself goes on
        s.pruning = None
        st.caption(f"The pruning curves could not be measured: {err}")
        return None
    return {**kept, "color": s.active, "label": s.branches[s.active].label}


METRIC_WIDTH = 140  # pixels: three to a row at 820 px with the sidebar open, five from about 1,000 px
BARRIER_WIDTH = 200  # the barriers' labels are longer


def _barriers(s) -> None:
    """Connect: the walk's error and loss barriers beside the straight line's (method.md §5), the numbers the
    chart above is judged by; from every point so far (the whole table, not the thinned drawing)."""
    frame = s.walker.record.to_frame()
    line = s.baselines.get("straight_line")
    b = connect_barriers(frame["accuracy/A"].tolist(), frame["loss/A"].tolist(), line)
    row = st.container(horizontal=True)  # wraps (columns cut "10.69 pts" on a tablet); widths fixed: see _status
    row.metric("error barrier, walk", f"{100 * b['error_barrier']:.2f} pts", width=BARRIER_WIDTH,
               help="max over the path of the test error, minus the mean of its two ends (method.md §5); "
                    f"two networks count as connected below {CONNECTED_POINTS:g} points")
    row.metric("error barrier, straight line", "…" if line is None else f"{100 * b['linear_error_barrier']:.2f} pts",
               width=BARRIER_WIDTH, help="the same on (1 − α) w_A + α w_B, 21 points of α")
    row.metric("loss barrier, walk", f"{b['loss_barrier']:.3f}", width=BARRIER_WIDTH)
    row.metric("loss barrier, straight line", "…" if line is None else f"{b['linear_loss_barrier']:.3f}",
               width=BARRIER_WIDTH)
    matched = s.baselines.get("matched_line")
    if matched is not None:
        m = connect_barriers(matched["accuracy"].tolist(), matched["loss"].tolist())
        most = line is not None and m["error_barrier"] < b["linear_error_barrier"] / 2
        st.caption(f"With B's hidden units permuted to line up with A's (weight matching; the same function as B), "
                   f"the straight line's error barrier is {100 * m['error_barrier']:.2f} pts and its loss barrier "
                   f"{m['loss_barrier']:.3f}" + (": most of the plain line's barrier comes from the order of the "
                                                  "hidden units (permutation symmetry), not from the two functions."
                                                  if most else "."))
    if s.walker.is_done:
        joined = connected(b["error_barrier"])
        st.caption(f"This walk {'connects' if joined else 'does not connect'} the two networks: its error barrier is "
                   f"{'below' if joined else 'not below'} {CONNECTED_POINTS:g} points.")


def _projected(s, basis) -> list[tuple[str, pd.DataFrame]]:
    """(label, table of pc1, pc2, pc3, residual, step, hover) per branch: its points on the frozen basis, every
    k-th one (the index holds each point's position; k: a power of two, at least the one drawing thins long paths
    with and the one a long path keeps weights at, WeightTrace). Each point is projected once (the basis does not
    change while it is frozen)."""
    cache = st.session_state.setdefault("_path_projection", {})
    out = []
    for b in s.branches:
        frame = b.walker.record.to_frame()  # the engine may append meanwhile: project exactly these points
        n = len(frame)
        entry = cache.get(b.label)
        if entry is None or entry["basis"] is not basis or entry["walker"] is not b.walker:
            entry = cache[b.label] = {"basis": basis, "walker": b.walker, "points": {}}
        draw = thin_for_drawing(n)
        while True:  # weights are appended before their point, so every point read has had its row
            stride = max(b.walker.trace.stride, int(draw[1] - draw[0]) if len(draw) > 1 else 1)
            keep = list(range(0, n, stride))
            missing = [i for i in keep if i not in entry["points"]]
            try:
                rows = b.walker.trace.rows(missing)
                break
            except KeyError:  # the walk's trace has just doubled its stride and let some of these go: again
                continue
        if missing:
            coords, residual = basis.project(rows)
            steps = frame["step"].to_numpy()
            for i, xyz, r in zip(missing, coords[:, :3], residual, strict=True):
                entry["points"][i] = (xyz, r, f"step {steps[i]}<br>residual {r:.3g}")
        points = [entry["points"][i] for i in keep]
        xyz = np.array([p[0] for p in points]).reshape(-1, 3)
        out.append((b.label, pd.DataFrame({"pc1": xyz[:, 0], "pc2": xyz[:, 1], "pc3": xyz[:, 2],
                                           "residual": [p[1] for p in points],
                                           "step": frame["step"].to_numpy()[keep],
                                           "hover": [p[2] for p in points]}, index=keep)))
    return out


def _path(s) -> None:
    walker = s.walker
    c1, c2, c3 = st.columns([2, 3, 4])  # [1, 1, 2] cut the button to "Refit PCA ba…" on a tablet
    dims = c1.radio("Dimensions", (2, 3), horizontal=True, key="pca_dims")
    if c2.button("Refit PCA basis", help="The basis is fitted once and frozen so axes don't jump; refit here"):
        s.basis = None
    if s.basis is None:  # on every walk on the charts (a fan's walks too, the main one may have 2 points only)
        rows = distinct_rows([(b.walker.trace, len(b.walker.record)) for b in s.branches])
        if len(rows) >= 3:
            s.basis = fit_pca(rows, n_components=3)
    if s.basis is None:
        st.info("The path needs at least 3 points for a projection: press Step or Run.")
        return
    basis = s.basis
    tables = _projected(s, basis)
    coords = {label: t[["pc1", "pc2", "pc3"][:dims]].to_numpy() for label, t in tables}
    residual = {label: t["residual"].to_numpy() for label, t in tables}
    steps = {label: t["step"].to_numpy() for label, t in tables}
    ev = basis.explained_variance_ratio
    c3.caption(f"Basis fitted on {basis.n_fitted} points (of every walk shown); explained variance "
               f"PC1 {100 * ev[0]:.1f}%, PC2 {100 * ev[1]:.1f}%, PC3 {100 * ev[2]:.1f}%. "
               "Colour = residual ‖w − proj(w)‖ (distance of each point from the plotted subspace).")
    goal_point = None
    end = getattr(s.experiment, "end", None)
    if end is not None:
        goal_point = basis.project(walker.trace.vector(end)[None])[0][0, :dims]
    labels = [f"PC{i + 1} ({100 * ev[i]:.1f}%)" for i in range(dims)]
    if dims == 2 and st.toggle("Loss contour behind the path (loss on this plane, ~1 s)", key="contour_on"):
        xy = np.concatenate(list(coords.values()))
        pad = 0.25 * (xy.max(0) - xy.min(0) + 1e-6)
        extent = np.array([xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0], xy[:, 1].min() - pad[1],
                           xy[:, 1].max() + pad[1]])
        # The button is drawn on every run with the contour on, first: drawn only once a contour existed, it
        # appeared on the run after the first one and moved the UMAP box below, which Chromium then drew anew,
        # closed (a UMAP asked for there was hidden as it arrived).
        recompute = st.button("Recompute contour")
        if recompute or s.contour is None or s.contour.get("basis") is not basis:
            s.contour = {"basis": basis, **s.runner.call(analysis.loss_on_plane, walker, basis, extent, 15)}
    contour = s.contour if dims == 2 and st.session_state.get("contour_on") else None
    hover = {label: t["hover"].tolist() for label, t in tables}
    _runs_chart(lambda: charts.path_projection(coords, f"Path in weight space: PCA ({dims}-D)", labels, steps,
                                               residual, goal_point, contour, hover, live=True),
                tables, "pca", (dims, id(basis), id(contour), None if goal_point is None else tuple(goal_point)))
    # A key: an expander without one is known by its place on the page, and Chromium drew it anew, closed, when the
    # live refresh stopped (the baselines arriving, the walk pausing) or an element above it came or went.
    with st.expander("UMAP (on demand)", key="umap_box"):
        u1, u2, u3 = st.columns(3)
        st.session_state.setdefault("umap_nn", 15)
        st.session_state.setdefault("umap_md", 0.1)
        n_neighbors = u1.number_input("n_neighbors", min_value=2, max_value=200, key="umap_nn")
        min_dist = u2.number_input("min_dist", min_value=0.0, max_value=1.0, step=0.05, key="umap_md")
        umap_dims = u3.radio("Dimensions", (2, 3), horizontal=True, key="umap_dims")
        if st.button("Compute UMAP of the path", help="The first UMAP in a process compiles (about 20-30 s)"):
            with st.spinner("UMAP: compiling on first use, then fitting"):
                try:
                    frame = walker.record.to_frame()
                    kept, main_rows = walker.trace.matrix(until=len(frame))  # a long path: some points only
                    emb = umap_embed(main_rows, umap_dims, int(n_neighbors), float(min_dist))
                    s.umap = {"coords": emb, "steps": frame["step"].to_numpy()[kept],
                              "trust": trustworthiness(main_rows, emb), "params": (n_neighbors, min_dist)}
                except ValueError as err:
                    st.warning(str(err))
        if s.umap is not None:
            st.caption(f"UMAP of {len(s.umap['coords'])} points (n_neighbors={s.umap['params'][0]}, "
                       f"min_dist={s.umap['params'][1]}); trustworthiness {s.umap['trust']:.3f} "
                       "(1 = every local neighbourhood kept). UMAP distances are not weight-space distances.")
            d = s.umap["coords"].shape[1]
            st.plotly_chart(charts.path_projection({"main": s.umap["coords"]}, f"Path: UMAP ({d}-D)",
                                                   [f"UMAP {i + 1}" for i in range(d)], {"main": s.umap["steps"]}),
                            config=PLOT_CONFIG, key="umap", theme=None)


def _examples(s) -> None:
    if not s.walker.trace.is_exact:  # the heat map needs the weights of networks along the path
        st.info(f"The heat map needs the weights of networks along the path, and this model's "
                f"{s.walker.trace.n_params:,} weights are too many to keep for each point (the path keeps a sketch "
                "of them, enough for the Path view's projections). Use a smaller model to see it.")
        return
    steps, probs = s.runner.call(analysis.true_class_heatmap, s.walker)
    _chart(charts.heatmap(steps, probs), "heat")


SPECTRA_KEPT = 6  # spectra drawn together, the oldest dropped first
SPECTRUM_RANKS = 50  # the largest eigenvalues of g drawn


def _metric(s) -> None:
    """The spectrum of g at the current point or a chosen step of the walk (method.md §7: at chosen points); each one
    computed is kept on the chart beside the others, so the start and the current point can be compared."""
    c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
    st.session_state.setdefault("spec_probe", 64)
    probe = c1.number_input("Probe size for the spectrum", min_value=2, max_value=512, key="spec_probe")
    at = c2.number_input("At step", min_value=0, value=None, step=1, key="spec_step",
                         placeholder=f"this one ({s.walker.n_steps})", help="Empty: the current point. 0: the start.")
    # the step in its own words, not the label's: "Compute the spectrum at the current point" was cut on a tablet
    if c3.button("Compute the spectrum", key="spec_compute",
                 help="At the current point, or at the step in 'At step'; each one computed stays on the chart"):
        step = s.walker.n_steps if at is None else int(at)
        try:
            with st.spinner("eigenvalues of g"):
                values = s.runner.call(analysis.spectrum, s.walker, int(probe), SPECTRUM_RANKS, step)
            kept = [x for x in (s.spectrum or []) if (x["step"], x["probe"]) != (step, int(probe))]
            s.spectrum = [*kept, {"values": values, "probe": int(probe), "step": step}][-SPECTRA_KEPT:]
        except ConfigError as err:
            st.error(controls.message_for(err))
    if s.spectrum:
        st.plotly_chart(charts.spectrum(s.spectrum, s.walker.trace.n_params), config=PLOT_CONFIG, key="spectrum",
                        theme=None)
        if c3.button("Clear the spectra", key="spec_clear"):
            s.spectrum = None
            st.rerun()


def _boundary(s) -> None:
    if s.walker.tasks["A"].train.x.shape[1:] != (2,):
        st.info("The decision boundary is drawn for the 2-D toy datasets (moons, circles, spirals).")
        return
    grid = s.runner.call(analysis.decision_grid, s.walker)
    st.plotly_chart(charts.decision_boundary(grid), config=PLOT_CONFIG, key="boundary", theme=None)


DATA_ROWS = 200  # the table shows the latest steps only: it is sent again on every live refresh


def _data(s, runs) -> None:
    frame = runs[s.active][1]
    st.dataframe(frame.tail(DATA_ROWS), width="stretch", height=260, placeholder=controls.MISSING)
    if len(frame) > DATA_ROWS:  # a table that opened at step 40 of 240 looked like one that lost its first steps
        st.caption(f"The latest {DATA_ROWS} of {len(frame):,} points (steps {frame['step'].iloc[-DATA_ROWS]:,} to "
                   f"{frame['step'].iloc[-1]:,}); the table downloads below hold all of them.")
    row = st.container(horizontal=True)  # wraps; in columns the labels read "Weights (.sa…" on a tablet
    name = f"geodesic-{s.config.goal.kind}-{s.config.walk.solver}-step{s.walker.n_steps}"
    # Callables: the files are made when a button is clicked, not on every live refresh. A click does not rerun
    # the page (on_click="ignore"): a rerun replaced the other buttons' files, and a second download clicked soon
    # after the first found its file gone ("Deferred file ... not found", nothing downloaded).
    walker, overlays = s.walker, _baseline_overlays(s)
    download = dict(on_click="ignore")
    row.download_button("Table (CSV)", lambda: analysis.table_bytes(frame, "csv"), f"{name}.csv", "text/csv",
                        **download)
    row.download_button("Table (Parquet)", lambda: analysis.table_bytes(frame, "parquet"), f"{name}.parquet",
                        **download)
    row.download_button("Weights (.safetensors)", lambda: analysis.weights_bytes(walker), f"{name}.safetensors",
                        **download)
    # plotly.js inside the file (as the sweep report has it): a chart that fetched it from a CDN stayed blank on the
    # offline machines and classrooms this app is for
    row.download_button("Accuracy chart (HTML)",
                        lambda: charts.accuracy_and_loss(runs, overlays).to_html(include_plotlyjs=True),
                        f"{name}-accuracy.html", "text/html", **download)
    st.caption("Every chart's toolbar also saves it as PNG (camera icon).")


def _status(s) -> None:
    walker = s.walker
    last = walker.record.last
    # A row that wraps: st.columns cut the values to '97.…' once the page was narrower than about 1,000 px (a
    # laptop's half screen, a tablet with the sidebar open); a horizontal container moves a metric to a next line.
    # Each metric is METRIC_WIDTH wide: sized by their text, the row's items changed width as the values changed
    # on every live refresh, and the walk in Chromium measured 0.65 of headless against 0.73 in columns (noisy).
    row = st.container(horizontal=True)
    row.metric("step", last.step, width=METRIC_WIDTH)
    tasks = list(last.accuracy.items())[:2]
    for task, acc in tasks:
        start = walker.record[0].accuracy[task]
        change = round(100 * (acc - start), 1)
        if change == 0:  # no green "↑ +0.0" (nor a red "↓ -0.0") for an accuracy that has not moved
            row.metric(f"accuracy {task}", f"{100 * acc:.1f}%", "±0.0 pts", delta_color="off", delta_arrow="off",
                       width=METRIC_WIDTH)
        else:
            row.metric(f"accuracy {task}", f"{100 * acc:.1f}%", f"{change:+.1f} pts", width=METRIC_WIDTH)
    pruned = last.extra.get("prune_now_accuracy/A")
    if len(tasks) == 1 and pruned is not None:  # sparsify: the accuracy of w's projection, beside w's own
        row.metric("prune now", f"{100 * pruned:.1f}%", width=METRIC_WIDTH,
                   help="Test accuracy of the current weights with the target share of smallest weights set "
                        "to zero now: what the network would keep if the walk stopped here")
    elif len(tasks) == 1:  # connect: no second number to show beside accuracy, so the step size in use
        row.metric("step size ε now", f"{walker.step_size:.3g}", width=METRIC_WIDTH,
                   help="The largest Euclidean step ‖θ‖ of the next step: set in the sidebar, changed mid-walk "
                        "with 'Step size ε now', or adapted by auto")
    if s.config.goal.kind == "sparsify":
        row.metric("sparsity", f"{100 * last.sparsity:.1f}%", width=METRIC_WIDTH,
                   help="Exact zeros among the prunable weights (Linear and Conv weights). Zeros in dense tensors "
                        "give no speed-up by themselves.")
        total, zeros = walker.n_prunable, walker.zeros_at(last)  # counts, not latency (method.md); below the row
        st.caption(f"{zeros:,} of {total:,} prunable weights are exactly zero; {total - zeros:,} non-zero.")
    else:  # sparsity stays 0 on these goals; what they are judged by is the accuracy kept all along the path
        row.metric("lowest A so far", f"{100 * walker.record.lowest_accuracy('A'):.1f}%", width=METRIC_WIDTH,
                   help="The lowest test accuracy of task A at any step of this walk so far")
    # a new task has no point to reach: what falls as it learns B is B's training loss (the chart's axis says so too)
    if walker.goal.is_point_target:
        row.metric("distance to goal", f"{last.goal_distance:.3g}", width=METRIC_WIDTH,
                   help="‖w − target‖: to the pruned copy of w (sparsify) or to network B (connect)")
    else:
        row.metric("task-B loss", f"{last.goal_distance:.3g}", width=METRIC_WIDTH,
                   help="The goal's loss: cross-entropy of task B on a fixed set of its training inputs (what the "
                        "walk lowers)")
    if session.settings_problem():
        st.warning(session.settings_problem())
    if s.notice:
        st.warning(s.notice)
    if s.runner.error:
        st.error(s.runner.error)
    elif s.runner.notice and not s.runner.is_running:  # paused by the engine: its run's steps taken, or unwatched
        st.info(s.runner.notice)
    elif walker.is_done:
        start, lowest = walker.record[0].accuracy["A"], walker.record.lowest_accuracy("A")
        if function_lost(start, lowest):  # reached, but not along a path that kept what the network computes
            st.warning(f"Stopped: {walker.stop_reason}, but accuracy A fell to {100 * lowest:.1f}% on the way (from "
                       f"{100 * start:.1f}%): this walk did not keep the function. A shorter step (ε, or auto) "
                       "keeps it closer; 'Compare step sizes' walks a few side by side.")
        else:
            st.success(f"Stopped: {walker.stop_reason}.")


FAN_KINDS = {"step size ε": "max_step_norm", "goal weight β/λ": "goal_weight", "seed": "seed"}


def _fan_controls(s) -> None:
    """Compare step sizes: K walks from the current point with K values of ε (or β/λ, or K seeds), side by side."""
    walker = s.walker
    with st.expander("Compare step sizes (a fan of walks from here)", key="fan_box"):
        c1, c2, c3 = st.columns([2, 3, 2])
        kind = c1.radio("What varies", list(FAN_KINDS), key="fan_kind")
        eps = walker.config.max_step_norm
        suggested = {"step size ε": f"{eps / 2:g}, {eps:g}, {2 * eps:g}",
                     "goal weight β/λ": ", ".join(f"{walker.config.goal_weight * f:g}" for f in (0.3, 1, 3)),
                     "seed": "1, 2, 3"}[kind]
        controls.offer(f"fan_values_{kind}", suggested, walker)
        text = c2.text_input("Values, 2 to 7, comma-separated" + (" (auto: the adaptive step)" if kind == "step size ε"
                                                                   else ""), key=f"fan_values_{kind}")
        at_text = c3.number_input("From step", min_value=0, value=None, step=1, key="fan_from_step",
                                  placeholder=f"this one ({walker.n_steps})",
                                  help="Empty: the current point. Any earlier step of the walk that steps works too, "
                                       "e.g. 0 to compare from the start network.")
        if c3.button("Launch the fan", key="fan_launch",
                     help="Each walk starts at that step and runs on the server's engine beside the others (one "
                          "batch when they can share it)."):
            try:
                values = _fan_values(text, kind)
                at = _fan_start(walker, at_text)
                field_name = FAN_KINDS[kind]
                walkers, labels = [], []
                for value in values:
                    if field_name == "seed":
                        child = s.runner.call(walker.branch, at, walker.config, int(value))
                    elif value == "auto":  # the adaptive step, starting from the walk's ε
                        config = dataclasses.replace(walker.config, adaptive_step=True)
                        child = s.runner.call(walker.branch, at, config)
                    else:  # a number for ε means that fixed ε; β/λ keep the walk's own step (fixed or auto)
                        fixed = {"adaptive_step": False} if field_name == "max_step_norm" else {}
                        config = dataclasses.replace(walker.config, **fixed, **{field_name: value})  # validates
                        child = s.runner.call(walker.branch, at, config)
                    walkers.append(child)
                    symbol = {"max_step_norm": "ε", "goal_weight": "β/λ", "seed": "seed"}[field_name]
                    labels.append(f"{symbol}={value if value == 'auto' else format(value, 'g')} @ {at}")
                session.launch_fan(walkers, labels, at)
                st.session_state["_fan_was_running"] = True
                st.rerun()
            except (ConfigError, CapacityError) as err:
                st.error(controls.message_for(err) if isinstance(err, ConfigError) else str(err))


def _fan_start(walker, chosen: float | None) -> int:
    """The step the fan starts from: the current point when none is chosen. A walk that has stopped (its goal
    reached, or its step limit) gives walks that stop at once, so there the user is asked for an earlier step."""
    if chosen is None:
        if walker.is_done:
            raise ConfigError("fan from step", f"the current point (step {walker.n_steps})",
                              f"an earlier step (0 to {walker.n_steps - 1}): the walk stopped here "
                              f"({walker.stop_reason}), so walks from here would stop at once")
        return walker.n_steps
    if chosen != int(chosen) or not 0 <= chosen <= walker.n_steps:
        raise ConfigError("fan from step", chosen, f"a step of this walk, 0 to {walker.n_steps}")
    return int(chosen)


def _fan_values(text: str, kind: str) -> list[float | str]:
    """The fan's values: numbers, and for step sizes also 'auto' (the adaptive step)."""
    items = text.replace(" ", "").split(",")
    if "" in items:  # "0.1,,0.2" or a trailing comma: a value left out by mistake, refused as `geodesic sweep` does
        raise ConfigError("fan values", text, "values separated by commas, with no empty entries")
    try:
        values = [t if (t == "auto" and kind == "step size ε") else float(t) for t in items]
    except ValueError:
        allowed = "numbers or auto, separated by commas" if kind == "step size ε" else "numbers separated by commas"
        raise ConfigError("fan values", text, allowed) from None
    if not 2 <= len(values) <= 7 or len(set(values)) != len(values):
        raise ConfigError("fan values", text, "2 to 7 different values")
    if kind == "seed" and not all(math.isfinite(v) and v == int(v) and 0 <= v <= MAX_SEED for v in values):
        # (no 'auto' here: only step sizes take it); nan and 1e30 ended in tracebacks
        raise ConfigError("fan values", text, f"whole numbers from 0 to {MAX_SEED} for seeds")
    return values


def _fan_state(walker, handle) -> str:
    if walker.is_done:
        return "done: " + walker.stop_reason
    if handle.is_running:
        return "running"
    # (not the handle's notice, which says "press Run": Run drives the walk kept from the fan, not these)
    return {"steps": "paused: took its most steps per run", "idle": "paused: no page watched it"}.get(
        handle.paused_for, "paused")


def _fan_table(s) -> None:
    """What each walk of the fan reached since it started, and which one to keep."""
    if not s.fan:
        return
    rows, rank = [], {}
    for index, handle in s.fan:
        b = s.branches[index]
        points = b.walker.record.points[s.fan_from:]
        last = points[-1]
        lowest = min(p.accuracy["A"] for p in points)
        end_b = last.accuracy.get("B")  # a new task: what it learned, beside what it kept
        rows.append({"walk": b.label, "steps": last.step - s.fan_from,
                     "accuracy A (%)": round(100 * last.accuracy["A"], 1),
                     **({} if end_b is None else {"accuracy B (%)": round(100 * end_b, 1)}),
                     "lowest A (%)": round(100 * lowest, 1),
                     # (a new task has no point to reach: its goal's measure is B's loss)
                     ("distance left" if b.walker.goal.is_point_target else "task-B loss"):
                         float(f"{last.goal_distance:.3g}"),
                     "state": handle.error or _fan_state(b.walker, handle)})
        # the sweep report's order for its best cell: one that lost the function on the way is never offered first
        rank[index] = outcome_rank(points[0].accuracy["A"], lowest, last.accuracy["A"],
                                   b.walker.stop_reason == "goal reached", len(points), end_b)
    st.dataframe(rows, hide_index=True, width="stretch", placeholder=controls.MISSING,
                 # the state may be a sentence (why a walk stopped)
                 column_config={"state": st.column_config.TextColumn(width="large")})
    row = st.container(horizontal=True, vertical_alignment="bottom")  # wraps: columns cut "Keep this one a…"
    # Offered: the best walk so far (it was always the first), until the user picks one
    controls.offer("fan_keep", max(rank, key=rank.get), s.walker, keep=lambda i: i in rank)
    choice = row.selectbox("Keep", list(rank), format_func=lambda i: s.branches[i].label, key="fan_keep",
                           label_visibility="collapsed")
    if row.button("Keep this one as the walk that steps", key="fan_keep_button"):
        session.keep_from_fan(choice)
        st.rerun(scope="app")
    if row.button("Stop the fan", key="fan_stop"):
        session.close_fan()
        st.rerun(scope="app")


def _live(s) -> None:
    """Charts and status; re-run every REFRESH_SECONDS while the walk runs (a fragment, not a loop).

    The server's engine walks in the background; each refresh draws whatever points it has added since."""
    s.runner.touch()  # a page is watching: the engine keeps this walk running
    for _, handle in s.fan:
        handle.touch()
    if st.session_state.get("_fan_was_running") and not session.fan_running():  # the fan finished: stop the timer
        st.session_state["_fan_was_running"] = False
        if not s.runner.is_running:
            st.rerun(scope="app")
    pending = session.baselines_pending()
    stopped = not s.runner.is_running and st.session_state.get("_was_running")  # stopped by itself
    # Draw first, then rerun the page to stop the timer: the walk's last point shows at once, not a page later.
    _draw(s)
    if pending:
        st.caption("Computing the baselines the walk is compared with; they join the charts when ready.")
    if stopped:
        st.session_state["_was_running"] = False
        st.rerun(scope="app")
    if st.session_state.get("_baselines_pending") and not pending:  # they arrived: stop the timer
        st.session_state["_baselines_pending"] = False
        if not s.runner.is_running:
            st.rerun(scope="app")


def _draw(s) -> None:
    _status(s)
    _fan_table(s)
    view = st.session_state.get("view") or VIEWS[0]
    runs = _runs(s)
    if view == "Overview":
        _overview(s, runs)
    elif view == "Path":
        _path(s)
    elif view == "Steps":
        _runs_chart(lambda: charts.step_lengths(runs), runs, "steps")
    elif view == "Examples":
        _examples(s)
    elif view == "Metric":
        _metric(s)
    elif view == "Boundary":
        _boundary(s)
    else:
        _data(s, _runs(s, thin=False))


def _run(s) -> None:
    try:
        s.runner.run()
    except CapacityError as err:
        st.session_state["_run_refused"] = str(err)
    else:
        st.session_state["_was_running"] = True


def _pause(s) -> None:
    s.runner.pause()
    st.session_state["_was_running"] = False


def _drive(s, teach: bool) -> None:
    """Step / Run / Pause / Reset, ε mid-walk, branching."""
    walker = s.walker
    # a row that wraps, as the status row does: in columns "Reset" read "Re…" on a tablet with the sidebar open
    row = st.container(horizontal=True, vertical_alignment="bottom")
    if row.button("Step", width="stretch", disabled=walker.is_done):
        s.runner.step_once()  # served by the engine between two of the other walks' steps
    # Run and Pause act in their callbacks, before this script runs again, so the rerun a click causes already
    # draws the other button and starts (or stops) the live refresh: no second rerun, the walk shows sooner.
    if s.runner.is_running:
        row.button("Pause", width="stretch", type="primary", on_click=_pause, args=(s,))
    else:
        row.button("Run", width="stretch", type="primary", disabled=walker.is_done, on_click=_run, args=(s,))
    refused = st.session_state.pop("_run_refused", None)
    if refused:  # the server or this session is at its limit: say so, keep the walk
        st.error(refused)
    row.button("Reset", width="stretch", help="Back to the start network with the same settings",
               on_click=replace.request, args=("reset",))
    s.speed = row.select_slider("Speed", list(SPEEDS), value=s.speed,
                                help="Slow motion for teaching, or as fast as the server's engine walks (the page "
                                     f"shows the newest point every {REFRESH_SECONDS} s and never holds the walk up)")
    for handle in [s.runner, *(h for _, h in s.fan)]:  # the fan walks at the same speed as the main walk
        handle.set_rate(SPEEDS[s.speed])
    with row.popover("Step size ε now", width="stretch"):
        controls.offer("eps_now", float(walker.config.max_step_norm), walker)
        new_eps = st.number_input("ε from the next step on", format="%.4f", key="eps_now")
        if st.button("Apply to this walk"):
            try:
                # On the engine's thread, between two steps: a running walk is stepped there, and a change made
                # from this page's thread could land in the middle of a step (its ε used for one part of it).
                s.runner.call(walker.set_step_size, new_eps)
                st.toast(f"ε = {new_eps:g} from step {walker.n_steps + 1} (marked on the charts)")
            except ConfigError as err:
                st.error(controls.message_for(err))
    if replace.go_ahead("reset", "Reset"):
        _start_walk(s.config)
        st.rerun()
    _fan_controls(s)
    if teach:
        return
    with st.expander("Rewind and branch", key="branch_box"):
        b1, b2, b3 = st.columns([2, 2, 1])
        middle = max(walker.n_steps // 2, 0)
        kept = walker.trace.nearest(middle)  # a long path keeps some points' weights only (WeightTrace)
        controls.offer("branch_at", kept[0] if kept else middle, walker, keep=lambda step: step <= walker.n_steps)
        at = b1.number_input("Branch from step", min_value=0, max_value=max(walker.n_steps, 0), key="branch_at")
        b2.caption("The branch uses the step rule, ε, β/λ, ρ and probe size now in the sidebar."
                   + (f" This long path keeps the weights of its last {walker.trace.recent} steps and of one "
                      f"step in {walker.trace.stride} before them." if walker.trace.stride > 1 else ""))
        if b3.button("Branch"):
            try:
                config = controls.config_from_widgets()
                child = s.runner.call(walker.branch, int(at), config.walk)
                session.add_branch(child, f"branch {len(s.branches)} @ {int(at)}")
                st.rerun()
            except ConfigError as err:
                st.error(controls.message_for(err))
        if len(s.branches) > 1:
            labels = [b.label for b in s.branches]
            choice = st.radio("Walk that steps", range(len(labels)), format_func=labels.__getitem__,
                              index=s.active, horizontal=True)
            session.select_branch(choice)


def setup_sidebar() -> None:
    """The set-up controls, drawn on every page so their values survive moving between pages
    (Streamlit forgets a widget's state on any run that does not draw it)."""
    s = session.state()
    controls.init_widgets()
    controls.keep_values(controls.SIDEBAR_KEYS + VIEW_KEYS)
    replace.say()  # what saving before a new walk or Reset saved (they run the page again once done)
    # Shown on every run until the user starts a walk of their own: a rerun right after the first paint (the
    # baselines arriving, a live refresh) must not take the message away before it is read.
    for message in st.session_state.get("_url_errors", []):
        st.warning(message)
    if controls.teach_mode():
        return
    if s.experiment is None and not s.errors:  # a link whose settings start no walk: marked before they are drawn
        try:
            controls.config_from_widgets()
        except ConfigError as err:
            s.errors = controls.errors_for(err)
    with st.sidebar:
        device = str(s.experiment.device) if s.experiment else None
        controls.sidebar(s.errors, device, on_start=lambda: replace.request("new"))
    config = None
    if replace.requested("new"):
        st.session_state.pop("_url_errors", None)  # the user's own settings from now on
        config = _settings(s, check=replace.would_ask())  # refused before anything is asked
    # (outside the sidebar: the new walk's progress bar is drawn in the page)
    if replace.go_ahead("new", "A new walk"):
        _start_walk(config or _settings(s))  # (asked and answered: read on the run that acts)
        st.rerun()


def _settings(s, check: bool = False):
    """The sidebar's RunConfig; settings that make none run the page again with each message beside its control.
    check: also what the walk's build would refuse before training (no CUDA here, data missing, a probe larger
    than the data), asked before the question whether to close the walks on screen: answered, it only led to the
    same message beside the control."""
    try:
        config = controls.config_from_widgets()
        if check:
            preflight(config)
        return config
    except GeodesicError as err:
        replace.drop("new")
        s.errors = _errors_for(err)
        st.rerun()


def _wait_for_tab() -> None:
    if not session.waiting_for_tab():  # the tab's page never said which it is: start a walk of its own
        st.rerun(scope="app")


def render() -> None:
    s = session.state()
    teach = controls.teach_mode()
    if s.experiment is None and session.waiting_for_tab():  # this may be a reload: its walk comes back
        st.info("Opening this tab's walk…")
        st.fragment(run_every=0.5)(_wait_for_tab)()
        return
    if s.experiment is None:
        try:
            config = controls.config_from_widgets()
        except ConfigError as err:
            s.errors = controls.errors_for(err)
            where = "in the link" if "_url_errors" in st.session_state else "in the sidebar"  # (Start pressed since)
            messages = [message for message, _ in s.errors.values()]
            st.error(f"No walk yet: {len(messages)} setting{'s' * (len(messages) > 1)} {where} "
                     f"{'are' if len(messages) > 1 else 'is'} not valid (each is marked beside its control too):\n\n"
                     + "\n".join(f"- {m}" for m in messages))
            return
        _start_walk(config)
        if s.experiment is None:
            st.error(next((message for message, _ in s.errors.values()), "Could not start the walk."))
            return
    cfg = s.config
    controls.write_url(cfg, teach)  # back from another page, the link names this walk again
    st.title("geodesic")
    # the user's own ε as typed; auto's, which changes every step, to three figures (it read "now 0.0153218")
    eps = f"auto, now {s.walker.step_size:.3g}" if s.walker.trust is not None else f"{s.walker.step_size:g}"
    st.caption(f"**{cfg.goal.kind}** on **{cfg.data.name}** with **{cfg.model.name}**, {cfg.walk.solver} step rule "
               f"(ε={eps}, "
               f"{'β' if cfg.walk.solver == 'constrained' else 'λ'}="
               f"{cfg.walk.goal_weight:g}"
               f"{f', steps guarded at {cfg.walk.step_guard:.1%}' if cfg.walk.step_guard else ''}), seed {cfg.seed}, "
               f"device {s.experiment.device}"
               + (f"; protocol {cfg.goal.new_task} ({SCENARIOS[cfg.goal.new_task]})" if cfg.goal.kind == "new-task"
                  else ""))
    _drive(s, teach)
    available = [v for v in VIEWS if v != "Boundary" or s.walker.tasks["A"].train.x.shape[1:] == (2,)]
    # The view on show is kept across pages (VIEW_KEYS); one this walk lacks (Boundary after a 2-D walk) is Overview.
    if st.session_state.get("view") not in available:
        st.session_state["view"] = available[0]
    # required: clicking the view on show keeps it (it used to deselect it, and the page fell through to Data)
    st.segmented_control("View", available, key="view", required=True, label_visibility="collapsed")
    st.session_state["_baselines_pending"] = session.baselines_pending()
    live = s.runner.is_running or st.session_state["_baselines_pending"] or session.fan_running()
    # What the live refresh compares with to see a walk stop by itself. Set here as well as by Run: a walk running
    # when its tab was reloaded (session.follow_tab) was started by another session, whose flags went with it.
    if s.runner.is_running:
        st.session_state["_was_running"] = True
    if session.fan_running():
        st.session_state["_fan_was_running"] = True
    st.fragment(run_every=REFRESH_SECONDS if live else None)(_live)(s)
