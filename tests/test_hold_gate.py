"""``debug.hold_at``: a run waits, once, in a known state (after a checkpoint that is not the phase's last)
until the test releases it, so fault tests act on a state instead of racing a log line."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from launcher.config import ConfigError, load_config
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.config import HoldAt
from trainer.core.component import LoopState
from trainer.core.faults import HoldGate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_holds_after_the_checkpoint_until_released(tiny, monkeypatch):
    monkeypatch.setattr(HoldGate, "POLL_S", 0.02)
    cfg = tiny("phases=[{kind: pretrain, epochs: 2, steps_per_epoch: 2}, {kind: evaluate}]",
               "debug.hold_at={phase: 0, epoch: 1}", "run_name=held")
    run_dir = Path(cfg.cluster.storage) / "tiny" / "held"
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(info=pipeline.run(cfg)), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "held-0-1").exists():
            assert thread.is_alive(), "the run ended without holding"
            assert time.monotonic() < deadline, "the run did not hold within 120 s"
            time.sleep(0.05)
        # Held: the epoch-1 checkpoint is the newest and the phase is not done.
        path = ckpt.latest_checkpoint(run_dir / "checkpoints")
        meta = ckpt.read_meta(path)
        assert (meta["phase"], meta["epoch"], meta["phase_done"]) == ("pretrain", 1, False), meta
        assert thread.is_alive()
    finally:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "release-0-1").touch()
        thread.join(timeout=300)
    assert not thread.is_alive() and "info" in result
    last = [p for p in ckpt.checkpoint_dirs(run_dir / "checkpoints") if ckpt.read_meta(p)["phase"] == "pretrain"][-1]
    assert ckpt.read_meta(last)["epoch"] == 2 and ckpt.read_meta(last)["phase_done"]


def test_hold_happens_once_and_gives_up_after_its_timeout(tmp_path):
    state = LoopState(phase="pretrain", epoch=1)
    gate = HoldGate(HoldAt(phase=0, epoch=1, timeout_s=0.1), 0, tmp_path, rank=0)
    with pytest.raises(TimeoutError, match=r"debug.hold_at: no release-0-1 .* after 0.1 s \(timeout_s\)"):
        gate.on_checkpoint(state)
    assert (tmp_path / "held-0-1").read_text() == "1\n"
    gate.on_checkpoint(state)  # held before (a restarted or resumed run): goes straight on
    gate.on_checkpoint(LoopState(phase="pretrain", epoch=2))  # another epoch: not this gate's point


@pytest.mark.parametrize("hold, key", [("{phase: 1, epoch: 1}", "debug.hold_at.phase"),
                                       ("{phase: 0, epoch: 3}", "debug.hold_at.epoch"),
                                       ("{phase: 0, epoch: 1, timeout_s: 0}", "timeout_s")])
def test_hold_at_must_name_a_training_epoch(hold, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "quickstart.yaml", [f"debug.hold_at={hold}",
                                                  "phases=[{kind: pretrain, epochs: 2}, {kind: evaluate}]"])
