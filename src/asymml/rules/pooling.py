"""Pooling: average pools, adaptive average pools and spatial means, all per-channel spatial maps that
commute with the low-rank factor ``U`` (``pool(U V) = U pool(V)``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..decomposition import Factors
from .base import Bound, Low, SplitRule, TPart, call_args, const_args
from .registry import register_split_rule


class _PoolLike(SplitRule):
    """Per-channel spatial linear ops commute with channel mixing: ``pool(U V) = U pool(V)``."""

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        t = ts[0]
        if t is None:
            return None
        if isinstance(t, Low):
            pv = self.forward_dense(b, [t.Vmaps])
            f = Factors(t.f.U, pv.reshape(pv.shape[0], pv.shape[1], -1))
            return Low(f, tuple(pv.shape[2:]))
        return self.forward_dense(b, [t])


@register_split_rule(nn.AvgPool2d, F.avg_pool2d)
class AvgPoolRule(_PoolLike):
    accel_op = "avg_pool2d"
    NAMES = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            m = module
            kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
                      count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
        else:
            if not const_args(node):
                return None
            kw = call_args(node, self.NAMES, {})
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return F.avg_pool2d(xs[0], **b.kw)


@register_split_rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
class AdaptiveAvgPoolRule(_PoolLike):
    accel_op = "adaptive_avg_pool2d"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            kw = {"output_size": module.output_size}
        else:
            if not const_args(node):
                return None
            kw = call_args(node, ["output_size"], {})
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return F.adaptive_avg_pool2d(xs[0], **b.kw)


@register_split_rule("mean", torch.mean)
class MeanRule(SplitRule):
    """Spatial means (``x.mean([2, 3])``), a global average pool."""

    accel_op = "mean"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if not const_args(node):
            return None
        kw = call_args(node, ["dim", "keepdim"], {"keepdim": False})
        dim = kw.get("dim")
        dims = (dim,) if isinstance(dim, int) else tuple(dim or ())
        if not dims or any(d == 0 for d in dims) or "dtype" in node.kwargs:
            return None
        return Bound(self, None, {"dim": dim, "keepdim": kw["keepdim"]}, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0].mean(**b.kw)
