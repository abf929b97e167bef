"""The dashboard under Streamlit's AppTest: starts, steps, runs and pauses, renders every view, records
ε changes, keeps sessions apart, and answers bad settings next to the control keeping the walk."""
import json
import math
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


def start(query: dict | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=180)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def baselines_when_they_arrive(at: AppTest, timeout: float = 120.0) -> dict:
    """Run the page as its live refresh does until the analysis process's baselines have joined the walk."""
    t0 = time.monotonic()
    while at.session_state["geodesic"].pending_baselines is not None or not at.session_state["geodesic"].baselines:
        assert time.monotonic() - t0 < timeout, "the baselines never arrived"
        time.sleep(0.2)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
    return at.session_state["geodesic"].baselines


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def walker(at: AppTest):
    return at.session_state["geodesic"].walker


def live_charts(at: AppTest) -> dict:
    """{key: the message each live chart (app/live_chart.py) got in the last run}."""
    import json

    found = {}
    for element in at.get("bidi_component"):
        if element.proto.component_name == "geodesic.live_chart":
            found[element.proto.id] = json.loads(element.proto.json)
    return found


def charts(at: AppTest) -> list:
    """Every chart on the page: live ones and plain st.plotly_chart ones."""
    return list(live_charts(at).values()) + list(at.get("plotly_chart"))


@pytest.fixture(scope="module")
def app():
    return start()


def test_app_starts_on_the_default_walk(app):
    assert metric(app, "step") == "0"
    assert metric(app, "distance to goal") == f"{walker(app).record.last.goal_distance:.3g}"
    assert walker(app).goal.name == "sparsify"
    pruned = walker(app).record.last.extra["prune_now_accuracy/A"]
    assert metric(app, "prune now") == f"{100 * pruned:.1f}%"  # the projection's accuracy beside w's own
    # zeros and non-zeros, as counts (method.md): 64·128 + 128·128 + 128·10 prunable weights, none zero at the start
    assert any(c.value == "0 of 25,856 prunable weights are exactly zero; 25,856 non-zero." for c in app.caption)
    assert len(live_charts(app)) >= 2  # accuracy/loss and sparsity charts on the first paint
    # the start's accuracy has not moved: no green "↑ +0.0 pts"
    delta = next(m for m in app.metric if m.label == "accuracy A").proto
    assert delta.delta == "±0.0 pts" and delta.color == delta.GRAY and delta.direction == delta.NONE, delta
    assert all("full" in message for message in live_charts(app).values())  # a new page draws them whole


def test_step_adds_exactly_one_step(app):
    before = len(walker(app).record)
    button(app, "Step").click().run()
    assert len(walker(app).record) == before + 1
    assert metric(app, "step") == str(before)


def test_run_then_pause(app):
    button(app, "Run").click().run()
    assert any(b.label == "Pause" for b in app.button)
    runner = app.session_state["geodesic"].runner
    assert runner.is_running
    n0 = len(walker(app).record)
    t0 = time.monotonic()
    while len(walker(app).record) < n0 + 5:  # the server's engine walks in the background
        assert time.monotonic() - t0 < 60 and not runner.error
        time.sleep(0.05)
    button(app, "Pause").click().run()
    assert not runner.is_running
    n = len(walker(app).record)
    time.sleep(0.5)
    assert len(walker(app).record) == n  # paused means no more steps
    assert any(b.label == "Run" for b in app.button)


@pytest.mark.parametrize("view", ["Overview", "Path", "Steps", "Examples", "Metric", "Data"])
def test_every_view_renders(app, view, monkeypatch):
    for _ in range(2):  # 3 points: what the Path view needs to fit its projection, whichever view runs first
        button(app, "Step").click().run()
    app.segmented_control[0].set_value(view).run()
    assert not app.exception, [e.value for e in app.exception]
    if view in ("Overview", "Path", "Steps", "Examples"):
        assert live_charts(app)
    if view == "Metric":
        import json

        button(app, "Compute the spectrum").click().run()
        assert app.get("plotly_chart") and not app.exception
        chart = app.get("plotly_chart")[0]
        assert chart.proto.theme == ""  # the figure's own look, as the live charts have (not Streamlit's theme)
        assert json.loads(chart.proto.spec)["layout"]["yaxis"]["exponentformat"] == "power"  # 10⁻⁶, not "1μ"
    if view == "Data":
        assert len(app.get("download_button")) == 4
        from app.views import explore

        n = len(walker(app).record)
        assert not any("latest" in c.value for c in app.caption)  # every point shown: nothing to say
        monkeypatch.setattr(explore, "DATA_ROWS", 2)
        app.run()
        table = app.dataframe[0].value
        assert len(table) == 2 and any(c.value == f"The latest 2 of {n:,} points (steps {n - 2:,} to {n - 1:,}); the "
                                       "table downloads below hold all of them." for c in app.caption)


def test_every_view_renders_a_walk_with_a_head_per_task():
    """A task-incremental walk keeps the five outputs of A's head: the Examples heat map and the Metric spectrum
    read those, the per-task chart both tasks on their own heads."""
    at = start({"goal": "new-task", "protocol": "split-heads"})
    for _ in range(2):
        button(at, "Step").click().run()
    # no point to reach: the slot says what it shows (B's loss), where it said "distance to goal"
    assert metric(at, "task-B loss") == f"{walker(at).record.last.goal_distance:.3g}"
    assert not any(m.label == "distance to goal" for m in at.metric)
    for view in ("Overview", "Path", "Steps", "Examples", "Metric", "Data"):
        at.segmented_control[0].set_value(view).run()
        assert not at.exception, (view, [e.value for e in at.exception])
        if view == "Metric":
            button(at, "Compute the spectrum").click().run()
            assert not at.exception and at.get("plotly_chart")
    assert walker(at).model_fn.head == (0, 5)


def test_the_sparsity_chart_shows_how_far_the_start_and_the_current_point_can_be_pruned():
    """A sparsify walk keeps its weights dense until it arrives, so its accuracy against its exact zeros was a
    vertical line at 0% and one jump at the end: the chart showed nothing of the walk. It now draws the start's and
    the current point's accuracy if pruned now to each sparsity (analysis.pruning_curve), the latter following the
    walk."""
    import numpy as np

    from geodesic import analysis

    at = start()

    def curves() -> dict:
        full = at.session_state["_live_chart:sparsity"]["message"]["full"]
        return {t["name"]: t for t in full["data"] if "pruned now" in t.get("name", "")}

    levels = analysis.pruning_levels(0.9)
    first = curves()
    assert list(first) == ["start, pruned now to each sparsity", "main: step 0, pruned now to each sparsity"]
    start_curve = analysis.pruning_curve(walker(at), levels, step=0)
    for curve in first.values():  # at step 0 the current point is the start
        np.testing.assert_allclose(curve["x"], 100 * levels)
        np.testing.assert_allclose(curve["y"], 100 * start_curve, atol=1e-4)
    # the one-shot pruning baseline is the start's curve at the target
    assert start_curve[np.flatnonzero(np.isclose(levels, 0.9))[0]] == pytest.approx(
        baselines_when_they_arrive(at)["one_shot_accuracy"], abs=1e-6)
    at.run()
    for _ in range(40):
        button(at, "Step").click().run()
    assert not at.exception, [e.value for e in at.exception]
    # the current point's curve follows the walk, restyled in place: the chart is not sent again in full
    message = at.session_state["_live_chart:sparsity"]["message"]
    assert "full" not in message, message
    restyled = [op["update"] for op in message["ops"] if "name" in op["update"]]
    assert [u["name"] for u in restyled] == ["main: step 40, pruned now to each sparsity"]
    moved = analysis.pruning_curve(walker(at), levels)
    np.testing.assert_allclose(restyled[0]["y"], 100 * moved, atol=1e-4)
    assert not np.allclose(moved, start_curve)  # the walk has changed how the network prunes
    # a branch is the walk that steps now: its curve, in its colour, from the point it branched from
    at.number_input(key="branch_at").set_value(10).run()
    button(at, "Branch").click().run()
    assert not at.exception, [e.value for e in at.exception]
    branched = curves()
    label = at.session_state["geodesic"].branches[1].label
    assert list(branched) == ["start, pruned now to each sparsity", f"{label}: step 10, pruned now to each sparsity"]
    np.testing.assert_allclose(branched[f"{label}: step 10, pruned now to each sparsity"]["y"],
                               100 * analysis.pruning_curve(walker(at), levels), atol=1e-4)


def test_a_slow_models_pruning_curve_is_measured_a_slice_per_engine_call(monkeypatch):
    """A pruning curve of ResNet-18 took 10 s, VGG11's 48 s, on the engine's thread that every walk of the server
    shares: it is measured a slice per call (here one level each), so that other walks step between two slices; a
    walk that is not running has it drawn in the same run of the page."""
    import numpy as np

    from app.views import explore
    from geodesic import analysis

    monkeypatch.setattr(explore, "PRUNING_SLICE_SECONDS", 0.0)
    slices = []
    advance = analysis.PruningCurve.advance
    monkeypatch.setattr(analysis.PruningCurve, "advance", lambda self, seconds=math.inf: slices.append(
        (self, len(self.values))) or advance(self, seconds))
    at = start()
    state = at.session_state["geodesic"]
    levels = analysis.pruning_levels(0.9)
    assert not state.pruning["measuring"]
    assert [done for _, done in slices] == list(range(len(levels)))  # one engine call per level
    np.testing.assert_allclose(state.pruning["start"], analysis.pruning_curve(walker(at), levels, step=0))
    drawn = at.session_state["_live_chart:sparsity"]["message"]["full"]
    assert "start, pruned now to each sparsity" in [t["name"] for t in drawn["data"]]


def test_a_permuted_task_on_two_features_says_what_it_is_beside_the_protocol():
    from geodesic.data import protocol_caveat

    note = protocol_caveat("moons", "permuted")
    at = start({"goal": "new-task", "dataset": "moons"})
    assert note in [c.value for c in at.sidebar.caption]
    at.sidebar.selectbox(key="dataset").set_value("digits").run()
    assert note not in [c.value for c in at.sidebar.caption]


def test_the_metric_spectrum_at_chosen_steps_is_drawn_beside_the_others():
    """method.md §7: the spectrum at chosen points. It was only at the current point, each one replacing the last."""
    import numpy as np

    from geodesic import analysis

    at = start()
    for _ in range(3):
        button(at, "Step").click().run()
    at.segmented_control[0].set_value("Metric").run()
    button(at, "Compute the spectrum").click().run()
    at.number_input(key="spec_step").set_value(0).run()
    button(at, "Compute the spectrum").click().run()
    assert not at.exception, [e.value for e in at.exception]
    state = at.session_state["geodesic"]
    assert [x["step"] for x in state.spectrum] == [3, 0]
    start_spectrum = analysis.spectrum(state.walker, 64, step=0)  # the start network's, not the current point's
    np.testing.assert_allclose(state.spectrum[1]["values"], start_spectrum, rtol=1e-5)
    assert not np.allclose(state.spectrum[0]["values"], start_spectrum, rtol=1e-5)
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert [t["name"] for t in spec["data"]] == ["step 3", "step 0"] and "steps 3, 0" in spec["layout"]["title"]["text"]
    at.number_input(key="spec_step").set_value(99).run()  # later than the walk: refused by name, the spectra kept
    button(at, "Compute the spectrum").click().run()
    assert any("spectrum step: got 99; allowed: a step of this walk, 0 to 3" in e.value for e in at.error)
    assert len(state.spectrum) == 2
    button(at, "Clear the spectra").click().run()
    assert state.spectrum is None and not at.get("plotly_chart")


def test_a_model_too_large_to_keep_every_point_says_so_in_the_views_that_need_them(monkeypatch):
    """VGG and ResNet keep only a sketch of each point's weights: the Examples view crashed on it (a RuntimeError from
    reading a sketch row as weights), and a spectrum at an earlier step would have. Here the default MLP's trace is
    made a sketch the same way, as one of those models' is."""
    import functools

    from geodesic import walker as walker_module
    from geodesic.path import WeightTrace

    monkeypatch.setattr(walker_module, "WeightTrace", functools.partial(WeightTrace, max_dims=1000))
    at = start()
    for _ in range(2):
        button(at, "Step").click().run()
    assert not walker(at).trace.is_exact
    at.segmented_control[0].set_value("Examples").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("too many to keep for each point" in i.value for i in at.info), [i.value for i in at.info]
    at.segmented_control[0].set_value("Metric").run()
    at.number_input(key="spec_step").set_value(0).run()
    button(at, "Compute the spectrum").click().run()
    assert not at.exception and any("step: got 0; allowed: the current point (2) only" in e.value for e in at.error)
    at.number_input(key="spec_step").set_value(None).run()
    button(at, "Compute the spectrum").click().run()  # the current point has its weights
    assert not at.exception and at.get("plotly_chart")


def test_changing_step_size_mid_walk_is_recorded(app, monkeypatch):
    import threading

    app.segmented_control[0].set_value("Overview").run()
    w, threads, real = walker(app), [], walker(app).set_step_size
    monkeypatch.setattr(w, "set_step_size", lambda eps: (threads.append(threading.current_thread().name), real(eps)))
    app.number_input(key="eps_now").set_value(0.05).run()
    button(app, "Apply to this walk").click().run()
    assert threads == ["geodesic-engine"]  # between two steps on the engine's thread, never mid-step from the page's
    button(app, "Step").click().run()
    last = walker(app).record.last
    assert last.step_size == 0.05 and last.event.startswith("step size")
    assert not app.exception


def test_a_bad_step_size_mid_walk_is_refused_by_its_name_and_the_walk_kept():
    at = start()
    button(at, "Step").click().run()
    at.number_input(key="eps_now").set_value(-0.5).run()
    button(at, "Apply to this walk").click().run()
    assert any("Step size ε: got -0.5" in e.value for e in at.error), [e.value for e in at.error]
    assert walker(at).config.max_step_norm == 0.2 and walker(at).n_steps == 1


def test_branching_keeps_both_walks_on_the_charts(app):
    for _ in range(2):  # a step 1 to branch from, whichever tests ran before on this page
        button(app, "Step").click().run()
    w = walker(app)
    n = w.n_steps
    app.number_input(key="branch_at").set_value(1).run()
    button(app, "Branch").click().run()
    state = app.session_state["geodesic"]
    assert len(state.branches) == 2 and state.walker.n_steps == 1
    assert state.branches[0].walker.n_steps == n
    button(app, "Step").click().run()
    assert state.walker.record.last.event == "branched from step 1"


def test_branch_from_step_follows_the_walk_until_the_user_picks_a_step():
    at = start()
    for _ in range(2):
        button(at, "Step").click().run()
    assert at.number_input(key="branch_at").value == 1  # the middle of 2 steps
    for _ in range(4):
        button(at, "Step").click().run()
    assert at.number_input(key="branch_at").value == 3  # it was 1 for ever (the first default kept)
    at.number_input(key="branch_at").set_value(2).run()
    for _ in range(4):
        button(at, "Step").click().run()
    assert at.number_input(key="branch_at").value == 2  # the user's own step is kept
    button(at, "Reset").click().run()
    button(at, "Go on without saving").click().run()  # (10 steps not saved: asked first)
    assert at.number_input(key="branch_at").value == 0 and not at.exception  # past a new walk's end: its middle


def test_the_step_size_fields_offer_the_walk_s_own_values_after_reset_and_a_new_walk():
    at = start()
    at.number_input(key="eps_now").set_value(0.1).run()
    button(at, "Apply to this walk").click().run()
    assert walker(at).config.max_step_norm == 0.1 and at.number_input(key="eps_now").value == 0.1
    button(at, "Reset").click().run()
    assert walker(at).config.max_step_norm == 0.2
    assert at.number_input(key="eps_now").value == 0.2  # it offered the 0.1 of the walk before
    at.number_input(key="step_size").set_value(0.05).run()
    button(at, "Start a new walk with these settings").click().run()
    assert at.number_input(key="eps_now").value == 0.05
    assert at.text_input(key="fan_values_step size ε").value == "0.025, 0.05, 0.1"  # not the 0.2 walk's fan


@pytest.mark.parametrize("goal", ["new-task", "connect"])
def test_each_goal_renders(goal):
    at = start({"goal": goal})
    assert walker(at).goal.name == goal
    button(at, "Step").click().run()
    assert not at.exception and live_charts(at)


def test_the_view_on_show_stays_when_clicked_again():
    at = start()
    control = at.segmented_control[0]
    assert control.proto.required  # the browser keeps a required segment selected when it is clicked again
    control.set_value(None).run()  # and were it ever empty, the page shows the Overview, not the Data table
    assert not at.exception and live_charts(at) and not at.get("download_button")


def test_toy_data_shows_the_decision_boundary():
    import numpy as np

    at = start({"dataset": "moons"})
    at.segmented_control[0].set_value("Boundary").run()
    assert not at.exception and at.get("plotly_chart")
    for _ in range(3):
        button(at, "Step").click().run()
    # the start network's boundary beside the current one: what a walk that keeps the function keeps
    traces = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    start_line = [t for t in traces if t.get("name") == "start network's boundary"]
    assert len(start_line) == 1 and start_line[0]["contours"]["start"] == 0.5
    from geodesic.analysis import decision_grid

    grid = decision_grid(walker(at))
    first = walker(at).branch(0)  # a walker whose current point is the start
    assert np.allclose(grid["p_start"], decision_grid(first)["p"]) and not np.allclose(grid["p_start"], grid["p"])
    at.selectbox(key="dataset").set_value("digits").run()  # a walk with no boundary: the kept view falls back
    button(at, "Start a new walk with these settings").click().run()
    button(at, "Go on without saving").click().run()  # (3 steps not saved: asked first)
    assert not at.exception, [e.value for e in at.exception]
    assert at.segmented_control[0].value == "Overview" and "Boundary" not in at.segmented_control[0].options


def test_two_sessions_are_independent():
    a, b = start(), start()
    button(a, "Step").click().run()
    button(a, "Step").click().run()
    assert walker(a).n_steps == 2 and walker(b).n_steps == 0
    assert walker(a) is not walker(b)


@pytest.mark.parametrize("key,value,fragment", [
    ("step_size", 0.0, "Step size ε: got 0.0"),
    ("step_size", -1.0, "Step size ε: got -1.0"),
    ("target_sparsity", 1.5, "Target sparsity: got 1.5"),
    ("probe_size", 0, "Probe size N: got 0"),
    ("probe_size", 5000, "Probe size N: got 5000; allowed: at most 1,437"),  # (it was cut to 1,437, unsaid)
    ("n_steps", 0, "Most steps per run: got 0"),
])
def test_bad_settings_show_a_message_and_keep_the_walk(key, value, fragment):
    at = start()
    button(at, "Step").click().run()
    kept = walker(at)
    at.number_input(key=key).set_value(value).run()
    button(at, "Start a new walk with these settings").click().run()
    # refused before the walk on screen is offered to be closed (a probe larger than the data was refused only
    # after "Go on without saving": a question that led nowhere)
    assert not any(b.label == "Go on without saving" for b in at.button)
    assert walker(at) is kept and kept.n_steps == 1
    assert any(fragment in e.value for e in at.error), [e.value for e in at.error]
    at.number_input(key=key).set_value(8 if key in ("probe_size", "n_steps") else 0.5).run()  # corrected: it goes
    assert not any(fragment in e.value for e in at.error), [e.value for e in at.error]
    at.number_input(key=key).set_value(value).run()  # and comes back with the value it was about
    assert any(fragment in e.value for e in at.error), [e.value for e in at.error]


def _absent_device() -> str | None:
    """A device PyTorch does not see here (cuda or mps), if any."""
    import torch

    return next((d for d, here in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
                 if not here), None)


def test_a_device_not_here_is_refused_before_the_unsaved_walk_is_offered_to_be_closed():
    absent = _absent_device()
    if absent is None:
        pytest.skip("CUDA and MPS are both here")
    at = start()
    button(at, "Step").click().run()
    kept = walker(at)
    at.selectbox(key="device").set_value(absent).run()
    button(at, "Start a new walk with these settings").click().run()
    assert not any(b.label == "Go on without saving" for b in at.button)  # it was asked, then refused
    assert walker(at) is kept and kept.n_steps == 1
    assert any(f"Device: got '{absent}'" in e.value for e in at.error), [e.value for e in at.error]
    # with nothing unsaved on screen (saved, or the question turned off) it is refused the same way
    at.session_state["_replace_no_ask"] = True
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept and any(f"Device: got '{absent}'" in e.value for e in at.error)


def test_a_new_task_run_pauses_after_its_most_steps_and_run_goes_on():
    """A new-task walk has no end of its own: Run used to walk it for as long as the page stayed open. A run now
    pauses after the sidebar's 'Most steps per run' (the goal's default: 300), says so, and Run goes on."""
    assert start({"goal": "new-task"}).number_input(key="n_steps").value == 300
    at = start({"goal": "new-task", "steps": "6"})  # the link carries it
    assert walker(at).config.n_steps == 6 and at.query_params["steps"] in ("6", ["6"])
    button(at, "Run").click().run()
    runner = at.session_state["geodesic"].runner
    t0 = time.monotonic()
    while runner.is_running:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    at.run()  # the live refresh sees the walk stopped
    assert walker(at).n_steps == 6 and not walker(at).is_done
    assert any("Paused at step 6" in i.value for i in at.info), [i.value for i in at.info]
    assert not at.error and any(b.label == "Run" for b in at.button)
    button(at, "Run").click().run()  # goes on for 6 more
    while runner.is_running:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    at.run()
    assert walker(at).n_steps == 12 and any("Paused at step 12" in i.value for i in at.info)
    # a fan from here: each of its walks takes as many steps and pauses; its table says so (not "press Run",
    # which drives the walk kept from it)
    at.text_input(key="fan_values_step size ε").set_value("0.05, 0.2").run()
    button(at, "Launch the fan").click().run()
    state = at.session_state["geodesic"]
    while any(h.is_running for _, h in state.fan):
        assert time.monotonic() - t0 < 90
        time.sleep(0.05)
    at.run()
    assert [state.branches[i].walker.n_steps for i, _ in state.fan] == [18, 18]
    table = at.dataframe[0].value
    assert list(table["state"]) == ["paused: took its most steps per run"] * 2
    # what each learned beside what it kept, and the one offered to keep is the best on both tasks together
    # (it used to be the one that kept A best, whatever B it learned)
    ends = [state.branches[i].walker.record.last.accuracy for i, _ in state.fan]
    assert list(table["accuracy B (%)"]) == [round(100 * e["B"], 1) for e in ends]
    assert "distance left" not in table and list(table["task-B loss"]) == [  # no point to reach: B's loss
        float(f"{state.branches[i].walker.record.last.goal_distance:.3g}") for i, _ in state.fan]
    best = max(range(2), key=lambda k: ends[k]["A"] + ends[k]["B"])
    assert at.selectbox(key="fan_keep").value == state.fan[best][0]


def test_connect_shows_the_barriers_of_the_walk_and_the_straight_line():
    """The numbers a connect walk is judged by (method.md §5), under its chart: they were only in the CLI's
    summary."""
    from geodesic.baselines import barrier

    at = start({"goal": "connect", "solver": "penalty"})
    line = baselines_when_they_arrive(at)["straight_line"]
    button(at, "Run").click().run()
    t0 = time.monotonic()
    while not walker(at).is_done:
        assert time.monotonic() - t0 < 120 and not at.session_state["geodesic"].runner.error
        time.sleep(0.1)
    at.run()
    frame = walker(at).record.to_frame()
    walk_barrier = barrier(1 - frame["accuracy/A"])
    assert metric(at, "error barrier, walk") == f"{100 * walk_barrier:.2f} pts"
    assert metric(at, "error barrier, straight line") == f"{100 * barrier(1 - line['accuracy']):.2f} pts"
    assert metric(at, "loss barrier, walk") == f"{barrier(frame['loss/A']):.3f}"
    assert 100 * barrier(1 - line["accuracy"]) > 2 > 100 * walk_barrier  # the digits pair: the line has a barrier
    assert any("This walk connects the two networks" in c.value for c in at.caption), [c.value for c in at.caption]
    matched = baselines_when_they_arrive(at)["matched_line"]  # weight matching, the method's extra baseline
    assert 100 * barrier(1 - matched["accuracy"]) < 100 * barrier(1 - line["accuracy"]) / 2
    assert any(f"error barrier is {100 * barrier(1 - matched['accuracy']):.2f} pts" in c.value
               and "permutation symmetry" in c.value for c in at.caption), [c.value for c in at.caption]
    drawn = json.dumps(at.session_state["_live_chart:alpha"]["traces"], default=str)  # what the chart holds now
    assert drawn.index("straight line") < drawn.index("straight line, B's units matched to A's")


def test_a_walk_that_reaches_its_goal_without_keeping_the_function_says_so():
    at = start({"solver": "penalty", "eps": "1000"})  # one step lands on the pruned network: one-shot pruning
    button(at, "Step").click().run()
    assert walker(at).is_done and walker(at).record.lowest_accuracy("A") < 0.6
    assert not at.success
    assert any("Stopped: goal reached, but accuracy A fell to" in w.value and "did not keep the function" in w.value
               for w in at.warning), [w.value for w in at.warning]
    # projected: 90% of 25,856 rounded up (never below the target) are zero
    assert any(c.value == "23,271 of 25,856 prunable weights are exactly zero; 2,585 non-zero." for c in at.caption)
    kept = start({"sparsity": "0.3"})  # a short walk that keeps it: 12 steps, lowest 96.9% from 97.2%
    while not walker(kept).is_done and walker(kept).n_steps < 60:
        button(kept, "Step").click().run()
    assert walker(kept).is_done and walker(kept).record.lowest_accuracy("A") > 0.95
    assert [s.value for s in kept.success] == ["Stopped: goal reached."]
    assert not any("did not keep the function" in w.value for w in kept.warning)


def test_missing_dataset_folder_is_reported_and_keeps_the_walk(tmp_path):
    at = start()
    kept = walker(at)
    at.selectbox(key="dataset").set_value("mnist").run()
    at.text_input(key="data_root").set_value(str(tmp_path / "none")).run()
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept
    assert any("does not exist" in e.value for e in at.error)
    at.text_input(key="data_root").set_value("").run()  # none given: the field says what it needs, by its label
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept
    assert any("Data folder: got ''; allowed: the folder holding mnist's torchvision files (MNIST/raw/ inside it)"
               in w.value for w in [*at.error, *at.warning]), [w.value for w in [*at.error, *at.warning]]


def test_mnist_then_fashion_is_refused_by_its_fields_until_it_can_start(fashion_root):
    at = start({"goal": "new-task"})
    kept = walker(at)
    at.selectbox(key="new_task").set_value("mnist-fashion").run()  # on the default digits
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept
    assert any("Protocol: got 'mnist-fashion'; allowed: permuted, split or split-heads on digits: mnist-fashion "
               "starts from MNIST" in e.value for e in at.error), [e.value for e in at.error]
    at.selectbox(key="dataset").set_value("mnist-sample").run()  # the data folder is asked for, then given
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept
    assert any("Data folder: got ''; allowed: the folder holding Fashion-MNIST's torchvision files" in e.value
               for e in at.error), [e.value for e in at.error]
    at.text_input(key="data_root").set_value(fashion_root).run()
    button(at, "Start a new walk with these settings").click().run()
    assert not at.exception and walker(at) is not kept
    assert walker(at).network.n_classes == 20 and set(walker(at).record[0].accuracy) == {"A", "B"}
    assert any("protocol mnist-fashion (class-incremental, one head of 20)" in c.value for c in at.caption)
    button(at, "Step").click().run()
    assert not at.exception and walker(at).n_steps == 1


def test_url_reproduces_the_setup_and_teach_mode_hides_controls():
    at = start({"goal": "connect", "eps": "0.05", "seed": "1", "teach": "1"})
    w = walker(at)
    assert w.goal.name == "connect" and w.config.max_step_norm == 0.05 and at.session_state["seed"] == 1
    assert not any(b.label == "Start a new walk with these settings" for b in at.button)
    assert at.query_params["goal"] == ["connect"] or at.query_params["goal"] == "connect"
    # Moving to another page and back clears a link's parameters (Streamlit does): teach mode stays, and the link
    # names this walk again (it named the default walk, and the controls came back)
    for key in list(at.query_params):
        del at.query_params[key]
    at.run()
    assert not any(b.label == "Start a new walk with these settings" for b in at.button)
    assert walker(at) is w
    assert {k: at.query_params[k] for k in ("goal", "eps", "seed", "teach")} in (
        {"goal": "connect", "eps": "0.05", "seed": "1", "teach": "1"},
        {"goal": ["connect"], "eps": ["0.05"], "seed": ["1"], "teach": ["1"]})


@pytest.mark.parametrize("query,fragments", [
    ({"goal": "bogus", "eps": "abc"}, ["goal='bogus' is not one of sparsify, new-task, connect; sparsify used",
                                       "eps='abc' is not a number"]),
    ({"goal": "connect", "solver": "nope"}, ["solver='nope' is not one of constrained, penalty; constrained used"]),
    ({"dataset": "zzz", "probe": "1.5"}, ["dataset='zzz' is not one of", "probe='1.5' is not a whole number"]),
    # the sidebar offers only the MLP for flat data: the walk was an MLP's, without a word
    ({"model": "vgg11"}, ["model='vgg11' needs images, and digits is flat; mlp used (for vgg11: dataset=digits-"]),
])
def test_a_link_with_bad_settings_says_which_and_walks_with_the_defaults(query, fragments):
    at = start(query)
    warnings = [w.value for w in at.warning]
    assert all(any(f in w for w in warnings) for f in fragments), warnings
    goal = query["goal"] if query.get("goal") in ("sparsify", "new-task", "connect") else "sparsify"
    assert walker(at).goal.name == goal and at.session_state["goal"] == goal
    assert walker(at).config.solver == "constrained" and at.session_state["solver"] == "constrained"
    button(at, "Step").click().run()
    assert [w.value for w in at.warning] == warnings  # still there after the page ran again
    button(at, "Start a new walk with these settings").click().run()
    button(at, "Go on without saving").click().run()  # (a step not saved: asked first)
    assert not at.warning  # gone once the user starts a walk of their own


def test_a_link_whose_numbers_the_engine_refuses_names_the_field():
    at = start({"eps": "-1"})
    assert any("Step size ε: got -1.0" in e.value for e in at.error), [e.value for e in at.error]


def test_a_link_with_several_refused_numbers_names_every_one_beside_its_control_at_once():
    """The engine names the first setting it refuses: ε = -1 and sparsity 2 showed the sparsity's message only once
    ε had been put right and Start pressed again."""
    at = start({"eps": "-1", "sparsity": "2"})
    ours = ["Step size ε: got -1.0; allowed: a finite number > 0",
            "Target sparsity: got 2.0; allowed: a number strictly between 0 and 1"]
    beside = [e.value for e in at.sidebar.error]
    assert beside == ours, beside
    (top,) = [e.value for e in at.main.error]
    assert top.startswith("No walk yet: 2 settings in the link are not valid") and all(m in top for m in ours), top
    at.sidebar.number_input(key="step_size").set_value(0.1).run()
    assert [e.value for e in at.sidebar.error] == ours[1:]  # the one put right is no longer marked
    button(at, "Start a new walk with these settings").click().run()
    (top,) = [e.value for e in at.main.error]  # the user's own settings now, not the link's
    assert top.startswith("No walk yet: 1 setting in the sidebar is not valid") and ours[1] in top, top
    at.sidebar.number_input(key="target_sparsity").set_value(0.5).run()
    button(at, "Start a new walk with these settings").click().run()
    assert not at.error and walker(at).goal.target_sparsity == 0.5


PAGES = str(Path(__file__).resolve().parent / "pages_app.py")  # Explore or Runs, by ?page=


def _two_pages() -> AppTest:
    return AppTest.from_file(PAGES, default_timeout=180)


def test_save_reload_compare_rename_and_delete_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    at = _two_pages()
    at.run()
    for _ in range(3):
        button(at, "Step").click().run()
    at.query_params["page"] = "runs"
    at.run()
    assert at.text_input(key="save_name").value == "sparsify-constrained-seed0-step3"
    at.session_state["geodesic"].runner.step_once()  # the walk goes on (as a running one does) while this page shows
    at.run()
    assert at.text_input(key="save_name").value == "sparsify-constrained-seed0-step4"  # (it offered step3 for ever)
    at.text_input(key="save_name").set_value("first").run()
    button(at, "Save").click().run()
    assert (tmp_path / "store" / "first" / "steps.parquet").exists()
    assert (tmp_path / "store" / "first" / "weights" / "trace.npy").exists()
    at.text_input(key="save_name").set_value("../escape").run()
    button(at, "Save").click().run()
    assert any("run name" in e.value for e in at.error) and not (tmp_path / "escape").exists()

    at.query_params["page"] = "explore"
    at.run()
    button(at, "Step").click().run()
    at.query_params["page"] = "runs"
    at.run()
    at.text_input(key="save_name").set_value("second").run()
    button(at, "Save").click().run()
    at.run()
    assert len(at.get("plotly_chart")) == 2  # the two saved runs compared on shared charts
    table = at.dataframe[0].value.set_index("name")  # what each reached, to rank them by
    assert {"end A %", "lowest A %", "sparsity %", "goal reached"} <= set(table.columns)
    assert 50 < table.loc["second", "end A %"] <= 100 and table.loc["second", "goal reached"] == "no"
    assert at.dataframe[0].proto.placeholder == "–"  # a cell with no value (e.g. B of a sparsify run), not "None"

    at.selectbox(key="run_choice").set_value("first").run()
    button(at, "Reload into Explore").click().run()
    state = at.session_state["geodesic"]
    assert state.walker.n_steps == 4 and len(state.walker.trace) == 5
    child = state.walker.branch(1)  # a reloaded run branches from any saved step
    assert child.record.last.step == 1

    at.text_input(key="rename_to").set_value("renamed").run()
    button(at, "Rename").click().run()
    assert (tmp_path / "store" / "renamed").exists() and not (tmp_path / "store" / "first").exists()
    # Said, and the renamed run is still the one chosen and compared (the box fell back to the first run in the
    # list, the comparison lost it, the name stayed typed in, and nothing said the rename had happened)
    assert [m.value for m in at.success] == ["Renamed first to renamed."]
    assert at.selectbox(key="run_choice").value == "renamed" and at.text_input(key="rename_to").value == ""
    assert "renamed" in at.multiselect(key="compare_runs").value and not at.warning
    at.checkbox(key="confirm_delete").check().run()
    button(at, "Delete").click().run()
    assert not (tmp_path / "store" / "renamed").exists()
    assert [m.value for m in at.success] == ["Deleted renamed."] and not at.checkbox(key="confirm_delete").value
    assert not at.exception


def test_a_damaged_run_in_the_store_is_listed_and_refused_and_the_others_still_work(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    at = _two_pages()
    at.run()
    button(at, "Step").click().run()
    at.query_params["page"] = "runs"
    at.run()
    at.text_input(key="save_name").set_value("good").run()
    button(at, "Save").click().run()
    shutil.copytree(tmp_path / "store" / "good", tmp_path / "store" / "damaged")
    (tmp_path / "store" / "damaged" / "config.json").write_text('{"walk": 3}')  # hand-edited
    at.run()
    assert not at.exception, [e.value for e in at.exception]  # the listing used to raise KeyError for everyone
    table = at.dataframe[0].value
    assert table.set_index("name").loc["damaged", "problem"].startswith("unreadable")
    kept = at.session_state["geodesic"].walker
    at.selectbox(key="run_choice").set_value("damaged").run()
    button(at, "Reload into Explore").click().run()
    assert any("damaged: a run file is unreadable" in e.value for e in at.error), [e.value for e in at.error]
    assert at.session_state["geodesic"].walker is kept  # the walk on screen is kept
    at.selectbox(key="run_choice").set_value("good").run()
    button(at, "Reload into Explore").click().run()
    assert at.session_state["geodesic"].walker.n_steps == 1 and not at.exception
    # the reloaded walk's baselines come from the analysis process, as a new walk's do (shown on Explore)
    at.query_params["page"] = "explore"
    assert 0.0 < baselines_when_they_arrive(at)["masked_fine_tune_accuracy"] <= 1.0

    # with a step not saved on screen, a run that cannot be reloaded is said at once: it asked "Close walks not
    # saved?" first, and answered, only said the run was damaged
    store = tmp_path / "store"
    shutil.copytree(store / "good", store / "cut")
    (store / "cut" / "weights" / "last.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{oops")
    button(at, "Step").click().run()
    kept = walker(at)
    at.query_params["page"] = "runs"
    at.run()
    at.selectbox(key="run_choice").set_value("cut").run()
    button(at, "Reload into Explore").click().run()
    assert not _question(at) and walker(at) is kept and kept.n_steps == 2
    assert any("last.safetensors" in e.value for e in at.error), [e.value for e in at.error]
    # a run walked on a GPU reloads on a server without one (it was refused: "device: got 'cuda'"), and says so
    absent = _absent_device()
    if absent is None:
        return
    shutil.copytree(store / "good", store / "from-a-gpu")
    config = json.loads((store / "from-a-gpu" / "config.json").read_text())
    (store / "from-a-gpu" / "config.json").write_text(json.dumps({**config, "device": absent}))
    at.run()
    at.selectbox(key="run_choice").set_value("from-a-gpu").run()
    button(at, "Reload into Explore").click().run()
    assert _question(at)  # it can be reloaded: the walk on screen, not saved, is offered to be closed
    button(at, "Go on without saving").click().run()
    assert walker(at) is not kept and walker(at).n_steps == 1 and not at.error
    assert [w.value for w in at.warning] == [f"from-a-gpu: walked on {absent}, which this machine lacks: it goes on "
                                             "here on cpu."]


def test_a_run_deleted_from_another_page_is_not_acted_on_here(tmp_path, monkeypatch):
    """Two people on the Runs page of one server: one deletes the run the other has chosen; the other's Delete
    (or Rename, Reload) then refuses instead of acting on the run the list falls back to, and the page's
    comparison of saved runs carries on."""
    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    a, b = (_two_pages() for _ in range(2))
    a.run()
    button(a, "Step").click().run()
    a.query_params["page"] = "runs"
    a.run()
    for name in ("kept", "doomed"):
        a.text_input(key="save_name").set_value(name).run()
        button(a, "Save").click().run()
    a.text_input(key="save_name").set_value("kept").run()
    button(a, "Save").click().run()  # a name in use: refused, the saved run untouched
    assert any("exists already" in e.value for e in a.error)
    a.run()
    a.selectbox(key="run_choice").set_value("doomed").run()
    a.checkbox(key="confirm_delete").check().run()
    b.query_params["page"] = "runs"
    b.run()
    b.selectbox(key="run_choice").set_value("doomed").run()
    b.checkbox(key="confirm_delete").check().run()
    button(b, "Delete").click().run()
    assert not (tmp_path / "store" / "doomed").exists() and not b.exception
    button(a, "Delete").click().run()  # a still shows "doomed" chosen; the list now starts with "kept"
    assert any("no longer in the store" in e.value for e in a.error)
    assert (tmp_path / "store" / "kept" / "steps.parquet").exists() and not a.exception
    a.run()
    assert a.multiselect(key="compare_runs").value == ["kept"] and len(a.get("plotly_chart")) == 2


def test_a_running_walk_is_saved_at_one_point_and_runs_on(tmp_path, monkeypatch):
    from geodesic.experiment import build
    from geodesic.store import load_run, restore_walker

    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    at = _two_pages()
    at.query_params["goal"], at.query_params["steps"] = "new-task", "100000"  # a walk with no end
    at.run()
    button(at, "Run").click().run()
    state = at.session_state["geodesic"]
    at.query_params["page"] = "runs"
    at.run()
    t0 = time.monotonic()
    while state.walker.n_steps < 20:  # the engine walks on while the Runs page is open
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    from app.views import runs

    steps_while_saving, real_save = [], runs.save_run

    def watched_save(*args):
        before = state.walker.n_steps
        time.sleep(0.3)  # as a long walk's files take: no step may land meanwhile
        path = real_save(*args)
        steps_while_saving.append(state.walker.n_steps - before)
        return path

    monkeypatch.setattr(runs, "save_run", watched_save)
    at.text_input(key="save_name").set_value("running").run()
    button(at, "Save").click().run()
    assert not at.exception and not at.error and steps_while_saving == [0]
    config, saved, record = load_run(tmp_path / "store" / "running")
    experiment = build(config)
    restore_walker(experiment, tmp_path / "store" / "running", saved, record)  # table, weights, state agree
    assert experiment.walker.n_steps == saved["step"] >= 20
    n = state.walker.n_steps
    t0 = time.monotonic()
    while state.walker.n_steps <= n + 5:  # and it runs on after the save
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    state.runner.pause()


def _question(at: AppTest) -> list[str]:
    return [w.value for w in at.warning if "not saved" in w.value]


def test_closing_a_walk_with_unsaved_steps_asks_first(tmp_path, monkeypatch):
    """A new walk, Reset, a run reloaded and a walk from uploaded weights each close the walks on screen, which live
    in the session only until saved: a click threw a long walk away without a word. They ask now, unless nothing
    on screen is new since it was made, reloaded or saved."""
    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    at = _two_pages()
    at.run()
    button(at, "Start a new walk with these settings").click().run()  # step 0: nothing to lose, nothing asked
    assert not _question(at) and walker(at).n_steps == 0
    for _ in range(3):
        button(at, "Step").click().run()
    first = walker(at)
    button(at, "Start a new walk with these settings").click().run()
    assert _question(at) == ["The walk on screen has 3 steps not saved. A new walk closes it."]
    assert walker(at) is first and first.n_steps == 3  # nothing closed while it asks
    button(at, "Cancel").click().run()
    assert not _question(at) and walker(at) is first
    button(at, "Reset").click().run()
    assert _question(at) == ["The walk on screen has 3 steps not saved. Reset closes it."]
    button(at, "Go on without saving").click().run()
    assert walker(at) is not first and walker(at).n_steps == 0 and not _question(at)
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())

    # a branch and the main walk, both with new steps: "Save and go on" keeps each as a run of its own
    for _ in range(4):
        button(at, "Step").click().run()
    at.number_input(key="branch_at").set_value(2).run()
    button(at, "Branch").click().run()
    button(at, "Step").click().run()
    button(at, "Reset").click().run()
    assert _question(at) == ["2 walks on screen have steps not saved: main (4 steps), branch 1 @ 2 (1 step)."
                             " Reset closes them."]
    button(at, "Save and go on").click().run()
    saved = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert saved == ["sparsify-constrained-seed0-branch-1-at-2-step3", "sparsify-constrained-seed0-step4"]
    assert walker(at).n_steps == 0 and len(at.session_state["geodesic"].branches) == 1
    assert [m.value for m in at.toast] == ["Saved before closing: sparsify-constrained-seed0-step4, "
                                           "sparsify-constrained-seed0-branch-1-at-2-step3 (on the Runs page)."]

    # saved on the Runs page: nothing asked; a step after the save: asked again
    button(at, "Step").click().run()
    at.query_params["page"] = "runs"
    at.run()
    at.text_input(key="save_name").set_value("mine").run()
    button(at, "Save").click().run()
    at.selectbox(key="run_choice").set_value("sparsify-constrained-seed0-step4").run()
    button(at, "Reload into Explore").click().run()
    assert not _question(at) and walker(at).n_steps == 4  # "mine" holds every step: reloaded without a question
    at.run()
    # the name offered for saving is a free one (it offered the reloaded run's own, which Save then refused)
    assert at.text_input(key="save_name").value == "sparsify-constrained-seed0-step4-2"
    at.query_params["page"] = "explore"
    at.run()
    button(at, "Reset").click().run()
    assert not _question(at)  # a reloaded run is in the store as it is: Reset asks nothing
    button(at, "Step").click().run()
    at.query_params["page"] = "runs"
    at.run()
    at.selectbox(key="run_choice").set_value("sparsify-constrained-seed0-step4").run()
    button(at, "Reload into Explore").click().run()
    assert _question(at) == ["The walk on screen has 1 step not saved. Reloading sparsify-constrained-seed0-step4 "
                             "closes it."]
    at.checkbox(key="replace_no_ask_box").check().run()
    button(at, "Go on without saving").click().run()
    assert walker(at).n_steps == 4 and not at.exception
    # "don't ask again": the rest of the session's clicks act at once
    at.query_params["page"] = "explore"
    at.run()
    button(at, "Step").click().run()
    button(at, "Start a new walk with these settings").click().run()
    assert not _question(at) and walker(at).n_steps == 0


def test_a_walk_is_kept_when_saving_it_before_closing_fails(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.write_text("a file where the store's folder should be")
    monkeypatch.setenv("GEODESIC_RUNS", str(store))
    at = start()
    button(at, "Step").click().run()
    first = walker(at)
    button(at, "Start a new walk with these settings").click().run()
    button(at, "Save and go on").click().run()
    assert walker(at) is first and first.n_steps == 1 and not at.exception
    assert any("Not saved, so nothing was closed" in e.value for e in at.error)


def test_pages_saving_before_closing_at_once_each_get_a_run_of_their_own(tmp_path):
    """A class clicking "Save and go on" together saves walks of the same settings and step: the same offered name.
    Each page gets a run of its own (name, name-2, …), every one complete, none written over another."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from app.views.replace import save_under_free_name
    from geodesic.config import RunConfig, TrainConfig, default_walk
    from geodesic.experiment import build
    from geodesic.store import list_runs, save_run
    from geodesic.summary import summarize

    experiment = build(RunConfig(train=TrainConfig(epochs=5), walk=default_walk("sparsify", "constrained")))
    experiment.walker.step()
    summary = summarize(experiment, wall_seconds=0.0)
    barrier = threading.Barrier(8)

    def page(_):
        barrier.wait()  # all eight at once: the same free name seen by several
        return save_under_free_name(lambda n: save_run(experiment, tmp_path, n, summary),
                                    "sparsify-constrained-seed0-step1", tmp_path)

    with ThreadPoolExecutor(8) as pool:
        names = list(pool.map(page, range(8)))  # (an exception in a page is raised here)
    assert len(set(names)) == 8
    assert set(names) == {"sparsify-constrained-seed0-step1", *(f"sparsify-constrained-seed0-step1-{i}"
                                                                 for i in range(2, 9))}
    listed = {r["name"]: r for r in list_runs(tmp_path)}
    assert set(listed) == set(names) and all(r["problem"] == "" and r["steps"] == 1 for r in listed.values())


def test_settings_survive_moving_between_pages(tmp_path, monkeypatch):
    monkeypatch.setenv("GEODESIC_RUNS", str(tmp_path / "store"))
    at = _two_pages()
    at.run()
    at.number_input(key="step_size").set_value(0.123).run()
    at.query_params["page"] = "runs"
    at.run()
    assert at.number_input(key="step_size").value == 0.123  # the sidebar is on every page
    at.query_params["page"] = "explore"
    at.run()
    assert at.number_input(key="step_size").value == 0.123 and not at.exception


def test_a_bad_engine_setting_is_reported_and_the_defaults_used(monkeypatch, capsys):
    from app import session

    monkeypatch.setenv("GEODESIC_TORCH_THREADS", "abc")
    session.engine.cache_clear()
    try:
        assert session.engine() is not None
        assert "GEODESIC_TORCH_THREADS: got 'abc'" in capsys.readouterr().err
        assert "default engine settings" in session.settings_problem()
    finally:
        session.engine.cache_clear()
        session._PROBLEMS.clear()


def _fan_of_step_sizes(values) -> tuple[AppTest, float, object]:
    """(app, the walk's ε, its state) after one Step and a fan launched with values(ε) as the step sizes."""
    at = start()
    button(at, "Step").click().run()
    eps = walker(at).config.max_step_norm
    at.text_input(key="fan_values_step size ε").set_value(values(eps)).run()
    button(at, "Launch the fan").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at, eps, at.session_state["geodesic"]


def test_a_fan_of_step_sizes_walks_side_by_side_and_one_is_kept():
    at, eps, state = _fan_of_step_sizes(lambda eps: f"{eps / 2:g}, {2 * eps:g}")
    assert len(state.fan) == 2 and len(state.branches) == 3
    fan_walkers = [state.branches[i].walker for i, _ in state.fan]
    assert [w.config.max_step_norm for w in fan_walkers] == [eps / 2, 2 * eps]
    t0 = time.monotonic()
    while min(w.n_steps for w in fan_walkers) < 6:  # both walk on the engine at once
        assert time.monotonic() - t0 < 60 and all(h.error is None for _, h in state.fan)
        time.sleep(0.05)
    at.run()
    table = at.dataframe[0].value
    assert list(table["walk"]) == [f"ε={eps / 2:g} @ 1", f"ε={2 * eps:g} @ 1"]
    drawn = at.session_state["_live_chart:acc"]["sources"]
    assert {src["run"] for src in drawn if src} == {0, 1, 2}  # the accuracy chart shows the main walk and the fan
    kept = state.fan[1][0]
    at.selectbox(key="fan_keep").set_value(kept).run()
    button(at, "Keep this one as the walk that steps").click().run()
    assert not at.exception and state.fan == [] and state.active == kept
    assert state.walker.config.max_step_norm == 2 * eps
    n = [w.n_steps for w in fan_walkers]
    time.sleep(0.5)
    assert fan_walkers[0].n_steps == n[0]  # the others stopped; they stay on the charts as branches
    assert len(state.branches) == 3


def test_the_path_view_projects_a_fan_from_step_1_on_a_basis_fitted_on_every_walk():
    at, eps, state = _fan_of_step_sizes(lambda eps: f"{eps / 2:g}, {2 * eps:g}")
    fan_walkers = [state.branches[i].walker for i, _ in state.fan]
    t0 = time.monotonic()
    while min(w.n_steps for w in fan_walkers) < 6:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    button(at, "Stop the fan").click().run()
    at.segmented_control[0].set_value("Path").run()
    assert not at.exception and not any("at least 3 points" in i.value for i in at.info)  # (the main walk has 2)
    n = [len(w.record) for w in fan_walkers]
    assert state.basis.n_fitted == 2 + (n[0] - 2) + (n[1] - 2)  # the common first two points counted once
    assert {src["run"] for src in at.session_state["_live_chart:pca"]["sources"] if src} == {0, 1, 2}


def test_the_fan_offers_its_best_walk_to_keep_never_one_that_lost_the_function():
    at, eps, state = _fan_of_step_sizes(lambda eps: "1000, 0.1")  # 1000: it loses the function and stops
    (wild, _), (calm, calm_handle) = state.fan
    t0 = time.monotonic()
    while not state.branches[wild].walker.is_done or state.branches[calm].walker.n_steps < 20:
        assert time.monotonic() - t0 < 60
        time.sleep(0.05)
    assert calm_handle.error is None  # the wild walk's end (diverged, or a step it could not solve) is its own
    at.run()
    wild_walk = state.branches[wild].walker
    assert wild_walk.record.lowest_accuracy("A") < 0.9, wild_walk.stop_reason
    assert at.selectbox(key="fan_keep").value == calm  # (the first, the wild one, was always offered)
    at.selectbox(key="fan_keep").set_value(wild).run()
    at.run()
    assert at.selectbox(key="fan_keep").value == wild  # the user's own choice stays


def test_a_bad_fan_is_refused_and_the_walk_kept():
    at = start()
    at.text_input(key="fan_values_step size ε").set_value("0.1, abc").run()
    button(at, "Launch the fan").click().run()
    assert any("fan values" in e.value for e in at.error) and len(at.session_state["geodesic"].branches) == 1
    for typo in ("0.1,, 0.2", "0.1, 0.2,"):  # a value left out: it walked a fan of the others without a word
        at.text_input(key="fan_values_step size ε").set_value(typo).run()
        button(at, "Launch the fan").click().run()
        assert any("no empty entries" in e.value for e in at.error), typo
        assert len(at.session_state["geodesic"].branches) == 1 and not at.session_state["geodesic"].fan
    at.text_input(key="fan_values_step size ε").set_value("0.1, -1").run()
    button(at, "Launch the fan").click().run()
    assert len(at.session_state["geodesic"].branches) == 1 and not at.session_state["geodesic"].fan
    # named as the user knows the setting, not by the engine's field (max-step-norm)
    assert any("Step size ε: got -1.0" in e.value for e in at.error), [e.value for e in at.error]

    at.radio(key="fan_kind").set_value("seed").run()
    for seeds in ("nan, 1", "1e30, 2", "1.5, 2"):  # the first two ended in tracebacks
        at.text_input(key="fan_values_seed").set_value(seeds).run()
        button(at, "Launch the fan").click().run()
        assert not at.exception, (seeds, [e.value for e in at.exception])
        assert any("whole numbers from 0 to 2147483647 for seeds" in e.value for e in at.error), seeds
        assert len(at.session_state["geodesic"].branches) == 1 and not at.session_state["geodesic"].fan


def test_a_fan_starts_from_a_chosen_earlier_step():
    at = start()
    for _ in range(3):
        button(at, "Step").click().run()
    main = walker(at)
    at.number_input(key="fan_from_step").set_value(1).run()
    at.text_input(key="fan_values_step size ε").set_value("0.05, 0.1").run()
    button(at, "Launch the fan").click().run()
    assert not at.exception, [e.value for e in at.exception]
    state = at.session_state["geodesic"]
    assert [state.branches[i].label for i, _ in state.fan] == ["ε=0.05 @ 1", "ε=0.1 @ 1"]
    for i, _ in state.fan:  # each fan walk shares the path up to step 1, not the main walk's later steps
        fan_walker = state.branches[i].walker
        assert fan_walker.record[1].step == 1 and fan_walker.record[1].accuracy == main.record[1].accuracy
        assert all(p.event != "" or p.step_size in (0.05, 0.1) for p in fan_walker.record.points[2:])
    button(at, "Stop the fan").click().run()
    at.number_input(key="fan_from_step").set_value(99).run()  # later than the walk: refused, nothing launched
    button(at, "Launch the fan").click().run()
    assert any("fan from step" in e.value for e in at.error) and not state.fan and len(state.branches) == 3


def test_a_fan_from_a_walk_that_stopped_asks_for_an_earlier_step():
    from types import SimpleNamespace

    from app.views.explore import _fan_start
    from geodesic.errors import ConfigError

    done = SimpleNamespace(is_done=True, n_steps=298, stop_reason="goal reached")
    with pytest.raises(ConfigError, match="an earlier step .0 to 297.*goal reached"):
        _fan_start(done, None)
    assert _fan_start(done, 0) == 0 and _fan_start(done, 297.0) == 297
    running = SimpleNamespace(is_done=False, n_steps=40, stop_reason=None)
    assert _fan_start(running, None) == 40
    with pytest.raises(ConfigError):
        _fan_start(running, 41)


@pytest.mark.parametrize("goal", ["new-task", "connect"])
def test_goals_without_sparsity_show_the_lowest_accuracy_instead(goal):
    at = start({"goal": goal})
    for _ in range(3):
        button(at, "Step").click().run()
    lowest = min(p.accuracy["A"] for p in walker(at).record.points)
    assert metric(at, "lowest A so far") == f"{100 * lowest:.1f}%"
    assert not any(m.label == "sparsity" for m in at.metric)
    if goal == "connect":  # one task: the slot beside its accuracy shows the step size in use
        assert metric(at, "step size ε now") == f"{walker(at).step_size:.3g}"
    else:
        assert any(m.label == "accuracy B" for m in at.metric)


def test_conv_models_are_offered_only_for_images_and_walk_on_them():
    flat = start()
    assert list(flat.selectbox(key="model").options) == ["mlp"]
    assert any("need images" in c.value for c in flat.caption)
    at = start({"dataset": "digits-images", "model": "lenet5"})
    assert "lenet5" in at.selectbox(key="model").options
    assert type(walker(at).network.module).__name__ == "LeNet5"
    assert at.toggle(key="guard").value is True and walker(at).config.step_guard > 0  # conv nets' default
    assert any("steps guarded at 0.3%" in c.value for c in at.caption)
    button(at, "Step").click().run()
    assert not at.exception and walker(at).n_steps == 1 and live_charts(at)
    assert "guard" not in at.query_params  # the default needs no word in the link
    at.toggle(key="guard").set_value(False).run()
    button(at, "Start a new walk with these settings").click().run()
    button(at, "Go on without saving").click().run()  # (a step not saved: asked first)
    assert not at.exception and walker(at).config.step_guard == 0
    assert at.query_params["guard"] in ("0", ["0"])  # a link to the unguarded walk says so
    assert start({"dataset": "digits-images", "model": "lenet5", "guard": "0"}).toggle(key="guard").value is False
    assert flat.toggle(key="guard").value is False  # an MLP walk is not guarded by default
    conv_connect = start({"goal": "connect", "dataset": "digits-images", "model": "lenet5"})
    assert conv_connect.toggle(key="guard").value is True and walker(conv_connect).config.step_guard > 0
    assert conv_connect.number_input(key="n_steps").value == 3000 == walker(conv_connect).config.n_steps
    mlp_connect = start({"goal": "connect", "dataset": "digits-images"})  # choosing the model in the sidebar
    assert mlp_connect.number_input(key="n_steps").value == 2000 and mlp_connect.toggle(key="guard").value is False
    mlp_connect.selectbox(key="model").set_value("lenet5").run()
    assert mlp_connect.number_input(key="n_steps").value == 3000 and mlp_connect.toggle(key="guard").value is True


def test_auto_adapts_the_step_and_the_steps_view_shows_epsilon_and_rho():
    at = start()
    at.toggle(key="auto_step").set_value(True).run()
    assert at.number_input(key="step_size").label == "Step size ε (the largest: auto adapts below it)"
    penalty = start({"solver": "penalty", "auto": "1"})  # auto holds λ's growth there, and leaves ε alone
    assert penalty.number_input(key="step_size").label == "Step size ε (auto holds λ's growth instead)"
    assert walker(penalty).trust.adapt_goal_weight
    button(at, "Start a new walk with these settings").click().run()
    assert not at.exception and walker(at).config.adaptive_step and walker(at).trust is not None
    assert at.query_params["auto"] in ("1", ["1"])  # the link keeps it
    for _ in range(3):
        button(at, "Step").click().run()
    assert walker(at).n_steps == 3 and not at.exception
    at.segmented_control[0].set_value("Steps").run()
    names = {trace.get("name", "") for message in live_charts(at).values() if "full" in message
             for trace in message["full"]["data"]}
    assert any(name.endswith(": ε") for name in names) and any(name.endswith(": ρ") for name in names)
    again = start({"auto": "1"})  # a shared link sets the toggle
    assert again.toggle(key="auto_step").value is True


def test_the_fan_compares_auto_with_fixed_step_sizes():
    at, eps, state = _fan_of_step_sizes(lambda eps: f"{eps:g}, auto")
    fixed, auto = (state.branches[i].walker for i, _ in state.fan)
    assert fixed.trust is None and auto.trust is not None and auto.config.max_step_norm == eps
    assert [state.branches[i].label for i, _ in state.fan] == [f"ε={eps:g} @ 1", "ε=auto @ 1"]
    button(at, "Stop the fan").click().run()
    assert not at.exception and state.fan == []
    at.radio(key="fan_kind").set_value("seed").run()  # only step sizes take auto
    at.text_input(key="fan_values_seed").set_value("1, auto").run()
    button(at, "Launch the fan").click().run()
    assert any("numbers separated by commas" in e.value for e in at.error) and state.fan == []


def test_the_baselines_arrive_from_their_process_and_join_the_charts():
    """The page is drawn first; the baselines come from the analysis process (geodesic/worker.py) while the
    page refreshes, and then the accuracy chart shows them."""
    at = start()
    baselines = baselines_when_they_arrive(at)
    assert 0.0 < baselines["masked_fine_tune_accuracy"] <= 1.0
    assert "Computing the baselines" not in " ".join(c.value for c in at.caption)
    drawn = json.dumps(list(live_charts(at).values()))
    assert "masked fine-tuning" in drawn.lower()


def test_a_new_task_walk_is_shown_between_naive_fine_tuning_and_joint_training():
    """method.md §5: always a naive fine-tuning baseline and a joint-training upper bound (it had only the first)."""
    at = start({"goal": "new-task"})
    baselines = baselines_when_they_arrive(at)
    joint, steps = baselines["joint_training"], baselines["joint_training_steps"]
    assert set(joint) == {"A", "B"} and steps == 300  # the walk's most steps per run (naive fine-tuning's too)
    naive_end = baselines["naive_fine_tune"].iloc[-1]
    assert joint["A"] > naive_end["accuracy/A"] + 0.3  # joint keeps task A; naive fine-tuning forgets it
    at.run()
    (tasks,) = [m for m in live_charts(at).values() if "New task: every task" in json.dumps(m)]
    label = (f"joint training on A and B, 300 steps (the upper bound): A {100 * joint['A']:.1f}%, "
             f"B {100 * joint['B']:.1f}%")
    assert label in json.dumps(tasks["full"]["layout"], ensure_ascii=False)


def test_a_run_the_server_refuses_says_why_and_keeps_the_walk():
    """Run at the server's limit: the page says so next to the buttons, the walk stays where it was and can be
    run once a place is free."""
    from geodesic.engine import CapacityError

    at = start()
    handle = at.session_state["geodesic"].runner
    real_run = handle.run

    def refuse():
        raise CapacityError("the server already runs 64 walks (GEODESIC_MAX_WALKS); try again when one stops")

    handle.run = refuse
    button(at, "Run").click().run()
    assert not at.exception
    assert any("GEODESIC_MAX_WALKS" in e.value for e in at.error)
    assert button(at, "Run") is not None and metric(at, "step") == "0" and not handle.is_running
    handle.run = real_run
    button(at, "Run").click().run()
    assert not at.error and (handle.is_running or walker(at).n_steps > 0)
    if handle.is_running:
        button(at, "Pause").click().run()
    assert not handle.is_running


def test_a_long_walk_whose_trace_keeps_some_points_draws_its_path_and_branches(monkeypatch):
    """Past its weights budget a walk keeps every k-th older point (WeightTrace): the Path view projects those,
    the examples heat map and UMAP read those, and a branch from a point let go says which ones it can use."""
    import geodesic.path

    monkeypatch.setattr(geodesic.path, "TRACE_MB", 26_122 * 4 * 64 / 2**20)  # 64 rows of the digits MLP
    at = start({"goal": "new-task"})
    w = walker(at)
    handle = at.session_state["geodesic"].runner
    handle.call(lambda: [w.step() for _ in range(300)])  # on the engine's thread, as a running walk is stepped
    stride = w.trace.stride
    assert stride >= 8 and len(w.trace.kept()) <= 64
    at.segmented_control[0].set_value("Path").run()
    assert not at.exception, [e.value for e in at.exception]
    (pca,) = [m for m in live_charts(at).values() if "full" in m and "PCA" in json.dumps(m["full"]["layout"])]
    path_x = pca["full"]["data"][0]["x"]
    assert len(path_x) == len(range(0, len(w.record), stride))  # every stride-th point
    at.segmented_control[0].set_value("Examples").run()
    assert not at.exception, [e.value for e in at.exception]
    at.segmented_control[0].set_value("Path").run()
    at.number_input(key="branch_at").set_value(stride + 1).run()
    button(at, "Branch").click().run()
    assert any(f"{stride} or {2 * stride}" in e.value for e in at.error), [e.value for e in at.error]
    assert len(at.session_state["geodesic"].branches) == 1  # nothing was added; the walk is kept
    at.number_input(key="branch_at").set_value(2 * stride).run()
    button(at, "Branch").click().run()
    assert len(at.session_state["geodesic"].branches) == 2 and not at.exception


def test_baselines_that_fail_are_reported_for_that_walk_only(monkeypatch):
    from geodesic import worker

    def fails(experiment, should_stop=None):
        raise RuntimeError("no room for the baselines")

    monkeypatch.setattr(worker, "shared_goal_baselines_in_process", fails)
    at = start()
    t0 = time.monotonic()
    while not any("baselines could not be computed" in w.value for w in at.warning):
        assert time.monotonic() - t0 < 60, [w.value for w in at.warning]
        time.sleep(0.2)
        at.run()
    assert not at.exception and walker(at).n_steps == 0  # the walk is unaffected
    monkeypatch.undo()
    button(at, "Start a new walk with these settings").click().run()
    assert not any("baselines could not be computed" in w.value for w in at.warning)  # not the new walk's


@pytest.mark.parametrize("first,then", [("sparsify", "new-task"), ("new-task", "sparsify"), ("new-task", "connect"),
                                        ("connect", "new-task")])
def test_changing_the_goal_in_the_sidebar_starts_that_walk(first, then):
    """The goal's own controls (Target sparsity; Protocol, Memory) are drawn only for their goal, and Streamlit drops
    the state of a widget on a run that does not draw it: a user who chose another goal in the sidebar and clicked
    Start got an AttributeError for the control no longer drawn (found in Chromium; the tests started every goal from
    a link). Choosing the first goal again finds its values as the user left them."""
    at = start({"goal": first})
    if first == "sparsify":
        at.number_input(key="target_sparsity").set_value(0.8).run()
    if first == "new-task":
        at.selectbox(key="new_task").set_value("split-heads").run()
    at.selectbox(key="goal").set_value(then).run()
    assert not at.exception, [e.value for e in at.exception]
    button(at, "Start a new walk with these settings").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert walker(at).goal.name == then
    at.selectbox(key="goal").set_value(first).run()
    button(at, "Start a new walk with these settings").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert walker(at).goal.name == first
    if first == "sparsify":
        assert at.number_input(key="target_sparsity").value == 0.8
    if first == "new-task":
        assert at.selectbox(key="new_task").value == "split-heads"


def test_a_view_s_controls_keep_their_values_while_another_view_or_page_is_shown():
    """A 3-D path, a UMAP's parameters or a spectrum's probe went back to their defaults after a look at another
    view or page (Streamlit drops a control's state on a run that does not draw it)."""
    at = start()
    for _ in range(3):
        button(at, "Step").click().run()
    at.segmented_control[0].set_value("Path").run()
    at.radio(key="pca_dims").set_value(3).run()
    at.number_input(key="umap_nn").set_value(30).run()
    at.segmented_control[0].set_value("Metric").run()
    at.number_input(key="spec_probe").set_value(32).run()
    at.number_input(key="spec_step").set_value(1).run()
    at.query_params["page"] = "runs"  # another page, and back
    at.run()
    at.query_params["page"] = "explore"
    at.run()
    assert at.segmented_control[0].value == "Metric"  # the view on show when the user left, back with them
    at.segmented_control[0].set_value("Path").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="pca_dims").value == 3 and at.number_input(key="umap_nn").value == 30
    at.segmented_control[0].set_value("Metric").run()
    assert at.number_input(key="spec_probe").value == 32 and at.number_input(key="spec_step").value == 1
    assert not at.warning, [w.value for w in at.warning]
