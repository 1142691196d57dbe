"""Shape ops: flatten, view and reshape that keep the batch dimension (pure re-indexing)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .base import Bound, SplitRule, call_args, const_args
from .registry import register_split_rule


@register_split_rule(nn.Flatten, torch.flatten, "flatten")
class FlattenRule(SplitRule):
    accel_op = "flatten"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if module is not None:
            kw = {"start_dim": module.start_dim, "end_dim": module.end_dim}
        else:
            if not const_args(node):
                return None
            kw = call_args(node, ["start_dim", "end_dim"], {"start_dim": 0, "end_dim": -1})
        if kw["start_dim"] == 0:
            return None  # would mix samples
        return Bound(self, module, kw, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return torch.flatten(xs[0], **b.kw)


@register_split_rule("view", "reshape", torch.reshape)
class ReshapeRule(SplitRule):
    """``view``/``reshape`` with constant sizes that keep the batch dimension."""

    accel_op = "reshape"

    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        if node.kwargs or not const_args(node):
            return None
        shape = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        shape = tuple(shape)
        if not shape or shape[0] != -1 and not isinstance(shape[0], int):
            return None
        return Bound(self, None, {"shape": shape}, 1)

    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        return xs[0].reshape(b.kw["shape"])
