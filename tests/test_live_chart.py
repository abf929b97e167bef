"""Live charts send only what is new (app/live_chart.py): the pure figure diff, and the dashboard under AppTest."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from streamlit.testing.v1 import AppTest

from app import charts
from app.live_chart import MAX_POINTS, figure_update, thin_for_drawing

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


def _frame(n: int) -> pd.DataFrame:
    steps = np.arange(n)
    return pd.DataFrame({"step": steps, "accuracy/A": 0.9 - 1e-3 * steps, "loss/A": 0.3 + 1e-3 * steps,
                         "event": ["start"] + [""] * (n - 1)})


def test_the_loss_and_step_size_axes_keep_their_own_titles():
    frame = _frame(10).assign(step_size=np.geomspace(0.1, 0.3, 10))  # an adaptive ε: drawn on the right axis
    layout = charts.accuracy_and_loss([("main", frame)]).layout
    axes = {layout[name].title.text: layout[name] for name in layout if name.startswith("yaxis")}
    loss_axis, eps_axis = axes["test loss"], axes["step size ε"]  # a KeyError when one title overwrote the other
    assert loss_axis is not eps_axis and eps_axis.type == "log" and eps_axis.side == "right"
    assert loss_axis.rangemode == "nonnegative"  # the one point of step 0 drew a loss axis from -1 to 1


def test_the_step_size_panel_names_rho_only_for_a_walk_that_has_one():
    """The penalty rule has no restoring weight ρ (recorded as NaN): its panel said "ε (solid), ρ (dotted)" over one
    solid line."""
    steps = _frame(10).assign(step_norm=0.1, functional_step=1e-3, euclidean_length=np.arange(10) * 0.1,
                              functional_length=np.arange(10) * 0.03, step_size=0.05)

    def titles(frame):
        layout = charts.step_lengths([("main", frame)]).layout
        return ({a.text for a in layout.annotations},
                {layout[n].title.text for n in layout if n.startswith("yaxis") and layout[n].title.text})

    assert titles(steps.assign(restoring_weight=np.nan)) == ({"per step", "cumulative", "ε per step"},
                                                             {"functional step √(θᵀgθ)", "path length", "step size ε"})
    panels, axes = titles(steps.assign(restoring_weight=0.1))
    assert "ε and ρ per step" in panels and "ε (solid), ρ (dotted)" in axes


def test_the_per_step_panel_draws_both_lengths_from_zero():
    """Every step of a constrained walk is ε long: the Euclidean axis was drawn a millionth of ε wide (ticks 0.0999998
    and 0.1), hiding that the weights move far more than the outputs."""
    steps = _frame(10).assign(step_norm=0.1 + 1e-8 * np.arange(10), functional_step=1e-4 * np.arange(10),
                              euclidean_length=np.arange(10) * 0.1, functional_length=np.arange(10) * 0.01,
                              step_size=0.1, restoring_weight=0.1)
    layout = charts.step_lengths([("main", steps)]).layout
    axes = {layout[n].title.text: layout[n] for n in layout if n.startswith(("xaxis", "yaxis"))}
    assert axes["Euclidean step ‖θ‖"].rangemode == "tozero" and axes["functional step √(θᵀgθ)"].rangemode == "tozero"
    # ρ = ε (the connect and new-task defaults): ρ's dotted line is drawn wider than ε's, not hidden under it
    eps, rho = (next(t for t in charts.step_lengths([("main", steps)]).data if t.name == f"main: {s}") for s in "ερ")
    assert rho.line.dash == "dot" and rho.line.width > (eps.line.width or 2)


def test_the_step_size_axis_ticks_round_values_and_does_not_crowd_a_wide_fan():
    """A fan of ε = 0.1 and 1e9 was ticked at every 1, 2 and 5 × 10ⁿ up to 5,000 on a short panel (18 labels drawn over
    each other); and ρ = 0.3, sparsify's default, had no label of its own."""
    def shown(frames):
        layout = charts.step_lengths([(str(i), f) for i, f in enumerate(frames)]).layout
        title = "ε (solid), ρ (dotted)"
        axis = next(layout[n] for n in layout if n.startswith("yaxis") and layout[n].title.text == title)
        values = [f[c] for f in frames for c in ("step_size", "restoring_weight")]
        low, high = min(v.min() for v in values), max(v.max() for v in values)
        return [t for v, t in zip(axis.tickvals, axis.ticktext, strict=True) if low <= v <= high]

    steps = _frame(10).assign(step_norm=0.1, functional_step=1e-3, euclidean_length=np.arange(10) * 0.1,
                              functional_length=np.arange(10) * 0.03, step_size=0.2, restoring_weight=0.3)
    assert shown([steps]) == ["0.2", "0.3"]
    wide = [steps, steps.assign(step_size=1e9)]
    assert 3 <= len(shown(wide)) <= 7 and "1" in shown(wide)
    auto = steps.assign(step_size=np.geomspace(0.01, 0.2, 10))  # the adaptive step's span: ε0/20 to ε0
    assert shown([auto]) == ["0.01", "0.02", "0.05", "0.1", "0.2"]


def test_a_walk_of_a_few_steps_is_ticked_at_whole_steps():
    """After three clicks of Step the step axes were ticked 0, 0.5, 1, 1.5, ...: a step is a whole number."""
    def dticks(figure):
        return {figure.layout[n].dtick for n in figure.layout if n.startswith("xaxis") and
                figure.layout[n].title.text != "sparsity (%)"}

    steps = dict(step_norm=0.1, functional_step=1e-3, euclidean_length=0.1, functional_length=0.01, step_size=0.1,
                 goal_distance=1.0, sparsity=0.0)
    few, many = _frame(4).assign(**steps), _frame(40).assign(**steps)
    for chart in (charts.accuracy_and_loss, charts.sparsity_and_distance):
        assert {1} <= dticks(chart([("main", few)])) and 1 not in dticks(chart([("main", many)])), chart
    assert 1 in dticks(charts.step_lengths([("main", few)])) and 1 not in dticks(charts.step_lengths([("main", many)]))
    # a baseline's curve over 500 steps widens the axis: 500 ticks would be drawn
    curve = pd.DataFrame({"step": [0, 500], "accuracy/A": [0.9, 0.9]})
    assert 1 not in dticks(charts.accuracy_and_loss([("main", few)], {"curves": {"fine-tuning": curve}}))


def test_a_walk_run_from_its_first_steps_is_drawn_again_once_they_are_many_with_plotly_s_own_ticks():
    """A walk run from step 0 kept its first figure's tick at every step while its new points were appended: at
    step 238 its step axis was a smear of 238 numbers and grid lines, until the walk stopped."""
    from app.live_chart import runs_signature, runs_update

    def runs(n: int):
        f = _frame(n).assign(step_norm=0.1, functional_step=1e-3, euclidean_length=0.1, functional_length=0.01,
                             step_size=0.1, goal_distance=1.0, sparsity=0.0)
        return [("main", f)]

    def dticks(message):
        layout = message["full"]["layout"]
        return {layout[n].get("dtick") for n in layout if n.startswith("xaxis") and layout[n].get("title", {}).get(
            "text") != "sparsity (%)"}

    for chart in (charts.accuracy_and_loss, charts.sparsity_and_distance, charts.step_lengths):
        def update(n, sent, chart=chart):
            return runs_update(lambda: chart(runs(n)), runs(n), runs_signature(runs(n)), sent)

        first, sent = update(1, None)
        assert "full" in first and 1 in dticks(first), chart  # a few steps: ticked at each
        for n in (3, 7):
            message, sent = update(n, sent)
            assert "full" not in message and message["ops"], (chart, n)  # only the new points are sent
        message, sent = update(40, sent)
        assert "full" in message and 1 not in dticks(message), chart  # drawn again, with Plotly's own ticks
        message, _ = update(60, sent)
        assert "full" not in message and message["ops"], chart  # then new points only, again


def test_a_walk_at_step_0_shows_no_negative_step():
    """A walk that has not stepped yet is one point at step 0, which Plotly autoranged from -1 to 1: a step "-1"."""
    start = _frame(1).assign(step_norm=0.0, functional_step=0.0, euclidean_length=0.0, functional_length=0.0,
                             step_size=0.1, goal_distance=1.0, sparsity=0.0)
    for chart in (charts.accuracy_and_loss, charts.sparsity_and_distance, charts.step_lengths):
        figure = chart([("main", start)])
        modes = {figure.layout[n].title.text: figure.layout[n].rangemode for n in figure.layout
                 if n.startswith("xaxis") and figure.layout[n].title.text in ("step", None)}
        assert modes and all(mode == "nonnegative" for mode in modes.values()), (chart, modes)


def test_a_growing_path_sends_only_its_new_points():
    first, sent = figure_update(charts.accuracy_and_loss([("main", _frame(10))]), None)
    assert "full" in first and first["seq"] == 1
    delta, sent = figure_update(charts.accuracy_and_loss([("main", _frame(13))]), sent)
    assert "full" not in delta and delta["base"] == 1 and delta["seq"] == 2
    assert {op["op"] for op in delta["ops"]} == {"extend"}
    assert len(delta["ops"]) == 2  # the accuracy and the loss trace
    for op in delta["ops"]:
        assert op["update"]["x"] == [10, 11, 12] and len(op["update"]["y"]) == 3  # the 3 new points, no more
    again, same = figure_update(charts.accuracy_and_loss([("main", _frame(13))]), sent)
    assert again == delta and same is sent  # nothing new: the same message, which the browser ignores


def test_a_branch_an_event_or_a_request_from_the_browser_redraws_the_whole_chart():
    _, sent = figure_update(charts.accuracy_and_loss([("main", _frame(10))]), None)
    branched, _ = figure_update(charts.accuracy_and_loss([("main", _frame(11)), ("branch 1 @ 5", _frame(7))]), sent)
    assert "full" in branched and len(branched["full"]["data"]) == 4  # a new trace pair: full draw
    with_event = _frame(11)
    with_event.loc[10, "event"] = "step size 0.2 -> 0.1"  # a dotted line in the layout
    redrawn, _ = figure_update(charts.accuracy_and_loss([("main", with_event)]), sent)
    assert "full" in redrawn
    asked, _ = figure_update(charts.accuracy_and_loss([("main", _frame(11))]), sent, want_full="2:null")
    assert "full" in asked  # the browser missed a message and asked for everything


def test_a_moving_marker_is_restyled_and_a_changed_long_trace_redraws():
    def fig(current: float, long: np.ndarray) -> go.Figure:
        return go.Figure([go.Scatter(x=long, y=long), go.Scatter(x=[current], y=[current], mode="markers")])

    base = np.arange(100.0)
    _, sent = figure_update(fig(0.0, base), None)
    moved, sent = figure_update(fig(1.0, np.arange(101.0)), sent)
    assert [op["op"] for op in moved["ops"]] == ["extend", "restyle"]
    assert moved["ops"][1]["update"] == {"x": [1.0], "y": [1.0]}
    changed, _ = figure_update(fig(1.0, np.arange(101.0) * 2), sent)  # old points moved (a refit basis, say)
    assert "full" in changed


def test_thinning_keeps_every_point_up_to_the_limit_and_is_stable_as_the_path_grows():
    assert len(thin_for_drawing(MAX_POINTS)) == MAX_POINTS
    kept = thin_for_drawing(3 * MAX_POINTS)
    assert len(kept) <= MAX_POINTS and kept[0] == 0
    longer = thin_for_drawing(3 * MAX_POINTS + 7)
    assert np.array_equal(longer[: len(kept)], kept)  # points kept stay kept: the chart can still be extended


def _messages(at: AppTest) -> dict:
    return {e.proto.id: json.loads(e.proto.json) for e in at.get("bidi_component")
            if e.proto.component_name == "geodesic.live_chart"}


def _wait_for_baselines(at: AppTest) -> None:
    import time

    future = at.session_state["geodesic"].pending_baselines
    t0 = time.monotonic()
    while future is not None and not future.done():
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)


def test_the_first_paint_does_not_wait_for_the_baselines_and_they_join_the_charts():
    at = AppTest.from_file(APP, default_timeout=180).run()
    state = at.session_state["geodesic"]
    assert state.pending_baselines is not None or state.baselines  # computed after the page is drawn
    first = _messages(at)
    assert first and all("full" in m for m in first.values())
    _wait_for_baselines(at)
    at.run()
    assert "one_shot_accuracy" in at.session_state["geodesic"].baselines
    acc = next(m for m in _messages(at).values() if "Accuracy and loss" in json.dumps(m.get("full", {})))
    assert "one-shot pruning" in json.dumps(acc["full"]["layout"])  # redrawn with the baseline lines


def test_the_dashboard_sends_each_refresh_only_the_new_points():
    at = AppTest.from_file(APP, default_timeout=180).run()
    assert not at.exception
    _wait_for_baselines(at)
    at.run()
    first = _messages(at)
    assert first and all("full" in m for m in first.values())
    step = next(b for b in at.button if b.label == "Step")
    step.click().run()
    after = _messages(at)
    assert after.keys() == first.keys()
    for message in after.values():
        assert "full" not in message and message["ops"], message  # a delta on top of the first draw
        xs = [op["update"]["x"] for op in message["ops"] if op["op"] == "extend"]
        assert xs and all(len(x) == 1 for x in xs) and [1] in xs  # the one new step, on every trace that grew
    next(b for b in at.button if b.label == "Step").click().run()
    assert all(m["base"] == after[k]["seq"] for k, m in _messages(at).items())  # numbered, each on the last
    at.number_input(key="branch_at").set_value(1).run()
    next(b for b in at.button if b.label == "Branch").click().run()
    assert all("full" in m for m in _messages(at).values())  # a branch changes the charts' structure


def test_a_growing_table_becomes_the_same_points_as_a_rebuilt_figure_without_building_it():
    from app.live_chart import runs_signature, runs_update

    def runs(n: int):
        f = _frame(n)
        f["sparsity"], f["goal_distance"] = 1e-3 * f["step"], 3.0 / (1 + f["step"])
        f["prune_now_accuracy/A"] = 0.5 + 1e-3 * f["step"]
        return [("main", f)]

    built = []

    def build(r):
        return lambda: built.append(1) or charts.sparsity_and_distance(r)

    first, sent = runs_update(build(runs(10)), runs(10), runs_signature(runs(10)), None)
    assert "full" in first and len(built) == 1
    delta, sent = runs_update(build(runs(14)), runs(14), runs_signature(runs(14)), sent)
    assert len(built) == 1 and delta["base"] == first["seq"]  # no figure was built for the new rows
    full = json.loads(charts.sparsity_and_distance(runs(14)).to_json())["data"]
    for op in delta["ops"]:
        old = charts.sparsity_and_distance(runs(10)).data[op["trace"]]
        for axis in ("x", "y"):
            expected = np.asarray(getattr(charts.sparsity_and_distance(runs(14)).data[op["trace"]], axis))
            np.testing.assert_allclose(list(getattr(old, axis)) + op["update"][axis], expected)
    assert len(delta["ops"]) == len(full) == 2  # the walk's accuracy at its sparsity, its distance
    steps = runs(15)
    steps[0][1].loc[14, "event"] = "step size 0.2 -> 0.1"
    redrawn, _ = runs_update(build(steps), steps, runs_signature(steps), sent)
    assert "full" in redrawn and len(built) == 2  # an event line: the figure is rebuilt


def test_a_curve_measured_at_the_current_point_is_restyled_in_place_not_redrawn():
    """The Overview's pruning curve of the current point changes values, not length, as the walk moves: `side`
    sends it as a restyle beside the new rows' extensions; the figure is built again only when its shape changes."""
    from app.live_chart import runs_signature, runs_update

    def runs(n: int):
        f = _frame(n)
        f["sparsity"], f["goal_distance"] = 0.0, 3.0 / (1 + f["step"])
        return [("main", f)]

    def pruning(step: int, now: list[float]) -> dict:
        return {"levels": [0.0, 0.5, 0.9], "start": [0.9, 0.8, 0.3], "now": now, "step": step, "target": 0.9,
                "examples": (30, 30)}

    built = []

    def update(n, p, sent):
        side = {charts.PRUNING_NOW: charts.pruning_now(p)}
        return runs_update(lambda: built.append(1) or charts.sparsity_and_distance(runs(n), p), runs(n),
                           runs_signature(runs(n), "same shape"), sent, side=side)

    first, sent = update(10, pruning(9, [0.9, 0.85, 0.5]), None)
    names = [t["name"] for t in first["full"]["data"]]
    assert names[:2] == ["start, pruned now to each sparsity", "step 9, pruned now to each sparsity"]
    delta, sent = update(12, pruning(11, [0.9, 0.88, 0.6]), sent)
    assert len(built) == 1 and "full" not in delta
    restyle = [op for op in delta["ops"] if op["op"] == "restyle"]
    assert restyle == [{"op": "restyle", "trace": 1,
                        "update": {"y": [90.0, 88.0, 60.0], "name": "step 11, pruned now to each sparsity"}}]
    assert {op["op"] for op in delta["ops"]} == {"restyle", "extend"}  # the new rows too
    same, sent = update(12, pruning(11, [0.9, 0.88, 0.6]), sent)
    assert same is delta  # nothing changed: the same message, which the browser ignores


def test_the_distance_axis_is_ticked_for_the_decades_a_walk_crosses_from_its_first_point():
    """A live chart keeps the axis of its first draw (one point) while the distance falls three decades: Plotly's own
    log ticks then labelled every digit, 10, 9, 8, ... 1, 9, 8 ..., in 250 pixels. 1, 2 and 5 in each decade now."""
    f = _frame(1)
    f["sparsity"], f["goal_distance"] = 0.0, 12.8
    axis = charts.sparsity_and_distance([("main", f)]).layout.yaxis2
    assert axis.type == "log" and axis.tickmode == "array"
    shown = [t for v, t in zip(axis.tickvals, axis.ticktext, strict=True) if 0.01 <= v <= 20]
    assert shown == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10", "20"]
