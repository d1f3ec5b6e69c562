"""Fault injection for recovery tests, driven by the ``debug`` config section (``fail_at``, ``hold_at``).

They are ordinary components, so a run's params record them like any other
setting (nothing hides in the environment). Each acts once: a marker file in
the run directory, written before it acts, keeps the restarted or resumed
run from failing (or waiting) again at the same point.
"""
from __future__ import annotations

import time
from pathlib import Path

from trainer.config import FailAt, HoldAt
from trainer.core.component import ComponentBase, LoopState
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


class HoldGate(ComponentBase):
    """Wait after the checkpoint of epoch ``at.epoch`` of phase ``phase_index`` until the test releases the run.

    The state a fault test needs (a checkpoint that is not the phase's last, every worker alive and its
    process group up) then holds for as long as the test takes to act, however fast or slow the host.
    """

    name = "hold_at"
    POLL_S = 0.2  # how often a waiting rank looks for the release file

    def __init__(self, at: HoldAt, phase_index: int, run_dir: Path, rank: int) -> None:
        self.at, self.phase_index, self.rank = at, phase_index, rank
        self.held = run_dir / f"held-{at.phase}-{at.epoch}"
        self.release = run_dir / f"release-{at.phase}-{at.epoch}"

    def on_checkpoint(self, loop_state: LoopState) -> None:
        if self.phase_index != self.at.phase or loop_state.epoch != self.at.epoch:
            return
        hold = not self.held.exists()  # decided by every rank before rank 0 writes the marker
        barrier()
        if not hold:
            return
        if self.rank == 0:
            tmp = self.held.with_suffix(".tmp")
            tmp.write_text(f"{loop_state.epoch}\n")
            tmp.replace(self.held)  # whole or absent: the test waits for this file
        deadline = time.monotonic() + self.at.timeout_s
        while not self.release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"debug.hold_at: no {self.release.name} in {self.release.parent} after "
                                   f"{self.at.timeout_s:g} s (timeout_s)")
            time.sleep(self.POLL_S)
