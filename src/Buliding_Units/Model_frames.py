"""Frames: the runtime containers that the engines train.

A ``Frame`` owns the settings ``H``, the device, the ``center_model``, the data and its seeded batch sequence, the
criterion, the optimiser and the plugins, and the training state (round, compute counters, history, timers). Run
plumbing — the report, output paths, checkpoints, the interrupt flag, what a resume restored — sits in one
attribute, ``frame.run`` (a :class:`RunContext`); engines only call ``frame.log``. Behaviour lives in the engines
and the plugins:

* ``Disributed_frame`` adds ``distributed_models`` (one full model copy per block, each with an optimiser over that
  block only) and the communication stage (gather with damping, delay, scatter);
* ``ImageClassifier_frame_*`` use cross-entropy and report accuracy; ``Regression_frame_*`` use MSE in every mode;
  ``LanguageModel_frame_*`` the next-character cross-entropy (accuracy over every target character).

``generate_ModelFrame(H)`` picks the model and the frame from tables.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from src.Architectures.Models import build_model, task_mismatch
from src.blocks import block_bytes, block_tensors
from src.cli import ConfigError
from src.Data import TaskData, load_data
from src.Data.datasets import DEFAULT_CONTEXT
from src.Optimizer_Engines import ENGINES
from src.reporting import Paths, Reporter
from src.utils import available_host_bytes, set_seed

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": lambda params, H: torch.optim.Adam(params, lr=H["step_size"]),
    "sgd": lambda params, H: torch.optim.SGD(params, lr=H["step_size"], momentum=H.get("momentum", 0.9)),
}


def select_device(cuda_core: int) -> torch.device:
    """``cuda:<cuda_core>`` when that GPU exists, else the CPU (-1 asks for it; see :func:`device_note`)."""
    if cuda_core >= 0 and torch.cuda.is_available() and cuda_core < torch.cuda.device_count():
        return torch.device(f"cuda:{cuda_core}")
    return torch.device("cpu")


def device_note(cuda_core: int) -> str | None:
    """A warning when a GPU other than the default 0 was asked for and does not exist (the default falls back to the
    CPU quietly, so a CPU machine runs the defaults without noise)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_core > 0 and cuda_core >= visible:
        return f"--cuda_core {cuda_core}: no such GPU ({visible} visible); running on the CPU"
    return None


def make_optimizer(params: Iterable[nn.Parameter], H: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser named by ``H['optimizer']`` over ``params`` with learning rate ``H['step_size']``."""
    return OPTIMIZERS[H["optimizer"]](list(params), H)


@dataclass
class Counters:
    """Training compute so far, kept by ``loop.count_step`` the same way in every engine and logged in every
    progress record (the README's counter table says what each one counts)."""

    steps: int = 0  # optimiser steps: one per block per local step
    samples: int = 0  # training samples drawn from the data
    block_updates: int = 0  # block-sized updates of the centre: B per entire-model step, 1 per block per round
    forward_sample_passes: int = 0  # samples pushed through a forward pass of the model
    backward_sample_passes: int = 0  # samples pushed back through a backward pass
    bytes_sent: int = 0  # bytes that crossed the (simulated) network: each message's size times its receivers
    messages: int = 0  # messages sent (a broadcast to n receivers is one message)
    link_time: float = 0.0  # seconds the link model charged: latency + size / bandwidth per message
    worker_messages: list[int] = field(default_factory=list)  # per worker (a rank, or a block in one process)
    worker_bytes: list[int] = field(default_factory=list)


COUNTERS = tuple(f.name for f in fields(Counters))[:5]  # the compute counters; the rest is communication


def link_seconds(H: Mapping[str, Any], nbytes: float) -> float:
    """The simulated network's time for one message of ``nbytes``: ``link_latency + nbytes / link_bandwidth``
    (bandwidth 0 = infinite; ``communication_delay`` is the deprecated name of the latency)."""
    latency = H.get("link_latency", 0.0) or H.get("communication_delay", 0.0)
    bandwidth = H.get("link_bandwidth", 0.0)
    return latency + (nbytes / bandwidth if bandwidth > 0 else 0.0)


@dataclass(eq=False)
class RunContext:
    """The run's plumbing, reached through ``frame.run``: nothing in it changes what is computed.

    ``dol1.py`` fills it; a frame built in a notebook or a test gets an empty one (no report, default paths).
    ``checkpointer`` writes checkpoints at round boundaries (the run-records wing); ``interrupt`` is a signal number
    set by the script's handler (the loop checkpoints and stops at the next round boundary); ``elapsed`` is the
    training time before a resume; ``resumed`` holds what a checkpoint restored beyond the frame: every rank's RNG
    state (``"rng"``) and the engine's state (``"engine"``, handed to its :class:`~loop.EngineState`).
    """

    id: str | None = None
    paths: Paths = field(default_factory=Paths)
    reporter: Reporter | None = None
    units_text: str | None = None
    checkpointer: Any = None
    checkpointed_round: int | None = None
    interrupt: int | None = None
    start_time: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    resumed: dict[str, Any] = field(default_factory=dict)


def _counter(name: str) -> property:
    return property(lambda self: getattr(self.counters, name), lambda self, v: setattr(self.counters, name, v),
                    doc=f"``frame.counters.{name}``")


@dataclass(eq=False)
class Frame:
    """Runtime container of one run: settings, model, data, criterion, optimiser, plugins and training state.

    Set by the engines while training: ``round`` (completed rounds), ``counters`` (also readable as ``frame.steps``,
    ``frame.samples``, …), ``history`` (one metrics dict per progress check), ``timers`` (seconds of compute,
    communication, logging, measurement), ``stop_reason``/``stop_kind``. An engine with state of its own sets
    ``engine`` (see ``loop.EngineState``).
    """

    H: dict[str, Any]
    device: torch.device
    center_model: nn.Module
    data: TaskData
    criterion: nn.Module
    task: str = "classification"
    optimizer: torch.optim.Optimizer | None = None
    measure_units: list = field(default_factory=list)
    stopper_units: list = field(default_factory=list)
    schedule_units: list = field(default_factory=list)
    round: int = 0
    counters: Counters = field(default_factory=Counters)
    history: list[dict[str, Any]] = field(default_factory=list)
    timers: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("compute", "communication", "logging", "measurement"), 0.0))
    stop_reason: str | None = None
    stop_kind: str | None = None  # the stopper's machine-readable reason ("non_finite", "patience", "target", …)
    run: RunContext = field(default_factory=RunContext)
    engine: Any = None

    steps, samples, block_updates = _counter("steps"), _counter("samples"), _counter("block_updates")
    forward_sample_passes, backward_sample_passes = _counter("forward_sample_passes"), _counter("backward_sample_passes")
    bytes_sent = _counter("bytes_sent")

    def __post_init__(self) -> None:
        self.train_batches = self.data.batches(self.H["batch_size"], self.H["seed"])
        self.H_initial = dict(self.H)  # the settings before any schedule changed K, active_share or gamma
        self.batch_cursor = 0  # index of the next training batch of a block-wise round (advanced by round_batches)
        self.current_lrs = [self.H["step_size"]] * self.n_blocks  # per block, as schedules set them
        self.pool_order: torch.Tensor | None = None  # a curriculum's sample order (easiest first)
        self.pool_size: int | None = None  # a curriculum's current pool
        self.round_changes: dict[str, Any] = {}  # the schedules' changes of the round being trained

    @property
    def n_blocks(self) -> int:
        return len(self.center_model.blocks)

    @property
    def run_id(self) -> str:
        return self.run.id or "R00000000"

    @property
    def paths(self) -> Paths:
        return self.run.paths

    @property
    def reporter(self) -> Reporter | None:
        return self.run.reporter

    def log(self, message: str) -> None:
        """Write to the report when there is one."""
        if self.run.reporter is not None:
            self.run.reporter.log(message)

    def send(self, worker: int, nbytes: int, receivers: int = 1) -> float:
        """Count one message of ``nbytes`` sent by (or to) ``worker`` for ``receivers``; returns its time on the
        simulated link (the caller sleeps it, or adds it to virtual time). No receivers, no message."""
        if receivers < 1:
            return 0.0
        c = self.counters
        for counts in (c.worker_messages, c.worker_bytes):
            counts.extend([0] * (worker + 1 - len(counts)))
        c.worker_messages[worker] += 1
        c.worker_bytes[worker] += nbytes * receivers
        c.messages, c.bytes_sent = c.messages + 1, c.bytes_sent + nbytes * receivers
        seconds = link_seconds(self.H, nbytes)
        c.link_time += seconds
        return seconds


class ImageClassifier_frame_entire(Frame):
    """Whole-model training of a classifier (cross-entropy, accuracy reported)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.optimizer is None:
            self.optimizer = make_optimizer(self.center_model.parameters(), self.H)


class Regression_frame_entire(ImageClassifier_frame_entire):
    """Whole-model training of a regressor (MSE in every mode; no accuracy)."""


class Disributed_frame(Frame):
    """A frame with one model copy per block (``distributed_models[b]``) and the communication stage.

    Each copy optimises its own block only (the other blocks' parameters do not require grad in that copy); its
    optimiser lives for the whole run. ``owned_blocks`` restricts the copies to a subset (one worker of a
    multi-process engine owns only its blocks).
    """

    def __init__(self, *args: Any, owned_blocks: Iterable[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        owned = range(self.n_blocks) if owned_blocks is None else sorted(owned_blocks)
        self.distributed_models: dict[int, nn.Module] = {}
        self.block_optimizers: dict[int, torch.optim.Optimizer] = {}
        for b in owned:
            replica = copy.deepcopy(self.center_model)
            for i, block in enumerate(replica.blocks):
                block.requires_grad_(i == b)
            self.distributed_models[b] = replica
            self.block_optimizers[b] = make_optimizer(replica.blocks[b].parameters(), self.H)

    def deviation(self, blocks: Iterable[int]) -> float:
        """L2 distance between each copy's own block and the centre's, over ``blocks`` (before the gather)."""
        total = 0.0
        with torch.no_grad():
            for b in blocks:
                for mine, centre in zip(self.distributed_models[b].blocks[b].parameters(),
                                        self.center_model.blocks[b].parameters()):
                    total += (mine - centre).double().pow(2).sum().item()
        return math.sqrt(total)

    def gather_block(self, b: int, source: nn.Module | None = None) -> None:
        """centre_b <- centre_b + gamma·(source_b − centre_b); gamma = 1 is a plain copy. Integer buffers are copied."""
        gamma = self.H.get("gamma", 1.0)
        source = self.distributed_models[b].blocks[b] if source is None else source
        with torch.no_grad():
            for dst, src in zip(block_tensors(self.center_model.blocks[b]), block_tensors(source)):
                if gamma == 1.0 or not dst.is_floating_point():
                    dst.copy_(src)
                else:
                    dst.add_(src - dst, alpha=gamma)

    def scatter(self, blocks: Iterable[int] | None = None, to: Iterable[int] | None = None) -> None:
        """Copy the centre's ``blocks`` (default: all) into the copies ``to`` (default: every owned copy)."""
        blocks = range(self.n_blocks) if blocks is None else list(blocks)
        with torch.no_grad():
            for c in self.distributed_models.keys() if to is None else to:
                for b in blocks:
                    for dst, src in zip(block_tensors(self.distributed_models[c].blocks[b]),
                                        block_tensors(self.center_model.blocks[b])):
                        dst.copy_(src)

    def communicate(self, blocks: Iterable[int]) -> float:
        """The communication stage: deviation, gather ``blocks`` into the centre, the link's time, scatter.

        As if each block were its own worker: each active block's new values are one message to the B − 1 others,
        sent one after another; their time on the link model is slept and counted as communication. Returns the
        deviation (measured before the gather)."""
        blocks = list(blocks)
        dev = self.deviation(blocks)
        for b in blocks:
            self.gather_block(b)
        link = sum(self.send(b, block_bytes(self.center_model.blocks[b]), self.n_blocks - 1) for b in blocks)
        if link > 0:
            time.sleep(link)
        self.scatter(blocks)
        return dev


class ImageClassifier_frame_blockwise(Disributed_frame):
    """Block-wise training of a classifier (cross-entropy, accuracy reported)."""


class Regression_frame_blockwis(Disributed_frame):
    """Block-wise training of a regressor (MSE in every mode; no accuracy)."""


class LanguageModel_frame_entire(ImageClassifier_frame_entire):
    """Whole-model training of a next-character model (cross-entropy over every position, accuracy per character)."""


class LanguageModel_frame_blockwise(ImageClassifier_frame_blockwise):
    """Block-wise training of a next-character model."""


class NextTokenCrossEntropy(nn.CrossEntropyLoss):
    """The language_model loss: logits (N, T, V) and targets (N, T) -> the mean cross-entropy over all N·T
    characters (``reduction="none"``: (N, T)), in nats; bits per character = loss / ln 2."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = super().forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss.view(targets.shape) if self.reduction == "none" else loss


# (task, block copies?) -> (frame class, criterion factory)
FRAMES: dict[tuple[str, bool], tuple[type[Frame], Callable[[], nn.Module]]] = {
    ("classification", False): (ImageClassifier_frame_entire, nn.CrossEntropyLoss),
    ("classification", True): (ImageClassifier_frame_blockwise, nn.CrossEntropyLoss),
    ("regression", False): (Regression_frame_entire, nn.MSELoss),
    ("regression", True): (Regression_frame_blockwis, nn.MSELoss),
    ("language_model", False): (LanguageModel_frame_entire, NextTokenCrossEntropy),
    ("language_model", True): (LanguageModel_frame_blockwise, NextTokenCrossEntropy),
}

MEMORY_SHARE = 0.8  # a model (with its copies and optimiser state) may take at most this share of free memory


def _build_checked(H: Mapping[str, Any], data: TaskData, device: torch.device, copies: int) -> nn.Module:
    """Build the model after checking on the meta device (no memory) that it fits the data and the memory;
    ``copies`` counts the extra model copies of a block-wise frame, Adam's state doubles the parameters."""
    def build(shape: tuple[int, ...] = tuple(data.input_shape)) -> nn.Module:
        return build_model(H["model"], H["config"], shape, data.output_dim, beta=H["beta"],
                           voting_method=H["voting_method"], heads=H.get("heads", 0))
    try:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in build().parameters())
    except (ValueError, TypeError) as err:
        blame_config = f"--config {H['config']!r} does not fit --model {H['model']}"
        if "input_shape" not in str(err):
            raise ConfigError(f"{blame_config}: {err}") from err
        try:  # would the config build on inputs of the other kind? then the data set is what does not fit
            with torch.device("meta"):
                build((3, 32, 32) if len(data.input_shape) != 3 else (3 * 32 * 32,))
        except (ValueError, TypeError) as config_err:
            raise ConfigError(f"{blame_config}: {config_err}") from config_err
        raise ConfigError(f"--model {H['model']} cannot take --dataset_name {H['dataset_name']} (one sample has "
                          f"shape {tuple(data.input_shape)}): {err}") from err
    need = 4 * n_params * (3 + copies)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_host_bytes()
    if need > MEMORY_SHARE * free:
        raise ConfigError(f"--config {H['config']!r}: --model {H['model']} would have {n_params:,} parameters, "
                          f"about {need / 2**30:.1f} GiB with optimiser state and block copies, more than "
                          f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}")
    return build().to(device)


def generate_ModelFrame(H: Mapping[str, Any], *, device: torch.device | None = None, units: Iterable[Any] = (),
                        owned_blocks: Iterable[int] | None = None, run: RunContext | None = None,
                        block_copies: bool | None = None) -> Frame:
    """Build data, model, criterion and the right frame for ``H``.

    The centre model is created right after ``set_seed(H['seed'])``, so every process building the same H gets the
    same initial weights. ``block_copies`` (one model copy per block) is the engine's choice; by default the
    engine table's entry of ``H['training_mode']``.

    Raises:
        ConfigError: the data set cannot be loaded, the config does not fit the model, or the mode is unknown.
    """
    H = dict(H)
    if block_copies is None:
        if H["training_mode"] not in ENGINES:
            raise ConfigError(f"--training_mode {H['training_mode']!r} is not in the engine table: resolve it first "
                              f"(src.Optimizer_Engines.resolve_engine) and pass block_copies")
        block_copies = ENGINES[H["training_mode"]].block_copies
    device = device if device is not None else select_device(H["cuda_core"])
    try:
        data = load_data(H["dataset_name"], root=H.get("data_root") or None, device=device, seed=H["seed"],
                         context=H.get("context", DEFAULT_CONTEXT))
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    if (mismatch := task_mismatch(H["model"], H["dataset_name"], data.task)) is not None:
        raise ConfigError(mismatch)
    set_seed(H["seed"])
    model = _build_checked(H, data, device, copies=(len(H["config"]) + 2) if block_copies else 0)
    if H["batch_size"] == 0:  # 0 = the largest batch that fits in memory (probed), at most the training set
        if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
            raise ConfigError("--batch_size 0 probes memory on each process, so torchrun ranks could disagree on "
                              "the batch order; give an explicit --batch_size under torchrun")
        from src.batch_probe import get_max_batch_size  # only this setting needs the probe
        sample = data.sample_batch("train", 1, H["seed"])[0][0]
        H["batch_size"] = max(1, min(len(data.train), get_max_batch_size(model, sample, device)))
    units = list(units)
    kinds = {kind: [u for u in units if u.plugin_kind == kind] for kind in ("measure", "stopper", "schedule")}
    frame_cls, criterion = FRAMES[(data.task, block_copies)]
    kwargs = dict(H=H, device=device, center_model=model, data=data, criterion=criterion(), task=data.task,
                  measure_units=kinds["measure"], stopper_units=kinds["stopper"], schedule_units=kinds["schedule"],
                  run=run or RunContext())
    if issubclass(frame_cls, Disributed_frame):
        return frame_cls(owned_blocks=owned_blocks, **kwargs)
    return frame_cls(**kwargs)
