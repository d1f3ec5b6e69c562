"""The markdown table of one or more ``bench.inference_speed --json`` results: one line per (format, level,
runtime, batch), so bench/README.md's table is drawn from the committed JSON files, not typed in.

    python -m bench.inference_speed_table bench/results/inference_speed/*.json

Columns: the dense model's time in that runtime (mean of the timings before and after), its A/A spread, the
factored model's speed-up and that speed-up divided by the planned FLOPs ratio ("of FLOPs": 1.0 means as much
faster as it does less work), and the same for the latency-table realization ("tuned"), whose ratio is taken to
the FLOPs it runs. A ratio in bold meets the goal: 0.9 of the FLOPs ratio at batch 32, 0.8 at batch 1; one
struck through comes from a pair whose dense timings (before and after) differ by more than 10%. Each row
names its result file (``run``): rows of one file were timed in one process.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_RUNTIMES = {"eager": "torch eager", "fused": "eager + fusion", "compiled": "torch.compile",
             "onnxruntime": "onnxruntime"}
_ORDER = {mode: i for i, mode in enumerate(_RUNTIMES)}


def _rows(paths: list[Path]) -> tuple[list[dict[str, Any]], set[str]]:
    rows, devices = [], set()
    for path in paths:
        report = json.loads(path.read_text())
        if report.get("benchmark") != "inference_speed":
            raise SystemExit(f"{path}: not an inference_speed result (benchmark={report.get('benchmark')!r})")
        banner = report["banner"]
        devices.add(f"{banner['device']}, {banner['cpus']} CPUs, {banner['torch_threads']} torch threads, "
                    f"torch {banner['torch']}, malloc tuned {banner['malloc_tuned']}")
        rows += [dict(r, source=path.name) for r in report["results"]]
    return rows, devices


NOISY = 0.10  # dense timed before and after differ by more than this: the host moved under the pair


def _goal(of_flops: float, row: dict[str, Any]) -> str:
    """``of_flops`` in bold where it meets the goal (0.9 of the FLOPs ratio at batch 32 or more, 0.8 below) and
    the row's dense A/A spread is within :data:`NOISY`; a noisy row's ratio is not a figure, it is struck."""
    if row["dense_spread"] > NOISY:
        return f"~~{of_flops:.2f}~~"
    met = of_flops >= (0.9 if row["batch"] >= 32 else 0.8)
    return f"**{of_flops:.2f}**" if met else f"{of_flops:.2f}"


def render(paths: list[Path]) -> str:
    """The table (markdown) of every row in ``paths``, sorted by format, level, batch (large first), runtime."""
    rows, devices = _rows(paths)
    rows.sort(key=lambda r: (r["format"], -r["keep"], -r["batch"], r["source"], _ORDER.get(r["mode"], 9)))
    lines = [f"Device: {d}" for d in sorted(devices)] + [
        "",
        "| ResNet-50 | FLOPs fewer | run | runtime | batch | dense ms | A/A | factored | of FLOPs | tuned | of FLOPs run |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tuned = r.get("tuned_speedup")
        tuned_of = r.get("tuned_of_flops")
        lines.append(
            f"| {r['format']} keep {r['keep']:g} x{r['rank_multiple']} | {r['flops_x']:.2f}x | {Path(r['source']).stem} | "
            f"{_RUNTIMES.get(r['mode'], r['mode'])} | {r['batch']} | {r['dense_ms']:.1f} | {100 * r['dense_spread']:.0f}% | "
            f"{r['speedup']:.2f}x | {_goal(r['of_flops'], r)} | "
            + (f"{tuned:.2f}x ({len(r.get('choices') or {})} changed) | {_goal(tuned_of, r)} |"
               if tuned is not None else "- | - |"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="inference_speed --json files")
    print(render(p.parse_args().results))


if __name__ == "__main__":
    main()
