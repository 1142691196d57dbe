"""Normalisation: eval-mode BatchNorm is a per-channel affine map (train mode normalises by batch
statistics, which is not linear, and runs trusted)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import Bound, SplitRule, TPart, dense
from .registry import register_split_rule


@register_split_rule(nn.BatchNorm2d, nn.BatchNorm1d)
class BatchNormEvalRule(SplitRule):
    """Eval-mode BatchNorm is per-channel affine: ``s·x + (β − s·μ)``. Train mode is trusted."""

    accel_op = "bn_scale"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        m = module
        if m.training or not m.track_running_stats or m.running_var is None:
            return None
        return Bound(self, m, {"eps": float(m.eps)}, 1)

    def _scale(self, m: nn.Module) -> Tensor:
        s = torch.rsqrt(m.running_var + m.eps)
        return s * m.weight if m.weight is not None else s

    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        m = b.module
        return {k: v for k, v in (("weight", m.weight), ("bias", m.bias)) if v is not None}

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        """The running variance and affine weight; the accelerator forms the scale itself.

        The running variance is sent as a fresh snapshot on every call: train-mode BatchNorm updates it in
        place *without* bumping its version counter, so an executor that caches weights by version (the
        remote client) would otherwise keep serving the statistics of an earlier epoch (caught by result
        verification), and the ledger would not record the new values."""
        m = b.module
        p = {"running_var": m.running_var.detach().clone()}
        if m.weight is not None:
            p["weight"] = m.weight
        return p

    def has_bias(self, b: Bound) -> bool:
        return True

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(shapes[0])

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        m = b.module
        if with_bias:
            return F.batch_norm(xs[0], m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
        shape = (1, -1) + (1,) * (xs[0].dim() - 2)
        return xs[0] * self._scale(m).view(shape)

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        if d is None:
            return [None]
        d = dense(d)
        shape = (1, -1) + (1,) * (d.dim() - 2)
        return [d * self._scale(b.module).view(shape)]

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        m = b.module
        x = dense(t_in, shape, delta)
        if r_in is not None:
            x = x + r_in
        dims = [0] + list(range(2, x.dim()))
        shp = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (x - m.running_mean.view(shp)) * torch.rsqrt(m.running_var + m.eps).view(shp)
        out = {}
        if m.weight is not None:
            out["weight"] = (delta * xhat).sum(dims)
        if m.bias is not None:
            out["bias"] = delta.sum(dims)
        return out

