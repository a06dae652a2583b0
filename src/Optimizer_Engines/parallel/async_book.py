"""Bookkeeping shared by the two asynchronous engines: who may start an update, staleness, counts, statistics.

Terms (the README draws them):

* the **centre** holds every block's current parameters and buffers; a **worker** owns one or more blocks;
* an **update** of worker w: read the centre, take K local steps on each of its blocks (the other blocks frozen at
  the values read), then write the damped gather ``centre_b <- centre_b + gamma*(x_b - centre_b)`` of its blocks;
* the **staleness** of an update = the number of updates by other workers applied to the centre between its read
  and its write;
* the **bound** ``s`` (stale-synchronous parallel, Ho et al. 2013): a worker that has finished i updates may not
  start its next one while another worker has finished fewer than ``i - s``. ``s = 0`` is the synchronous (Jacobi)
  algorithm, ``s = -1`` removes the bound. With W workers a bounded update can see at most ``(W-1)*(2s+1)`` other
  updates between its read and its write (each other worker can finish at most 2s+1 updates meanwhile);
* **data**: the i-th update of a worker uses the next K batches of the seeded sequence after those of its earlier
  updates — batches i*K ... i*K+K-1 while K is fixed — the same batches as round i of the Jacobi engine.

This module holds no tensors and imports no torch: it is the exact, testable core of both engines.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

UNBOUNDED = -1
HISTOGRAM_BINS = 64  # staleness values >= this share the last bin


def staleness_limit(bound: int, n_workers: int) -> int | None:
    """The largest staleness an update can have under bound ``bound`` with ``n_workers`` workers (None: no limit)."""
    return None if bound < 0 else (n_workers - 1) * (2 * bound + 1)


def assign_blocks(n_blocks: int, n_workers: int) -> list[list[int]]:
    """Worker w owns blocks b with b % n_workers == w (n_workers = 0: one worker per block)."""
    n = n_blocks if n_workers <= 0 else min(n_workers, n_blocks)
    return [[b for b in range(n_blocks) if b % n == w] for w in range(n)]


def check_speeds(speeds: Sequence[float], n_workers: int) -> list[float]:
    """``speeds`` as floats, one per worker (an empty list = all 1.0).

    Raises:
        ValueError: naming the bad value (wrong length, a non-positive or non-numeric entry).
    """
    if not isinstance(speeds, (list, tuple)):
        raise ValueError(f"--worker_speeds must be a list such as [1, 1, 4], got {speeds!r}")
    if len(speeds) == 0:
        return [1.0] * n_workers
    if len(speeds) != n_workers:
        raise ValueError(f"--worker_speeds {list(speeds)} has {len(speeds)} entries; this run has {n_workers} "
                         f"workers (one per block unless --n_workers says otherwise): give {n_workers} entries")
    for s in speeds:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or s != s or s == float("inf"):
            raise ValueError(f"--worker_speeds entries are relative times per local step and must be finite "
                             f"numbers > 0, got {s!r} in {list(speeds)}")
    return [float(s) for s in speeds]


@dataclass
class StalenessBook:
    """The stale-synchronous clock of ``n`` workers and what every update saw.

    ``done[w]``: updates of worker w applied to the centre; ``read_at[w]``: the number of updates applied when w
    read the centre for its update in flight (None: nothing in flight).
    """

    n: int
    bound: int = UNBOUNDED
    blocks_of: list[list[int]] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)
    read_at: list[int | None] = field(default_factory=list)
    writes: int = 0
    block_updates: int = 0
    applied: dict[int, int] = field(default_factory=dict)  # block -> updates applied
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    staleness_sum: int = 0
    staleness_max: int = 0
    clock_gap_max: int = 0  # the largest done[w] - min(done) seen when a worker started: <= bound when bounded
    dropped: int = 0  # updates in flight when the run stopped: computed, never applied
    worker_staleness: list[list[int]] = field(default_factory=list)  # per worker: [sum, max]

    def __post_init__(self) -> None:
        self.done = self.done or [0] * self.n
        self.started = self.started or [0] * self.n
        self.read_at = self.read_at or [None] * self.n
        self.worker_staleness = self.worker_staleness or [[0, 0] for _ in range(self.n)]
        self.applied = self.applied or {b: 0 for blocks in self.blocks_of for b in blocks}

    def may_start(self, w: int) -> bool:
        """Whether worker w (idle) may start its next update now."""
        if self.read_at[w] is not None:
            return False
        if self.bound < 0:
            return True
        slowest = min(d for v, d in enumerate(self.done) if v != w) if self.n > 1 else self.done[w]
        return self.done[w] - slowest <= self.bound

    def on_read(self, w: int) -> None:
        """Worker w read the centre for its next update."""
        if not self.may_start(w):
            raise RuntimeError(f"worker {w} may not start now: done {self.done}, bound {self.bound}")
        self.clock_gap_max = max(self.clock_gap_max, self.done[w] - min(self.done))
        self.read_at[w] = self.writes
        self.started[w] += 1

    def on_write(self, w: int) -> int:
        """Worker w's update was applied to the centre; returns its staleness."""
        if self.read_at[w] is None:
            raise RuntimeError(f"worker {w} wrote without an update in flight")
        staleness = self.writes - self.read_at[w]
        self.read_at[w] = None
        self.writes += 1
        self.done[w] += 1
        for b in self.blocks_of[w]:
            self.applied[b] += 1
        self.block_updates += len(self.blocks_of[w])
        self.histogram[min(staleness, HISTOGRAM_BINS - 1)] += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        mine = self.worker_staleness[w]
        mine[0], mine[1] = mine[0] + staleness, max(mine[1], staleness)
        return staleness

    def on_drop(self, w: int) -> None:
        """Worker w's update in flight is abandoned at the end of the run."""
        self.read_at[w] = None
        self.dropped += 1

    def in_flight(self) -> list[int]:
        return [w for w in range(self.n) if self.read_at[w] is not None]

    def record(self) -> dict[str, Any]:
        """The statistics logged with every progress record."""
        last = max((i for i, c in enumerate(self.histogram) if c), default=0)
        return {"worker_updates": list(self.done),
                "updates_per_block": [self.applied[b] for b in sorted(self.applied)],
                "staleness_mean": self.staleness_sum / self.writes if self.writes else 0.0,
                "staleness_max": self.staleness_max, "staleness_histogram": self.histogram[:last + 1],
                "worker_staleness_mean": [total / d if d else 0.0 for (total, _), d in
                                          zip(self.worker_staleness, self.done)],
                "worker_staleness_max": [high for _, high in self.worker_staleness],
                "clock_gap_max": self.clock_gap_max, "max_staleness": self.bound,
                "updates_in_flight": len(self.in_flight())}  # at the end: the updates dropped

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("n", "bound", "blocks_of", "done", "started", "read_at", "writes",
                                              "block_updates", "applied", "histogram", "staleness_sum",
                                              "staleness_max", "clock_gap_max", "dropped", "worker_staleness")}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "StalenessBook":
        state = dict(state)
        state["applied"] = {int(k): v for k, v in state["applied"].items()}
        return cls(**state)
