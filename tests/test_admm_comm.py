"""ADMM's communication is handed in: owners' residuals are combined through ``comm.all_reduce`` alone."""
from __future__ import annotations

import pytest
import torch

from admm.admm_component import AdmmComponent
from admm.config import AdmmConfig, CompressionConfig
from admm.planning.model_plan import plan_for_model
from trainer.models import build_model

CC = CompressionConfig(format="svd", keep_ratio=0.5, exclude=[], min_channels=3)


class Recording:
    """Stands in for one rank's group: keeps the table this rank contributes, adds what the others give."""

    def __init__(self, others: list[torch.Tensor] | None = None) -> None:
        self.sent: list[torch.Tensor] = []
        self.others = others or []

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.sent.append(tensor.clone())
        for t in self.others:
            tensor += t

    def broadcast(self, obj, src=0):
        return obj


def _component(rank: int, world: int, comm, said: list[str]) -> AdmmComponent:
    torch.manual_seed(0)
    model = build_model("tinycnn", 10)
    comp = AdmmComponent(plan_for_model(model, CC, world), AdmmConfig(rho=0.1), rank=rank, world=world,
                         grad_accum=1, log=lambda m, s: None, comm=comm, say=said.append)
    comp.prepare(model, 0.0)
    comp.attach(model)
    return comp


def test_two_owners_report_what_one_rank_reports():
    said: list[str] = []
    alone = _component(0, 1, Recording(), said).z_update(1)
    second = Recording()
    rank1 = _component(1, 2, second, [])
    rank1.z_update(1)
    first = Recording(others=[second.sent[-1]])
    rank0 = _component(0, 2, first, said)
    assert {p.owner for p in rank0.plan.layers} == {0, 1}  # the test needs layers on both ranks
    both = rank0.z_update(1)
    assert both.keys() == alone.keys()
    for key, value in alone.items():
        assert both[key] == pytest.approx(value, rel=1e-12), key
    # one table per publication, owned rows only: rank 1's rows of layers it does not own are zero
    owned = {p.name for p in rank1.owned}
    order = sorted(rank1.plan.layers, key=lambda p: p.owner)
    for row, p in zip(second.sent[-1], order):
        assert bool(row.abs().sum() > 0) == (p.name in owned), p.name
    assert said and said[-1].startswith("[admm] Z-update 1: primal ||W-Z||/||W||")
