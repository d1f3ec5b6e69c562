"""Fault injection for recovery tests, driven by the ``debug.fail_at`` config section.

It is an ordinary component, so a run's params record it like any other
setting (nothing hides in the environment). It fails once: a marker file in
the run directory, written before the failure, keeps the restarted or resumed
run from failing again at the same point.
"""
from __future__ import annotations

from pathlib import Path

from trainer.component import ComponentBase, LoopState
from trainer.config import FailAt
from trainer.ranks import barrier


class InjectedFailure(RuntimeError):
    """Raised on purpose by :class:`FailureInjector`."""


class FailureInjector(ComponentBase):
    """Raise :class:`InjectedFailure` after the checkpoint of epoch ``at.epoch`` of phase ``phase_index``."""

    name = "fail_at"

    def __init__(self, at: FailAt, phase_index: int, run_dir: Path, rank: int) -> None:
        self.at, self.phase_index, self.rank = at, phase_index, rank
        self.marker = run_dir / f"injected-failure-{at.phase}-{at.epoch}"

    def on_checkpoint(self, loop_state: LoopState) -> None:
        if self.phase_index != self.at.phase or loop_state.epoch != self.at.epoch:
            return
        # Every rank decides before anyone writes the marker, so all ranks agree on whether to fail.
        fire = not self.marker.exists()
        barrier()
        if fire and self.rank == 0:
            self.marker.touch()
        barrier()
        if fire and (self.at.rank is None or self.at.rank == self.rank):
            raise InjectedFailure(f"injected failure after phase {self.at.phase} epoch {self.at.epoch} "
                                  f"on rank {self.rank} (debug.fail_at)")
