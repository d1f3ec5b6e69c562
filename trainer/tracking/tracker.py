"""MLflow logging: one parent run per `tdcompress run`, one child per phase.

The driver creates the runs and hands their ids to the workers; only rank 0
logs, through an explicit :class:`mlflow.tracking.MlflowClient` bound to a
run id (no global "active run" state, so nothing leaks between phases and
no other rank creates a run of its own).

Tracking never stops training: a :class:`Tracker` whose server does not
answer prints one warning, keeps what it could not send in a JSONL buffer
(in the run directory) and sends it, in order, once the server answers again
(tried at most every :data:`RETRY_EVERY_S` seconds) or at :meth:`Tracker.flush`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from trainer.tracking.buffer import Unsendable, outbox_for, short_error

# The store's helpers are part of this module's interface: every caller that logs also connects.
from trainer.tracking.store import (
    client,
    get_or_create_experiment,
    probe,
    resolve_tracking_uri,
)

__all__ = ["RETRY_EVERY_S", "Tracker", "client", "get_or_create_experiment", "probe", "resolve_tracking_uri",
           "short_error"]

RETRY_EVERY_S = 30.0  # while the server is away, Trackers try it again at most this often
_OUTAGES: set[str] = set()  # tracking URIs this process has warned about and not yet seen answer again


def _rejected(e: BaseException) -> bool:
    """True when the server answered and refused the record (retrying cannot help): HTTP 4xx but 408/429."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, Unsendable):
        return True
    if isinstance(e, MlflowException):
        code = e.get_http_status_code()
        return 400 <= code < 500 and code not in (408, 429)
    return False


class Tracker:
    """Logs metrics/params/artifacts to one MLflow run; a no-op without a run id (ranks != 0).

    No method raises because of MLflow: a record the server does not take is buffered (``buffer``:
    a JSONL file, else memory) and sent once the server answers again, in the original order, with
    its original timestamps (so a replay of a record that did arrive is not a second point). One
    warning is printed per outage; records the server rejects (HTTP 4xx) are dropped with a warning.

    Args:
        buffer: the JSONL file kept records go to; Trackers of one process sharing a URI and a
            file share the buffer. A file left by an earlier process is sent by the next Tracker using it.
        retry_every: seconds between attempts while the server is away (default :data:`RETRY_EVERY_S`).
    """

    def __init__(self, uri: str | None, run_id: str | None, buffer: str | Path | None = None,
                 retry_every: float | None = None) -> None:
        self.run_id = run_id
        self._client = client(uri) if (uri and run_id) else None
        self._box = outbox_for(uri, buffer) if self._client else None
        self.retry_every = RETRY_EVERY_S if retry_every is None else retry_every
        self.best: dict[str, float] = {}
        # Added to every step: a phase's Tracker counts from the steps of the phases before it, so the
        # curves of all phases share one x axis (the run's global optimizer step).
        self.step_offset = 0

    # -- public API -------------------------------------------------------------------
    def metrics(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        step = int(step) + self.step_offset
        self._submit({"kind": "metrics", "metrics": [[k, float(v), now, step] for k, v in values.items()]})

    def best_of(self, key: str, value: float, step: int) -> None:
        """Log ``best_<key>`` whenever ``value`` beats the best so far (higher is better)."""
        if value > self.best.get(key, float("-inf")):
            self.best[key] = value
            self.metrics({f"best_{key}": value}, step)

    def params(self, values: dict[str, Any]) -> None:
        self._submit({"kind": "params", "params": [[k, str(v)[:6000]] for k, v in values.items()]})

    def tags(self, values: dict[str, str]) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in values.items()}})

    def artifact(self, path: str | Path, subdir: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(Path(path).resolve()), "subdir": subdir})

    def text(self, text: str, name: str) -> None:
        self._submit({"kind": "text", "text": text, "name": name})

    def dataset(self, name: str, source: str, digest: str, profile: dict[str, Any], context: str = "training") -> None:
        """Record the run's input dataset (MLflow's dataset tracking: the run's "Datasets" column).

        ``source``: where the data was read (a directory); ``profile``: e.g. the split sizes.
        """
        self._submit({"kind": "dataset", "name": name, "source": source, "digest": digest,
                      "profile": profile, "context": context})

    def submit_record(self, entry: dict[str, Any]) -> None:
        """Send (or keep, in order) one record of any kind :meth:`_send` knows; e.g. a phase run's opening."""
        self._submit(entry)

    @property
    def pending(self) -> int:
        """Records kept, not yet sent (shared with the Trackers using the same buffer)."""
        return self._box.pending if self._box else 0

    def flush(self, warn: bool = True) -> bool:
        """Send every kept record now (whatever the retry interval); True when none is left.

        Flushes the buffer this Tracker shares with the other Trackers of the same URI and file;
        ``warn=False``: say nothing when records are left (a phase's end: the outage was said already).
        """
        box = self._box
        if box is None:
            return True
        with box.lock:
            try:
                if self._drain(force=True):
                    return True
            except Exception as e:  # the buffer file itself failed (disk full, ...): still never raise
                self._broken(e)
                return False
            if not warn:
                return False
            where = (f"kept in {box.path}; the next run of this run directory (resume=true) that reaches the "
                     "server sends them") if box.path else "lost when this process ends"
            print(f"WARNING mlflow: {box.pending} tracking records could not be sent to {box.uri}; {where}",
                  file=sys.stderr, flush=True)
            return False

    # -- sending and buffering --------------------------------------------------------
    def _submit(self, entry: dict[str, Any]) -> None:
        if self._client is None:
            return
        entry["run"] = self._box.aliases.get(self.run_id, self.run_id)
        try:
            self._submit_or_keep(entry)
        except Exception as e:  # the buffer file itself failed (disk full, ...): still never raise
            self._broken(e)

    def _broken(self, e: BaseException) -> None:
        if not self._box.broken:
            self._box.broken = True
            print(f"WARNING mlflow: the tracking buffer failed ({short_error(e)}); some records may be lost",
                  file=sys.stderr, flush=True)

    def _submit_or_keep(self, entry: dict[str, Any]) -> None:
        box = self._box
        with box.lock:
            if box.pending and not self._drain(force=False):
                box.add(entry)  # keep the order: nothing overtakes a kept record
                return
            try:
                self._send(entry)
            except Exception as e:  # tracking must never stop training
                if _rejected(e):
                    self._drop(entry, e)
                else:
                    box.add(entry)
                    self._went_away(e)

    def _drain(self, force: bool) -> bool:
        """Send kept records in order; True when none remain. Tries only when due (or ``force``)."""
        box = self._box
        if not box.pending:
            return True
        if not force and time.monotonic() < box.next_try:
            return False
        entries = box.entries()
        for i, entry in enumerate(entries):
            try:
                self._send(entry)
            except Exception as e:  # likewise
                if _rejected(e):
                    self._drop(entry, e)
                    continue
                box.replace([box.resolved(x) for x in entries[i:]])  # runs created since keep their real ids
                self._went_away(e)
                return False
        box.replace([])
        if box.down:
            box.down = False
            _OUTAGES.discard(box.uri)
            print(f"mlflow: {box.uri} answers again; sent {len(entries)} kept records", file=sys.stderr, flush=True)
        return True

    def _went_away(self, e: BaseException) -> None:
        box = self._box
        box.next_try = time.monotonic() + self.retry_every
        if not box.down:
            box.down = True
            if box.uri in _OUTAGES:  # another buffer of this process said it already: one warning per outage
                return
            _OUTAGES.add(box.uri)
            where = box.path or "memory"
            print(f"WARNING mlflow: tracking server {box.uri} did not take a record ({short_error(e)}). Training "
                  f"continues; records are kept in {where} and sent when it answers again (tried every "
                  f"{self.retry_every:g}s and at the end).", file=sys.stderr, flush=True)

    def _drop(self, entry: dict[str, Any], e: BaseException) -> None:
        box = self._box
        box.dropped += 1
        if box.dropped == 1:
            print(f"WARNING mlflow: the server refused a {entry.get('kind')} record for run {entry.get('run')} "
                  f"({short_error(e)}); dropped (later refusals are not printed)", file=sys.stderr, flush=True)

    def _send(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        box, kind, c = self._box, entry["kind"], self._client
        run = box.resolved(entry)["run"]
        if kind == "open_phase":
            from trainer.tracking.phase_records import open_phase_run

            box.aliases[entry["run"]] = open_phase_run(c, entry)
            return
        if run.startswith("pending-"):  # its opening was refused by the server: nothing to log into
            raise Unsendable(f"the run of {run} was never created")
        if kind == "close_phase":
            from trainer.tracking.phase_records import close_phase_run

            close_phase_run(c, run, entry)
        elif kind == "metrics":
            c.log_batch(run, metrics=[Metric(k, float(v), int(ts), int(s)) for k, v, ts, s in entry["metrics"]])
        elif kind == "params":
            items = [Param(k, v) for k, v in entry["params"]]
            for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
                c.log_batch(run, params=items[i:i + 100])
        elif kind == "tags":
            c.log_batch(run, tags=[RunTag(k, v) for k, v in entry["tags"].items()])
        elif kind == "artifact":
            if not Path(entry["path"]).exists():
                raise Unsendable(f"artifact {entry['path']} no longer exists")
            c.log_artifact(run, entry["path"], entry["subdir"])
        elif kind == "text":
            c.log_text(run, entry["text"], entry["name"])
        elif kind == "dataset":
            import json

            from mlflow.entities import Dataset, DatasetInput, InputTag

            ds = Dataset(entry["name"], entry["digest"], "local", json.dumps({"uri": entry["source"]}),
                         profile=json.dumps(entry["profile"]))
            c.log_inputs(run, datasets=[DatasetInput(ds, [InputTag("mlflow.data.context", entry["context"])])])
        else:
            raise Unsendable(f"unknown record kind {kind!r}")
