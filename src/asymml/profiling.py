"""Profiling: FLOPs (``torch.utils.flop_counter`` plus formulas for the decompositions it does not count),
trusted peak memory (a dispatch-mode meter of live trusted tensors), and per-layer reports."""

from __future__ import annotations

import json
import threading
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, flop_registry, register_flop_formula, shape_wrapper

EPC_DEFAULT_BYTES = 128 * 2**20  # SGX1 client parts

# storages that hold public model state derived from public weights alone (weight re-layouts cached by the
# split rules): public like the parameters they are computed from, so they count where parameters count
_PUBLIC_STATE: weakref.WeakValueDictionary[int, torch.UntypedStorage] = weakref.WeakValueDictionary()


def public_state(t: Tensor) -> Tensor:
    """Register ``t`` (a re-layout of public weights, nothing private in it) as public model state: the
    active trusted memory meter stops counting it, and the bench places it where it places the parameters
    (outside the EPC unless ``--sgx-weights-in-epc``). Returns ``t``."""
    st = t.untyped_storage()
    _PUBLIC_STATE[st.data_ptr()] = st
    meter = TrustedMemoryMeter.active()
    if meter is not None:
        meter.mark_public(t)
    return t


def public_state_storages() -> list[torch.UntypedStorage]:
    """The live storages registered by :func:`public_state`."""
    return list(_PUBLIC_STATE.values())


# ------------------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode counts matmuls and convolutions; the trusted side also runs QR, eigh and SVD. Standard
# LAPACK operation counts (Golub & Van Loan), counted as 2 FLOPs per multiply-add like the rest.


def _batch(shape: Any) -> int:
    n = 1
    for s in shape[:-2]:
        n *= s
    return n


@register_flop_formula(torch.ops.aten.linalg_qr)
def _qr_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = a_shape[-2], a_shape[-1]
    k = min(m, n)
    return _batch(a_shape) * int(2 * m * n * k - 2 * k**3 / 3 + 2 * m * n * k)  # factor + form Q


@register_flop_formula(torch.ops.aten._linalg_eigh)
def _eigh_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return _batch(a_shape) * 9 * n**3


@register_flop_formula(torch.ops.aten._linalg_svd)
def _svd_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    m, n = max(a_shape[-2:]), min(a_shape[-2:])
    return _batch(a_shape) * (4 * m * n * n + 8 * n**3)


@register_flop_formula(torch.ops.aten.linalg_cholesky_ex)
def _cholesky_flop(a_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return _batch(a_shape) * (n**3 // 3)  # n³/6 multiply-adds (Golub & Van Loan, Alg. 4.2.1)


@register_flop_formula(torch.ops.aten.linalg_solve_triangular)
def _trsm_flop(a_shape, b_shape, *args, out_shape=None, left: bool = True, **kwargs) -> int:
    # solving A X = B (left) or X A = B with A triangular n×n and k right-hand sides: n²k/2 multiply-adds
    n = a_shape[-1]
    k = b_shape[-1] if left else b_shape[-2]
    return max(_batch(a_shape), _batch(b_shape)) * n * n * k


@register_flop_formula(torch.ops.aten.triangular_solve)
def _triangular_solve_flop(b_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return max(_batch(a_shape), _batch(b_shape)) * n * n * b_shape[-1]


@register_flop_formula(torch.ops.aten.cholesky_solve)
def _cholesky_solve_flop(b_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    n = a_shape[-1]
    return max(_batch(a_shape), _batch(b_shape)) * 2 * n * n * b_shape[-1]  # two triangular solves


def _t(shape: Any) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flop(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any,
                       _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, groups: int,
                       output_mask: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward`` (grad input + grad weight), correct for ``groups > 1``.

    torch's stock formula ignores ``groups`` in the weight-gradient term; the trusted side runs per-sample
    folded convolutions as one grouped convolution with ``groups = batch``, so it would over-count ×B."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        gw = out_shape[1]
        if transposed:
            n = conv_flop_count(_t(grad_out_shape), _t(x_shape), _t(gw), transposed=False)
        else:
            n = conv_flop_count(_t(x_shape), _t(grad_out_shape), _t(gw), transposed=False)
        flops += n // max(1, int(groups))
    return flops


flop_registry[torch.ops.aten.convolution_backward] = shape_wrapper(conv_backward_flop)
# the in-place GEMMs the runtime uses (the residual written over X, conv(L) accumulated into conv(R)) are
# separate overloads that torch's counter has no formula for: same arithmetic as the out-of-place ones
for _inplace, _outplace in ((torch.ops.aten.baddbmm_, torch.ops.aten.baddbmm),
                            (torch.ops.aten.addmm_, torch.ops.aten.addmm)):
    flop_registry.setdefault(_inplace, flop_registry[_outplace])


def count_flops(fn, *args, **kwargs) -> tuple[Any, int]:
    """Run ``fn`` under a FlopCounterMode and return ``(result, flops)``."""
    with FlopCounterMode(display=False) as fc:
        out = fn(*args, **kwargs)
    return out, fc.get_total_flops()


# ------------------------------------------------------------------------------------- memory meter


class TrustedMemoryMeter(TorchDispatchMode):
    """Peak bytes of live tensors created in the trusted context (the thread that enters the meter).

    Every op output's storage is tracked until it is freed. Tensors handed to the accelerator are public
    and may live outside the enclave: :meth:`mark_public` removes them from the count. Parameters and
    their gradients are model state, counted only if created under the meter.
    """

    _active: threading.local = threading.local()

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._public: set[int] = set()
        self._refs: dict[int, weakref.ref] = {}

    def _track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_meta:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        self.add_storage(st)

    def add_storage(self, st: torch.UntypedStorage) -> None:
        """Count a (CPU) storage until it is freed: e.g. a persistent cache created before the meter."""
        key = st.data_ptr()
        if key == 0 or key in self.live or key in self._public or st.device.type != "cpu":
            return
        nbytes = st.nbytes()
        self.live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._refs[key] = weakref.ref(st)
        weakref.finalize(st, self._free, key)

    def live_storages(self) -> list[torch.UntypedStorage]:
        """The storages this meter counts that are still alive (what survived the metered steps: persistent
        caches such as weight re-layouts and warm-start bases, when metered over whole steps)."""
        out = []
        for key in list(self.live):
            ref = self._refs.get(key)
            st = None if ref is None else ref()
            if st is not None:
                out.append(st)
        return out

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n
        self._public.discard(key)
        self._refs.pop(key, None)

    def add(self, t: torch.Tensor) -> None:
        """Count a tensor created outside the meter (e.g. the input batch)."""
        self._track(t)

    def mark_public(self, t: torch.Tensor) -> None:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n
        self._public.add(key)

    @staticmethod
    def _key(t: Any) -> int:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return 0
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in, _ = tree_flatten((args, kwargs or {}))
        aliased = {k for k in map(self._key, flat_in) if k}  # views and in-place results are not allocations
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if self._key(t) not in aliased:
                self._track(t)
        return out

    def __enter__(self):
        TrustedMemoryMeter._active.meter = self
        return super().__enter__()

    def __exit__(self, *exc):
        TrustedMemoryMeter._active.meter = None
        return super().__exit__(*exc)

    @classmethod
    def active(cls) -> TrustedMemoryMeter | None:
        return getattr(cls._active, "meter", None)


# ------------------------------------------------------------------------------------------ reports


@dataclass
class LayerProfile:
    layer: str
    kind: str  # "split" | "trusted"
    trusted_s: dict[str, float] = field(default_factory=dict)
    accelerator_s: dict[str, float] = field(default_factory=dict)
    trusted_flops: int = 0
    accelerator_flops: int = 0
    decompose_s: float = 0.0
    rank: int | None = None
    energy_ratio: float | None = None


@dataclass
class Profile:
    """Per-layer trusted/accelerator time and FLOPs, trusted peak memory against the EPC budget."""

    layers: list[LayerProfile]
    trusted_peak_bytes: int | None
    epc_bytes: int
    released_bytes: dict[str, int]
    blocked_s: float
    counted: bool = True  # FLOPs and trusted memory were counted (sm.set_profiling(True) before the run)

    @property
    def total(self) -> dict[str, float]:
        t = {"trusted_s": 0.0, "accelerator_s": 0.0, "trusted_flops": 0, "accelerator_flops": 0,
             "decompose_s": 0.0}
        for lp in self.layers:
            t["trusted_s"] += sum(lp.trusted_s.values())
            t["accelerator_s"] += sum(lp.accelerator_s.values())
            t["trusted_flops"] += lp.trusted_flops
            t["accelerator_flops"] += lp.accelerator_flops
            t["decompose_s"] += lp.decompose_s
        tf, af = t["trusted_flops"], t["accelerator_flops"]
        t["trusted_flop_fraction"] = tf / (tf + af) if tf + af else 0.0
        return t

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [vars(lp) for lp in self.layers],
            "total": self.total,
            "trusted_peak_bytes": self.trusted_peak_bytes,
            "epc_bytes": self.epc_bytes,
            "within_epc": None if self.trusted_peak_bytes is None else self.trusted_peak_bytes <= self.epc_bytes,
            "released_bytes": self.released_bytes,
            "blocked_s": self.blocked_s,
            "counted": self.counted,
        }

    def __getitem__(self, k: str) -> Any:  # dict-style access for convenience
        return self.to_dict()[k]

    def table(self) -> str:
        rows = ["| layer | where | rank | R energy | trusted ms | accel ms | trusted MFLOP | accel MFLOP |",
                "|---|---|---|---|---|---|---|---|"]
        for lp in self.layers:
            rows.append(
                f"| {lp.layer} | {lp.kind} | {'' if lp.rank is None else lp.rank} | "
                f"{'' if lp.energy_ratio is None else f'{lp.energy_ratio:.3f}'} | "
                f"{1e3 * sum(lp.trusted_s.values()):.2f} | {1e3 * sum(lp.accelerator_s.values()):.2f} | "
                f"{lp.trusted_flops / 1e6:.1f} | {lp.accelerator_flops / 1e6:.1f} |"
            )
        t = self.total
        rows.append(f"| **total** | | | | {1e3 * t['trusted_s']:.2f} | {1e3 * t['accelerator_s']:.2f} | "
                    f"{t['trusted_flops'] / 1e6:.1f} | {t['accelerator_flops'] / 1e6:.1f} |")
        if self.trusted_peak_bytes is not None:
            rows.append(f"\ntrusted peak {self.trusted_peak_bytes / 2**20:.1f} MiB of EPC {self.epc_bytes / 2**20:.0f} MiB")
        if not self.counted:
            rows.append("\nFLOPs and trusted peak memory were not counted: call sm.set_profiling(True) before the "
                        "run (it adds counting overhead, so timings are best taken without it)")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()

    def json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float)


# ------------------------------------------------------------------------------- runtime observers
# The runtime reports what it does to one Recorder (its own bookkeeping: per-layer times, FLOPs and the
# trusted memory meter when counting is on, release statistics) and the Recorder tells any attached
# RuntimeObserver. The algorithm code opens spans; it never reads a clock or a counter itself.

#: ``torch.profiler.record_function`` labels the runtime opens while a torch profiler is running
#: (and only then): what :mod:`asymml.bench.attribution` charges each aten op to.
LABELS: dict[str, str] = {
    "decompose": "asymml::decompose",
    "decomposed": "asymml::decomposed",
    "release": "asymml::release",
    "trusted_op": "asymml::trusted_op",
    "region.forward": "asymml::region.forward",
    "region.backward": "asymml::region.backward",
    "conv.trusted_forward": "asymml::conv.trusted_forward",
    "conv.input_grad": "asymml::conv.input_grad",
    "conv.param_grads": "asymml::conv.param_grads",
    "rule.trusted_forward": "asymml::rule.trusted_forward",
    "rule.input_grad": "asymml::rule.input_grad",
    "rule.param_grads": "asymml::rule.param_grads",
}

_NULL = nullcontext()  # reusable: what a span costs when nobody looks
_profiler_on = torch.autograd._profiler_enabled  # one C call (~0.1 µs)


class RuntimeObserver:
    """What the split runtime tells an observer (attach with :meth:`asymml.SplitModule.add_observer`).

    Every method is a no-op here; override the ones you need. Times are trusted-side seconds, without the
    time the trusted thread was blocked on the accelerator."""

    def region(self, phase: str, layer: str, seconds: float) -> None:
        """A split region ran its ``phase`` (``"forward"`` or ``"backward"``)."""

    def trusted_op(self, layer: str, seconds: float) -> None:
        """A graph node ran in the trusted context (a non-linear op, or a layer kept trusted)."""

    def split_point(self, layer: str, rank: int, energy_ratio: Tensor) -> None:
        """An activation was split at ``rank`` (full rank: kept trusted, nothing released)."""

    def released(self, tensor: Tensor, layer: str, kind: str) -> None:
        """``tensor`` (after clipping and noise) was handed to the executor."""


class _Timed:
    """A span that adds its elapsed trusted time (without blocked waits) to a layer's profile."""

    __slots__ = ("rec", "layer", "kind", "phase", "label", "count", "meter", "t0", "blocked", "elapsed", "_fc",
                 "_lp")

    def __init__(self, rec: Recorder, layer: str, kind: str, phase: str, label: str | None, count: bool,
                 meter: bool) -> None:
        self.rec, self.layer, self.kind, self.phase, self.label = rec, layer, kind, phase, label
        self.count, self.meter = count, meter
        self.blocked = 0.0
        self.elapsed = 0.0
        self._fc: Any = None

    def __enter__(self) -> _Timed:
        rec = self.rec
        self._lp = rec.layer(self.layer, self.kind)
        if self.label is not None and _profiler_on():
            self.label = torch.profiler.record_function(LABELS[self.label])
            self.label.__enter__()
        else:
            self.label = None
        if self.count and rec.counting:
            self._fc = FlopCounterMode(display=False)
            self._fc.__enter__()
            if self.meter:
                rec.meter.__enter__()
            else:
                self.meter = False
        else:
            self.meter = False
        self.t0 = time.perf_counter()
        return self

    def wait(self, fut: Any) -> Any:
        """``fut.result()``, its wait counted as blocked time (not trusted time)."""
        t0 = time.perf_counter()
        res = fut.result()
        self.blocked += time.perf_counter() - t0
        return res

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        t1 = time.perf_counter()
        rec = self.rec
        if self.meter:
            rec.meter.__exit__(exc_type, exc, tb)
        if self._fc is not None:
            self._fc.__exit__(exc_type, exc, tb)
        if self.label is not None:
            self.label.__exit__(exc_type, exc, tb)
        if exc_type is not None:
            return
        self.elapsed = t1 - self.t0 - self.blocked
        lp = self._lp
        if self.phase == "decompose":
            lp.decompose_s += self.elapsed
            return
        lp.trusted_s[self.phase] = lp.trusted_s.get(self.phase, 0.0) + self.elapsed
        if self._fc is not None:
            lp.trusted_flops += self._fc.get_total_flops()
        rec.blocked_s += self.blocked
        for obs in rec.observers:
            if self.kind == "split":
                obs.region(self.phase, self.layer, self.elapsed)
            else:
                obs.trusted_op(self.layer, self.elapsed)


class _OpTimer:
    """The span of one trusted graph node: its time goes to the layer's trusted forward. One per
    :class:`Recorder`, reused (no allocation per op)."""

    __slots__ = ("rec", "layer", "t0", "label")

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.layer = ""
        self.t0 = 0.0
        self.label: Any = None

    def __enter__(self) -> _OpTimer:
        if _profiler_on():
            self.label = torch.profiler.record_function(LABELS["trusted_op"])
            self.label.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        dt = time.perf_counter() - self.t0
        if self.label is not None:
            self.label.__exit__(exc_type, exc, tb)
            self.label = None
        if exc_type is not None:
            return
        rec = self.rec
        lp = rec.layer(self.layer, "trusted")
        lp.trusted_s["forward"] = lp.trusted_s.get("forward", 0.0) + dt
        for obs in rec.observers:
            obs.trusted_op(self.layer, dt)


class Recorder:
    """The split runtime's bookkeeping, in one place: per-layer trusted times (always; two clock reads a
    span), FLOPs and trusted peak memory (only while counting is on: :meth:`set_counting`), release
    statistics, ``record_function`` labels (only while a torch profiler runs), and the attached
    :class:`RuntimeObserver` objects."""

    def __init__(self) -> None:
        self.layers: dict[str, LayerProfile] = {}
        self.blocked_s = 0.0
        self.counting = False
        self.meter: TrustedMemoryMeter | None = None
        self.release_stats: dict[str, dict[str, Any]] = {}
        self.observers: list[RuntimeObserver] = []
        self._op = _OpTimer(self)

    # ------------------------------------------------------------------ switches
    def set_counting(self, on: bool) -> None:
        """Count FLOPs and trusted memory from now on (costs dispatch overhead) or stop counting."""
        self.counting = on
        if on and self.meter is None:
            self.meter = TrustedMemoryMeter()

    def reset(self) -> None:
        """Forget the per-layer figures (the meter's peak restarts from what is live now)."""
        self.layers.clear()
        self.blocked_s = 0.0
        if self.meter is not None:
            self.meter.peak = self.meter.current

    def layer(self, name: str, kind: str) -> LayerProfile:
        """The profile of layer ``name`` (created with ``kind`` on first use)."""
        lp = self.layers.get(name)
        if lp is None:
            lp = self.layers[name] = LayerProfile(name, kind)
        return lp

    # ------------------------------------------------------------------ spans the runtime opens
    def region(self, layer: str, phase: str) -> _Timed:
        """One split region's ``phase`` (forward / backward): trusted time, FLOPs; in backward also the
        memory meter (forward runs inside :meth:`forward_pass`'s)."""
        return _Timed(self, layer, "split", phase, "region." + phase, True, phase == "backward")

    def whole_model(self) -> _Timed:
        """The model run as is, in the trusted context (trusted-only mode, or nothing split)."""
        return _Timed(self, "model", "trusted", "forward", None, True, True)

    def trusted_op(self, layer: str) -> _OpTimer:
        """One graph node run in the trusted context (one reused span: trusted ops do not nest)."""
        op = self._op
        op.layer = layer
        return op

    def decomposing(self, layer: str) -> _Timed:
        """Decomposition and release of one input of region ``layer`` (its ``decompose_s``)."""
        return _Timed(self, layer, "split", "decompose", None, False, False)

    def forward_pass(self, x: Tensor) -> Any:
        """A split forward: counted by the memory meter (with ``x``) while counting is on."""
        if not self.counting:
            return _NULL
        self.meter.add(x)
        return self.meter

    def label(self, what: str) -> Any:
        """A ``record_function`` label for ``what`` (a key of :data:`LABELS`) while a torch profiler runs,
        else a shared no-op context."""
        return torch.profiler.record_function(LABELS[what]) if _profiler_on() else _NULL

    # ------------------------------------------------------------------ events
    def split_point(self, region: str | None, layer: str, rank: int, energy_ratio: Tensor) -> None:
        """Activation ``layer`` (read by ``region``; ``None``: not a split region) split at ``rank``."""
        self.release_stats[layer] = {"rank": rank, "energy_ratio": energy_ratio}
        if region is not None:
            lp = self.layers.get(region)
            if lp is not None:
                lp.rank = rank
                lp.energy_ratio = float(energy_ratio.mean())
        for obs in self.observers:
            obs.split_point(layer, rank, energy_ratio)

    def released(self, tensor: Tensor, layer: str, kind: str) -> None:
        """``tensor`` went to the executor: it is public from now on and may live outside the enclave, so it
        leaves the trusted memory count (forward residuals and, in backward, gradient residuals or the
        ``paper`` mode's whole gradients alike)."""
        if self.meter is not None:
            self.meter.mark_public(tensor)
        for obs in self.observers:
            obs.released(tensor, layer, kind)

    def kept_trusted(self, region: str) -> None:
        """Region ``region`` ran as plain PyTorch ops (no input split)."""
        lp = self.layers.get(region)
        if lp is not None and lp.kind == "split":
            lp.kind = "trusted"
