"""Sweeps: every combination of a few settings, walked together where they can share a computation.

`python -m geodesic sweep --step-size 0.05,0.1 --seed 0,1,2 --goal sparsify --out DIR` expands the lists into
cells (one walk each), names each cell by the settings that vary (`seed-1_step-size-0.1`), and writes

    DIR/cells/NAME/     a normal run folder (what `run` writes; the dashboard's Runs page opens it)
    DIR/sweep.parquet   one row per finished cell: the settings that vary and the summary's numbers
    DIR/sweep.html      a report: accuracy along the path per cell, the best cell per goal and problem (report.py)

Cells whose walks can share a computation (same model, step rule, probe and batch sizes: batch.batch_key) are
stepped as one WalkBatch. A cell is finished once its summary.json exists: running the same command again skips
finished cells, and a sweep that was killed loses only the cells in flight (they start over).

`--backend ray` sends the cells to a Ray cluster instead, in tasks of compatible cells (sweep_ray.py); the
results come back into the same folders and table.
"""
from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import ConfigError, GeodesicError

BACKENDS = ("local", "ray")


def _step_size(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


_step_size.__name__ = "number or auto"


# Options a sweep takes as comma-separated lists: (flag, attribute of run's arguments, element type).
LISTS = (("goal", "goal", str), ("dataset", "dataset", str), ("model", "model", str), ("solver", "solver", str),
         ("step-size", "step_size", _step_size), ("goal-weight", "goal_weight", float),
         ("goal-weight-growth", "goal_weight_growth", float), ("restoring-weight", "restoring_weight", float),
         ("metric", "metric", str), ("probe-size", "probe_size", int), ("step-guard", "step_guard", float),
         ("batch-size", "batch_size", int),
         ("n-steps", "n_steps", int), ("seed", "seed", int), ("target-sparsity", "target_sparsity", float),
         ("tolerance", "tolerance", float), ("new-task", "new_task", str), ("memory-size", "memory_size", int))


# Settings that only some walks use: a cell whose goal or step rule ignores one is not named or split by it (with
# `--goal sparsify,connect --target-sparsity 0.5,0.9` the connect walk was walked twice, identically).
APPLIES = {"target-sparsity": ("goal", ("sparsify",)), "tolerance": ("goal", ("sparsify", "connect")),
           "new-task": ("goal", ("new-task",)), "memory-size": ("goal", ("new-task",)),
           "restoring-weight": ("solver", ("constrained",)), "goal-weight-growth": ("solver", ("penalty",))}


def _applies(flag: str, cell_args: argparse.Namespace) -> bool:
    if flag not in APPLIES:
        return True
    attr, values = APPLIES[flag]
    return (getattr(cell_args, attr) or "constrained") in values  # (the step rule's default: constrained)


@dataclass
class Cell:
    name: str
    settings: dict  # the settings that vary across the sweep, by flag
    args: argparse.Namespace  # run's arguments for this cell


def parse_list(flag: str, text: str | None, kind: type) -> list:
    """'0.05,0.1' -> [0.05, 0.1]; a bad element raises ConfigError naming the flag."""
    if text is None:
        return [None]
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(t == "" for t in items):
        raise ConfigError(flag, text, "a comma-separated list with no empty entries")
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise ConfigError(flag, text, f"a comma-separated list of {kind.__name__} values") from None
    if len(set(values)) != len(values):
        raise ConfigError(flag, text, "a list without repeated values")
    return values


def expand(args: argparse.Namespace) -> list[Cell]:
    """Every combination of the listed values, as cells named by the settings that vary. Each cell's settings are
    validated (a bad combination raises ConfigError naming the cell's setting)."""
    from .cli import config_from_args

    lists = {flag: (attr, parse_list(flag, getattr(args, attr), kind)) for flag, attr, kind in LISTS}
    varying = [flag for flag, (_, values) in lists.items() if len(values) > 1]
    cells, used = {}, set()
    for combo in itertools.product(*(values for _, values in lists.values())):
        chosen = dict(zip(lists, combo, strict=True))
        cell_args = argparse.Namespace(**vars(args))
        for flag, (attr, _) in lists.items():
            setattr(cell_args, attr, chosen[flag])
        if cell_args.seed is None:
            cell_args.seed = 0
        if cell_args.target_sparsity is None:
            cell_args.target_sparsity = 0.9
        settings = {flag: chosen[flag] for flag in sorted(varying) if _applies(flag, cell_args)}
        used.update(settings)
        name = cell_name(settings)
        config_from_args(cell_args)  # validates: raises ConfigError for a bad value
        cells.setdefault(name, Cell(name, settings, cell_args))  # a walk that ignores a list is walked once
    for flag in varying:
        if flag not in used:  # a list no cell uses: every cell would be the same walk
            attr, values = APPLIES[flag]
            raise ConfigError(flag, getattr(args, lists[flag][0]),
                              f"one value, unless the sweep has a --{attr} in {', '.join(values)} "
                              "(no cell here uses it)")
    return list(cells.values())


def cell_name(settings: dict) -> str:
    """'seed-1_step-size-0.1': a run name the Runs page accepts (store.check_run_name); long ones end in a hash."""
    import hashlib

    from .store import check_run_name

    name = "_".join(f"{flag}-{value:g}" if isinstance(value, float) else f"{flag}-{value}"
                    for flag, value in settings.items()) or "cell"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    if len(name) > 80:
        name = f"{name[:70]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return check_run_name(name)


def is_finished(directory: Path) -> bool:
    return (directory / "summary.json").is_file()


def run_sweep(args: argparse.Namespace) -> int:
    """The sweep command (see the module's docstring). Returns the exit status."""
    if not args.out:
        raise ConfigError("out", None, "a folder to write the sweep to")
    backend = getattr(args, "backend", "local")
    if backend not in BACKENDS:
        raise ConfigError("backend", backend, ", ".join(BACKENDS))
    if backend != "ray":
        for flag in ("ray_address", "ray_num_cpus", "ray_gpus_per_task"):
            if getattr(args, flag, None) is not None:
                raise ConfigError(flag.replace("_", "-"), getattr(args, flag), "only with --backend ray")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("out", str(out), "a folder; this is a file")
    if (out / "config.json").exists():  # a sweep's runs are in its cells/ folder, never at its top
        raise ConfigError("out", str(out), "a sweep's folder (new, or one to resume); this one holds a single run")
    cells = expand(args)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made: OSError now, before any training
    try:
        from .store import walking

        with walking(out):  # a second sweep into this folder is refused: both walked the same cells
            return _sweep_into(out, args, cells, backend)
    except GeodesicError:  # refused (a Ray address, a cell's setting): a folder made for nothing is not left behind
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _sweep_into(out: Path, args: argparse.Namespace, cells: list[Cell], backend: str) -> int:
    _check_finished_cells_match(out, cells)
    todo = [c for c in cells if not is_finished(out / "cells" / c.name)]
    left_out = _leave_out(todo, cells, data_here=backend != "ray")
    if left_out:
        names = {c.name for c, _ in left_out}
        cells, todo = [c for c in cells if c.name not in names], [c for c in todo if c.name not in names]
        print(f"left out {len(left_out)} cell{'s' * (len(left_out) > 1)} whose settings cannot go together: "
              + "; ".join(f"{c.name} ({err})" for c, err in left_out), file=sys.stderr)
    bar = None
    if not args.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", desc="sweep")
    failed: list[str] = []
    on_done = (lambda _cell: bar.update(1)) if bar is not None else None
    try:
        if backend == "ray" and todo:
            from .sweep_ray import run_on_ray

            failed = run_on_ray(args, todo, out, on_done=on_done)
        else:
            walk_cells(todo, out, on_done=on_done)
    finally:
        if bar is not None:
            bar.close()
    table = write_outputs(out, cells)
    if not args.quiet:  # as `run` ends with its numbers: what was walked, where it went, the best cell per problem
        from .report import best_cells, problem_of

        walked = sum(is_finished(out / "cells" / c.name) for c in todo)
        skipped = len(cells) - len(todo)
        print(f"{len(cells)} cells ({walked} walked, {skipped} finished before) -> {out / 'sweep.parquet'}"
              + (f", {out / 'sweep.html'}" if len(table) else ""), file=sys.stderr)
        for _, best in (best_cells(table).iterrows() if len(table) else ()):
            end_b = f", end B {100 * best['end_accuracy/B']:.1f}%" if best["goal"] == "new-task" else ""
            problem = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in problem_of(best).items())
            print(f"best {best['goal']}{f' ({problem})' if problem else ''}: {best['cell']} "
                  f"(lowest A {100 * best['min_accuracy/A']:.1f}%, end A "
                  f"{100 * best['end_accuracy/A']:.1f}%{end_b}, {best['steps']} steps, "
                  f"{'goal reached' if best['reached_goal'] else best['stop_reason']})", file=sys.stderr)
    for message in failed:
        print(f"geodesic: error: {message}", file=sys.stderr)
    return 1 if failed else 0


def _settings(config_dict: dict) -> dict:
    """A cell's settings as a rerun compares them: all but where the data lies (a moved folder is the same data)."""
    import json

    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = value

    walk("", json.loads(json.dumps(config_dict)))  # tuples as lists, as config.json holds them
    flat.pop("data.root", None), flat.pop("data.download", None)
    return flat


def _check_finished_cells_match(out: Path, cells: list[Cell]) -> None:
    """A rerun skips the finished cells: only when they were walked with this command's settings. With another
    (`--epochs 30` where the sweep had 10) the table mixed the two sweeps' walks without a word."""
    import json

    from .cli import config_from_args
    from .config import RunConfig

    for cell in cells:
        folder = out / "cells" / cell.name
        if not is_finished(folder):
            continue
        try:
            saved = _settings(RunConfig.from_dict(json.loads((folder / "config.json").read_text())).to_dict())
        except (OSError, ValueError, TypeError) as err:
            raise ConfigError("out", str(out), f"a sweep folder whose cells can be read; cell {cell.name}'s settings "
                                               f"cannot ({err}): delete that cell's folder to walk it again") from None
        wanted = _settings(config_from_args(cell.args).to_dict())
        differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
        if differ:
            k = differ[0]
            raise ConfigError("out", str(out), f"a new folder, or this sweep's own settings: its cell {cell.name} was "
                                               f"walked with {k} = {saved.get(k)!r}, this command asks "
                                               f"{wanted.get(k)!r}" + (f" (and {len(differ) - 1} more)"
                                                                       if len(differ) > 1 else ""))


def _problems(cells: list[Cell], data_here: bool) -> list[tuple[Cell, GeodesicError]]:
    """What each cell's walk would refuse once its data is loaded, found before any cell is walked (found while
    building, it stopped the sweep with the cells before it half-built): a model that does not take the data's
    inputs, a new-task protocol the dataset cannot give, a probe larger than its inputs. Data that is not here is
    raised (DataError) when the cells will walk here (`data_here`); on Ray, whose workers may hold it, it is not
    checked: the cell's own build will say."""
    from .cli import config_from_args
    from .data import check_protocol, load_dataset, task_pair
    from .errors import DataError
    from .experiment import check_probe
    from .models import check_takes

    datasets, first_tasks, problems = {}, {}, []
    for cell in cells:
        config = config_from_args(cell.args)
        key = (config.data.name, config.data.root)
        if key not in datasets:
            try:
                datasets[key] = load_dataset(config.data)
            except DataError:
                if data_here:
                    raise
                datasets[key] = None
        dataset = datasets[key]
        if dataset is None:
            continue
        try:
            check_takes(config.model.name, dataset.input_shape)
            if config.goal.kind == "new-task":
                check_protocol(dataset.name, dataset.n_classes, config.goal.new_task)
        except GeodesicError as err:
            problems.append((cell, err))
            continue
        task_a = dataset
        if config.goal.kind == "new-task":  # once per protocol and seed: mnist-fashion reads Fashion-MNIST for it
            pair = (*key, config.goal.new_task, config.seed)
            if pair not in first_tasks:
                try:
                    first_tasks[pair] = task_pair(dataset, config.goal.new_task, config.seed, config.data)[0]
                except DataError:  # task B's data not here (Fashion-MNIST)
                    if data_here:
                        raise
                    first_tasks[pair] = None
            task_a = first_tasks[pair]
        if task_a is None:
            continue
        try:
            check_probe(config, task_a)
        except ConfigError as err:
            problems.append((cell, err))
    return problems


def _leave_out(todo: list[Cell], cells: list[Cell], data_here: bool) -> list[tuple[Cell, GeodesicError]]:
    """The cells to leave out of a sweep over datasets, each with why: `--dataset digits,digits-images --model
    mlp,lenet5` walks the three pairs that go together, not LeNet-5 on flat digits. Anything else a cell would
    refuse is raised (ConfigError or DataError, exit 2) before any cell is walked: in a sweep that does not vary
    the dataset, and where every cell of a listed value would be left out (a value that could never be walked)."""
    problems = _problems(todo, data_here)
    if not problems:
        return []
    varying = {flag for cell in cells for flag in cell.settings}
    if "dataset" not in varying:
        raise problems[0][1]
    names = {c.name for c, _ in problems}
    for flag in sorted(varying):
        for cell, err in problems:
            value = cell.settings.get(flag)
            if value is not None and not any(c.settings.get(flag) == value for c in cells if c.name not in names):
                raise err  # e.g. --model mlp,lenet5 with --dataset digits,moons: no cell could walk LeNet-5
    return problems


def walk_cells(cells: list[Cell], out: Path, on_done=None) -> None:
    """Build and walk `cells`, each into its run folder out/cells/NAME (started over if it is there), stepping
    compatible walks as one WalkBatch; on_done(cell) is called as each one finishes. Both backends run this: the
    local one in this process, the Ray one in each task (then into a scratch folder whose files are sent back)."""
    from .batch import WalkBatch, batch_key
    from .cli import config_from_args
    from .experiment import build
    from .store import RunStore
    from .summary import summarize

    live: list[tuple[Cell, object, RunStore, float]] = []
    for cell in cells:
        folder = out / "cells" / cell.name
        if folder.exists():  # a cell that was in flight when the sweep was stopped: start it over
            shutil.rmtree(folder)
        experiment = build(config_from_args(cell.args))
        store = RunStore(folder)
        store.begin(experiment)
        live.append((cell, experiment, store, time.perf_counter()))

    def finish(item) -> None:
        cell, experiment, store, t0 = item
        summary = summarize(experiment, wall_seconds=time.perf_counter() - t0)
        store.finish(experiment, {**summary, "sweep_cell": cell.name, "sweep_settings": cell.settings})
        if on_done is not None:
            on_done(cell)

    batches: dict[tuple, WalkBatch] = {}
    while live:
        groups: dict[object, list] = {}
        for item in live:
            key = batch_key(item[1].walker)
            groups.setdefault(("alone", id(item)) if key is None else key, []).append(item)
        for group in groups.values():
            walkers = [item[1].walker for item in group]
            if len(group) == 1:
                try:
                    results = [walkers[0].step()]
                except GeodesicError as err:
                    results = [err]
            else:
                ids = tuple(id(w) for w in walkers)
                if ids not in batches:
                    batches.clear()
                    batches[ids] = WalkBatch(walkers)
                results = batches[ids].step()
            for item, result in zip(group, results, strict=True):
                cell, experiment, store, _ = item
                walker = experiment.walker
                if isinstance(result, GeodesicError) and not walker.is_done:
                    walker.is_done, walker.stop_reason = True, str(result)
                store.after_step(experiment)
        still = []
        for item in live:
            walker = item[1].walker
            if walker.is_done or walker.n_steps >= walker.config.n_steps:
                finish(item)
            else:
                still.append(item)
        live = still


def write_outputs(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """sweep.parquet, sweep.json and sweep.html from the finished cells' folders (whichever backend walked them);
    returns the table."""
    from .path import write_json

    out.mkdir(parents=True, exist_ok=True)
    table = sweep_table(out, cells)
    tmp = out / "sweep.parquet.tmp"
    table.to_parquet(tmp, index=False)
    tmp.replace(out / "sweep.parquet")
    write_json(out / "sweep.json", {"cells": [c.name for c in cells], "varying": _varying(cells)})
    if len(table):
        from .path import PathRecord
        from .report import write_sweep_report

        paths = {name: PathRecord.load(out / "cells" / name / "steps.parquet").to_frame() for name in table["cell"]}
        write_sweep_report(out, table, paths)
    return table


def _varying(cells: list[Cell]) -> list[str]:
    """The settings that vary across the sweep (a cell lists those its walk uses)."""
    return sorted({flag for cell in cells for flag in cell.settings})


def sweep_table(out: Path, cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: its name, the settings that vary, and the summary's numbers."""
    import json

    rows = []
    for cell in cells:
        path = out / "cells" / cell.name / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        row = {"cell": cell.name, **cell.settings, "goal": s["goal"], "steps": s["steps"],
               # a new task has no goal of its own to reach: None, as the Runs page and the benchmark have it
               "reached_goal": s["reached_goal"] if s["goal"] != "new-task" else None,
               "stop_reason": s["stop_reason"], "wall_seconds": s["wall_seconds"],
               "end_sparsity": s["end"]["sparsity"]}
        for task, value in s["start"]["test_accuracy"].items():
            row[f"start_accuracy/{task}"] = value
        for task, value in s["end"]["test_accuracy"].items():
            row[f"end_accuracy/{task}"] = value
        for task, value in s["min_test_accuracy"].items():
            row[f"min_accuracy/{task}"] = value
        for key in ("error_barrier", "linear_error_barrier"):
            if key in s:
                row[key] = s[key]
        rows.append(row)
    table = pd.DataFrame(rows)
    for name in _varying(cells):
        if name not in table:
            continue
        # a setting a cell's goal does not use (a sparsify cell's --new-task) stays missing, not the text "nan"
        missing = table[name].map(lambda v: not isinstance(v, str) and pd.isna(v))
        if table[name][~missing].map(type).nunique() > 1:  # e.g. --step-size 0.05,0.1,auto: one column, one type
            table[name] = table[name].map(lambda v: v if isinstance(v, str) else format(v, "g"))
        if table[name].dtype == object:
            table[name] = table[name].where(~missing, None)
    return table
