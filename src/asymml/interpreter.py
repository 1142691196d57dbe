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
        self._frees: dict[int, tuple[Plan, list[list[fx.Node]]]] = {}  # id(plan) -> values dead after each unit

    def run_plan(self, plan: Plan, x: Tensor, run_region: Callable[[Region, dict[fx.Node, Any]], bool]) -> Any:
        """The graph's output for input ``x``, units in ``plan`` order."""
        self._fused = plan.fused
        self._deferred = set(plan.fused.values())
        self.env = env = {}
        self.args_iter = iter((x,))
        out_node = None
        frees = self._dead_after(plan)
        try:
            for unit, dead in zip(plan.units, frees):
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

    def _dead_after(self, plan: Plan) -> list[list[fx.Node]]:
        """For each unit of ``plan``, the values no later unit reads (freed right after it): an activation
        the forward no longer needs is not kept alive in trusted memory until the forward ends."""
        hit = self._frees.get(id(plan))
        if hit is not None and hit[0] is plan:
            return hit[1]
        unit_of: dict[fx.Node, int] = {}
        for i, unit in enumerate(plan.units):
            for n in unit.nodes if isinstance(unit, Region) else (unit,):
                unit_of[n] = i
        last: dict[fx.Node, int] = {}
        for n, i in unit_of.items():
            for a in n.all_input_nodes:
                last[a] = max(last.get(a, -1), i)
        frees: list[list[fx.Node]] = [[] for _ in plan.units]
        for n, i in last.items():
            if n.op != "output" and i > unit_of.get(n, -1):
                frees[i].append(n)
        self._frees[id(plan)] = (plan, frees)
        return frees

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
