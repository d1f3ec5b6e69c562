"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): workers on different nodes train in lockstep.

The driver connects by address, as it would to a real cluster.
"""
from __future__ import annotations

import pytest
import torch

from launcher.run import pipeline
from trainer.checkpoints import files as ckpt

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    from cluster.ray_runtime import embedded_dashboard_port

    # Ray's default dashboard port (8265) may be held by another Ray on the machine (a local run, a study).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 256 * 2**20,
                                                            "include_dashboard": True, "dashboard_host": "127.0.0.1",
                                                            "dashboard_port": embedded_dashboard_port()})
    cluster.add_node(num_cpus=1, object_store_memory=256 * 2**20)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_workers_on_two_nodes_agree(tiny, two_nodes, tmp_path):
    # Two nodes: storage and the SQLite store must be declared shared (one machine: they are).
    info = pipeline.run(tiny("cluster.backend=ray", "cluster.num_workers=2", f"cluster.address={two_nodes.address}",
                             "cluster.shared_storage=true", f"tracking.uri=sqlite:///{tmp_path}/runs/mlflow.db",
                             "compression.format=tucker2", "compression.exclude=[]", "compression.min_channels=3",
                             "phases=[{kind: admm, epochs: 1, steps_per_epoch: 3}, {kind: evaluate}]"))
    path = ckpt.latest_checkpoint(info.dir / "checkpoints")
    ranks = [ckpt.load_rank(path, r) for r in range(2)]
    assert ranks[0]["node"] != ranks[1]["node"], "both workers ran on one node"
    assert torch.equal(ranks[0]["fingerprint"], ranks[1]["fingerprint"])
