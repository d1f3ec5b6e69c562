"""One rank-aware logger for everything a worker prints.

Messages go through :mod:`logging` under the ``tdcompress`` logger, to stdout
as the bare message (the progress lines users and tests read are unchanged).
By default only rank 0 prints, since every rank runs the same loop and would
repeat each line world-size times; with ``TDC_LOG_LEVEL=DEBUG`` every rank
prints, its lines prefixed ``[rank N]`` (rank 0's stay bare), and debug
messages show too.
"""
from __future__ import annotations

import logging
import os
import sys

from trainer.ranks import rank

ROOT = "tdcompress"
LEVEL_ENV = "TDC_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Stdout(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest's capture swaps it), flushing each line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stdout.write(self.format(record) + "\n")
            sys.stdout.flush()
        except Exception:  # logging's own contract: a failing handler must not break the caller
            self.handleError(record)


class _RankFilter(logging.Filter):
    """Rank 0 always; other ranks only when the logger is at debug level (then prefixed with their rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        r = rank()
        if r == 0:
            return True
        if logging.getLogger(ROOT).getEffectiveLevel() > logging.DEBUG:
            return False
        record.msg = f"[rank {r}] {record.msg}"
        return True


def _install() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Stdout) for h in root.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.propagate = False  # the host's root handlers (Ray, pytest) would print each line twice
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    if level not in LEVELS:
        raise ValueError(f"{LEVEL_ENV}={level!r}: allowed {', '.join(LEVELS)}")
    root.setLevel(level)
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``), under the rank-aware ``tdcompress`` logger."""
    _install()
    return logging.getLogger(f"{ROOT}.{name}")
