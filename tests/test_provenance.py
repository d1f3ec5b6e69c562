"""Provenance of a run under Ray Jobs: the job's id and the git commit reach the parent run's tags, both for
`tdcompress submit` (which passes the client's commit with the job) and a hand `ray job submit`."""
from __future__ import annotations

import json
from pathlib import Path

from launcher.config import load_config
from launcher.run import run_record

PROJECT = Path(__file__).resolve().parents[1]
QUICKSTART = PROJECT / "configs" / "quickstart.yaml"


def _ray_job_env(submission_id: str) -> str:
    """What Ray's job supervisor puts in the entrypoint's environment (ray/dashboard/modules/job)."""
    return json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
                       "metadata": {"job_submission_id": submission_id, "job_name": submission_id}})


def test_ray_job_id_comes_from_the_job_config_ray_sets(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    cfg = load_config(QUICKSTART)
    assert run_record.ray_job_id() is None
    tags = run_record.run_tags(cfg, tmp_path)
    assert "ray_job_id" not in tags and tags["mlflow.source.type"] == "LOCAL"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _ray_job_env("raysubmit_AbC123"))
    tags = run_record.run_tags(cfg, tmp_path)
    assert tags["ray_job_id"] == "raysubmit_AbC123" and tags["mlflow.source.type"] == "JOB"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert run_record.ray_job_id() is None


def test_git_commit_travels_with_a_submitted_job(monkeypatch, tmp_path):
    from launcher.submit import plan_submission

    monkeypatch.delenv(run_record.GIT_COMMIT_ENV, raising=False)
    here = run_record.git_commit()
    assert here and len(here) == 40  # the tests run from a git checkout
    sub = plan_submission(str(QUICKSTART), [f"cluster.storage={tmp_path}"], 1, True, None, {})
    assert sub.env_vars[run_record.GIT_COMMIT_ENV] == here
    # On the cluster the uploaded directory has no .git: the job's driver records the commit it was given.
    monkeypatch.setenv(run_record.GIT_COMMIT_ENV, "f" * 40)
    assert run_record.git_commit(tmp_path) == "f" * 40
    assert run_record.run_tags(load_config(QUICKSTART), tmp_path)["mlflow.source.git.commit"] == "f" * 40
