"""MLflow tracking from the workers: the tracker, its buffer, the phase child runs and their
records, and the per-layer plots."""
