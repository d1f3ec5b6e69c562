"""Signals a long-running command treats like Ctrl-C."""
from __future__ import annotations

import signal
import threading


def sigterm_interrupts() -> None:
    """SIGTERM (``kill``, a scheduler, ``ray job stop``) ends a run like Ctrl-C: its MLflow runs close KILLED."""

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
