"""Process-group helpers that need no Ray: the one-rank group of the ``local`` backend and benchmarks."""
from __future__ import annotations

import os

import torch.distributed as dist

from cluster.processes import free_port


def init_local_group(gpu: bool) -> None:
    """A one-rank process group in this process (nccl on a GPU, gloo on CPU), kept for its life.

    One group for the life of the process: DeepSpeed caches the group it first sees, so a
    destroyed-and-recreated group would leave it holding a dead handle on the next run. Its store
    is in memory (HashStore): the default env:// rendezvous starts a TCPStore server listening on
    every interface ("::"), which one rank does not need. The MASTER_* variables stay set, on
    loopback, for libraries that read them.
    """
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        dist.init_process_group("nccl" if gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("a one-rank process group is needed (backend 'local', benchmarks); this process has "
                           f"{dist.get_world_size()} ranks")
