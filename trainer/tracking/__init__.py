"""MLflow tracking from the workers: the tracker, its buffer, the phase child runs and their
records, and the per-layer plots.

Import the modules themselves: ``trainer.tracking.buffer``, ``phase_records``, ``plots``, ``runs``, ``store``,
``tracker``."""
