"""Checkpoints: the atomic, self-verifying files every rank writes, and the registry of what is in them.

Import the modules themselves: ``trainer.checkpoints.files``, ``stateful``."""
