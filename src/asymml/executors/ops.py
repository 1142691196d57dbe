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

from ..errors import ProtocolError


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


# ---------------------------------------------------------------------------------------------- validation
#: keyword arguments each op accepts (anything else is refused: programs are untrusted data on the server)
OP_KW: dict[str, frozenset[str]] = {
    "conv2d": frozenset({"stride", "padding", "dilation", "groups"}),
    "linear": frozenset(),
    "scale": frozenset(),
    "bn_scale": frozenset({"eps"}),
    "avg_pool2d": frozenset({"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"}),
    "adaptive_avg_pool2d": frozenset({"output_size"}),
    "flatten": frozenset({"start_dim", "end_dim"}),
    "reshape": frozenset({"shape"}),
    "mean": frozenset({"dim", "keepdim"}),
    "mul_const": frozenset({"c"}),
    "add": frozenset(),
    "sub": frozenset(),
    "identity": frozenset(),
}
#: how many parameters each op takes (min, max)
OP_PARAMS: dict[str, tuple[int, int]] = {"conv2d": (1, 1), "linear": (1, 1), "scale": (1, 1), "bn_scale": (1, 2)}
#: how many value arguments each op takes (min, max)
OP_ARGS: dict[str, tuple[int, int]] = {"add": (1, 8), "sub": (2, 2)}
MAX_INT_KW = 1 << 16        # strides, paddings, kernel sizes, output sizes, dims
MAX_PROGRAM_LEN = 4096


class ProgramError(ProtocolError):
    """A program that is not well formed for the accelerator's instruction set (see :func:`check_program`)."""


def _kw_ok(v: Any, depth: int = 0) -> bool:
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -MAX_INT_KW <= v <= MAX_INT_KW
    if isinstance(v, float):
        return v == v and abs(v) < 1e30
    if isinstance(v, (list, tuple)) and depth == 0:
        return len(v) <= 8 and all(_kw_ok(x, 1) for x in v)
    return False


def check_program(program: list[Instr]) -> None:
    """Structural checks of an (untrusted) program: known ops, argument/parameter counts, and keyword
    arguments limited to each op's own names with small plain values (no tensors, no nesting)."""
    if len(program) > MAX_PROGRAM_LEN:
        raise ProgramError(f"program of {len(program)} instructions exceeds the limit of {MAX_PROGRAM_LEN}")
    for ins in program:
        if ins.op not in OPS:
            raise ProgramError(f"unknown accelerator op {ins.op!r} (allowed: {', '.join(sorted(OPS))})")
        lo, hi = OP_PARAMS.get(ins.op, (0, 0))
        if not lo <= len(ins.params) <= hi:
            raise ProgramError(f"{ins.out}: {ins.op} takes {lo}..{hi} parameters, got {len(ins.params)}")
        lo, hi = OP_ARGS.get(ins.op, (1, 1))
        if not lo <= len(ins.args) <= hi:
            raise ProgramError(f"{ins.out}: {ins.op} takes {lo}..{hi} arguments, got {len(ins.args)}")
        extra = set(ins.kw) - OP_KW[ins.op]
        if extra:
            raise ProgramError(f"{ins.out}: {ins.op} does not take {sorted(extra)}")
        for k, v in ins.kw.items():
            if not _kw_ok(v):
                raise ProgramError(f"{ins.out}: {ins.op} argument {k}={v!r} is not a small number or list of numbers")


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if v else (0, 0)
    return (int(v), int(v))


def _check_geometry(ins: Instr, x: Tensor, params: list[Tensor]) -> None:
    """Bounds that keep an op's output proportional to what the client legitimately sent."""
    kw = ins.kw
    if ins.op == "conv2d":
        w = params[0]
        if w.dim() != 4 or x.dim() != 4:
            raise ProgramError(f"{ins.out}: conv2d needs a 4-D input and weight")
        k = (w.shape[2], w.shape[3])
        pad, dil, stride = _pair(kw.get("padding", 0)), _pair(kw.get("dilation", 1)), _pair(kw.get("stride", 1))
        for i in range(2):
            if stride[i] < 1 or dil[i] < 1 or not 0 <= pad[i] <= dil[i] * (k[i] - 1):
                raise ProgramError(f"{ins.out}: conv2d padding {kw.get('padding')} exceeds dilation×(kernel−1) "
                                   f"or stride/dilation < 1")
    elif ins.op == "avg_pool2d":
        if x.dim() != 4:
            raise ProgramError(f"{ins.out}: avg_pool2d needs a 4-D input")
        ks = _pair(kw.get("kernel_size", 1))
        if any(k < 1 or k > MAX_INT_KW for k in ks):
            raise ProgramError(f"{ins.out}: bad kernel size {kw.get('kernel_size')}")
    elif ins.op == "adaptive_avg_pool2d":
        osz = kw.get("output_size")
        sizes = osz if isinstance(osz, (list, tuple)) else [osz]
        limit = max(64, *x.shape[-2:]) if x.dim() >= 2 else 64
        if any(s is not None and not 1 <= s <= limit for s in sizes):
            raise ProgramError(f"{ins.out}: adaptive_avg_pool2d output size {osz} exceeds max(64, input size)")


def infer_shapes(
    program: list[Instr],
    inputs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    params: dict[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    max_numel: int | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.dtype] | None]:
    """Run ``program`` on shape-only (meta) tensors: every value's (shape, dtype), ``None`` for all-zero ones.

    Checks op geometry (e.g. conv padding ≤ dilation·(k−1)) and, with ``max_numel``, that no value is larger
    than that many elements. Raises :class:`ProgramError` when the program does not apply to these shapes."""
    check_program(program)
    env: dict[str, Tensor | None] = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in inputs.items()}
    ps = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in params.items()}
    for ins in program:
        args = [env.get(a) for a in ins.args]
        if ins.op not in ("add", "sub") and args and args[0] is None:
            env[ins.out] = None  # an op on an all-zero residual (its input was not released): not run,
            continue  # so its parameters are not sent either
        missing = [p for p in ins.params if p not in ps]
        if missing:
            raise ProgramError(f"{ins.out}: unknown parameter(s) {missing}")
        if args and args[0] is not None:
            _check_geometry(ins, args[0], [ps[p] for p in ins.params])
        try:
            run_program([ins], env, ps)
        except (RuntimeError, TypeError, ValueError, IndexError) as e:
            raise ProgramError(f"{ins.out}: {ins.op} does not apply to its inputs: {e}") from None
        out = env.get(ins.out)
        if out is not None and max_numel is not None and out.numel() > max_numel:
            raise ProgramError(f"{ins.out}: {ins.op} would produce {out.numel()} elements (limit {max_numel})")
    return {n: (None if t is None else (tuple(t.shape), t.dtype)) for n, t in env.items()}
