"""bench/README.md's inference table is drawn from committed result files: a row meeting its goal is bold, a row
whose dense timings moved under it is struck, and a file of another benchmark is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.inference_speed_table import render


def _report(path: Path, rows: list[dict], benchmark: str = "inference_speed") -> Path:
    banner = {"device": "CPU Test", "cpus": 2, "torch_threads": 2, "torch": "2.x", "malloc_tuned": True}
    path.write_text(json.dumps({"schema": "tdcompress-bench/1", "benchmark": benchmark, "complete": True,
                                "banner": banner, "args": {}, "results": rows, "extra": {}}))
    return path


def _row(batch: int, mode: str, speedup: float, spread: float, tuned: float | None = None) -> dict:
    row = {"format": "svd", "keep": 0.5, "rank_multiple": 16, "batch": batch, "mode": mode, "params_x": 2.0,
           "flops_x": 2.0, "dense_ms": 100.0, "dense_spread": spread, "factored_ms": 100.0 / speedup,
           "speedup": speedup, "of_flops": speedup / 2.0}
    if tuned is not None:
        row.update(tuned_speedup=tuned, tuned_of_flops=tuned / 2.0, choices={"layer1": "dense"})
    return row


def test_goals_in_bold_noisy_pairs_struck(tmp_path):
    path = _report(tmp_path / "svd50.json", [
        _row(32, "onnxruntime", 1.9, 0.02, tuned=1.7),  # 0.95 meets 0.9; tuned 0.85 does not
        _row(1, "eager", 1.7, 0.03),  # 0.85 meets batch 1's 0.8
        _row(1, "onnxruntime", 3.0, 0.35)])  # 1.5 "of FLOPs" from a pair whose dense moved 35%: not a figure
    table = render([path])
    lines = {line.split("|")[4].strip() + line.split("|")[5].strip(): line for line in table.splitlines()
             if line.startswith("| svd")}
    assert "Device: CPU Test, 2 CPUs, 2 torch threads" in table
    assert "| **0.95** | 1.70x (1 changed) | 0.85 |" in lines["onnxruntime32"]
    assert "| **0.85** | - | - |" in lines["torch eager1"]
    assert "~~1.50~~" in lines["onnxruntime1"] and "**" not in lines["onnxruntime1"]
    rows = [line for line in table.splitlines() if line.startswith("| svd")]
    assert [r.split("|")[5].strip() for r in rows] == ["32", "1", "1"]  # large batch first, eager before ort


def test_another_benchmark_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="not an inference_speed result"):
        render([_report(tmp_path / "x.json", [], benchmark="zupdate")])
