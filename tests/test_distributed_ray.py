"""Ray Train + DeepSpeed on 2 CPU workers (gloo): replicas agree, match one worker, survive a worker failure.

One embedded Ray instance serves the whole module (ray.init costs seconds).
"""
from __future__ import annotations

import pytest
import torch

from launcher import pipeline
from trainer import checkpoint as ckpt
from trainer import tracking

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from cluster.ray_runtime import ensure_ray
    from launcher.schema import Config

    ensure_ray(Config(name="tests"))
    yield
    ray.shutdown()


def _last(info):
    path = ckpt.latest_checkpoint(info.dir / "checkpoints")
    return path, ckpt.read_meta(path)


RAY2 = ("cluster.backend=ray", "cluster.num_workers=2")


def test_two_workers_agree_and_match_one_worker(tiny, ray_local):
    two = pipeline.run(tiny(*RAY2, "run_name=two"))
    one = pipeline.run(tiny("run_name=one"))
    path, meta = _last(two)
    assert meta["world_size"] == 2
    prints = [ckpt.load_rank(path, r)["fingerprint"] for r in range(2)]
    assert torch.equal(prints[0], prints[1]), "replicas diverged"
    a = ckpt.load_shared(path)["model"]
    b = ckpt.load_shared(_last(one)[0])["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # Only rank 0 logged: one parent, one child per phase, no stray runs.
    client = tracking.client(two.tracking_uri)
    exp = client.get_experiment_by_name("tdcompress")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.parentRunId = '%s'" % two.parent_id)
    assert sorted(r.data.tags["tdcompress.phase"] for r in runs) == ["evaluate", "pretrain"]
    history = client.get_metric_history(two.phase_ids[0], "train_loss")
    assert len({m.step for m in history}) == len(history), "a metric step was logged twice (more than one rank logs)"


def test_worker_failure_restarts_from_checkpoint(tiny, ray_local, monkeypatch):
    """FailureConfig(max_failures=1): the injected failure after epoch 1 restarts the group, which resumes."""
    monkeypatch.setenv("TDC_FAIL_AT", "0:1")
    info = pipeline.run(tiny(*RAY2, "run_name=flaky", "cluster.max_failures=1"))
    assert (info.dir / "injected-failure-0-1").exists()
    monkeypatch.delenv("TDC_FAIL_AT")
    ref = pipeline.run(tiny(*RAY2, "run_name=steady"))
    a = ckpt.load_shared(_last(info)[0])["model"]
    b = ckpt.load_shared(_last(ref)[0])["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
