"""Fill in the MLflow record of a finished run that an older tdcompress made, before runs carried the tags
and summary metrics `tdcompress compare` reads (model, method, format, keep_ratio, seed, command, device;
dense_top1, flops).

Everything is recomputed from what the run left on disk (its ``config.yaml`` and final checkpoint) and
from the record itself; nothing is typed in. The only input is the command the run was started with,
which an old record does not hold (pass it as the study script ran it). Tags that exist are kept; the
run is marked ``tdcompress.backfilled`` with the date, so a reader can tell.

    python bench/backfill_record.py --tracking-uri sqlite:////work/study/mlruns.db dense-r20-s0 \\
        --command "tdcompress run configs/study/dense_resnet20.yaml seed=0 run_name=dense-r20-s0 ..."

``--init-sizes``: a compressed run started from ``model.init`` before runs logged their init model's
size: ``init_params`` and ``init_flops`` recomputed from the init model's architecture (the run's own
``model.name``, as trainer.init_weights builds it before loading the weights), then ``compression`` and
``flops_reduction`` against the run's final ``params`` and ``flops``, as launcher.run.mlflow_runs derives them.

    python bench/backfill_record.py --tracking-uri sqlite:////work/study/mlruns.db r20-rankprune-3x-s0 --init-sizes
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, RunTag  # noqa: E402

from launcher.config import load_config  # noqa: E402
from launcher.run.run_record import format_and_keep, method_of  # noqa: E402
from trainer.checkpoints import files as ckpt  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.phases.decompose import measured_flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_name")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", default="tdcompress")
    p.add_argument("--command", help="the command the run was started with (dense runs)")
    p.add_argument("--init-sizes", action="store_true", help="a run from model.init: its init model's params/FLOPs "
                   "and the compression ratios against them")
    p.add_argument("--device", default="cpu x2", help="the device tag, as newer runs write it (default: cpu x2)")
    args = p.parse_args(argv)
    client = MlflowClient(tracking_uri=args.tracking_uri, registry_uri=args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        p.error(f"--experiment: no experiment {args.experiment!r} at {args.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{args.run_name}' "
                              "and attributes.status = 'FINISHED'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if len(parents) != 1:
        p.error(f"run_name: expected one finished parent run {args.run_name!r}, found {len(parents)}")
    run = parents[0]
    run_dir = Path(run.data.tags["tdcompress.run_dir"])
    cfg = load_config(run_dir / "config.yaml")
    size = 32 if cfg.data.dataset in ("packed", "cifar10") else 224
    now = int(datetime.datetime.now().timestamp() * 1000)
    if args.init_sizes:
        m = run.data.metrics
        if not cfg.model.init or "params" not in m or "flops" not in m:
            p.error("--init-sizes: the run has no model.init, or no final params/flops (no evaluate phase)")
        init = build_model(cfg.model.name, 10 if size == 32 else 1000)
        metrics = {"init_params": float(sum(x.numel() for x in init.parameters())),
                   "init_flops": float(measured_flops(init, (1, 3, size, size)))}
        metrics.update(compression=metrics["init_params"] / m["params"], flops_reduction=metrics["init_flops"] / m["flops"])
        metrics = {k: v for k, v in metrics.items() if k not in m}
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                         tags=[RunTag("tdcompress.backfilled", datetime.date.today().isoformat())])
        print(f"{args.run_name} ({run.info.run_id}): metrics {metrics}")
        return 0
    if not args.command:
        p.error("--command: required for a dense run (the command it was started with)")
    if any(ph.kind != "pretrain" and ph.kind != "evaluate" for ph in cfg.phases):
        p.error("run_name: only dense runs (pretrain + evaluate) are backfilled; later runs carry their own record")
    last = ckpt.latest_checkpoint(run_dir / "checkpoints")
    if last is None:
        p.error(f"run_name: no checkpoint under {run_dir / 'checkpoints'}")
    fmt, keep = format_and_keep(cfg)
    tags = {"model": cfg.model.name, "dataset": cfg.data.dataset, "method": method_of(cfg), "seed": str(cfg.seed),
            "format": fmt, "keep_ratio": keep, "tdcompress.command": args.command, "device": args.device,
            "tdcompress.backfilled": datetime.date.today().isoformat()}
    new_tags = [RunTag(k, v) for k, v in tags.items() if k not in run.data.tags or k == "tdcompress.backfilled"]
    m = run.data.metrics
    metrics = {"dense_top1": m["top1"]} if "dense_top1" not in m else {}
    if "flops" not in m:
        model = build_model(cfg.model.name, 10 if size == 32 else 1000)
        metrics["flops"] = float(measured_flops(model, (1, 3, size, size)))
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     tags=new_tags)
    print(f"{args.run_name} ({run.info.run_id}): tags {sorted(t.key for t in new_tags)}, metrics {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
