"""Finished runs: `tdcompress compare` (tables, Pareto fronts, plots), `tdcompress records`
(run records as JSON files, and back into MLflow) and a study read from its records (`records curve`).

Import the modules themselves: ``launcher.results.compare``, ``compare_cli``, ``compare_plot``, ``records``,
``records_cli``, ``records_import``, ``study_curve``, ``study_curve_plot``."""
