"""The run store: a walk saved as it goes, so nothing but the steps since the last flush can be lost.

    DIR/config.json            the RunConfig the walk was built from
    DIR/state.json             step, stop reason, the walk settings in force (step size may have changed)
    DIR/steps.parquet          the per-step table (readable by pandas at any moment)
    DIR/weights/start.safetensors, last.safetensors (+ generator state), step-NNNNNN.safetensors, final.safetensors
    DIR/summary.json           written when the walk stops

Every file is written to a temporary name and renamed, so a crash or kill -9 mid-write leaves the
previous good version in place. A process walking into DIR holds it (`walking`): a second one is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import time
from pathlib import Path

import torch

from .adaptive import TrustRegion
from .checkpoint import match_params, read_tensors, save_weights
from .config import RunConfig, WalkConfig
from .errors import CheckpointError
from .experiment import Experiment
from .path import PathRecord, WeightTrace, write_json
from .walker import trust_region_for


class RunStore:
    def __init__(self, directory: str | Path, flush_seconds: float = 2.0, save_every: int = 0,
                 stop_at: int | None = None):
        self.directory = Path(directory)
        self.flush_seconds = flush_seconds
        self.save_every = save_every  # also keep the weights of every k-th step (0: none)
        self.stop_at = stop_at  # the step this run walks to (saved: a killed run resumes to it, not past it)
        self._last_flush = 0.0

    @property
    def weights_dir(self) -> Path:
        return self.directory / "weights"

    def begin(self, experiment: Experiment) -> None:
        """Create the folder and write the settings and the start weights."""
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.directory / "config.json", experiment.config.to_dict())
        if not (self.weights_dir / "start.safetensors").exists():
            save_weights(experiment.start, self.weights_dir / "start.safetensors", experiment.buffers)
        self.flush(experiment, force=True)

    def after_step(self, experiment: Experiment) -> None:
        walker = experiment.walker
        if self.save_every and walker.n_steps % self.save_every == 0:
            save_weights(walker.params, self.weights_dir / f"step-{walker.n_steps:06d}.safetensors", walker.buffers)
        self.flush(experiment)

    def flush(self, experiment: Experiment, force: bool = False) -> None:
        """Write the table, the last weights and the state (at most every flush_seconds unless forced)."""
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_seconds:
            return
        walker = experiment.walker
        walker.record.save(self.directory / "steps.parquet")
        weights = dict(walker.params)
        weights["state:generator"] = walker.generator.get_state()
        save_weights(weights, self.weights_dir / "last.safetensors", walker.buffers)
        write_json(self.directory / "state.json", {
            "step": walker.n_steps, "is_done": walker.is_done, "stop_reason": walker.stop_reason,
            "walk": dataclasses.asdict(walker.config), "step_size": walker.step_size,
            "trust_region": dataclasses.asdict(walker.trust) if walker.trust is not None else None,
            **({"stop_at": self.stop_at} if self.stop_at is not None else {})})
        self._last_flush = now

    def finish(self, experiment: Experiment, summary: dict) -> None:
        self.flush(experiment, force=True)
        save_weights(experiment.walker.params, self.weights_dir / "final.safetensors", experiment.walker.buffers)
        write_json(self.directory / "summary.json", summary)


@contextlib.contextmanager
def walking(directory: str | Path, setting: str = "out"):
    """Hold `directory` while this process walks into it. A second process walking into the same folder (a --resume
    of a run still going, a second sweep into one folder) is refused, ConfigError on `setting`: the two wrote the
    same table, weights and state in turn, and the run ended as a mix of both walks.

    An advisory flock on the folder itself, which the system releases when the process ends, kill -9 included.
    (Not the filelock package torch installs: it locks a file of its own, which would sit in the run folder, left
    behind, where a new run's folder must be empty and exports and listings read every file.) Where there is no
    flock (Windows), folders are not held."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            from .errors import ConfigError

            raise ConfigError(setting, str(directory), "a folder no other process is walking into; another geodesic "
                                                       "process is walking into this one now (let it end, or stop it "
                                                       "first)") from None
        yield
    finally:
        os.close(fd)  # (releases the lock)


def being_walked(directory: str | Path) -> bool:
    """Whether a process holds `directory` (see walking). Asked with a shared lock, which a walk's exclusive one
    refuses but another asker's does not: asked with the walk's own lock, pages renaming or deleting one run at once
    each found the others' question holding it, and were told it was being walked."""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # gone, or not a folder: nobody walks it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def saved_stop_at(directory: str | Path, state: dict) -> int:
    """The step a saved run was walking to: its state's stop_at, or (a run saved before stop_at was) its walk's
    n_steps, the step limit of a run never resumed."""
    stop_at = state.get("stop_at", (state.get("walk") or {}).get("n_steps"))
    if isinstance(stop_at, bool) or not isinstance(stop_at, int):
        raise CheckpointError(f"{Path(directory).name}: state.json does not say where the walk stops "
                              f"(stop_at: {stop_at!r})")
    return stop_at


def load_run(directory: str | Path) -> tuple[RunConfig, dict, PathRecord]:
    """(config, state, record) of a saved run; a clear error if the folder is not one."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is not a saved run: it is a file, and a run is a folder")
    if not (directory / "config.json").exists() and (directory / "cells").is_dir():
        raise CheckpointError(f"{directory} is a sweep's folder, not a run: its runs are in {directory / 'cells'}/, "
                              "one folder per cell (and the sweep goes on by running the same sweep command again)")
    try:
        config = RunConfig.from_dict(json.loads((directory / "config.json").read_text()))
        state = json.loads((directory / "state.json").read_text())
        record = PathRecord.load(directory / "steps.parquet")
    except FileNotFoundError as err:
        raise CheckpointError(f"{directory} is not a saved run: {Path(err.filename).name} is missing") from err
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory.name}: a run file is unreadable ({_describe(err)})") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{directory.name}: state.json does not hold a saved walk's state")
    return config, state, record


def restore_walker(experiment: Experiment, directory: str | Path, state: dict, record: PathRecord) -> None:
    """Put the saved walk's position, history, settings and randomness back into experiment.walker."""
    walker = experiment.walker
    tensors = read_tensors(Path(directory) / "weights" / "last.safetensors")
    generator_state = tensors.pop("state:generator", None)
    params, buffers = match_params(tensors, walker.params, "last.safetensors", walker.buffers)
    try:  # everything read from state.json first: a damaged file changes nothing in the walker
        step, walk = int(state["step"]), WalkConfig(**state["walk"])
        step_size = float(state.get("step_size", walk.max_step_norm))
        trust = TrustRegion(**state["trust_region"]) if state.get("trust_region") else None
        is_done, stop_reason = bool(state["is_done"]), str(state["stop_reason"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{Path(directory).name}: state.json is damaged ({_describe(err)})") from err
    n_saved = len(record)
    if record.last.step != step:  # the table was flushed after the weights: cut it back
        record = PathRecord([p for p in record.points if p.step <= step])
    if not record.points or record.last.step != step:
        raise CheckpointError(f"{directory}: steps.parquet ({n_saved} rows) does not reach step {step}")
    walker.params = params
    walker.buffers.update(buffers)
    walker.config = walk
    walker.step_size = step_size
    walker.trust = trust_region_for(walker.config, walker.goal)
    if walker.trust is not None and trust is not None:
        walker.trust = trust
    walker.record = record
    walker.trace = WeightTrace(walker.trace.n_params, seed=walker.seed)
    row = walker.trace.vector(params)
    for _ in record.points:  # earlier weights are not stored: the trace restarts from here
        walker.trace.append(params, row)
    walker._euclidean_length = record.last.euclidean_length
    walker._functional_length = record.last.functional_length
    walker.is_done, walker.stop_reason = is_done, stop_reason
    if generator_state is not None:
        walker.generator.set_state(generator_state.to(torch.uint8))


# -- a folder of saved runs (the app's shared store) ---------------------------------------------------------

RUN_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_run_name(name: str) -> str:
    """A run name is a plain folder name: letters, digits, '-', '_', '.'; never a path."""
    if not name or len(name) > 80 or not set(name) <= RUN_NAME_CHARS or name.startswith("."):
        from .errors import ConfigError

        raise ConfigError("run name", name, "1-80 letters, digits, '-', '_' or '.', not starting with '.'")
    return name


def check_new_run_folder(directory: str | Path) -> Path:
    """A folder a new run may be written to: one that does not exist yet, or an empty one, created here. Anything else
    is refused (ConfigError on `out`): a run written over another would mix the two (its start weights are kept) and
    lose the first, and a file there cannot hold a run. One that cannot be created raises OSError."""
    from .errors import ConfigError

    directory = Path(directory)
    if directory.is_dir():
        if (directory / "config.json").exists():
            raise ConfigError("out", str(directory), "a new or empty folder; this one holds a run (continue it with "
                                                     "--resume, or write the new run elsewhere)")
        if any(directory.iterdir()):
            raise ConfigError("out", str(directory), "a new or empty folder; this one holds other files")
    elif directory.exists():
        raise ConfigError("out", str(directory), "a folder; this is a file")
    directory.mkdir(parents=True, exist_ok=True)  # OSError now, not after a start network was trained for it
    return directory


def list_runs(root: str | Path) -> list[dict]:
    """Saved runs under `root`, newest first: {name, goal, solver, dataset, protocol (a new task's, else None), steps,
    modified, problem} and what each reached (end and lowest accuracy, sparsity, whether its goal was reached:
    _outcome). Folders being saved or deleted (hidden names, see save_run) are not runs yet or any more; one deleted
    while listed is skipped. A folder that cannot be read as a run (a damaged or hand-edited file, a stray folder) is
    listed with its problem, so that one bad folder neither hides the others nor vanishes unexplained."""
    root = Path(root)
    runs = []
    for folder in root.iterdir() if root.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            config = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))  # as load_run reads it
            state = json.loads((folder / "state.json").read_text())
            modified = (folder / "state.json").stat().st_mtime
            entry = {"goal": config.goal.kind, "solver": config.walk.solver, "dataset": config.data.name,
                     "protocol": config.goal.new_task if config.goal.kind == "new-task" else None,
                     "steps": int(state["step"]), "problem": ""}
        except FileNotFoundError as err:
            if not folder.exists():  # deleted or renamed while we listed
                continue
            entry, modified = {"problem": f"not a saved run: {Path(err.filename).name} is missing"}, None
        except (OSError, ValueError, KeyError, TypeError) as err:
            entry, modified = {"problem": f"unreadable: {_describe(err)}"}, None
        if modified is None:
            try:
                modified = folder.stat().st_mtime
            except OSError:
                continue
            entry = {"goal": None, "solver": None, "dataset": None, "protocol": None, "steps": None, **entry}
        runs.append({"name": folder.name, **entry, **_outcome(folder), "modified": modified})
    return sorted(runs, key=lambda r: -r["modified"])


def _outcome(folder: Path) -> dict:
    """What a run reached, from its summary.json (fractions; None where it has none yet: a CLI walk still going
    writes it when it stops), so the Runs page can rank saved runs by what they kept."""
    out = {"end_accuracy_a": None, "end_accuracy_b": None, "lowest_accuracy_a": None, "sparsity": None,
           "reached_goal": None}
    try:
        summary = json.loads((folder / "summary.json").read_text())
        end = summary["end"]
        out.update(end_accuracy_a=end["test_accuracy"]["A"], end_accuracy_b=end["test_accuracy"].get("B"),
                   lowest_accuracy_a=summary["min_test_accuracy"]["A"], sparsity=end["sparsity"],
                   reached_goal=summary["reached_goal"] if summary.get("goal") != "new-task" else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return out


def _describe(err: BaseException) -> str:
    """A file error in a few words: a missing key of a JSON file is named as such."""
    if isinstance(err, KeyError):
        return f"a setting is missing ({err.args[0]!r})"
    if isinstance(err, json.JSONDecodeError):
        return f"a JSON file is damaged ({err.msg} at line {err.lineno})"
    return f"{type(err).__name__}: {err}"


# The store is shared by everyone using a server (each page a thread of one process) and by CLI runs: saving,
# renaming and deleting each end in one rename, which the file system does atomically, so two people acting on
# the same name at once get one result and a clear message, never a run mixed from two walks.

def save_run(experiment: Experiment, root: str | Path, name: str, summary: dict) -> Path:
    """Save the experiment's walk as run `name` under `root`: written in a hidden folder, then renamed into place.
    Raises CheckpointError if a run of that name exists (nothing is overwritten)."""
    import shutil
    import uuid

    root = Path(root)
    target = root / check_run_name(name)
    if target.exists():
        raise CheckpointError(f"a run named {name} exists already: choose another name, or delete that run first")
    staging = root / f".saving-{uuid.uuid4().hex}"
    try:
        try:
            store = RunStore(staging)
            store.begin(experiment)
            store.finish(experiment, summary)
            save_trace(experiment, staging)
        except OSError as err:  # a store folder that cannot be written (permissions, a full disk)
            raise CheckpointError(f"the run {name} could not be saved in {root} ({err.strerror or err})") from err
        try:
            staging.rename(target)  # fails if someone saved a run of that name meanwhile
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise CheckpointError(f"the run {name} could not be saved ({err.strerror})") from err
            raise CheckpointError(f"a run named {name} exists already: choose another name, "
                                  "or delete that run first") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def rename_run(root: str | Path, name: str, new_name: str) -> None:
    """Rename a saved run; refuses a name in use, and says so if the run is gone (deleted or renamed meanwhile)."""
    root = Path(root)
    source, target = root / check_run_name(name), root / check_run_name(new_name)
    if target.exists():
        raise CheckpointError(f"a run named {new_name} exists already")
    _refuse_if_walked(source, "renamed")
    try:
        source.rename(target)  # onto a run saved meanwhile (a folder with files) this fails
    except FileNotFoundError as err:
        raise CheckpointError(f"the run {name} is no longer in the store (deleted or renamed meanwhile)") from err
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise CheckpointError(f"a run named {new_name} exists already") from err
        raise CheckpointError(f"the run {name} could not be renamed ({err.strerror})") from err


def _refuse_if_walked(directory: Path, what: str) -> None:
    if being_walked(directory):  # its process writes there by name: moved or removed, the walk would fail or scatter
        raise CheckpointError(f"the run {directory.name} is being walked now (geodesic run, in another process): it "
                              f"can be {what} once that walk ends or is stopped")


def delete_run(root: str | Path, name: str) -> None:
    """Delete a saved run: first renamed to a hidden name (at once gone from every list), then removed."""
    import shutil
    import uuid

    root = Path(root)
    _refuse_if_walked(root / check_run_name(name), "deleted")
    doomed = root / f".deleting-{uuid.uuid4().hex}"
    try:
        (root / check_run_name(name)).rename(doomed)
    except FileNotFoundError as err:
        raise CheckpointError(f"the run {name} is no longer in the store (deleted or renamed meanwhile)") from err
    shutil.rmtree(doomed, ignore_errors=True)


def save_trace(experiment: Experiment, directory: str | Path) -> None:
    """The weights of the recorded points the walk kept (exact traces only; every point of a short path, see
    WeightTrace), so a reloaded run can branch from them: rows in trace.npy, their point indices in
    trace_index.npy."""
    import numpy as np

    trace = experiment.walker.trace
    indices, rows = trace.matrix(until=len(experiment.walker.record))
    if trace.is_exact and indices:
        weights = Path(directory) / "weights"
        for name, array in (("trace_index", np.asarray(indices, dtype=np.int64)), ("trace", rows)):
            tmp = weights / f"{name}.tmp.npy"
            np.save(tmp, array)
            tmp.replace(weights / f"{name}.npy")


def on_this_machine(config: RunConfig) -> tuple[RunConfig, str | None]:
    """A saved run's settings to go on with here: its own device if this machine has it, else this machine's
    (auto), with a sentence saying so. A run walked on a GPU was refused on a machine without one, in the app
    and by --resume alike, with no way to continue it but editing its config.json."""
    from .errors import ConfigError
    from .experiment import resolve_device

    try:
        resolve_device(config.device)
        return config, None
    except ConfigError:
        here = dataclasses.replace(config, device="auto")
        return here, f"walked on {config.device}, which this machine lacks: it goes on here on {resolve_device('auto')}"


def check_run(directory: str | Path, start_source: str | None = None) -> None:
    """Refuse what reload_run would refuse before it builds the walk (a damaged or missing file, weights that do not
    fit the model, data missing here) without building it: the app asks it before it asks to close the walks on
    screen for the reloaded one."""
    from .experiment import preflight

    directory = Path(directory)
    config, _, _ = load_run(directory)
    start = read_tensors(directory / "weights" / "start.safetensors")
    read_tensors(directory / "weights" / "last.safetensors")
    preflight(on_this_machine(config)[0], start_tensors=start, start_source=start_source or "start.safetensors")


def reload_run(directory: str | Path, start_source: str | None = None) -> tuple[Experiment, str | None]:
    """A saved run as a walk to go on with or branch: (experiment, what was left out of it or changed, if
    anything: see load_trace and on_this_machine). CheckpointError if the folder is not a readable run."""
    from .experiment import build

    directory = Path(directory)
    config, state, record = load_run(directory)
    config, moved = on_this_machine(config)
    experiment = build(config, start_tensors=read_tensors(directory / "weights" / "start.safetensors"),
                       start_source=start_source)
    restore_walker(experiment, directory, state, record)
    notes = [note for note in (moved, load_trace(experiment, directory)) if note]
    return experiment, "; ".join(notes) or None


def load_trace(experiment: Experiment, directory: str | Path) -> str | None:
    """Put the saved path's weights (weights/trace.npy) back into the walker's trace. They serve the Path view,
    branching and the heat map only, so a run whose trace is missing or damaged still loads: None, or a sentence
    saying what was left out."""
    import numpy as np

    weights = Path(directory) / "weights"
    walker = experiment.walker
    n_points = len(walker.record)
    if not (weights / "trace.npy").is_file():
        return None
    left_out = ("the weights of the path's earlier points (weights/trace.npy) {}; the walk goes on from its last "
                "point, and the Path view and branching have its new points only")
    try:
        rows = np.load(weights / "trace.npy", allow_pickle=False)
        indices = (np.load(weights / "trace_index.npy", allow_pickle=False)
                   if (weights / "trace_index.npy").is_file() else None)
    except (OSError, ValueError, EOFError) as err:
        return left_out.format(f"could not be read ({type(err).__name__}: {err})")
    if rows.ndim != 2 or rows.shape[1] != walker.trace.n_params or not np.issubdtype(rows.dtype, np.floating):
        return left_out.format(f"do not fit this model (shape {rows.shape}, {rows.dtype})")
    if indices is None:
        if len(rows) < n_points:
            return left_out.format("are fewer than its points")
        indices = np.arange(len(rows))  # saved before paths kept some points only: every point, in order
    if (indices.ndim != 1 or len(indices) != len(rows) or not np.issubdtype(indices.dtype, np.integer)
            or (len(indices) and (indices.min() < 0 or len(np.unique(indices)) != len(indices)))):
        return left_out.format("have a damaged index (weights/trace_index.npy)")
    walker.trace.restore([int(i) for i in indices], rows, n_points)
    return None


def export_zip(directory: str | Path) -> bytes:
    """One download holding a run's settings, table, summary and weights. The weights come both as
    .safetensors and as PyTorch state dicts (`torch.load(path, weights_only=True)` reads them)."""
    import io
    import zipfile

    from .checkpoint import read_tensors

    directory = Path(directory)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("config.json", "state.json", "summary.json", "steps.parquet"):
            if (directory / name).is_file():
                archive.write(directory / name, f"{directory.name}/{name}")
        for path in sorted((directory / "weights").glob("*.safetensors")):
            archive.write(path, f"{directory.name}/weights/{path.name}")
            tensors = {k: v for k, v in read_tensors(path).items() if not k.startswith("state:")}
            state_dict = io.BytesIO()
            torch.save(tensors, state_dict)
            archive.writestr(f"{directory.name}/weights/{path.stem}.pt", state_dict.getvalue())
    return buffer.getvalue()
