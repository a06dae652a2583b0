"""The run-records wing: checkpoints and exact resume, re-running a recorded experiment (``--settings_file``),
reopening a run (``load_run``, ``--measure_only``) and TensorBoard event files. ``dol1.py`` imports a module of it
only when a run asks for it (``--checkpoint_every`` > 0, ``--resume``, ``--settings_file``, ``--measure_only``,
``--tensorboard``); the report, status, metrics, lock and config of every run are the core's (``src/reporting.py``,
``src/records.py``).
"""
