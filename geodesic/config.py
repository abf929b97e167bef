"""Frozen settings for a walk. Changing a setting means building a new walker (see walker.py).

Every dataclass validates itself on construction and raises `ConfigError(setting, given, allowed)`,
so the CLI, the app and the Python API share one set of checks and one wording.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError

GOALS = ("sparsify", "new-task", "connect")
SOLVERS = ("constrained", "penalty")
METRICS = ("fisher", "logit")
LINEAR_SOLVERS = ("auto", "kernel", "cg")
NEW_TASKS = ("permuted", "split", "split-heads", "mnist-fashion")
# The continual-learning scenario each protocol is (van de Ven & Tolias 2019), which method.md asks the views to say.
SCENARIOS = {"permuted": "domain-incremental", "split": "class-incremental, one head",
             "split-heads": "task-incremental, a head per task",
             "mnist-fashion": "class-incremental, one head of 20"}
DEVICES = ("auto", "cpu", "cuda", "mps")


def _check_positive(obj, name: str, *, allow_zero: bool = False, integer: bool = False) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a finite number"
        raise ConfigError(name.replace("_", "-"), value, f"{kind} {'>= 0' if allow_zero else '> 0'}")


def _check_choice(obj, name: str, choices: tuple[str, ...], setting: str | None = None) -> None:
    """setting: the name users know it by (the CLI flag, the app's field) when the field's own name differs."""
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(setting or name.replace("_", "-"), value, ", ".join(choices))


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"  # digits, moons, circles, spirals, mnist, fashion-mnist, cifar10, cifar100
    root: str | None = None  # folder holding torchvision datasets (MNIST/..., cifar-10-batches-py, ...)
    download: bool = False  # let torchvision download into `root` when the files are missing
    split_seed: int = 0  # the train/test split is fixed by this, not by the run's seed
    n_train: int | None = None  # use only the first n training examples (after shuffling by split_seed)

    def __post_init__(self):
        from .data import DATASETS

        _check_choice(self, "name", DATASETS, setting="dataset")
        if self.n_train is not None:
            _check_positive(self, "n_train", integer=True)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"  # mlp, lenet5, vgg11, vgg16, resnet18
    hidden: tuple[int, ...] = (128, 128)  # mlp only: hidden widths

    def __post_init__(self):
        from .models import MODEL_NAMES

        _check_choice(self, "name", MODEL_NAMES, setting="model")
        if not self.hidden or any(not isinstance(w, int) or w <= 0 for w in self.hidden):
            raise ConfigError("hidden", self.hidden, "one or more positive integer widths")


@dataclass(frozen=True)
class TrainConfig:
    """How start networks are trained (Adam, seeded); part of their cache key."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3

    def __post_init__(self):
        _check_positive(self, "epochs", integer=True)
        _check_positive(self, "batch_size", integer=True)
        _check_positive(self, "lr")


@dataclass(frozen=True)
class GoalConfig:
    kind: str = "sparsify"
    target_sparsity: float = 0.9  # s: fraction of prunable weights set to zero
    new_task: str = "permuted"  # a protocol of NEW_TASKS (SCENARIOS says which continual-learning scenario each is)
    memory_size: int = 500  # new task: task-A inputs kept for the metric and the anchor
    # sparsify/connect: done when ‖w − target‖ < tolerance, then project/snap. None: 0.01 for sparsify
    # (the authors' value) and 0.1 for connect, about one step: the last snap is then no longer than a step.
    tolerance: float | None = None

    def __post_init__(self):
        _check_choice(self, "kind", GOALS, setting="goal")
        s = self.target_sparsity
        if not (isinstance(s, (int, float)) and 0 < s < 1):
            raise ConfigError("target-sparsity", s, "a number strictly between 0 and 1")
        _check_choice(self, "new_task", NEW_TASKS)
        _check_positive(self, "memory_size", integer=True)
        if self.tolerance is None:
            object.__setattr__(self, "tolerance", 0.1 if self.kind == "connect" else 0.01)
        _check_positive(self, "tolerance")


@dataclass(frozen=True)
class WalkConfig:
    """One step rule and its knobs. Paper symbols in the comments (method.md §3-4)."""

    solver: str = "constrained"  # constrained: argmin θᵀgθ − β⟨θ,v⟩, ‖θ‖ ≤ ε; penalty: normalised ∇(D + λh)
    max_step_norm: float = 0.05  # ε: Euclidean length of every step
    goal_weight: float = 1.0  # β (constrained) or λ (penalty): strength of the goal's pull
    restoring_weight: float = 0.1  # ρ (constrained only): weight of -∇(restoring loss) added to v
    metric: str = "fisher"  # fisher (output probabilities) or logit (raw outputs)
    probe_size: int = 16  # N: inputs on which g = JᵀJ is evaluated, redrawn every step
    batch_size: int = 200  # inputs for the restoring loss and the goal's gradient
    linear_solver: str = "auto"  # kernel: exact via K = JJᵀ; cg: conjugate gradients; auto picks
    cg_iters: int = 10
    damping: float = 1e-3  # μ for the cg solver (kernel solves for μ exactly)
    n_steps: int = 2000  # most steps a run takes; the walk stops earlier when the goal is reached
    # Penalty walk only: λ is multiplied by this every step (1 = the authors' fixed λ). A fixed λ settles
    # where ∇R balances λ(w − target), short of a point target; growing λ lets the walk arrive.
    goal_weight_growth: float = 1.0
    # The adaptive step size (`--step-size auto`, adaptive.py): ε starts at max_step_norm and is set again after
    # every step within [ε/20, ε], shrinking when the share of the training batch that keeps its class falls
    # more than kept_tolerance below where it started; the constrained walk's ρ is relaxed while the goal stalls.
    adaptive_step: bool = False
    kept_tolerance: float = 0.015
    # The step guard (guard.py; 0 = off): the most that one step may lower the share of the goal's guard examples
    # (training inputs, never the test set) that keep their class; a step that lowers it more, or moves their
    # outputs by more than guard.KL_BUDGET, is halved, up to guard.HALVINGS times, before it is taken.
    step_guard: float = 0.0

    def __post_init__(self):
        _check_choice(self, "solver", SOLVERS)
        if not isinstance(self.adaptive_step, bool):
            raise ConfigError("adaptive-step", self.adaptive_step, "true or false")
        if not (isinstance(self.kept_tolerance, (int, float)) and 0 < self.kept_tolerance < 1):
            raise ConfigError("kept-tolerance", self.kept_tolerance, "a number strictly between 0 and 1")
        if not (isinstance(self.step_guard, (int, float)) and not isinstance(self.step_guard, bool)
                and 0 <= self.step_guard < 1):
            raise ConfigError("step-guard", self.step_guard, "a number in [0, 1) (a share of examples; 0 = off)")
        _check_positive(self, "max_step_norm")
        _check_positive(self, "goal_weight", allow_zero=True)
        _check_positive(self, "restoring_weight", allow_zero=True)
        _check_choice(self, "metric", METRICS)
        _check_positive(self, "probe_size", integer=True)
        _check_positive(self, "batch_size", integer=True)
        _check_choice(self, "linear_solver", LINEAR_SOLVERS)
        _check_positive(self, "cg_iters", integer=True)
        _check_positive(self, "damping")
        _check_positive(self, "n_steps", integer=True)
        if not (isinstance(self.goal_weight_growth, (int, float)) and 1.0 <= self.goal_weight_growth <= 2.0):
            raise ConfigError("goal-weight-growth", self.goal_weight_growth, "a number in [1, 2]")


# Tuned on digits (see BENCHMARKS.md): the values each (goal, solver) pair starts from.
WALK_DEFAULTS: dict[tuple[str, str], dict] = {
    ("sparsify", "constrained"): dict(max_step_norm=0.2, goal_weight=0.003, restoring_weight=0.3),
    ("sparsify", "penalty"): dict(max_step_norm=0.05, goal_weight=1.0, goal_weight_growth=1.006),
    ("new-task", "constrained"): dict(max_step_norm=0.1, goal_weight=0.01, restoring_weight=0.1, n_steps=300),
    ("new-task", "penalty"): dict(max_step_norm=0.05, goal_weight=3.0, n_steps=1500),
    ("connect", "constrained"): dict(max_step_norm=0.1, goal_weight=0.01, restoring_weight=0.1),
    ("connect", "penalty"): dict(max_step_norm=0.05, goal_weight=3.0, goal_weight_growth=1.006),
}


# What conv nets change on top (tuned on LeNet-5 on digits-images, BENCHMARKS.md "The step guard"). With the
# MLP's settings a LeNet-5 sparsify walk dips to 78-82% test accuracy from ~96% on single steps near its
# target (its probe of 16 inputs leaves directions open that move other inputs' classes); the guard halves
# those steps and keeps the lowest point within 3 points of the start, the end within 1.5, on seeds 0-2. MLP
# walks keep the guard off: their figures stay those of the paper's step. A LeNet-5 connect walk on digits-images
# has the same dips (a sweep of seeds 0-4: error barrier 9.4-19.3 points, none under the 2 that count as
# connected, lowest points 76-87%); guarded, 0.6-2.2 points, lowest 93.6-94.4%, in 1,627-2,308 steps (4 of the
# 10 walks took more than 2,000 steps), about 1.6x the time (BENCHMARKS.md, "The step guard on connect").
DEFAULT_STEP_GUARD = 0.003  # of the guard examples: 3 of 1,024
CONV_WALK_DEFAULTS: dict[tuple[str, str], dict] = {
    ("sparsify", "constrained"): dict(step_guard=DEFAULT_STEP_GUARD),
    ("connect", "constrained"): dict(step_guard=DEFAULT_STEP_GUARD, n_steps=3000),
}
CONV_MODELS = ("lenet5", "vgg11", "vgg16", "resnet18")


def default_walk(goal: str, solver: str, model: str = "mlp", **overrides) -> WalkConfig:
    """The tuned WalkConfig for a goal and step rule (and model: conv nets add CONV_WALK_DEFAULTS);
    `overrides` that are None are ignored."""
    if (goal, solver) not in WALK_DEFAULTS:
        GoalConfig(kind=goal)
        WalkConfig(solver=solver)
    values = dict(WALK_DEFAULTS[(goal, solver)])
    if model in CONV_MODELS:
        values.update(CONV_WALK_DEFAULTS.get((goal, solver), {}))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return WalkConfig(solver=solver, **values)


MAX_SEED = 2**31 - 1  # scikit-learn's and UMAP's random_state take at most 2**32 - 1 and connect also uses seed + 1;
# torch's generators at most 2**64 - 1: a seed of 1e20 ended in a traceback from torch (the CLI, the fan's seeds)


def check_seed(seed) -> int:
    """A run's or a walk's seed: a whole number from 0 to MAX_SEED (ConfigError otherwise)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError("seed", seed, f"a whole number from 0 to {MAX_SEED}")
    return seed


@dataclass(frozen=True)
class RunConfig:
    goal: GoalConfig = field(default_factory=GoalConfig)
    walk: WalkConfig = field(default_factory=WalkConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # start network (and for connect, seed+1 gives the second) and the walk's batches
    device: str = "auto"  # auto: cuda, then mps, then cpu

    def __post_init__(self):
        check_seed(self.seed)
        _check_choice(self, "device", DEVICES)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        model = dict(d.get("model", {}))
        if "hidden" in model:
            model["hidden"] = tuple(model["hidden"])
        return cls(
            goal=GoalConfig(**d.get("goal", {})), walk=WalkConfig(**d.get("walk", {})),
            data=DataConfig(**d.get("data", {})), model=ModelConfig(**model),
            train=TrainConfig(**d.get("train", {})), seed=d.get("seed", 0), device=d.get("device", "auto"),
        )

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)
