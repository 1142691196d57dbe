"""Arithmetic: sums of activations (residual connections) and scaling by a constant."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..decomposition import Factors
from .base import Bound, Low, SplitRule, TPart, dense, tadd
from .registry import register_split_rule


@register_split_rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__")
class AddRule(SplitRule):
    """Sums of activations (residual connections) are linear in every operand."""

    accel_op = "add"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        from torch.fx import Node

        if node.kwargs or len(node.args) != 2 or not all(isinstance(a, Node) for a in node.args):
            return None  # alpha=…, or adding a constant: trusted
        return Bound(self, None, {}, 2)

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(torch.broadcast_shapes(shapes[0], shapes[1]))

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0] + xs[1]

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        return tadd(ts[0], ts[1])

    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        if d is None:
            return [None, None]
        d = dense(d)
        return [_unbroadcast(d, shapes[0]), _unbroadcast(d, shapes[1])]


def _unbroadcast(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    if tuple(g.shape) == tuple(shape):
        return g
    while g.dim() > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdim=True)
    return g


@register_split_rule(operator.mul, operator.truediv, "mul", "div", torch.mul)
class ScalarMulRule(SplitRule):
    """Multiplication/division by a Python number (a product of two activations is *not* linear)."""

    accel_op = "mul_const"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        from torch.fx import Node

        if node.kwargs or len(node.args) != 2:
            return None
        a, c = node.args
        if not isinstance(a, Node) or isinstance(c, Node) or not isinstance(c, (int, float)):
            return None
        if node.target in (operator.truediv, "div"):
            if c == 0:
                return None
            c = 1.0 / c
        return Bound(self, None, {"c": float(c)}, 1)

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        return tuple(shapes[0])

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0] * b.kw["c"]

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        t = ts[0]
        if isinstance(t, Low):
            return Low(Factors(t.f.U * b.kw["c"], t.f.V), t.spatial)
        return None if t is None else t * b.kw["c"]
