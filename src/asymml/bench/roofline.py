"""An honest limit for the trusted side: a per-op roofline and an SGX1 EPC paging projection.

The FLOP limit assumes trusted time is proportional to FLOPs; on a CPU the trusted side of ``asym`` is
bound as much by full-size memory passes (decompose, residual, merge, activation, pool, noise) as by
arithmetic. This module

* **calibrates** the machine once per run (:func:`calibrate`): the dense-convolution rate (GFLOP/s, NCHW
  and channels_last, the faster is kept), the memory-pass bandwidth (GB/s of an element-wise pass that
  reads one tensor and writes another, into a reused buffer) and the Gaussian generator's rate;
* **counts** every aten op the trusted thread runs (:class:`TrustedOpCounter`, a ``TorchDispatchMode``):
  FLOPs with ``torch.utils.flop_counter``'s registry (asymml's formulas included), bytes read and written
  (full tensor sizes of inputs and outputs; views, metadata and allocation-only ops move nothing); the
  roofline time of a step is ``Σ_op max(flops / rate, bytes / bandwidth)`` (random-number ops: samples /
  generator rate in place of flops / rate);
* **projects** SGX1 (:func:`sgx1_projection`): the counter also records every storage the trusted thread
  touches and every free, which an LRU model of the EPC replays to count 4 KiB page moves.

All constants of the projection are in :data:`SGX1` with their published source; the figure it produces is
a projection, never a measurement.
"""

from __future__ import annotations

import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from ..errors import ConfigError

aten = torch.ops.aten

PAGE = 4096

#: The SGX1 paging model's constants and where they come from (copied into the bench's definitions).
SGX1: dict[str, Any] = {
    "epc_bytes": 128 * 2**20,
    "epc_usable_bytes": 93 * 2**20,
    "page_bytes": PAGE,
    "page_swap_cycles": 40_000,
    "transition_cycles": 8_200,
    "sources": {
        "epc_bytes": "Intel SGX1 Processor Reserved Memory of 128 MiB (Intel SDM vol. 3D ch. 39; Taassori et al., "
                     "'VAULT: Reducing Paging Overheads in SGX with Efficient Integrity Verification Structures', "
                     "ASPLOS'18: 'the EPC operates with a limited capacity (currently 128 MB)').",
        "epc_usable_bytes": "about 93 MiB of the 128 MiB are usable enclave pages, the rest holds the integrity "
                            "tree and EPCM metadata (Arnautov et al., 'SCONE', OSDI'16; Orenbach et al., 'Eleos: "
                            "ExitLess OS Services for SGX Enclaves', EuroSys'17).",
        "page_swap_cycles": "an EPC page swap (evict one 4 KiB page with EWB, load one with ELDU, including the OS "
                            "fault path) costs about 40,000 cycles (Taassori et al., VAULT, ASPLOS'18; Orenbach "
                            "et al., Eleos, EuroSys'17): each page moved in or out is charged half of it.",
        "transition_cycles": "an enclave exit and re-entry (OCALL) costs 8,200-17,000 cycles (Weisse, Bertacco, "
                             "Austin, 'Regaining Lost Cycles with HotCalls', ISCA'17); the lower bound is used, "
                             "charged once per accelerator round trip (submitting a job, collecting its result).",
    },
}


# ------------------------------------------------------------------------------------------ calibration


def _best_time(fn: Any, reps: int) -> float:
    fn()  # warm (allocations, kernels, thread pool)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def calibrate(reps: int = 3) -> dict[str, Any]:
    """Measure this machine's dense-conv rate and memory-pass bandwidth with the current torch threads.

    Conv: 3×3, 128→128 channels, 28×28, batch 8 (1.85 GFLOP), NCHW and channels_last, best of ``reps``;
    the faster layout is the rate. Memory pass: ``torch.add(a, 1, out=b)`` on 64 MiB tensors (reads 64 MiB,
    writes 64 MiB into a reused buffer, so page faults of fresh allocations are not charged), best of
    ``reps``. About half a second on a 2-core machine."""
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, 28, 28, generator=gen)
    w = torch.randn(128, 128, 3, 3, generator=gen)
    flops = 2 * 8 * 128 * 128 * 9 * 28 * 28
    rates = {}
    with torch.no_grad():
        for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            xi, wi = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            t = _best_time(lambda xi=xi, wi=wi: F.conv2d(xi, wi, padding=1), reps)
            rates[name] = flops / t / 1e9
        n = 16 * 2**20
        a, b = torch.randn(n, generator=gen), torch.empty(n)
        t = _best_time(lambda: torch.add(a, 1.0, out=b), max(reps, 3))
        bw = 2 * n * 4 / t / 1e9
        r = b[: 4 * 2**20]
        t_rng = _best_time(lambda: r.normal_(generator=gen), reps)
    return {
        "conv_gflops": max(rates.values()), "conv_gflops_nchw": rates["nchw"],
        "conv_gflops_channels_last": rates["channels_last"], "mem_gbps": bw,
        "rng_gsamples": r.numel() / t_rng / 1e9,
        "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t_start,
        "method": "best of repeated runs: 3x3 conv 128->128 ch 28x28 batch 8 (NCHW and channels_last, faster "
                  "kept); torch.add(a, 1, out=b) on 64 MiB float32 (bytes = read + write); Tensor.normal_ into "
                  "16 MiB of the same reused buffer (Gaussian samples per second)",
    }


def cpu_clock_hz() -> float | None:
    """This CPU's clock from ``/proc/cpuinfo`` (``cpu MHz``, else the ``@ x.yGHz`` of the model name)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
    if m and float(m.group(1)) > 0:
        return float(m.group(1)) * 1e6
    m = re.search(r"@\s*([\d.]+)\s*GHz", text)
    return float(m.group(1)) * 1e9 if m else None


# ------------------------------------------------------------------------------------------ op counter

_META_OPS = {
    aten.is_contiguous, aten.size, aten.sym_size, aten.stride, aten.sym_stride, aten.storage_offset,
    aten.sym_storage_offset, aten.numel, aten.sym_numel, aten.dim, aten.is_strides_like_format,
    aten.is_non_overlapping_and_dense, aten._local_scalar_dense, aten.item,
}
_ALLOC_ONLY = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
               aten.resize_, aten.set_, aten._unsafe_view, aten.lift_fresh}
# in-place ops that overwrite their destination without reading it
_WRITE_ONLY_INPLACE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_",
                       "exponential_", "geometric_", "cauchy_", "log_normal_", "index_fill_", "masked_fill_"}


_RNG_OPS = {"normal_", "normal", "randn", "randn_like", "rand", "rand_like", "uniform_", "bernoulli_",
            "bernoulli", "random_", "randint", "randint_like", "exponential_"}


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


class TrustedOpCounter(TorchDispatchMode):
    """Counts, per aten op of the thread that enters it: FLOPs, bytes read and written (CPU tensors only:
    the trusted side), the roofline time at the given rates, and a trace of storages touched and freed for
    the EPC model. ``skip_storages``: storages kept out of the EPC trace (public parameters)."""

    def __init__(self, conv_gflops: float, mem_gbps: float, *, rng_gsamples: float | None = None,
                 skip_storages: Iterable[int] = (), trace: bool = True) -> None:
        super().__init__()
        if conv_gflops <= 0 or mem_gbps <= 0 or (rng_gsamples is not None and rng_gsamples <= 0):
            raise ConfigError("roofline rates must be positive")
        self.rate = conv_gflops * 1e9
        self.bw = mem_gbps * 1e9
        self.rng = None if rng_gsamples is None else rng_gsamples * 1e9
        self.flops = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.roofline_s = 0.0
        self.compute_bound_s = 0.0
        self.memory_bound_s = 0.0
        self.ops = 0
        self.by_op: dict[str, list[float]] = {}
        self.trace_on = trace
        self.trace: list[tuple[str, int, int]] = []  # ("r"|"w"|"f", storage key, bytes)
        self._seen: set[int] = set()
        self._skip = set(skip_storages)
        self._lock = threading.RLock()  # finalizers of freed storages may run inside _touch (GC)

    # -- trace
    def _touch(self, t: torch.Tensor, kind: str) -> None:
        if not self.trace_on:
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self._skip:
            return
        with self._lock:
            self.trace.append((kind, key, st.nbytes()))
            if key not in self._seen:
                self._seen.add(key)
                weakref.finalize(st, self._freed, key)

    def _freed(self, key: int) -> None:
        with self._lock:
            self._seen.discard(key)
            if self.trace_on:
                self.trace.append(("f", key, 0))

    def touch_external(self, tensors: Iterable[Any]) -> None:
        """Record tensors the trusted side receives from outside its ops (accelerator results) as written into
        trusted memory (for the EPC trace; their bytes are not roofline traffic here)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._touch(t, "w")

    # -- counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _META_OPS or packet in _ALLOC_ONLY or func.is_view:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        ins = [t for t in flat_in if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta]
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta]
        if not ins and not outs:
            return out
        mutated: set[int] = set()  # tensors the op writes in place (also read, unless write-only)
        out_args: set[int] = set()  # out= arguments: written, never read
        write_only = packet.__name__ in _WRITE_ONLY_INPLACE
        for i, a in enumerate(func._schema.arguments):
            if a.alias_info is not None and a.alias_info.is_write:
                v = args[i] if i < len(args) else kwargs.get(a.name)
                vs = v if isinstance(v, (list, tuple)) else (v,)  # _foreach_* ops mutate lists of tensors
                ids = {id(t) for t in vs if isinstance(t, torch.Tensor)}
                (out_args if a.is_out else mutated).update(ids)
        read = written = 0
        in_keys = set()
        for t in ins:
            in_keys.add(_storage_key(t))
            if id(t) in mutated or id(t) in out_args:
                written += _tensor_bytes(t)
                self._touch(t, "w")
                if write_only or id(t) in out_args:
                    continue
            read += _tensor_bytes(t)
            self._touch(t, "r")
        for t in outs:
            if _storage_key(t) in in_keys:  # an in-place result or alias: already counted as its input
                continue
            written += _tensor_bytes(t)
            self._touch(t, "w")
        fl = 0
        formula = flop_registry.get(packet)
        if formula is not None:
            try:
                fl = int(formula(*args, **kwargs, out_val=out))
            except Exception:  # a formula that cannot handle this overload: count bytes only
                fl = 0
        t_c, t_m = fl / self.rate, (read + written) / self.bw
        if self.rng is not None and packet.__name__ in _RNG_OPS:  # random numbers: bound by the generator
            t_c = sum(t.numel() for t in outs) / self.rng
        self.flops += fl
        self.bytes_read += read
        self.bytes_written += written
        self.roofline_s += max(t_c, t_m)
        if t_c >= t_m:
            self.compute_bound_s += t_c
        else:
            self.memory_bound_s += t_m
        self.ops += 1
        row = self.by_op.setdefault(packet.__name__, [0, 0.0, 0.0])
        row[0] += 1
        row[1] += max(t_c, t_m)
        row[2] += read + written
        return out

    def summary(self, top: int = 8) -> dict[str, Any]:
        """Totals and the ops with the largest roofline time."""
        ranked = sorted(self.by_op.items(), key=lambda kv: -kv[1][1])[:top]
        return {
            "roofline_s": self.roofline_s, "flops": self.flops, "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written, "compute_bound_s": self.compute_bound_s,
            "memory_bound_s": self.memory_bound_s, "ops": self.ops,
            "top_ops": [{"op": k, "calls": int(v[0]), "roofline_s": v[1], "bytes": int(v[2])} for k, v in ranked],
        }


# ------------------------------------------------------------------------------------------ EPC model


def epc_page_moves(trace: list[tuple[str, int, int]], usable_bytes: int, passes: int = 2) -> dict[str, int]:
    """Replay a trusted step's storage trace ``passes`` times through an LRU model of the EPC and count the
    bytes moved into and out of it in the last pass (the steady state: what stays resident across steps
    stays resident).

    Model: every storage is an object of its size; resident bytes of all objects never exceed
    ``usable_bytes``. Touching an object (read or write) makes it most recently used and loads its
    non-resident bytes (page-ins); room is made by evicting least recently used bytes (page-outs). A write
    to a storage not seen before (a fresh allocation) needs room but loads nothing. A freed storage gives
    its resident pages back. Pages are 4 KiB; sizes are rounded up to whole pages."""
    lru: OrderedDict[int, list[int]] = OrderedDict()  # key -> [size, resident]
    resident = 0
    stats = {"in": 0, "out": 0}

    def make_room(need: int, keep: int, count: bool) -> None:
        nonlocal resident
        excess = resident + need - usable_bytes
        if excess <= 0:
            return
        for k in list(lru):
            if excess <= 0:
                break
            if k == keep:
                continue
            ent = lru[k]
            take = min(ent[1], excess)
            if take:
                ent[1] -= take
                resident -= take
                excess -= take
                if count:
                    stats["out"] += take

    for p in range(passes):
        count = p == passes - 1
        for kind, key, nbytes in trace:
            if kind == "f":
                ent = lru.pop(key, None)
                if ent is not None:
                    resident -= ent[1]
                continue
            size = -(-nbytes // PAGE) * PAGE
            ent = lru.get(key)
            if ent is None or ent[0] != size:
                if ent is not None:
                    resident -= ent[1]
                    del lru[key]
                need = min(size, usable_bytes)
                make_room(need, key, count)
                lru[key] = [size, need]
                resident += need
                if kind == "r" and count:  # an object from before this trace, read: loaded
                    stats["in"] += need
                continue
            lru.move_to_end(key)
            missing = min(size, usable_bytes) - ent[1]
            if missing > 0:
                make_room(missing, key, count)
                ent[1] += missing
                resident += missing
                if count:
                    stats["in"] += missing
    return {"bytes_in": stats["in"], "bytes_out": stats["out"],
            "pages_moved": (stats["in"] + stats["out"]) // PAGE}


def sgx1_projection(trusted_s: float, trace: list[tuple[str, int, int]], *, round_trips: int = 0,
                    transfer_bytes: int = 0, mem_gbps: float, clock_hz: float,
                    constants: dict[str, Any] | None = None) -> dict[str, Any]:
    """Projected trusted time of one step on SGX1: the measured trusted time plus EPC paging (page moves of
    :func:`epc_page_moves` × half a page-swap cost), enclave transitions (one OCALL per accelerator round
    trip) and copying released tensors out of / accelerator results into the enclave (one memory pass over
    ``transfer_bytes`` at the calibrated bandwidth). Not modelled: the memory-encryption engine's extra
    latency on EPC accesses (it applies to both modes)."""
    c = dict(SGX1, **(constants or {}))
    moves = epc_page_moves(trace, int(c["epc_usable_bytes"]))
    paging_s = moves["pages_moved"] * c["page_swap_cycles"] / 2 / clock_hz
    transitions_s = round_trips * c["transition_cycles"] / clock_hz
    copy_s = 2 * transfer_bytes / (mem_gbps * 1e9)
    return {"projected_trusted_s": trusted_s + paging_s + transitions_s + copy_s, "paging_s": paging_s,
            "transitions_s": transitions_s, "copy_s": copy_s, **moves, "round_trips": round_trips,
            "transfer_bytes": transfer_bytes}
