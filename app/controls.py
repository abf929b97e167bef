"""Widgets that turn into a RunConfig (and back into a shareable URL). Plain values in, plain values out.

Numbers are not clamped by the widgets: a wrong value reaches the engine's own checks, whose message is
shown next to the control, and the walk on screen is kept.
"""
from __future__ import annotations

import weakref

import streamlit as st

from geodesic.adaptive import holds_goal_weight
from geodesic.config import (
    DEFAULT_STEP_GUARD,
    GOALS,
    NEW_TASKS,
    SCENARIOS,
    SOLVERS,
    WALK_DEFAULTS,
    DataConfig,
    GoalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    default_walk,
)
from geodesic.data import DATASETS, IMAGE_VIEWS, MNIST_NAMES, TORCHVISION_SETS, is_image_data, protocol_caveat
from geodesic.errors import ConfigError
from geodesic.guard import KL_BUDGET
from geodesic.models import MODEL_NAMES

# widget key -> (query parameter, type); the URL reproduces the set-up
URL_FIELDS = {
    "goal": ("goal", str), "dataset": ("dataset", str), "model": ("model", str), "solver": ("solver", str),
    "step_size": ("eps", float), "goal_weight": ("beta", float), "restoring_weight": ("rho", float),
    "probe_size": ("probe", int), "seed": ("seed", int), "device": ("device", str),
    "target_sparsity": ("sparsity", float), "new_task": ("protocol", str), "memory_size": ("memory", int),
    "auto_step": ("auto", int), "guard": ("guard", int), "n_steps": ("steps", int),
}
# engine setting (as ConfigError names it) -> widget key, so a message lands next to its control
SETTING_TO_WIDGET = {"max-step-norm": "step_size", "goal-weight": "goal_weight", "restoring-weight": "restoring_weight",
                     "probe-size": "probe_size", "seed": "seed", "target-sparsity": "target_sparsity",
                     "memory-size": "memory_size", "device": "device", "data": "data_root", "model": "model",
                     "n-steps": "n_steps", "new-task": "new_task"}
DEVICES = ("auto", "cpu", "cuda", "mps")
MISSING = "–"  # a table's cell with no value (a new task's sparsity, a sparsify run's B): Streamlit writes "None"


def _walk_defaults(goal: str, solver: str, model: str = "mlp") -> dict:
    walk = default_walk(goal, solver, model=model)
    return {"step_size": walk.max_step_norm, "goal_weight": walk.goal_weight,
            "restoring_weight": walk.restoring_weight, "probe_size": walk.probe_size, "n_steps": walk.n_steps}


def init_widgets() -> None:
    """Seed widget values once per session: URL parameters first, then the engine's defaults."""
    if st.session_state.get("_widgets_ready"):
        return
    params = st.query_params
    values = {"goal": "sparsify", "dataset": "digits", "model": "mlp", "solver": "constrained", "seed": 0,
              "device": "auto", "target_sparsity": 0.9, "new_task": "permuted", "memory_size": 500, "data_root": "",
              "auto_step": False, "guard": None}
    notes = st.session_state.setdefault("_url_errors", [])
    for key, allowed in (("goal", GOALS), ("solver", SOLVERS)):  # first: they choose the tuned defaults below
        name = URL_FIELDS[key][0]
        if name in params and params[name] in allowed:
            values[key] = params[name]
        elif name in params:
            notes.append(f"URL parameter {name}={params[name]!r} is not one of {', '.join(allowed)}; "
                         f"{values[key]} used")
    kinds = {float: "a number", int: "a whole number", str: "text"}
    given = set()
    for key, (name, cast) in URL_FIELDS.items():
        if name in params and key not in ("goal", "solver"):
            try:
                values[key] = cast(params[name])
                given.add(key)
            except ValueError:
                notes.append(f"URL parameter {name}={params[name]!r} is not {kinds[cast]}; default used")
    choices = {"dataset": DATASETS, "model": MODEL_NAMES, "device": DEVICES, "new_task": NEW_TASKS}
    for key, allowed in choices.items():
        if values[key] not in allowed:
            default = {"dataset": "digits", "model": "mlp", "device": "auto", "new_task": "permuted"}[key]
            notes.append(f"URL parameter {URL_FIELDS[key][0]}={values[key]!r} is not one of {', '.join(allowed)}; "
                         f"{default} used")
            values[key] = default
    if values["model"] != "mlp" and not is_image_data(values["dataset"]):  # the sidebar offers only the MLP there
        notes.append(f"URL parameter model={values['model']!r} needs images, and {values['dataset']} is flat; mlp used "
                     f"(for {values['model']}: dataset={' or '.join(IMAGE_VIEWS)}, or a torchvision set)")
        values["model"] = "mlp"
    # the tuned values of this goal, step rule and model (conv nets: CONV_WALK_DEFAULTS) where the link gave none
    defaults = _walk_defaults(values["goal"], values["solver"], values["model"])
    values.update({k: v for k, v in defaults.items() if k not in given})
    values["auto_step"] = bool(values["auto_step"])
    values["guard"] = _guard_default(values) if values["guard"] is None else bool(values["guard"])
    for key, value in values.items():
        st.session_state[key] = value
    st.session_state["_widgets_ready"] = True


def _guard_default(values) -> bool:
    """Whether the engine guards this goal, step rule and model's steps by default (conv nets' sparsify and
    connect walks)."""
    try:
        return default_walk(values["goal"], values["solver"], model=values["model"]).step_guard > 0
    except ConfigError:
        return False


def _reset_walk_fields() -> None:
    """Goal or step rule changed: load the tuned defaults for the new pair (and the model)."""
    ss = st.session_state
    if (ss.goal, ss.solver) in WALK_DEFAULTS:
        for key, value in _walk_defaults(ss.goal, ss.solver, ss.model).items():
            ss[key] = value
    _reset_guard()


def _reset_model_fields() -> None:
    """Model changed: what conv nets change on top of the tuned defaults (the guard, most steps per run) goes back to
    that set-up's default."""
    ss = st.session_state
    if (ss.goal, ss.solver) in WALK_DEFAULTS:
        ss.n_steps = _walk_defaults(ss.goal, ss.solver, ss.model)["n_steps"]
    _reset_guard()


def _reset_guard() -> None:
    """Goal, step rule or model changed: the step guard goes back to that set-up's default."""
    ss = st.session_state
    ss.guard = _guard_default({"goal": ss.goal, "solver": ss.solver, "model": ss.model})


SIDEBAR_KEYS = ("goal", "dataset", "data_root", "model", "solver", "step_size", "auto_step", "guard", "goal_weight",
                "restoring_weight", "probe_size", "n_steps", "target_sparsity", "new_task", "memory_size", "seed",
                "device")


def keep_values(keys: tuple[str, ...]) -> None:
    """Keep each control's value in `keys` on a run that does not draw it, as Streamlit's widget-behavior guide does
    ("interrupting the widget clean-up process"): call on every run, before the controls are drawn. Streamlit drops
    a widget's state at the end of any run that does not draw it, and the goal's own controls are drawn only for
    their goal: a user who chose another goal and clicked Start got an AttributeError for Target sparsity (and,
    going back, for Protocol), and a value typed before lost. A control kept so takes its default from
    st.session_state.setdefault, not from a value= argument (Streamlit would warn of the two)."""
    ss = st.session_state
    for key in keys:
        if key in ss:
            ss[key] = ss[key]


def _values_behind(key: str) -> object:
    """What an error next to control `key` was about: that control's value, or for a data folder's error (a set
    that is missing, corrupt) and an error of no one control, the whole set-up."""
    if key in SIDEBAR_KEYS and key != "data_root":
        return st.session_state.get(key)
    return tuple(st.session_state.get(k) for k in SIDEBAR_KEYS)


def error_at(key: str, message: str) -> dict[str, tuple[str, object]]:
    """The sidebar's errors (AppState.errors) for a walk refused: shown next to control `key` until its value
    changes (a Device error stayed on screen after the user had chosen cpu, until the next walk started)."""
    return {key: (message, _values_behind(key))}


def errors_for(err: ConfigError) -> dict[str, tuple[str, object]]:
    """error_at for a refused setting: next to its own control, in that control's words. When the sidebar's own
    settings were refused, every one it would refuse is there, each next to its control (the engine names the first
    only: a link with ε = -1 and sparsity 2 showed the second only once the first was put right)."""
    found = sidebar_errors()  # its first is the sidebar's own first refusal, if err is one
    if not found or (found[0].setting, found[0].given) != (err.setting, err.given):
        found = [err]  # refused by the walk's build (a probe larger than the data), not by the sidebar
    errors = {}
    for each in found:
        errors.update(error_at(widget_for(each), message_for(each)))
    return errors


def sidebar_errors() -> list[ConfigError]:
    """Every setting config_from_widgets refuses, found by putting each refused one back to its default in turn."""
    ss = st.session_state
    found, fixed = [], {}
    for _ in SIDEBAR_KEYS:
        try:
            config_from_widgets(fixed)
            return found
        except ConfigError as err:
            key = widget_for(err)
            found.append(err)
            default = _default_of(key, {k: fixed.get(k, ss.get(k)) for k in ("goal", "solver", "model")})
            if key in fixed or default is None:
                return found  # one that no default puts right (a data folder): the rest waits for it
            fixed[key] = default
    return found


def _default_of(key: str, chosen: dict):
    """What a sidebar control holds for a new session with these goal, step rule and model, if it has a default
    that always holds."""
    if key in ("step_size", "goal_weight", "restoring_weight", "probe_size", "n_steps"):
        return _walk_defaults(chosen["goal"], chosen["solver"], chosen["model"])[key]
    return {"seed": 0, "target_sparsity": 0.9, "memory_size": 500, "device": "auto"}.get(key)


def _message(errors: dict[str, tuple[str, object]], key: str) -> None:
    if key in errors and errors[key][1] == _values_behind(key):
        st.error(errors[key][0], icon="⚠️")


def sidebar(errors: dict[str, tuple[str, object]], device_in_use: str | None, on_start) -> None:
    """Draw the set-up controls; on_start is called when the user asks for a new walk with them."""
    ss = st.session_state
    st.header("Set up a walk")
    st.selectbox("Goal", GOALS, key="goal", on_change=_reset_walk_fields,
                 help="sparsify: reach a target sparsity; new-task: learn task B keeping A; "
                      "connect: walk from network A to network B")
    st.selectbox("Dataset", DATASETS, key="dataset")
    # torchvision's sets read their files from it, and so does the mnist-fashion protocol's task B
    if ss.dataset in TORCHVISION_SETS or (ss.goal == "new-task" and ss.get("new_task") == "mnist-fashion"):
        st.text_input("Data folder (torchvision layout)", key="data_root")
    _message(errors, "data_root")
    # Only the models that fit the data: conv models need images (channels, height, width).
    models = MODEL_NAMES if is_image_data(ss.dataset) else ("mlp",)
    if ss.model not in models:
        ss.model = models[0]
        _reset_model_fields()
    st.selectbox("Model", models, key="model", on_change=_reset_model_fields)
    if len(models) == 1:
        st.caption("LeNet-5, VGG and ResNet-18 need images: choose digits-images, mnist-sample-images or a "
                   "torchvision set (MNIST, CIFAR) to use them.")
    _message(errors, "model")
    st.radio("Step rule", SOLVERS, key="solver", horizontal=True, on_change=_reset_walk_fields,
             help="constrained: argmin θᵀgθ − β⟨θ,v⟩ with ‖θ‖ ≤ ε; penalty: the authors' normalised gradient walk")
    # (auto leaves ε alone in the penalty walk to a point: it holds λ's growth there, geodesic/adaptive.py)
    holds_lambda = holds_goal_weight(ss.solver, default_walk(ss.goal, ss.solver).goal_weight_growth)
    st.number_input("Step size ε" + ("" if not ss.auto_step else " (auto holds λ's growth instead)" if holds_lambda
                                     else " (the largest: auto adapts below it)"),
                    key="step_size", format="%.4f", step=0.01)
    st.toggle("auto: adapt ε (and relax ρ) as the walk goes", key="auto_step",
              help="A trust region on the step: ε shrinks when the share of training inputs that keep their class "
                   "falls more than 1.5 points, grows back when it is kept, and the constrained walk's restoring "
                   "pull ρ is relaxed while the goal stalls (geodesic/adaptive.py). The penalty walk to a point, "
                   "whose λ grows every step, holds λ instead where ε would shrink. The ε and ρ of every step are "
                   "on the Steps chart, λ in the Data table.")
    st.toggle("guard: halve steps that lose training examples", key="guard",
              help="A step that lowers the share of training inputs keeping their class by more than "
                   f"{DEFAULT_STEP_GUARD:.1%}, or moves their predicted distributions by more than {KL_BUDGET:g} "
                   "nats (mean KL), is halved (up to 5 times) before it is taken (geodesic/guard.py). On by default "
                   "for conv nets' sparsify and connect walks, whose long steps otherwise dip far below the start's "
                   "accuracy on single steps.")
    _message(errors, "step_size")
    label = "Goal weight β" if ss.solver == "constrained" else "Goal weight λ"
    st.number_input(label, key="goal_weight", format="%.4f", step=0.001)
    _message(errors, "goal_weight")
    if ss.solver == "constrained":
        st.number_input("Restoring weight ρ", key="restoring_weight", format="%.3f", step=0.05)
        _message(errors, "restoring_weight")
    st.number_input("Probe size N", key="probe_size", step=4)
    _message(errors, "probe_size")
    st.number_input("Most steps per run", key="n_steps", step=100,
                    help="Run pauses after this many steps (sooner when the goal is reached); press Run again to go "
                         "on. A new-task walk has no end of its own: this is where its run stops. The same as "
                         "geodesic run --n-steps.")
    _message(errors, "n_steps")
    if ss.goal == "sparsify":
        st.number_input("Target sparsity", key="target_sparsity", format="%.3f", step=0.05)
        _message(errors, "target_sparsity")
    elif ss.goal == "new-task":
        st.selectbox("Protocol", NEW_TASKS, key="new_task",
                     format_func=lambda p: f"{p} ({SCENARIOS[p].split('-')[0]}-IL)",
                     help="permuted: task B permutes every input (domain-incremental); split: classes 0-4 then 5-9 "
                          "with one head, so B's classes compete with A's (class-incremental); split-heads: the same "
                          "classes, each task scored on its own head's outputs, the network told which task an input "
                          "is from (task-incremental); mnist-fashion: MNIST, then Fashion-MNIST's garments as "
                          "classes 10-19 of one head of twenty (dataset mnist-sample or mnist, with Fashion-MNIST's "
                          "files in the data folder)")
        _message(errors, "new_task")
        if caveat := protocol_caveat(ss.dataset, ss.new_task):
            st.caption(caveat)
        st.number_input("Memory of task-A inputs", key="memory_size", step=50)
        _message(errors, "memory_size")
    else:
        st.caption(f"Network B is trained like A from seed {ss.seed + 1 if isinstance(ss.seed, int) else '?'}.")
    st.number_input("Seed", key="seed", step=1)
    _message(errors, "seed")
    st.selectbox("Device", DEVICES, key="device")
    if device_in_use:
        st.caption(f"in use: **{device_in_use}**")
    _message(errors, "device")
    _message(errors, "other")
    st.button("Start a new walk with these settings", type="primary", width="stretch", on_click=on_start)


def config_from_widgets(instead: dict | None = None) -> RunConfig:
    """The RunConfig the widgets describe; raises ConfigError naming the setting. instead: values to read in place
    of some widgets' (sidebar_errors)."""
    ss = _Values(st.session_state, instead or {})
    walk = default_walk(ss.goal, ss.solver, model=ss.model, max_step_norm=ss.step_size, goal_weight=ss.goal_weight,
                        restoring_weight=ss.restoring_weight if ss.solver == "constrained" else None,
                        probe_size=ss.probe_size, n_steps=ss.n_steps, adaptive_step=bool(ss.get("auto_step")) or None,
                        step_guard=DEFAULT_STEP_GUARD if ss.get("guard") else 0.0)
    root = ss.get("data_root") or None
    if ss.goal == "new-task" and ss.new_task == "mnist-fashion":  # refused next to its control, before any training
        if ss.dataset not in MNIST_NAMES:
            raise ConfigError("new-task", ss.new_task, f"permuted, split or split-heads on {ss.dataset}: mnist-fashion "
                                                       f"starts from MNIST (dataset {' or '.join(MNIST_NAMES)})")
        if not root:
            raise ConfigError("data", "", "the folder holding Fashion-MNIST's torchvision files (FashionMNIST/raw/ "
                                          "inside it), which the mnist-fashion protocol's task B reads; none was given")
    if ss.dataset in TORCHVISION_SETS and not root:
        folder = TORCHVISION_SETS[ss.dataset][1]
        raise ConfigError("data", root or "", f"the folder holding {ss.dataset}'s torchvision files ({folder}/ "
                                              "inside it); none was given")
    return RunConfig(goal=GoalConfig(kind=ss.goal, target_sparsity=ss.target_sparsity, new_task=ss.new_task,
                                     memory_size=ss.memory_size),
                     walk=walk, data=DataConfig(name=ss.dataset, root=root), model=ModelConfig(name=ss.model),
                     train=TrainConfig(), seed=ss.seed, device=ss.device)


class _Values:
    """Session state with some widgets' values replaced, read as config_from_widgets reads it."""

    def __init__(self, state, instead: dict):
        self._state, self._instead = state, instead

    def __getattr__(self, key: str):
        return self._instead[key] if key in self._instead else getattr(self._state, key)

    def get(self, key: str, default=None):
        return self._instead[key] if key in self._instead else self._state.get(key, default)


def widget_for(err: ConfigError) -> str:
    return SETTING_TO_WIDGET.get(err.setting, "other")


# What the sidebar calls each setting: a message under "Step size ε" names it so, not as the engine does
# (max-step-norm) or the CLI (--step-size).
WIDGET_LABELS = {"step_size": "Step size ε", "goal_weight": "Goal weight", "restoring_weight": "Restoring weight ρ",
                 "probe_size": "Probe size N", "seed": "Seed", "target_sparsity": "Target sparsity",
                 "memory_size": "Memory of task-A inputs", "device": "Device", "data_root": "Data folder",
                 "model": "Model", "n_steps": "Most steps per run", "new_task": "Protocol"}


def message_for(err: ConfigError) -> str:
    """The error as the sidebar's user reads it: the field's own label, what was given, what is allowed."""
    label = WIDGET_LABELS.get(widget_for(err), err.setting)
    return f"{label}: got {err.given!r}; allowed: {err.allowed}"


def offer(key: str, default, walker, keep=lambda shown: True) -> None:
    """Show `default` in the widget `key` (drawn after this, without a value of its own) until the user types a
    value of their own, and again for another walk (a new one, Reset, another branch) or once theirs no longer fits
    (`keep` is false). A widget's first value is kept for ever otherwise, so the defaults went stale as the walk
    changed: "Branch from step" offered step 1 at step 300, "ε from the next step on" the ε of the walk before a
    Reset, the fan the step sizes of an earlier walk, "Save the walk on screen as" the step count of long ago."""
    offered = st.session_state.setdefault("_offered", {})
    shown = st.session_state.get(key)
    before, for_walk = offered.get(key, (None, None))
    if shown is None or shown == before or for_walk is None or for_walk() is not walker or not keep(shown):
        st.session_state[key] = default
    offered[key] = (default, weakref.ref(walker))  # (a weak reference: a walk the user left is not kept for this)


def teach_mode() -> bool:
    """Whether this session opened a teaching link (?teach=1: the walk's controls hidden). Kept for the session:
    Streamlit clears a link's parameters when the user moves to another page, and a student who looked at Learn
    came back to the full set-up."""
    if st.query_params.get("teach") == "1":
        st.session_state["_teach"] = True
    return bool(st.session_state.get("_teach"))


def write_url(config: RunConfig, teach: bool) -> None:
    """Put the set-up in the URL (never a file path: data folders stay out of links); only when it differs, as
    Explore calls this on every run (a page the user came back to has lost its parameters: Streamlit clears them on
    moving between pages, so the link the user copied named the default walk, not theirs)."""
    wanted = {
        "goal": config.goal.kind, "dataset": config.data.name, "model": config.model.name,
        "solver": config.walk.solver, "eps": f"{config.walk.max_step_norm:g}", "beta": f"{config.walk.goal_weight:g}",
        "rho": f"{config.walk.restoring_weight:g}", "probe": str(config.walk.probe_size),
        "steps": str(config.walk.n_steps), "seed": str(config.seed),
        "device": config.device, "sparsity": f"{config.goal.target_sparsity:g}", "protocol": config.goal.new_task,
        "memory": str(config.goal.memory_size), **({"teach": "1"} if teach else {}),
        **({"auto": "1"} if config.walk.adaptive_step else {}),
        **({"guard": "1" if config.walk.step_guard else "0"}
           if bool(config.walk.step_guard) != _guard_default(
               {"goal": config.goal.kind, "solver": config.walk.solver, "model": config.model.name}) else {}),
    }
    if st.query_params.to_dict() != wanted:
        st.query_params.from_dict(wanted)
