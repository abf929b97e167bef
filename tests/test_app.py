"""The dashboard under Streamlit's AppTest: starts, steps, runs and pauses, renders every view, records
ε changes, keeps sessions apart, and answers bad settings next to the control keeping the walk."""
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


def button(at: AppTest, label: str):
    return next(b for b in at.button if b.label == label)


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def walker(at: AppTest):
    return at.session_state["geodesic"].walker


@pytest.fixture(scope="module")
def app():
    return start()


def test_app_starts_on_the_default_walk(app):
    assert metric(app, "step") == "0"
    assert walker(app).goal.name == "sparsify"
    assert len(app.get("plotly_chart")) >= 2  # accuracy/loss and sparsity charts on the first paint


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
    assert runner.advance(5, max_seconds=30) == 5  # what each live refresh does
    button(app, "Pause").click().run()
    assert not runner.is_running
    n = len(walker(app).record)
    time.sleep(0.5)
    assert len(walker(app).record) == n  # paused means no more steps
    assert any(b.label == "Run" for b in app.button)


@pytest.mark.parametrize("view", ["Overview", "Path", "Steps", "Examples", "Metric", "Data"])
def test_every_view_renders(app, view):
    button(app, "Step").click().run()
    app.segmented_control[0].set_value(view).run()
    assert not app.exception, [e.value for e in app.exception]
    if view in ("Overview", "Path", "Steps", "Examples"):
        assert app.get("plotly_chart")
    if view == "Metric":
        button(app, "Compute the spectrum at the current point").click().run()
        assert app.get("plotly_chart") and not app.exception
    if view == "Data":
        assert len(app.get("download_button")) == 4


def test_changing_step_size_mid_walk_is_recorded(app):
    app.segmented_control[0].set_value("Overview").run()
    app.number_input(key="eps_now").set_value(0.05).run()
    button(app, "Apply to this walk").click().run()
    button(app, "Step").click().run()
    last = walker(app).record.last
    assert last.step_size == 0.05 and last.event.startswith("step size")
    assert not app.exception


def test_branching_keeps_both_walks_on_the_charts(app):
    w = walker(app)
    n = w.n_steps
    app.number_input(key="branch_at").set_value(1).run()
    button(app, "Branch").click().run()
    state = app.session_state["geodesic"]
    assert len(state.branches) == 2 and state.walker.n_steps == 1
    assert state.branches[0].walker.n_steps == n
    button(app, "Step").click().run()
    assert state.walker.record.last.event == "branched from step 1"


@pytest.mark.parametrize("goal", ["new-task", "connect"])
def test_each_goal_renders(goal):
    at = start({"goal": goal})
    assert walker(at).goal.name == goal
    button(at, "Step").click().run()
    assert not at.exception and at.get("plotly_chart")


def test_toy_data_shows_the_decision_boundary():
    at = start({"dataset": "moons"})
    at.segmented_control[0].set_value("Boundary").run()
    assert not at.exception and at.get("plotly_chart")


def test_two_sessions_are_independent():
    a, b = start(), start()
    button(a, "Step").click().run()
    button(a, "Step").click().run()
    assert walker(a).n_steps == 2 and walker(b).n_steps == 0
    assert walker(a) is not walker(b)


@pytest.mark.parametrize("key,value,fragment", [
    ("step_size", 0.0, "max-step-norm: got 0.0"),
    ("step_size", -1.0, "max-step-norm: got -1.0"),
    ("target_sparsity", 1.5, "target-sparsity: got 1.5"),
    ("probe_size", 0, "probe-size: got 0"),
])
def test_bad_settings_show_a_message_and_keep_the_walk(key, value, fragment):
    at = start()
    button(at, "Step").click().run()
    kept = walker(at)
    at.number_input(key=key).set_value(value).run()
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept and kept.n_steps == 1
    assert any(fragment in e.value for e in at.error), [e.value for e in at.error]


def test_missing_dataset_folder_is_reported_and_keeps_the_walk(tmp_path):
    at = start()
    kept = walker(at)
    at.selectbox(key="dataset").set_value("mnist").run()
    at.text_input(key="data_root").set_value(str(tmp_path / "none")).run()
    button(at, "Start a new walk with these settings").click().run()
    assert walker(at) is kept
    assert any("does not exist" in e.value for e in at.error)


def test_url_reproduces_the_setup_and_teach_mode_hides_controls():
    at = start({"goal": "connect", "eps": "0.05", "seed": "1", "teach": "1"})
    w = walker(at)
    assert w.goal.name == "connect" and w.config.max_step_norm == 0.05 and at.session_state["seed"] == 1
    assert not any(b.label == "Start a new walk with these settings" for b in at.button)
    assert at.query_params["goal"] == ["connect"] or at.query_params["goal"] == "connect"
