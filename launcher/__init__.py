"""Command line, configuration and the driver-side phase pipeline."""
