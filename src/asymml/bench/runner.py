"""The measuring loop of ``asymml bench``: every mode side by side in one process, interleaved.

For one (model, input size, batch size) the runner builds one :class:`~asymml.SplitModule` per mode
(``plain``, ``trusted-only``, ``asym`` with each backward mode, ``noise-only``, and optional ``asym``
variants with ``verify`` or noise), all on the same weights, then for each phase (``train``, ``infer``):

1. ``warmup`` un-timed steps per mode (a trusted memory meter runs over the first and the last to find what
   survives a step: persistent caches such as weight re-layouts and warm-start bases; the steps between run
   bare, for the planner's trial to time);
2. ``rounds`` rounds (at least :data:`MIN_ROUNDS`); in each round every paired mode (``trusted-only`` and
   every ``asym`` instance) runs one timed step, in an order shuffled per round, on a fresh batch drawn for
   that round (each mode gets its own copy); the context modes (``plain``, ``noise-only``) join the first
   ``repeats`` rounds. Speed-ups are medians of per-round paired ratios with a bootstrap interval;
3. one instrumented step per mode: FLOPs (``FlopCounterMode``), trusted peak memory (released tensors are
   public, accelerator results held by the trusted side and persistent caches count), and the trusted
   side's per-op roofline and storage trace (:mod:`asymml.bench.roofline`);
4. optionally (``attribute``) one step under ``torch.profiler`` (:mod:`asymml.bench.attribution`).

Instrumentation is never on during timed steps. With a CPU accelerator the measurement is serialized by
default: the accelerator jobs run only while the trusted side waits for them, so the two sides' times do
not include contention for the same cores. The time the trusted thread is blocked on the accelerator is
measured by the bench's own wrapper around the executor's futures, not taken from the runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import itertools
import os
import platform
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .. import _env
from ..api import split_with_options
from ..errors import ConfigError
from ..executors.base import Handle
from ..executors.local import LocalExecutor
from ..microbatch import accumulate
from ..options import SplitOptions
from ..planner import FollowingPlanner
from ..privacy.sensitivity import coupling_layers
from ..profiling import TrustedMemoryMeter, public_state_storages
from ..validate import fix
from .derived import DEFAULT_SPEED_RATIO, analytic_fwd_conv_limit, conv_geometry
from .flops import flop_counter, group_aware_registry
from .memory import AliasAwareMemoryMeter
from .roofline import SGX1, TrustedOpCounter, calibrate, cpu_clock_hz, sgx1_projection

MODES = ("plain", "trusted-only", "asym", "noise-only")
BACKWARDS = ("protected", "paper")
PHASES = ("train", "infer")
LARGE_INPUT = 128  # from this input size on, names that torchvision also has mean ImageNet geometry
MIN_ROUNDS = 15  # paired rounds by default: enough for a median and a bootstrap interval
ROUND_BUDGET_S = 20.0  # default rounds grow up to this many seconds of paired steps per phase (small models)
MAX_AUTO_ROUNDS = 60


def _split_field(name: str) -> Any:
    """A bench field that is split option ``name``: its default is :class:`SplitOptions`'."""
    (f,) = [f for f in dataclasses.fields(SplitOptions) if f.name == name]
    return field(default=f.default, metadata={"split_option": name})


@dataclass
class BenchConfig:
    """What ``asymml bench`` measures (the CLI maps its options onto these fields)."""

    models: list[str] = field(default_factory=lambda: ["resnet20"])
    input_sizes: list[int] = field(default_factory=lambda: [32])
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    phases: tuple[str, ...] = PHASES
    modes: tuple[str, ...] = MODES
    backwards: tuple[str, ...] = BACKWARDS
    # split options: defaults, validation and meaning from asymml.options.SplitOptions (split_options())
    rank: int | tuple[int, ...] | str = _split_field("rank")
    decomposition: str = _split_field("decomposition")
    iters: int = _split_field("iters")
    basis: str = _split_field("basis")
    input_rank: int | None = _split_field("input_rank")
    grad_rank: int | tuple[int, ...] | str | None = _split_field("grad_rank")
    warm_start: bool = _split_field("warm_start")
    verify_sample: float = _split_field("verify_sample")  # of the +verify variant
    micro_batch: int | None = _split_field("micro_batch")  # every trusted mode micro-batched (training: accumulated)
    repeats: int = 5
    rounds: int | None = None  # paired rounds; None: max(MIN_ROUNDS, repeats)
    warmup: int = 4  # = the planner's longest trial (Planner.PILOT_MAX_FORWARDS): timed steps run its decisions
    device: str = "auto"
    speed_ratio: float = DEFAULT_SPEED_RATIO
    noise_sigma: float = 1.0
    clip: float = 1.0
    asym_sigma: float | None = None
    epc_bytes: int = _split_field("epc_bytes")
    num_classes: int | None = None
    width: float = 1.0
    in_channels: int = 3
    optimizer_step: bool = True
    seed: int = _split_field("seed")  # also seeds the bench's batches and round order
    layers: bool = False
    attribute: bool = False
    serialize: bool | None = None  # None: serialize when the accelerator is the CPU
    verify: bool = False  # add an asym variant with the runtime's result verification on
    noise: float | None = None  # add an asym variant with Gaussian noise of this sigma on its releases
    calibration: dict[str, Any] | None = None  # roofline rates from an earlier run (None: measure)
    sgx_weights_in_epc: bool = False  # SGX1 projection: parameters live in the EPC (default: public, outside)
    bootstrap: int = 2000  # bootstrap resamples of the paired-ratio interval
    placement: str | None = None  # SplitOptions.placement of asym / noise-only (None: its default)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for unusable settings (split options: as :class:`SplitOptions` does)."""
        for name, allowed, vals in (("mode", MODES, self.modes), ("backward", BACKWARDS, self.backwards),
                                    ("phase", PHASES, self.phases)):
            bad = [v for v in vals if v not in allowed]
            if bad or not vals:
                raise ConfigError(f"invalid {name} {bad or vals!r}; allowed: {', '.join(allowed)}")
        if self.repeats < 1 or self.warmup < 0:
            raise ConfigError("repeats must be ≥ 1 and warmup ≥ 0")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError("rounds must be ≥ 1")
        if self.noise is not None and not self.noise > 0:
            raise ConfigError(f"noise sigma must be > 0, got {self.noise}")
        if self.calibration is not None and not all(
                self.calibration.get(k, 0) > 0 for k in ("conv_gflops", "mem_gbps")):
            raise ConfigError("a calibration needs positive conv_gflops and mem_gbps")
        if any(s < 1 for s in self.input_sizes) or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("input sizes and batch sizes must be positive")
        if not self.models:
            raise ConfigError("no model given")
        if self.speed_ratio <= 0:
            raise ConfigError(f"speed ratio must be > 0, got {self.speed_ratio}")
        self.split_options()

    def split_options(self, mode: str = "asym", backward: str = "protected", **overrides: Any) -> SplitOptions:
        """The :class:`SplitOptions` of one mode instance: this config's split fields, ``mode``,
        ``backward``, the placement (asym / noise-only, when set), then ``overrides``."""
        kw: dict[str, Any] = {f.metadata["split_option"]: getattr(self, f.name) for f in dataclasses.fields(self)
                              if "split_option" in f.metadata}
        kw.update(mode=mode, backward=backward)
        if self.placement is not None and mode in ("asym", "noise-only"):
            kw["placement"] = self.placement
        kw.update(overrides)
        return SplitOptions(**kw)

    def n_rounds(self) -> int:
        """Paired rounds: ``rounds``, or at least ``max(MIN_ROUNDS, repeats)`` by default (the runner adds rounds,
        up to :data:`MAX_AUTO_ROUNDS`, while a phase's paired steps stay within :data:`ROUND_BUDGET_S`, timed
        on the warm-up round)."""
        return self.rounds if self.rounds is not None else max(MIN_ROUNDS, self.repeats)

    def serialized(self, device: str) -> bool:
        """Whether timed steps are serialized: as asked, else whenever the accelerator is the CPU."""
        return self.serialize if self.serialize is not None else device == "cpu"


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
            raise ConfigError(f"unknown CIFAR-style model {base!r}; known: {', '.join(MODELS)}")
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

    def __init__(self, pool: Any, on_wait: Callable[[float], None] | None = None) -> None:
        self.pool = pool
        self.pending: list[tuple[Callable[[], Any], _DeferredFuture]] = []
        self.lock = threading.Lock()
        self.on_wait = on_wait  # told how long each wait on the real worker took (blocked time)

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        fut = _DeferredFuture(self)
        with self.lock:
            self.pending.append((functools.partial(fn, *args, **kwargs), fut))
        return fut

    def flush(self) -> None:
        with self.lock:
            jobs, self.pending = self.pending, []
        for fn, fut in jobs:
            t0 = time.perf_counter()
            try:
                res = self.pool.submit(fn).result()
            except BaseException as e:  # handed to the waiting caller
                self._waited(t0)
                fut.set_exception(e)
            else:
                self._waited(t0)
                fut.set_result(res)  # callbacks (e.g. result checks) run here, in the waiting thread

    def _waited(self, t0: float) -> None:
        if self.on_wait is not None:
            self.on_wait(time.perf_counter() - t0)

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        self.flush()
        self.pool.shutdown(wait=wait, **kwargs)


class _TimedFuture(Future):
    """The bench's own view of an accelerator job: a future chained to the executor's that times every wait of
    the trusted (stepping) thread on it, and hands the result, once delivered, to the active instruments (the
    trusted memory meter and the op counter: accelerator results held by the trusted side are trusted memory)."""

    def __init__(self, inner: Future, owner: _BenchExecutor) -> None:
        super().__init__()
        self._inner = inner
        self._owner = owner
        self._delivered = False
        inner.add_done_callback(self._copy)

    def _copy(self, f: Future) -> None:
        # the inner future's callback list holds this method (and so this future): forgetting the inner one
        # breaks the reference cycle, so a delivered result is freed with the last reference to it rather than
        # at the next garbage collection (which held every layer's result alive and inflated trusted peaks)
        self._inner = None
        if f.cancelled():
            self.cancel()
            self.set_running_or_notify_cancel()
            return
        e = f.exception()
        if e is not None:
            self.set_exception(e)
        else:
            self.set_result(f.result())

    def _wait(self, timeout: float | None) -> None:
        pool = self._owner._pool
        if isinstance(pool, _DeferredPool):
            # serialized: run the pending jobs now; the pool reports only its waits on the worker as blocked
            # time, so what runs in this thread around them (result checks in done-callbacks) stays trusted time
            pool.flush()
        t0 = time.perf_counter()
        try:
            inner = self._inner
            try:
                if inner is not None:
                    inner.result(timeout)
            except BaseException:  # re-raised by the caller's own result()/exception()
                pass
            super().exception(timeout)  # the chained copy is set right after the inner one
        finally:
            self._owner._waited(time.perf_counter() - t0)

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        res = super().result(0)
        if not self._delivered:
            self._delivered = True
            self._owner._received(res)
        return res

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return super().exception(0)


class _BenchExecutor(LocalExecutor):
    """A :class:`LocalExecutor` as the bench needs it: released tensors are public for the active trusted
    memory meter (they live outside the enclave once handed over); jobs can be deferred (serialized
    measurement); every job's future is wrapped (:class:`_TimedFuture`) so that the bench measures the time
    the trusted thread is blocked, the number of round trips and the bytes it receives."""

    def __init__(self, device: str, serialize: bool = False) -> None:
        super().__init__(device)
        if not hasattr(self, "_pool"):
            raise RuntimeError("LocalExecutor has no _pool: the bench cannot serialize its jobs")
        self._real_pool = self._pool
        self.step_thread: int | None = None
        self.instruments: tuple[Any, ...] = ()
        self.reset_counters()
        self.serialize(serialize)

    def reset_counters(self) -> None:
        """Zero the per-step counters (blocked time, round trips, received bytes)."""
        self.blocked_s = 0.0
        self.round_trips = 0
        self.received_bytes = 0

    def serialize(self, on: bool) -> None:
        """Run accelerator jobs only when the trusted side waits for them (no overlap) — or concurrently."""
        if isinstance(self._pool, _DeferredPool):
            self._pool.flush()
        self._pool = _DeferredPool(self._real_pool, self._waited) if on else self._real_pool

    def _waited(self, dt: float) -> None:
        if threading.get_ident() == self.step_thread:
            self.blocked_s += dt

    def _received(self, res: Any) -> None:
        flat, _ = tree_flatten(res)
        tensors = [t for t in flat if isinstance(t, Tensor)]
        self.received_bytes += sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")
        if threading.get_ident() != self.step_thread:
            return
        for inst in self.instruments:
            if isinstance(inst, TrustedMemoryMeter):
                for t in tensors:
                    inst.add(t)
            elif isinstance(inst, TrustedOpCounter):
                inst.touch_external(tensors)

    def release(self, tensor: Tensor, *, layer: str, kind: str) -> Handle:
        meter = TrustedMemoryMeter.active()
        if meter is not None:
            meter.mark_public(tensor)
        return super().release(tensor, layer=layer, kind=kind)

    def forward(self, *args: Any, **kwargs: Any) -> Future:
        self.round_trips += 1
        return _TimedFuture(super().forward(*args, **kwargs), self)

    def backward(self, *args: Any, **kwargs: Any) -> Future:
        self.round_trips += 1
        return _TimedFuture(super().backward(*args, **kwargs), self)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator device {device!r} requested but CUDA is not available")
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


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: str) -> dict[str, Any]:
    """Machine and thread settings the figures were measured with (load average taken now)."""
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(), "accelerator": device,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc_heap_reuse": _env.MALLOC_TUNED,  # large blocks reused from the heap (asymml._env)
        "loadavg_1min": _loadavg(), "cpu_clock_hz": cpu_clock_hz(),
    }
    if device.startswith("cuda"):
        env["cuda_device"] = torch.cuda.get_device_name(torch.device(device))
    return env


def machine_busy(load_before: float | None, load_after: float | None, cpus: int | None, threads: int) -> bool:
    """Whether other work competed for the CPUs: the 1-minute load before the run exceeded the core count,
    or after it exceeded the core count plus the bench's own threads (the run's own load)."""
    if cpus is None:
        return False
    return bool((load_before is not None and load_before > cpus)
                or (load_after is not None and load_after > cpus + threads))


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
    variant: str | None = None  # None, "verify" or "noise"
    samples: dict[str, list[Any]] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)  # ranks / released bytes of every timed step
    persist: Any = None  # memory meter run over the warm-up steps (what survives a step)

    @property
    def paired(self) -> bool:
        return self.mode in ("trusted-only", "asym")


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _planner_decisions(sm: Any) -> dict[str, dict[str, Any]] | None:
    """The cost-aware planner's last decision per layer, with what its trial measured (seconds)."""
    planner = getattr(sm, "planner", None)
    return None if planner is None else planner.decisions()


def _ranks(sm: Any) -> dict[str, Any] | None:
    """Rank of every decomposition point of the last forward (None if the runtime does not report them)."""
    rs = getattr(sm, "release_stats", None)
    if rs is None:
        return None
    try:
        return {k: (None if v.get("rank") is None else int(v["rank"])) for k, v in rs().items()}
    except (TypeError, AttributeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- runner


class BenchRunner:
    """Measures one configuration; :func:`run_bench` loops over models, sizes and batch sizes."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None] | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.serialize = cfg.serialized(self.device)
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.calibration = cfg.calibration
        self.notes: list[str] = []
        self.rounds_run: dict[str, int] = {}
        self.clock_hz = cpu_clock_hz() or 3.0e9

    def calibrate(self) -> dict[str, Any]:
        """The roofline rates: measured once per runner (a few tenths of a second) unless given."""
        if self.calibration is None:
            self.calibration = calibrate()
            c = self.calibration
            self.log(f"[bench] calibrated: dense conv {c['conv_gflops']:.0f} GFLOP/s (NCHW "
                     f"{c['conv_gflops_nchw']:.0f}, channels_last {c['conv_gflops_channels_last']:.0f}), "
                     f"memory pass {c['mem_gbps']:.1f} GB/s, Gaussian RNG {c['rng_gsamples'] * 1e3:.0f} M samples/s, "
                     f"{c['threads']} threads")
        return self.calibration

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
        if "asym" in cfg.modes:
            b0 = cfg.backwards[0]
            if cfg.verify:
                e = self._entry(model, "asym", b0, variant="verify")
                if e is not None:
                    # the same placement as the asym instance it is compared with (its planner's decisions,
                    # piloted on that instance alone): the overhead is the checks', not a different plan's
                    base = next(a for a in out if a.mode == "asym" and a.backward == b0 and a.variant is None)
                    e.sm.planner = FollowingPlanner(base.sm.planner)
                    out.append(e)
            if cfg.noise is not None:
                out.append(self._entry(model, "asym", b0, variant="noise"))
        return out

    def _entry(self, model: nn.Module, mode: str, backward: str | None, variant: str | None = None) -> Any:
        cfg = self.cfg
        on_cuda = mode == "plain" and self.cuda
        m = copy.deepcopy(model).to(self.device) if on_cuda else model
        noise: Any = None
        if mode == "noise-only":
            noise = {"sigma": cfg.noise_sigma, "clip": cfg.clip}
        elif variant == "noise":
            noise = {"sigma": cfg.noise, "clip": cfg.clip}
        elif mode == "asym" and cfg.asym_sigma is not None:
            noise = {"sigma": cfg.asym_sigma, "clip": cfg.clip}
        if noise is not None and coupling_layers(m, training=True):
            # a noised release must depend on one sample only: the noised modes run the same model with
            # GroupNorm in place of BatchNorm (asymml.fix(privacy=True)), as a noised user run must
            m = fix(copy.deepcopy(model), privacy=True)
            msg = "noised modes run with GroupNorm in place of BatchNorm (per-sample sensitivity)"
            if msg not in self.notes:
                self.notes.append(msg)
        ex = _BenchExecutor(self.device if mode != "trusted-only" else "cpu", serialize=self.serialize)
        options = cfg.split_options(mode, backward or "protected", **({"verify": True} if variant == "verify" else {}))
        sm = split_with_options(m, options, noise=noise, executor=ex)
        opt = torch.optim.SGD(m.parameters(), lr=1e-4) if cfg.optimizer_step else None
        label = mode if backward is None or mode != "asym" else f"{mode}/{backward}"
        if variant:
            label += f"+{variant}"
        return _Entry(label, mode, backward, sm, m, opt, on_cuda, variant)

    # ------------------------------------------------------------------ one step
    def _step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> None:
        ex = e.sm.executor
        if isinstance(ex, _BenchExecutor):
            ex.step_thread = threading.get_ident()
            ex.reset_counters()
        if phase == "train":
            # --micro-batch m: forward+backward per micro-batch, gradients accumulated (asymml.microbatch), one
            # optimizer step; every trusted mode alike (the split options carry it), plain on the whole batch
            mb = self.cfg.micro_batch if e.mode != "plain" else len(x)  # (plain: never micro-batched)
            accumulate(e.sm, x, y, F.cross_entropy, micro_batch=mb)
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
        mech = getattr(sm, "mechanism", None)
        noise_stats = getattr(mech, "noise_stats", None)
        if noise_stats is not None:
            mech.reset_noise_stats()
        verifier = getattr(sm.executor, "verifier", None)
        if verifier is not None:
            verifier.reset_stats()
        t0 = time.perf_counter()
        self._step(e, phase, x, y)
        wall = time.perf_counter() - t0
        ex = sm.executor
        stats = ex.stats()
        accel = sum(v for d in stats.values() for k, v in d.items() if k.endswith("_s"))
        rec: dict[str, Any] = {"step_s": wall}
        breakdown: dict[str, float] = {}
        if e.mode == "plain":
            rec.update(trusted_s=0.0, accelerator_s=wall, blocked_s=0.0)
        elif e.mode == "trusted-only":
            rec.update(trusted_s=wall, accelerator_s=0.0, blocked_s=0.0)
            try:
                fwd = sum(lp.trusted_s.get("forward", 0.0) for lp in sm.profile().layers)
                breakdown = {"forward_s": fwd, "loss_backward_other_s": wall - fwd}
            except AttributeError:
                pass
        else:
            blocked = ex.blocked_s if isinstance(ex, _BenchExecutor) else sm.profile().blocked_s
            trusted = wall - blocked
            rec.update(trusted_s=trusted, accelerator_s=accel, blocked_s=blocked)
            try:
                prof = sm.profile()
                rec["runtime_blocked_s"] = prof.blocked_s
                dec = sum(lp.decompose_s for lp in prof.layers)
                sf = sum(lp.trusted_s.get("forward", 0.0) for lp in prof.layers if lp.kind == "split")
                sb = sum(lp.trusted_s.get("backward", 0.0) for lp in prof.layers if lp.kind == "split")
                tf = sum(lp.trusted_s.get("forward", 0.0) for lp in prof.layers if lp.kind == "trusted")
                # layers the planner kept trusted (run as plain ops, forward and backward)
                kept = [lp for lp in prof.layers if lp.kind == "trusted (planner)"]
                kf = sum(lp.trusted_s.get("forward", 0.0) for lp in kept)
                kb = sum(lp.trusted_s.get("backward", 0.0) for lp in kept)
                breakdown = {"decompose_s": dec, "split_forward_s": sf - dec, "split_backward_s": sb,
                             "trusted_ops_forward_s": tf, "planner_trusted_s": kf + kb,
                             "other_s": trusted - sf - sb - tf - kf - kb}
                if self.cfg.layers:
                    rec["layers"] = prof.to_dict()["layers"]
            except AttributeError:
                pass
        kinds = dict(ex.ledger.bytes_by_kind)
        rec["released_by_kind"] = kinds
        rec["released_bytes"] = sum(v for k, v in kinds.items() if k != "weight")
        rec["released_weight_bytes"] = kinds.get("weight", 0)
        rec["ranks"] = _ranks(sm) if e.mode in ("asym", "noise-only") else None
        if isinstance(ex, _BenchExecutor):
            rec["round_trips"] = ex.round_trips
            rec["received_bytes"] = ex.received_bytes
        rec["breakdown"] = breakdown
        if noise_stats is not None:
            # noise generated ahead on the mechanism's prefetch thread (while the trusted side waits for the
            # accelerator) is not trusted critical-path time, but it is trusted CPU time: reported here
            rec["noise"] = noise_stats()
        if verifier is not None:  # settings, detection probability per job, checks run and their seconds
            rec["verify"] = verifier.summary()
        return rec

    def _instrumented_step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> dict[str, Any]:
        _zero_grads(e.model)
        sm = e.sm
        sm.reset_profile()
        sm.executor.set_profiling(True)
        meter = AliasAwareMemoryMeter()
        persistent = 0
        weights_in_epc = self.cfg.sgx_weights_in_epc
        if e.persist is not None:
            gc.collect()
            for st in e.persist.live_storages():
                meter.add_storage(st)
            if weights_in_epc:  # weight re-layouts are model state: in the EPC with the parameters
                for st in public_state_storages():
                    meter.add_storage(st)
            persistent = meter.current
        cal = self.calibrate()
        skip = set()
        if not weights_in_epc:  # parameters, buffers and their re-layouts are public: outside the EPC
            skip = {t.untyped_storage().data_ptr() for t in itertools.chain(e.model.parameters(), e.model.buffers())}
            skip.update(st.data_ptr() for st in public_state_storages())
        counter = TrustedOpCounter(cal["conv_gflops"], cal["mem_gbps"], rng_gsamples=cal.get("rng_gsamples"),
                                   skip_storages=skip)
        ex = sm.executor
        mech = getattr(sm, "mechanism", None)
        if hasattr(mech, "reset_noise_stats"):
            mech.reset_noise_stats()
        try:
            if isinstance(ex, _BenchExecutor):
                ex.instruments = (meter, counter)
            with group_aware_registry(), flop_counter() as fc:
                with meter:
                    meter.add(x)
                    with counter:
                        self._step(e, phase, x, y)
        finally:
            sm.executor.set_profiling(False)
            if isinstance(ex, _BenchExecutor):
                ex.instruments = ()
        counter.trace_on = False
        trace, counter.trace = counter.trace, []  # finalizers keep the counter alive: it must not keep the trace
        flops = int(fc.get_total_flops())
        stats = sm.executor.stats()
        accel_flops = int(sum(v for d in stats.values() for k, v in d.items() if k.endswith("_flops")))
        kinds = dict(ex.ledger.bytes_by_kind)
        check = {"released_bytes": sum(v for k, v in kinds.items() if k != "weight"),
                 "ranks": _ranks(sm) if e.mode in ("asym", "noise-only") else None}
        if e.mode == "plain":
            return {"trusted_flops": 0, "accelerator_flops": flops, "counted_flops": flops,
                    "trusted_peak_bytes": 0, "persistent_bytes": 0, "roofline": None, "trace": [],
                    "check": check, "round_trips": 0, "received_bytes": 0}
        # the noise mechanism's prefetch buffers are trusted memory allocated on its own thread (which the
        # meter does not see): counted on top of the step's peak, as if they were all live at its peak
        noise_buffers = mech.noise_stats()["peak_buffer_bytes"] if hasattr(mech, "noise_stats") else 0
        return {"trusted_flops": flops, "accelerator_flops": accel_flops, "counted_flops": flops,
                "trusted_peak_bytes": int(meter.peak) + int(noise_buffers), "noise_buffer_bytes": int(noise_buffers),
                "persistent_bytes": int(persistent),
                "roofline": counter.summary(), "trace": trace, "check": check,
                "round_trips": getattr(ex, "round_trips", 0), "received_bytes": getattr(ex, "received_bytes", 0)}

    def _attributed_step(self, e: _Entry, phase: str, x: Tensor, y: Tensor) -> dict[str, Any]:
        from .attribution import attribute

        _zero_grads(e.model)
        e.sm.reset_profile()
        att = attribute(lambda: self._step(e, phase, x, y))
        wall = att["step_wall_s"]
        ex = e.sm.executor
        blocked = 0.0 if e.mode == "trusted-only" else getattr(ex, "blocked_s", e.sm.profile().blocked_s)
        att["profiled_trusted_s"] = wall - blocked
        return att

    def _conv_ranks(self, e: _Entry) -> dict[str, int | None] | None:
        """Rank of the decomposed input of every conv (by module name) in the last step's plan (None when the
        runtime's plan does not expose it)."""
        try:
            ranks: dict[str, int | None] = {}
            prof = {lp.layer: lp.rank for lp in e.sm.profile().layers}
            for reg in e.sm.plan().regions:
                r = prof.get(reg.name)
                for n in reg.nodes:
                    if isinstance(reg.bound[n].module, nn.Conv2d):
                        a = reg.arg_nodes(n)[0]
                        ranks[str(n.target)] = r if a in reg.decompose else None
            return ranks
        except (AttributeError, IndexError, TypeError):
            return None

    # ------------------------------------------------------------------ one configuration
    def _batch(self, gen: torch.Generator, batch: int, size: int, nc: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(batch, self.cfg.in_channels, size, size, generator=gen)
        return x, torch.randint(0, nc, (batch,), generator=gen)

    def run_config(self, name: str, size: int, batch: int) -> list[dict[str, Any]]:
        """All modes and phases for one model / input size / batch size."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.calibrate()
        model, arch, base = build_model(name, size, num_classes=cfg.num_classes, width=cfg.width,
                                        in_channels=cfg.in_channels)
        gen = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
        geometry = conv_geometry(model, x)
        with torch.no_grad():
            model.eval()
            nc = int(model(x[:1]).shape[-1])
        meta = {"model": name, "arch": arch, "model_name": base, "input_size": size, "batch_size": batch,
                "model_bytes": sum(t.numel() * t.element_size()
                                   for t in itertools.chain(model.parameters(), model.buffers())),
                "geometry": geometry, "num_classes": nc}
        runs: list[dict[str, Any]] = []
        entries = self._entries(model)
        try:
            for phase in cfg.phases:
                runs.extend(self._run_phase(entries, phase, gen, meta))
        finally:
            for e in entries:
                e.sm.executor.close()
        return runs

    def _run_phase(self, entries: list[_Entry], phase: str, gen: torch.Generator,
                   meta: dict[str, Any]) -> list[dict[str, Any]]:
        cfg = self.cfg
        batch, size, nc = meta["batch_size"], meta["input_size"], meta["num_classes"]
        for m in {id(e.model): e.model for e in entries}.values():
            m.train(phase == "train")
        first_bwd = next((e.backward for e in entries if e.mode == "asym"), None)
        # inference does not depend on the backward mode: one asym instance (and its variants) measures it
        active = [e for e in entries if phase == "train" or e.mode != "asym" or e.backward == first_bwd]
        for e in active:
            e.samples = {"step_s": [], "trusted_s": [], "accelerator_s": [], "blocked_s": [], "round": []}
            e.steps = []
        paired = [e for e in active if e.paired]
        context = [e for e in active if not e.paired]
        # the first and the last warm-up step run under a memory meter: what they create and survives into the
        # instrumented step is persistent trusted state (caches made once, warm-start bases made every step).
        # The steps between run bare: the planner's trial times them (the meter's per-op bookkeeping slows a
        # split, dozens of ops, far more than the one dense op it is compared with; a noised split's
        # chunked noise addition several-fold)
        for e in active:
            e.persist = AliasAwareMemoryMeter() if cfg.warmup > 0 and e.mode != "plain" else None
        if cfg.warmup == 0:
            msg = ("no warm-up: persistent trusted caches created before the instrumented step (weight re-layouts, "
                   "warm-start bases) are not counted in trusted_peak_bytes")
            if msg not in self.notes:
                self.notes.append(msg)
        round_s = context_s = 0.0
        for w in range(cfg.warmup):
            xb, yb = self._batch(gen, batch, size, nc)
            round_s = context_s = 0.0
            for e in active:
                if e.persist is not None and w in (0, cfg.warmup - 1):
                    with e.persist:
                        rec = self._timed_step(e, phase, xb.clone(), yb.clone())
                else:
                    rec = self._timed_step(e, phase, xb.clone(), yb.clone())
                if e.paired:
                    round_s += rec["step_s"]
                else:
                    context_s += rec["step_s"]
        for e in active:
            _zero_grads(e.model)
        rounds = cfg.n_rounds()
        if cfg.rounds is None and round_s > 0:  # cheap models: more rounds, within ROUND_BUDGET_S per phase
            rounds = max(rounds, min(MAX_AUTO_ROUNDS, int(ROUND_BUDGET_S / round_s)))
        self.rounds_run[phase] = rounds
        what = f"{meta['model']} ({meta['arch']}) {size}px batch {batch} {phase}"
        self.log(f"[bench] {what}: warm-up {cfg.warmup}, {rounds} rounds x {len(paired)} paired modes "
                 f"(+ {len(context)} context modes in {min(cfg.repeats, rounds)} rounds), shuffled, fresh batch "
                 f"per round, on {self.device}{', serialized' if self.serialize else ''}"
                 + (f"; about {rounds * round_s + min(cfg.repeats, rounds) * context_s:.0f} s of timed steps "
                    f"(from the warm-up)" if round_s else ""))
        rng = random.Random(cfg.seed * 7919 + len(phase))
        for i in range(rounds):
            xb, yb = self._batch(gen, batch, size, nc)
            order = paired + (context if i < cfg.repeats else [])
            rng.shuffle(order)
            for e in order:
                rec = self._timed_step(e, phase, xb.clone(), yb.clone())
                for k in ("step_s", "trusted_s", "accelerator_s", "blocked_s"):
                    e.samples[k].append(rec[k])
                e.samples["round"].append(i)
                e.steps.append({"released_bytes": rec["released_bytes"], "ranks": rec["ranks"],
                                "round_trips": rec.get("round_trips"), "received_bytes": rec.get("received_bytes")})
                e.last = rec
        counted: dict[str, int] = {}
        instr: dict[str, dict[str, Any]] = {}
        analytic: float | None = None
        xi, yi = self._batch(gen, batch, size, nc)
        for e in active:
            instr[e.label] = self._instrumented_step(e, phase, xi.clone(), yi.clone())
            counted[e.mode] = instr[e.label]["counted_flops"]
            if e.mode == "asym" and analytic is None:
                ranks = self._conv_ranks(e)
                analytic = None if ranks is None else analytic_fwd_conv_limit(meta["geometry"], ranks)
        if cfg.attribute:
            for e in active:
                if e.mode != "plain":
                    instr[e.label]["attribution"] = self._attributed_step(e, phase, xi.clone(), yi.clone())
        total = counted.get("plain") or counted.get("trusted-only")
        if total is None:
            cpu_model = next(e.model for e in entries if not e.on_cuda)
            total = self._count_model_flops(cpu_model, phase, xi, yi)
        runs = []
        for e in active:
            r = self._record(e, phase, meta, total, instr[e.label], analytic)
            runs.append(r)
            self.log(f"[bench]   {e.label:<22} step {1e3 * r['step_s']:9.1f} ms  trusted "
                     f"{1e3 * r['trusted_s']:9.1f} ms  accel {1e3 * r['accelerator_s']:9.1f} ms")
            nz = r.get("noise")
            if nz:
                self.log(f"[bench]   {'':<22} noise: {1e3 * nz['critical_s']:.1f} ms on the critical path "
                         f"({1e3 * nz['wait_s']:.1f} waiting), {1e3 * nz['combine_s']:.1f} ms adding, "
                         f"{1e3 * nz['background_s']:.1f} ms generated ahead while the trusted side waited; "
                         f"{nz['hits']} ready, {nz['late']} late, "
                         f"{nz['misses']} inline")
            for w in r["step_checks"]["warnings"]:
                self.log(f"[bench]   WARNING {e.label}: {w}")
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

    @staticmethod
    def _step_checks(e: _Entry, check: Mapping[str, Any]) -> dict[str, Any]:
        """Do all timed steps release the same bytes at the same ranks as the instrumented one (whose FLOPs,
        memory and roofline describe them)?"""
        rel = [s["released_bytes"] for s in e.steps]
        ranks = [s["ranks"] for s in e.steps]
        warnings = []
        rel_ok = all(r == check["released_bytes"] for r in rel)
        ranks_ok = all(r == check["ranks"] for r in ranks)
        if not rel_ok:
            warnings.append(f"released bytes per timed step {sorted(set(rel))} differ from the instrumented "
                            f"step's {check['released_bytes']}")
        if not ranks_ok:
            warnings.append("ranks of the timed steps differ from the instrumented step's (adaptive rank?)")
        return {"released_bytes_per_step": rel, "ranks_per_step": ranks, "instrumented_released_bytes":
                check["released_bytes"], "instrumented_ranks": check["ranks"], "released_match": rel_ok,
                "ranks_match": ranks_ok, "warnings": warnings}

    def _sgx1(self, e: _Entry, trusted_s: float, ins: Mapping[str, Any]) -> dict[str, Any] | None:
        if e.mode == "plain":
            return None
        rel = ins["check"]["released_bytes"] if e.mode != "trusted-only" else 0
        out = sgx1_projection(trusted_s, ins["trace"], round_trips=ins.get("round_trips", 0) or 0,
                              transfer_bytes=rel + (ins.get("received_bytes", 0) or 0),
                              mem_gbps=self.calibrate()["mem_gbps"], clock_hz=self.clock_hz)
        out["weights_in_epc"] = self.cfg.sgx_weights_in_epc
        return out

    def _record(self, e: _Entry, phase: str, meta: dict[str, Any], total: int, ins: dict[str, Any],
                analytic: float | None) -> dict[str, Any]:
        cfg = self.cfg
        timing = {k: v for k, v in e.samples.items() if k != "round"}
        med = {k: statistics.median(v) for k, v in timing.items()}
        split_mode = e.mode in ("asym", "noise-only")
        peak = ins["trusted_peak_bytes"]
        model_bytes = meta["model_bytes"]
        resident = 0 if e.mode == "plain" else peak + model_bytes
        batch = meta["batch_size"]
        roof = ins.get("roofline")
        checks = self._step_checks(e, ins["check"])
        return {
            "model": meta["model"], "arch": meta["arch"], "model_name": meta["model_name"],
            "input_size": meta["input_size"], "batch_size": batch,
            "mode": e.mode, "backward": e.backward if phase == "train" else None,
            "label": e.label, "variant": e.variant, "phase": phase,
            "rank": cfg.rank if split_mode else None,
            "decomposition": cfg.decomposition if e.mode == "asym" else None,
            "accelerator": "cpu" if e.mode == "trusted-only" else self.device,
            "trusted_s": med["trusted_s"], "accelerator_s": med["accelerator_s"], "step_s": med["step_s"],
            "blocked_s": med["blocked_s"],
            "samples_per_s": batch / med["step_s"] if med["step_s"] else None,
            "spread": {k: _spread(v) for k, v in timing.items() if k != "blocked_s"},
            "samples": e.samples, "n_samples": len(e.samples["step_s"]),
            "trusted_flops": ins["trusted_flops"], "accelerator_flops": ins["accelerator_flops"],
            "total_flops": total,
            "trusted_flop_fraction": ins["trusted_flops"] / total if total else None,
            "trusted_peak_bytes": peak, "persistent_bytes": ins.get("persistent_bytes", 0),
            "model_bytes": model_bytes, "trusted_resident_bytes": resident,
            "epc_bytes": cfg.epc_bytes,
            "within_epc": peak <= cfg.epc_bytes, "resident_within_epc": resident <= cfg.epc_bytes,
            "released_bytes": e.last.get("released_bytes", 0),
            "released_weight_bytes": e.last.get("released_weight_bytes", 0),
            "released_by_kind": e.last.get("released_by_kind", {}),
            "round_trips": ins.get("round_trips", 0), "received_bytes": ins.get("received_bytes", 0),
            "runtime_blocked_s": e.last.get("runtime_blocked_s"),
            "breakdown": e.last.get("breakdown", {}),
            "noise": e.last.get("noise"),
            "verify": e.last.get("verify"),
            "roofline_s": None if roof is None else roof["roofline_s"],
            "roofline": roof,
            "roofline_fraction": (None if roof is None or not med["trusted_s"]
                                  else roof["roofline_s"] / med["trusted_s"]),
            "sgx1": self._sgx1(e, med["trusted_s"], ins),
            "step_checks": checks,
            "limit_fwd_conv_analytic": analytic if e.mode == "asym" else None,
            "planner": _planner_decisions(e.sm) if e.mode == "asym" else None,
            "repeats": cfg.repeats, "rounds": self.rounds_run.get(phase, cfg.n_rounds()), "warmup": cfg.warmup,
            "serialized": self.serialize, "optimizer_step": cfg.optimizer_step and phase == "train",
            **({"layers": e.last["layers"]} if "layers" in e.last else {}),
            **({"attribution": ins["attribution"]} if "attribution" in ins else {}),
        }


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every configuration; returns ``{"config", "environment", "definitions", "runs", "derived",
    "warnings"}``."""
    from .derived import DEFINITIONS, derive

    runner = BenchRunner(cfg, log)
    env = environment(runner.device)
    runs: list[dict[str, Any]] = []
    for name in cfg.models:
        for size in cfg.input_sizes:
            for batch in cfg.batch_sizes:
                runs.extend(runner.run_config(name, size, batch))
    env["loadavg_before"] = env.pop("loadavg_1min")
    env["loadavg_after"] = _loadavg()
    env["torch_threads_after"] = torch.get_num_threads()
    env["serialized"] = runner.serialize
    env["busy"] = machine_busy(env["loadavg_before"], env["loadavg_after"], env["cpu_count"],
                               env["torch_threads"])
    env["roofline_calibration"] = runner.calibrate()
    env["sgx1_constants"] = SGX1
    warnings = list(runner.notes)
    if env["busy"]:
        warnings.append(f"machine busy: 1-min load {env['loadavg_before']} before / {env['loadavg_after']} after "
                        f"on {env['cpu_count']} CPUs; timings include contention")
    for r in runs:
        warnings += [f"{r['model']} {r['phase']} {r['label']}: {w}" for w in r["step_checks"]["warnings"]]
    for w in warnings:
        runner.log(f"[bench] WARNING: {w}")
    return {
        "config": asdict(cfg),
        "environment": env,
        "definitions": DEFINITIONS,
        "runs": runs,
        "derived": derive(runs, cfg.speed_ratio, bootstrap=cfg.bootstrap, seed=cfg.seed),
        "warnings": warnings,
    }
