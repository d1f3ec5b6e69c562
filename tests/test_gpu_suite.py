"""bench.gpu_suite kept working without a GPU: the dry run end to end, the time slices, the carry bundle.

The dry run is the suite's own code paths at tiny sizes (CUDA-only checks say "skipped: no GPU"),
so a change that breaks a GPU benchmark's arguments, imports or JSON fails here, not on the
rare lent GPU. The bundle test emulates the GPU machine: a fresh virtual environment that sees
this one's packages minus everything the bundle must bring (deepspeed, tensorly, hjson, pydantic
and their needs) and minus Ray, MLflow and this project; the bundle, built for this Python,
installs into it from its own files and runs a DeepSpeed check there. This machine's Python is not the
GPU machine's 3.12, so the test's bundle packs this environment's installed packages as wheels
(``--wheels-from installed``, offline); the download path of ``make gpu-bundle`` is not run here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_suite import Check, checks, run_suite

ROOT = Path(__file__).resolve().parents[1]
GPU = torch.cuda.is_available()


def _env(cifar_root: Path) -> dict[str, str]:
    sample = cifar_root.parent / "imagenet-sample" / "val"
    return {**os.environ, "TDC_DATA_ROOT": str(cifar_root),
            "TDC_IMAGENET_SAMPLE": os.environ.get("TDC_IMAGENET_SAMPLE", str(sample)),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_dry_run_runs_every_check_and_writes_json_and_table(tmp_path, cifar_root):
    # A generous budget: on a loaded host the slices must not turn slowness into a failure here.
    res = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--dry-run", "--budget", "3000",
                          "--out", str(tmp_path)], cwd=ROOT, env=_env(cifar_root), capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    by_name = {c["name"]: c for c in result["checks"]}
    assert list(by_name) == [c.name for c in checks()]
    assert result["dry_run"] and result["banner"]["device_type"] == ("cuda" if GPU else "cpu")
    for check in checks():
        got = by_name[check.name]
        if check.gpu_only and not GPU:
            assert (got["status"], got["reason"]) == ("skipped", "no GPU"), got
        elif check.name == "inference_compiled":
            assert got["status"] == "skipped" and "GPU only" in got["reason"], got
        elif check.module == "pytest":
            # Every GPU-only test is selected by -m gpu (8 today) and, without a GPU, skips itself.
            assert got["tests"].get("skipped" if not GPU else "passed", 0) >= 8, got
            assert got["status"] == ("skipped" if not GPU else "ok"), got
        else:
            assert got["status"] == "ok", (check.name, got["log_tail"])
            assert got["reason"] == ("" if GPU else "ran on the CPU (no GPU)"), got["reason"]
            report = got["report"]
            assert report["schema"] == "tdcompress-bench/1" and report["complete"], report
            assert report["benchmark"].startswith(check.module.replace("gpu_checks", "gpu_checks."))
            assert report["results"], check.name
    assert by_name["admm_bf16"]["report"]["extra"]["passed"] is True
    # The nvJPEG rows: measured on a GPU, otherwise each says why not.
    nvjpeg = [r for r in by_name["input_nvjpeg"]["report"]["results"] if r["decode"] == "gpu"]
    assert nvjpeg and all(("img_s" in r) if GPU else r["skipped"] == "no GPU" for r in nvjpeg)
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| # | check | status | s (slice) | figures |" in table
    for check in checks():
        assert f"| {check.name}: " in table
    log = (tmp_path / "gpu_suite.log").read_text()
    assert all(f"===== {c}:" in log for c, v in by_name.items() if v["status"] != "skipped" or c == "gpu_tests")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.log", "gpu_suite.md"]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"  # killed, not yet reaped
    except (FileNotFoundError, ProcessLookupError):
        return True


def test_a_hanging_check_is_killed_at_its_slice_with_its_children_and_the_rest_still_run(tmp_path):
    pids = tmp_path / "pids"
    hang = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
            "time.sleep(600)\n")
    # The hang's slice (40 s * 12/33, ~15 s) leaves a loaded host time to start the check and its child and
    # write their pids before the slice ends: a 1 s slice ended, once, before the check had started its child.
    suite = [Check("hang", "sleeps past its slice", 12, "python", ["-c", hang], ["-c", hang]),
             Check("crash", "exits 3", 10, "python", ["-c", "raise SystemExit(3)"], ["-c", "raise SystemExit(3)"]),
             Check("fine", "exits 0", 10, "python", ["-c", "print('fine')"], ["-c", "print('fine')"]),
             Check("needs_gpu", "CUDA only", 1, "python", ["-c", "pass"], ["-c", "pass"], gpu_only=True)]
    result = run_suite(budget=40, dry=True, only=None, out_dir=tmp_path / "out", suite=suite)
    got = {c["name"]: c for c in result["checks"]}
    assert got["hang"]["status"] == "timeout" and got["hang"]["slice_s"] <= 40 * 12 / 33, got["hang"]  # its share
    assert pids.exists(), "the hang check was killed before it had started its child"
    for pid in map(int, pids.read_text().split()):  # the check and the process it started
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(pid), pid
    assert (got["crash"]["status"], got["crash"]["reason"]) == ("failed", "exit code 3")
    assert got["fine"]["status"] == "ok"
    if not GPU:
        assert (got["needs_gpu"]["status"], got["needs_gpu"]["reason"]) == ("skipped", "no GPU")
    assert "| 1 | hang: sleeps past its slice | timeout" in (tmp_path / "out" / "gpu_suite.md").read_text()


def test_bad_arguments_name_the_field_and_allowed_values(tmp_path):
    from bench.gpu_suite import main

    with pytest.raises(SystemExit, match=r"--only: unknown checks \['nope'\]; allowed: \['gpu_tests'"):
        main(["--dry-run", "--only", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--budget", "0", "--out", str(tmp_path)])
    if not GPU:
        with pytest.raises(SystemExit, match="no GPU here.*--dry-run"):
            main(["--out", str(tmp_path)])


BUNDLED = {"deepspeed", "tensorly", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection",
           "typing_extensions", "tdcompress"}


def _image_site(dest: Path) -> Path:
    """This venv's site-packages as links, minus the bundle's packages, Ray, MLflow and this project: the
    GPU machine's image as far as the project is concerned."""
    site = Path(torch.__file__).resolve().parents[1]
    dest.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if entry.suffix == ".pth" or stem in BUNDLED or stem.startswith(("ray", "mlflow", "__editable__")):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.mark.slow
def test_bundle_builds_under_the_limit_and_installs_into_a_fresh_venv_from_its_own_files(tmp_path, cifar_root):
    env = _env(cifar_root)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    # Offline: the third-party wheels are packed from this venv's installed files (`make gpu-bundle` downloads
    # the GPU machine's Python 3.12 ones instead; the layout, setup.sh and the project wheel are the same).
    res = subprocess.run([sys.executable, "-m", "bench.gpu_bundle", "--out", str(tmp_path / "bundle"),
                          "--python-version", version, "--wheels-from", "installed"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["bundle_bytes"] + manifest["tree_bytes"] < 64 * 2**20, manifest["bundle_bytes"]
    wheels = {Path(f).name.split("-")[0].lower() for f in manifest["files"] if f.startswith("wheels/")}
    assert wheels == BUNDLED, wheels

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    venv_py = tmp_path / "venv" / "bin" / "python"
    venv_site = Path(subprocess.run([venv_py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "image.pth").write_text(str(_image_site(tmp_path / "image")) + "\n")
    clean = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = ("import importlib.util, deepspeed, tensorly, pydantic, trainer.core.engine; "
             "print('FROM', deepspeed.__file__, tensorly.__file__); "
             "print('PRESENT', [m for m in ('ray', 'mlflow') if importlib.util.find_spec(m)])")
    script = (f". {tmp_path / 'bundle' / 'setup.sh'} && python -c {probe!r} && "
              "python -m bench.gpu_checks admm_bf16 --model tinycnn --image 32 --batch 4 --steps 2")
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                         env={**clean, "TDC_BUNDLE_PYTHON": str(venv_py), "TDC_BUNDLE_SITE": str(tmp_path / "site"),
                              "PATH": f"{venv_py.parent}{os.pathsep}{clean['PATH']}"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "bundle ok: deepspeed" in res.stdout
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("FROM "))
    assert line.count(str(tmp_path / "site")) == 2, line  # both from the bundle, not from this venv
    assert "PRESENT []" in res.stdout  # neither Ray nor MLflow is there, as on the GPU machine
    assert "admm_bf16: passed" in res.stdout
