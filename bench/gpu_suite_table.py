"""The markdown of bench/gpu_suite.py's result: one line per check, then each check's rows in a few words.

Every summary reads the benchmark's JSON (bench/common.py's shape) defensively: a check cut
short by its slice may have written only some rows.
"""
from __future__ import annotations

from typing import Any, Callable


def _f(x: Any, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _peak(r: dict) -> str:
    return f", peak {r['peak_gib']:.1f} GiB" if r.get("peak_gib") is not None else ""


def _tests(c: dict) -> list[str]:
    counts = c.get("tests") or {}
    return [", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test outcome read"]


def _admm_bf16(rows: list[dict], extra: dict) -> list[str]:
    if "loss_rel_diff" not in extra:
        return []
    bad = [k for k, ok in extra.get("checks", {}).items() if not ok]
    return [f"loss rel diff {extra['loss_rel_diff']:.1e}, primal rel diff {extra['primal_rel_diff']:.1%}, "
            f"hook rel err {max(r['hook_rel_err'] for r in rows):.1e}" + (f"; FAILED: {', '.join(bad)}" if bad else "")]


def _factored(rows: list[dict], extra: dict) -> list[str]:
    return [f"{r['format']} {r['variant']} on {r['device']}: rel err {r['rel_err']:.1e} (bound {r['bound']:g}), "
            f"top-1 agreement {r['top1_agreement']:.3f}" for r in rows]


def _train(rows: list[dict], extra: dict) -> list[str]:
    return [f"{r['model']} b{r['batch']} {r['image']}px zero {r['zero']} compile {r['compile']} bf16 {r['bf16']}: "
            f"engine {r['engine_img_s']:,.0f} img/s, plain {r['plain_img_s']:,.0f} (A/A {r['plain_spread']:.1%}), "
            f"ratio {r['ratio']:.3f}{_peak(r)}" for r in rows]


def _admm_step(rows: list[dict], extra: dict) -> list[str]:
    return [f"{r['model']} b{r['batch']} {r['image']}px: ADMM/plain {r['admm_ratio']:.3f} "
            f"(interleaved {_f(r.get('interleaved_admm_ratio'), '.3f')}, floor {r['floor_ratio']:.3f}), "
            f"plain {max(r['plain_img_s']):,.0f} img/s{_peak(r)}" for r in rows]


def _zupdate(rows: list[dict], extra: dict) -> list[str]:
    out = []
    for r in rows:
        shards = ", ".join(f"w{w} {s['largest_shard_s']:.3f} s" for w, s in r["shards"].items())
        out.append(f"{r['format']}: {r['layers']} layers, 1 rank {r['one_rank_total_s']:.3f} s ({shards}); "
                   f"slowest {r['slowest_layer']} {r['slowest_layer_s']:.3f} s")
    return out


def _inference(rows: list[dict], extra: dict) -> list[str]:
    return [f"{r['format']} keep {r['keep']:.2f} (params {r['params_x']:.2f}x, FLOPs {r['flops_x']:.2f}x) "
            f"b{r['batch']} {r['mode']}: dense {r['dense_ms']:.2f} ms (A/A {r['dense_spread']:.0%}), factored "
            f"{r['factored_ms']:.2f} ms, speedup {r['speedup']:.2f}x" for r in rows]


def _input(rows: list[dict], extra: dict) -> list[str]:
    return [f"decode={r['decode']} {r['procs']} loader procs: " +
            (f"skipped: {r['skipped']}" if "skipped" in r else
             f"{r['img_s']:,.0f} img/s ({r['vs_cpu_decode']:.2f}x decode=cpu)") for r in rows]


def _device_cache(rows: list[dict], extra: dict) -> list[str]:
    return [f"{r['images']} images b{r['batch']} on {r['device']}: device cache {r['device_cache_img_s']:,.0f} "
            f"img/s vs per-item CPU path {r['cpu_path_img_s']:,.0f} ({r['ratio']:.1f}x; decode once "
            f"{r['decode_once_s']:.1f} s)" for r in rows]


SUMMARIES: dict[str, Callable[[list[dict], dict], list[str]]] = {
    "admm_bf16": _admm_bf16, "factored_cuda": _factored, "train": _train, "train_compiled": _train,
    "admm_step": _admm_step, "zupdate": _zupdate, "zupdate_cp": _zupdate, "inference": _inference,
    "inference_compiled": _inference, "input_nvjpeg": _input, "device_cache": _device_cache,
}


def summary(check: dict) -> list[str]:
    """A few words per measured row of ``check`` (an entry of the suite JSON's ``checks``)."""
    if check["name"] == "gpu_tests":
        return _tests(check) if check["status"] != "skipped" or check.get("tests") else []
    report = check.get("report") or {}
    try:
        return SUMMARIES[check["name"]](report.get("results", []), report.get("extra", {}))
    except (KeyError, TypeError, ValueError) as exc:  # a row cut short: say so, keep the rest of the table
        return [f"(rows not summarised: {type(exc).__name__} {exc})"]


def markdown_table(result: dict) -> str:
    b = result["banner"]
    cuda = f", CUDA {b['cuda']}" if "cuda" in b else ""
    lines = [f"device: {b['device']}{cuda}, torch {b['torch']}, deepspeed {b['deepspeed']}, python {b['python']}"
             f"{' (dry run: tiny sizes)' if result['dry_run'] else ''}; budget {result['budget_s']:.0f} s, "
             f"used {result['seconds']:.0f} s", "",
             "| # | check | status | s (slice) | figures |", "|---|---|---|---|---|"]
    details = []
    for i, c in enumerate(result["checks"], 1):
        status = c["status"] + (f": {c['reason']}" if c["reason"] else "")
        rows = summary(c)
        first = rows[0] if rows else ""
        more = f" (+{len(rows) - 1} more below)" if len(rows) > 1 else ""
        lines.append(f"| {i} | {c['name']}: {c['what']} | {status} | {c['seconds']:.0f} ({c['slice_s']:.0f}) | "
                     f"{first}{more} |")
        if len(rows) > 1:
            details += ["", f"{c['name']}:", *(f"- {r}" for r in rows)]
    return "\n".join(lines + details) + "\n"
