"""geodesic: walk trained networks through weight space along paths that keep what they compute.

Python API (the CLI and the dashboard drive the same objects):

    net, params = network_from_module(my_module)
    data = from_tensors(x_train, y_train, x_test, y_test)
    goal = Sparsify.for_network(net, params, data, target_sparsity=0.9)
    walker = Walker(net, params, goal, WalkConfig(), tasks={"A": data})
    for point in walker.run(500): ...
"""
from . import _quiet  # noqa: F401  (first: silences one PyTorch-internal warning, see _quiet.py)
from .batch import WalkBatch
from .config import DataConfig, GoalConfig, ModelConfig, RunConfig, TrainConfig, WalkConfig, default_walk
from .data import Dataset, from_tensors, load_dataset
from .engine import Engine
from .errors import CheckpointError, ConfigError, DataError, GeodesicError, WalkDiverged
from .experiment import Experiment, build
from .goals import Connect, Goal, NewTask, Sparsify
from .metric import PullbackMetric
from .models import Network, build_network, network_from_module
from .path import PathPoint, PathRecord
from .store import reload_run
from .version import __version__
from .walker import Walker

__all__ = [
    "DataConfig", "GoalConfig", "ModelConfig", "RunConfig", "TrainConfig", "WalkConfig", "default_walk",
    "Dataset", "from_tensors", "load_dataset", "CheckpointError", "ConfigError", "DataError", "GeodesicError",
    "WalkDiverged", "Experiment", "build", "Connect", "Goal", "NewTask", "Sparsify", "PullbackMetric", "Network",
    "build_network", "network_from_module", "PathPoint", "PathRecord", "Walker",
    "WalkBatch", "Engine", "reload_run", "__version__",
]
