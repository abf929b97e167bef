"""The sweep's Ray backend on a local two-CPU Ray instance: the same folders and table as the local backend."""
import argparse
import json
import socket

import pandas as pd
import pytest

from geodesic.cli import main
from geodesic.errors import ConfigError, GeodesicError
from geodesic.sweep import expand
from geodesic.sweep_ray import check_reachable, plan_tasks, write_cell

SWEEP = ["sweep", "--goal", "sparsify", "--step-size", "0.1,0.2", "--seed", "0,1", "--n-steps", "12", "--quiet"]


def test_ray_and_local_backends_write_the_same_table_and_a_rerun_skips_finished_cells(tmp_path, capsys):
    import ray  # requirements-ray.txt, which `make test` installs
    assert main([*SWEEP, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main([*SWEEP, "--out", str(tmp_path / "ray"), "--backend", "ray", "--ray-num-cpus", "2"]) == 0
    said = capsys.readouterr()
    assert said.out == "" and said.err == ""  # --quiet: nothing, Ray's notice on token authentication neither
    assert not ray.is_initialized()  # the sweep shut down the instance it started
    local = pd.read_parquet(tmp_path / "local" / "sweep.parquet").sort_values("cell").reset_index(drop=True)
    remote = pd.read_parquet(tmp_path / "ray" / "sweep.parquet").sort_values("cell").reset_index(drop=True)
    assert list(remote["cell"]) == list(local["cell"]) and len(remote) == 4
    same = ["steps", "reached_goal", "end_sparsity", "start_accuracy/A"]
    pd.testing.assert_frame_equal(remote[same], local[same])
    # The workers run with one thread each (Ray's default for a one-CPU task): the same walk up to float noise.
    pd.testing.assert_series_equal(remote["end_accuracy/A"], local["end_accuracy/A"], atol=3e-3)
    for cell in remote["cell"]:  # each a normal run folder, as the local backend writes it
        folder = tmp_path / "ray" / "cells" / cell
        for name in ("summary.json", "steps.parquet", "config.json", "state.json", "weights/final.safetensors"):
            assert (folder / name).is_file()
        assert json.loads((folder / "summary.json").read_text())["sweep_cell"] == cell
    assert not list((tmp_path / "ray" / "cells").glob(".incoming-*"))
    assert "Best cell per goal" in (tmp_path / "ray" / "sweep.html").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "cells").glob("*/summary.json")}
    # Everything finished: the rerun starts no Ray instance and rewrites no cell.
    assert main([*SWEEP, "--out", str(tmp_path / "ray"), "--backend", "ray", "--ray-num-cpus", "2"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_tasks_keep_compatible_cells_together_and_fill_the_slots():
    from geodesic.cli import _parser

    args = _parser().parse_args(["sweep", "--out", "x", "--goal", "sparsify", "--step-size", "0.05,0.1,0.2",
                                 "--seed", "0,1", "--solver", "constrained,penalty"])
    cells = expand(args)
    tasks = plan_tasks(cells, slots=4)
    assert sorted(c.name for t in tasks for c in t) == sorted(c.name for c in cells)  # each cell once
    assert all(len({c.args.solver for c in t}) == 1 for t in tasks)  # a task never mixes step rules
    assert len(tasks) == 4
    assert len(plan_tasks(cells, slots=1)) == 2  # one per compatible group at least
    assert len(plan_tasks(cells, slots=100)) == len(cells)  # at most one per cell


def test_a_bad_or_silent_ray_address_is_refused_at_once(capsys, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GeodesicError, match="no Ray head node answers"):
        check_reachable(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(ConfigError):
        check_reachable("nonsense")
    assert main([*SWEEP, "--out", str(tmp_path / "s"), "--backend", "ray", "--ray-address", "nonsense"]) == 2
    assert "--ray-address" in capsys.readouterr().err
    assert main([*SWEEP, "--out", str(tmp_path / "s"), "--ray-address", "127.0.0.1:6379"]) == 2  # needs --backend ray
    assert "only with --backend ray" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_a_worker_cannot_write_outside_its_cell(tmp_path):
    (tmp_path / "cells").mkdir()
    with pytest.raises(GeodesicError, match="outside its folder"):
        write_cell(tmp_path, "a", {"../../evil.txt": b"x"})
    assert not (tmp_path / "evil.txt").exists()
    write_cell(tmp_path, "a", {"summary.json": b"{}", "weights/final.safetensors": b"w"})
    assert (tmp_path / "cells" / "a" / "weights" / "final.safetensors").read_bytes() == b"w"


def test_the_parser_takes_the_ray_options():
    from geodesic.cli import _parser

    args = _parser().parse_args(["sweep", "--out", "x", "--goal", "connect", "--backend", "ray",
                                 "--ray-address", "auto", "--ray-cpus-per-task", "2"])
    assert isinstance(args, argparse.Namespace) and args.backend == "ray" and args.ray_cpus_per_task == 2.0
