"""Measurement plugins that fail on purpose, for master.py's retry tests (named in a Units file by dotted path).

dol1.py puts the project root on sys.path, so ``- tests.sweep_plugins.FailOnce marker=/tmp/x`` imports this module.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from src.Buliding_Units.MeasurementUnit import MeasurementUnit


class FailOnce(MeasurementUnit):
    """Raises on its first measurement ever (it creates ``marker``), succeeds once ``marker`` exists.

    Cost: one file check per measurement. Writes ``marker`` and an empty record per measurement.
    """

    def __init__(self, marker: str):
        super().__init__()
        self.marker = Path(marker)

    def config(self) -> dict[str, Any]:
        return {"marker": str(self.marker)}

    def measure(self, frame: Any) -> dict[str, Any]:
        if not self.marker.exists():
            self.marker.write_text("failed once\n")
            raise RuntimeError(f"FailOnce: first attempt fails on purpose (marker {self.marker})")
        return {}


class AlwaysFail(MeasurementUnit):
    """Raises on every measurement. Cost: none. Writes nothing."""

    def measure(self, frame: Any) -> dict[str, Any]:
        raise RuntimeError("AlwaysFail: fails on purpose")
