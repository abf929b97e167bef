"""The CLI contract: files written, summary fields, exit status 2 on bad settings, --resume."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def geodesic(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "geodesic", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_sparsify_run_writes_the_contract_files(tmp_path):
    out = tmp_path / "run"
    result = geodesic("run", "--goal", "sparsify", "--dataset", "digits", "--out", str(out), "--epochs", "10",
                      "--target-sparsity", "0.5", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("goal", "dataset", "model", "solver", "steps", "wall_seconds", "start", "end", "min_test_accuracy"):
        assert key in summary
    assert summary["end"]["sparsity"] >= 0.5 and summary["reached_goal"]
    assert set(summary["end"]["test_accuracy"]) == {"A"}
    table = pd.read_parquet(out / "steps.parquet")
    assert len(table) == summary["steps"] + 1 and "accuracy/A" in table and "functional_step" in table
    assert (out / "config.json").exists() and (out / "weights" / "final.safetensors").exists()
    # zeros and non-zeros counted, as the method asks (64·128 + 128·128 + 128·10 weights; biases are not pruned)
    from safetensors.torch import load_file

    weights = load_file(out / "weights" / "final.safetensors")
    prunable = [v for k, v in weights.items() if k.endswith("weight")]
    assert summary["prunable_weights"] == sum(v.numel() for v in prunable) == 64 * 128 + 128 * 128 + 128 * 10
    assert summary["end"]["zero_weights"] == sum(int((v == 0).sum()) for v in prunable)
    assert summary["start"]["zero_weights"] == 0
    # which code and which PyTorch walked it (a run opened months later said neither)
    versions = summary["versions"]
    assert versions["torch"] == torch.__version__ and versions["python"] == ".".join(map(str, sys.version_info[:3]))
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout (CI's fresh clone is one)
        assert versions["commit"].split("+")[0] == head.stdout.strip()


def test_version_prints_one_line_on_stdout_and_exits_0():
    result = geodesic("--version", timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith("geodesic ") and f"torch {torch.__version__}" in line, line


def test_a_sparsify_run_stopped_short_says_what_pruning_there_keeps(tmp_path):
    short = geodesic("run", "--goal", "sparsify", "--epochs", "10", "--n-steps", "3", "--out", str(tmp_path / "s"))
    assert short.returncode == 0
    line = short.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert line.startswith("3 steps (step limit), ") and "sparsity 0.000 (0 of 25,856 weights zero) (not reached; " \
        "pruned now: A=0." in line, line


def test_a_run_that_reaches_its_goal_says_so_and_its_bar_ends_full(tmp_path):
    """The bar ended at "15%| 297/2000" and the last line did not say why the walk stopped there."""
    done = geodesic("run", "--goal", "sparsify", "--target-sparsity", "0.3", "--epochs", "10", "--out",
                    str(tmp_path / "s"))
    assert done.returncode == 0, done.stderr
    lines = done.stderr.replace("\r", "\n").strip().splitlines()
    steps = json.loads((tmp_path / "s" / "summary.json").read_text())["steps"]
    assert steps < 2000 and lines[-1].startswith(f"{steps} steps (goal reached), "), lines[-1]
    assert any("100%" in bar and f"{steps}/{steps}" in bar for bar in lines[-3:-1]), lines[-3:]


def test_connect_summary_has_both_barriers(tmp_path):
    out = tmp_path / "connect"
    result = geodesic("run", "--goal", "connect", "--out", str(out), "--epochs", "10", "--n-steps", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["linear_error_barrier"] > 0 and "error_barrier" in summary


@pytest.mark.parametrize("args,fragment", [
    (["--goal", "sparsify", "--target-sparsity", "1.5"], "target-sparsity: got 1.5"),
    (["--goal", "sparsify", "--step-size", "0"], "--step-size: got 0.0"),
    (["--goal", "sparsify", "--step-size", "-0.1"], "--step-size: got -0.1"),
    (["--goal", "connect", "--probe-size", "0"], "probe-size: got 0"),
    (["--goal", "sparsify", "--probe-size", "5000"], "probe-size: got 5000; allowed: at most 1,437 (the inputs of"),
    (["--goal", "new-task", "--probe-size", "600"], "at most 500 (the inputs of the memory of task A"),
    (["--goal", "sparsify", "--hidden", "12,x"], "hidden: got '12,x'"),
    (["--goal", "sparsify", "--hidden", "12,,12"], "hidden: got '12,,12'"),
    (["--goal", "sparsify", "--hidden", "12,"], "hidden: got '12,'"),
    (["--goal", "teleport"], "invalid choice: 'teleport'"),
    (["--goal", "sparsify", "--dataset", "mnist", "--data-root", "/nonexistent"], "does not exist"),
    (["--goal", "sparsify", "--seed", "-1"], "seed: got -1"),
    (["--goal", "sparsify", "--seed", "99999999999999999999"], "seed: got 99999999999999999999; allowed: a whole"),
    (["--goal", "sparsify", "--init", "/nonexistent.pt"], "no such file"),
    (["--goal", "sparsify", "--init", "NAN_WEIGHTS"], "holds 8,192 NaN or infinite values (of 8,192)"),
    (["--goal", "sparsify", "--goal-weight", "-1"], "goal-weight: got -1.0"),
    (["--goal", "sparsify", "--restoring-weight", "nan"], "restoring-weight: got nan"),
    (["--goal", "sparsify", "--batch-size", "0"], "batch-size: got 0"),
    (["--goal", "sparsify", "--n-steps", "0"], "n-steps: got 0"),
    (["--goal", "sparsify", "--tolerance", "-1"], "tolerance: got -1.0"),
    (["--goal", "sparsify", "--epochs", "0"], "epochs: got 0"),
    (["--goal", "sparsify", "--goal-weight-growth", "5"], "goal-weight-growth: got 5.0"),
    (["--goal", "new-task", "--memory-size", "0"], "memory-size: got 0"),
    (["--goal", "new-task", "--new-task", "rotated"], "invalid choice: 'rotated'"),
    (["--goal", "new-task", "--new-task", "mnist-fashion"], "mnist-fashion protocol starts from MNIST"),
    (["--goal", "new-task", "--new-task", "mnist-fashion", "--dataset", "mnist-sample"],
     "task B is Fashion-MNIST, read from the data folder: fashion-mnist needs a data folder"),
    (["--goal", "sparsify", "--dataset", "moons", "--goal", "new-task", "--new-task", "split"], "needs at least 4"),
    (["--goal", "sparsify", "--device", "cuda"], "device: got 'cuda'"),
    (["--goal", "sparsify", "--model", "vgg11"], "needs images"),
    (["--goal", "sparsify", "--save-every", "-1"], "save-every: got -1"),
    (["--goal", "sparsify", "--step-guard", "1.5"], "step-guard: got 1.5"),
    (["--goal", "sparsify", "--step-size", "abc"], "--step-size: got 'abc'; allowed: a number > 0, or auto"),
    (["--resume", "/nonexistent-run"], "is not a saved run"),
    (["--resume", str(ROOT / "README.md")], "README.md is not a saved run: it is a file, and a run is a folder"),
])
def test_bad_settings_exit_2_with_a_message_and_no_traceback(tmp_path, args, fragment):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is a valid setting here")
    if "NAN_WEIGHTS" in args:  # the default MLP's weights, every one NaN
        from geodesic.config import ModelConfig
        from geodesic.models import build_network

        params = build_network(ModelConfig(), (64,), 10).init_params(0)
        torch.save({k: torch.full_like(v, float("nan")) for k, v in params.items()}, tmp_path / "nan.pt")
        args = [str(tmp_path / "nan.pt") if a == "NAN_WEIGHTS" else a for a in args]
    result = geodesic("run", "--out", str(tmp_path / "x"), "--quiet", *args, timeout=120)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()  # refused: no folder left behind for it


def test_an_error_after_the_progress_bar_started_is_said_on_a_line_of_its_own(tmp_path):
    """Data refused once the bar had started (loading it is a phase of the bar): in a log, where the bar is not
    cleared, the message ran on after the bar's text on one line ("?step/s]\\r   \\rgeodesic: error: ...")."""
    result = subprocess.run([sys.executable, "-m", "geodesic", "run", "--out", str(tmp_path / "x"), "--goal",
                             "new-task", "--new-task", "mnist-fashion", "--dataset", "mnist-sample", "--data-root",
                             str(tmp_path / "none")], cwd=ROOT, capture_output=True, timeout=120)  # bytes: "\r" kept
    assert result.returncode == 2 and b"step/s" in result.stderr  # the bar did start
    last = result.stderr.rstrip(b"\n").split(b"\n")[-1]
    assert last.startswith(b"geodesic: error: the mnist-fashion protocol's task B is Fashion-MNIST"), last


@pytest.mark.parametrize("args,fragment", [
    (["run", "--goal", "sparsify"], "--out: got nothing (it is required); allowed: a folder to write the run to"),
    (["run", "--out", "OUT"], "--goal: got nothing (it is required); allowed: sparsify, new-task, connect"),
])
def test_a_missing_option_is_named_as_missing(tmp_path, args, fragment):
    """It read "--out: got None", the engine's word for nothing, not the user's."""
    result = geodesic(*[str(tmp_path / "x") if a == "OUT" else a for a in args], timeout=120)
    assert result.returncode == 2 and fragment in result.stderr and "None" not in result.stderr


def test_a_new_task_run_names_its_scenario(tmp_path):
    result = geodesic("run", "--goal", "new-task", "--new-task", "split-heads", "--epochs", "10", "--n-steps", "3",
                      "--out", str(tmp_path / "t"))
    assert result.returncode == 0, result.stderr
    line = result.stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert line.startswith("3 steps") and "(split-heads: task-incremental, a head per task)" in line, line
    # the progress bar names the goal's measure: a new task has no point to reach, so no "dist"
    assert "B loss=" in result.stderr and "dist=" not in result.stderr, result.stderr
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["scenario"] == "task-incremental, a head per task"


def test_resume_continues_a_saved_walk(tmp_path):
    out = tmp_path / "run"
    first = geodesic("run", "--goal", "sparsify", "--out", str(out), "--epochs", "10", "--n-steps", "4", "--quiet")
    assert first.returncode == 0, first.stderr
    again = geodesic("run", "--resume", str(out), "--n-steps", "3", "--quiet")
    assert again.returncode == 0, again.stderr
    table = pd.read_parquet(out / "steps.parquet")
    assert table["step"].tolist() == list(range(8))
    assert json.loads((out / "summary.json").read_text())["steps"] == 7
    # a setting the resumed run cannot honour is refused, not silently ignored, and the run is left as it was
    changed = geodesic("run", "--resume", str(out), "--n-steps", "3", "--goal", "connect", "--step-size", "0.5",
                       "--quiet")
    assert changed.returncode == 2 and "--goal: got 'connect'" in changed.stderr
    assert "nothing but --n-steps, --save-every, --device and --quiet with --resume" in changed.stderr
    assert "(also given: --step-size)" in changed.stderr
    assert pd.read_parquet(out / "steps.parquet")["step"].tolist() == list(range(8))
    # a run that reached its goal has nothing to continue: said in one line, its files untouched
    done = tmp_path / "done"
    assert geodesic("run", "--goal", "sparsify", "--target-sparsity", "0.3", "--epochs", "10", "--out", str(done),
                    "--quiet").returncode == 0
    files = {p: p.read_bytes() for p in done.rglob("*") if p.is_file()}
    again = geodesic("run", "--resume", str(done), "--n-steps", "5")
    assert again.returncode == 0 and "stopped at step" in again.stderr and "(goal reached); there is nothing to " \
        "continue" in again.stderr, again.stderr
    assert {p: p.read_bytes() for p in done.rglob("*") if p.is_file()} == files


def test_a_new_run_never_writes_over_a_saved_one_or_a_file(tmp_path):
    out = tmp_path / "run"
    first = geodesic("run", "--goal", "connect", "--out", str(out), "--epochs", "5", "--n-steps", "2", "--quiet")
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / "weights").iterdir()] if p.is_file()}
    again = geodesic("run", "--goal", "sparsify", "--out", str(out), "--n-steps", "2", "--quiet")
    assert again.returncode == 2 and "this one holds a run (continue it with --resume" in again.stderr
    after = {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / "weights").iterdir()] if p.is_file()}
    assert after == before  # it used to become a sparsify run beside the connect run's start weights
    (tmp_path / "notes.txt").write_text("mine")
    for target, fragment in ((tmp_path / "notes.txt", "a folder; this is a file"),
                             (tmp_path, "this one holds other files")):
        refused = geodesic("run", "--goal", "sparsify", "--out", str(target), "--n-steps", "2", "--quiet")
        assert refused.returncode == 2 and fragment in refused.stderr and "Traceback" not in refused.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert geodesic("run", "--goal", "sparsify", "--out", str(tmp_path / "empty"), "--epochs", "5", "--n-steps", "1",
                    "--quiet").returncode == 0
    for command in ("run", "sweep"):  # a folder that cannot be made: one line, before any network is trained
        unwritable = geodesic(command, "--goal", "sparsify", "--out", "/proc/geodesic-test/out", "--epochs", "5",
                              "--n-steps", "1", "--quiet")
        assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr, unwritable.stderr
        assert unwritable.stderr.strip().startswith("geodesic: error: could not write: "), unwritable.stderr


def test_a_walk_that_lost_the_function_is_warned_about_even_quiet(tmp_path):
    lost = geodesic("run", "--goal", "sparsify", "--solver", "penalty", "--step-size", "1000", "--epochs", "10",
                    "--out", str(tmp_path / "lost"), "--quiet")
    assert lost.returncode == 0 and "geodesic: warning: test accuracy A fell to" in lost.stderr, lost.stderr
    kept = geodesic("run", "--goal", "sparsify", "--target-sparsity", "0.3", "--epochs", "10",
                    "--out", str(tmp_path / "kept"), "--quiet")
    assert kept.returncode == 0 and kept.stderr == "", kept.stderr


def test_init_loads_a_state_dict_and_rejects_a_wrong_one(tmp_path):
    import torch

    from geodesic.config import ModelConfig
    from geodesic.models import build_network

    net = build_network(ModelConfig(), (64,), 10)
    good = net.init_params(5)
    torch.save(good, tmp_path / "good.pt")
    bad = dict(good)
    bad["layers.1.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    ok = geodesic("run", "--goal", "sparsify", "--out", str(tmp_path / "a"), "--init", str(tmp_path / "good.pt"),
                  "--n-steps", "2", "--quiet")
    assert ok.returncode == 0, ok.stderr
    refused = geodesic("run", "--goal", "sparsify", "--out", str(tmp_path / "b"), "--init", str(tmp_path / "bad.pt"),
                       "--quiet")
    assert refused.returncode == 2 and "'layers.1.weight' has shape (3, 3)" in refused.stderr


@pytest.mark.parametrize("argv,fragment", [
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--seeds", "-1"], "--seeds: got [-1]; allowed: integers from 0 to 2147483647"),
    (["--seeds", "0", "99999999999999999999"], "--seeds: got [0, 99999999999999999999]; allowed: integers from 0"),
    (["--only", "no such case"], "no case's name contains it"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device: 'cuda' is not available")]))
def test_the_benchmark_refuses_bad_options_at_once_with_one_line(argv, fragment, capsys, tmp_path):
    from geodesic import bench

    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()  # nothing was run or written


def test_the_benchmark_refuses_an_output_it_cannot_write_before_it_walks(capsys, tmp_path):
    """A --json or --markdown path that cannot be written was found after the last walk, losing every figure."""
    from geodesic import bench

    (tmp_path / "notes.txt").write_text("mine")
    for flag, path, fragment in (("--json", tmp_path, "a folder; give a file's path"),
                                 ("--markdown", tmp_path / "notes.txt" / "b.md", "cannot make its folder")):
        other = "--markdown" if flag == "--json" else "--json"
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--only", "digits sparsify 90%", "--seeds", "0", flag, str(path), other,
                        str(tmp_path / "other")])
        err = capsys.readouterr()
        assert exit_.value.code == 2 and f"{flag} {path}: {fragment}" in err.err, err.err
        assert "seed 0" not in err.out  # refused before the first walk
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "other").exists()


def test_a_permuted_task_on_two_features_says_what_it_is(tmp_path):
    """With two features "permuted" can only swap them: on circles task B is task A again, on moons and spirals the
    swapped points fall among the originals with other labels. The run says so; on digits it says nothing."""
    toy = geodesic("run", "--goal", "new-task", "--dataset", "circles", "--n-steps", "2", "--quiet",
                   "--out", str(tmp_path / "circles"))
    assert toy.returncode == 0, toy.stderr
    assert "geodesic: note: With two features, permuted swaps x and y. On circles" in toy.stderr
    digits = geodesic("run", "--goal", "new-task", "--n-steps", "2", "--epochs", "5", "--quiet",
                      "--out", str(tmp_path / "digits"))
    assert digits.returncode == 0 and "note" not in digits.stderr, digits.stderr
