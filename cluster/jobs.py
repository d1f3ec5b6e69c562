"""Ray Jobs: find the cluster's job server, submit `tdcompress run` to it, list, watch and stop jobs.

The address is the job server's HTTP address (the dashboard, ``http://HOST:8265``): ``--address``,
else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` as Ray's own CLI reads them, else the cluster
`tdcompress cluster up` started (its state file, which also holds the auth token). Every call is
bounded: an address that does not answer fails in seconds, naming the address and what was tried.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from cluster.local_cluster import ClusterState, read_state

PROBE_TIMEOUT_S = 5.0
# Never uploaded with the project: run outputs, MLflow stores, environments, VCS and build leftovers.
WORKING_DIR_EXCLUDES = ["runs/", "mlruns*", ".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/",
                        "*.pyc", ".pytest_cache/", ".ruff_cache/", "compare.png"]


class JobsError(RuntimeError):
    """A job or cluster request failed; the message names the address or job and what to do."""


@dataclass
class Target:
    """Where jobs go: the job server URL, its auth headers and, for `cluster up` clusters, their state."""

    url: str
    headers: dict[str, str]
    source: str  # where the address came from (for messages)
    state: ClusterState | None = None


def _token_headers(token_path: str | None) -> dict[str, str]:
    if not token_path:
        return {}
    try:
        return {"Authorization": f"Bearer {Path(token_path).read_text().strip()}"}
    except OSError as e:
        raise JobsError(f"cannot read the cluster's auth token {token_path} ({e})") from None


def resolve_target(address: str | None, state_dir: str | None = None) -> Target:
    """The job server to talk to (see the module doc for the order); raises JobsError when there is none."""
    state = read_state(state_dir)
    env_addr = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if address:
        url, source = address, "--address"
    elif env_addr and env_addr != "auto":
        url, source = env_addr, "RAY_API_SERVER_ADDRESS/RAY_ADDRESS"
    elif state is not None:
        url, source = state.dashboard_url, f"the cluster state {state.dir}/cluster.json"
    else:
        raise JobsError("no cluster address: pass --address http://HOST:8265 (the head's dashboard), set "
                        "RAY_ADDRESS, or start a local cluster with: tdcompress cluster up --nodes 2")
    url = url.rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    if not url.startswith(("http://", "https://")):
        raise JobsError(f"{source}: {url!r} is not a job server address; expected http://HOST:8265 (the head's "
                        "dashboard), not a ray:// client or GCS address")
    mine = state if state is not None and state.dashboard_url == url else None
    headers = _token_headers(mine.token_path if mine else None)
    if not headers and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_MODE") == "token"):
        token = os.environ.get("RAY_AUTH_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else _token_headers(
            os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token"))
    return Target(url=url, headers=headers, source=source, state=mine)


def probe(target: Target, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise JobsError within ``timeout`` seconds unless the job server at ``target.url`` answers."""
    req = urllib.request.Request(f"{target.url}/api/version", headers=target.headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise JobsError(f"{target.url} refused the request ({e.code} {e.reason}): the cluster has Ray token "
                            "authentication on; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
                            "to the cluster's token (`ray get-auth-token` on the head)") from None
        raise JobsError(f"{target.url} answered GET /api/version with {e.code} {e.reason}; is it a Ray head's "
                        "dashboard (port 8265 by default)?") from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise JobsError(f"the Ray job server {target.url} (from {target.source}) cannot be reached: GET "
                        f"{target.url}/api/version failed within {timeout:.0f} s ({reason}); check the address "
                        "(http://HEAD:8265), that the head runs, or reach it through an SSH tunnel "
                        "(ssh -L 8265:127.0.0.1:8265 HEAD)") from None


def client(target: Target):
    """A JobSubmissionClient for ``target`` (probed first, so a dead address fails fast)."""
    probe(target)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(target.url, headers=target.headers)
    except Exception as e:  # its own connection check: anything it raises means the same thing
        raise JobsError(f"cannot connect to the Ray job server {target.url}: {e}") from None


def submit(target: Target, entrypoint: str, working_dir: str, env_vars: dict[str, str], submission_id: str,
           metadata: dict[str, str]) -> str:
    """Submit ``entrypoint`` with the project ``working_dir`` uploaded; returns the job id."""
    c = client(target)
    runtime_env: dict[str, Any] = {"working_dir": working_dir, "excludes": WORKING_DIR_EXCLUDES,
                                   "env_vars": env_vars}
    try:
        return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                            metadata=metadata)
    except Exception as e:
        raise JobsError(f"the job server {target.url} refused the job: {e}") from None


def _known(c, job_id: str, target: Target) -> None:
    try:
        c.get_job_info(job_id)
    except Exception as e:
        raise JobsError(f"no job {job_id!r} on {target.url} ({str(e).splitlines()[0][:200]}); list the jobs "
                        "with: tdcompress jobs list") from None


def list_jobs(target: Target) -> list[Any]:
    """Every job the cluster knows (JobDetails), oldest first."""
    jobs = client(target).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def status(target: Target, job_id: str) -> Any:
    """The job's JobDetails (status, message, times, metadata)."""
    c = client(target)
    _known(c, job_id, target)
    return c.get_job_info(job_id)


def logs(target: Target, job_id: str) -> str:
    c = client(target)
    _known(c, job_id, target)
    return c.get_job_logs(job_id)


def follow(target: Target, job_id: str) -> Iterator[str]:
    """The job's log as it grows, until the job ends."""
    import asyncio

    c = client(target)
    _known(c, job_id, target)
    loop = asyncio.new_event_loop()
    stream = c.tail_job_logs(job_id).__aiter__()
    try:
        while True:
            try:
                yield loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(target: Target, job_id: str) -> bool:
    """Ask the job to stop; True when it was still running."""
    c = client(target)
    _known(c, job_id, target)
    return bool(c.stop_job(job_id))
