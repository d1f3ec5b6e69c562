"""A rank plan: every planned layer's format, rank, owner and costs, with the model's totals.

What planning produces (:func:`admm.planning.planner.plan_ranks`) and every later step
reads: the ADMM component, decompose, the driver's table, the plan file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from admm.formats.projections import RankSpec


@dataclass(frozen=True)
class LayerInfo:
    """A candidate layer: weight ``shape`` (C_out, C_in, kh, kw) or (out, in); conv output size ``out_hw``."""

    name: str
    shape: tuple[int, ...]
    out_hw: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] | None = None


@dataclass(frozen=True)
class LayerPlan:
    name: str
    shape: tuple[int, ...]
    fmt: str
    rank: RankSpec
    params_before: int
    params_after: int
    flops_before: int  # per image, 2 x MACs
    flops_after: int
    owner: int = 0
    error: float = -1.0  # ||W - Proj(W)|| / ||W|| of the weights it was planned from; -1: not computed
    # budget=latency: the layer's measured milliseconds per batch, dense and at ``rank``; -1: not measured
    latency_before: float = -1.0
    latency_after: float = -1.0


@dataclass
class RankPlan:
    layers: list[LayerPlan]
    dense_params_total: int  # the whole model, planned or not (weights of conv/linear layers)
    dense_flops_total: int
    allocation: str = "uniform"  # how the free layers' ranks were chosen (see plan_ranks)
    notes: list[str] = field(default_factory=list)  # printed under the table
    budget: str = "params"  # what keep_ratio was a fraction of (admm.config.BUDGETS)
    dense_latency_ms: float = -1.0  # budget=latency: the dense model's measured ms per batch; -1: not measured

    @property
    def has_latency(self) -> bool:
        return self.dense_latency_ms >= 0 and all(p.latency_after >= 0 for p in self.layers)

    @property
    def latency_after_total(self) -> float:
        """Predicted ms per batch: the dense model's measured latency less each planned layer's measured saving."""
        return self.dense_latency_ms - sum(p.latency_before - p.latency_after for p in self.layers)

    @property
    def params_after_total(self) -> int:
        return self.dense_params_total - sum(p.params_before - p.params_after for p in self.layers)

    @property
    def flops_after_total(self) -> int:
        return self.dense_flops_total - sum(p.flops_before - p.flops_after for p in self.layers)

    @property
    def kept(self) -> float:
        """The fraction of the dense model's budget unit (params or FLOPs per image) the plan keeps."""
        if self.budget == "flops":
            return self.flops_after_total / max(1, self.dense_flops_total)
        if self.budget == "latency":
            return self.latency_after_total / self.dense_latency_ms if self.dense_latency_ms > 0 else -1.0
        return self.params_after_total / max(1, self.dense_params_total)

    @property
    def compression(self) -> float:
        """Dense params / planned params over all conv/linear weights."""
        return self.dense_params_total / max(1, self.params_after_total)

    def by_name(self) -> dict[str, LayerPlan]:
        return {p.name: p for p in self.layers}

    @property
    def has_errors(self) -> bool:
        return bool(self.layers) and all(p.error >= 0 for p in self.layers)

    @property
    def error_sum(self) -> float:
        """The error allocation's objective: sum over layers of ||W - Proj(W)||^2 / ||W||^2 (-1: not computed)."""
        return sum(p.error ** 2 for p in self.layers) if self.has_errors else -1.0

    def table(self) -> str:
        """Human-readable plan: one row per layer (with its relative error when known), then totals and notes."""
        errors, latency = self.has_errors, self.has_latency
        rows = [("layer", "shape", "format", "ranks", "owner", "params", "->", "FLOPs", "->")
                + (("ms", "->") if latency else ()) + (("rel. error",) if errors else ())]
        for p in self.layers:
            rows.append((p.name, "x".join(map(str, p.shape)), p.fmt, str(p.rank), str(p.owner),
                         f"{p.params_before:,}", f"{p.params_after:,}", _si(p.flops_before), _si(p.flops_after))
                        + ((f"{p.latency_before:.3f}", f"{p.latency_after:.3f}") if latency else ())
                        + ((f"{p.error:.4f}",) if errors else ()))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        lines.append(f"model (conv+linear weights): params {self.dense_params_total:,} -> {self.params_after_total:,}"
                     f" ({self.compression:.2f}x), FLOPs/image {_si(self.dense_flops_total)} -> "
                     f"{_si(self.flops_after_total)} ({self.dense_flops_total / max(1, self.flops_after_total):.2f}x); "
                     f"budget {self.budget}: keeps {self.kept:.4f} of the dense {self.budget}")
        if latency:
            lines.append(f"latency per batch (layers measured one by one): dense {self.dense_latency_ms:.2f} ms -> "
                         f"predicted {self.latency_after_total:.2f} ms ({self.dense_latency_ms / max(1e-9, self.latency_after_total):.2f}x)")
        if errors:
            lines.append(f"allocation {self.allocation}: sum of per-layer ||W-Z||^2/||W||^2 {self.error_sum:.4f} "
                         f"over {len(self.layers)} layers (mean {self.error_sum / len(self.layers):.4f})")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"layers": [{**p.__dict__, "rank": list(p.rank) if isinstance(p.rank, tuple) else p.rank}
                           for p in self.layers],
                "dense_params": self.dense_params_total, "params_after": self.params_after_total,
                "dense_flops": self.dense_flops_total, "flops_after": self.flops_after_total,
                "compression": self.compression, "allocation": self.allocation, "notes": list(self.notes),
                "budget": self.budget,
                **({"dense_latency_ms": self.dense_latency_ms, "latency_after_ms": self.latency_after_total}
                   if self.has_latency else {}),
                **({"error_sum": self.error_sum} if self.has_errors else {})}

    @classmethod
    def from_json(cls, data: Mapping) -> "RankPlan":
        """Inverse of :meth:`to_json` (ranks back to ints / tuples)."""
        layers = [LayerPlan(**{**d, "shape": tuple(d["shape"]),
                               "rank": tuple(d["rank"]) if isinstance(d["rank"], list) else d["rank"]})
                  for d in data["layers"]]
        return cls(layers=layers, dense_params_total=int(data["dense_params"]),
                   dense_flops_total=int(data["dense_flops"]), allocation=str(data.get("allocation", "uniform")),
                   notes=list(data.get("notes", [])), budget=str(data.get("budget", "params")),
                   dense_latency_ms=float(data.get("dense_latency_ms", -1.0)))


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
