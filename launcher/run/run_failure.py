"""A `tdcompress run` that fails at run time: one clear line on stderr, the traceback in the run's driver.log."""
from __future__ import annotations

import sys
import tempfile
import time
import traceback
from pathlib import Path

from launcher.schema import Config


def failed_run_dir(cfg: Config) -> Path | None:
    """The run directory of the run that just failed: ``run_name``, else the one whose run.json changed last."""
    from launcher.run.pipeline import runs_root

    root = runs_root(cfg)
    if cfg.run_name:
        return root / cfg.run_name if (root / cfg.run_name).is_dir() else None
    runs = [p for p in root.glob("*") if (p / "run.json").is_file()] if root.is_dir() else []
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime) if runs else None


def report_run_failure(cfg: Config, error: BaseException) -> bool:
    """Print one line for ``error`` and append its traceback to ``<run dir>/driver.log``; False (nothing
    printed) for errors that are bad input found late (dataset, checkpoint, export): the CLI says those with exit 2."""
    from trainer.checkpoints.files import CheckpointError
    from trainer.data import DatasetError
    from trainer.export.torch_export import ExportError
    from trainer.tracking.runs import error_text

    if isinstance(error, (DatasetError, CheckpointError, ExportError)):
        return False
    run_dir = failed_run_dir(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log = run_dir / "driver.log" if run_dir else Path(tempfile.gettempdir()) / f"tdcompress-{stamp}.log"
    try:
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} run failed\n")
            f.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        where = f"traceback in {log}"
    except OSError as e:
        where = f"the traceback could not be written to {log}: {e}"
    print(f"tdcompress: run failed: {error_text(error)} ({where})", file=sys.stderr, flush=True)
    return True
