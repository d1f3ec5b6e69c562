"""The processes `cluster up` starts and `cluster down` stops, read from Linux's /proc: each started in a session
of its own (one process group per node tree), recognised as ours by its command line (pids get reused); and the
ports they are told to listen on."""
from __future__ import annotations

import random
import socket
import subprocess
from pathlib import Path

# Ray's worker processes take their ports from 10002-19999; ours come from above that.
_PORTS_FROM = 20000


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take their local port from it)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range when it can be.

    A port from the ephemeral range can be taken, between this call and the server's bind, as the local
    port of any outgoing connection on the machine (a busy Ray makes hundreds); one below it only by another
    server. Ray picks its own workers' ports the same way.
    """
    top = _ephemeral_start()
    rng = random.SystemRandom()
    for _ in range(64 if top - _PORTS_FROM > 1000 else 0):
        port = rng.randrange(_PORTS_FROM, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the range: any port the kernel hands out
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int, markers: tuple[str, ...]) -> bool:
    """True when ``pid`` runs and is one of ours (its command line names our state or Ray temp dir): pids get
    reused."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(m in cmd for m in markers)


def group_members(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after "pid (comm)": state, ppid, pgrp
            out.append(int(stat.parent.name))
    return out


def group_alive(pgid: int) -> bool:
    """A member of ``pgid`` still runs. Zombies do not count: a group leader `up` started from this process stays
    a zombie until reaped, and waiting on it would only spend `down`'s whole grace."""
    for pid in group_members(pgid):
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                return True
        except (OSError, IndexError):
            continue
    return False


def spawn(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Start ``cmd`` in a new session (its own process group, so `down` stops its whole tree)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=log.parent)
    return proc.pid
