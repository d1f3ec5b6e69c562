"""Finished runs: `tdcompress compare` (tables, Pareto fronts, plots) and `tdcompress records`
(run records as JSON files, and back into MLflow)."""
