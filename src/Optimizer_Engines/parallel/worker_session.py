"""The launch and teardown that the multi-process engines (``blockwise``, ``async``) share around rank 0's run.

Kept apart from :mod:`worker_pool`, which must stay free of torch: master.py imports it (``available_cpus``) and answers
``--help`` and flag errors without importing torch.
"""
from __future__ import annotations

import contextlib
import tempfile
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from src.Optimizer_Engines.parallel.worker_pool import FAILURE_WAIT_S, WorkerFailed, WorkerPool


@contextlib.contextmanager
def engine_processes(threads: int, spawn: bool, prefix: str, own_group: bool,
                     on_failure: Callable[[WorkerFailed], None] | None = None,
                     torchrun_failure: Callable[[], WorkerFailed | None] | None = None) -> Iterator[WorkerPool | None]:
    """Launch and teardown shared by the multi-process engines (``blockwise``, ``async``), around rank 0's run.

    Sets rank 0's thread count for the run and yields a ``WorkerPool`` (``spawn``) or ``None`` (torchrun started
    the ranks). An exception on the way out becomes the ``WorkerFailed`` behind it when a worker failed (the pool's,
    or ``torchrun_failure()`` under torchrun); whatever happens, the workers are stopped and reaped, the process
    group is destroyed when this run created it (``own_group``), the error folder is removed and the thread count
    restored.

    Args:
        threads: ``torch.set_num_threads`` for rank 0 during the run.
        spawn: start ranks 1 … n−1 as child processes (False under torchrun).
        prefix: the temporary error folder's name prefix.
        own_group: this run initialises the default process group (and so destroys it).
        on_failure: the pool's callback when its monitor ends the process (the report's ``fail``).
        torchrun_failure: under torchrun, the failure another rank left in the store, if any.
    """
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    error_dir = tempfile.TemporaryDirectory(prefix=prefix)
    pool = WorkerPool(error_dir.name, on_failure=on_failure) if spawn else None
    try:
        yield pool
    except BaseException as err:
        failure = None
        if pool is not None:
            failure = pool.claim_failure(wait_s=0.0 if isinstance(err, KeyboardInterrupt) else FAILURE_WAIT_S)
        elif torchrun_failure is not None and dist.is_initialized():
            failure = torchrun_failure()
        if failure is not None:
            raise failure from err
        raise
    finally:
        if pool is not None:
            pool.shutdown()
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
        error_dir.cleanup()
        torch.set_num_threads(threads_before)
