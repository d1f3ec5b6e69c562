"""The buffer of tracking records not yet sent: one per tracking URI and buffer file in a process.

With a file, the file is the buffer (JSONL, appended line by line, so a crash loses nothing already
kept and the next process that uses the file sends it); without one, a list in memory.
:class:`trainer.tracking.tracker.Tracker` adds to it while the server is away and drains it, in order,
when the server answers again.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any


def short_error(e: BaseException) -> str:
    """One line for a warning: the exception's type and the first line of its message (MLflow's run long)."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


class Unsendable(Exception):
    """A buffered record that can never be sent (its artifact file is gone)."""


class Outbox:
    """Records not yet sent, shared by all Trackers of one process with the same URI and buffer file.

    With a file, the file is the buffer (appended line by line, so a crash loses nothing already
    kept, and the next process using the file sends it); without one, a list in memory.
    """

    def __init__(self, uri: str, path: Path | None) -> None:
        self.uri, self.path = uri, path
        self.lock = threading.RLock()
        self.memory: list[dict[str, Any]] = []
        self.pending = len(self.entries())
        self.next_try = 0.0  # time.monotonic() of the next attempt while records wait
        self.down = False  # warned about the current outage
        self.dropped = 0
        self.broken = False  # warned that the buffer itself failed
        # Stand-in run id (a phase run opened while the server was away) -> the id MLflow gave it.
        self.aliases: dict[str, str] = {}

    def resolved(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` with its run's stand-in id replaced by the real one, where that run exists now."""
        run = entry.get("run")
        return {**entry, "run": self.aliases[run]} if run in self.aliases else entry

    def entries(self) -> list[dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return list(self.memory)
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a crash mid-write
                continue
        return out + self.memory

    def add(self, entry: dict[str, Any]) -> None:
        self.pending += 1
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(entry, default=str) + "\n")
                return
            except OSError as e:
                print(f"WARNING mlflow: cannot write the tracking buffer {self.path} ({short_error(e)}); "
                      "keeping records in memory", file=sys.stderr, flush=True)
        self.memory.append(entry)

    def replace(self, entries: list[dict[str, Any]]) -> None:
        self.pending, self.memory = len(entries), []
        if self.path is None:
            self.memory = list(entries)
            return
        if not entries:
            self.path.unlink(missing_ok=True)
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in entries))
        os.replace(tmp, self.path)


_OUTBOXES: dict[tuple[str, str | None], Outbox] = {}
_OUTBOXES_LOCK = threading.Lock()


def outbox_for(uri: str, path: str | Path | None) -> Outbox:
    p = Path(path).resolve() if path is not None else None
    key = (uri, str(p) if p else None)
    with _OUTBOXES_LOCK:
        box = _OUTBOXES.get(key)
        if box is None:
            box = _OUTBOXES[key] = Outbox(uri, p)
        else:  # another process (a Ray worker, an earlier command) may have written the file since
            with box.lock:
                box.pending = len(box.entries())
        return box
