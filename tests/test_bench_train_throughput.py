"""The training-throughput benchmark's precision axis: one row per `--precision` value, each row's engine
really under that precision, and an unknown value refused with the allowed ones named."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.train_throughput", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_an_unknown_precision_is_refused_with_the_allowed_values():
    out = _bench("--precision", "fp32,fp16")
    assert out.returncode == 2
    assert "--precision: ['fp16'] not among ['auto', 'fp32', 'bf16']" in out.stderr


def test_one_row_per_precision_value(tmp_path):
    report = tmp_path / "tt.json"
    out = _bench("--models", "resnet20", "--batch", "2", "--steps", "1", "--warmup", "0", "--fused", "1",
                 "--precision", "fp32,bf16", "--threads", "1", "--json", str(report))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(report.read_text())["results"]
    assert [r["bf16"] for r in rows] == [False, True]
    assert all(r["engine_img_s"] > 0 and r["plain_img_s"] > 0 for r in rows)
