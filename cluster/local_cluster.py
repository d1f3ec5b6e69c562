"""`tdcompress cluster up|down`: a real multi-node Ray cluster on this machine, plus an MLflow server.

Every node is its own `ray start --block` process tree (head + N-1 workers, each with its own CPU
share), all on 127.0.0.1, each node with a Ray temp dir of its own (``<temp_dir>`` for the head,
``<temp_dir>-wN`` for worker N), so they never join another Ray instance on the machine, and no two
nodes share a log directory: every node's log monitor tails every worker log file in its node's
directory and forwards it to the job's driver, so with one shared directory each worker line reached
`tdcompress jobs logs` once per node. The head runs with Ray's token authentication, the token in
a 0600 file in the state dir; the job client reads it from the state file. A state file records the
pid (= process group) of every process started, the addresses and ports; `cluster down` stops
exactly those process groups and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cluster.processes import alive, free_port, group_alive, group_members, spawn

STATE_ENV = "TDC_CLUSTER_DIR"  # where `cluster up` keeps its state, logs, token and MLflow store
STATE_FILE = "cluster.json"
NODE_START_S = 180.0  # a loaded 2-core machine took 41 s for the head alone
MLFLOW_START_S = 90.0


class ClusterError(RuntimeError):
    """A local cluster cannot be started or stopped; the message says what to do."""


def state_dir(path: str | Path | None = None) -> Path:
    """The state dir: ``path``, else $TDC_CLUSTER_DIR, else ~/.tdcompress/cluster."""
    return Path(path or os.environ.get(STATE_ENV) or Path.home() / ".tdcompress" / "cluster").resolve()


@dataclass
class ClusterState:
    """What `cluster up` started (pids are process-group leaders) and where it listens."""

    dir: str
    gcs_address: str  # host:port of the head's GCS (what `ray.init(address=...)` takes)
    dashboard_url: str  # http://127.0.0.1:PORT, the Ray Jobs API
    token_path: str  # Ray token auth: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<this>
    temp_dir: str  # the head's Ray temp dir; worker node N's is <temp_dir>-worker-N
    cpus_per_node: int
    nodes: list[dict] = field(default_factory=list)  # {"role": head|worker, "pid": int, "log": path}
    mlflow_uri: str | None = None
    mlflow_pid: int | None = None
    same_host: bool = True  # every node on this machine: one filesystem, so cluster.storage is shared

    def pids(self) -> list[int]:
        return [n["pid"] for n in self.nodes] + ([self.mlflow_pid] if self.mlflow_pid else [])

    def markers(self) -> tuple[str, str]:
        """Strings in the command line of every process this cluster started."""
        return self.dir, self.temp_dir

    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}


def read_state(directory: str | Path | None = None) -> ClusterState | None:
    """The state of the cluster `cluster up` started in ``directory``, or None when there is none."""
    f = state_dir(directory) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return ClusterState(**json.loads(f.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ClusterError(f"{f} is not a cluster state file ({e}); stop its processes by hand and delete it") from None


def _ray_temp_dir(d: Path) -> str:
    """A short Ray temp dir for state dir ``d``: Ray's socket paths under it must fit AF_UNIX's 107 bytes."""
    return f"/tmp/tdc-ray-{hashlib.sha1(str(d).encode()).hexdigest()[:10]}"


def running(state: ClusterState) -> list[int]:
    """The recorded process groups that still have a process of ours (its command line names the state dir).

    A group whose leader exited (a node's `ray start` after its raylet was killed) can still hold
    Ray processes; it is still ours while one of them names the state dir.
    """
    return [g for g in state.pids() if any(alive(p, state.markers()) for p in group_members(g))]


def _wait_for(what: str, ready, pids: list[int], marker: tuple[str, ...], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not all(alive(p, marker) for p in pids):
            raise ClusterError(f"{what} exited while starting; see {log}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not start within {timeout:.0f} s; see {log}")


def _node_ports() -> list[str]:
    """Ports Ray gives fixed defaults (the agent's HTTP port 52365, client server 10001): every node of this
    machine, and any other Ray on it, would collide; free ones picked now."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def metrics_port_env() -> dict[str, str]:
    """Free ports for the head's two Prometheus endpoints, which Ray's dashboard and autoscaler read from the
    environment and otherwise take fixed (44227, 44217): with another Ray on the machine they failed to bind."""
    return {"DASHBOARD_METRIC_PORT": str(free_port()), "AUTOSCALER_METRIC_PORT": str(free_port())}


def _node_started(log: Path) -> bool:
    return log.is_file() and b"Ray runtime started" in log.read_bytes()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# long: the start-up in order (ports, token, head, workers, MLflow, state file) with its rollback on failure
def up(nodes: int, cpus_per_node: int = 1, mlflow: bool = True, directory: str | Path | None = None,
       object_store_mb: int = 256) -> ClusterState:
    """Start a head and ``nodes - 1`` workers (``cpus_per_node`` CPUs each) and an MLflow server; returns the state.

    Refuses when the state dir holds a cluster that still runs. Whatever was started is stopped
    again when a later step fails.
    """
    if nodes < 1 or cpus_per_node < 1:
        raise ClusterError(f"--nodes and --cpus-per-node must be >= 1, got {nodes} and {cpus_per_node}")
    d = state_dir(directory)
    old = read_state(d)
    if old and running(old):
        raise ClusterError(f"a cluster is already up (state {d / STATE_FILE}, dashboard {old.dashboard_url}); "
                           f"reuse it: tdcompress submit CONFIG (the address comes from that state file), or stop "
                           f"it first: tdcompress cluster down{'' if directory is None else f' --state-dir {d}'}")
    (d / "logs").mkdir(parents=True, exist_ok=True)
    token = d / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    gcs_port, dash_port = free_port(), free_port()
    state = ClusterState(dir=str(d), gcs_address=f"127.0.0.1:{gcs_port}", dashboard_url=f"http://127.0.0.1:{dash_port}",
                         token_path=str(token), temp_dir=_ray_temp_dir(d), cpus_per_node=cpus_per_node)
    venv_bin = str(Path(sys.executable).parent)
    # The nodes' PATH starts with this Python's bin: a job's shell then finds `python` and `tdcompress` of this venv.
    env = {**os.environ, **state.auth_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]), "RAY_USAGE_STATS_ENABLED": "0",
           # On SIGTERM a node first drains (for Ray Serve's proxies) for up to 30 s before it stops its processes;
           # nothing here serves traffic, and the wait outlasted `down`'s grace, which then had to SIGKILL.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    node = [sys.executable, "-m", "cluster.ray_node", "start", "--block", "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus_per_node}", "--num-gpus=0",
            f"--object-store-memory={object_store_mb * 2**20}", "--disable-usage-stats"]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")) if p)
    try:
        head_log = d / "logs" / "head.log"
        head_log.unlink(missing_ok=True)
        pid = spawn(node + ["--head", f"--temp-dir={state.temp_dir}", f"--port={gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--include-dashboard=true",
                             f"--ray-client-server-port={free_port()}", *_node_ports()], head_log,
                     {**env, **metrics_port_env()})
        state.nodes.append({"role": "head", "pid": pid, "log": str(head_log)})
        _write(state)  # recorded before waiting: a `cluster down` from another shell finds it
        if mlflow:
            port = free_port()
            mlflow_log = d / "logs" / "mlflow.log"
            # Without MLflow's job runner (GenAI scorer jobs, unused here): it slows the server's start and its
            # exit on SIGTERM (the standalone server of the tracking-fault tests: twice the start, ~15 s to stop).
            state.mlflow_pid = spawn([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                                       str(port), "--workers", "1", "--backend-store-uri",
                                       f"sqlite:///{d / 'mlflow.db'}", "--artifacts-destination",
                                       str(d / "mlflow-artifacts")], mlflow_log,
                                      {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
            state.mlflow_uri = f"http://127.0.0.1:{port}"
            _write(state)
        _wait_for("the head node", lambda: _node_started(head_log), [pid], state.markers(), head_log, NODE_START_S)
        for i in range(1, nodes):
            _start_worker(state, node, env, d / "logs" / f"worker-{i}.log")
        if mlflow:
            _wait_for("the MLflow server", lambda: _http_ok(f"{state.mlflow_uri}/health"), [state.mlflow_pid],
                      state.markers(), d / "logs" / "mlflow.log", MLFLOW_START_S)
    except BaseException:
        down(d)
        raise
    return state


def _start_worker(state: ClusterState, node: list[str], env: dict[str, str], log: Path, attempts: int = 2) -> None:
    """Start one worker node and wait until it has joined; one at a time, and retried once.

    Ray gives a new node's raylet 30 s (fixed) to register with the GCS; on a loaded 2-core machine
    two nodes starting together missed it, so nodes start one after another and a node that timed
    out is stopped (its whole group) and started again.
    """
    for attempt in range(attempts):
        log.unlink(missing_ok=True)
        pid = spawn(node + [f"--address={state.gcs_address}", f"--temp-dir={state.temp_dir}-{log.stem}",
                             *_node_ports()], log, env)
        state.nodes.append({"role": "worker", "pid": pid, "log": str(log)})
        _write(state)
        try:
            _wait_for(f"worker node {log.stem}", lambda: _node_started(log), [pid], state.markers(), log, NODE_START_S)
            return
        except ClusterError:
            if attempt == attempts - 1:
                raise
            if group_members(pid):
                os.killpg(pid, signal.SIGKILL)
            state.nodes.pop()
            _write(state)


def _write(state: ClusterState) -> None:
    f = Path(state.dir) / STATE_FILE
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, f)


def down(directory: str | Path | None = None, grace_s: float = 20.0) -> list[int]:
    """Stop the process groups `up` recorded in ``directory`` (SIGTERM, then SIGKILL); returns the pids stopped.

    No state file there: nothing is up, so nothing is stopped (an empty list). Only recorded groups
    that still hold a process of ours (see :func:`running`) are signalled.
    """
    d = state_dir(directory)
    state = read_state(d)
    if state is None:
        return []
    groups = running(state)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(group_alive(g) for g in groups):
        time.sleep(0.3)
    for pgid in groups:
        if group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
    (d / STATE_FILE).unlink(missing_ok=True)
    return groups
