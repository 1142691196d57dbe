"""Cost-aware placement: does splitting a layer save trusted time, or should it run fully trusted?

Splitting a convolution replaces its trusted cost ``dense = F / rate_conv`` (``F`` its FLOPs) with the
cost of the split: a decomposition of the input (a Gram matrix on a pixel subsample, three passes over
the activation: norm, ``V = UᵀX``, ``R = X − UV``), the low-rank convolution ``r/C`` of the FLOPs at GEMM
rate plus its im2col, and the merge (a pass over the output). On a CPU these passes are memory-bound, so
a layer with few input channels (the RGB input), a high rank relative to ``C``, or a tiny feature map can
cost *more* split than dense. Such a layer runs fully in the trusted context: faster *and* nothing is
released for it.

A predicted split is then put on trial: its layer's dense forward (in training, forward and backward) is
timed once on the real input and its first two split forwards (in training, forwards and backwards) are
timed; if the better of them was faster, the split is confirmed. If not, the trial goes on to four: one
busy moment on a shared machine cannot keep a layer trusted that pays split (VGG-16's 14×14 layers, split
16 ms against 27–36 ms dense, were kept trusted in some runs and not others); if the best of four was not
faster either, the layer is kept trusted from then on (``Planner.observe``). The model predicts, the
measurement decides. Training is judged on forward *and* backward: a layer whose
split forward only breaks even can still save most of its backward (VGG-16 at 224 px: ``features.5``'s
split forward 76 ms against 73 ms dense, but forward and backward 153 ms against 242 ms).

The rates (dense-conv GFLOP/s, GEMM GFLOP/s, memory-pass GB/s) are measured on this machine once per
torch thread count (well under a second) and cached in ``$ASYMML_CACHE`` (default
``~/.cache/asymml``)/``calibration.json``; :func:`calibrate` with ``force=True`` re-measures. The model is
a roofline: each step costs ``max(flops / rate, bytes / bandwidth)``; a layer is split only when the
predicted split cost is below ``margin`` (default 0.8) times the dense cost, so near-ties stay trusted.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

PLACEMENTS = ("auto", "split", "trusted")
"""``auto``: the cost model decides per layer; ``split``: split every layer it can (the prototype);
``trusted``: keep every layer trusted (releases nothing — the TEE-only baseline through the split path)."""

DEFAULT_MARGIN = 0.8

CALIBRATION_VERSION = 2
"""Cached rates of another version (other fields, other measurements) are measured again."""


@dataclass(frozen=True)
class MachineRates:
    """Measured rates of the trusted CPU (per torch thread count)."""

    conv_flops: float  # dense convolution, FLOP/s (channels-last)
    gemm_flops: float  # batched GEMM, FLOP/s
    bandwidth: float  # bytes/s of an elementwise read-modify-write pass
    threads: int
    op_overhead: float = 0.0  # seconds of dispatch per small eager op (Python + ATen), charged per split op
    pilot: bool = True  # check each predicted split against measured times in its first forwards

    def roof(self, flops: float, nbytes: float, rate: float) -> float:
        return max(flops / rate, nbytes / self.bandwidth)


def _cache_file() -> Path:
    root = Path(os.environ.get("ASYMML_CACHE", Path.home() / ".cache" / "asymml"))
    return root / "calibration.json"


def _best(fn, n: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates() -> MachineRates:
    """Measure the three rates now (≈0.3–1 s)."""
    with torch.no_grad():
        x = torch.randn(4, 64, 56, 56).contiguous(memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
        t_conv = _best(lambda: F.conv2d(x, w, None, padding=1))
        conv = 2 * 4 * 64 * 64 * 9 * 56 * 56 / t_conv
        a = torch.randn(4, 3136, 288)
        b = torch.randn(4, 288, 128)
        out = torch.empty(4, 3136, 128)
        t_gemm = _best(lambda: torch.bmm(a, b, out=out))
        gemm = 2 * 4 * 3136 * 288 * 128 / t_gemm
        u = torch.randn(1 << 23)
        v = torch.randn(1 << 23)
        t_bw = _best(lambda: u.add_(v))
        bw = 3 * u.numel() * 4 / t_bw
        a1, b1 = torch.zeros(4, 4), torch.zeros(4, 4)

        def small_ops() -> None:  # the mix a split layer's bookkeeping runs: products, views, copies
            for _ in range(100):
                (a1 @ b1).t().contiguous()

        op = _best(small_ops) / 300
    return MachineRates(conv, gemm, bw, torch.get_num_threads(), op)


_LOCK = threading.Lock()
_RATES: dict[int, MachineRates] = {}


def calibrate(force: bool = False) -> MachineRates:
    """The machine's rates for the current torch thread count: cached in memory and on disk."""
    threads = torch.get_num_threads()
    with _LOCK:
        if not force and threads in _RATES:
            return _RATES[threads]
        path = _cache_file()
        table: dict[str, dict] = {}
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        entry = table.get(str(threads)) if isinstance(table, dict) else None
        rates = None
        if not force and isinstance(entry, dict) and entry.get("version") == CALIBRATION_VERSION:
            try:
                rates = MachineRates(**{k: v for k, v in entry.items() if k != "version"})
            except TypeError:
                rates = None
        if rates is None:
            rates = measure_rates()
            table = table if isinstance(table, dict) else {}
            table[str(threads)] = {**asdict(rates), "version": CALIBRATION_VERSION}
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(table, indent=1))
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only home: keep the in-memory figures
        _RATES[threads] = rates
        return rates


@dataclass(frozen=True)
class ConvShape:
    """What the cost model needs to know about one convolution and its input."""

    B: int
    C: int
    O: int
    groups: int
    kk: int
    hw_in: int
    hw_out: int

    @property
    def dense_flops(self) -> float:
        return 2.0 * self.B * self.O * (self.C // self.groups) * self.kk * self.hw_out


def dense_cost(s: ConvShape, rates: MachineRates, training: bool) -> float:
    """Trusted seconds of the layer run densely (forward; ×3 with its two backward convolutions)."""
    fwd = rates.roof(s.dense_flops, 4.0 * s.B * (s.C * s.hw_in + s.O * s.hw_out), rates.conv_flops)
    return fwd * (3.0 if training else 1.0)


SPLIT_OPS_FORWARD = 200
"""Eager ops a split layer runs on the trusted side per forward beyond a dense layer's one (decomposition
with its small factorisations, fold, im2col, GEMM, merge, bookkeeping, the job to the accelerator); the
protected backward runs about three times as many. Counted with ``torch.profiler``: 4,130 aten ops for
ResNet-20's 20 split regions; they are what makes a split *small* layer cost more than its dense
convolution."""


def split_cost(s: ConvShape, r: int, rates: MachineRates, training: bool, shared: bool = False) -> float:
    """Predicted trusted seconds of the layer run split at rank ``r`` (forward, or forward+backward)."""
    B, C, O, kk = s.B, s.C, s.O, s.kk
    act = 4.0 * B * C * s.hw_in  # bytes of the input activation
    out = 4.0 * B * O * s.hw_out
    sub = max(1, min(4, s.hw_in // max(1, 4 * C)))
    gram = 2.0 * B * C * C * s.hw_in / sub
    proj = 4.0 * B * C * r * s.hw_in  # V = UᵀX and R = X − UV
    decomp = rates.roof(gram, act / sub, rates.gemm_flops) + rates.roof(proj, 4 * act, rates.gemm_flops)
    g = s.groups
    if g == 1:
        lowconv = rates.roof(2.0 * B * O * r * kk * s.hw_out + 2.0 * (1 if shared else B) * O * kk * C * r,
                             4.0 * B * r * kk * s.hw_out * 2 + out, rates.gemm_flops)
    else:  # grouped/depthwise: the trusted part is computed directly on the dense low-rank part
        lowconv = rates.roof(2.0 * B * C * r * s.hw_in + s.dense_flops, act + out, rates.conv_flops)
    merge = 3.0 * out / rates.bandwidth
    fwd = decomp + lowconv + merge + SPLIT_OPS_FORWARD * rates.op_overhead
    if not training:
        return fwd
    # backward (protected): decompose δ like an activation, the two low-rank gradient convolutions and
    # the trusted weight-gradient terms, each ≈ a low-rank convolution, plus the R̃⋆δ_L correlation
    gdecomp = rates.roof(2.0 * B * O * O * s.hw_out / max(1, min(4, s.hw_out // max(1, 4 * O))) + 4.0 * B * O * r * s.hw_out,
                         5 * out, rates.gemm_flops)
    return fwd + gdecomp + 3.0 * lowconv + merge + 3 * SPLIT_OPS_FORWARD * rates.op_overhead


@dataclass
class _Trial:
    """A region's pilot: its decision keys, the measured dense seconds and the observed split seconds."""

    training: bool
    keys: list[tuple] = field(default_factory=list)
    dense_s: float = 0.0
    forward: list[float] = field(default_factory=list)
    backward: list[float] = field(default_factory=list)


class Planner:
    """Decides, per layer and input shape, whether splitting saves trusted time (see module doc)."""

    PILOT_FORWARDS = 2
    """Forwards of a predicted split that are timed before the decision is confirmed."""

    PILOT_MAX_FORWARDS = 4
    """Forwards (and, in training, backwards) timed before a predicted split is reversed: the longest trial."""

    def __init__(self, policy: str = "auto", margin: float = DEFAULT_MARGIN) -> None:
        self.policy = policy
        self.margin = margin
        self._decisions: dict[tuple, tuple[bool, float, float]] = {}
        # pilot: region name -> its trial (decision keys, measured dense seconds, observed split seconds)
        self._pilot: dict[str, _Trial] = {}
        self._measured: dict[tuple, tuple[float, float]] = {}

    def split_pays(self, key: str, s: ConvShape, r: int, *, training: bool, shared: bool,
                   dense_timer: Callable[[], float] | None = None) -> bool:
        """Predicted decision for layer ``key`` (``region:input``). With a ``dense_timer`` (seconds of the
        layer's dense forward — forward and backward when ``training`` — measured on the real input) a
        predicted split is put on trial: see :meth:`observe`."""
        if self.policy == "split":
            return True
        if self.policy == "trusted":
            return False
        k = (key, s, r, training, shared, torch.get_num_threads())
        hit = self._decisions.get(k)
        if hit is None:
            rates = calibrate()
            d = dense_cost(s, rates, training)
            sp = split_cost(s, r, rates, training, shared)
            hit = (sp < self.margin * d, d, sp)
            self._decisions[k] = hit
            if hit[0] and rates.pilot and dense_timer is not None:
                region = key.split(":", 1)[0]
                trial = self._pilot.setdefault(region, _Trial(training=training))
                trial.keys.append(k)
                trial.dense_s += dense_timer()
        return hit[0]

    def watching(self, region: str) -> bool:
        return region in self._pilot

    def observe(self, region: str, split_s: float, phase: str = "forward") -> None:
        """A ``phase`` (``"forward"`` or ``"backward"``) of ``region`` took ``split_s`` trusted seconds split.
        After :attr:`PILOT_FORWARDS` forwards (and as many backwards for a layer planned for training) a
        region whose best split forward (+ best split backward) was faster than its measured dense layer
        stays split; one that was not is watched up to :attr:`PILOT_MAX_FORWARDS` and, if its best is
        still not faster, kept trusted from then on: the calibrated model predicts, the measurement
        decides."""
        trial = self._pilot[region]
        obs = trial.backward if phase == "backward" else trial.forward
        if len(obs) < self.PILOT_MAX_FORWARDS:  # (a layer whose backward never comes does not grow the list)
            obs.append(split_s)
        n = min(len(trial.forward), len(trial.backward)) if trial.training else len(trial.forward)
        if n < self.PILOT_FORWARDS:
            return
        best = min(trial.forward[:n]) + (min(trial.backward[:n]) if trial.training else 0.0)
        pays = best < trial.dense_s
        if not pays and n < self.PILOT_MAX_FORWARDS:
            return
        del self._pilot[region]
        for k in trial.keys:
            self._measured[k] = (trial.dense_s, best)
            if not pays:
                _, d, sp = self._decisions[k]
                self._decisions[k] = (False, d, sp)

    def decisions(self) -> dict[str, dict[str, float | bool]]:
        """The latest decision per layer: ``split``, predicted ``dense_s`` and ``split_s``, and where the
        pilot measured them, ``measured_dense_s`` and ``measured_split_s`` (forward, plus backward for a
        layer planned for training)."""
        out: dict[str, dict[str, float | bool]] = {}
        for k, (ok, d, sp) in self._decisions.items():
            out[k[0]] = {"split": ok, "dense_s": d, "split_s": sp}
            if k in self._measured:
                out[k[0]]["measured_dense_s"], out[k[0]]["measured_split_s"] = self._measured[k]
        return out


class FollowingPlanner(Planner):
    """Makes the decisions of another planner (``leader``) without piloting its own: an instance that must
    split exactly the layers another instance splits (the bench's verify variant, whose overhead is then
    the checks' alone). A decision the leader has not made yet is predicted here and not put on trial;
    the leader's pilot is fed only by the leader's own forwards (sharing the object would let a second
    instance's first, cold forward count as a trial of the leader's split)."""

    def __init__(self, leader: Planner) -> None:
        super().__init__(leader.policy, leader.margin)
        self.leader = leader

    def split_pays(self, key: str, s: ConvShape, r: int, *, training: bool, shared: bool,
                   dense_timer: Callable[[], float] | None = None) -> bool:
        k = (key, s, r, training, shared, torch.get_num_threads())
        hit = self.leader._decisions.get(k)
        if hit is not None:
            return hit[0]
        return super().split_pays(key, s, r, training=training, shared=shared, dense_timer=None)

    def watching(self, region: str) -> bool:
        return False

