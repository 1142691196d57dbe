"""The trusted runtime: interprets the planned graph, runs regions split with custom autograd.

Forward of a region: decompose each external input that feeds a convolution (``X = UV + R``), release
``R`` (clipped + noised when configured) to the executor, let the accelerator run the region's linear
chain on the residuals while the trusted context runs it on the low-rank parts, then merge.

Backward (SPEC §4), with ``δ`` the output gradient:

* ``paper``: ``δ`` is released in full; the accelerator computes ``Aᵀδ`` and ``R̃⋆δ``; the trusted side
  computes ``L⋆δ`` from ``V``.
* ``protected``: ``δ = δ_L + δ_R`` is decomposed like an activation and only ``δ_R`` is released;
  ``∇X = Aᵀδ_L`` (trusted, low rank) ``+ Aᵀδ_R`` (accelerator) and
  ``∇W = L⋆δ + R̃⋆δ_L`` (trusted) ``+ R̃⋆δ_R`` (accelerator).
"""

from __future__ import annotations

import itertools
import operator
import secrets
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from .decomposition import AdaptiveRank, RankPolicy, decompose
from .errors import CheckpointError, InputError
from .executors.base import BackwardRequest, Executor
from .planner import ConvShape, Planner
from .profiling import EPC_DEFAULT_BYTES, LayerProfile, Profile, TrustedMemoryMeter
from .rules import Low, dense, tadd
from .transform import Plan, Region, build_plan, trace

MODES = ("asym", "plain", "trusted-only", "noise-only")
_KEYS = itertools.count()
BACKWARDS = ("protected", "paper")


@dataclass
class SplitConfig:
    """Everything that decides how a model is split (validated by :func:`asymml.split`)."""

    rank: RankPolicy
    decomposition: str = "power"
    iters: int = 2
    basis: str = "sample"
    backward: str = "protected"
    mode: str = "asym"
    input_rank: int | None = 1
    grad_rank: RankPolicy | None = None
    warm_start: bool = True
    strict: bool = False
    noise_grads: bool = True
    epc_bytes: int = EPC_DEFAULT_BYTES
    seed: int = 0
    noise_seed: int | None = None
    placement: str = "auto"


class _ForwardCtx:
    """Per-forward state: the decomposition cache (one split per activation) and released handles."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, int], tuple[Tensor, Any, Any, int]] = {}
        self.points = 0
        self.handles: list[Any] = []
        self.grad_on = False
        self.planned: dict[tuple[int, int], int] = {}  # ranks decided before a region ran


class _RegionCall:
    """One execution of one region: forward state kept for its backward."""

    def __init__(self, sm: SplitModule, region: Region, keep_graph: bool) -> None:
        self.sm = sm
        self.reg = region
        self.keep_graph = keep_graph
        self.key = next(sm._keys)
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
                self.sm.executor.free(self.key)
            except Exception:  # interpreter shutdown
                pass

    # ------------------------------------------------------------------ forward
    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        sm, reg, ex = self.sm, self.reg, self.sm.executor
        prof = sm._layer(reg.name, "split")
        t_start = time.perf_counter()
        blocked = 0.0
        with sm._counting(prof, "trusted_flops"):
            tparts: dict[fx.Node, Any] = {}
            handles: dict[fx.Node, Any] = {}
            ranks = []
            for v, x in zip(reg.inputs, inputs):
                self.shapes[v] = tuple(x.shape)
                if v in reg.decompose and x.dim() == 4:
                    tp, h, r = sm._decomposed(x, reg, v)
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
            # trusted share, concurrently with the accelerator
            for n in reg.nodes:
                args = reg.arg_nodes(n)
                b = reg.bound[n]
                tparts[n] = b.rule.trusted_forward(b, [tparts[a] for a in args], [self.shapes[a] for a in args])
                if self.keep_graph and b.rule.params(b):
                    self.saved_t[n] = tparts[args[0]]
                    tp = tparts[args[0]]
                    if isinstance(tp, Tensor):
                        self.saved_versions[n] = tp._version
            t0 = time.perf_counter()
            res = fut.result() if fut is not None else {}
            blocked += time.perf_counter() - t0
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
        elapsed = time.perf_counter() - t_start - blocked
        prof.trusted_s["forward"] = prof.trusted_s.get("forward", 0.0) + elapsed
        sm._blocked += blocked
        if accel_in and sm.planner.watching(reg.name):
            sm.planner.observe(reg.name, elapsed)
        return tuple(outs)

    # ------------------------------------------------------------------ backward
    def backward(self, grads: tuple[Tensor | None, ...]) -> tuple[list[Tensor | None], list[Tensor | None]]:
        sm, reg, ex, cfg = self.sm, self.reg, self.sm.executor, self.sm.cfg
        prof = sm._layer(reg.name, "split")
        t_start = time.perf_counter()
        blocked = 0.0
        meter = sm._meter if sm._profiling else None
        with sm._counting(prof, "trusted_flops"), (meter if meter is not None else nullcontext()):
            dT: dict[fx.Node, Any] = {}
            grad_handles: dict[str, Any] = {}
            for o, g in zip(reg.outputs, grads):
                if g is None:
                    continue
                if not self.has_r[o] or not self.accel_live:
                    dT[o] = tadd(dT.get(o), g)
                    continue
                if cfg.backward == "protected":
                    low, h = sm._decompose_grad(g, reg, o, self.rank)
                    if h is None:
                        dT[o] = tadd(dT.get(o), g)
                    else:
                        grad_handles[o.name] = h
                        dT[o] = tadd(dT.get(o), low)
                else:
                    grad_handles[o.name] = ex.release(g, layer=f"{reg.name}:{o.name}", kind="grad")
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
            for n in reversed(reg.nodes):
                d = dT.get(n)
                if d is None:
                    continue
                b = reg.bound[n]
                args = reg.arg_nodes(n)
                for a, gi in zip(args, b.rule.input_grad(b, d, [self.shapes[a] for a in args])):
                    dT[a] = tadd(dT.get(a), gi)
            t0 = time.perf_counter()
            res = fut.result() if fut is not None else {"input_grads": {}, "param_grads": {}, "value_grads": {}, "values": {}}
            blocked += time.perf_counter() - t0
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
                for a, gi in zip(args, b.rule.input_grad(b, e, [self.shapes[a] for a in args])):
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
            rparams = sm._region_params(reg)
            pgrads: list[Tensor | None] = [None] * len(rparams)
            sink = sm.public_grad_sink
            pidx = 0
            for n in reg.nodes:
                b = reg.bound[n]
                names = list(b.rule.params(b))
                if not names:
                    continue
                a = reg.arg_nodes(n)[0]
                d_t = tadd(dT.get(n), extra.get(n))
                full = tadd(d_t, dA.get(n.name) if self.has_r[n] else None)
                if full is not None:
                    r_in = res["values"].get(reg.vname(a)) if self.has_r[a] else None
                    pg = b.rule.param_grads(b, self.saved_t.get(n), r_in, dense(full), d_t, self.shapes[a])
                    for k in names:
                        g = pg.get(k)
                        acc = res["param_grads"].get(f"{n.name}.{k}")
                        if acc is not None:
                            if sink is not None:  # DP on updates: the public share is kept apart
                                sink(rparams[pidx + names.index(k)][2], acc)
                            else:
                                g = acc if g is None else g + acc
                        pgrads[pidx + names.index(k)] = g
                pidx += len(names)
            in_grads: list[Tensor | None] = []
            for v in reg.inputs:
                g = dense(tadd(dT.get(v), extra.get(v)))
                acc = res["input_grads"].get(reg.vname(v)) if self.has_r[v] else None
                if acc is not None:
                    g = acc if g is None else g + acc
                in_grads.append(g)
        prof.trusted_s["backward"] = prof.trusted_s.get("backward", 0.0) + time.perf_counter() - t_start - blocked
        sm._blocked += blocked
        self.saved_t.clear()
        return in_grads, pgrads


class _RegionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _RegionCall, n_inputs: int, *tensors: Tensor):  # type: ignore[override]
        ctx.call = call
        ctx.n_inputs = n_inputs
        return call.forward(tensors[:n_inputs])

    @staticmethod
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        call = ctx.call
        in_grads, pgrads = call.backward(grads)
        ctx.call = None
        return (None, None, *in_grads, *pgrads)


class SplitModule(nn.Module):
    """A model whose linear ops run split between the trusted context and an executor.

    Create with :func:`asymml.split`. Parameters are the caller's own (``sm.model``); the caller's
    module structure is never modified.
    """

    def __init__(self, model: nn.Module, cfg: SplitConfig, executor: Executor, mechanism: Any = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.executor = executor
        self.mechanism = mechanism
        self._gm: fx.GraphModule | None = None
        if cfg.mode in ("asym", "noise-only"):
            self._gm = trace(model)
            self._plans: dict[tuple, Plan] = {}
            self.plan()  # validates (strict mode) before any computation
        self._mods: dict[str, nn.Module] = {}
        self._warm: dict[str, Tensor] = {}
        self._gen = torch.Generator().manual_seed(cfg.seed)
        # DP noise must be unpredictable to the accelerator: the mechanism owns a ChaCha20 generator keyed
        # from the OS (asymml.privacy.secure_rng), never checkpointed. noise_seed is the INSECURE, reproducible
        # option for experiments (anyone who knows it can subtract the noise); the mechanism warns.
        if cfg.noise_seed is not None and mechanism is not None and hasattr(mechanism, "set_insecure_seed"):
            mechanism.set_insecure_seed(cfg.noise_seed)
        self._keys = _KEYS  # shared: several split models may use one executor
        self._fctx: _ForwardCtx | None = None
        self._profiling = False
        self._meter: TrustedMemoryMeter | None = None
        self._blocked = 0.0
        self._layers: dict[str, LayerProfile] = {}
        self._release_stats: dict[str, dict[str, Any]] = {}
        self._first_conv_in = self._find_first_conv_channels(model)
        self.planner = Planner(cfg.placement)
        self._all_trusted: set[tuple] = set()  # (modes, shape, grad, threads) where no layer was split
        #: When set, the accelerator's share of each parameter gradient (``R̃⋆δ_R``, computed only from
        #: released tensors, hence post-processing) is handed to ``sink(param, grad)`` instead of being
        #: added to ``param.grad``; ``param.grad`` then holds only the trusted share, which DP-SGD on
        #: updates clips per sample and noises before the optimizer step.
        self.public_grad_sink: Callable[[nn.Parameter, Tensor], None] | None = None

    # ------------------------------------------------------------------ public helpers
    @property
    def mode(self) -> str:
        return self.cfg.mode

    def plan(self) -> Plan:
        """The placement plan for the model's current train/eval state."""
        assert self._gm is not None
        sig = tuple(m.training for m in self._gm.modules())
        p = self._plans.get(sig)
        if p is None:
            self._check_privacy()
            p = build_plan(self._gm, strict=self.cfg.strict)
            self._plans[sig] = p
        return p

    def get_extra_state(self) -> dict[str, Any]:
        """What a checkpoint needs to continue bit-for-bit: the decomposition's random-start generator and
        the warm-start bases (kept only without noise). Never noise state: the mechanism's key stays in
        memory and a resumed run draws fresh noise. The bases derive from private data: keep checkpoints
        where the inputs are kept (at level 2, Gramine's encrypted mount)."""
        return {"version": 1, "gen": self._gen.get_state(),
                "warm": {k: v.detach().cpu().clone() for k, v in self._warm.items()}}

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`; refuses (``CheckpointError``) anything else."""
        ok = (isinstance(state, dict) and state.get("version") == 1 and isinstance(state.get("gen"), Tensor)
              and isinstance(state.get("warm"), dict)
              and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state["warm"].items()))
        if not ok:
            raise CheckpointError("the split model's saved state is not one this asymml wrote (expected the "
                                  "decomposition generator and warm-start bases); the checkpoint is corrupt")
        try:
            self._gen.set_state(state["gen"])
        except RuntimeError as e:
            raise CheckpointError(f"the split model's saved generator state is invalid: {e}") from None
        self._warm.clear()
        self._warm.update(state["warm"])

    def release_stats(self) -> dict[str, dict[str, Any]]:
        """Per decomposition point of the last forward: ``rank`` and per-sample ``energy_ratio``
        ``‖R‖²/‖X‖²`` (before clipping/noise)."""
        return dict(self._release_stats)

    def set_profiling(self, on: bool = True) -> None:
        """Count FLOPs and trusted memory (costs some overhead) until switched off."""
        self._profiling = on
        self.executor.set_profiling(on)
        if on and self._meter is None:
            self._meter = TrustedMemoryMeter()

    def reset_profile(self) -> None:
        self._layers.clear()
        self._blocked = 0.0
        self.executor.reset_stats()
        self.executor.ledger.reset() if not self.executor.ledger.audit else None
        if self._meter is not None:
            self._meter.peak = self._meter.current

    def profile(self) -> Profile:
        """Per-layer trusted/accelerator time and FLOPs since the last reset, and trusted peak memory."""
        acc = self.executor.stats()
        layers = []
        for name, lp in self._layers.items():
            a = acc.get(name, {})
            lp.accelerator_s = {k[:-2]: v for k, v in a.items() if k.endswith("_s")}
            lp.accelerator_flops = int(sum(v for k, v in a.items() if k.endswith("_flops")))
            layers.append(lp)
        for name, a in acc.items():
            if name not in self._layers:
                layers.append(LayerProfile(name, "accelerator", {}, {k[:-2]: v for k, v in a.items() if k.endswith("_s")},
                                           0, int(sum(v for k, v in a.items() if k.endswith("_flops")))))
        return Profile(layers, None if self._meter is None else self._meter.peak, self.cfg.epc_bytes,
                       dict(self.executor.ledger.bytes_by_kind), self._blocked, counted=self._meter is not None)

    # ------------------------------------------------------------------ internals
    def _layer(self, name: str, kind: str) -> LayerProfile:
        lp = self._layers.get(name)
        if lp is None:
            lp = self._layers[name] = LayerProfile(name, kind)
        return lp

    @contextmanager
    def _counting(self, lp: LayerProfile, attr: str):
        if not self._profiling:
            yield
            return
        with FlopCounterMode(display=False) as fc:
            yield
        setattr(lp, attr, getattr(lp, attr) + fc.get_total_flops())

    @staticmethod
    def _find_first_conv_channels(model: nn.Module) -> int | None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return None

    def _region_params(self, reg: Region) -> list[tuple[fx.Node, str, Tensor]]:
        out = []
        for n in reg.nodes:
            b = reg.bound[n]
            for k, p in b.rule.params(b).items():
                out.append((n, k, p))
        return out

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point input tensor, got dtype {x.dtype}")
        params = list(self.model.parameters())
        if params and x.dtype != params[0].dtype:
            raise InputError(f"input dtype {x.dtype} does not match the model's parameter dtype {params[0].dtype}")
        if self._first_conv_in is not None:
            if x.dim() != 4:
                raise InputError(f"expected a 4-D input batch (B, C, H, W), got shape {tuple(x.shape)}")
            if x.shape[1] != self._first_conv_in:
                raise InputError(f"input has {x.shape[1]} channels but the model's first convolution takes "
                                 f"{self._first_conv_in} (shape {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise InputError("empty batch")
        if not torch.isfinite(x).all():
            raise InputError("input contains NaN or Inf values")

    def _module(self, target: str) -> nn.Module:
        """The module at ``target``, as the caller wrote it (in-place activations stay in place: region
        outputs are fresh tensors, and tensors a region saves are version-checked in backward)."""
        m = self._mods.get(target)
        if m is None:
            m = self._mods[target] = self._gm.get_submodule(target)
        return m

    def _decomposed(self, x: Tensor, reg: Region, v: fx.Node) -> tuple[Any, Any, int]:
        """Split ``x`` once per forward (cached by identity/version), release the residual."""
        ctx = self._fctx
        key = (id(x), x._version)
        hit = ctx.cache.get(key)
        if hit is not None and hit[0] is x:
            return hit[1], hit[2], hit[3]
        cfg = self.cfg
        B, C, H, W = x.shape
        N = H * W
        is_input = v.op == "placeholder"
        layer = reg.name if not is_input else "input"
        r = ctx.planned.pop(key, None)
        if r is None:
            r = self._plan_rank(x, reg, v)
        t0 = time.perf_counter()
        if r >= min(C, N):
            tp, h = x, None
            ratio = torch.zeros(B)
        else:
            X3 = x.detach().reshape(B, C, N)
            init = self._warm.get(layer) if self._warm_starts else None
            # ‖R‖² = ‖X‖² − ‖V‖² for an orthonormal basis: one read of X instead of two full passes
            xx = torch.linalg.vector_norm(X3, dim=(1, 2)).square()
            f, R = decompose(X3, r, method=cfg.decomposition, iters=cfg.iters, basis=cfg.basis, init=init,
                             generator=self._starts(), inplace=self._overwritable(x, v))
            if self._warm_starts and r > 0:
                self._warm[layer] = f.U
            ratio = ((xx - f.V.square().sum((1, 2))).clamp_min(0) / xx.clamp_min(1e-30))
            rel = R.reshape(x.shape)
            if self.mechanism is not None:
                rel = self.mechanism(rel, layer=layer)
            h = self.executor.release(rel, layer=layer, kind="residual" if r > 0 else "activation")
            if self._meter is not None:
                self._meter.mark_public(rel)
            ctx.handles.append(h)
            tp = Low(f, (H, W)) if r > 0 else None
        self._layer(reg.name, "split").decompose_s += time.perf_counter() - t0
        self._release_stats[layer] = {"rank": r, "energy_ratio": ratio}
        lp = self._layers.get(reg.name)
        if lp is not None:
            lp.rank = r
            lp.energy_ratio = float(ratio.mean())
        ctx.cache[key] = (x, tp, h, r)
        return tp, h, r

    @property
    def _warm_starts(self) -> bool:
        """Warm-started power iteration carries another batch's factors into this batch's releases, so it
        is used only without noise (with noise every release must depend on its own sample alone)."""
        return self.cfg.warm_start and self.cfg.decomposition == "power" and self.mechanism is None

    def _starts(self) -> torch.Generator:
        """Random starts of the decomposition. With noise on they come from OS entropy per call: drawn
        from one seeded stream by batch position, a sample's start (and, for an iteration that has not
        converged, its release) would depend on which other samples are in the batch."""
        if self.mechanism is None:
            return self._gen
        return torch.Generator().manual_seed(secrets.randbits(63))

    def _check_privacy(self) -> None:
        """With noise on, refuse (``PrivacyConfigError``) a plan in which releases couple samples (the
        modules' current train/eval flags decide, as they decide the plan)."""
        if self.mechanism is None:
            return
        from .privacy.sensitivity import check_independent

        cfg = self.cfg
        check_independent(self.model, basis=cfg.basis, warm_start=self._warm_starts, training=None,
                          decomposition=cfg.decomposition, rank=cfg.rank)

    def _plan_rank(self, x: Tensor, reg: Region, v: fx.Node) -> int:
        """The rank at which activation ``x`` (read by region ``reg`` as ``v``) is split: the rank policy's,
        clamped to ``min(C, HW)``, or full (nothing released) where the planner says splitting would not
        save trusted time. Advances the policy's decomposition-point counter."""
        cfg, ctx = self.cfg, self._fctx
        B, C, H, W = x.shape
        N = H * W
        is_input = v.op == "placeholder"
        if cfg.mode == "noise-only":
            r = 0
        elif is_input and cfg.input_rank is not None:
            r = cfg.input_rank
        else:
            r = cfg.rank.rank_for(ctx.points, x.reshape(B, C, N), shared=cfg.basis == "batch")
        if not is_input:
            ctx.points += 1
        r = min(r, C, N)
        if 0 < r < min(C, N) and cfg.mode == "asym" and not self._split_pays(reg, v, x, r):
            r = min(C, N)  # splitting would cost more trusted time than it saves: run it trusted
            self._layer(reg.name, "split").kind = "trusted (planner)"
        return r

    def _runs_natively(self, reg: Region, env: dict[fx.Node, Any]) -> bool:
        """True when no input of ``reg`` will be split (full rank or kept trusted by the planner): the
        region then runs as plain PyTorch ops with native autograd — no custom autograd function, no
        low-rank bookkeeping — so a layer kept trusted costs what it costs in ``trusted-only`` mode."""
        if self.cfg.mode != "asym":
            return False
        ctx = self._fctx
        todo = []
        for v in reg.inputs:
            x = env[v]
            if v not in reg.decompose or not isinstance(x, Tensor) or x.dim() != 4:
                continue
            key = (id(x), x._version)
            hit = ctx.cache.get(key)
            if hit is not None and hit[0] is x:
                if hit[2] is not None:
                    return False  # already released for another region
                continue
            r = ctx.planned.get(key)
            if r is None:
                r = ctx.planned[key] = self._plan_rank(x, reg, v)
            B, C, H, W = x.shape
            if r < min(C, H * W):
                return False
            todo.append((key, x, v, r))
        for key, x, v, r in todo:
            del ctx.planned[key]
            ctx.cache[key] = (x, x, None, r)
            layer = reg.name if v.op != "placeholder" else "input"
            self._release_stats[layer] = {"rank": r, "energy_ratio": torch.zeros(x.shape[0])}
        lp = self._layers.get(reg.name)
        if lp is not None and lp.kind == "split":
            lp.kind = "trusted"
        return True

    def _split_pays(self, reg: Region, v: fx.Node, x: Tensor, r: int) -> bool:
        """Ask the cost-aware planner whether splitting the convolutions that read ``x`` saves time."""
        B, C, H, W = x.shape
        shapes = []
        for n in reg.nodes:
            b = reg.bound[n]
            if v in reg.arg_nodes(n) and b.rule.decomposes_input and isinstance(b.module, nn.Conv2d):
                m = b.module
                ho, wo = b.rule.out_shape(b, [tuple(x.shape)])[2:]
                shapes.append(ConvShape(B, C, m.out_channels, m.groups, m.kernel_size[0] * m.kernel_size[1],
                                        H * W, ho * wo))
        if not shapes:
            return True
        training = self._fctx.grad_on if self._fctx is not None else x.requires_grad
        convs = [reg.bound[n].module for n in reg.nodes
                 if v in reg.arg_nodes(n) and reg.bound[n].rule.decomposes_input and isinstance(reg.bound[n].module, nn.Conv2d)]

        def dense_timer() -> float:
            """Seconds of this layer's dense forward on the real input (best of 2): the pilot's yardstick."""
            best = float("inf")
            with torch.no_grad():
                for _ in range(2):
                    t0 = time.perf_counter()
                    for m in convs:
                        m._conv_forward(x.detach(), m.weight, m.bias)
                    best = min(best, time.perf_counter() - t0)
            return best

        return all(self.planner.split_pays(f"{reg.name}:{v.name}", s, r, training=training,
                                           shared=self.cfg.basis == "batch", dense_timer=dense_timer)
                   for s in shapes)

    def _overwritable(self, x: Tensor, v: fx.Node) -> bool:
        """May the residual be written over ``x``? Only for a value the runtime made itself (never the
        caller's input), that autograd does not need, that no other op reads, and that shares its
        storage with nothing else."""
        return (v.op != "placeholder" and len(v.users) == 1 and not x.requires_grad
                and not x._is_view() and x.is_contiguous(memory_format=torch.channels_last)
                and x.untyped_storage().nbytes() == x.numel() * x.element_size())

    def _decompose_grad(self, g: Tensor, reg: Region, o: fx.Node, fwd_rank: int) -> tuple[Any, Any]:
        """Protected mode: split an output gradient, release only its residual (noised if configured)."""
        cfg = self.cfg
        if g.dim() != 4:
            return None, None
        B, C, H, W = g.shape
        N = H * W
        if cfg.mode == "noise-only":
            r = 0
        elif cfg.grad_rank is not None:
            r = cfg.grad_rank.rank_for(0, g.reshape(B, C, N), shared=cfg.basis == "batch")
        else:
            r = max(fwd_rank, 1)
        r = min(r, C, N)
        if r >= min(C, N):
            return None, None
        layer = f"{reg.name}:grad"
        init = self._warm.get(layer) if self._warm_starts else None
        f, R = decompose(g.detach().reshape(B, C, N), r, method=cfg.decomposition, iters=cfg.iters,
                         basis=cfg.basis, init=init, generator=self._starts(), keep_layout=True)
        if self._warm_starts and r > 0:
            self._warm[layer] = f.U
        rel = R.reshape(g.shape)
        if self.mechanism is not None and cfg.noise_grads:
            rel = self.mechanism(rel, layer=layer)
        h = self.executor.release(rel, layer=layer, kind="grad_residual")
        return (Low(f, (H, W)) if r > 0 else None), h

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise InputError("asymml split models take positional tensor inputs only")
        if len(args) != 1:
            raise InputError(f"expected one input batch, got {len(args)} positional arguments")
        x = args[0]
        self._check_input(x)
        mode = self.cfg.mode
        if x.dim() == 4 and mode != "plain":
            # the trusted side works channels-last: oneDNN's convolutions, pooling and the per-sample
            # pixel × channel matrices of the decomposition are all fastest in that layout
            x = x.contiguous(memory_format=torch.channels_last)
        if mode == "trusted-only" or self._all_trusted_key(x) in self._all_trusted:
            # (asym: the planner kept every layer trusted for this input shape — run the model as is)
            t0 = time.perf_counter()
            meter = self._meter if self._profiling else None
            with self._counting(self._layer("model", "trusted"), "trusted_flops"), (meter or nullcontext()):
                out = self.model(x)
            lp = self._layer("model", "trusted")
            lp.trusted_s["forward"] = lp.trusted_s.get("forward", 0.0) + time.perf_counter() - t0
            return out
        if mode == "plain":
            return self.executor.run_module(self.model, (x,), layer="model")
        return self._run_split(x)

    def _run_split(self, x: Tensor) -> Any:
        plan = self.plan()
        gm = self._gm
        env: dict[fx.Node, Any] = {}
        self._fctx = _ForwardCtx()
        grad_on = torch.is_grad_enabled()
        self._fctx.grad_on = grad_on
        meter = self._meter if self._profiling else None
        if meter is not None:
            meter.add(x)
        split_any = False
        try:
            with meter if meter is not None else nullcontext():
                for unit in plan.units:
                    if isinstance(unit, Region) and self._runs_natively(unit, env):
                        for n in unit.nodes:
                            env[n] = self._run_trusted(n, plan, env, x)
                    elif isinstance(unit, Region):
                        split_any = True
                        ins = [env[v] for v in unit.inputs]
                        params = [p for _, _, p in self._region_params(unit)]
                        keep = grad_on and (any(t.requires_grad for t in ins) or any(p.requires_grad for p in params))
                        call = _RegionCall(self, unit, keep)
                        outs = _RegionFunction.apply(call, len(ins), *ins, *params)
                        for o, t in zip(unit.outputs, outs):
                            env[o] = t
                    else:
                        env[unit] = self._run_trusted(unit, plan, env, x)
        finally:
            ctx, self._fctx = self._fctx, None
            discard = getattr(self.executor, "discard", None)
            if discard is not None and ctx is not None:
                discard(ctx.handles)
        if not split_any and self.cfg.mode == "asym" and not isinstance(self.cfg.rank, AdaptiveRank):
            self._all_trusted.add(self._all_trusted_key(x))  # the planner's choice is fixed for this shape
        out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        return fx.node.map_arg(out_node.args[0], lambda n: env[n])

    def _all_trusted_key(self, x: Tensor) -> tuple:
        """What the planner's choice depends on: module modes, input shape, autograd, threads."""
        if self._gm is None:
            return ()
        return (tuple(m.training for m in self._gm.modules()), tuple(x.shape), torch.is_grad_enabled(),
                torch.get_num_threads())

    def _run_trusted(self, n: fx.Node, plan: Plan, env: dict[fx.Node, Any], x: Tensor) -> Any:
        if n.op == "placeholder":
            return x
        if n.op == "output":
            return None
        if n.op == "get_attr":
            obj: Any = self._gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        if n in plan.fused.values():
            return args[0]  # executed after the max-pool that consumes it
        t0 = time.perf_counter()
        if n.op == "call_module":
            mod = self._module(n.target)
            out = mod(*args, **kwargs)
            act = plan.fused.get(n)
            if act is not None:
                out = self._module(act.target)(out)
        elif n.op == "call_function":
            fn = n.target
            if fn is operator.iadd:
                fn = operator.add
            out = fn(*args, **kwargs)
        else:  # call_method
            self_obj, *rest = args
            out = getattr(self_obj, n.target)(*rest, **kwargs)
        lp = self._layer(str(n.target) if n.op == "call_module" else n.name, "trusted")
        lp.trusted_s["forward"] = lp.trusted_s.get("forward", 0.0) + time.perf_counter() - t0
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"mode={c.mode}, rank={c.rank}, decomposition={c.decomposition}, backward={c.backward}, "
                f"basis={c.basis}, executor={self.executor!r}")

