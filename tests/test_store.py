"""The run store under faults: kill -9 mid-walk, truncated files, export, resume, OOM and NaN."""
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from geodesic.config import GoalConfig, RunConfig, TrainConfig, default_walk
from geodesic.errors import CheckpointError, OutOfMemory
from geodesic.experiment import build
from geodesic.store import RunStore, delete_run, export_zip, load_run, rename_run

ROOT = Path(__file__).resolve().parents[1]


def test_killed_run_stays_readable_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ}
    proc = subprocess.Popen([sys.executable, "-m", "geodesic", "run", "--goal", "sparsify", "--out", str(out),
                             "--epochs", "10", "--n-steps", "100000", "--tolerance", "1e-9", "--quiet"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        state = out / "state.json"
        if state.exists() and json.loads(state.read_text())["step"] >= 20:
            break
        time.sleep(0.2)
    # while it walks, the run is its own: a --resume of it is refused (the two processes wrote the same files in
    # turn, and the run ended as a mix of both walks), and so are deleting and renaming it from the store
    second = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out), "--n-steps", "3",
                             "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another geodesic process is walking into this one" in second.stderr, \
        second.stderr
    for refused in (lambda: delete_run(tmp_path, "run"), lambda: rename_run(tmp_path, "run", "moved")):
        with pytest.raises(CheckpointError, match="is being walked now"):
            refused()
    assert proc.poll() is None and out.is_dir()
    os.kill(proc.pid, signal.SIGKILL)  # mid-walk, possibly mid-write (and the folder is free again)
    proc.wait()
    config, state, record = load_run(out)  # every file is still a complete, readable version
    assert state["step"] >= 20 and len(pd.read_parquet(out / "steps.parquet")) >= 1
    again = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out), "--n-steps", "3",
                            "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    table = pd.read_parquet(out / "steps.parquet")
    assert table["step"].tolist() == list(range(state["step"] + 4))
    # --n-steps 3 walked 3 more, and that is where it stops now: resumed again, it does not walk 100,000 more
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    done = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and f"stopped at its step limit (step {state['step'] + 3})" in done.stderr, \
        done.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files


def _absent_device() -> str | None:
    return next((d for d, here in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available()))
                 if not here), None)


def test_a_run_walked_on_a_device_this_machine_lacks_goes_on_here_and_says_so(tmp_path):
    """A run walked on a GPU was refused on a machine without one (the app's Runs page, and --resume, which took no
    --device): 'device: got cuda; allowed: auto or cpu', with no way on but editing its config.json."""
    absent = _absent_device()
    if absent is None:
        pytest.skip("CUDA and MPS are both here")
    from geodesic import reload_run  # (the Python API's)

    out = tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "geodesic", "run", "--goal", "sparsify", "--out", str(out),
                           "--epochs", "10", "--n-steps", "3", "--quiet"], cwd=ROOT, timeout=300).returncode == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "device": absent}))  # as the GPU machine saved it
    experiment, note = reload_run(out)
    assert experiment.device.type == "cpu" and experiment.walker.n_steps == 3
    assert note == f"walked on {absent}, which this machine lacks: it goes on here on cpu"
    again = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out), "--n-steps", "2",
                            "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{out} was walked on {absent}, which this machine lacks: it goes on here on cpu" in again.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    # asked for by name, the device is used, and one not here is refused as a new run's would be
    (out / "config.json").write_text(json.dumps({**config, "device": absent}))
    refused = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out), "--n-steps", "2",
                              "--device", absent, "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and f"--device: got '{absent}'" in refused.stderr, refused.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 5
    moved = subprocess.run([sys.executable, "-m", "geodesic", "run", "--resume", str(out), "--n-steps", "2",
                            "--device", "cpu", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert moved.returncode == 0 and "lacks" not in moved.stderr, moved.stderr
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
    assert json.loads((out / "summary.json").read_text())["steps"] == 7


def test_an_interrupted_run_resumes_to_its_step_limit_not_past_it(tmp_path, monkeypatch, capsys):
    """A 12-step run stopped at step 5 walks the 7 steps it had left when resumed (it used to walk 12 more, to
    step 17, and say "step limit (12 steps)")."""
    from geodesic import cli

    out = tmp_path / "run"
    after_step = RunStore.after_step

    def interrupted_at_5(self, experiment):
        after_step(self, experiment)
        if experiment.walker.n_steps == 5:
            raise KeyboardInterrupt  # Ctrl-C: the run is saved where it is

    monkeypatch.setattr(RunStore, "after_step", interrupted_at_5)
    argv = ["run", "--goal", "sparsify", "--target-sparsity", "0.99", "--epochs", "10", "--n-steps", "12"]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 130
    assert json.loads((out / "summary.json").read_text())["stop_reason"] == "stopped at step 5 of 12"
    monkeypatch.setattr(RunStore, "after_step", after_step)
    assert cli.main(["run", "--resume", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["stop_reason"] == "step limit (12 steps)"
    assert pd.read_parquet(out / "steps.parquet")["step"].tolist() == list(range(13))
    # the same walk never interrupted ends at the same point: the 7 steps are the ones it would have taken
    whole = tmp_path / "whole"
    assert cli.main([*argv, "--out", str(whole), "--quiet"]) == 0
    for name in ("last.safetensors", "final.safetensors"):
        resumed, straight = (load_file(d / "weights" / name) for d in (out, whole))
        assert all(torch.equal(resumed[k], straight[k]) for k in straight if not k.startswith("state:"))
    # a run saved before state.json said where it stops: its walk's n_steps is the limit
    state = json.loads((out / "state.json").read_text())
    del state["stop_at"]
    (out / "state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert cli.main(["run", "--resume", str(out)]) == 0
    assert "stopped at its step limit (step 12); --n-steps K walks K more" in capsys.readouterr().err
    assert cli.main(["run", "--resume", str(out), "--n-steps", "0"]) == 2
    assert "--n-steps: got 0" in capsys.readouterr().err


def test_truncated_table_is_a_clear_error(tmp_path):
    experiment = build(RunConfig(train=TrainConfig(epochs=5), walk=default_walk("sparsify", "constrained", n_steps=2)))
    store = RunStore(tmp_path / "run")
    store.begin(experiment)
    data = (tmp_path / "run" / "steps.parquet").read_bytes()
    (tmp_path / "run" / "steps.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_run(tmp_path / "run")
    (tmp_path / "run" / "state.json").unlink()
    with pytest.raises(CheckpointError, match="state.json is missing"):
        load_run(tmp_path / "run")


def test_export_holds_settings_table_and_weights_loadable_by_plain_torch(tmp_path):
    experiment = build(RunConfig(train=TrainConfig(epochs=5), walk=default_walk("sparsify", "constrained", n_steps=2)))
    for _ in experiment.walker.run(2):
        pass
    store = RunStore(tmp_path / "run")
    store.begin(experiment)
    store.finish(experiment, {"steps": 2})
    archive = zipfile.ZipFile(io.BytesIO(export_zip(tmp_path / "run")))
    names = set(archive.namelist())
    assert {"run/config.json", "run/steps.parquet", "run/weights/final.safetensors", "run/weights/final.pt"} <= names
    weights = torch.load(io.BytesIO(archive.read("run/weights/final.pt")), weights_only=True)
    assert all(torch.equal(weights[k], experiment.walker.params[k]) for k in experiment.walker.params)


def test_out_of_memory_keeps_the_walk_and_suggests_a_smaller_probe(monkeypatch):
    experiment = build(RunConfig(goal=GoalConfig(kind="sparsify"), train=TrainConfig(epochs=5),
                                 walk=default_walk("sparsify", "constrained", n_steps=5)))
    walker = experiment.walker
    walker.step()
    before = {k: v.clone() for k, v in walker.params.items()}

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setitem(__import__("geodesic.walker", fromlist=["STEP_RULES"]).STEP_RULES, "constrained", boom)
    with pytest.raises(OutOfMemory, match="smaller --probe-size"):
        walker.step()
    assert len(walker.record) == 2 and not walker.is_done
    assert all(torch.equal(before[k], walker.params[k]) for k in before)


def test_the_table_of_a_growing_record_is_built_from_new_points_only_and_matches_a_rebuild():
    import dataclasses
    import threading

    import pandas as pd

    from geodesic.path import PathPoint, PathRecord

    base = PathPoint(step=0, step_size=0.1, goal_weight=1.0, step_norm=0.0, functional_step=0.0,
                     euclidean_length=0.0, functional_length=0.0, drift=0.0, alignment=0.0, loss={"A": 1.0},
                     accuracy={"A": 0.9}, sparsity=0.0, goal_distance=3.0, step_seconds=0.0, event="start")
    record = PathRecord([base])
    first = record.to_frame()
    first["scratch"] = 1  # a caller's change does not reach the record's table
    stop, seen = threading.Event(), []

    def reader():
        while not stop.is_set():
            seen.append(len(record.to_frame()))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 400):  # the engine appends while a page reads
        extra = {"prune_now_accuracy/A": 0.5} if i >= 200 else {}  # a column that appears later
        record.append(dataclasses.replace(base, step=i, drift=i * 1e-3, extra=extra, event=""))
    stop.set()
    thread.join()
    expected = pd.DataFrame([p.to_row() for p in record.points])
    pd.testing.assert_frame_equal(record.to_frame(), expected)
    assert "scratch" not in record.to_frame()
    assert seen == sorted(seen) and seen[-1] <= 400  # each read saw a prefix of the path, growing


def test_the_lowest_accuracy_so_far_follows_a_growing_record_read_while_it_grows():
    import dataclasses
    import random
    import threading

    from geodesic.path import PathPoint, PathRecord

    base = PathPoint(step=0, step_size=0.1, goal_weight=1.0, step_norm=0.0, functional_step=0.0,
                     euclidean_length=0.0, functional_length=0.0, drift=0.0, alignment=0.0, loss={"A": 1.0},
                     accuracy={"A": 0.9}, sparsity=0.0, goal_distance=3.0, step_seconds=0.0, event="start")
    record, rng = PathRecord([base]), random.Random(0)
    stop, seen = threading.Event(), []

    def reader():  # a page's refreshes while the engine appends
        while not stop.is_set():
            seen.append(record.lowest_accuracy("A"))

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(1, 500):
        record.append(dataclasses.replace(base, step=i, accuracy={"A": rng.uniform(0.5, 1.0)}, event=""))
    stop.set()
    thread.join()
    assert record.lowest_accuracy("A") == min(p.accuracy["A"] for p in record.points) < 0.9
    assert seen == sorted(seen, reverse=True)  # each read saw a prefix: the lowest only falls


def test_the_shared_store_under_people_acting_at_once(tmp_path):
    """Several pages saving under one name, renaming and deleting one run at once: one wins each time, the others
    get a clear error, and no run is ever mixed from two walks."""
    import threading

    from geodesic.checkpoint import read_tensors
    from geodesic.store import delete_run, list_runs, rename_run, save_run
    from geodesic.summary import summarize

    experiments = []
    for seed in range(4):  # four different walks (different start networks)
        experiment = build(RunConfig(goal=GoalConfig(kind="sparsify"), seed=seed,
                                     walk=default_walk("sparsify", "constrained", n_steps=5)))
        for _ in range(seed + 1):
            experiment.walker.step()
        experiments.append(experiment)
    root = tmp_path / "store"

    def at_once(fn, args_list):
        barrier, outcomes = threading.Barrier(len(args_list)), []

        def one(args):
            barrier.wait()
            try:
                outcomes.append(("ok", fn(*args)))
            except CheckpointError as err:
                outcomes.append(("error", str(err)))

        threads = [threading.Thread(target=one, args=(a,)) for a in args_list]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return outcomes

    saved = at_once(save_run, [(e, root, "shared", summarize(e, 0.0)) for e in experiments])
    assert [kind for kind, _ in saved].count("ok") == 1
    assert all("exists already" in text for kind, text in saved if kind == "error")
    config, state, record = load_run(root / "shared")
    winner = experiments[config.seed]  # the saved settings, table and weights all come from the same walk
    assert state["step"] == winner.walker.n_steps == len(record) - 1
    start = read_tensors(root / "shared" / "weights" / "start.safetensors")
    assert all(torch.equal(start[k], winner.start[k]) for k in winner.start)
    assert [r["name"] for r in list_runs(root)] == ["shared"]  # no half-saved folder is listed
    assert sorted(p.name for p in root.iterdir()) == ["shared"]  # and none is left behind

    renamed = at_once(rename_run, [(root, "shared", f"new-{i}") for i in range(4)])
    assert [kind for kind, _ in renamed].count("ok") == 1
    assert all("no longer in the store" in text for kind, text in renamed if kind == "error")
    (name,) = [r["name"] for r in list_runs(root)]
    deleted = at_once(delete_run, [(root, name)] * 4)
    assert [kind for kind, _ in deleted].count("ok") == 1 and list(root.iterdir()) == []


def test_saving_into_a_store_that_cannot_be_written_is_a_clear_error(tmp_path):
    from geodesic.store import save_run
    from geodesic.summary import summarize

    experiment = build(RunConfig(goal=GoalConfig(kind="sparsify"), walk=default_walk("sparsify", "constrained")))
    root = tmp_path / "store"
    root.write_text("a file where the store's folder should be")
    with pytest.raises(CheckpointError, match="could not be saved"):
        save_run(experiment, root, "mine", summarize(experiment, 0.0))
    assert root.read_text().startswith("a file")  # nothing the user had is lost


def test_a_saved_run_keeps_the_weights_its_path_kept_and_an_older_save_still_loads(tmp_path, monkeypatch):
    """A long path keeps some points' weights only (WeightTrace): a save stores those with their indices, and a
    reload branches from them exactly. A run saved before (every point's row, no index file) still loads."""
    import numpy as np

    import geodesic.path
    from geodesic.params import flatten
    from geodesic.store import reload_run, save_run
    from geodesic.summary import summarize

    monkeypatch.setattr(geodesic.path, "TRACE_MB", 26_122 * 4 * 64 / 2**20)  # 64 rows of the digits MLP
    config = RunConfig(goal=GoalConfig(kind="new-task"), walk=default_walk("new-task", "constrained", n_steps=300))
    experiment = build(config)
    for _ in experiment.walker.run():
        pass
    walker = experiment.walker
    kept = walker.trace.kept()
    assert len(kept) <= 64 < len(walker.record)
    save_run(experiment, tmp_path, "long", summarize(experiment, wall_seconds=0.0))

    def reload():
        return reload_run(tmp_path / "long")[0].walker

    loaded = reload()
    assert loaded.trace.kept() == kept and loaded.trace.stride == walker.trace.stride
    old = kept[1]
    torch.testing.assert_close(flatten(loaded.branch(old).params), torch.as_tensor(walker.trace.row(old)))
    # the format before: every point's row in trace.npy, no index
    weights = tmp_path / "long" / "weights"
    (weights / "trace_index.npy").unlink()
    dense = np.stack([walker.trace.row(kept[-1])] * len(walker.record))
    dense[old] = walker.trace.row(old)
    np.save(weights / "trace.npy", dense)
    loaded = reload()
    assert len(loaded.trace) == len(walker.record) and len(loaded.trace.kept()) <= 64  # thinned to the budget
    torch.testing.assert_close(flatten(loaded.params_at(old)), torch.as_tensor(walker.trace.row(old)))


def test_damaged_runs_in_the_shared_store_are_listed_with_their_problem_and_refused_clearly(tmp_path):
    """One damaged or hand-edited folder must not break the store's listing for everyone, nor vanish unexplained;
    loading it is a CheckpointError naming the file, and a damaged trace still lets the walk load."""
    import shutil

    from geodesic.checkpoint import read_tensors
    from geodesic.store import list_runs, reload_run, restore_walker, save_run
    from geodesic.summary import summarize

    config = RunConfig(goal=GoalConfig(kind="sparsify"), walk=default_walk("sparsify", "constrained", n_steps=3),
                       train=TrainConfig(epochs=2))
    experiment = build(config)
    for _ in experiment.walker.run():
        pass
    save_run(experiment, tmp_path, "good", summarize(experiment, wall_seconds=0.0))
    for name in ("bad-config", "bad-state", "bad-state-fields", "bad-trace"):
        shutil.copytree(tmp_path / "good", tmp_path / name)
    (tmp_path / "bad-config" / "config.json").write_text('{"goal": {"kind": "bogus"}}')
    (tmp_path / "bad-state" / "state.json").write_text('{"step": ')
    state = json.loads((tmp_path / "good" / "state.json").read_text())
    (tmp_path / "bad-state-fields" / "state.json").write_text(json.dumps({**state, "walk": {"max_step_norm": -1}}))
    trace = tmp_path / "bad-trace" / "weights" / "trace.npy"
    trace.write_bytes(trace.read_bytes()[:100])
    (tmp_path / "stray").mkdir()

    listed = {r["name"]: r for r in list_runs(tmp_path)}
    assert set(listed) == {"good", "bad-config", "bad-state", "bad-state-fields", "bad-trace", "stray"}
    assert listed["good"]["problem"] == "" and listed["good"]["steps"] == 3
    summary = json.loads((tmp_path / "good" / "summary.json").read_text())  # what it reached, to rank runs by
    assert listed["good"]["end_accuracy_a"] == summary["end"]["test_accuracy"]["A"] > 0.5
    assert listed["good"]["lowest_accuracy_a"] == summary["min_test_accuracy"]["A"]
    assert listed["good"]["reached_goal"] is False and listed["good"]["end_accuracy_b"] is None  # 3 steps only
    assert listed["stray"]["end_accuracy_a"] is None  # no summary: nothing claimed
    assert listed["bad-config"]["problem"] == ("unreadable: ConfigError: goal: got 'bogus'; allowed: sparsify, "
                                               "new-task, connect")
    assert listed["bad-state"]["problem"].startswith("unreadable: a JSON file is damaged")
    assert listed["stray"]["problem"] == "not a saved run: config.json is missing"

    with pytest.raises(CheckpointError, match="bad-config: a run file is unreadable"):
        load_run(tmp_path / "bad-config")
    with pytest.raises(CheckpointError, match="bad-state: a run file is unreadable"):
        load_run(tmp_path / "bad-state")

    directory = tmp_path / "bad-state-fields"
    config_, state_, record = load_run(directory)
    again = build(config_, start_tensors=read_tensors(directory / "weights" / "start.safetensors"))
    before = {k: v.clone() for k, v in again.walker.params.items()}
    with pytest.raises(CheckpointError, match="bad-state-fields: state.json is damaged .*max-step-norm"):
        restore_walker(again, directory, state_, record)
    assert all(torch.equal(before[k], v) for k, v in again.walker.params.items())  # nothing half-restored
    with pytest.raises(CheckpointError, match="bad-state-fields: state.json is damaged"):
        reload_run(directory)
    again, left_out = reload_run(tmp_path / "bad-trace")
    assert again.walker.n_steps == 3 and "trace.npy) could not be read" in left_out
    assert reload_run(tmp_path / "good")[1] is None
