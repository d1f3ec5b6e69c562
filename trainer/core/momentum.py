"""SGD momentum by parameter name, read out of one DeepSpeed engine and written into another.

A phase that changes parameter shapes mid-training (rank_prune) builds a new
engine around the changed model; without this its optimizer would restart every
momentum buffer from zero. :func:`read_momentum` gives the full (unsharded)
buffer of every parameter, :func:`write_momentum` seeds a freshly built engine
with buffers of the new shapes; the caller slices what changed.

Where the buffers live depends on the ZeRO stage of ``trainer/core/engine.py``'s engine:

- stage 0: ``engine.optimizer`` is the torch SGD itself; its ``state[param]``
  holds ``momentum_buffer`` (the parameter's shape).
- stages 1 and 2: DeepSpeed's ZeRO optimizer flattens each param group into one
  fp32 partition per rank and runs the torch SGD (``engine.optimizer.optimizer``)
  on those; a parameter's slice of the partition is given by its ``_hp_mapping``
  (DeepSpeed's tensor-fragment map). Reading assembles the full buffer with one
  all-reduce per parameter over the data-parallel group (every rank must call it,
  in the same order: they do, the model is the same on every rank); writing fills
  each rank's own fragment, no communication.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

KEY = "momentum_buffer"  # torch.optim.SGD's state key


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def _names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


@torch.no_grad()
def read_momentum(engine) -> dict[str, Tensor]:
    """``{parameter name: momentum buffer}`` (fp32, the parameter's shape) of every parameter that has one.

    Names are ``engine.module.named_parameters()``'s. Empty when the optimizer keeps no
    momentum (``optim.momentum=0``, or no step taken yet). Stage 0 returns the optimizer's
    own tensors (not copies): take them before the optimizer steps again.
    """
    names = _names(engine.module)
    out: dict[str, Tensor] = {}
    if _zero_stage(engine) == 0:
        for p, st in engine.optimizer.state.items():
            if id(p) in names and st.get(KEY) is not None:
                out[names[id(p)]] = st[KEY]
        return out
    from deepspeed import comm as dist

    zero = engine.optimizer
    for i, params in enumerate(zero.bit16_groups):
        flat = zero.single_partition_of_fp32_groups[i]
        buf = zero.optimizer.state.get(flat, {}).get(KEY)
        for p in params:
            full = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
            m = p._hp_mapping
            if buf is not None and m is not None:
                full.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(
                    buf.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel))
            dist.all_reduce(full, group=zero.real_dp_process_group[i])  # each element lives on exactly one rank
            if buf is not None:
                out[names[id(p)]] = full.view(p.shape)
    return out


@torch.no_grad()
def write_momentum(engine, buffers: dict[str, Tensor]) -> int:
    """Seed ``engine``'s optimizer (built, no step taken) with ``buffers`` (name -> tensor of the parameter's shape).

    Parameters without an entry get a zero buffer (SGD then starts them as it would from
    nothing: with dampening 0, ``0 * momentum + grad`` is the buffer it would create).
    Returns the number of parameters that got a buffer from ``buffers``.
    Raises ValueError when a buffer's shape is not its parameter's.
    """
    named = dict(engine.module.named_parameters())
    for name, buf in buffers.items():
        if name in named and buf.shape != named[name].shape:
            raise ValueError(f"momentum of {name}: shape {tuple(buf.shape)}, the parameter has "
                             f"{tuple(named[name].shape)}")
    names = _names(engine.module)
    carried = 0
    if _zero_stage(engine) == 0:
        opt = engine.optimizer
        for group in opt.param_groups:
            if not group.get("momentum"):
                continue
            for p in group["params"]:
                name = names.get(id(p))
                if name in buffers:
                    opt.state[p][KEY] = buffers[name].detach().to(p.dtype).clone()
                    carried += 1
        return carried
    zero = engine.optimizer
    for i, params in enumerate(zero.bit16_groups):
        if not zero.optimizer.param_groups[i].get("momentum"):
            continue
        flat = zero.single_partition_of_fp32_groups[i]
        buf = torch.zeros_like(flat)
        for p in params:
            name, m = names.get(id(p)), p._hp_mapping
            if name not in buffers:
                continue
            carried += 1
            if m is not None:  # this rank holds part of p
                buf.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(
                    buffers[name].detach().reshape(-1).narrow(0, m.lp_fragment_address.start,
                                                              m.lp_fragment_address.numel))
        zero.optimizer.state[flat][KEY] = buf
    return carried
