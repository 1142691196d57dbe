"""Split regions: one forward pass's split points, and one region's forward and backward (SPEC §4).

Forward of a region: decompose each external input that feeds a convolution (``X = UV + R``), release
``R`` (clipped + noised when configured) to the executor, let the accelerator run the region's linear
chain on the residuals while the trusted context runs it on the low-rank parts, then merge.

Backward, with ``δ`` the output gradient:

* ``paper``: ``δ`` is released in full; the accelerator computes ``Aᵀδ`` and ``R̃⋆δ``; the trusted side
  computes ``L⋆δ`` from ``V``.
* ``protected``: ``δ = δ_L + δ_R`` is decomposed like an activation and only ``δ_R`` is released;
  ``∇X = Aᵀδ_L`` (trusted, low rank) ``+ Aᵀδ_R`` (accelerator) and
  ``∇W = L⋆δ + R̃⋆δ_L`` (trusted) ``+ R̃⋆δ_R`` (accelerator).

:class:`ForwardPass` holds what one forward decides (the rank of every split point, each activation split
once) and :class:`RegionCall` runs one region with everything it uses passed in explicitly: the region,
the forward pass, the :class:`~asymml.release.ReleasePath`, the executor and the
:class:`~asymml.profiling.Recorder`.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from .executors.base import BackwardRequest, Executor
from .planner import ConvShape, Planner
from .profiling import Recorder
from .release import ReleasePath
from .rules import Conv2dRule, Low, dense, tadd
from .splitconfig import SplitConfig
from .transform import Region

_SELF = object()  # cache marker: the trusted part is the activation itself (nothing released)
_KEYS = itertools.count()  # shared by every split model: several may use one executor


def region_params(reg: Region) -> list[tuple[fx.Node, str, Tensor]]:
    """The parameters of ``reg``'s ops, in node order: ``(node, name, tensor)``."""
    out = []
    for n in reg.nodes:
        b = reg.bound[n]
        for k, p in b.rule.params(b).items():
            out.append((n, k, p))
    return out


def _rule_label(rule: Any, method: str) -> str:
    return ("conv." if isinstance(rule, Conv2dRule) else "rule.") + method


class ForwardPass:
    """One forward of a split model: the rank of each split point (rank policy, then the cost-aware
    planner) and the split of each activation, done once however many regions read it."""

    def __init__(self, cfg: SplitConfig, release: ReleasePath, planner: Planner, recorder: Recorder,
                 grad_on: bool) -> None:
        self.cfg = cfg
        self.release = release
        self.planner = planner
        self.recorder = recorder
        self.grad_on = grad_on
        # (id, version) -> (weak ref to the activation, its trusted part or _SELF, handle, rank): an
        # activation is split once however many regions read it, and the cache does not keep it alive
        self.cache: dict[tuple[int, int], tuple[weakref.ref, Any, Any, int]] = {}
        self.points = 0  # decomposition points seen (the rank policy's index)
        self.handles: list[Any] = []  # released this forward (discarded by the executor afterwards)
        self.planned: dict[tuple[int, int], int] = {}  # ranks decided before a region ran

    def split_input(self, x: Tensor, reg: Region, v: fx.Node) -> tuple[Any, Any, int]:
        """Split ``x`` (read by ``reg`` as ``v``) once per forward (cached by identity/version), release
        the residual; returns ``(trusted part, handle or None, rank)``."""
        with self.recorder.label("decomposed"):
            key = (id(x), x._version)
            hit = self.cache.get(key)
            if hit is not None and hit[0]() is x:
                return (x if hit[1] is _SELF else hit[1]), hit[2], hit[3]
            B, C, H, W = x.shape
            layer = reg.name if v.op != "placeholder" else "input"
            r = self.planned.pop(key, None)
            if r is None:
                r = self.plan_rank(x, reg, v)
            with self.recorder.decomposing(reg.name):
                if r >= min(C, H * W):
                    tp, h = x, None
                    ratio = torch.zeros(B)
                else:
                    tp, h, ratio = self.release.activation(x, r, layer=layer, inplace=self.overwritable(x, v))
                    self.handles.append(h)
            self.recorder.split_point(reg.name, layer, r, ratio)
            self.cache[key] = (weakref.ref(x), _SELF if tp is x else tp, h, r)
            return tp, h, r

    def plan_rank(self, x: Tensor, reg: Region, v: fx.Node) -> int:
        """The rank at which activation ``x`` (read by region ``reg`` as ``v``) is split: the rank policy's,
        clamped to ``min(C, HW)``, or full (nothing released) where the planner says splitting would not
        save trusted time. Advances the policy's decomposition-point counter."""
        cfg = self.cfg
        B, C, H, W = x.shape
        N = H * W
        is_input = v.op == "placeholder"
        if cfg.mode == "noise-only":
            r = 0
        elif is_input and cfg.input_rank is not None:
            r = cfg.input_rank
        else:
            r = cfg.rank.rank_for(self.points, x.reshape(B, C, N), shared=cfg.basis == "batch")
        if not is_input:
            self.points += 1
        r = min(r, C, N)
        if 0 < r < min(C, N) and cfg.mode == "asym" and not self.split_pays(reg, v, x, r):
            r = min(C, N)  # splitting would cost more trusted time than it saves: run it trusted
            self.recorder.layer(reg.name, "split").kind = "trusted (planner)"
        return r

    def runs_natively(self, reg: Region, env: dict[fx.Node, Any]) -> bool:
        """True when no input of ``reg`` will be split (full rank or kept trusted by the planner): the
        region then runs as plain PyTorch ops with native autograd — no custom autograd function, no
        low-rank bookkeeping — so a layer kept trusted costs what it costs in ``trusted-only`` mode."""
        if self.cfg.mode != "asym":
            return False
        todo = []
        for v in reg.inputs:
            x = env[v]
            if v not in reg.decompose or not isinstance(x, Tensor) or x.dim() != 4:
                continue
            key = (id(x), x._version)
            hit = self.cache.get(key)
            if hit is not None and hit[0]() is x:
                if hit[2] is not None:
                    return False  # already released for another region
                continue
            r = self.planned.get(key)
            if r is None:
                r = self.planned[key] = self.plan_rank(x, reg, v)
            B, C, H, W = x.shape
            if r < min(C, H * W):
                return False
            todo.append((key, x, v, r))
        for key, x, v, r in todo:
            del self.planned[key]
            self.cache[key] = (weakref.ref(x), _SELF, None, r)
            layer = reg.name if v.op != "placeholder" else "input"
            self.recorder.split_point(None, layer, r, torch.zeros(x.shape[0]))
        self.recorder.kept_trusted(reg.name)
        return True

    def split_pays(self, reg: Region, v: fx.Node, x: Tensor, r: int) -> bool:
        """Ask the cost-aware planner whether splitting the convolutions that read ``x`` saves time."""
        B, C, H, W = x.shape
        convs = [reg.bound[n] for n in reg.nodes
                 if v in reg.arg_nodes(n) and reg.bound[n].rule.decomposes_input
                 and isinstance(reg.bound[n].module, nn.Conv2d)]
        if not convs:
            return True
        shapes = []
        for b in convs:
            m = b.module
            ho, wo = b.rule.out_shape(b, [tuple(x.shape)])[2:]
            shapes.append(ConvShape(B, C, m.out_channels, m.groups, m.kernel_size[0] * m.kernel_size[1],
                                    H * W, ho * wo))

        training = self.grad_on

        def dense_timer() -> float:
            """Seconds of this layer's dense forward on the real input — in training forward and backward
            (the input's gradient unless it is the model's input, and the weight's) — best of 2: the pilot's
            yardstick."""
            best = float("inf")
            xi = x.detach().requires_grad_(training and v.op != "placeholder")
            for _ in range(2):
                t0 = time.perf_counter()
                for b in convs:
                    m = b.module
                    if not training:
                        with torch.no_grad():
                            m._conv_forward(xi, m.weight, m.bias)
                        continue
                    w = m.weight.detach().requires_grad_(True)
                    with torch.enable_grad():
                        y = m._conv_forward(xi, w, None)
                        torch.autograd.grad(y, [xi, w] if xi.requires_grad else [w], torch.ones_like(y))
                best = min(best, time.perf_counter() - t0)
            return best

        return all(self.planner.split_pays(f"{reg.name}:{v.name}", s, r, training=training,
                                           shared=self.cfg.basis == "batch", dense_timer=dense_timer)
                   for s in shapes)

    @staticmethod
    def overwritable(x: Tensor, v: fx.Node) -> bool:
        """May the residual be written over ``x``? Only for a value the runtime made itself (never the
        caller's input), that autograd does not need, that no other op reads, and that shares its
        storage with nothing else."""
        return (v.op != "placeholder" and len(v.users) == 1 and not x.requires_grad
                and not x._is_view() and x.is_contiguous(memory_format=torch.channels_last)
                and x.untyped_storage().nbytes() == x.numel() * x.element_size())


class RegionCall:
    """One execution of one region: forward state kept for its backward."""

    def __init__(self, region: Region, *, release: ReleasePath, executor: Executor, recorder: Recorder,
                 planner: Planner, keep_graph: bool,
                 grad_sink: Callable[[nn.Parameter, Tensor], None] | None = None) -> None:
        self.reg = region
        self.release = release
        self.executor = executor
        self.recorder = recorder
        self.planner = planner
        self.keep_graph = keep_graph
        self.grad_sink = grad_sink
        self.key = next(_KEYS)
        self.accel_live = False
        self.saved_t: dict[fx.Node, Any] = {}
        self.saved_versions: dict[fx.Node, int] = {}
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}
        self.has_r: dict[fx.Node, bool] = {}
        self.grad_params: tuple[str, ...] = ()
        self.rank = 0

    def __del__(self) -> None:
        if getattr(self, "accel_live", False):
            try:
                self.executor.free(self.key)
            except Exception:  # interpreter shutdown
                pass

    # ------------------------------------------------------------------ forward
    def forward(self, fp: ForwardPass, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Split the inputs (through ``fp``), run the accelerator's share and the trusted share, merge."""
        reg, ex, rec = self.reg, self.executor, self.recorder
        noise0 = self.release.noise_critical_s()
        with rec.region(reg.name, "forward") as span:
            tparts: dict[fx.Node, Any] = {}
            handles: dict[fx.Node, Any] = {}
            ranks = []
            for v, x in zip(reg.inputs, inputs):
                self.shapes[v] = tuple(x.shape)
                if v in reg.decompose and x.dim() == 4:
                    tp, h, r = fp.split_input(x, reg, v)
                    ranks.append(r)
                else:
                    tp, h = x, None
                tparts[v] = tp
                handles[v] = h
                self.has_r[v] = h is not None
            self.rank = max(ranks) if ranks else 0
            for n in reg.nodes:
                args = reg.arg_nodes(n)
                b = reg.bound[n]
                self.has_r[n] = any(self.has_r[a] for a in args)
                self.shapes[n] = b.rule.out_shape(b, [self.shapes[a] for a in args])
            accel_in = {reg.vname(v): h for v, h in handles.items() if h is not None}
            fut = None
            want = [o for o in reg.outputs if self.has_r[o]]
            if accel_in:
                params = {}
                for n in reg.nodes:
                    if self.has_r[n]:
                        b = reg.bound[n]
                        params.update({f"{n.name}.{k}": t for k, t in b.rule.accel_params(b).items()})
                self.grad_params = tuple(
                    f"{n.name}.weight" for n in reg.nodes if reg.bound[n].rule.heavy and self.has_r[n]
                )
                fut = ex.forward(self.key, reg.program, accel_in, params, [o.name for o in want],
                                 layer=reg.name, keep_graph=self.keep_graph, grad_params=self.grad_params)
                self.accel_live = self.keep_graph
            outs = self._forward_into_reply(fut, span, inputs, tparts) if fut is not None else None
            if outs is None:
                # trusted share, concurrently with the accelerator
                for n in reg.nodes:
                    args = reg.arg_nodes(n)
                    b = reg.bound[n]
                    with rec.label(_rule_label(b.rule, "trusted_forward")):
                        tparts[n] = b.rule.trusted_forward(b, [tparts[a] for a in args],
                                                           [self.shapes[a] for a in args])
                    if self.keep_graph and b.rule.params(b):
                        self.saved_t[n] = tparts[args[0]]
                        tp = tparts[args[0]]
                        if isinstance(tp, Tensor):
                            self.saved_versions[n] = tp._version
                res = self._wait(span, fut) if fut is not None else {}
                outs = self._merge(inputs, tparts, res)
        if accel_in and self.planner.watching(reg.name):
            self._observe(span, noise0, "forward")
        return outs

    def _observe(self, span: Any, noise0: float, phase: str) -> None:
        """Report this ``phase`` of the region to the planner's trial. The pilot's steps are the first
        ones: noise was drawn on the critical path because the prefetch had not yet learned the order of
        the releases; from then on it is drawn ahead while the trusted side waits, so the trial counts the
        split's own cost (noise added, not drawn): the critical-path noise since ``noise0`` is deducted."""
        self.planner.observe(self.reg.name, span.elapsed - (self.release.noise_critical_s() - noise0), phase)

    def _wait(self, span: Any, fut: Any) -> Any:
        """The accelerator's result; the wait is blocked time, during which the noise mechanism may
        generate ahead."""
        with self.release.accelerator_wait():
            return span.wait(fut)

    def _forward_into_reply(self, fut: Any, span: Any, inputs: tuple[Tensor, ...], tparts: dict[fx.Node, Any]
                            ) -> tuple[Tensor, ...] | None:
        """Where the accelerator runs on the trusted side's own cores (a CPU :class:`LocalExecutor`),
        running both shares concurrently gains nothing: for a one-convolution region without a kept graph,
        wait for the accelerator's ``conv(R)`` and add ``conv(L)`` straight into it (one GEMM with
        ``beta = 1``: no trusted output tensor, no merge pass). None where this does not apply; a reply
        already waited for is then merged as usual."""
        reg = self.reg
        if (self.keep_graph or not getattr(self.executor, "shares_trusted_cores", False) or len(reg.nodes) != 1
                or reg.outputs != reg.nodes or not self.has_r[reg.nodes[0]]):
            return None
        n = reg.nodes[0]
        b, args = reg.bound[n], reg.arg_nodes(n)
        res = self._wait(span, fut)
        y = res.get(n.name)
        in_ptrs = {x.untyped_storage().data_ptr() for x in inputs}
        owned = (isinstance(y, Tensor) and not y._is_view() and y.untyped_storage().data_ptr() not in in_ptrs
                 and y.untyped_storage().nbytes() == y.numel() * y.element_size())
        with self.recorder.label(_rule_label(b.rule, "trusted_forward")):
            if owned and b.rule.trusted_forward_into(b, [tparts[a] for a in args], [self.shapes[a] for a in args], y):
                return (y,)
            tparts[n] = b.rule.trusted_forward(b, [tparts[a] for a in args], [self.shapes[a] for a in args])
        return self._merge(inputs, tparts, res)

    def _merge(self, inputs: tuple[Tensor, ...], tparts: dict[fx.Node, Any], res: dict[str, Tensor]
               ) -> tuple[Tensor, ...]:
        """Each output = trusted part + accelerator part, in place where the trusted part is fresh."""
        reg = self.reg
        outs = []
        in_ptrs = {x.untyped_storage().data_ptr() for x in inputs}
        refs = Counter(v.untyped_storage().data_ptr() for v in tparts.values() if isinstance(v, Tensor))
        refs.update(v.untyped_storage().data_ptr() for v in self.saved_t.values() if isinstance(v, Tensor))

        def fresh(z: Tensor) -> bool:
            """Owned by this output alone: not a view, not an input, not shared with another value."""
            ptr = z.untyped_storage().data_ptr()
            return not z._is_view() and ptr not in in_ptrs and refs[ptr] <= 1

        for o in reg.outputs:
            t = dense(tparts[o])
            r = res.get(o.name)
            if t is None and r is None:
                out = torch.zeros(self.shapes[o], dtype=inputs[0].dtype)
            elif t is None:
                out = r.clone()  # r may share storage with the accelerator's kept graph
            elif r is None:
                out = t if fresh(t) and isinstance(tparts[o], Tensor) else t.clone()
            elif fresh(t) and isinstance(tparts[o], Tensor):
                out = t.add_(r)  # the trusted part is a fresh tensor: merge in place, no new allocation
            else:
                out = t + r
            outs.append(out)
        return tuple(outs)

    # ------------------------------------------------------------------ backward
    def backward(self, grads: tuple[Tensor | None, ...]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Input and parameter gradients of the region from its output gradients (see the module doc)."""
        reg, ex, rec, release = self.reg, self.executor, self.recorder, self.release
        piloted = self.accel_live and self.planner.watching(reg.name)
        noise0 = release.noise_critical_s()
        with rec.region(reg.name, "backward") as span:
            dT: dict[fx.Node, Any] = {}
            grad_handles: dict[str, Any] = {}
            # the whole output gradient where the accelerator's share of it is released exactly (no noise):
            # a weight gradient then reads it as it is, instead of rebuilding it as δ_L + δ_R (a full-size
            # expansion and an addition that also round)
            exact = release.cfg.backward == "paper" or not release.noises_gradients
            whole: dict[fx.Node, Tensor] = {}
            for o, g in zip(reg.outputs, grads):
                if g is None:
                    continue
                if exact:
                    whole[o] = g
                if not self.has_r[o] or not self.accel_live:
                    dT[o] = tadd(dT.get(o), g)
                    continue
                if release.cfg.backward == "protected":
                    with rec.label("decomposed"):
                        low, h = release.gradient(g, layer=f"{reg.name}:grad", fwd_rank=self.rank)
                    if h is None:
                        dT[o] = tadd(dT.get(o), g)
                    else:
                        grad_handles[o.name] = h
                        dT[o] = tadd(dT.get(o), low)
                else:
                    grad_handles[o.name] = release.whole(g, layer=f"{reg.name}:{o.name}", kind="grad")
            fut = None
            if self.accel_live:
                param_nodes = [n for n in reg.nodes if reg.bound[n].rule.params(reg.bound[n])]
                req = BackwardRequest(
                    grad_outputs=grad_handles,
                    input_grads=[reg.vname(v) for v in reg.inputs if self.has_r[v]],
                    param_grads=list(self.grad_params),
                    value_grads=[n.name for n in reg.nodes if self.has_r[n]],
                    values=[reg.vname(reg.arg_nodes(n)[0]) for n in param_nodes if self.has_r[reg.arg_nodes(n)[0]]],
                )
                fut = ex.backward(self.key, req)
                self.accel_live = False
            # pass 1: trusted gradient parts, concurrently with the accelerator
            owned: set[int] = set()  # ids of gradient tensors made here and held by one dT entry only
            for n in reversed(reg.nodes):
                d = dT.get(n)
                if d is None:
                    continue
                b = reg.bound[n]
                args = reg.arg_nodes(n)
                with rec.label(_rule_label(b.rule, "input_grad")):
                    gis = b.rule.input_grad(b, d, [self.shapes[a] for a in args])
                for a, gi in zip(args, gis):
                    prev = dT.get(a)
                    dT[a] = tadd(prev, gi)
                    fresh = (prev is not None and gi is not None) or (b.rule.fresh_grads and len(args) == 1)
                    if fresh and isinstance(dT[a], Tensor):
                        owned.add(id(dT[a]))
                    else:
                        owned.discard(id(dT[a]))
            res = self._wait(span, fut) if fut is not None else {"input_grads": {}, "param_grads": {}, "value_grads": {},
                                                          "values": {}}
            in_grads, pgrads = self._gradients(dT, res, owned, whole)
        if piloted:
            self._observe(span, noise0, "backward")
        self.saved_t.clear()
        return in_grads, pgrads

    def _gradients(self, dT: dict[fx.Node, Any], res: dict[str, Any], owned: set[int],
                   whole: dict[fx.Node, Tensor]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """Combine the trusted gradient parts with the accelerator's results into input and parameter
        gradients (the accelerator's parameter share goes to the grad sink when one is set). ``owned``:
        ids of trusted gradient tensors made by this backward alone, which the accelerator's share is
        added into in place (no full-size result of its own); ``whole``: output gradients whose residual
        the accelerator got exactly."""
        reg, rec = self.reg, self.recorder
        inner = {a for m in reg.nodes for a in reg.arg_nodes(m)}  # values read inside the region
        dA = res["value_grads"]
        # pass 2: accelerator gradient flowing into values the accelerator never held (e.g. a skip
        # connection that was not decomposed) is taken over by the trusted side
        extra: dict[fx.Node, Any] = {}
        for n in reversed(reg.nodes):
            args = reg.arg_nodes(n)
            if all(self.has_r[a] for a in args):
                continue
            e = tadd(extra.get(n), dA.get(n.name) if self.has_r[n] else None)
            if e is None:
                continue
            b = reg.bound[n]
            with rec.label(_rule_label(b.rule, "input_grad")):
                gis = b.rule.input_grad(b, e, [self.shapes[a] for a in args])
            for a, gi in zip(args, gis):
                if not self.has_r[a]:
                    extra[a] = tadd(extra.get(a), gi)
        for n, ver in self.saved_versions.items():
            if self.saved_t[n]._version != ver:
                raise RuntimeError(
                    f"the input of {reg.name} ({n.name}) was modified in place after the split forward; "
                    "its parameter gradients would be wrong. Make that op out-of-place (asymml.fix(model) "
                    "does this for in-place activations)."
                )
        # parameter gradients
        rparams = region_params(reg)
        pgrads: list[Tensor | None] = [None] * len(rparams)
        sink = self.grad_sink
        pidx = 0
        for n in reg.nodes:
            b = reg.bound[n]
            names = list(b.rule.params(b))
            if not names:
                continue
            a = reg.arg_nodes(n)[0]
            d_t = tadd(dT.get(n), extra.get(n))
            if n in whole and n not in inner:
                full = whole[n]  # an output read by nothing else in the region: its whole gradient
            else:
                full = tadd(d_t, dA.get(n.name) if self.has_r[n] else None)
            if full is not None:
                r_in = res["values"].get(reg.vname(a)) if self.has_r[a] else None
                with rec.label(_rule_label(b.rule, "param_grads")):
                    pg = b.rule.param_grads(b, self.saved_t.get(n), r_in, dense(full), d_t, self.shapes[a])
                for k in names:
                    g = pg.get(k)
                    acc = res["param_grads"].get(f"{n.name}.{k}")
                    if acc is not None:
                        if sink is not None:  # DP on updates: the public share is kept apart
                            sink(rparams[pidx + names.index(k)][2], acc)
                        elif g is None:
                            g = acc
                        elif b.rule.fresh_grads and g.shape == acc.shape and g.dtype == acc.dtype:
                            g = g.add_(acc)  # the rule's fresh gradient: no weight-sized sum of its own
                        else:
                            g = g + acc
                    pgrads[pidx + names.index(k)] = g
            pidx += len(names)
        in_grads: list[Tensor | None] = []
        for v in reg.inputs:
            t = tadd(dT.get(v), extra.get(v))
            g = dense(t)
            # made by this backward and referenced nowhere else: a Low's expansion, a sum, or an owned tensor
            mine = g is not None and (isinstance(t, Low) or (dT.get(v) is not None and extra.get(v) is not None)
                                      or (id(t) in owned and extra.get(v) is None and not g._is_view()))
            acc = res["input_grads"].get(reg.vname(v)) if self.has_r[v] else None
            if acc is not None:
                if g is None:
                    g = acc
                elif mine and g.shape == acc.shape and g.dtype == acc.dtype:
                    g = g.add_(acc)  # a trusted tensor made by this backward alone: no full-size sum of its own
                else:
                    g = g + acc
            in_grads.append(g)
        return in_grads, pgrads


class RegionFunction(torch.autograd.Function):
    """Autograd node of one split region: forward and backward run by its :class:`RegionCall`."""

    @staticmethod
    def forward(ctx, call: RegionCall, fp: ForwardPass, n_inputs: int, *tensors: Tensor):  # type: ignore[override]
        ctx.call = call
        return call.forward(fp, tensors[:n_inputs])

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        call = ctx.call
        in_grads, pgrads = call.backward(grads)
        ctx.call = None
        return (None, None, None, *in_grads, *pgrads)
