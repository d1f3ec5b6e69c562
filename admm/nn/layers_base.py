"""What every factored layer shares: the dense layer's geometry, the spec, the bias, init from a weight.

A factored layer replaces one ``nn.Conv2d`` (groups == 1, zero padding) or
``nn.Linear`` of a trained model. It keeps the dense layer's geometry
(channels, kernel size, stride, padding, dilation) and its bias, and holds the
factors of one format of :mod:`admm.formats.projections` as raw ``nn.Parameter``\\ s
applied with ``torch.nn.functional``. Raw parameters rather than ``nn.Conv2d``
children on purpose: :func:`admm.planning.layer_info.describe_layers` plans every
``nn.Conv2d``/``nn.Linear`` it finds, and the factors of a decomposed model must
not look like fresh dense layers to compress.

Each layer describes itself by a JSON-able :meth:`FactoredLayer.spec`; the same
spec rebuilds it with zero factors (:meth:`FactoredLayer.empty`) so that a
checkpoint or an export can restore the structure before ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import Tensor, nn

from admm.formats.projections_base import RankSpec, computing, validate_rank

__all__ = ["FactoredLayer", "Geometry", "Padding", "assign"]

# Conv padding as nn.Conv2d stores it: a pair of ints, or "same"/"valid".
Padding = Union[tuple[int, int], str]

_GEOMETRY_KEYS = ("kind", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "bias")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    a, b = value
    return (int(a), int(b))


@dataclass(frozen=True)
class Geometry:
    """Shape and conv arguments of the dense layer a factored layer stands in for.

    ``kind`` is ``"conv"`` (weight ``(C_out, C_in, kh, kw)``, input ``(N, C_in, H, W)``)
    or ``"linear"`` (weight ``(out, in)``, input ``(*, in)``; kernel, stride and
    dilation ``(1, 1)``, padding ``(0, 0)``). For Linear, ``in_channels`` and
    ``out_channels`` are ``in_features`` and ``out_features``.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: Padding = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    bias: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("conv", "linear"):
            raise ValueError(f"geometry kind must be 'conv' or 'linear', got {self.kind!r}")
        if isinstance(self.padding, str) and self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be a pair of ints, 'same' or 'valid', got {self.padding!r}")

    @classmethod
    def of(cls, module: nn.Module) -> "Geometry":
        """Geometry of a dense ``nn.Conv2d`` or ``nn.Linear``.

        Raises:
            ValueError: a conv with ``groups != 1`` (grouped/depthwise convs are never
                planned: :func:`admm.planning.layer_info.describe_layers` skips them, and the
                formats factor a full ``C_out x C_in`` kernel) or a padding mode other
                than ``'zeros'`` (the factor chains pad with zeros).
            TypeError: any other module type.
        """
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise ValueError(f"cannot factor a grouped conv (groups={module.groups}): only groups == 1 is "
                                 "supported, the formats factor the full C_out x C_in kernel")
            if module.padding_mode != "zeros":
                raise ValueError(f"cannot factor a conv with padding_mode={module.padding_mode!r}: only 'zeros'")
            padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
            return cls("conv", module.in_channels, module.out_channels, _pair(module.kernel_size),
                       _pair(module.stride), padding, _pair(module.dilation), module.bias is not None)
        if isinstance(module, nn.Linear):
            return cls("linear", module.in_features, module.out_features, bias=module.bias is not None)
        raise TypeError(f"can factor nn.Conv2d or nn.Linear only, got {type(module).__name__}")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "Geometry":
        """Inverse of :meth:`to_spec` (extra keys such as ``format``/``rank`` are ignored)."""
        missing = [k for k in _GEOMETRY_KEYS if k not in spec]
        if missing:
            raise ValueError(f"layer spec lacks {missing}: {spec!r}")
        padding = spec["padding"]
        return cls(str(spec["kind"]), int(spec["in_channels"]), int(spec["out_channels"]),
                   _pair(spec["kernel_size"]), _pair(spec["stride"]),
                   padding if isinstance(padding, str) else _pair(padding),
                   _pair(spec["dilation"]), bool(spec["bias"]))

    def to_spec(self) -> dict[str, Any]:
        """JSON-able dict (lists, ints, str, bool) of every field."""
        return {"kind": self.kind, "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "bias": self.bias}

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense weight's shape: ``(C_out, C_in, kh, kw)`` or ``(out, in)``."""
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @property
    def conv_kwargs(self) -> dict[str, Any]:
        """``stride``, ``padding``, ``dilation`` for the one factor that carries the spatial kernel."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


class FactoredLayer(nn.Module):
    """Base of the factored layers: geometry, validated rank, dense bias, spec and init plumbing.

    Subclasses set ``format`` and implement ``_build`` (allocate the factors),
    ``_init_factors`` (fill them from a dense weight), ``forward`` and
    ``to_dense_weight``. The bias, when the dense layer had one, is the
    parameter ``bias`` of shape ``(C_out,)``, added once at the end.
    """

    format: ClassVar[str]

    def __init__(self, geometry: Geometry, rank: RankSpec, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = geometry
        self.rank = validate_rank(geometry.weight_shape, self.format, rank)
        factory = {"device": device, "dtype": dtype}
        if geometry.bias:
            self.bias = nn.Parameter(torch.zeros(geometry.out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self._build(factory)

    # -- to implement ---------------------------------------------------------------
    def _build(self, factory: dict[str, Any]) -> None:
        raise NotImplementedError

    def _init_factors(self, weight: Tensor) -> None:
        """Fill the factors from ``weight`` (dense shape, float32/float64, detached)."""
        raise NotImplementedError

    def to_dense_weight(self) -> Tensor:
        """The dense kernel this layer computes, of :attr:`Geometry.weight_shape` (bias not included)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """JSON-able description: ``{format, rank, kind, in_channels, out_channels, kernel_size,
        stride, padding, dilation, bias}``; ``rank`` is an int or a two-element list."""
        rank = list(self.rank) if isinstance(self.rank, tuple) else self.rank
        return {"format": self.format, "rank": rank, **self.geometry.to_spec()}

    @classmethod
    def empty(cls, spec: dict[str, Any], *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> "FactoredLayer":
        """The layer a spec describes, with zero factors (to be filled by ``load_state_dict``)."""
        if spec.get("format") != cls.format:
            raise ValueError(f"{cls.__name__} builds format {cls.format!r}, spec has {spec.get('format')!r}")
        rank = spec["rank"]
        return cls(Geometry.from_spec(spec), tuple(rank) if isinstance(rank, list) else rank,
                   device=device, dtype=dtype)

    @classmethod
    def from_dense(cls, module: nn.Conv2d | nn.Linear, rank: RankSpec, *,
                   weight: Tensor | None = None) -> "FactoredLayer":
        """Factor a dense layer at ``rank``; factors from ``weight`` (e.g. ADMM's Z) or ``module.weight``.

        The new layer has the module's geometry and a copy of its bias, and lives on
        the module weight's device and dtype. The factorisation itself runs in
        float32 (float64 stays float64), as the projections do.
        """
        geometry = Geometry.of(module)
        source = module.weight if weight is None else weight
        if tuple(source.shape) != geometry.weight_shape:
            raise ValueError(f"weight of shape {tuple(source.shape)} does not fit the layer's "
                             f"{geometry.weight_shape}")
        layer = cls(geometry, rank, device=module.weight.device, dtype=module.weight.dtype)
        with computing(source) as w, torch.no_grad():
            layer._init_factors(w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
        layer.train(module.training)
        return layer

    def _add_bias(self, y: Tensor) -> Tensor:
        if self.bias is None:
            return y
        return y + (self.bias.view(-1, 1, 1) if self.geometry.kind == "conv" else self.bias)

    def extra_repr(self) -> str:
        g = self.geometry
        return (f"{self.format}, rank={self.rank}, {g.kind} {g.in_channels}->{g.out_channels}, "
                f"kernel={g.kernel_size}, stride={g.stride}, padding={g.padding}, dilation={g.dilation}, "
                f"bias={g.bias}")


def assign(param: Tensor, value: Tensor) -> None:
    """Copy ``value`` (any dtype/device, same number of elements) into ``param`` in place."""
    with torch.no_grad():
        param.copy_(value.reshape(param.shape))
