"""Checkpoints: everything that decides the rest of a run, written atomically, verified when read.

A checkpoint is taken at a round boundary and holds the centre model, every block copy (as the tensors in which it
differs from the centre: after a round's scatter that is usually a few BatchNorm buffers, so a checkpoint of a
block-wise run is not B times the model), every optimiser state, the RNG states (torch, CUDA, NumPy, Python) of
every process, the round and counters, the history, the timers, the stoppers' and measurement units' state. The
batch stream needs no state: batch t is a pure function of (seed, batch size, t).

File: ``checkpoints/<run id>/round_<round>.pt`` under the output root = a magic line, the SHA-256 of the payload,
then the payload (``torch.save`` of plain containers and tensors, read back with ``weights_only=True``). Written to
a temporary file, flushed to disk, renamed; the newest ``keep`` files stay. A truncated or corrupt file fails its
checksum and the one before it is used.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from src.Buliding_Units.Model_frames import Counters, Frame
from src.Runs.state import apply_copy_state, copy_differences, rng_state, set_rng_state

FORMAT = 1
MAGIC = b"blockwise-checkpoint 1\n"


class CheckpointError(RuntimeError):
    """No usable checkpoint: the message says what was found and why each file was refused."""


def frame_state(frame: Frame) -> dict[str, Any]:
    """The checkpoint payload of ``frame`` at a round boundary (a multi-process engine's ``ranks_state`` adds the
    other ranks' copies, optimisers and RNG)."""
    copies = getattr(frame, "distributed_models", {})
    # the other ranks' state first: an engine may finish work in flight there (the asynchronous server applies the
    # updates in flight), and everything below must describe the state after it
    remote = frame.engine.ranks_state() if frame.engine is not None else None
    state: dict[str, Any] = {
        "format": FORMAT, "run_id": frame.run_id, "H": dict(frame.H), "round": frame.round, **asdict(frame.counters),
        "stop_reason": frame.stop_reason,
        "elapsed": time.perf_counter() - frame.run.start_time, "timers": dict(frame.timers),
        "history": list(frame.history), "centre": frame.center_model.state_dict(),
        "optimizer": frame.optimizer.state_dict() if frame.optimizer is not None else None,
        "copies": {b: copy_differences(m, frame.center_model) for b, m in copies.items()},
        "block_optimizers": {b: o.state_dict() for b, o in getattr(frame, "block_optimizers", {}).items()},
        "rng": {0: rng_state()},
        "stoppers": [u.state_dict() for u in frame.stopper_units],
        "measurements": [u.state_dict() for u in frame.measure_units],
        "schedules": [u.state_dict() for u in frame.schedule_units],
        "batch_cursor": frame.batch_cursor, "current_lrs": list(frame.current_lrs), "pool_order": frame.pool_order,
        "engine": frame.engine.state_dict() if frame.engine is not None else None,
    }
    if remote is not None:
        for key in ("copies", "block_optimizers", "rng"):
            state[key].update(remote[key])
    return state


def restore(frame: Frame, state: dict[str, Any]) -> None:
    """Put ``frame`` (freshly built with the same settings) in the state of the checkpoint, copies included.

    The RNG states of every rank and the engine's state wait in ``frame.run.resumed`` for the engine to take them.
    """
    frame.center_model.load_state_dict(state["centre"])
    if frame.optimizer is not None and state["optimizer"] is not None:
        frame.optimizer.load_state_dict(state["optimizer"])
    for b, replica in getattr(frame, "distributed_models", {}).items():
        apply_copy_state(replica, frame.center_model, state["copies"].get(b, {}))
        frame.block_optimizers[b].load_state_dict(state["block_optimizers"][b])
    frame.round = state["round"]  # before the measurement units: they keep their records up to this round
    for unit, unit_state in zip(frame.stopper_units, state["stoppers"]):
        unit.load_state_dict(unit_state)
    for unit, unit_state in zip(frame.measure_units, state["measurements"]):
        unit.load_state_dict(unit_state, frame)
    for unit, unit_state in zip(frame.schedule_units, state["schedules"]):
        unit.load_state_dict(unit_state)
    frame.batch_cursor, frame.current_lrs = state["batch_cursor"], list(state["current_lrs"])
    frame.pool_order, frame.pool_size = state["pool_order"], None  # the next round's schedule rebuilds the pool
    frame.round = state["round"]
    fresh = Counters()  # a checkpoint written before a counter existed restarts it afresh
    for key in (f.name for f in fields(Counters)):
        setattr(frame.counters, key, state.get(key, getattr(fresh, key)))
    frame.stop_reason, frame.run.elapsed = state["stop_reason"], state["elapsed"]
    frame.timers.update(state["timers"])
    frame.history = list(state["history"])
    frame.run.resumed = {"rng": state["rng"], "engine": state.get("engine")}
    set_rng_state(state["rng"][0])


class Checkpointer:
    """Writes and finds the checkpoints of one run in ``folder``, keeping the newest ``keep``."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = Path(folder), keep

    def files(self) -> list[Path]:
        """The checkpoint files, newest first."""
        return sorted(self.folder.glob("round_*.pt"), reverse=True)

    def save(self, frame: Frame) -> Path:
        """Write the checkpoint of ``frame`` atomically; returns its path."""
        buffer = io.BytesIO()
        torch.save(frame_state(frame), buffer)
        data = buffer.getvalue()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"round_{frame.round:08d}.pt"
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk, a signal: no half-written file is left behind
            tmp.unlink(missing_ok=True)
            raise
        for old in sorted(self.files(), key=lambda p: p.stat().st_mtime, reverse=True)[self.keep:]:
            old.unlink(missing_ok=True)  # the oldest written go, whatever their names
        for stale in self.folder.glob("round_*.pt.tmp*"):  # a write cut short by a kill (the run lock is ours)
            stale.unlink(missing_ok=True)
        return path

    @staticmethod
    def read(path: Path) -> dict[str, Any]:
        """One checkpoint's payload, verified.

        Raises:
            CheckpointError: unreadable, not a checkpoint, truncated or altered (checksum mismatch).
        """
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path}: unreadable ({err})") from err
        if not blob.startswith(MAGIC):
            raise CheckpointError(f"{path}: not a checkpoint of this format")
        digest, _, data = blob[len(MAGIC):].partition(b"\n")
        if hashlib.sha256(data).hexdigest().encode() != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt, {len(blob)} bytes)")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    def latest(self, run: str | None = None) -> tuple[dict[str, Any], Path, list[str]]:
        """The newest checkpoint that verifies (and belongs to run ``run``, at the round its name says), its path,
        and a message for each newer one that did not.

        Raises:
            CheckpointError: there is none that verifies.
        """
        problems = []
        for path in self.files():
            try:
                state = self.read(path)
                if run is not None and state.get("run_id") != run:
                    raise CheckpointError(f"{path}: a checkpoint of run {state.get('run_id')}, not of {run}")
                if state.get("round") != int(path.stem.split("_")[-1]):
                    raise CheckpointError(f"{path}: holds round {state.get('round')}, not the round of its name")
                return state, path, problems
            except CheckpointError as err:
                problems.append(str(err))
        raise CheckpointError(f"no usable checkpoint in {self.folder}" + (": " + "; ".join(problems)
                                                                           if problems else " (none written)"))
