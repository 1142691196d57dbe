"""The measuring loop of ``asymml bench``: every mode side by side in one process, interleaved.

For one (model, input size, batch size) the runner builds one :class:`~asymml.SplitModule` per mode
(``plain``, ``trusted-only``, ``asym`` with each backward mode, ``noise-only``), all on the same weights,
then for each phase (``train``, ``infer``):

1. ``warmup`` un-timed steps per mode, interleaved;
2. ``repeats`` rounds of one timed step per mode (interleaved, so drifts hit every mode alike);
3. one instrumented step per mode: FLOPs (``FlopCounterMode`` in the trusted thread with a group-aware
   convolution-backward formula, the executor's FLOP counter on the accelerator side) and trusted peak
   memory (:class:`~asymml.bench.memory.AliasAwareMemoryMeter`; released tensors are marked public);
4. optionally (``attribute``) one step under ``torch.profiler`` (:mod:`asymml.bench.attribution`).

Instrumentation is never on during timed steps. With ``serialize`` the accelerator jobs of a CPU executor
run only while the trusted side waits for them, so the two sides' times do not include contention for the
same cores.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import split
from ..executors.base import Handle
from ..executors.local import LocalExecutor
from ..profiling import EPC_DEFAULT_BYTES, TrustedMemoryMeter
from .derived import DEFAULT_SPEED_RATIO, analytic_fwd_conv_limit, conv_geometry
from .flops import flop_counter, group_aware_registry
from .memory import AliasAwareMemoryMeter

MODES = ("plain", "trusted-only", "asym", "noise-only")
BACKWARDS = ("protected", "paper")
PHASES = ("train", "infer")
LARGE_INPUT = 128  # from this input size on, names that torchvision also has mean ImageNet geometry


@dataclass
class BenchConfig:
    """What ``asymml bench`` measures (the CLI maps its options onto these fields)."""

    models: list[str] = field(default_factory=lambda: ["resnet20"])
    input_sizes: list[int] = field(default_factory=lambda: [32])
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    phases: tuple[str, ...] = PHASES
    modes: tuple[str, ...] = MODES
    backwards: tuple[str, ...] = BACKWARDS
    rank: str = "schedule"
    decomposition: str = "power"
    iters: int = 2
    basis: str = "sample"
    input_rank: int | None = 1
    grad_rank: str | None = None
    warm_start: bool = True
    repeats: int = 5
    warmup: int = 1
    device: str = "auto"
    speed_ratio: float = DEFAULT_SPEED_RATIO
    noise_sigma: float = 1.0
    clip: float = 1.0
    asym_sigma: float | None = None
    epc_bytes: int = EPC_DEFAULT_BYTES
    num_classes: int | None = None
    width: float = 1.0
    in_channels: int = 3
    optimizer_step: bool = False
    seed: int = 0
    layers: bool = False
    attribute: bool = False
    serialize: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` for unusable settings."""
        for name, allowed, vals in (("mode", MODES, self.modes), ("backward", BACKWARDS, self.backwards),
                                    ("phase", PHASES, self.phases)):
            bad = [v for v in vals if v not in allowed]
            if bad or not vals:
                raise ValueError(f"invalid {name} {bad or vals!r}; allowed: {', '.join(allowed)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be ≥ 1 and warmup ≥ 0")
        if any(s < 1 for s in self.input_sizes) or any(b < 1 for b in self.batch_sizes):
            raise ValueError("input sizes and batch sizes must be positive")
        if not self.models:
            raise ValueError("no model given")
        if self.speed_ratio <= 0:
            raise ValueError(f"speed ratio must be > 0, got {self.speed_ratio}")


# ---------------------------------------------------------------------------------------- models


def resolve_family(name: str, input_size: int) -> str:
    """``name`` with its family made explicit (``cifar:…`` or ``tv:…``) as :func:`build_model` picks it."""
    from ..models import MODELS, torchvision_models

    low = name.strip().lower()
    if low.startswith(("cifar:", "tv:", "torchvision:")):
        return low
    if low in MODELS and (input_size < LARGE_INPUT or low not in torchvision_models()):
        return f"cifar:{low}"
    return f"tv:{low}"


def build_model(name: str, input_size: int, *, num_classes: int | None = None, width: float = 1.0,
                in_channels: int = 3) -> tuple[nn.Module, str, str]:
    """Build ``name`` for ``input_size``; returns ``(model, arch, canonical name)``.

    ``cifar:NAME`` / ``tv:NAME`` force the family. Otherwise CIFAR-style names are used as such below
    :data:`LARGE_INPUT`; from :data:`LARGE_INPUT` on, a name torchvision also knows (``vgg16``…) means
    torchvision's ImageNet model. Default classes: 10 (CIFAR-style) or 1000 (torchvision).
    """
    from ..models import MODELS, get_model

    family, base = resolve_family(name, input_size).split(":", 1)
    arch = "cifar" if family == "cifar" else "torchvision"
    if arch == "cifar":
        if base not in MODELS:
            raise ValueError(f"unknown CIFAR-style model {base!r}; known: {', '.join(MODELS)}")
        nc = 10 if num_classes is None else num_classes
        model = get_model(base, num_classes=nc, in_channels=in_channels, image_size=input_size, width=width)
    else:
        nc = 1000 if num_classes is None else num_classes
        model = get_model(f"tv:{base}", num_classes=nc, in_channels=in_channels, image_size=input_size)
    return model, arch, base


# ---------------------------------------------------------------------------------------- helpers


class _DeferredFuture(Future):
    """A future whose job only starts when someone asks for its result."""

    def __init__(self, pool: _DeferredPool) -> None:
        super().__init__()
        self._owner = pool

    def result(self, timeout: float | None = None) -> Any:
        if not self.done():
            self._owner.flush()
        return super().result(timeout)


class _DeferredPool:
    """Stands in for the executor's worker pool in serialized measurements: submitted jobs run on the real
    worker, in submission order, only once the trusted side waits for a result. The trusted share of a
    layer then never overlaps (and never shares the CPU) with the accelerator share, so both sides' times
    are free of contention; the step time becomes their sum."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.pending: list[tuple[Callable[[], Any], _DeferredFuture]] = []
        self.lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut = _DeferredFuture(self)
        with self.lock:
            self.pending.append((functools.partial(fn, *args, **kwargs), fut))
        return fut

    def flush(self) -> None:
        with self.lock:
            jobs, self.pending = self.pending, []
        for fn, fut in jobs:
            try:
                fut.set_result(self.pool.submit(fn).result())
            except BaseException as e:  # handed to the waiting caller
                fut.set_exception(e)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self.flush()
        self.pool.shutdown(wait=wait, **kwargs)


class _BenchExecutor(LocalExecutor):
    """A :class:`LocalExecutor` that tells the active trusted memory meter that released tensors are public
    (they live outside the enclave once handed over), and can defer its jobs (serialized measurement)."""

    def __init__(self, device: str, serialize: bool = False) -> None:
        super().__init__(device)
        self._real_pool = self._pool
        self.serialize(serialize)

    def serialize(self, on: bool) -> None:
        """Run accelerator jobs only when the trusted side waits for them (no overlap) — or concurrently."""
        if isinstance(self._pool, _DeferredPool):
            self._pool.flush()
        self._pool = _DeferredPool(self._real_pool) if on else self._real_pool

    def release(self, tensor: Tensor, *, layer: str, kind: str) -> Handle:
        meter = TrustedMemoryMeter.active()
        if meter is not None:
            meter.mark_public(tensor)
        return super().release(tensor, layer=layer, kind=kind)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"accelerator device {device!r} requested but CUDA is not available")
    return device


def _spread(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    n = len(s)

    def q(p: float) -> float:
        if n == 1:
            return s[0]
        k = p * (n - 1)
        lo = int(k)
        hi = min(lo + 1, n - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    med = statistics.median(s)
    return {"min": s[0], "q1": q(0.25), "median": med, "q3": q(0.75), "max": s[-1],
            "rel_iqr": (q(0.75) - q(0.25)) / med if med else 0.0}


def environment(device: str) -> dict[str, Any]:
    """Machine and thread settings the figures were measured with."""
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "accelerator": device,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return env


@dataclass
class _Entry:
    """One mode instance: a SplitModule and the settings of its runs."""

    label: str
    mode: str
    backward: str | None
    sm: Any
    model: nn.Module
    opt: torch.optim.Optimizer | None
    on_cuda: bool  # model weights live on the accelerator (plain mode on CUDA)
    samples: dict[str, list[float]] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# ---------------------------------------------------------------------------------------- runner


class BenchRunner:
    """Measures one configuration; :func:`run_bench` loops over models, sizes and batch sizes."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))

    # ------------------------------------------------------------------ setup
    def _entries(self, model: nn.Module) -> list[_Entry]:
        cfg = self.cfg
        out: list[_Entry] = []
        for mode in cfg.modes:
            bwds: list[str | None]
            if mode == "asym":
                bwds = list(cfg.backwards)
            elif mode == "noise-only":
                bwds = ["protected"]
            else:
                bwds = [None]
            for b in bwds:
                out.append(self._entry(model, mode, b))
        return out

    def _entry(self, model: nn.Module, mode: str, backward: str | None) -> _Entry:
        cfg = self.cfg
        on_cuda = mode == "plain" and self.cuda
        m = copy.deepcopy(model).to(self.device) if on_cuda else model
        noise: Any = None
        if mode == "noise-only":
            noise = {"sigma": cfg.noise_sigma, "clip": cfg.clip}
        elif mode == "asym" and cfg.asym_sigma is not None:
            noise = {"sigma": cfg.asym_sigma, "clip": cfg.clip}
        ex = _BenchExecutor(self.device if mode != "trusted-only" else "cpu", serialize=cfg.serialize)
        sm = split(m, rank=cfg.rank, decomposition=cfg.decomposition, backward=backward or "protected",
                   noise=noise, mode=mode, executor=ex, iters=cfg.iters, basis=cfg.basis,
                   input_rank=cfg.input_rank, grad_rank=cfg.grad_rank, warm_start=cfg.warm_start,
                   epc_bytes=cfg.epc_bytes, seed=cfg.seed)
        opt = torch.optim.SGD(m.parameters(), lr=1e-4) if cfg.optimizer_step else None
        label = mode if backward is None or mode != "asym" else f"{mode}/{backward}"
        return _Entry(label, mode, backward, sm, m, opt, on_cuda)

    # ------------------------------------------------------------------ one step
    def _step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> None:
        if phase == "train":
            out = e.sm(x)
            loss = F.cross_entropy(out, y.to(out.device))
            loss.backward()
            if e.opt is not None:
                e.opt.step()
        else:
            with torch.no_grad():
                e.sm(x)
        if self.cuda:
            torch.cuda.synchronize()

    def _timed_step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> dict[str, Any]:
        _zero_grads(e.model)
        sm = e.sm
        sm.reset_profile()
        t0 = time.perf_counter()
        self._step(e, phase, x, y)
        wall = time.perf_counter() - t0
        stats = sm.executor.stats()
        accel = sum(v for d in stats.values() for k, v in d.items() if k.endswith("_s"))
        rec: dict[str, Any] = {"step_s": wall}
        breakdown: dict[str, float] = {}
        if e.mode == "plain":
            rec.update(trusted_s=0.0, accelerator_s=wall, blocked_s=0.0)
        elif e.mode == "trusted-only":
            rec.update(trusted_s=wall, accelerator_s=0.0, blocked_s=0.0)
            prof = sm.profile()
            fwd = sum(lp.trusted_s.get("forward", 0.0) for lp in prof.layers)
            breakdown = {"forward_s": fwd, "loss_backward_other_s": wall - fwd}
        else:
            prof = sm.profile()
            blocked = prof.blocked_s
            trusted = wall - blocked
            rec.update(trusted_s=trusted, accelerator_s=accel, blocked_s=blocked)
            dec = sum(lp.decompose_s for lp in prof.layers)
            sf = sum(lp.trusted_s.get("forward", 0.0) for lp in prof.layers if lp.kind == "split")
            sb = sum(lp.trusted_s.get("backward", 0.0) for lp in prof.layers if lp.kind == "split")
            tf = sum(lp.trusted_s.get("forward", 0.0) for lp in prof.layers if lp.kind == "trusted")
            breakdown = {"decompose_s": dec, "split_forward_s": sf - dec, "split_backward_s": sb,
                         "trusted_ops_forward_s": tf, "other_s": trusted - sf - sb - tf}
            if self.cfg.layers:
                rec["layers"] = prof.to_dict()["layers"]
        kinds = dict(sm.executor.ledger.bytes_by_kind)
        rec["released_by_kind"] = kinds
        rec["released_bytes"] = sum(v for k, v in kinds.items() if k != "weight")
        rec["released_weight_bytes"] = kinds.get("weight", 0)
        rec["breakdown"] = breakdown
        return rec

    def _instrumented_step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> dict[str, Any]:
        _zero_grads(e.model)
        sm = e.sm
        sm.reset_profile()
        sm.executor.set_profiling(True)
        meter = AliasAwareMemoryMeter()
        try:
            with group_aware_registry(), flop_counter() as fc:
                with meter:
                    meter.add(x)
                    self._step(e, phase, x, y)
        finally:
            sm.executor.set_profiling(False)
        flops = int(fc.get_total_flops())
        stats = sm.executor.stats()
        accel_flops = int(sum(v for d in stats.values() for k, v in d.items() if k.endswith("_flops")))
        if e.mode == "plain":
            return {"trusted_flops": 0, "accelerator_flops": flops, "counted_flops": flops,
                    "trusted_peak_bytes": 0}
        return {"trusted_flops": flops, "accelerator_flops": accel_flops, "counted_flops": flops,
                "trusted_peak_bytes": int(meter.peak)}

    def _attributed_step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> dict[str, Any]:
        from .attribution import attribute

        _zero_grads(e.model)
        e.sm.reset_profile()
        att = attribute(lambda: self._step(e, phase, x, y))
        wall = att["step_wall_s"]
        blocked = 0.0 if e.mode == "trusted-only" else e.sm.profile().blocked_s
        att["profiled_trusted_s"] = wall - blocked
        return att

    def _conv_ranks(self, e: _Entry) -> dict[str, int | None]:
        """Rank of the decomposed input of every conv (by module name) in the last step's plan."""
        ranks: dict[str, int | None] = {}
        prof = {lp.layer: lp.rank for lp in e.sm.profile().layers}
        for reg in e.sm.plan().regions:
            r = prof.get(reg.name)
            for n in reg.nodes:
                if n.op == "call_module" and isinstance(e.sm._gm.get_submodule(n.target), nn.Conv2d):
                    a = reg.arg_nodes(n)[0]
                    ranks[str(n.target)] = r if a in reg.decompose else None
        return ranks

    # ------------------------------------------------------------------ one configuration
    def run_config(self, name: str, size: int, batch: int) -> list[dict[str, Any]]:
        """All modes and phases for one model / input size / batch size."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model, arch, base = build_model(name, size, num_classes=cfg.num_classes, width=cfg.width,
                                        in_channels=cfg.in_channels)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
        geometry = conv_geometry(model, x)
        with torch.no_grad():
            model.eval()
            nc = int(model(x[:1]).shape[-1])
        y = torch.randint(0, nc, (batch,), generator=gen)
        meta = {"model": name, "arch": arch, "model_name": base, "input_size": size, "batch_size": batch,
                "model_bytes": sum(t.numel() * t.element_size()
                                   for t in itertools.chain(model.parameters(), model.buffers())),
                "geometry": geometry}
        runs: list[dict[str, Any]] = []
        entries = self._entries(model)
        try:
            for phase in cfg.phases:
                runs.extend(self._run_phase(entries, phase, x, y, meta))
        finally:
            for e in entries:
                e.sm.executor.close()
        return runs

    def _run_phase(self, entries: list[_Entry], phase: str, x: Tensor, y: Tensor,
                   meta: dict[str, Any]) -> list[dict[str, Any]]:
        cfg = self.cfg
        for m in {id(e.model): e.model for e in entries}.values():
            m.train(phase == "train")
        first_bwd = next((e.backward for e in entries if e.mode == "asym"), None)
        # inference does not depend on the backward mode: one asym instance measures it
        active = [e for e in entries if phase == "train" or e.mode != "asym" or e.backward == first_bwd]
        for e in active:
            e.samples = {"step_s": [], "trusted_s": [], "accelerator_s": [], "blocked_s": []}
        what = f"{meta['model']} ({meta['arch']}) {meta['input_size']}px batch {meta['batch_size']} {phase}"
        self.log(f"[bench] {what}: warm-up {cfg.warmup}, {cfg.repeats} repeats x {len(active)} modes "
                 f"on {self.device}")
        for _ in range(cfg.warmup):
            for e in active:
                self._timed_step(e, phase, x, y)
        for _ in range(cfg.repeats):
            for e in active:
                rec = self._timed_step(e, phase, x, y)
                for k in e.samples:
                    e.samples[k].append(rec[k])
                e.last = rec
        counted: dict[str, int] = {}
        instr: dict[str, dict[str, Any]] = {}
        analytic: float | None = None
        for e in active:
            instr[e.label] = self._instrumented_step(e, phase, x, y)
            counted[e.mode] = instr[e.label]["counted_flops"]
            if e.mode == "asym" and analytic is None:
                analytic = analytic_fwd_conv_limit(meta["geometry"], self._conv_ranks(e))
        if cfg.attribute:
            for e in active:
                if e.mode != "plain":
                    instr[e.label]["attribution"] = self._attributed_step(e, phase, x, y)
        total = counted.get("plain") or counted.get("trusted-only")
        if total is None:
            cpu_model = next(e.model for e in entries if not e.on_cuda)
            total = self._count_model_flops(cpu_model, phase, x, y)
        runs = []
        for e in active:
            r = self._record(e, phase, meta, total, instr[e.label], analytic)
            runs.append(r)
            self.log(f"[bench]   {e.label:<16} step {1e3 * r['step_s']:9.1f} ms  trusted "
                     f"{1e3 * r['trusted_s']:9.1f} ms  accel {1e3 * r['accelerator_s']:9.1f} ms")
        return runs

    def _count_model_flops(self, model: nn.Module, phase: str, x: Tensor, y: Tensor) -> int:
        with flop_counter() as fc:
            if phase == "train":
                F.cross_entropy(model(x), y).backward()
            else:
                with torch.no_grad():
                    model(x)
        _zero_grads(model)
        return int(fc.get_total_flops())

    def _record(self, e: _Entry, phase: str, meta: dict[str, Any], total: int, ins: dict[str, Any],
                analytic: float | None) -> dict[str, Any]:
        cfg = self.cfg
        med = {k: statistics.median(v) for k, v in e.samples.items()}
        split_mode = e.mode in ("asym", "noise-only")
        peak = ins["trusted_peak_bytes"]
        model_bytes = meta["model_bytes"]
        resident = 0 if e.mode == "plain" else peak + model_bytes
        batch = meta["batch_size"]
        return {
            "model": meta["model"], "arch": meta["arch"], "model_name": meta["model_name"],
            "input_size": meta["input_size"], "batch_size": batch,
            "mode": e.mode, "backward": e.backward if phase == "train" else None,
            "label": e.label, "phase": phase,
            "rank": cfg.rank if split_mode else None,
            "decomposition": cfg.decomposition if e.mode == "asym" else None,
            "accelerator": "cpu" if e.mode == "trusted-only" else self.device,
            "trusted_s": med["trusted_s"], "accelerator_s": med["accelerator_s"], "step_s": med["step_s"],
            "blocked_s": med["blocked_s"],
            "samples_per_s": batch / med["step_s"] if med["step_s"] else None,
            "spread": {k: _spread(v) for k, v in e.samples.items() if k != "blocked_s"},
            "samples": e.samples,
            "trusted_flops": ins["trusted_flops"], "accelerator_flops": ins["accelerator_flops"],
            "total_flops": total,
            "trusted_flop_fraction": ins["trusted_flops"] / total if total else None,
            "trusted_peak_bytes": peak, "model_bytes": model_bytes, "trusted_resident_bytes": resident,
            "epc_bytes": cfg.epc_bytes,
            "within_epc": peak <= cfg.epc_bytes, "resident_within_epc": resident <= cfg.epc_bytes,
            "released_bytes": e.last.get("released_bytes", 0),
            "released_weight_bytes": e.last.get("released_weight_bytes", 0),
            "released_by_kind": e.last.get("released_by_kind", {}),
            "breakdown": e.last.get("breakdown", {}),
            "limit_fwd_conv_analytic": analytic if e.mode == "asym" else None,
            "repeats": cfg.repeats, "warmup": cfg.warmup, "serialized": cfg.serialize,
            **({"layers": e.last["layers"]} if "layers" in e.last else {}),
            **({"attribution": ins["attribution"]} if "attribution" in ins else {}),
        }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every configuration; returns ``{"config", "environment", "definitions", "runs", "derived"}``."""
    from .derived import DEFINITIONS, derive

    runner = BenchRunner(cfg, log)
    runs: list[dict[str, Any]] = []
    for name in cfg.models:
        for size in cfg.input_sizes:
            for batch in cfg.batch_sizes:
                runs.extend(runner.run_config(name, size, batch))
    return {
        "config": asdict(cfg),
        "environment": environment(runner.device),
        "definitions": DEFINITIONS,
        "runs": runs,
        "derived": derive(runs, cfg.speed_ratio),
    }
