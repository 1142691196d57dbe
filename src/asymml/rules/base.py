"""The split-rule contract: trusted parts, bound rules, and the base classes every rule derives from.

A rule gives, for one linear op ``y = A x + b``:

* the accelerator instruction computing ``A R`` (bias-free, public weights);
* ``trusted_forward``: ``A T + b`` on the trusted part, exploiting low-rank factors where that is cheaper;
* ``input_grad``: ``Aᵀ d`` for a trusted gradient part (low-rank where possible);
* ``param_grads``: the trusted share of the parameter gradients.

Trusted parts (``TPart``) are ``None`` (zero), :class:`Low` (factors ``U V``) or a dense tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..decomposition import Factors


@dataclass
class Low:
    """A low-rank trusted part: per sample ``U_b V_b`` reshaped to ``B×C×H×W``."""

    f: Factors
    spatial: tuple[int, ...]
    #: derived tensors several rules of one backward read (e.g. the im2col of ``V``), keyed by how they
    #: were made; they live as long as this part
    memo: dict[Any, Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        C = self.f.U.shape[-2]
        return (self.f.V.shape[0], C, *self.spatial)

    def dense(self) -> Tensor:
        return self.f.dense().reshape(self.shape)

    @property
    def Vmaps(self) -> Tensor:
        return self.f.V.reshape(self.f.V.shape[0], self.f.V.shape[1], *self.spatial)


TPart = Low | Tensor | None


def dense(t: TPart, shape: tuple[int, ...] | None = None, like: Tensor | None = None) -> Tensor | None:
    """Materialise a trusted part (``None`` stays ``None`` unless ``shape`` is given)."""
    if t is None:
        if shape is None:
            return None
        return torch.zeros(shape, dtype=like.dtype if like is not None else torch.float32)
    if isinstance(t, Low):
        return t.dense()
    return t


def tadd(a: TPart, b: TPart) -> TPart:
    if a is None:
        return b
    if b is None:
        return a
    return dense(a) + dense(b)


@dataclass
class Bound:
    """A rule bound to one graph node: the op's module (if any) and its static arguments."""

    rule: SplitRule
    module: nn.Module | None
    kw: dict[str, Any]
    n_inputs: int


class SplitRule:
    """Base class. ``heavy`` rules own a weight whose gradient is split between the two sides.

    Capabilities the planner asks for (instead of testing the rule's class):

    * ``decomposes_input``: a region decomposes this op's tensor input when it comes from outside the
      region (``X = UV + R``). Worth it only where a low-rank trusted input makes the trusted side cheaper
      than running the op on ``X`` itself (convolutions); other ops take external inputs whole.
    """

    heavy = False
    decomposes_input = False
    accel_op = "identity"
    fresh_grads = False
    """``input_grad`` (for its one input) and ``param_grads`` return new tensors, never views of ``d`` or of
    anything else: the region may then add the accelerator's share into them in place."""

    # ---- binding
    def bind(self, node: Any, module: nn.Module | None) -> Bound | None:
        """Return a binding, or ``None`` if this node is not linear after all (then it runs trusted)."""
        return Bound(self, module, {}, 1)

    # ---- parameters
    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        return {}

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        """Public tensors the accelerator needs (by value)."""
        return {}

    def accel_kw(self, b: Bound) -> dict[str, Any]:
        return dict(b.kw)

    # ---- forward
    def forward_dense(self, b: Bound, xs: list[Tensor], with_bias: bool = True) -> Tensor:
        raise NotImplementedError

    def trusted_forward(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]]) -> TPart:
        if all(t is None for t in ts) and not self.has_bias(b):
            return None
        xs = [dense(t, s) for t, s in zip(ts, shapes)]
        return self.forward_dense(b, xs)

    def trusted_forward_into(self, b: Bound, ts: list[TPart], shapes: list[tuple[int, ...]], out: Tensor) -> bool:
        """Add the trusted share straight into ``out`` (the accelerator's share of the same output, owned by
        the caller) instead of returning it: no trusted output tensor and no separate merge pass. Returns
        False where the rule has no such path (the caller then merges as usual)."""
        return False

    def has_bias(self, b: Bound) -> bool:
        return False

    def out_shape(self, b: Bound, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Output shape from input shapes (default: run the bias-free op on meta tensors)."""
        return tuple(self.forward_dense(b, [torch.empty(s, device="meta") for s in shapes], with_bias=False).shape)

    # ---- backward
    def input_grad(self, b: Bound, d: TPart, shapes: list[tuple[int, ...]]) -> list[TPart]:
        """``Aᵀ d`` for each input (the linear part only)."""
        if d is None:
            return [None] * len(shapes)
        dd = dense(d)
        zs = [torch.zeros(s, dtype=dd.dtype, requires_grad=True) for s in shapes]
        with torch.enable_grad():
            y = self.forward_dense(b, zs, with_bias=False)
            gs = torch.autograd.grad(y, zs, dd, allow_unused=True)
        return list(gs)

    def param_grads(
        self, b: Bound, t_in: TPart, r_in: Tensor | None, delta: Tensor, d_t: TPart, shape: tuple[int, ...]
    ) -> dict[str, Tensor]:
        """Trusted share of the parameter gradients (the accelerator adds ``R̃ ⋆ δ_A`` for heavy weights)."""
        return {}


class WeightedRule(SplitRule):
    """A layer with a ``weight`` (its gradient split between the sides: ``heavy``) and an optional ``bias``.

    The accelerator gets the weight by value and computes the bias-free op on residuals; the bias is
    added once, on the trusted side, and its gradient is trusted only.
    """

    heavy = True

    def params(self, b: Bound) -> dict[str, nn.Parameter]:
        p = {"weight": b.module.weight}
        if b.module.bias is not None:
            p["bias"] = b.module.bias
        return p

    def accel_params(self, b: Bound) -> dict[str, Tensor]:
        return {"weight": b.module.weight}

    def has_bias(self, b: Bound) -> bool:
        return b.module.bias is not None


# --------------------------------------------------------------------------- reading a node's arguments


def const_args(node: Any, start: int = 1) -> bool:
    from torch.fx import Node

    flat = list(node.args[start:]) + list(node.kwargs.values())

    def ok(a: Any) -> bool:
        if isinstance(a, Node):
            return False
        if isinstance(a, (list, tuple)):
            return all(ok(x) for x in a)
        return True

    return all(ok(a) for a in flat)


def call_args(node: Any, names: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Map a node's positional/keyword args (after the tensor) to names."""
    kw = dict(defaults)
    for n, v in zip(names, node.args[1:]):
        kw[n] = v
    kw.update({k: v for k, v in node.kwargs.items() if k in names})
    return kw
