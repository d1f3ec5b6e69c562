"""Every GPU figure from one call: the checks of bench/gpu_checks.py and the benchmarks, in priority order.

    python -m bench.gpu_suite --out DIR [--budget 480]       # on a GPU: the full sizes
    python -m bench.gpu_suite --out DIR --dry-run            # the same code paths at tiny sizes (CPU: < 2 min)

Each check runs as ``python -m bench.<module> ...`` in a process of its own, with a time
slice: the remaining budget shared among the checks not yet run in proportion to their
weights, so time one check leaves unused goes to the next and a slow, hanging or crashing
check costs only its slice (its process group is killed at the slice's end; a benchmark
rewrites its JSON after every row, so what it measured before that is kept). CUDA-only
checks report "skipped: no GPU" when there is none. Written under ``--out`` (three files, so
a device call's eight-file limit is not reached): ``gpu_suite.json`` (banner, budget, and per
check its status, seconds, slice, command and the benchmark's own JSON), ``gpu_suite.md``
(the table, also printed last) and ``gpu_suite.log`` (every check's output).

Data: ``TDC_DATA_ROOT`` (packed CIFAR-10, for device_cache) and ``TDC_IMAGENET_SAMPLE``
(ImageNet JPEGs in <wnid>/ folders, for the nvJPEG check); the bundle's setup script sets both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import banner, banner_line, pick_device
from bench.gpu_suite_table import markdown_table

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("ok", "failed", "timeout", "skipped")


@dataclass(frozen=True)
class Check:
    """One entry of the suite: ``full`` runs on a GPU, ``dry`` at tiny sizes (None: skipped, ``dry_skip`` says why)."""

    name: str
    what: str
    weight: float  # share of the budget, roughly its seconds at full size on an H100/H200
    module: str  # bench.<module>; "pytest": python -m pytest ARGS; "python": python ARGS (no JSON)
    full: list[str]
    dry: list[str] | None
    gpu_only: bool = False  # without a GPU: "skipped: no GPU", also in a dry run
    dry_skip: str = ""
    training: bool = False  # its rows carry peak_gib (peak GPU memory of the training step)


def gpu_test_files() -> list[str]:
    """Test files holding a ``pytest.mark.gpu`` test: only those are collected, so a test module that needs a
    package the GPU machine lacks (Ray, MLflow) cannot break the run."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def checks() -> list[Check]:
    """The suite, in priority order: correctness, training, ADMM step, Z-update, inference, input."""
    # Dry-run sizes: tinycnn (one planned conv) wherever the path does not depend on the model, so a dry run
    # costs little more than its processes' start.
    tiny_train = ["--models", "tinycnn", "--batch", "4", "--steps", "1", "--warmup", "1", "--zero", "0",
                  "--fused", "1", "--no-malloc-tuning"]
    # -v: one line per test as it ends, so a run killed at its slice still says which tests passed
    pytest_args = ["-v", "-rA", "-p", "no:cacheprovider", "-m", "gpu", *gpu_test_files()]
    return [
        Check("gpu_tests", "the GPU-only tests (pytest -m gpu)", 100, "pytest", pytest_args, pytest_args),
        Check("admm_bf16", "ADMM hook under bf16 autocast vs fp32 (DeepSpeed engine)", 25, "gpu_checks",
              ["admm_bf16", "--model", "resnet18", "--image", "112", "--batch", "32"],
              ["admm_bf16", "--model", "tinycnn", "--image", "32", "--batch", "4", "--steps", "2"]),
        Check("factored_cuda", "factored ResNet-50 outputs on cuda vs float64 CPU", 25, "gpu_checks",
              ["factored", "--model", "resnet50", "--image", "224", "--batch", "8"],
              ["factored", "--model", "resnet20", "--image", "32", "--batch", "2"]),
        Check("train", "DeepSpeed step vs plain loop, ResNet-50 b256 224px bf16 channels_last", 45,
              "train_throughput",
              ["--models", "resnet50", "--batch", "256", "--steps", "20", "--warmup", "5", "--zero", "0",
               "--fused", "1"], tiny_train, training=True),
        Check("train_compiled", "the same with engine.compile (torch.compile)", 90, "train_throughput",
              ["--models", "resnet50", "--batch", "256", "--steps", "20", "--warmup", "10", "--zero", "0",
               "--fused", "1", "--compile-only"], [*tiny_train, "--compile-only"], gpu_only=True, training=True),
        Check("admm_step", "ADMM step / plain step, ResNet-50 and ResNet-18 b256 224px", 45, "admm_overhead",
              ["--models", "resnet50,resnet18", "--batch", "256,256", "--image", "224", "--steps", "10",
               "--warmup", "3", "--rounds", "1"],
              ["--models", "tinycnn", "--batch", "4", "--steps", "1", "--warmup", "1", "--rounds", "1",
               "--no-malloc-tuning"], training=True),
        Check("zupdate", "Z-update per format, all ResNet-50 planned layers", 40, "zupdate",
              ["--formats", "svd,tucker2,tucker2:warm,tt", "--rounds", "1", "--worlds", "2,4,8"],
              ["--model", "tinycnn", "--formats", "svd,tucker2,tt", "--rounds", "1", "--worlds", "2"]),
        Check("inference", "factored ResNet-50 inference vs dense, eager, batch 1 and 256", 40, "inference_speed",
              ["--formats", "svd,tucker2", "--keep", "0.5,0.33", "--batches", "1,256", "--repeats", "20"],
              ["--model", "tinycnn", "--image", "32", "--formats", "svd,tucker2", "--keep", "0.5",
               "--batches", "2", "--repeats", "1", "--no-malloc-tuning"]),
        Check("input_nvjpeg", "nvJPEG decode + device crop/flip vs decode in loader processes", 30,
              "input_pipeline", ["--device-decode", "--repeat", "10", "--rounds", "3", "--workers", "4,8",
                                 "--batch", "128"],
              ["--device-decode", "--repeat", "1", "--limit", "8", "--rounds", "1", "--workers", "0",
               "--batch", "4"]),
        Check("device_cache", "CIFAR-10 device cache vs per-item CPU path", 20, "device_cache",
              ["--images", "20000", "--batch", "256", "--loader-workers", "4"],
              ["--images", "64", "--batch", "16"]),
        Check("inference_compiled", "the same, torch.compile'd (eager rows again beside)", 90, "inference_speed",
              ["--formats", "svd,tucker2", "--keep", "0.5,0.33", "--batches", "256,1", "--repeats", "20",
               "--compile"], None, gpu_only=True, dry_skip="torch.compile inference is timed on a GPU only"),
        Check("zupdate_cp", "Z-update of cp (cold and warm), distinct shapes timed once", 30, "zupdate",
              ["--formats", "cp,cp:warm", "--dedupe", "--rounds", "1", "--worlds", "2,4,8"],
              ["--model", "tinycnn", "--formats", "cp,cp:warm", "--dedupe", "--rounds", "1", "--worlds", "2"]),
    ]


@dataclass
class Outcome:
    name: str
    what: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    slice_s: float = 0.0
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    report: dict[str, Any] | None = None  # the benchmark's JSON (bench/common.py's shape)
    tests: dict[str, int] | None = None  # gpu_tests: outcome -> count
    log_tail: str = ""


def slice_for(weights: list[float], remaining: float) -> float:
    """The first check's slice: ``remaining`` seconds shared in proportion to the weights of those left."""
    return remaining * weights[0] / sum(weights)


def _pytest_counts(log: str) -> dict[str, int]:
    """Outcome counts: pytest's final line (``2 passed, 6 skipped, 300 deselected in 5.1s``), else, when it was
    killed before that line, its -v progress lines (``tests/test_x.py::test_y PASSED [ 12%]``)."""
    finals = re.findall(r"^=*\s*(\d+ \w+(?:, \d+ \w+)*) in [\d.]+s", log, flags=re.M)
    if finals:
        return {k: int(n) for n, k in (part.split() for part in finals[-1].split(", "))}
    counts: dict[str, int] = {}
    for m in re.finditer(r"^\S+::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", log, flags=re.M):
        counts[m.group(1).lower()] = counts.get(m.group(1).lower(), 0) + 1
    return counts


def run_check(check: Check, dry: bool, gpu: bool, slice_s: float, work: Path, log) -> Outcome:
    """Run one check in its own process group for at most ``slice_s`` seconds; its output goes to ``log``."""
    out = Outcome(check.name, check.what, "skipped", slice_s=slice_s)
    if check.gpu_only and not gpu:
        out.reason = "no GPU"
        return out
    args = check.dry if dry else check.full
    if args is None:
        out.reason = check.dry_skip
        return out
    json_path = work / f"{check.name}.json"
    if check.module in ("pytest", "python"):
        cmd = [sys.executable, *(["-m", "pytest"] if check.module == "pytest" else []), *args]
    else:
        cmd = [sys.executable, "-m", f"bench.{check.module}", *args, "--json", str(json_path)]
    out.command = [Path(c).name if c == sys.executable else c for c in cmd]
    log.write(f"\n===== {check.name}: {' '.join(out.command)} (slice {slice_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("DS_ACCELERATOR", "cuda" if gpu else "cpu")
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as own:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=own, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # a group of its own: the slice's end kills all of it
        try:
            out.returncode = proc.wait(timeout=max(slice_s, 1.0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended between the timeout and the kill
                pass
            proc.wait()
        out.seconds = time.monotonic() - t0
        own.seek(0)
        text = own.read()
    log.write(text)
    log.flush()
    if out.returncode is None:
        out.status, out.reason = "timeout", f"killed at the end of its {slice_s:.0f} s slice"
    elif out.returncode == 0:
        out.status = "ok"
    else:
        out.status, out.reason = "failed", f"exit code {out.returncode}"
    if check.module == "pytest":
        out.tests = _pytest_counts(text)
        if out.status == "ok" and not gpu and not out.tests.get("passed"):
            out.status, out.reason = "skipped", "no GPU"  # every GPU test skipped itself
    elif json_path.is_file():
        out.report = json.loads(json_path.read_text())
    if out.status == "ok" and not gpu:
        out.reason = "ran on the CPU (no GPU)"
    if out.status != "ok":
        out.log_tail = text[-3000:]
    return out


def run_suite(budget: float, dry: bool, only: set[str] | None, out_dir: Path,
              suite: list[Check] | None = None) -> dict[str, Any]:
    """Run ``suite`` (default :func:`checks`; ``only``: those names) within ``budget`` seconds; write and return
    the result."""
    device = pick_device()
    gpu = device.type == "cuda"
    if not gpu and not dry:
        raise SystemExit("no GPU here: the full sizes would take hours on a CPU; use --dry-run")
    suite = checks() if suite is None else suite
    unknown = (only or set()) - {c.name for c in suite}
    if unknown:
        raise SystemExit(f"--only: unknown checks {sorted(unknown)}; allowed: {[c.name for c in suite]}")
    todo = [c for c in suite if only is None or c.name in only]
    info = banner(device)
    print(banner_line(info), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as work, open(out_dir / "gpu_suite.log", "w") as log:
        log.write(banner_line(info) + "\n")
        for i, check in enumerate(todo):
            remaining = deadline - time.monotonic()
            s = slice_for([c.weight for c in todo[i:]], remaining)
            if remaining < 1:
                o = Outcome(check.name, check.what, "skipped", reason="budget spent")
            else:
                o = run_check(check, dry, gpu, s, Path(work), log)
            outcomes.append(o)
            print(f"[{i + 1}/{len(todo)}] {check.name}: {o.status}{': ' + o.reason if o.reason else ''} "
                  f"({o.seconds:.0f} s of {s:.0f})", flush=True)
    result = {"schema": "tdcompress-gpu-suite/1", "banner": info, "dry_run": dry, "budget_s": budget,
              "seconds": budget - (deadline - time.monotonic()),
              "checks": [{**vars(o), "training": c.training} for o, c in zip(outcomes, todo)]}
    (out_dir / "gpu_suite.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown_table(result)
    (out_dir / "gpu_suite.md").write_text(table)
    print("\n" + table, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-suite-out"), help="gpu_suite.{json,md,log} go here")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all checks together")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes; CUDA-only checks skipped without a GPU")
    p.add_argument("--only", help="comma-separated check names (default: all), e.g. train,inference")
    p.add_argument("--list", action="store_true", help="print the checks in order and exit")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.list:
        for c in checks():
            print(f"{c.name:20s} weight {c.weight:4.0f}  {c.what}")
        return 0
    only = set(filter(None, args.only.split(","))) if args.only else None
    result = run_suite(args.budget, args.dry_run, only, args.out)
    return 1 if any(c["status"] in ("failed", "timeout") for c in result["checks"]) else 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the parent only waits; the checks get the cores
    sys.exit(main())
