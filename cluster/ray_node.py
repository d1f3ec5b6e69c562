"""`python -m cluster.ray_node start ...`: Ray's own `ray start`, in loopback-only mode on every node.

Ray binds its servers to the node's address, and turns a loopback address into the host's external
one unless its "local only" mode is on (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, see
``cluster.ray_workarounds.loopback_only``); but in that mode ``ray start --address`` refuses to join a
head at all. `tdcompress cluster up` runs every node of the one-machine cluster through this module:
the environment variable stays 0 for every process the node starts (raylet, agents, workers, job
drivers resolve 127.0.0.1 as 127.0.0.1), and only this CLI process lets a worker node join and keeps
the loopback address it was given instead of resolving it to the host's external address.
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by every process the node starts
    import ray._private.ray_constants as ray_constants
    import ray._private.services as services
    from ray.scripts.scripts import main as ray_main

    ray_constants.ENABLE_RAY_CLUSTER = True  # this process only: let a worker node join the head
    # The node and head addresses are 127.0.0.1 on purpose; without this Ray replaces them by the host's address.
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *argv]
    return ray_main() or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
