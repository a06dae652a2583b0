"""Sweeps: many ``dol1.py`` runs from a grid of settings, resumable after a crash (the machinery of ``master.py``).

* :mod:`.grid` — the sweep specification and its runs (each a ``dol1.py`` command line with a run id);
* :mod:`.tracker` — ``progress_tracker.json``, written atomically, and the lock that keeps a second master off it;
* :mod:`.launchers` — device slots and the launchers that start, watch, stop and find runs (by attempt token);
* :mod:`.slurm` — each run one submitit job, on SLURM or as local processes (imported by master.py only for
  ``--launcher slurm`` / ``submitit_local``: it needs ``submitit``);
* :mod:`.scheduler` — the loop: start on free slots, watch, record outcomes, retry, adopt live runs on resume;
* :mod:`.compare` — fair comparisons: equal budget, mean ± std over seeds, grid-edge warnings (pure functions);
* :mod:`.summary` — the end-of-sweep tables, CSVs and figures; :mod:`.analysis` — any logged quantity as a pandas
  table (``load_sweep``), seed bands, targets, memory and communication; :mod:`.finished` — a finished sweep read back from its
  tracker (``master.py --summarize``).

Layer: above the engines (it runs ``dol1.py`` processes); it imports only the ground floor of ``src``.
"""
from src.Sweeps.grid import Run, Spec, SweepError, expand, load_spec, sweep_hash, to_argv
from src.Sweeps.launchers import Handle, Launcher, LocalLauncher, Slot, job_slots, plan_slots, visible_gpus
from src.Sweeps.scheduler import ENDED, STATUSES, Scheduler
from src.Sweeps.analysis import load_sweep
from src.Sweeps.finished import sweeps_in_tracker
from src.Sweeps.summary import Summary, check_y, figure_curves, summary_table, sweep_figure, write_summary
from src.Sweeps.tracker import TrackerLocked, now, read_tracker, tracker_lock

__all__ = ["ENDED", "STATUSES", "Handle", "Launcher", "LocalLauncher", "Run", "Scheduler", "Slot", "Summary",
           "Spec", "SweepError", "check_y", "TrackerLocked", "expand", "figure_curves", "job_slots", "load_spec", "load_sweep", "now", "plan_slots",
           "read_tracker", "summary_table", "sweep_figure", "sweep_hash", "sweeps_in_tracker", "to_argv", "tracker_lock",
           "visible_gpus", "write_summary"]
