"""Correctness checks of the GPU paths, one per subcommand; exit 1 when a check fails.

``admm_bf16``: the ADMM penalty under the engine's bf16 autocast against fp32. Two DeepSpeed
engines (ZeRO 0, one rank) start from the same weights, one with bf16 autocast (as on a GPU),
one in fp32; each attaches an AdmmComponent (svd plan, rho 0.5: large enough that the penalty
moves the weights) and
  1. backpropagates ``0 * loss`` through its autocast forward: the data gradient is exactly 0,
     so each planned weight's gradient is the hook's term alone, which must be rho V
     (V = U - Z) in fp32, bit for bit: autocast must not reach the hook or the master grads;
  2. trains ``--steps`` steps on one fixed batch, then runs a Z-update: the bf16 losses and
     primal residual must follow fp32's within bf16 tolerance (2e-2 of the loss, 20% of the
     residual, as tests/test_engine_paths.py allows the compiled path).

``factored``: a decomposed model (svd and tucker2 plans at keep 0.5, BN folded, eval mode)
run on ``--device`` in fp32, fp32 channels_last and bf16 autocast, against the same model in
float64 on the CPU: relative error ||out - ref|| / ||ref|| and top-1 agreement. Bounds: fp32
5e-3 (cuDNN may use TF32), bf16 5e-2; top-1 agreement >= 0.9 for bf16 (random logits are close).

    python -m bench.gpu_checks admm_bf16 --model resnet18 --image 112 --batch 32
    python -m bench.gpu_checks factored --model resnet50 --image 224 --batch 8
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from admm.admm_component import AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from admm.nn.fold import fold_batchnorm
from admm.nn.surgery import decompose_model
from admm.planning.model_plan import plan_for_model
from bench.common import (
    Report,
    add_json_option,
    classes_for,
    init_process_group,
    pick_device,
    start,
    synthetic_batch,
)
from trainer.config import EngineConfig, OptimConfig
from trainer.core.engine import Precision, build_engine, prepare_deepspeed_env
from trainer.models import build_model

LOSS_TOL, PRIMAL_TOL = 2e-2, 0.2  # bf16 vs fp32 after a few steps
FP32_TOL, BF16_TOL, BF16_AGREE = 5e-3, 5e-2, 0.9


def _admm_run(model_name: str, size: int, batch: int, steps: int, bf16: bool, device: torch.device) -> dict:
    """Hook check and ``steps`` training steps under the penalty for one precision (module docstring)."""
    classes = classes_for(model_name)
    precision = Precision(bf16=bf16, channels_last=device.type == "cuda")
    torch.manual_seed(0)
    model = build_model(model_name, classes).to(device)
    comp = AdmmComponent.create(model, CompressionConfig(format="svd", keep_ratio=0.5), AdmmConfig(rho=0.5),
                                rank=0, world=1, grad_accum=1, log=lambda metrics, step: None)
    optim = OptimConfig(lr=0.01)
    engine = build_engine(model, optim, EngineConfig(precision="bf16" if bf16 else "fp32"), batch_size=batch,
                          lr=0.01, total_steps=10**6, steps_per_epoch=1000, world_size=1, precision=precision,
                          extra_groups=comp.prepare(model, optim.weight_decay))
    comp.attach(engine.module, optimizer=engine.optimizer)
    x, y = synthetic_batch(batch, size, classes, device, precision.channels_last, seed=1)
    modules = dict(engine.module.named_modules())
    weights = {p.name: modules[p.name].weight for p in comp.owned}
    for w in engine.module.parameters():
        w.grad = None
    out = engine(x)
    engine.backward(0.0 * F.cross_entropy(out.float(), y))
    hook_err, grad_dtypes = 0.0, set()
    for name, w in weights.items():
        want = comp.state.rho * comp.state.layers[name].v
        grad_dtypes.add(str(w.grad.dtype))
        hook_err = max(hook_err, float((w.grad - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    for w in engine.module.parameters():
        w.grad = None
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    primal = comp.z_update(steps)["admm_primal"]
    return {"bf16": bf16, "out_dtype": str(out.dtype), "planned_layers": len(weights),
            "grad_dtypes": sorted(grad_dtypes), "hook_rel_err": hook_err, "losses": losses, "primal": primal}


def admm_bf16(args: argparse.Namespace, device: torch.device, report: Report) -> bool:
    prepare_deepspeed_env()
    init_process_group(device)
    runs = {bf16: _admm_run(args.model, args.image, args.batch, args.steps, bf16, device) for bf16 in (False, True)}
    fp32, bf16 = runs[False], runs[True]
    loss_diff = max(abs(a - b) / max(1.0, abs(a)) for a, b in zip(fp32["losses"], bf16["losses"]))
    primal_diff = abs(fp32["primal"] - bf16["primal"]) / max(fp32["primal"], 1e-30)
    checks = {
        "bf16 forward really bf16": bf16["out_dtype"] == "torch.bfloat16",
        "master grads fp32": fp32["grad_dtypes"] == bf16["grad_dtypes"] == ["torch.float32"],
        "hook adds exactly rho V (fp32)": fp32["hook_rel_err"] == 0.0,
        "hook adds exactly rho V (bf16)": bf16["hook_rel_err"] == 0.0,
        f"losses within {LOSS_TOL:g}": loss_diff <= LOSS_TOL,
        f"primal within {PRIMAL_TOL:.0%}": primal_diff <= PRIMAL_TOL,
        "trains": fp32["losses"][-1] < fp32["losses"][0],
    }
    for r in (fp32, bf16):
        report.add({"check": "admm_bf16", "model": args.model, "image": args.image, "batch": args.batch, **r})
    report.finish(loss_rel_diff=loss_diff, primal_rel_diff=primal_diff, checks=checks, passed=all(checks.values()))
    print(f"{args.model} {args.image}px batch {args.batch}, {fp32['planned_layers']} planned layers, "
          f"{args.steps} steps: loss diff {loss_diff:.2e}, primal fp32 {fp32['primal']:.4f} bf16 {bf16['primal']:.4f} "
          f"({primal_diff:.1%}), hook rel err fp32 {fp32['hook_rel_err']:.1e} bf16 {bf16['hook_rel_err']:.1e}")
    for what, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
    return all(checks.values())


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref).norm() / ref.norm())


def factored(args: argparse.Namespace, device: torch.device, report: Report) -> bool:
    classes = classes_for(args.model)
    x = torch.randn(args.batch, 3, args.image, args.image, generator=torch.Generator().manual_seed(0))
    ok = True
    for fmt in ("svd", "tucker2"):
        torch.manual_seed(0)
        model = build_model(args.model, classes).eval()
        plan = plan_for_model(model, CompressionConfig(format=fmt, keep_ratio=0.5),
                              input_shape=(1, 3, args.image, args.image))
        model = decompose_model(model, plan).eval()
        fold_batchnorm(model)
        with torch.no_grad():
            ref = model.double()(x.double())
            for name, out in _outputs(model.float().to(device), x.to(device)).items():
                err = _rel(out, ref)
                agree = float((out.argmax(1).cpu() == ref.argmax(1)).float().mean())
                bound = BF16_TOL if name.startswith("bf16") else FP32_TOL
                passed = err <= bound and (agree >= BF16_AGREE if name.startswith("bf16") else agree == 1.0)
                ok &= passed
                report.add({"check": "factored", "format": fmt, "variant": name, "device": str(device),
                            "model": args.model, "image": args.image, "batch": args.batch,
                            "layers": len(plan.layers), "rel_err": err, "top1_agreement": agree, "bound": bound,
                            "passed": passed})
                print(f"  {'ok  ' if passed else 'FAIL'} {fmt:8s} {name:20s} on {device}: rel err {err:.2e} "
                      f"(bound {bound:g}), top-1 agreement {agree:.3f}", flush=True)
    report.finish(passed=ok)
    return ok


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float32 logits of ``model`` on ``x``'s device: fp32, fp32 channels_last, bf16 autocast (channels_last)."""
    out = {"fp32": model(x).float()}
    model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    out["fp32 channels_last"] = model(x).float()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out["bf16 autocast"] = model(x).float()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("check", choices=("admm_bf16", "factored"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image", type=int, default=112, help="input side in px")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="admm_bf16: training steps before the Z-update")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    add_json_option(p)
    args = p.parse_args(argv)
    device = torch.device(args.device) if args.device else pick_device()
    report = start(f"gpu_checks.{args.check}", device, args)
    ok = (admm_bf16 if args.check == "admm_bf16" else factored)(args, device, report)
    print(f"{args.check}: {'passed' if ok else 'FAILED'} on {report.info['device']}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
