"""python -m geodesic sweep: grid expansion and naming, bad lists, resume, a killed sweep, cells equal to runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from geodesic.cli import _parser, main
from geodesic.errors import ConfigError
from geodesic.sweep import expand

ROOT = Path(__file__).resolve().parents[1]


def _args(*argv):
    return _parser().parse_args(["sweep", "--out", "x", *argv])


def test_every_combination_is_a_cell_named_by_what_varies():
    cells = expand(_args("--goal", "sparsify", "--step-size", "0.05,0.1", "--seed", "0,1,2", "--solver", "penalty"))
    assert len(cells) == 6
    assert cells[0].name == "seed-0_step-size-0.05" and cells[-1].name == "seed-2_step-size-0.1"
    assert len({c.name for c in cells}) == 6
    assert cells[1].settings == {"seed": 1, "step-size": 0.05}
    assert all(c.args.solver == "penalty" and c.args.goal == "sparsify" for c in cells)
    from geodesic.store import check_run_name

    assert all(check_run_name(c.name) == c.name for c in cells)  # the Runs page can open every cell
    many = expand(_args("--goal", "sparsify", "--step-size", "0.05,0.1", "--goal-weight", "0.001,0.003",
                        "--restoring-weight", "0.1,0.3", "--probe-size", "8,16", "--target-sparsity", "0.8,0.9"))
    assert all(len(c.name) <= 80 for c in many) and len({c.name for c in many}) == 32
    (single,) = expand(_args("--goal", "connect"))
    assert single.name == "cell" and single.settings == {}


def test_a_setting_a_walk_ignores_neither_names_nor_splits_its_cells():
    cells = expand(_args("--goal", "sparsify,connect", "--target-sparsity", "0.5,0.9"))
    assert [c.name for c in cells] == ["goal-sparsify_target-sparsity-0.5", "goal-sparsify_target-sparsity-0.9",
                                       "goal-connect"]  # one connect walk (it was walked twice, identically)
    assert cells[-1].settings == {"goal": "connect"}
    mixed = expand(_args("--goal", "sparsify", "--solver", "constrained,penalty", "--restoring-weight", "0.1,0.3"))
    assert [c.name for c in mixed] == ["restoring-weight-0.1_solver-constrained",
                                       "restoring-weight-0.3_solver-constrained", "solver-penalty"]
    with pytest.raises(ConfigError, match="restoring-weight.*one value, unless the sweep has a --solver in "
                                          "constrained"):
        expand(_args("--goal", "sparsify", "--solver", "penalty", "--restoring-weight", "0.1,0.3"))


def test_a_mixed_sweep_s_table_and_report_leave_what_a_goal_lacks_empty(tmp_path):
    out = tmp_path / "mixed"
    assert main(["sweep", "--goal", "sparsify,connect,new-task", "--target-sparsity", "0.5,0.9", "--new-task",
                 "split,permuted", "--n-steps", "2", "--epochs", "5", "--out", str(out), "--quiet"]) == 0
    table = pd.read_parquet(out / "sweep.parquet").set_index("cell")
    assert len(table) == 5 and pd.isna(table.loc["goal-connect", "target-sparsity"])
    # a text setting too: a sparsify cell's protocol is missing, not the text "nan" (it was, and read as a problem)
    assert pd.isna(table.loc["goal-connect", "new-task"]) and table.loc["goal-new-task_new-task-split", "new-task"] == \
        "split"
    report = (out / "sweep.html").read_text()
    assert ">nan<" not in report and "<td>–</td>" in report
    # a new task has no goal of its own: not "False" (it was, beside the Runs page's "–"), and its cells are still
    # points of the accuracy-kept chart (they were left out of it)
    assert table.loc["goal-new-task_new-task-split", "reached_goal"] is None
    assert table.loc["goal-sparsify_target-sparsity-0.5", "reached_goal"] in (True, False)
    kept, _ = json.JSONDecoder().raw_decode(report.split('Plotly.newPlot("kept", ')[1])
    assert sorted(c for trace in kept for c in trace["text"]) == sorted(table.index)
    assert '"dtick": 1' in report  # 2 steps: ticked at whole steps, not 0.5


@pytest.mark.parametrize("argv,flag", [
    (["--step-size", "0.1,abc"], "--step-size"),
    (["--seed", "0,,1"], "--seed"),
    (["--step-size", "0.1,-1"], "--step-size"),  # a list that parses, with a value the walk refuses
    (["--solver", "constrained,sideways"], "--solver"),
    (["--seed", "1,1"], "--seed"),
    (["--goal", "sparsify,bogus"], "--goal"),  # named as typed, not as the config's field (kind)
    (["--dataset", "digits,nope"], "--dataset"),  # (not name)
    (["--probe-size", "16,5000"], "--probe-size"),  # refused once the data is loaded: before any cell is walked
    # a model that never fits the data: the MLP cell was walked first, then the sweep stopped (exit 2) at LeNet-5's
    (["--model", "mlp,lenet5"], "--model"),
    (["--dataset", "digits,moons", "--model", "mlp,lenet5"], "--model"),  # LeNet-5 fits neither dataset
    (["--dataset", "digits,digits-images", "--model", "lenet5"], "--model"),  # nor digits, which is listed
])
def test_a_bad_list_exits_2_with_one_line_naming_it(tmp_path, capsys, argv, flag):
    assert main(["sweep", "--goal", "sparsify", "--out", str(tmp_path / "s"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"geodesic: error: {flag}: got "), err
    assert not (tmp_path / "s" / "cells").exists()  # nothing was walked


def test_a_sweep_out_that_is_a_file_or_a_single_run_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    for out, fragment in (("notes.txt", "a folder; this is a file"), ("run", "this one holds a single run")):
        argv = ["sweep", "--goal", "sparsify", "--step-size", "0.1,0.2", "--out", str(tmp_path / out), "--quiet"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "run" / "cells").exists()


def test_a_sweep_writes_cells_and_a_table_and_a_rerun_skips_finished_cells(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--goal", "sparsify", "--step-size", "0.1,0.2", "--seed", "0,1", "--n-steps", "6",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["cell"]) == sorted(p.name for p in (out / "cells").iterdir()) and len(table) == 4
    assert set(table["step-size"]) == {0.1, 0.2} and set(table["seed"]) == {0, 1} and (table["steps"] == 6).all()
    for cell in table["cell"]:  # each a normal run folder
        for name in ("summary.json", "steps.parquet", "config.json", "weights/final.safetensors"):
            assert (out / "cells" / cell / name).is_file()
    report = (out / "sweep.html").read_text()
    assert all(cell in report for cell in table["cell"]) and "Best cell per goal" in report and "Every cell" in report
    assert report.count("Plotly.newPlot") == 2  # paths, and accuracy kept against steps
    assert "src=\"https://cdn" not in report and len(report) > 1_000_000  # plotly.js embedded: opens offline
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*/summary.json")}
    assert main([*argv[:4], "0.1,0.2,0.4", *argv[5:]]) == 0  # one more step size: only its cells run
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert len(pd.read_parquet(out / "sweep.parquet")) == 6
    # the same folder with another fixed setting: refused, not a table mixing the two sweeps' walks
    capsys.readouterr()
    assert main([*argv[:8], "9", *argv[9:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was walked with walk.n_steps = 6, this command asks 9" in err, err
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_fixed_and_adaptive_step_sizes_share_one_column(tmp_path, capsys):
    """The issue's own example, --step-size 0.05,0.1,auto: numbers and 'auto' in one Parquet column."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--goal", "sparsify", "--step-size", "0.1,auto", "--n-steps", "6", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = pd.read_parquet(out / "sweep.parquet")
    assert sorted(table["step-size"]) == ["0.1", "auto"] and (table["steps"] == 6).all()
    assert (table["stop_reason"] == "step limit (6 steps)").all()  # not an empty reason for a walk cut short
    assert "step-size-auto" in (out / "sweep.html").read_text()
    assert main(argv) == 0 and len(pd.read_parquet(out / "sweep.parquet")) == 2  # a rerun reads it back
    # --resume of the sweep's folder says where its runs are ("config.json is missing" said nothing of the sort)
    assert main(["run", "--resume", str(out)]) == 2
    assert f"is a sweep's folder, not a run: its runs are in {out / 'cells'}/" in capsys.readouterr().err


def test_a_killed_sweep_loses_only_the_cells_in_flight(tmp_path):
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "geodesic", "sweep", "--goal", "sparsify", "--n-steps", "3,2000", "--seed", "0",
            "--out", str(out), "--quiet"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    short = out / "cells" / "n-steps-3" / "summary.json"
    t0 = time.monotonic()
    while not short.is_file():
        assert time.monotonic() - t0 < 120 and proc.poll() is None
        time.sleep(0.05)
    time.sleep(0.5)  # the long cell is in flight
    # a second sweep into the folder while this one walks is refused (both walked the same cells, in turn)
    second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2 and "another geodesic process is walking into this one" in second.stderr, \
        second.stderr[-2000:]
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "cells" / "n-steps-2000" / "summary.json").exists()
    stamp = short.stat().st_mtime_ns
    rerun = subprocess.run([*argv[:7], "3,25", *argv[8:]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert short.stat().st_mtime_ns == stamp  # finished before the kill: kept
    assert json.loads((out / "cells" / "n-steps-25" / "summary.json").read_text())["steps"] == 25


def test_a_cell_walks_the_path_of_the_same_run(tmp_path):
    assert main(["sweep", "--goal", "sparsify", "--seed", "0,1", "--n-steps", "8", "--out", str(tmp_path / "s"),
                 "--quiet"]) == 0
    assert main(["run", "--goal", "sparsify", "--seed", "1", "--n-steps", "8", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    cell = pd.read_parquet(tmp_path / "s" / "cells" / "seed-1" / "steps.parquet")
    run = pd.read_parquet(tmp_path / "r" / "steps.parquet")
    assert list(cell["step"]) == list(run["step"])
    pd.testing.assert_series_equal(cell["accuracy/A"], run["accuracy/A"], atol=3e-3)  # batched: float noise
    pd.testing.assert_series_equal(cell["goal_distance"], run["goal_distance"], rtol=1e-3)


def test_expand_refuses_an_empty_entry():
    with pytest.raises(ConfigError):
        expand(_args("--goal", "sparsify", "--probe-size", "8,"))


def test_the_best_cell_keeps_the_function_then_reached_the_goal_then_kept_the_most_accuracy():
    from geodesic.report import best_cells

    table = pd.DataFrame({"cell": ["a", "b", "c", "d", "e", "f"], "goal": ["sparsify"] * 3 + ["connect"] * 2
                          + ["new-task"], "reached_goal": [True, True, False, True, False, False],
                          "start_accuracy/A": [0.97] * 6, "min_accuracy/A": [0.90, 0.95, 0.99, 0.40, 0.94, 0.5],
                          "end_accuracy/A": [0.96, 0.95, 0.99, 0.45, 0.95, 0.6], "steps": [10, 20, 5, 1, 7, 9]})
    best = best_cells(table).set_index("goal")["cell"].to_dict()
    # sparsify: c kept more but never got there. connect: d got there by losing the function (40% from 97%), e
    # kept it (d was the best cell). new-task: f alone, even though it lost the function
    assert best == {"sparsify": "b", "connect": "e", "new-task": "f"}


def test_the_best_new_task_cell_learned_b_as_well_as_keeping_a():
    """A new task has no goal point: the best cell is the one with the best average over both tasks among those that
    kept A (it was the one that kept A best, which is the walk that learned B least)."""
    from geodesic.report import best_cells

    table = pd.DataFrame({"cell": ["timid", "bold", "reckless"], "goal": ["new-task"] * 3,
                          "reached_goal": [False] * 3, "start_accuracy/A": [0.97] * 3,
                          "min_accuracy/A": [0.97, 0.95, 0.80], "end_accuracy/A": [0.97, 0.95, 0.80],
                          "end_accuracy/B": [0.40, 0.93, 0.98], "steps": [300] * 3})
    assert best_cells(table)["cell"].tolist() == ["bold"]


def test_a_new_task_sweep_says_what_each_cell_learned(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--goal", "new-task", "--new-task", "split,split-heads", "--n-steps", "4", "--epochs", "5",
                 "--out", str(out)]) == 0
    report = (out / "sweep.html").read_text()
    assert "task B dashed" in report and report.count("(task B)") == 2  # one dashed line per cell
    best = sorted(line for line in capsys.readouterr().err.splitlines() if line.startswith("best new-task"))
    assert all(", end B " in line for line in best), best
    # one best cell per protocol: they are two problems (test_a_best_cell_is_chosen_within_each_problem...)
    assert [line.split(":")[0] for line in best] == ["best new-task (new-task split)",
                                                     "best new-task (new-task split-heads)"]
    assert "Best cell per goal and new-task" in report


def test_a_sweep_ends_saying_what_it_walked_where_it_wrote_and_the_best_cell(tmp_path, capsys):
    argv = ["sweep", "--goal", "sparsify", "--step-size", "0.1,0.2", "--n-steps", "3", "--epochs", "5",
            "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"2 cells (2 walked, 0 finished before) -> {tmp_path / 's' / 'sweep.parquet'}" in err
    assert "best sparsify: step-size-0." in err and "3 steps, step limit (3 steps))" in err
    assert main(argv) == 0 and "2 cells (0 walked, 2 finished before)" in capsys.readouterr().err
    assert main([*argv, "--quiet"]) == 0 and capsys.readouterr().err == ""


def test_a_best_cell_is_chosen_within_each_problem_the_sweep_varies():
    """Cells of another protocol, dataset, model or target sparsity walk another problem: the best new-task cell of a
    sweep over split and split-heads was one cell of the two, the easier task-incremental scenario against the
    class-incremental one. Each problem now has its own best cell; a setting that does not apply to a goal (a connect
    cell's target sparsity) makes no group of its own."""
    from geodesic.report import best_cells

    table = pd.DataFrame({"cell": ["s1", "s2", "h1", "h2", "p5", "p9", "c"],
                          "goal": ["new-task"] * 4 + ["sparsify"] * 2 + ["connect"],
                          "new-task": ["split", "split", "split-heads", "split-heads", None, None, None],
                          "target-sparsity": [None] * 4 + [0.5, 0.9, None],
                          "reached_goal": [False] * 4 + [True, True, True], "start_accuracy/A": [0.97] * 7,
                          "min_accuracy/A": [0.90, 0.95, 0.97, 0.96, 0.96, 0.93, 0.95],
                          "end_accuracy/A": [0.90, 0.95, 0.97, 0.96, 0.96, 0.93, 0.95],
                          "end_accuracy/B": [0.5, 0.6, 0.9, 0.97, None, None, None], "steps": [300] * 4 + [50, 90, 70]})
    best = best_cells(table)
    assert sorted(best["cell"]) == ["c", "h2", "p5", "p9", "s2"]



def test_a_sweep_over_datasets_leaves_out_the_pairs_that_cannot_go_together(tmp_path, capsys):
    """--dataset digits,moons --new-task permuted,split: moons has two classes, which cannot be split into two
    tasks. The sweep walks the three cells that can be walked and says which it left out and why; it used to stop
    (exit 2) at the moons/split cell after walking the cells before it."""
    out = tmp_path / "s"
    assert main(["sweep", "--goal", "new-task", "--dataset", "digits,moons", "--new-task", "permuted,split",
                 "--n-steps", "3", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["left out 1 cell whose settings cannot go together: dataset-moons_new-task-split (moons has 2 "
                   "classes: splitting them into two tasks needs at least 4 (two per task))"]
    table = pd.read_parquet(out / "sweep.parquet")
    walked = {"dataset-digits_new-task-permuted", "dataset-digits_new-task-split", "dataset-moons_new-task-permuted"}
    assert set(table["cell"]) == walked and (table["steps"] == 3).all()
    assert {p.name for p in (out / "cells").iterdir()} == walked
    capsys.readouterr()
    assert main(["sweep", "--goal", "new-task", "--dataset", "digits,moons", "--new-task", "permuted,split",
                 "--n-steps", "3", "--epochs", "2", "--out", str(out)]) == 0  # the rerun: all walked, none again
    assert "3 cells (0 walked, 3 finished before)" in capsys.readouterr().err
