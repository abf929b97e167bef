"""Runs: save the walk on screen to the shared store, reload, rename, delete, and compare saved runs.

Runs are named folders under the store ($GEODESIC_RUNS, default ./runs); the page only offers names it
lists itself, so no URL or text box ever points the server at an arbitrary path.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import streamlit as st

from app import charts, controls, session
from app.views import replace
from geodesic import worker
from geodesic.checkpoint import read_tensors
from geodesic.errors import GeodesicError
from geodesic.experiment import build, preflight
from geodesic.path import PathRecord
from geodesic.store import (
    check_run,
    check_run_name,
    delete_run,
    export_zip,
    list_runs,
    reload_run,
    rename_run,
    save_run,
)
from geodesic.summary import summarize

MAX_UPLOAD_MB = 64


def store_root() -> Path:
    return Path(os.environ.get("GEODESIC_RUNS", "runs"))


def save_branch(s, branch, name: str) -> None:
    """Save one walk on screen (the main walk or a branch) as run `name`; the caller makes sure the engine is not
    stepping it. It then counts as saved at the step it was saved at (session.unsaved)."""
    experiment = s.experiment
    if branch.walker is not experiment.walker:  # saving a branch: store that walker's path
        experiment = dataclasses.replace(experiment, walker=branch.walker)
    steps = branch.walker.n_steps
    save_run(experiment, store_root(), name, summarize(experiment, wall_seconds=0.0))
    branch.kept_at = steps


def _save(s, name: str) -> None:
    # A walk still running (the engine steps it while this page is open) is paused for the save, so that its
    # table, weights and state are written at one point; it runs on afterwards.
    was_running = s.runner.is_running
    if was_running:
        s.runner.pause()  # returns once a step under way has landed
    try:
        save_branch(s, s.branches[s.active], name)
    finally:
        if was_running:
            s.runner.run()


def _reload(name: str) -> str | None:
    """Reload a saved run into this session; a sentence on what was left out (a damaged trace), if anything."""
    experiment, left_out = reload_run(store_root() / check_run_name(name), f"{name}/weights/start.safetensors")
    # As Explore does: the baselines are computed in the analysis process and join the charts when ready (the page
    # is not held up, and no fine-tuning runs on this page's thread).
    session.install(experiment, worker.shared_goal_baselines_in_process)
    return left_out


def _read_upload(uploaded, check: bool = False) -> tuple:
    """(the sidebar's settings, the uploaded tensors), read as data (never run as code). check: also what the
    walk's build would refuse before training (weights that do not fit the model, data missing, a device not here),
    asked before the question whether to close the walks on screen, which otherwise led only to the message."""
    if uploaded.size > MAX_UPLOAD_MB * 2**20:
        raise GeodesicError(f"{uploaded.name}: {uploaded.size / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB limit")
    config = controls.config_from_widgets()
    suffix = ".safetensors" if uploaded.name.endswith(".safetensors") else ".pt"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(uploaded.getvalue())
        tensors = read_tensors(path, name=uploaded.name)
    if check:
        preflight(config, start_tensors=tensors, start_source=uploaded.name)
    return config, tensors


def _upload(s, uploaded) -> None:
    """Start a new walk, with the sidebar's settings, from uploaded weights."""
    config, tensors = _read_upload(uploaded)
    experiment = build(config, start_tensors=tensors, start_source=uploaded.name)
    session.install(experiment, worker.shared_goal_baselines_in_process)


def render() -> None:
    s = session.state()
    st.title("Runs")
    root = store_root()
    st.caption(f"Saved runs live in the shared store `{root}`; anything saved here is visible to everyone "
               "using this server. Walks you don't save stay in your session only.")
    if s.walker is not None:
        c1, c2 = st.columns([3, 1])
        # a name no run has yet (the walk reloaded from the store, or saved a moment ago, has the plain one)
        default = replace.free_name(replace.run_name(s, s.branches[s.active]), root)
        controls.offer("save_name", default, s.walker)
        name = c1.text_input("Save the walk on screen as", key="save_name")
        if c2.button("Save", width="stretch"):
            try:
                _save(s, name)
                st.success(f"Saved as {name}.")
            except GeodesicError as err:
                st.error(str(err))
    with st.expander("Start from your own weights (.safetensors or a PyTorch state dict)", key="upload_box"):
        uploaded = st.file_uploader("Weights for the model chosen in the sidebar", type=["safetensors", "pt", "pth"],
                                    key="upload")
        if uploaded is not None:
            st.button("Start a walk from these weights", on_click=replace.request, args=("upload",))
            if replace.requested("upload") and replace.would_ask():
                try:
                    _read_upload(uploaded, check=True)
                except GeodesicError as err:  # said now, not after "Go on without saving"
                    replace.drop("upload")
                    st.error(str(err))
            if replace.go_ahead("upload", "A walk from these weights"):
                try:
                    _upload(s, uploaded)
                    replace.say()
                    st.success("Started: open Explore to walk it.")
                except GeodesicError as err:
                    st.error(str(err))
    runs = list_runs(root)
    if not runs:
        st.info("No saved runs yet.")
        return
    problems = ["problem"] if any(r["problem"] for r in runs) else []  # beside the name, where it is seen
    # a new task's protocol says which scenario its accuracies are of (split and split-heads read alike otherwise)
    protocols = ["protocol"] if any(r["protocol"] for r in runs) else []
    shown_columns = ["name", *problems, "goal", "solver", "dataset", *protocols, "steps"]
    percent = {"end A %": "end_accuracy_a", "lowest A %": "lowest_accuracy_a", "end B %": "end_accuracy_b",
               "sparsity %": "sparsity"}
    if not any(r["end_accuracy_b"] is not None for r in runs):
        percent.pop("end B %")
    rows = [{**{k: r[k] for k in shown_columns},
             **{label: None if r[key] is None else round(100 * r[key], 1) for label, key in percent.items()},
             # words, not True/False: a new-task walk has no goal to reach (–), and a CLI run still going none yet
             "goal reached": {True: "yes", False: "no"}.get(r["reached_goal"])} for r in runs]
    st.dataframe(rows, width="stretch", hide_index=True, placeholder=controls.MISSING,
                 column_config={"problem": st.column_config.TextColumn(width="large"),
                                "goal reached": st.column_config.TextColumn(
                                    help="– for a new-task walk (it has no end of its own) and for a run still going"),
                                **{label: st.column_config.NumberColumn(format="%.1f") for label in percent}})
    names = [r["name"] for r in runs]
    readable = [r["name"] for r in runs if not r["problem"]]
    done = st.session_state.pop("_runs_done", None)  # what the last rename or delete did, said once
    if done is not None:
        message, renamed = done
        st.success(message)
        st.session_state["confirm_delete"] = False  # the run chosen next is not one click from deletion
        if renamed is not None:
            old, new = renamed
            st.session_state["rename_to"] = ""
            if new in names:  # the renamed run stays the one chosen, and stays compared if it was (unless another
                st.session_state["run_choice"] = new  # page has renamed or deleted it since)
                st.session_state["_run_shown"] = new
                compared = [new if n == old else n for n in st.session_state.get("compare_runs", [])]
                st.session_state["compare_runs"] = [n for n in compared if n in names]
    c1, c2, c3 = st.columns(3)
    chosen = c1.selectbox("Run", names, key="run_choice")
    # A run deleted or renamed from another page leaves this box on the first run of the list; an action clicked
    # meanwhile would act on a run the user did not choose: refused instead, and the list shown anew.
    shown, st.session_state["_run_shown"] = st.session_state.get("_run_shown"), chosen
    vanished = shown is not None and shown != chosen and shown not in names
    if vanished and (replace.requested("reload") or any(st.session_state.get(k) for k in ("rename_run",
                                                                                          "delete_run"))):
        replace.drop("reload")
        st.error(f"The run you chose, {shown}, is no longer in the store (deleted or renamed from another page): "
                 "nothing was done. Choose again.")
        return
    c1.button("Reload into Explore", key="reload_run", on_click=replace.request, args=("reload",))
    if replace.requested("reload") and replace.would_ask():
        try:  # a run that cannot be reloaded is said now, not after "Go on without saving"
            check_run(root / check_run_name(chosen), f"{chosen}/weights/start.safetensors")
        except GeodesicError as err:
            replace.drop("reload")
            st.error(str(err))
    if replace.go_ahead("reload", f"Reloading {chosen}"):
        try:
            left_out = _reload(chosen)
            replace.say()
            st.success(f"Reloaded {chosen}: open Explore to continue or branch it.")
            if left_out:
                st.warning(f"{chosen}: {left_out}.")
        except GeodesicError as err:
            st.error(str(err))
    new_name = c2.text_input("Rename to", key="rename_to")
    if c2.button("Rename", key="rename_run") and new_name:
        try:
            rename_run(root, chosen, new_name)
            st.session_state["_runs_done"] = (f"Renamed {chosen} to {new_name}.", (chosen, new_name))
            st.rerun()
        except GeodesicError as err:
            st.error(str(err))
    # (no rerun: see explore._data); a short label: "Export (zip: settings, table, weights)" was cut on a tablet
    c1.download_button("Export (zip)", lambda: export_zip(root / check_run_name(chosen)), f"{chosen}.zip",
                       "application/zip", on_click="ignore",
                       help="The run's settings, per-step table and weights (.safetensors and PyTorch state dicts)")
    confirm = c3.checkbox("Yes, delete it", key="confirm_delete")
    if c3.button("Delete", disabled=not confirm, key="delete_run"):
        try:
            delete_run(root, chosen)
            st.session_state["_runs_done"] = (f"Deleted {chosen}.", None)
            st.rerun()
        except GeodesicError as err:
            st.error(str(err))
    # The store is shared: a run chosen here may be renamed or deleted from another page meanwhile (Streamlit then
    # drops it from this selection), or between the listing above and the reading below.
    compare = st.multiselect("Compare on the same charts", names, default=readable[:2],
                             key="compare_runs")
    frames = []
    for n in compare:
        try:
            frames.append((n, PathRecord.load(root / check_run_name(n) / "steps.parquet").to_frame()))
        except (OSError, ValueError, GeodesicError):
            st.warning(f"{n} could not be read (deleted, renamed or still being written from another page).")
    if frames:
        st.plotly_chart(charts.accuracy_and_loss(frames), key="compare_acc", theme=None)
        st.plotly_chart(charts.step_lengths(frames), key="compare_steps", theme=None)
