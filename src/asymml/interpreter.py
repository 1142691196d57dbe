"""The trusted interpreter: runs a placement plan over the traced graph, on :class:`torch.fx.Interpreter`.

``fx.Interpreter`` gives the per-node semantics (placeholders, attributes, modules, functions, methods,
argument fetching); this subclass changes only what the plan needs: units run in the plan's order (a
split region is one unit, handed to a callback), an activation fused with the max-pool that reads it runs
after the pool (monotone activations commute with max), ``x += y`` runs out of place (the runtime keeps
values other ops still read), a 2×2 max-pool without autograd writes no indices (:func:`max_pool_2x2`), and
each trusted node is timed by the :class:`~asymml.profiling.Recorder`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .profiling import Recorder
from .transform import Plan, Region


class TrustedInterpreter(fx.Interpreter):
    """Runs a :class:`~asymml.transform.Plan` of ``gm``: trusted nodes here, split regions through
    ``run_region(region, env) -> bool`` (``False``: the region is run here, node by node, as plain
    PyTorch ops)."""

    def __init__(self, gm: fx.GraphModule, recorder: Recorder) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.recorder = recorder
        self._fused: dict[fx.Node, fx.Node] = {}  # max-pool node -> activation node run after it
        self._deferred: set[fx.Node] = set()  # the activations run after their pool

    def run_plan(self, plan: Plan, x: Tensor, run_region: Callable[[Region, dict[fx.Node, Any]], bool]) -> Any:
        """The graph's output for input ``x``, units in ``plan`` order."""
        self._fused = plan.fused
        self._deferred = set(plan.fused.values())
        self.env = env = {}
        self.args_iter = iter((x,))
        out_node = None
        try:
            for unit, dead in zip(plan.units, plan.dead_after):
                if isinstance(unit, Region):
                    if not run_region(unit, env):
                        for n in unit.nodes:
                            env[n] = self.run_node(n)
                else:
                    env[unit] = self.run_node(unit)
                    if unit.op == "output":
                        out_node = unit
                for n in dead:  # last reader has run: the value's memory is freed now, not at the end
                    env.pop(n, None)
            return env[out_node] if out_node is not None else None
        finally:
            self.env = {}
            self.args_iter = iter(())

    def run_node(self, n: fx.Node) -> Any:
        """One node; non-linear ops and layers run trusted are timed as that layer's trusted forward."""
        if n.op in ("placeholder", "output", "get_attr"):
            return super().run_node(n)
        if n in self._deferred:
            return self.env[n.args[0]]  # executed after the max-pool that consumes it
        # fx.Interpreter.run_node, without its per-node tracing metadata (13 µs a node, for error context)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        with self.recorder.trusted_op(str(n.target) if n.op == "call_module" else n.name):
            out = getattr(self, n.op)(n.target, args, kwargs)
            act = self._fused.get(n)
            if act is not None:
                out = self.call_module(act.target, (out,), {})
        return out

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The module as the caller wrote it (in-place activations stay in place: region outputs are fresh
        tensors, and tensors a region saves are version-checked in backward); a 2×2 max-pool without
        autograd skips the indices it would write (:class:`IndexlessPools`)."""
        mod = self.submodules.get(target)
        if mod is None:  # a module registered under a second name
            mod = self.submodules[target] = self.fetch_attr(target)
        if isinstance(mod, nn.MaxPool2d) and not torch.is_grad_enabled():
            with IndexlessPools():  # (the module still runs, with its hooks: only the op is replaced)
                return mod(*args, **kwargs)
        return mod(*args, **kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if target is operator.iadd:
            target = operator.add
        return target(*args, **kwargs)


#: bytes of the row-pair maxima kept at a time by :func:`max_pool_2x2` (cache-sized)
_POOL_BLOCK_BYTES = 1 << 20


def max_pool_2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)`` of a channels-last batch without the int64 indices PyTorch's CPU kernel
    writes even when no gradient is needed (half the input's size again: 49 MiB beside VGG-16's first
    pool at batch 8, the trusted peak of its inference). Maxima of row pairs, then of column pairs, over
    blocks of rows (a cache-sized temporary), into a channels-last output; NaN propagates as in the pool."""
    B, C, H, W = x.shape
    ho, wo = H // 2, W // 2
    out = torch.empty((B, C, ho, wo), dtype=x.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    xv = x.permute(0, 2, 3, 1)[:, : 2 * ho, : 2 * wo]  # B × H × W × C, dense rows of W·C
    ov = out.permute(0, 2, 3, 1)                        # B × H/2 × W/2 × C
    rows = max(1, _POOL_BLOCK_BYTES // max(1, 2 * wo * C * x.element_size()))
    for b in range(B):
        for i in range(0, ho, rows):
            j = min(ho, i + rows)
            t = torch.maximum(xv[b, 2 * i : 2 * j : 2], xv[b, 2 * i + 1 : 2 * j : 2])  # rows × W × C
            torch.maximum(t[:, 0::2], t[:, 1::2], out=ov[b, i:j])
    return out


def _two(v: Any) -> bool:
    return v == 2 or v == (2, 2) or v == [2, 2]


class IndexlessPools(TorchFunctionMode):
    """Routes ``F.max_pool2d`` calls that :func:`max_pool_2x2` covers (2×2, stride 2, no padding or
    dilation, floor mode, no indices asked for, a channels-last CPU input that needs no gradient) to it, so
    that a model run as written (``trusted-only``, or ``asym`` when the planner keeps every layer trusted)
    gets the same pool as the trusted interpreter. Module hooks still run: only the op is replaced."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d and args:
            names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
            kw = {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
            kw.update(zip(names, args[1:]))
            kw.update(kwargs)
            x = args[0]
            stride = kw["stride"] if kw["stride"] not in (None, (), []) else kw.get("kernel_size")
            if (isinstance(x, Tensor) and x.dim() == 4 and x.is_floating_point() and x.device.type == "cpu"
                    and x.shape[2] >= 2 and x.shape[3] >= 2 and _two(kw.get("kernel_size")) and _two(stride)
                    and kw["padding"] in (0, (0, 0), [0, 0]) and kw["dilation"] in (1, (1, 1), [1, 1])
                    and not kw["ceil_mode"] and not kw["return_indices"]
                    and not (torch.is_grad_enabled() and x.requires_grad)
                    and x.is_contiguous(memory_format=torch.channels_last)):
                return max_pool_2x2(x)
        return func(*args, **kwargs)

