"""The workers' torch process group, listening only on the address of rank 0's Ray node.

Ray Train's own setup (``init_method="env"``) lets torch create the TCPStore rendezvous server,
and torch binds that server to every interface (``*:PORT``, IPv4 and IPv6) whatever MASTER_ADDR
says; gloo in turn picks its interface from the machine's hostname. An embedded run (all Ray
servers on 127.0.0.1) thus had a port open to the network for the whole of training. Here rank 0
binds the store's socket itself, to its node's address (127.0.0.1 for an embedded run or a
`cluster up` cluster; the node's cluster address otherwise), and hands torch the listening
descriptor; every rank pins gloo (and NCCL's bootstrap) to the interface holding that address.
A variable the user set (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME) is left as it is.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_listening: dict[str, int] = {}  # rank 0's store socket, bound before the other ranks learn its port


def interface_of(address: str) -> str | None:
    """The name of the network interface holding ``address`` (``lo`` for 127.0.0.1), None if none does."""
    import psutil

    want = ipaddress.ip_address(address)
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == want:
                    return name
            except ValueError:  # a MAC address (AF_PACKET) or another family
                continue
    return None


def bind_store_socket() -> tuple[str, int]:
    """On rank 0: a listening TCP socket on this Ray node's address, a free port; returns (address, port)."""
    import ray

    addr = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((addr, 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # torch's store takes the descriptor over; the Python object must not close it when collected.
    _listening["fd"] = sock.detach()
    return addr, port


def pin_interfaces(address: str) -> None:
    """Make gloo (and NCCL's bootstrap) use the interface that holds ``address``, unless the user chose one."""
    name = interface_of(address)
    if name is None:
        return  # an address no local interface has (NAT): torch's own choice is all there is
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, name)


def init_group(backend: str, world_rank: int, world_size: int, address: str, port: int, timeout_s: int) -> None:
    """Join the process group whose TCPStore rank 0 serves on ``address:port`` (rank 0 on its bound socket)."""
    pin_interfaces(_own_address())
    if backend == "nccl":  # as Ray Train does: a timed-out NCCL collective fails instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # What Ray Train's env:// setup leaves for libraries that read them; the group itself uses the store below.
    os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
    timeout = timedelta(seconds=timeout_s)
    fd = _listening.pop("fd") if world_rank == 0 else None
    store = dist.TCPStore(address, port, world_size, is_master=world_rank == 0, timeout=timeout,
                          wait_for_workers=False, master_listen_fd=fd)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


def _own_address() -> str:
    """This worker's Ray node address (each rank's gloo listens there, rank 0's store too)."""
    import ray

    return ray.util.get_node_ip_address()


class BoundTorchBackend(_TorchBackend):
    """Ray Train's torch backend with the rendezvous bound to rank 0's node address (module docstring)."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        import ray

        backend = backend_config.backend or "gloo"
        address, port = worker_group.execute_single(0, bind_store_socket)
        if not isinstance(worker_group, V1WorkerGroup):  # Ray Train v1 sets them when training starts
            # LOCAL_RANK, RANK, ...: set before the group, as Ray Train's own setup does.
            worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(i, init_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens only on the cluster's address (see BoundTorchBackend)."""

    @property
    def backend_cls(self) -> type[BoundTorchBackend]:
        return BoundTorchBackend
