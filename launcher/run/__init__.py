"""One `tdcompress run` on the driver: the pipeline, the MLflow parent run and its records, where
`model.init` and distillation teachers come from, signals and failures."""
