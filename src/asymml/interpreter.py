"""The trusted interpreter: runs a placement plan over the traced graph, on :class:`torch.fx.Interpreter`.

``fx.Interpreter`` gives the per-node semantics (placeholders, attributes, modules, functions, methods,
argument fetching); this subclass changes only what the plan needs: units run in the plan's order (a
split region is one unit, handed to a callback), an activation fused with the max-pool that reads it runs
after the pool (monotone activations commute with max), ``x += y`` runs out of place (the runtime keeps
values other ops still read), and each trusted node is timed by the :class:`~asymml.profiling.Recorder`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch.fx as fx
from torch import Tensor

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
        tensors, and tensors a region saves are version-checked in backward)."""
        mod = self.submodules.get(target)
        if mod is None:  # a module registered under a second name
            mod = self.submodules[target] = self.fetch_attr(target)
        return mod(*args, **kwargs)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if target is operator.iadd:
            target = operator.add
        return target(*args, **kwargs)
