"""Self-verifying checkpoints: the manifest, the verify function, resume falling back past damaged ones."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from launcher.config import ConfigError, load_config
from launcher.run import pipeline
from trainer.checkpoints import files as ckpt
from trainer.core.faults import InjectedFailure


def _save(root: Path, index: int, value: float = 1.0) -> Path:
    return ckpt.save_checkpoint(root, index, shared={"model": {"w": torch.full((64,), value)}},
                                per_rank={"admm": torch.arange(8) + index}, meta={"index": index, "world_size": 1})


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- unit: write + verify


def test_save_writes_a_manifest_of_every_file(tmp_path):
    path = _save(tmp_path, 0)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["world_size"] == 1
    assert sorted(manifest["files"]) == ["meta.json", "rank0.pt", "shared.pt"]
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (path / name).stat().st_size
        assert entry["sha256"] == ckpt.file_digest(path / name)
    assert ckpt.checkpoint_problem(path) is None
    ckpt.verify_checkpoint(path)  # no error
    assert not list(tmp_path.glob("*.tmp"))


def test_verify_names_each_kind_of_damage(tmp_path):
    path = _save(tmp_path, 0)
    intact = {f.name: f.read_bytes() for f in path.iterdir()}

    def restore():
        for name, data in intact.items():
            (path / name).write_bytes(data)

    _truncate(path / "shared.pt")
    assert "shared.pt is" in ckpt.checkpoint_problem(path) and "truncated" in ckpt.checkpoint_problem(path)
    with pytest.raises(ckpt.CheckpointError, match=rf"{path.name}.*shared\.pt is \d+ bytes"):
        ckpt.verify_checkpoint(path)
    restore()

    data = bytearray(intact["rank0.pt"])
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (path / "rank0.pt").write_bytes(bytes(data))
    assert "rank0.pt does not match its sha256" in ckpt.checkpoint_problem(path)
    assert ckpt.checkpoint_problem(path, hash=False) is None  # the quick check sees sizes only
    restore()

    (path / "rank0.pt").unlink()
    assert ckpt.checkpoint_problem(path) == "rank0.pt is missing"
    restore()

    (path / ckpt.MANIFEST).unlink()
    assert "no manifest.json" in ckpt.checkpoint_problem(path)
    (path / ckpt.MANIFEST).write_text("{not json")
    assert "manifest.json is unreadable" in ckpt.checkpoint_problem(path)
    restore()

    manifest = json.loads(intact[ckpt.MANIFEST])
    del manifest["files"]["meta.json"]
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.checkpoint_problem(path) == "manifest.json does not list meta.json"
    restore()

    assert ckpt.checkpoint_problem(path) is None
    assert ckpt.checkpoint_problem(tmp_path / "ckpt-000009") == "the directory is missing"


def test_latest_intact_walks_newest_first_and_ignores_the_pointer(tmp_path):
    assert ckpt.latest_intact_checkpoint(tmp_path / "none") == (None, [])
    for i in range(3):
        _save(tmp_path, i)
    assert sorted(p.name for p in ckpt.checkpoint_dirs(tmp_path)) == ["ckpt-000001", "ckpt-000002"]  # keep=2
    assert ckpt.latest_intact_checkpoint(tmp_path) == (tmp_path / "ckpt-000002", [])

    _truncate(tmp_path / "ckpt-000002" / "shared.pt")
    found, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert found == tmp_path / "ckpt-000001"
    assert [(p.name, "truncated" in why) for p, why in skipped] == [("ckpt-000002", True)]

    # A stale pointer (crash between rename and pointer update) does not hide a newer intact checkpoint.
    (tmp_path / "latest").write_text("ckpt-000001")
    shutil.rmtree(tmp_path / "ckpt-000002")
    _save(tmp_path, 2, value=2.0)
    (tmp_path / "latest").write_text("ckpt-000001")
    assert ckpt.latest_intact_checkpoint(tmp_path) == (tmp_path / "ckpt-000002", [])

    # A pointer at a missing directory is reported, and the intact one beneath is used.
    (tmp_path / "latest").write_text("ckpt-000003")
    found, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert found == tmp_path / "ckpt-000002"
    assert [(p.name, why.endswith("but missing")) for p, why in skipped] == [("ckpt-000003", True)]
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-000002"  # the cheap lookup does not trust it either


def test_resume_checkpoint_error_names_every_damaged_file(tmp_path):
    assert ckpt.resume_checkpoint(tmp_path) == (None, [])  # a fresh run
    for i in range(2):
        _save(tmp_path, i)
    _truncate(tmp_path / "ckpt-000001" / "shared.pt")
    (tmp_path / "ckpt-000000" / "rank0.pt").unlink()
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resume_checkpoint(tmp_path)
    msg = str(err.value)
    assert "no intact checkpoint" in msg
    assert f"{tmp_path / 'ckpt-000001'}: shared.pt is" in msg
    assert f"{tmp_path / 'ckpt-000000'}: rank0.pt is missing" in msg


def test_saving_after_a_fallback_replaces_the_damaged_checkpoint_and_keeps_the_intact_one(tmp_path):
    for i in range(3):
        _save(tmp_path, i)
    _truncate(tmp_path / "ckpt-000002" / "shared.pt")
    found, _ = ckpt.latest_intact_checkpoint(tmp_path)
    assert found.name == "ckpt-000001"
    _save(tmp_path, 2, value=5.0)  # what a resume from ckpt-000001 writes next
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["ckpt-000002", "ckpt-000001"]
    assert ckpt.latest_intact_checkpoint(tmp_path) == (tmp_path / "ckpt-000002", [])
    assert ckpt.checkpoint_problem(tmp_path / "ckpt-000001") is None
    assert ckpt.load_shared(tmp_path / "ckpt-000002")["model"]["w"][0] == 5.0


def test_saving_after_a_deeper_fallback_drops_the_damaged_newer_checkpoints(tmp_path):
    for i in range(4):
        ckpt.save_checkpoint(tmp_path, i, shared={}, per_rank={}, meta={"index": i}, keep=3)
    for i in (2, 3):
        _truncate(tmp_path / f"ckpt-00000{i}" / "shared.pt")
    found, skipped = ckpt.latest_intact_checkpoint(tmp_path)
    assert (found.name, [p.name for p, _ in skipped]) == ("ckpt-000001", ["ckpt-000003", "ckpt-000002"])
    ckpt.save_checkpoint(tmp_path, 2, shared={}, per_rank={}, meta={"index": 2}, keep=3)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["ckpt-000002", "ckpt-000001"]
    assert ckpt.latest_intact_checkpoint(tmp_path) == (tmp_path / "ckpt-000002", [])


def test_loading_a_damaged_file_names_it(tmp_path):
    path = _save(tmp_path, 0)
    _truncate(path / "shared.pt")
    with pytest.raises(ckpt.CheckpointError, match=str(path / "shared.pt")):
        ckpt.load_shared(path)


def _two_rank_worker(rank: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        root_p = Path(root)
        for i in range(3):
            ckpt.save_checkpoint(root_p, i, shared={"w": torch.ones(4)}, per_rank={"r": torch.full((4,), rank)},
                                 meta={"index": i, "world_size": 2})
        if rank == 0:
            _truncate(root_p / "ckpt-000002" / "rank1.pt")  # the other rank's file
        dist.barrier()
        path, skipped = ckpt.resume_checkpoint(root_p)
        if rank == 0:
            _truncate(root_p / "ckpt-000001" / "shared.pt")
        dist.barrier()
        try:
            ckpt.resume_checkpoint(root_p)
            error = None
        except ckpt.CheckpointError as e:
            error = str(e)
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"path": str(path), "skipped": [[str(p), w] for p, w in skipped], "error": error,
             "manifest": sorted(json.loads((root_p / "ckpt-000001" / ckpt.MANIFEST).read_text())["files"])}))
    finally:
        dist.destroy_process_group()


def test_two_ranks_write_one_manifest_and_agree_on_the_fallback(tmp_path):
    import torch.multiprocessing as mp

    from cluster.processes import free_port

    (tmp_path / "out").mkdir()
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path / "ck"), str(tmp_path / "out")), nprocs=2)
    got = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]  # rank 0 verified, rank 1 was told the same
    assert got[0]["manifest"] == ["meta.json", "rank0.pt", "rank1.pt", "shared.pt"]
    assert got[0]["path"] == str(tmp_path / "ck" / "ckpt-000001")
    assert [(Path(p).name, "rank1.pt is" in w) for p, w in got[0]["skipped"]] == [("ckpt-000002", True)]
    assert "no intact checkpoint" in got[0]["error"] and "shared.pt is" in got[0]["error"]


# ----------------------------------------------------------------------------- config


def test_max_failures_is_bounded():
    with pytest.raises(ConfigError, match=r"cluster\.max_failures: must be in 0\.\.10"):
        load_config("configs/quickstart.yaml", ["cluster.max_failures=-1"])
    with pytest.raises(ConfigError, match=r"cluster\.max_failures"):
        load_config("configs/quickstart.yaml", ["cluster.max_failures=11"])
    assert load_config("configs/quickstart.yaml", ["cluster.max_failures=3"]).cluster.max_failures == 3


# ----------------------------------------------------------------------------- end to end: resume falls back


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_shared(path)["model"]["weights"]


def _final(info) -> Path:
    path = ckpt.latest_checkpoint(info.dir / "checkpoints")
    assert ckpt.latest_intact_checkpoint(info.dir / "checkpoints") == (path, [])
    return path


def _damage_truncate(root: Path) -> str:
    _truncate(root / "ckpt-000001" / "shared.pt")
    return r"skipped .*ckpt-000001: shared\.pt is \d+ bytes, manifest\.json says \d+ \(truncated"


def _damage_missing_rank(root: Path) -> str:
    (root / "ckpt-000001" / "rank0.pt").unlink()
    return r"skipped .*ckpt-000001: rank0\.pt is missing"


def _damage_pointer_at_missing_dir(root: Path) -> str:
    shutil.rmtree(root / "ckpt-000001")
    assert (root / "latest").read_text().strip() == "ckpt-000001"
    return r"skipped .*ckpt-000001: named by .*latest but missing"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_missing_rank, _damage_pointer_at_missing_dir],
                         ids=["truncated", "missing-rank-file", "latest-at-missing-dir"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tiny, capsys, damage):
    full = pipeline.run(tiny("run_name=full", "phases.0.epochs=3"))
    with pytest.raises(InjectedFailure, match="after phase 0 epoch 2"):
        pipeline.run(tiny("run_name=cut", "phases.0.epochs=3", "debug.fail_at={phase: 0, epoch: 2}"))
    root = full.dir.parent / "cut" / "checkpoints"
    # Epochs 1 and 2 (1-based) wrote ckpt-000000 and ckpt-000001, then the run failed.
    assert sorted(p.name for p in root.glob("ckpt-*")) == ["ckpt-000000", "ckpt-000001"]
    assert [ckpt.read_meta(root / f"ckpt-00000{i}")["epoch"] for i in (0, 1)] == [1, 2]
    expected = damage(root)
    capsys.readouterr()

    resumed = pipeline.run(tiny("run_name=cut", "phases.0.epochs=3", "resume=true"))
    out = capsys.readouterr().out
    assert re.search(expected, out), out
    assert f"[resume] from {root / 'ckpt-000000'}" in out
    a, b = _weights(_final(full)), _weights(_final(resumed))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
