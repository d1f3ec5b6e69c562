"""Trainer: models, data, the engine, the train/eval loop, checkpoints and tracking."""
