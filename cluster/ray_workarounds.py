"""Ray 2.60's start-up behaviours this project corrects for its embedded Ray: servers bound to every interface,
a fixed agent port that a second Ray on the machine makes slow to start, and token-auth notices that read as
failures. Each is the smallest change that does it, kept here so that a Ray upgrade is checked in one place.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def loopback_only() -> None:
    """Make the embedded Ray bind every server to 127.0.0.1.

    Ray 2.60 ignores ``_node_ip_address`` for its own servers: GCS, raylet, agents and workers
    listened on all interfaces and the host's address, and metrics endpoints answered
    unauthenticated on 0.0.0.0. Its "local only" mode (meant for laptops) binds them all to
    loopback; the Ray processes read it from the environment, and the driver from a constant
    Ray sets when it is first imported, so both are set. tests/test_run_listeners.py lists the
    listening sockets of an embedded run's whole process tree while it trains.
    """
    import ray._private.ray_constants as ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def agent_http_port(port: int) -> Iterator[None]:
    """The embedded Ray's dashboard agent serves HTTP on ``port`` instead of Ray's fixed 52365.

    ``ray.init`` has no argument for that port (``ray start`` has ``--dashboard-agent-listen-port``). With
    another Ray on the machine holding 52365, the agent retried the bind with backoff for ~3.3 s and the raylet
    waited for it: every such start was that much slower. The node's parameters are built by
    ``ray._private.parameter.RayParams``, replaced for this block by one whose default port is ``port``.
    """
    from ray._private import parameter

    base = parameter.RayParams

    class WithAgentPort(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = WithAgentPort
    try:
        yield
    finally:
        parameter.RayParams = base


@contextmanager
def token_auth_quietly() -> Iterator[None]:
    """Ray's token authentication for the embedded Ray, without its notices.

    Ray 2.60 turns token authentication on for a new local Ray, logs a WARNING saying so on every start,
    and the first time an INFO line that it generated ~/.ray/auth_token. Both read as failures to a user.
    Ray's behaviour is kept (its mode, its token file; a RAY_AUTH_MODE the user set still wins) and its
    logger for this is quieted while Ray starts; the token's creation is one line of ours. Ray's CLI and
    dashboard ask for that token (``ray get-auth-token``).
    """
    import logging

    token = Path.home() / ".ray" / "auth_token"
    had_token = token.exists() or bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
    if not had_token and token.exists():
        print(f"embedded Ray: token authentication on; its token was created in {token} (Ray's CLI and "
              "dashboard ask for it)", flush=True)
