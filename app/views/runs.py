"""Runs: save the walk on screen to the shared store, reload, rename, delete, and compare saved runs.

Runs are named folders under the store ($GEODESIC_RUNS, default ./runs); the page only offers names it
lists itself, so no URL or text box ever points the server at an arbitrary path.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import streamlit as st

from app import charts, session
from geodesic.checkpoint import read_tensors
from geodesic.errors import GeodesicError
from geodesic.experiment import build
from geodesic.path import PathRecord
from geodesic.store import (
    RunStore,
    check_run_name,
    export_zip,
    list_runs,
    load_run,
    load_trace,
    restore_walker,
    save_trace,
)
from geodesic.summary import summarize

MAX_UPLOAD_MB = 64


def store_root() -> Path:
    return Path(os.environ.get("GEODESIC_RUNS", "runs"))


def _save(s, name: str) -> None:
    directory = store_root() / check_run_name(name)
    experiment = s.experiment
    walker = s.walker
    if walker is not experiment.walker:  # saving a branch: store that walker's path
        experiment = dataclasses.replace(experiment, walker=walker)
    store = RunStore(directory)
    store.begin(experiment)
    store.finish(experiment, summarize(experiment, wall_seconds=0.0))
    save_trace(experiment, directory)


def _reload(name: str) -> None:
    directory = store_root() / check_run_name(name)
    config, state, record = load_run(directory)
    experiment = build(config, start_tensors=read_tensors(directory / "weights" / "start.safetensors"),
                       start_source=f"{name}/weights/start.safetensors")
    restore_walker(experiment, directory, state, record)
    load_trace(experiment, directory)
    from geodesic.analysis import goal_baselines

    session.install(experiment, goal_baselines(experiment))


def _upload(s, uploaded) -> None:
    """Start a new walk, with the sidebar's settings, from uploaded weights (never run as code)."""
    from app import controls

    if uploaded.size > MAX_UPLOAD_MB * 2**20:
        raise GeodesicError(f"{uploaded.name}: {uploaded.size / 2**20:.0f} MB is over the {MAX_UPLOAD_MB} MB limit")
    config = controls.config_from_widgets()
    suffix = ".safetensors" if uploaded.name.endswith(".safetensors") else ".pt"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(uploaded.getvalue())
        tensors = read_tensors(path)
    experiment = build(config, start_tensors=tensors, start_source=uploaded.name)
    from geodesic.analysis import goal_baselines

    session.install(experiment, goal_baselines(experiment))


def render() -> None:
    s = session.state()
    st.title("Runs")
    root = store_root()
    st.caption(f"Saved runs live in the shared store `{root}`; anything saved here is visible to everyone "
               "using this server. Walks you don't save stay in your session only.")
    if s.walker is not None:
        c1, c2 = st.columns([3, 1])
        default = f"{s.config.goal.kind}-{s.config.walk.solver}-seed{s.config.seed}-step{s.walker.n_steps}"
        name = c1.text_input("Save the walk on screen as", value=default, key="save_name")
        if c2.button("Save", width="stretch"):
            try:
                _save(s, name)
                st.success(f"Saved as {name}.")
            except GeodesicError as err:
                st.error(str(err))
    with st.expander("Start from your own weights (.safetensors or a PyTorch state dict)"):
        uploaded = st.file_uploader("Weights for the model chosen in the sidebar", type=["safetensors", "pt", "pth"],
                                    key="upload")
        if uploaded is not None and st.button("Start a walk from these weights"):
            try:
                _upload(s, uploaded)
                st.success("Started: open Explore to walk it.")
            except GeodesicError as err:
                st.error(str(err))
    runs = list_runs(root)
    if not runs:
        st.info("No saved runs yet.")
        return
    st.dataframe([{k: v for k, v in r.items() if k != "modified"} for r in runs], width="stretch", hide_index=True)
    names = [r["name"] for r in runs]
    c1, c2, c3 = st.columns(3)
    chosen = c1.selectbox("Run", names, key="run_choice")
    if c1.button("Reload into Explore"):
        try:
            _reload(chosen)
            st.success(f"Reloaded {chosen}: open Explore to continue or branch it.")
        except GeodesicError as err:
            st.error(str(err))
    new_name = c2.text_input("Rename to", key="rename_to")
    if c2.button("Rename") and new_name:
        try:
            target = root / check_run_name(new_name)
            if target.exists():
                st.error(f"A run named {new_name} exists already.")
            else:
                (root / check_run_name(chosen)).rename(target)
                st.rerun()
        except GeodesicError as err:
            st.error(str(err))
    c1.download_button("Export (zip: settings, table, weights)", lambda: export_zip(root / check_run_name(chosen)),
                       f"{chosen}.zip", "application/zip")
    confirm = c3.checkbox("Yes, delete it", key="confirm_delete")
    if c3.button("Delete", disabled=not confirm):
        shutil.rmtree(root / check_run_name(chosen))
        st.rerun()
    compare = st.multiselect("Compare on the same charts", names, default=names[: min(2, len(names))])
    if compare:
        frames = [(n, PathRecord.load(root / check_run_name(n) / "steps.parquet").to_frame()) for n in compare]
        st.plotly_chart(charts.accuracy_and_loss(frames), key="compare_acc")
        st.plotly_chart(charts.step_lengths(frames), key="compare_steps")
