"""The shared training loop: configs, optimizer, data pipelines, checkpoints and metrics.

Needs the ``[train]`` extra (optax, orbax-checkpoint, grain, tqdm; tensorflow-datasets,
scikit-learn, matplotlib and tensorboardX for the optional sources, plots and event files).
"""

from jaxattn.parallel.logical import make_mesh  # re-exported: the one mesh builder
from jaxattn.train.checkpoint import Checkpointer
from jaxattn.train.config import (
    ExperimentConfig,
    MeshConfig,
    OptimConfig,
    RunConfig,
    apply_overrides,
    config_to_dict,
)
from jaxattn.train.loop import (
    NonFiniteLossError,
    Task,
    TrainResult,
    batch_sharding,
    mesh_rules,
    param_shardings,
    train,
)
from jaxattn.train.optim import decay_mask, make_optimizer, make_schedule

__all__ = [
    "Checkpointer",
    "ExperimentConfig",
    "MeshConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunConfig",
    "Task",
    "TrainResult",
    "apply_overrides",
    "config_to_dict",
    "batch_sharding",
    "decay_mask",
    "make_mesh",
    "mesh_rules",
    "make_optimizer",
    "make_schedule",
    "param_shardings",
    "train",
]
