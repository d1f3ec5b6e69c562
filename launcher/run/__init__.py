"""One `tdcompress run` on the driver: the pipeline, the MLflow parent run and its records, where
`model.init` and distillation teachers come from, signals and failures.

Import the modules themselves: ``launcher.run.init_source``, ``mlflow_model``, ``mlflow_runs``, ``pipeline``,
``run_failure``, ``run_record``, ``signals``, ``teacher_source``."""
