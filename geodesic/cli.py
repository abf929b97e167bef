"""Command line: `python -m geodesic run --goal sparsify --dataset digits --out runs/demo`.

A contract (the benchmark, the dashboard and outside checks rely on it): it writes DIR/summary.json,
DIR/steps.parquet, DIR/config.json and DIR/weights/final.safetensors. Bad settings exit with status 2
and a one-line message naming the setting; a diverging walk exits with status 3 keeping its last
finite point on disk.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

from .config import (
    GOALS,
    METRICS,
    NEW_TASKS,
    SOLVERS,
    DataConfig,
    GoalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    default_walk,
)
from .data import DATASETS
from .errors import ConfigError, GeodesicError, OutOfMemory, WalkDiverged
from .models import MODEL_NAMES


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; keep the message on one line, no usage dump
        self.exit(2, f"geodesic: error: {message} (see --help)\n")


class _Version(argparse.Action):
    """--version: as argparse's own, but the line is made only when asked (it imports torch and asks git)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from .version import describe

        print(describe())  # on stdout, as argparse's own version action prints
        parser.exit(0)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m geodesic", description="Walk trained networks through weight space.")
    parser.add_argument("--version", action=_Version, nargs=0, help="print geodesic's, Python's and PyTorch's "
                        "versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="walk a network toward a goal and save the run")
    run.add_argument("--goal", choices=GOALS, help="sparsify, new-task or connect (required unless --resume)")
    run.add_argument("--dataset", default="digits", choices=DATASETS)
    run.add_argument("--data-root", help="folder of torchvision datasets (mnist, fashion-mnist, cifar10/100)")
    run.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-root")
    run.add_argument("--out", help="folder to write the run to (created; required unless --resume)")
    run.add_argument("--resume", metavar="DIR", help="continue the saved run in DIR")
    run.add_argument("--model", default="mlp", choices=MODEL_NAMES)
    run.add_argument("--hidden", default="128,128", help="mlp hidden widths, comma-separated (default 128,128)")
    run.add_argument("--solver", default="constrained", choices=SOLVERS, help="step rule")
    run.add_argument("--step-size", type=step_size_arg, help="ε, the length of every step (default: tuned per goal), "
                     "or auto: start there and adapt ε after every step (geodesic/adaptive.py)")
    run.add_argument("--goal-weight", type=float, help="β (constrained) or λ (penalty)")
    run.add_argument("--goal-weight-growth", type=float, help="penalty walk: λ grows by this factor per step")
    run.add_argument("--restoring-weight", type=float, help="ρ, the pull back onto equivalent networks (constrained)")
    run.add_argument("--metric", choices=METRICS, help="fisher (probabilities) or logit (raw outputs)")
    run.add_argument("--probe-size", type=int, help="N, inputs the metric is evaluated on each step")
    run.add_argument("--step-guard", type=float, metavar="SHARE",
                     help="halve a step (up to 5 times) while it lowers the share of training inputs that keep "
                          "their class by more than SHARE or moves their outputs by more than 0.01 nats (mean "
                          "KL); 0 turns it off (default: 0.003 for conv nets' constrained sparsify and connect "
                          "walks, else 0)")
    run.add_argument("--batch-size", type=int, help="inputs for the restoring loss and the goal's gradient")
    run.add_argument("--n-steps", type=int, help="most steps to take (stops earlier at the goal)")
    run.add_argument("--seed", type=int, default=0, help="start network and batches; connect uses seed and seed+1")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    run.add_argument("--target-sparsity", type=float, default=0.9, help="sparsify: fraction of weights to zero")
    run.add_argument("--tolerance", type=float, help="sparsify/connect: done within this distance "
                     "(default 0.01 for sparsify, 0.1 for connect)")
    run.add_argument("--new-task", default="permuted", choices=NEW_TASKS,
                     help="new-task protocol: permuted (domain-incremental), split (classes 0-4 then 5-9, one head: "
                     "class-incremental), split-heads (the same with a head per task: task-incremental)")
    run.add_argument("--memory-size", type=int, default=500, help="new-task: task-A inputs kept")
    run.add_argument("--epochs", type=int, default=30, help="training epochs of the start network(s)")
    run.add_argument("--init", metavar="PATH", help="start from these weights (.safetensors or a state dict)")
    run.add_argument("--save-every", type=int, default=0, help="also keep the weights of every k-th step")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    sweep = sub.add_parser("sweep", help="walk every combination of comma-separated settings (see geodesic/sweep.py)")
    defaults = {"goal": None, "dataset": "digits", "model": "mlp", "solver": "constrained", "seed": "0",
                "target-sparsity": "0.9", "new-task": "permuted", "memory-size": "500"}
    from .sweep import LISTS
    for flag, _, kind in LISTS:
        sweep.add_argument(f"--{flag}", default=defaults.get(flag),
                           help=f"one value or a comma-separated list ({kind.__name__})")
    sweep.add_argument("--out", required=True, help="folder of the sweep: cells/NAME/ run folders, sweep.parquet")
    sweep.add_argument("--data-root", help="folder of torchvision datasets (mnist, fashion-mnist, cifar10/100)")
    sweep.add_argument("--download", action="store_true", help="download a torchvision dataset into --data-root")
    sweep.add_argument("--hidden", default="128,128", help="mlp hidden widths, comma-separated (default 128,128)")
    sweep.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    sweep.add_argument("--epochs", type=int, default=30, help="training epochs of the start network(s)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--backend", default="local", choices=("local", "ray"),
                       help="local: walk here; ray: as Ray tasks (needs requirements-ray.txt; see the README)")
    sweep.add_argument("--ray-address", help="join this Ray cluster (HOST:PORT of `ray start --head`); "
                       "default: start a local Ray instance")
    sweep.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    sweep.add_argument("--ray-cpus-per-task", type=float, default=1.0, help="CPUs each Ray task asks for")
    sweep.add_argument("--ray-gpus-per-task", type=float,
                       help="GPUs each Ray task asks for (default 1 with --device cuda, else 0)")
    return parser


def _hidden(text: str) -> tuple[int, ...]:
    # An empty entry ("128,,64", "128,") is a typo, not a layer to drop: say so, as the sweep's lists do.
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ConfigError("hidden", text, "comma-separated positive integers, e.g. 128,128") from None
    return widths


def step_size_arg(text) -> float | str:
    """--step-size: a number, or 'auto' for the adaptive step size."""
    if isinstance(text, (int, float)) or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: a number > 0, or auto") from None


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.goal is None:
        raise ConfigError("goal", None, ", ".join(GOALS))
    auto = args.step_size == "auto"
    walk = default_walk(args.goal, args.solver, model=args.model, max_step_norm=None if auto else args.step_size,
                        adaptive_step=True if auto else None, goal_weight=args.goal_weight,
                        restoring_weight=args.restoring_weight, goal_weight_growth=args.goal_weight_growth,
                        metric=args.metric, probe_size=args.probe_size, step_guard=args.step_guard,
                        batch_size=args.batch_size, n_steps=args.n_steps)
    return RunConfig(
        goal=GoalConfig(kind=args.goal, target_sparsity=args.target_sparsity, new_task=args.new_task,
                        memory_size=args.memory_size, tolerance=args.tolerance),
        walk=walk, data=DataConfig(name=args.dataset, root=args.data_root, download=args.download),
        model=ModelConfig(name=args.model, hidden=_hidden(args.hidden)), train=TrainConfig(epochs=args.epochs),
        seed=args.seed, device=args.device)


def _set_on_resume(args: argparse.Namespace) -> list[str]:
    """The flags given beside --resume that a resumed run cannot honour (their values differ from the defaults)."""
    defaults = vars(_parser().parse_args(["run", "--resume", args.resume]))
    honoured = {"command", "resume", "n_steps", "save_every", "quiet", "device"}
    return [k.replace("_", "-") for k, v in vars(args).items() if k not in honoured and v != defaults.get(k)]


def run_command(args: argparse.Namespace) -> int:
    import contextlib

    with contextlib.ExitStack() as held:  # the run's folder, held while this process walks into it
        return _run(args, held)


def _run(args: argparse.Namespace, held) -> int:
    from .checkpoint import read_tensors
    from .data import protocol_caveat
    from .experiment import build
    from .store import (
        RunStore,
        check_new_run_folder,
        load_run,
        on_this_machine,
        restore_walker,
        saved_stop_at,
        walking,
    )
    from .summary import function_lost, summarize

    t0 = time.perf_counter()
    if args.resume:
        out = Path(args.resume)
        if out.is_dir():  # (held first: read as it is once no other process walks it; not a run: load_run says so)
            held.enter_context(walking(out, "resume"))
        config, state, record = load_run(out)
        given = _set_on_resume(args)
        if given:  # they would be silently ignored: the saved run's settings are what it continues with
            also = f" (also given: {', '.join('--' + g for g in given[1:])})" if given[1:] else ""
            raise ConfigError(given[0], getattr(args, given[0].replace("-", "_")),
                              "nothing but --n-steps, --save-every, --device and --quiet with --resume: the run "
                              "continues with its saved settings" + also)
        if state.get("is_done"):  # nothing to continue: say so, and leave the run's files as they are
            print(f"geodesic: {out} stopped at step {state['step']} ({state.get('stop_reason') or 'done'}); "
                  "there is nothing to continue", file=sys.stderr)
            return 0
        # A killed run walks on to the step it was walking to, not that many steps more; --n-steps K walks K more.
        if args.n_steps is not None and args.n_steps < 1:
            raise ConfigError("n-steps", args.n_steps, "a whole number >= 1: the steps to walk on from the saved one")
        stop_at = state["step"] + args.n_steps if args.n_steps else saved_stop_at(out, state)
        if stop_at <= state["step"]:
            print(f"geodesic: {out} stopped at its step limit (step {state['step']}); --n-steps K walks K more",
                  file=sys.stderr)
            return 0
        if args.device != "auto":  # asked for: a run walked on the CPU can go on on a GPU, and back
            config = dataclasses.replace(config, device=args.device)
        else:
            config, moved = on_this_machine(config)
            if moved:
                print(f"geodesic: {out} was {moved}", file=sys.stderr)
        start_path = out / "weights" / "start.safetensors"
    else:
        if not args.out:
            raise ConfigError("out", None, "a folder to write the run to")
        config = config_from_args(args)
        start_path = Path(args.init) if args.init else None
        stop_at = config.walk.n_steps
        if config.goal.kind == "new-task" and (caveat := protocol_caveat(config.data.name, config.goal.new_task)):
            print(f"geodesic: note: {caveat}", file=sys.stderr)
    if args.save_every < 0:
        raise ConfigError("save-every", args.save_every, "an integer >= 0")

    start_tensors = read_tensors(start_path) if start_path is not None else None  # a refused file: before any bar
    made = not args.resume and not Path(args.out).exists()
    if not args.resume:
        out = check_new_run_folder(args.out)  # made now: before the start network is trained for it, not after
        held.enter_context(walking(out))
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="step", dynamic_ncols=True, file=sys.stderr)

    from .training import PhaseClock

    clock = PhaseClock()

    def progress(what: str, fraction: float) -> None:
        if bar is not None:
            bar.set_description_str(f"{clock.text(what, fraction)} {fraction:.0%}")

    try:
        experiment = build(config, progress=progress, start_tensors=start_tensors, start_source=str(start_path))
    except BaseException:
        if bar is not None:  # the error is said on a clean line, not after the bar's text
            bar.leave = False
            bar.close()  # (a terminal's line is cleared; a log's keeps the bar's text: end it there)
            if not sys.stderr.isatty():
                print(file=sys.stderr)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused (missing data, weights that do not fit): no empty folder left for it
        raise
    store = RunStore(out, save_every=args.save_every, stop_at=stop_at)
    if args.resume:
        restore_walker(experiment, out, state, record)
        if args.n_steps:
            experiment.walker.config = dataclasses.replace(experiment.walker.config, n_steps=args.n_steps)
    store.begin(experiment)
    walker = experiment.walker
    n_steps = stop_at - walker.n_steps
    if bar is not None:
        bar.reset(total=n_steps)
        bar.set_description_str(f"{config.goal.kind} ({config.walk.solver})")
    status = 0
    goal_measure = "dist" if experiment.goal.is_point_target else "B loss"  # a new task has no point to reach
    try:
        for point in walker.run(n_steps):
            store.after_step(experiment)
            if bar is not None:
                acc = " ".join(f"{k}={v:.3f}" for k, v in point.accuracy.items())
                bar.set_postfix_str(f"acc {acc} sparsity={point.sparsity:.3f} {goal_measure}={point.goal_distance:.3g}")
                bar.update(1)
    except (WalkDiverged, OutOfMemory) as err:
        print(f"geodesic: {err}", file=sys.stderr)
        status = 3
    except KeyboardInterrupt:
        print("geodesic: interrupted; the run is saved and can be continued with --resume", file=sys.stderr)
        status = 130
    finally:
        if bar is not None:
            if walker.is_done:  # the goal came before the step limit: the bar ends full, not at "15% 297/2000"
                bar.total = bar.n
                bar.refresh()
            bar.close()
        summary = summarize(experiment, wall_seconds=time.perf_counter() - t0, stop_at=stop_at)
        store.finish(experiment, summary)
    if not args.quiet:
        end = summary["end"]
        line = " ".join(f"{k}={v:.4f}" for k, v in end["test_accuracy"].items())
        if summary.get("scenario"):  # which continual-learning scenario the numbers are of (method.md §5)
            line += f" ({summary['new_task']}: {summary['scenario']})"
        extra = f" error_barrier={summary['error_barrier']:.4f} (straight line {summary['linear_error_barrier']:.4f})" \
            if "error_barrier" in summary else ""
        pruned = end.get("prune_now_accuracy")
        if pruned and not summary["reached_goal"]:  # stopped short of the target: what pruning there would keep
            extra += " (not reached; pruned now: " + " ".join(f"{k}={v:.4f}" for k, v in pruned.items()) + ")"
        zeros = f" ({end['zero_weights']:,} of {summary['prunable_weights']:,} weights zero)" \
            if summary["goal"] == "sparsify" else ""
        why = re.sub(r" \(\d+ steps\)$", "", summary.get("stop_reason", ""))  # "step limit (30 steps)": counted there
        why = f" ({why})" if why else ""
        print(f"{summary['steps']} steps{why}, {summary['wall_seconds']:.1f} s: test accuracy {line}, "
              f"sparsity {end['sparsity']:.3f}{zeros}{extra} -> {out}", file=sys.stderr)
    start, lowest = summary["start"]["test_accuracy"]["A"], summary["min_test_accuracy"]["A"]
    if function_lost(start, lowest):  # as the app says it
        print(f"geodesic: warning: test accuracy A fell to {100 * lowest:.1f}% on the way (from {100 * start:.1f}%): "
              "this walk did not keep the function; a shorter --step-size (or auto) keeps it closer", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .allocator import DEFAULT_KEEP_FREED_MB, keep_freed_memory

    keep_freed_memory(DEFAULT_KEEP_FREED_MB)  # as the engine does (allocator.py): this process walks and exits
    try:
        if args.command == "sweep":
            from .sweep import run_sweep

            return run_sweep(args)
        return run_command(args)
    except ConfigError as err:  # name the flag the user typed (the engine's name for --step-size differs)
        flag = {"max-step-norm": "step-size"}.get(err.setting, err.setting)
        given = "nothing (it is required)" if err.given is None else repr(err.given)  # not "got None"
        print(f"geodesic: error: --{flag}: got {given}; allowed: {err.allowed}", file=sys.stderr)
        return 2
    except GeodesicError as err:
        print(f"geodesic: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a folder that cannot be written (permissions, a full disk, a read-only mount)
        where = f" ({err.filename})" if err.filename else ""
        print(f"geodesic: error: could not write: {err.strerror or err}{where}", file=sys.stderr)
        return 1
