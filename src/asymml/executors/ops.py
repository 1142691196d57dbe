"""The accelerator's instruction set: bias-free linear ops applied to residuals.

A *program* is a list of :class:`Instr`; values are named strings. Programs contain only public
information (op kinds, shapes, hyper-parameters, parameter names), so they can be shipped to a remote
accelerator server as plain data. Parameters travel separately, by value.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Instr:
    """``out = OPS[op](*args, *params, **kw)``; ``None`` args stand for an all-zero residual."""

    out: str
    op: str
    args: tuple[str, ...]
    params: tuple[str, ...] = ()
    kw: dict[str, Any] = field(default_factory=dict)


def _conv2d(x: Tensor, w: Tensor, **kw: Any) -> Tensor:
    return F.conv2d(x, w, None, **kw)


def _linear(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


def _scale(x: Tensor, s: Tensor) -> Tensor:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * s.view(shape)


def _bn_scale(x: Tensor, running_var: Tensor, *maybe_weight: Tensor, eps: float) -> Tensor:
    s = torch.rsqrt(running_var + eps)
    if maybe_weight:
        s = s * maybe_weight[0]
    return _scale(x, s)


def _add(*xs: Tensor | None) -> Tensor | None:
    present = [x for x in xs if x is not None]
    if not present:
        return None
    out = present[0]
    for x in present[1:]:
        out = operator.add(out, x)
    return out


OPS: dict[str, Callable[..., Tensor | None]] = {
    "conv2d": _conv2d,
    "linear": _linear,
    "scale": _scale,
    "bn_scale": _bn_scale,
    "avg_pool2d": lambda x, **kw: F.avg_pool2d(x, **kw),
    "adaptive_avg_pool2d": lambda x, **kw: F.adaptive_avg_pool2d(x, **kw),
    "flatten": lambda x, **kw: torch.flatten(x, **kw),
    "reshape": lambda x, shape: x.reshape(shape),
    "mean": lambda x, **kw: x.mean(**kw),
    "mul_const": lambda x, c: x * c,
    "add": _add,
    "sub": lambda a, b: a if b is None else (-b if a is None else a - b),
    "identity": lambda x: x,
}


def run_program(program: list[Instr], env: dict[str, Tensor | None], params: dict[str, Tensor]) -> None:
    """Execute ``program`` in place on ``env`` (name → tensor)."""
    for ins in program:
        args = [env.get(a) for a in ins.args]
        if ins.op == "add" or ins.op == "sub":
            env[ins.out] = OPS[ins.op](*args)
            continue
        if args and args[0] is None:
            env[ins.out] = None  # linear op of an all-zero residual
            continue
        env[ins.out] = OPS[ins.op](*args, *[params[p] for p in ins.params], **ins.kw)
