"""When the measurement units run: every ``measurement_sampling_rate`` rounds, at the rounds ``measurement_rounds``
lists (or log-spaced rounds), and once at the end of the run.

The measured rounds are the union of three sets (each round measured once):

* every ``measurement_sampling_rate``-th round (0 = none of these);
* ``measurement_rounds``: an explicit list such as ``[0, 5, 20]``, or ``"log"`` = 0, 1, 3, 10, 30, 100, 300, …
  up to the last round (``None``, ``""`` or ``[]`` = none);
* the end of the run (the last round, or the round a stopper stopped at), whenever either of the two above is on.

Round 0 is the model before any training. The schedule is a pure function of the settings and the round, so a
resumed run measures the same rounds as an uninterrupted one. Frames and plugins floor: imports nothing above it.
"""
from __future__ import annotations

from typing import Any, Mapping

LOG = "log"


def log_rounds(total: int) -> list[int]:
    """0, 1, 3, 10, 30, 100, 300, … below ``total``, and ``total`` itself (the end of the run)."""
    rounds, decade = {0, total}, 1
    while decade < total:
        rounds |= {r for r in (decade, 3 * decade) if r < total}
        decade *= 10
    return sorted(rounds)


def parse_measurement_rounds(spec: Any, total: int) -> list[int]:
    """The rounds ``spec`` asks for, sorted and without repeats.

    Args:
        spec: ``None``, ``""`` or ``[]`` (none), ``"log"``, or a list of integer rounds in ``[0, total]``.
        total: the run's ``rounds``.

    Raises:
        ValueError: naming the bad value and what is valid.
    """
    if spec is None or spec == "" or (isinstance(spec, (list, tuple)) and not spec):
        return []
    if isinstance(spec, str) and spec.strip().lower() == LOG:
        return log_rounds(total)
    example = sorted({0, total // 2, total})  # within [0, total], as the message promises
    valid = f"valid: {LOG!r} or a list of integer rounds in [0, {total}] such as {example}"
    if not isinstance(spec, (list, tuple)):
        raise ValueError(f"measurement_rounds {spec!r} is not valid; {valid}")
    bad = [r for r in spec if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= total]
    if bad:
        raise ValueError(f"measurement_rounds {list(spec)!r}: {bad!r} not valid; {valid}")
    return sorted(set(spec))


def measuring(H: Mapping[str, Any]) -> bool:
    """Whether the run measures at all (and so once at its end)."""
    return H["measurement_sampling_rate"] > 0 or bool(parse_measurement_rounds(H.get("measurement_rounds"),
                                                                                   H["rounds"]))


def measurement_due(round_index: int, H: Mapping[str, Any]) -> bool:
    """Whether the units measure after ``round_index`` rounds (the end of the run aside: the loop measures there
    once, whatever this says)."""
    rate = H["measurement_sampling_rate"]
    if rate > 0 and round_index > 0 and round_index % rate == 0:
        return True
    return round_index in parse_measurement_rounds(H.get("measurement_rounds"), H["rounds"])


def scheduled_rounds(H: Mapping[str, Any]) -> list[int]:
    """Every round a run of ``H['rounds']`` rounds that no stopper stops measures at, in order."""
    if not measuring(H):
        return []
    return [r for r in range(H["rounds"] + 1) if measurement_due(r, H) or r == H["rounds"]]
