"""The split model: :class:`SplitModule`, read top-down.

``forward`` checks the input, then either runs the model as is (``trusted-only``, ``plain``, or a shape for
which the planner split nothing) or walks the placement plan (:mod:`asymml.transform`) with the trusted
interpreter (:mod:`asymml.interpreter`, on ``torch.fx.Interpreter``). Each split region runs as one
autograd node (:mod:`asymml.region`) that is handed, explicitly, the forward pass (ranks and the split of
each activation), the release path (:mod:`asymml.release`: decomposition, warm starts, noise, release, and
their generator and cache) and the executor. Timing, FLOPs, memory and release statistics go to one
:class:`~asymml.profiling.Recorder`, which tells any attached :class:`~asymml.profiling.RuntimeObserver`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .decomposition import AdaptiveRank
from .errors import InputError
from .executors.base import Executor
from .interpreter import IndexlessPools, TrustedInterpreter
from .planner import Planner
from .profiling import LayerProfile, Profile, Recorder, RuntimeObserver
from .region import ForwardPass, RegionCall, RegionFunction, region_params
from .release import ReleasePath
from .splitconfig import BACKWARDS, MODES, SplitConfig
from .transform import Plan, Region, build_plan, trace

__all__ = ["BACKWARDS", "MODES", "SplitConfig", "SplitModule"]

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
        #: per-layer times, FLOPs and memory when counting, release statistics; tells the observers
        self.recorder = Recorder()
        #: decomposition → warm start → noise → release, with its generator and warm-start cache
        self.release_path = ReleasePath(cfg, executor, mechanism, self.recorder)
        self.planner = Planner(cfg.placement)
        self._gm: fx.GraphModule | None = None
        self._interpreter: TrustedInterpreter | None = None
        if cfg.mode in ("asym", "noise-only"):
            self._gm = trace(model)
            self._interpreter = TrustedInterpreter(self._gm, self.recorder)
            # the traced modules, whose train/eval flags the planner's all-trusted choice depends on (the
            # structure never changes: walked once here, not on every forward)
            self._gm_modules = tuple(self._gm.modules())
            self._plans: dict[tuple, Plan] = {}
            self.plan()  # validates (strict mode) before any computation
        self._first_conv_in = self._find_first_conv_channels(model)
        self._has_max_pool = any(isinstance(m, nn.MaxPool2d) for m in model.modules())
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
        """What a checkpoint needs to continue bit-for-bit: the release path's state (the decomposition's
        random-start generator and the warm-start bases, kept only without noise). Never noise state: the
        mechanism's key stays in memory and a resumed run draws fresh noise. The bases derive from private
        data: keep checkpoints where the inputs are kept (at level 2, Gramine's encrypted mount)."""
        return self.release_path.state_dict()

    def set_extra_state(self, state: Any) -> None:
        """Restore :meth:`get_extra_state`; refuses (``CheckpointError``) anything else."""
        self.release_path.load_state_dict(state)

    def release_stats(self) -> dict[str, dict[str, Any]]:
        """Per decomposition point of the last forward: ``rank`` and per-sample ``energy_ratio``
        ``‖R‖²/‖X‖²`` (before clipping/noise)."""
        return dict(self.recorder.release_stats)

    def add_observer(self, observer: RuntimeObserver) -> None:
        """Tell ``observer`` about every split region, trusted op, split point and release from now on."""
        self.recorder.observers.append(observer)

    def remove_observer(self, observer: RuntimeObserver) -> None:
        """Stop telling ``observer``."""
        self.recorder.observers.remove(observer)

    def set_profiling(self, on: bool = True) -> None:
        """Count FLOPs and trusted memory (costs some overhead) until switched off."""
        self.recorder.set_counting(on)
        self.executor.set_profiling(on)

    def reset_profile(self) -> None:
        self.recorder.reset()
        self.executor.reset_stats()
        self.executor.ledger.reset() if not self.executor.ledger.audit else None

    def profile(self) -> Profile:
        """Per-layer trusted/accelerator time and FLOPs since the last reset, and trusted peak memory."""
        rec = self.recorder
        acc = self.executor.stats()
        layers = []
        for name, lp in rec.layers.items():
            a = acc.get(name, {})
            lp.accelerator_s = {k[:-2]: v for k, v in a.items() if k.endswith("_s")}
            lp.accelerator_flops = int(sum(v for k, v in a.items() if k.endswith("_flops")))
            layers.append(lp)
        for name, a in acc.items():
            if name not in rec.layers:
                layers.append(LayerProfile(name, "accelerator", {}, {k[:-2]: v for k, v in a.items() if k.endswith("_s")},
                                           0, int(sum(v for k, v in a.items() if k.endswith("_flops")))))
        return Profile(layers, None if rec.meter is None else rec.meter.peak, self.cfg.epc_bytes,
                       dict(self.executor.ledger.bytes_by_kind), rec.blocked_s, counted=rec.meter is not None)

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise InputError("asymml split models take positional tensor inputs only")
        if len(args) != 1:
            raise InputError(f"expected one input batch, got {len(args)} positional arguments")
        x = args[0]
        self._check_input(x)
        mb = self.cfg.micro_batch
        if mb is not None and x.shape[0] > mb and not torch.is_grad_enabled() and self.cfg.mode != "plain":
            return self._micro_batched(x, mb)
        return self._forward(x)

    def _micro_batched(self, x: Tensor, mb: int) -> Any:
        """Inference micro-batch by micro-batch (each sample's result does not depend on the others': no
        autograd, and any layer that mixes the samples of a batch is refused below), outputs concatenated along
        the batch."""
        from .privacy.sensitivity import coupling_layers

        coupled = coupling_layers(self.model)
        if coupled:
            raise InputError("micro_batch needs eval-mode BatchNorm with running statistics: "
                             f"{', '.join(n for n, _ in coupled[:3])} normalise with the statistics of the whole batch "
                             "(call model.eval(), or leave micro_batch unset)")
        outs = [self._forward(c) for c in x.split(mb)]
        leaves0, spec = tree_flatten(outs[0])
        flat = [tree_flatten(o)[0] for o in outs]
        merged = [torch.cat([f[i] for f in flat]) if isinstance(leaf, Tensor) and leaf.dim() > 0 else leaf
                  for i, leaf in enumerate(leaves0)]
        return tree_unflatten(merged, spec)

    def _forward(self, x: Tensor) -> Any:
        mode = self.cfg.mode
        if x.dim() == 4 and mode != "plain":
            # the trusted side works channels-last: oneDNN's convolutions, pooling and the per-sample
            # pixel × channel matrices of the decomposition are all fastest in that layout
            x = x.contiguous(memory_format=torch.channels_last)
        if mode == "trusted-only" or self._all_trusted_key(x) in self._all_trusted:
            # (asym: the planner kept every layer trusted for this input shape — run the model as is)
            # (without autograd its 2×2 max-pools write no indices, as in the trusted interpreter)
            pools = self._has_max_pool and not torch.is_grad_enabled()
            with self.recorder.whole_model(), (IndexlessPools() if pools else contextlib.nullcontext()):
                return self.model(x)
        if mode == "plain":
            return self.executor.run_module(self.model, (x,), layer="model")
        return self._run_split(x)

    def _run_split(self, x: Tensor) -> Any:
        """Walk the plan: trusted nodes in the interpreter, each split region as one autograd node."""
        plan = self.plan()
        grad_on = torch.is_grad_enabled()
        rec = self.recorder
        fp = ForwardPass(self.cfg, self.release_path, self.planner, rec, grad_on)
        split_any = False

        def run_region(reg: Region, env: dict[fx.Node, Any]) -> bool:
            nonlocal split_any
            if fp.runs_natively(reg, env):
                return False
            split_any = True
            ins = [env[v] for v in reg.inputs]
            params = [p for _, _, p in region_params(reg)]
            keep = grad_on and (any(t.requires_grad for t in ins) or any(p.requires_grad for p in params))
            call = RegionCall(reg, release=self.release_path, executor=self.executor, recorder=rec,
                              planner=self.planner, keep_graph=keep, grad_sink=self.public_grad_sink)
            outs = RegionFunction.apply(call, fp, len(ins), *ins, *params)
            for o, t in zip(reg.outputs, outs):
                env[o] = t
            return True

        try:
            with rec.forward_pass(x):
                out = self._interpreter.run_plan(plan, x, run_region)
        finally:
            discard = getattr(self.executor, "discard", None)
            if discard is not None:
                discard(fp.handles)
        if not split_any and self.cfg.mode == "asym" and not isinstance(self.cfg.rank, AdaptiveRank):
            self._all_trusted.add(self._all_trusted_key(x))  # the planner's choice is fixed for this shape
        return out

    # ------------------------------------------------------------------ internals
    def _all_trusted_key(self, x: Tensor) -> tuple:
        """What the planner's choice depends on: module modes, input shape, autograd, threads."""
        if self._gm is None:
            return ()
        return (tuple(m.training for m in self._gm_modules), tuple(x.shape), torch.is_grad_enabled(),
                torch.get_num_threads())

    def _check_privacy(self) -> None:
        """With noise on, refuse (``PrivacyConfigError``) a plan in which releases couple samples (the
        modules' current train/eval flags decide, as they decide the plan)."""
        if self.mechanism is None:
            return
        from .privacy.sensitivity import check_independent

        cfg = self.cfg
        check_independent(self.model, basis=cfg.basis, warm_start=self.release_path.warm_starts, training=None,
                          decomposition=cfg.decomposition, rank=cfg.rank)

    @staticmethod
    def _find_first_conv_channels(model: nn.Module) -> int | None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                return m.in_channels
        return None

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(f"expected a floating-point input tensor, got dtype {x.dtype}")
        p0 = next(self.model.parameters(), None)  # the first parameter only: no walk over every module
        if p0 is not None and x.dtype != p0.dtype:
            raise InputError(f"input dtype {x.dtype} does not match the model's parameter dtype {p0.dtype}")
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

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"mode={c.mode}, rank={c.rank}, decomposition={c.decomposition}, backward={c.backward}, "
                f"basis={c.basis}, executor={self.executor!r}")
