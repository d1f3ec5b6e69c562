"""Ray: local/cluster runtime, job submission, storage paths."""
