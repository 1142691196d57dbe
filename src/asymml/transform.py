"""torch.fx tracing, placement of every op (split or trusted), and grouping of linear ops into regions.

A *region* is a maximal connected set of linear ops (a chain or a DAG with additions) that runs split
without re-merging: its external inputs are decomposed once, the accelerator runs the whole chain on the
residuals, and the trusted context merges only at the region's outputs. Regions are grown greedily in
topological order, refusing any merge that would create a cycle through trusted ops.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .errors import UnsupportedOperationError, UntraceableModelError
from .executors.ops import Instr
from .rules import Bound, lookup


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``model``; the GraphModule shares (does not copy) the model's submodules."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, …)
        raise UntraceableModelError(
            f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}. "
            "asymml needs a statically traceable forward(): move data-dependent Python control flow "
            "(if/for on tensor values) out of forward(), wrap such helpers with torch.fx.wrap, or split "
            "the traceable part into its own nn.Module and pass that to asymml.split."
        ) from e


def node_path(node: fx.Node) -> str:
    """A human-readable location: the module path for modules, else the node name and op."""
    if node.op == "call_module":
        return str(node.target)
    tgt = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({node.op} {tgt})"


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


@dataclass(eq=False)
class Region:
    """A connected group of linear ops executed split."""

    id: int
    nodes: list[fx.Node]
    bound: dict[fx.Node, Bound]
    inputs: list[fx.Node] = field(default_factory=list)
    outputs: list[fx.Node] = field(default_factory=list)
    decompose: set[fx.Node] = field(default_factory=set)
    program: list[Instr] = field(default_factory=list)
    name: str = ""

    def arg_nodes(self, node: fx.Node) -> list[fx.Node]:
        """Tensor inputs of ``node`` in argument order."""
        return [a for a in node.args if isinstance(a, fx.Node)][: self.bound[node].n_inputs]

    def vname(self, v: fx.Node) -> str:
        return f"in{self.inputs.index(v)}" if v in self.inputs else v.name


@dataclass
class Placement:
    """Where one graph node runs, and why (for the validator's report)."""

    node: str
    where: str  # "split" | "trusted" | "trusted (unknown op)" | "io"
    region: int | None
    detail: str


@dataclass
class Plan:
    """Execution order of trusted nodes and regions for one module-mode signature."""

    units: list[Any]  # fx.Node (trusted) or Region
    regions: list[Region]
    placements: list[Placement]
    fused: dict[fx.Node, fx.Node]  # maxpool node -> activation node executed after it

    @functools.cached_property
    def dead_after(self) -> list[list[fx.Node]]:
        """For each unit, the values no later unit reads: the interpreter frees them right after it, so an
        activation the forward no longer needs is not kept alive in trusted memory until the forward ends."""
        unit_of: dict[fx.Node, int] = {}
        for i, unit in enumerate(self.units):
            for n in unit.nodes if isinstance(unit, Region) else (unit,):
                unit_of[n] = i
        last: dict[fx.Node, int] = {}
        for n, i in unit_of.items():
            for a in n.all_input_nodes:
                last[a] = max(last.get(a, -1), i)
        frees: list[list[fx.Node]] = [[] for _ in self.units]
        for n, i in last.items():
            if n.op != "output" and i > unit_of.get(n, -1):
                frees[i].append(n)
        return frees


FUSABLE_ACTS = (nn.ReLU, nn.ReLU6)


def build_plan(gm: fx.GraphModule, *, strict: bool = False) -> Plan:
    """Classify every node, grow regions, and order execution units topologically."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    bound: dict[fx.Node, Bound] = {}
    placements: list[Placement] = []
    for n in nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            placements.append(Placement(node_path(n), "io", None, n.op))
            continue
        mod = _module(gm, n)
        b, known = lookup(n, mod)
        if b is not None:
            bound[n] = b
        elif not known:
            what = type(mod).__name__ if mod is not None else getattr(n.target, "__name__", str(n.target))
            if strict:
                raise UnsupportedOperationError(
                    f"unsupported op {what} at {node_path(n)}: asymml has no split rule for it and does not "
                    "know it to be non-linear. In strict mode it is refused; without strict=True it would run "
                    "in the trusted context. Register a rule with asymml.rules.register_split_rule if it is linear."
                )
            placements.append(Placement(node_path(n), "trusted (unknown op)", None, what))

    # ---- grow regions (union-find), refusing merges that would create a cycle through trusted ops
    parent: dict[int, int] = {}

    def find(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    region_of: dict[fx.Node, int] = {}
    deps: dict[fx.Node, set[int]] = {}
    ext_deps: dict[int, set[int]] = {}
    next_id = 0
    for n in nodes:
        ins = list(n.all_input_nodes)
        d: set[int] = set()
        for i in ins:
            d |= {find(r) for r in deps.get(i, ())}
        if n in bound:
            cands = {find(region_of[i]) for i in ins if i in region_of}
            ext_in = [i for i in ins if not (i in region_of and find(region_of[i]) in cands)]
            ext_d: set[int] = set()
            for i in ext_in:
                ext_d |= {find(r) for r in deps.get(i, ())}
            ok = bool(cands) and not (cands & ext_d)
            if ok:
                for c in cands:
                    if {find(r) for r in ext_deps[c]} & (cands - {c}):
                        ok = False
            if ok:
                root = min(cands)
                merged_ext = set(ext_d)
                for c in cands:
                    merged_ext |= ext_deps[c]
                    parent[c] = root
                ext_deps[root] = merged_ext
                rid = root
            else:
                rid = next_id
                next_id += 1
                parent[rid] = rid
                ext_deps[rid] = set(d)
            region_of[n] = rid
            d = d | {rid}
        deps[n] = d

    groups: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if n in region_of:
            groups.setdefault(find(region_of[n]), []).append(n)

    regions: list[Region] = []
    node_region: dict[fx.Node, Region] = {}
    for k, members in enumerate(sorted(groups.values(), key=lambda ms: order[ms[0]])):
        reg = Region(k, members, {m: bound[m] for m in members})
        mset = set(members)
        for m in members:
            node_region[m] = reg
            for a in reg.arg_nodes(m):
                if a not in mset and a not in reg.inputs:
                    reg.inputs.append(a)
            if any(u not in mset for u in m.users):
                reg.outputs.append(m)
        for m in members:
            if bound[m].rule.decomposes_input:
                a = reg.arg_nodes(m)[0]
                if a in reg.inputs:
                    reg.decompose.add(a)
        heavy = [m for m in members if bound[m].rule.heavy]
        reg.name = str((heavy or members)[0].target) if (heavy or members)[0].op == "call_module" else (heavy or members)[0].name
        reg.program = [
            Instr(m.name, bound[m].rule.accel_op, tuple(reg.vname(a) for a in reg.arg_nodes(m)),
                  tuple(f"{m.name}.{p}" for p in bound[m].rule.accel_params(bound[m])),
                  bound[m].rule.accel_kw(bound[m]))
            for m in members
        ]
        regions.append(reg)

    for n in nodes:
        if n in node_region:
            r = node_region[n]
            placements.append(Placement(node_path(n), "split", r.id, type(bound[n].rule).__name__))
        elif n.op not in ("placeholder", "output", "get_attr") and not any(
            p.node == node_path(n) for p in placements
        ):
            placements.append(Placement(node_path(n), "trusted", None, "non-linear or not splittable here"))

    # ---- condensed topological order (regions as super-nodes), stable w.r.t. the original order
    unit_of: dict[fx.Node, Any] = {n: node_region.get(n, n) for n in nodes}
    units = list(dict.fromkeys(unit_of[n] for n in nodes))
    indeg = {id(u): 0 for u in units}
    succ: dict[int, set[int]] = {id(u): set() for u in units}
    for n in nodes:
        for i in n.all_input_nodes:
            a, b = unit_of[i], unit_of[n]
            if a is not b and id(b) not in succ[id(a)]:
                succ[id(a)].add(id(b))
                indeg[id(b)] += 1
    first = {id(u): (order[u.nodes[0]] if isinstance(u, Region) else order[u]) for u in units}
    heap = [(first[id(u)], id(u)) for u in units if indeg[id(u)] == 0]
    heapq.heapify(heap)
    by_id = {id(u): u for u in units}
    out_units: list[Any] = []
    while heap:
        _, k = heapq.heappop(heap)
        out_units.append(by_id[k])
        for s in succ[k]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(heap, (first[s], s))
    if len(out_units) != len(units):  # pragma: no cover - guarded by the cycle checks above
        raise RuntimeError("internal error: region graph has a cycle")

    # ---- fuse activation → max-pool (monotone activations commute with max): pool first, then activate
    fused: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in node_region or n.op != "call_module":
            continue
        mod = gm.get_submodule(n.target)
        if isinstance(mod, FUSABLE_ACTS) and len(n.users) == 1:
            (u,) = n.users
            if u.op == "call_module" and u not in node_region and isinstance(gm.get_submodule(u.target), nn.MaxPool2d):
                fused[u] = n
    return Plan(out_units, regions, placements, fused)
