"""Stop a dol1.py run in-process at a given round, exactly as its SIGTERM handler would (for resume tests)."""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

from src.Optimizer_Engines import loop


@contextlib.contextmanager
def install(at: int) -> Iterator[None]:
    """While active, the shared loop sees a SIGTERM request when round ``at`` has been trained."""
    original = loop.check_round_stoppers

    def stopper(frame) -> bool:
        if frame.round == at:
            frame.run.interrupt = signal.SIGTERM
        return original(frame)
    loop.check_round_stoppers = stopper
    try:
        yield
    finally:
        loop.check_round_stoppers = original
