"""Schedule plugins: learning rate, K / active_share / gamma, and curricula, as pure functions of the round.

A schedule's ``at(frame, round)`` returns the changes for that round — ``{"lr": [one per block]}``, ``{"K": 5}``,
``{"pool": indices}`` — computed from the round, the run's seed and what the schedule fixed before training, so a
resumed run or another rank gets the same answer. The shared loop calls every schedule at the start of every round
and applies the changes (``schedules.apply_changes``); the multi-process engine sends them to every rank. Listed in
``Units.txt`` like the other plugins::

    - LearningRateSchedule scheduler=CosineAnnealingLR T_max=120
    - ParameterSchedule key=K values=[[0,1],[50,5]]
    - ParameterSchedule key=gamma shape=cosine start=1.0 end=0.5
    - Curriculum score=loss pacing=linear start=0.2 full_at=60

Learning-rate schedules are torch's own ``torch.optim.lr_scheduler`` classes, stepped once per round on a private
one-parameter optimiser whose learning rate is then copied to the run's optimisers (every block's, times its
``block_lr_scale``): not re-implemented. ``ReduceLROnPlateau`` is driven by the progress checks (``observe``).
Curricula (Bengio et al., ICML 2009; pacing functions as in Hacohen & Weinshall, ICML 2019): samples ordered by
difficulty train in a growing easiest-first pool (``order=anti``: hardest first); batches are drawn from the pool by
the seeded order, so batch t stays a pure function of (seed, batch size, t, pacing, scores).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from torch import nn

from src.Buliding_Units.schedules import KEYS, ScheduleError


# schedulers that take other schedulers or a function as arguments: not expressible as key=value literals
UNSPELLABLE = ("ChainedScheduler", "LambdaLR", "MultiplicativeLR", "SequentialLR")
MONITORS = ("loss", "accuracy", "test_loss", "test_accuracy")


class ScheduleUnit(ABC):
    """Base class of schedules: ``at(frame, round) -> changes`` for the start of every round.

    ``prepare(frame)`` runs before training and raises ValueError for a schedule this run cannot follow (every
    value of every round is checked there). ``observe(frame, record)`` sees each progress check.
    """

    plugin_kind = "schedule"  # how the frame factory files it: measure_units, stopper_units or schedule_units

    @abstractmethod
    def at(self, frame: Any, round_index: int) -> dict[str, Any]:
        """The changes for round ``round_index`` (empty when nothing changes)."""

    def prepare(self, frame: Any) -> None:
        """Check, before training, that the schedule fits this run; raise ValueError if not."""

    def observe(self, frame: Any, record: dict[str, Any]) -> None:
        """See the metrics of a progress check (for schedules driven by them)."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the round (most schedules: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


def _check_lr(lr: float, round_index: int) -> float:
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ScheduleError(f"the learning rate at round {round_index} would be {lr!r}; it must be finite and > 0")
    return lr


class LearningRateSchedule(ScheduleUnit):
    """A ``torch.optim.lr_scheduler`` class, stepped once per round, for the whole model or every block.

    Args:
        scheduler: the class name (``LinearLR``, ``StepLR``, ``CosineAnnealingLR``, ``OneCycleLR``,
            ``ReduceLROnPlateau``, …); every other argument goes to it (``T_max=120``, ``step_size=30``, …).
            Defaults filled in when missing: ``CosineAnnealingLR`` ``T_max`` = rounds; ``OneCycleLR`` ``max_lr`` =
            ``--step_size`` and ``total_steps`` = rounds + 1.
        block_lr_scale: one factor per block (block-wise modes): block b's learning rate is the schedule's times it.
        monitor: the metric ``ReduceLROnPlateau`` watches at each progress check.

    Cost: one scheduler step per round on a one-parameter optimiser. Writes nothing (``lr`` is in the metrics).
    """

    def __init__(self, scheduler: str = "CosineAnnealingLR", block_lr_scale: list | None = None,
                 monitor: str = "test_loss", **kwargs: Any) -> None:
        module = torch.optim.lr_scheduler
        names = sorted(n for n in dir(module) if isinstance(getattr(module, n), type) and n not in UNSPELLABLE
                       and n != "LRScheduler" and (issubclass(getattr(module, n), module.LRScheduler)
                                                   or n == "ReduceLROnPlateau"))
        if scheduler not in names:
            raise ValueError(f"unknown scheduler {scheduler!r}; valid: {names}")
        self.scheduler, self.kwargs, self.monitor = scheduler, kwargs, monitor
        self.block_lr_scale = None if block_lr_scale is None else [float(s) for s in block_lr_scale]
        self._lrs: list[float] = []
        self._plateau: Any = None

    def config(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler, **self.kwargs, "block_lr_scale": self.block_lr_scale}

    def _start(self, frame: Any) -> None:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=frame.H["step_size"])
        kwargs = dict(self.kwargs)
        if self.scheduler == "CosineAnnealingLR":
            kwargs.setdefault("T_max", frame.H["rounds"])  # one cosine over the run unless T_max says otherwise
        if self.scheduler == "OneCycleLR":
            kwargs.setdefault("max_lr", frame.H["step_size"])
            kwargs.setdefault("total_steps", frame.H["rounds"] + 1)
        self._sched = getattr(torch.optim.lr_scheduler, self.scheduler)(optimizer, **kwargs)
        self._optimizer, self._lrs = optimizer, [optimizer.param_groups[0]["lr"]]
        self._plateau = self._sched if self.scheduler == "ReduceLROnPlateau" else None

    def _lr(self, round_index: int) -> float:
        if self._plateau is not None:
            return self._optimizer.param_groups[0]["lr"]
        while len(self._lrs) <= round_index:  # step the private scheduler up to the round (memoised)
            self._optimizer.step()
            self._sched.step()
            self._lrs.append(self._optimizer.param_groups[0]["lr"])
        return self._lrs[round_index]

    controls = "lr"

    def prepare(self, frame: Any) -> None:
        if self.scheduler == "ReduceLROnPlateau" and self.monitor not in MONITORS:
            raise ValueError(f"unknown monitor {self.monitor!r} for ReduceLROnPlateau; valid: {list(MONITORS)}")
        try:
            self._start(frame)
            for r in range(frame.H["rounds"]):  # every round the run trains: a bad value is bad input
                _check_lr(self._lr(r), r)
        except (TypeError, ValueError, ZeroDivisionError) as err:
            raise ValueError(f"LearningRateSchedule {self.scheduler}{self.kwargs}: {err}") from err
        if self._plateau is not None and not 0 < self._plateau.factor < 1:
            raise ValueError(f"LearningRateSchedule ReduceLROnPlateau: factor must be in (0, 1), got "
                             f"{self._plateau.factor}")
        if self.block_lr_scale is not None:
            if not hasattr(frame, "distributed_models"):
                raise ValueError("block_lr_scale needs a block-wise mode (one optimiser per block)")
            if len(self.block_lr_scale) != frame.n_blocks or min(self.block_lr_scale) <= 0:
                raise ValueError(f"block_lr_scale needs {frame.n_blocks} positive factors (one per block), got "
                                 f"{self.block_lr_scale}")

    def at(self, frame: Any, round_index: int) -> dict[str, Any]:
        lr = _check_lr(self._lr(round_index), round_index)  # ReduceLROnPlateau decides while the run goes on
        scale = self.block_lr_scale or [1.0] * frame.n_blocks
        return {"lr": [lr * s for s in scale]}

    def observe(self, frame: Any, record: dict[str, Any]) -> None:
        if self._plateau is not None and record.get(self.monitor) is not None:
            self._plateau.step(record[self.monitor])

    def state_dict(self) -> dict[str, Any]:
        return {"plateau": self._plateau.state_dict(), "lr": self._optimizer.param_groups[0]["lr"]} \
            if self._plateau is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._plateau is not None and state:
            self._plateau.load_state_dict(state["plateau"])
            self._optimizer.param_groups[0]["lr"] = state["lr"]


class ParameterSchedule(ScheduleUnit):
    """``K``, ``active_share`` or ``gamma`` by round: step-wise ``values=[[round, value], …]`` (each value holds from
    its round on) or ``shape=linear|cosine`` from ``start`` (round 0) to ``end`` (round ``until``, default the
    last); with neither, the run's own value throughout. Cost: nothing. Writes nothing (the value is in the
    metrics)."""

    def __init__(self, key: str = "K", values: list | None = None, shape: str | None = None,
                 start: float | None = None, end: float | None = None, until: int | None = None) -> None:
        if key not in KEYS:
            raise ValueError(f"unknown key {key!r}; valid: {sorted(KEYS)}")
        if values is not None and shape is not None:
            raise ValueError("give either values=[[round, value], ...] or shape=linear|cosine with start= and end=, "
                             "not both")
        if shape is not None and (shape not in ("linear", "cosine") or start is None or end is None):
            raise ValueError(f"shape must be 'linear' or 'cosine' with start= and end=, got shape={shape!r}, "
                             f"start={start!r}, end={end!r}")
        if values is not None and not (isinstance(values, list) and values and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], int) and p[0] >= 0 for p in values)):
            raise ValueError(f"values must be a non-empty list of [round, value] pairs with whole rounds >= 0, got "
                             f"{values!r}")
        if until is not None and (not isinstance(until, int) or until < 0):
            raise ValueError(f"until must be a whole round >= 0, got {until!r}")
        self.key, self.shape, self.start, self.end, self.until = key, shape, start, end, until
        self.values = sorted((int(r), v) for r, v in values) if values is not None else None

    def config(self) -> dict[str, Any]:
        return {"key": self.key, "values": self.values, "shape": self.shape, "start": self.start, "end": self.end,
                "until": self.until}

    def value(self, frame: Any, round_index: int) -> float:
        if self.shape is None:
            current = frame.H_initial[self.key]
            for r, v in self.values or []:
                if r <= round_index:
                    current = v
            return current
        until = frame.H["rounds"] if self.until is None else self.until
        fraction = min(round_index / until, 1.0) if until > 0 else 1.0
        if self.shape == "cosine":
            fraction = (1 - math.cos(math.pi * fraction)) / 2
        return self.start + (self.end - self.start) * fraction

    def _cast(self, value: float, round_index: int) -> Any:
        kind, low, high = KEYS[self.key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ScheduleError(f"ParameterSchedule gives {self.key} = {value!r} at round {round_index}: not a number")
        value = int(round(value)) if kind is int else float(value)
        ok = (value >= low if kind is int else value > low) and (high is None or value <= high)
        if not ok:
            bounds = f">= {low}" if kind is int else f"in ({low}, {high}]"
            raise ScheduleError(f"ParameterSchedule gives {self.key} = {value:.6g} at round {round_index}, which must be "
                             f"{bounds}")
        return value

    @property
    def controls(self) -> str:
        return self.key

    def prepare(self, frame: Any) -> None:
        if self.key in ("K", "active_share") and not hasattr(frame, "distributed_models"):
            raise ValueError(f"a {self.key} schedule needs a block-wise mode; --training_mode "
                             f"{frame.H['training_mode']} takes one whole-model step per round")
        for r in range(frame.H["rounds"] + 1):
            self._cast(self.value(frame, r), r)

    def at(self, frame: Any, round_index: int) -> dict[str, Any]:
        return {self.key: self._cast(self.value(frame, round_index), round_index)}


PACINGS = ("linear", "root", "exponential", "step")
SCORES = ("loss", "margin", "file")


def pacing_fraction(pacing: str, start: float, full_at: int, round_index: int) -> float:
    """g(r): the share of the (ordered) training set available at round r."""
    x = min(round_index / max(full_at, 1), 1.0)
    return {"linear": start + (1 - start) * x, "root": start + (1 - start) * math.sqrt(x),
            "exponential": start ** (1 - x), "step": start if round_index < full_at else 1.0}[pacing]


@torch.no_grad()
def difficulty(model: nn.Module, criterion: nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
               kind: str) -> torch.Tensor:
    """Per-sample difficulty on the training set, in eval mode: the loss, or minus the classification margin."""
    was_training = model.training
    model.eval()
    try:
        scores = []
        for start in range(0, len(inputs), 1024):
            x, y = inputs[start:start + 1024], targets[start:start + 1024]
            out = model(x)
            if kind == "loss":
                reduction, criterion.reduction = criterion.reduction, "none"
                losses = criterion(out, y)
                criterion.reduction = reduction
                scores.append(losses.reshape(len(x), -1).mean(dim=1))
            else:
                true = out.gather(1, y.view(-1, 1)).squeeze(1)
                other = out.scatter(1, y.view(-1, 1), float("-inf")).max(dim=1).values
                scores.append(other - true)  # minus the margin: a large margin is easy
        return torch.cat(scores).float().cpu()
    finally:
        model.train(was_training)


class Curriculum(ScheduleUnit):
    """Train on a growing pool of the easiest samples (or the hardest, ``order=anti``).

    Args:
        score: ``loss`` or ``margin`` of the centre model at round ``score_round`` (re-scored every
            ``rescore_every`` rounds for self-paced learning), or ``file`` with ``score_file=path.npy`` (one score
            per training sample, low = easy).
        pacing: ``linear``, ``root``, ``exponential`` or ``step``: the pool is ``g(r)·n`` samples, g rising from
            ``start`` at round 0 to 1 at round ``full_at``.

    Cost: one forward pass over the training set per scoring. Needs a data set held as tensors (digits,
    digits_flat, mini_mnist, the regression sets). Writes nothing (``pool_size`` is in the metrics).
    """

    def __init__(self, score: str = "loss", pacing: str = "linear", start: float = 0.2, full_at: int = 60,
                 order: str = "easy", rescore_every: int = 0, score_file: str | None = None,
                 score_round: int = 0) -> None:
        if pacing not in PACINGS:
            raise ValueError(f"unknown pacing {pacing!r}; valid: {list(PACINGS)}")
        if score not in SCORES or (score == "file") != (score_file is not None):
            raise ValueError(f"score must be one of {list(SCORES)} (score=file with score_file=path.npy), got "
                             f"score={score!r}, score_file={score_file!r}")
        if order not in ("easy", "anti"):
            raise ValueError(f"unknown order {order!r}; valid: ['anti', 'easy']")
        if not 0 < start <= 1 or full_at < 0 or rescore_every < 0 or score_round < 0:
            raise ValueError(f"need 0 < start <= 1 and full_at, rescore_every, score_round >= 0; got start={start}, "
                             f"full_at={full_at}, rescore_every={rescore_every}, score_round={score_round}")
        self.score, self.pacing, self.start, self.full_at, self.order = score, pacing, float(start), int(full_at), order
        self.rescore_every, self.score_file, self.score_round = int(rescore_every), score_file, int(score_round)
        self._order: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {"score": self.score, "pacing": self.pacing, "start": self.start, "full_at": self.full_at,
                "order": self.order, "rescore_every": self.rescore_every, "score_file": self.score_file,
                "score_round": self.score_round}

    controls = "pool"

    def prepare(self, frame: Any) -> None:
        train = frame.data.train
        if not hasattr(train, "tensors"):
            raise ValueError(f"Curriculum needs a data set held as tensors; {frame.H['dataset_name']} is decoded "
                             f"from files (use digits, digits_flat, mini_mnist or a regression set)")
        if self.score == "margin" and frame.task != "classification":
            raise ValueError(f"score=margin needs a classification data set; {frame.H['dataset_name']} is a "
                             f"{frame.task} task (use score=loss: the mean loss per sample, per character for text)")
        if self.score == "file":
            try:
                scores = np.load(self.score_file)
            except (OSError, ValueError) as err:
                raise ValueError(f"score_file {self.score_file!r} cannot be read: {err}") from err
            if not np.issubdtype(scores.dtype, np.number) or not np.isfinite(scores).all():
                raise ValueError(f"score_file {self.score_file!r} must hold finite numbers; it has dtype "
                                 f"{scores.dtype}" + (f" and {int((~np.isfinite(scores)).sum())} non-finite "
                                                      f"values" if np.issubdtype(scores.dtype, np.number) else ""))
            if scores.shape != (len(train),):
                raise ValueError(f"score_file {self.score_file!r} has shape {scores.shape}; the training set of "
                                 f"{frame.H['dataset_name']} needs ({len(train)},): one score per sample")
            self._set_order(torch.as_tensor(scores, dtype=torch.float64))

    def _set_order(self, scores: torch.Tensor) -> None:
        order = torch.argsort(scores, stable=True)  # easiest first
        self._order = order.flip(0) if self.order == "anti" else order

    def _due_scoring(self, round_index: int) -> bool:
        if self.score == "file":
            return False
        if self._order is None:
            return round_index >= self.score_round
        return self.rescore_every > 0 and round_index > self.score_round and \
            (round_index - self.score_round) % self.rescore_every == 0

    def at(self, frame: Any, round_index: int) -> dict[str, Any]:
        """Before ``score_round`` (and its scoring) the whole training set; then the paced pool."""
        changes: dict[str, Any] = {}
        if self._due_scoring(round_index):
            inputs, targets = frame.data.train.tensors
            self._set_order(difficulty(frame.center_model, frame.criterion, inputs, targets, self.score))
            changes["order"] = self._order
        if self._order is None:
            return changes
        if frame.pool_order is None:  # a score file's order, or the first round after a resume
            changes["order"] = self._order
        n = len(self._order)
        changes["pool_size"] = max(1, math.ceil(pacing_fraction(self.pacing, self.start, self.full_at,
                                                                round_index) * n))
        return changes

    def state_dict(self) -> dict[str, Any]:
        return {"order": self._order}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order = state.get("order")
