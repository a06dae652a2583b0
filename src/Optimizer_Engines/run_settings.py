"""The checks ``dol1.py`` runs on a run's settings before anything is built: names, ranges, the engine and what it
accepts, torchrun and srun environments (floor 3: it reads the engine table, the models, the data sets and the
engines' launch checks)."""
from __future__ import annotations

import math
import re
from typing import Any

from src.Architectures.Models import MODELS
from src.Buliding_Units.measurement_schedule import parse_measurement_rounds
from src.Buliding_Units.Model_frames import OPTIMIZERS
from src.Buliding_Units.runs import RESUME_MODES
from src.Buliding_Units.StopperUnit import stoppers_from_settings
from src.Buliding_Units.tensorboard_log import check_tensorboard
from src.cli import ConfigError
from src.Data import DATASETS
from src.Optimizer_Engines import ENGINES, EngineSpec, resolve_engine
from src.Optimizer_Engines.BCD_engine import BLOCK_UPDATES
from src.Optimizer_Engines.parallel.ddp_engine import check_slurm_tasks
from src.Optimizer_Engines.parallel.worker_plan import torchrun_env
from src.plots import X_AXES

_CHOICES = {
    "block_update": tuple(BLOCK_UPDATES),
    "voting_method": ("average", "random"),
    "model": tuple(MODELS),
    "dataset_name": tuple(DATASETS),
    "optimizer": tuple(OPTIMIZERS),
    "plot_x": tuple(X_AXES),
}
_AT_LEAST = {"K": 1, "rounds": 0, "batch_size": 0, "n_workers": 0, "eval_samples": 1, "report_sampling_rate": 0,
             "measurement_sampling_rate": 0, "early_stop_patience": 0, "communication_delay": 0,
             "checkpoint_every": 0, "max_staleness": -1, "step_time": 0}
RUN_ID = re.compile(r"R[0-9a-f]{8}")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(H: dict[str, Any]) -> EngineSpec:
    """Check names and ranges without building anything; returns the engine of ``H['training_mode']``.

    Raises:
        ConfigError: naming the bad value and the valid ones.
    """
    for key, value in H.items():
        _check(not isinstance(value, float) or math.isfinite(value),
               f"--{key} {value!r} is not a finite number (NaN and infinities are refused)")
    spec = resolve_engine(H["training_mode"])
    for key, valid in _CHOICES.items():
        _check(H[key] in valid, f"--{key} {H[key]!r} is not valid; valid: {sorted(valid)}")
    for key, low in _AT_LEAST.items():
        _check(H[key] >= low, f"--{key} must be >= {low}, got {H[key]}")
    _check(H["step_size"] > 0, f"--step_size must be > 0, got {H['step_size']}")
    _check(H["momentum"] >= 0, f"--momentum must be >= 0, got {H['momentum']}")
    _check(0 <= H["seed"] < 2**32, f"--seed must be in [0, 2**32 - 1] (= 4294967295), got {H['seed']}")
    _check(0 < H["active_share"] <= 1, f"--active_share must be in (0, 1], got {H['active_share']}")
    _check(0 < H["gamma"] <= 1, f"--gamma must be in (0, 1], got {H['gamma']}")
    _check(0 <= H["beta"] <= 1, f"--beta must be in [0, 1], got {H['beta']}")
    _check(isinstance(H["config"], list) and len(H["config"]) > 0,
           f"--config must be a non-empty list such as [8, 8] or [[16, 16], [32, 32]], got {H['config']!r}")
    _check(H["target_value"] is None or isinstance(H["target_value"], (int, float))
           and not isinstance(H["target_value"], bool),
           f"--target_value must be a number or None, got {H['target_value']!r}")
    _check(H["cuda_core"] >= -1, f"--cuda_core must be a GPU index >= 0, or -1 for the CPU; got {H['cuda_core']}")
    _check(isinstance(H["worker_speeds"], list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in H["worker_speeds"]),
        f"--worker_speeds must be a list of numbers > 0 (relative time per local step, one per worker), got "
        f"{H['worker_speeds']!r}")
    _check(H["communication_delay"] <= 3600, f"--communication_delay is seconds per round, at most 3600; got "
                                             f"{H['communication_delay']}")
    _check(not spec.block_updates or H["block_update"] in spec.block_updates,
           f"--block_update {H['block_update']} cannot run in --training_mode {spec.name}; valid block updates "
           f"for {spec.name}: {list(spec.block_updates)} (gauss_seidel updates one block after another: use "
           f"--training_mode blockwise_sequential)")
    try:
        parse_measurement_rounds(H["measurement_rounds"], H["rounds"])
    except ValueError as err:
        raise ConfigError(f"--{err}") from err
    _check(H["resume"] in RESUME_MODES or RUN_ID.fullmatch(H["resume"]) is not None,
           f"--resume {H['resume']!r} is not valid; valid: {list(RESUME_MODES)} or a run id such as R1a2b3c4d")
    _check_environment(H, spec)
    return spec


def _check_environment(H: dict[str, Any], spec: EngineSpec) -> None:
    """How the process was started (srun, torchrun) fits the engine; stoppers and TensorBoard can be built."""
    check_slurm_tasks()  # srun with several tasks but no torchrun: refused with a hint
    world = (torchrun_env() or torchrun_env({"RANK": "0", "WORLD_SIZE": "1"})).world_size
    _check(world == 1 or spec.torchrun_worker is not None,
           f"--training_mode {spec.name} runs in one process; under torchrun with WORLD_SIZE={world} it would run "
           f"{world} identical copies. Use a multi-process mode "
           f"({sorted(n for n, s in ENGINES.items() if s.torchrun_worker)}) or run without torchrun")
    stoppers_from_settings(H)
    check_tensorboard(H)
