"""Finished runs: `tdcompress compare` (tables, Pareto fronts, plots) and `tdcompress records`
(run records as JSON files, and back into MLflow).

Import the modules themselves: ``launcher.results.compare``, ``compare_cli``, ``compare_plot``, ``records``,
``records_cli``, ``records_import``."""
