"""Derived figures of ``asymml bench`` (issue 4 §2) and the analytic forward-convolution FLOP limit.

Every figure is defined in :data:`DEFINITIONS`, which is copied into the JSON output.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .roofline import SGX1

DEFAULT_SPEED_RATIO = 10.0

DEFINITIONS: dict[str, str] = {
    "trusted_s": (
        "median over timed steps of the trusted-side time of one step: wall time of the step measured in the "
        "trusted (calling) thread minus the time that thread spent blocked waiting on the accelerator, as timed "
        "by the bench's own wrapper around every future the executor returns (blocked_s; the runtime's own "
        "figure is kept as runtime_blocked_s). trusted-only: the whole wall time. plain: 0. With a CPU "
        "accelerator the measurement is serialized by default: each accelerator job runs only when the trusted "
        "side waits for it, so the two sides do not contend for the cores (step_s is then their sum)."),
    "accelerator_s": (
        "median of the accelerator's busy time per step (sum of the executor's per-layer job times, "
        "synchronised on CUDA). plain: the whole step time. trusted-only: 0."),
    "step_s": (
        "median end-to-end wall time of one step (train: forward + loss + backward + SGD optimizer step unless "
        "--no-optimizer-step; infer: forward under torch.no_grad in eval mode). Every timed step gets a fresh "
        "tensor; the batch's values are drawn per round and shared by the modes of that round."),
    "rounds": (
        "timed rounds: in each, every paired mode (trusted-only and every asym instance) runs one step, in an "
        "order shuffled per round; plain and noise-only (context) join the first `repeats` rounds. Default: "
        "max(15, repeats), raised (up to 60) while the paired steps of a phase, timed on the warm-up round, fit "
        "in 20 s: small models get more rounds, large models (VGG-16 at 224 px) 15."),
    "trusted_flops": (
        "FLOPs (2 per multiply-add) counted by torch.utils.flop_counter.FlopCounterMode in the trusted "
        "thread over one step, with asymml's QR/eigh/SVD/Cholesky/triangular-solve formulas and a group-aware "
        "convolution-backward formula (torch's over-counts grouped weight gradients); element-wise ops count 0."),
    "total_flops": "FLOPs of the same step in `plain` mode (the whole model, unsplit).",
    "trusted_flop_fraction": "trusted_flops / total_flops.",
    "trusted_peak_bytes": (
        "peak bytes of live storages held by the trusted side during one step (asymml's TrustedMemoryMeter, "
        "not counting op outputs that alias an input, e.g. views of weights): input batch, activations, "
        "gradients created in the step, accelerator results the trusted side receives, and persistent state "
        "that survives a step (persistent_bytes: weight re-layouts, warm-start bases, found by metering the "
        "warm-up steps); released tensors and parameters excluded."),
    "persistent_bytes": "trusted storages created in warm-up steps and still alive at the instrumented step.",
    "trusted_resident_bytes": "trusted_peak_bytes + parameter and buffer bytes (held by the trusted side).",
    "released_bytes": (
        "bytes of tensors derived from private data handed to the accelerator per step (all ledger kinds "
        "except 'weight'); weights are reported as released_weight_bytes. step_checks compares the released "
        "bytes and ranks of every timed step with the instrumented step (warnings when they differ)."),
    "trusted_speedup": (
        "median over rounds of the per-round paired ratio trusted_s(trusted-only) / trusted_s(asym) (both "
        "measured in the same round on the same batch values); trusted_speedup_ci95 is a percentile bootstrap "
        "95% interval of that median; trusted_speedup_ratio_of_medians is the ratio of the two medians."),
    "limit": "total_flops / trusted_flops(asym): the speed-up if trusted time were proportional to FLOPs.",
    "efficiency": "trusted_speedup / limit.",
    "roofline_s": (
        "roofline time of the trusted side's step: sum over every aten op the trusted thread runs of "
        "max(flops / conv_rate, bytes / mem_bandwidth); bytes = full sizes of the op's tensor inputs read and "
        "outputs written (views, metadata and allocation-only ops move nothing; an in-place op reads and "
        "writes its target, fill/copy/random ops only write it); flops from torch.utils.flop_counter's "
        "registry (all at the conv rate). Random-number ops (normal_, randn, …) are bound by "
        "max(samples / rng_rate, bytes / mem_bandwidth). conv_rate, mem_bandwidth and rng_rate are calibrated "
        "once per run on this machine with the bench's threads (environment.roofline_calibration: a 3x3 conv in "
        "NCHW and channels_last, the faster kept; an element-wise out-of-place pass into a reused buffer, bytes "
        "= read + write; normal_ into a reused buffer)."),
    "roofline_fraction": "roofline_s / trusted_s: how close the measured trusted time is to this machine's roofline.",
    "limit_roofline": (
        "roofline_s(trusted-only) / roofline_s(asym): the trusted speed-up if every trusted op ran at this "
        "machine's conv rate or memory bandwidth, whichever bounds it."),
    "efficiency_roofline": "trusted_speedup / limit_roofline.",
    "projected_sgx1_speedup": (
        "PROJECTION, not a measurement: projected_sgx1_trusted_s(trusted-only) / projected_sgx1_trusted_s(asym). "
        "projected_sgx1_trusted_s = trusted_s measured here + EPC paging + enclave transitions + copies across "
        "the enclave boundary. Paging: the instrumented step's trace of trusted storages touched and freed is "
        "replayed twice through an LRU model of the EPC (usable epc_usable_bytes, 4 KiB pages; a touched "
        "object's non-resident bytes are paged in, least recently used bytes are paged out to make room, a "
        "fresh allocation needs room but loads nothing, a freed object returns its pages); the second replay "
        "(steady state) counts pages moved, each charged page_swap_cycles / 2. Parameters and buffers are "
        "public and kept outside the EPC unless --sgx-weights-in-epc. Transitions: one OCALL "
        "(transition_cycles) per accelerator round trip. Copies: released bytes and received result bytes, one "
        "read+write pass each at the calibrated bandwidth. Cycles are converted at this CPU's clock "
        "(environment.cpu_clock_hz). Constants and their published sources: environment.sgx1_constants. Not "
        "modelled: the memory-encryption engine's latency on EPC accesses."),
    "planner": (
        "asym only: the cost-aware planner's decision per layer (`layer:input`): `split`, the predicted "
        "`dense_s`/`split_s` of its calibrated model and, where its trial ran, `measured_dense_s` (the dense "
        "layer timed on the real input) and `measured_split_s` (best split forward, plus best backward in "
        "training, of the trial's steps), seconds."),
    "asym_vs_plain": "step_s(asym) / step_s(plain) (end-to-end cost of the split vs. no privacy).",
    "end_to_end_speedup": "median over rounds of the per-round ratio step_s(trusted-only) / step_s(asym).",
    "projected_speedup": (
        "trusted_s(trusted-only) / max(trusted_s(asym), accelerator_s(asym) / speed_ratio). Model: the "
        "accelerator is speed_ratio times faster than the device its time was measured on, both sides "
        "overlap perfectly, a step takes as long as the slower side, transfers are free. With a real GPU "
        "accelerator use --speed-ratio 1."),
    "limit_fwd_conv_analytic": (
        "sum of conv MACs / sum of trusted conv MACs in the forward pass, per sample, with the ranks asym "
        "used: trusted MACs of a conv = min(fold, dense), fold = r*Cin/g*Cout*k^2 + r*Cout*k^2*H'W', "
        "dense = r*Cin*HW + Cout*Cin/g*k^2*H'W'; a conv whose input is not decomposed costs its full MACs."),
    "variant": (
        "asym instances beside the default one: 'verify' (the runtime checks accelerator results; --verify) and "
        "'noise' (Gaussian noise of sigma --noise on every release, clipped at --clip); each is compared with "
        "trusted-only like asym. The verify instance shares the asym instance's planner (the same layers split), "
        "so its overhead is the checks' alone; the noise instance plans for itself (noise changes what a split "
        "costs)."),
    "trusted_overhead_vs_asym": (
        "variants only: median over rounds of the per-round ratio trusted_s(variant) / trusted_s(asym, same "
        "backward) minus 1: the trusted time verification or noise adds."),
    "verify_detection_per_job": (
        "verify variant: probability that a layer's result tampered in one job (after the layer's first, always "
        "checked, jobs) is caught by the randomized check, = verify_sample when one check catches the tamper "
        "(measured 1.0 for tampers above the tolerance); a tamper kept up for k jobs is caught with probability "
        "1 - (1 - verify_sample)^k, and within 8 jobs at the latest. Shape, dtype and finiteness are checked on "
        "every job."),
    "busy": (
        "environment.busy: the 1-minute load average before the run exceeded the CPU count, or after it "
        "exceeded the CPU count plus the bench's torch threads; figures from a busy machine include contention."),
}


DEFINITIONS["sgx1_constants"] = "; ".join(
    f"{k} = {SGX1[k]:,}: {SGX1['sources'][k].rstrip('.')}" for k in ("epc_bytes", "epc_usable_bytes", "page_swap_cycles",
                                                          "transition_cycles"))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def projected_speedup(trusted_only_s: float, asym_trusted_s: float, asym_accel_s: float,
                      ratio: float = DEFAULT_SPEED_RATIO) -> float | None:
    """``trusted_only_s / max(asym_trusted_s, asym_accel_s / ratio)`` (see :data:`DEFINITIONS`)."""
    if ratio <= 0:
        raise ConfigError(f"speed ratio must be > 0, got {ratio}")
    return _ratio(trusted_only_s, max(asym_trusted_s, asym_accel_s / ratio))


def paired_ratios(num: Mapping[str, Any], den: Mapping[str, Any], key: str = "trusted_s") -> list[float]:
    """Per-round ratios ``num[key] / den[key]`` over the rounds both records were timed in."""
    sn, sd = num.get("samples", {}), den.get("samples", {})
    if key not in sn or key not in sd:
        return []
    rn = sn.get("round", list(range(len(sn[key]))))
    rd = sd.get("round", list(range(len(sd[key]))))
    by_round = dict(zip(rd, sd[key]))
    out = []
    for r, v in zip(rn, sn[key]):
        d = by_round.get(r)
        q = _ratio(v, d)
        if q is not None:
            out.append(q)
    return out


def bootstrap_median_ci(xs: list[float], n: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the median of ``xs`` (``n`` resamples, fixed seed)."""
    if len(xs) < 2 or n < 1:
        return None
    rng = random.Random(seed)
    k = len(xs)
    meds = sorted(statistics.median(rng.choices(xs, k=k)) for _ in range(n))
    lo = meds[int(math.floor((1 - level) / 2 * (n - 1)))]
    hi = meds[int(math.ceil((1 + level) / 2 * (n - 1)))]
    return lo, hi


def _paired(num: Mapping[str, Any], den: Mapping[str, Any], key: str, n: int, seed: int
            ) -> tuple[float | None, tuple[float, float] | None, int]:
    rs = paired_ratios(num, den, key)
    if not rs:
        return _ratio(num.get(key), den.get(key)), None, 0
    return statistics.median(rs), bootstrap_median_ci(rs, n, seed), len(rs)


def derive_one(trusted_only: Mapping[str, Any], asym: Mapping[str, Any], plain: Mapping[str, Any] | None,
               ratio: float = DEFAULT_SPEED_RATIO, *, bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The derived figures for one (trusted-only, asym, plain) triple of run records."""
    sp, ci, n = _paired(trusted_only, asym, "trusted_s", bootstrap, seed)
    e2e, e2e_ci, _ = _paired(trusted_only, asym, "step_s", bootstrap, seed)
    total = asym.get("total_flops") or (plain or {}).get("total_flops")
    limit = _ratio(total, asym.get("trusted_flops"))
    lim_roof = _ratio(trusted_only.get("roofline_s"), asym.get("roofline_s"))
    sgx_to, sgx_a = trusted_only.get("sgx1") or {}, asym.get("sgx1") or {}
    return {
        "trusted_speedup": sp,
        "trusted_speedup_ci95": None if ci is None else list(ci),
        "trusted_speedup_rounds": n,
        "trusted_speedup_ratio_of_medians": _ratio(trusted_only["trusted_s"], asym["trusted_s"]),
        "limit": limit,
        "efficiency": _ratio(sp, limit),
        "limit_roofline": lim_roof,
        "efficiency_roofline": _ratio(sp, lim_roof),
        "projected_sgx1_speedup": _ratio(sgx_to.get("projected_trusted_s"), sgx_a.get("projected_trusted_s")),
        "sgx1_paging_s": {"trusted-only": sgx_to.get("paging_s"), "asym": sgx_a.get("paging_s")},
        "asym_vs_plain": None if plain is None else _ratio(asym["step_s"], plain["step_s"]),
        "end_to_end_speedup": e2e,
        "end_to_end_speedup_ci95": None if e2e_ci is None else list(e2e_ci),
        "speed_ratio": ratio,
        "projected_speedup": projected_speedup(trusted_only["trusted_s"], asym["trusted_s"],
                                               asym["accelerator_s"], ratio),
        "limit_fwd_conv_analytic": asym.get("limit_fwd_conv_analytic"),
        "trusted_peak_bytes": asym.get("trusted_peak_bytes"),
        "trusted_resident_bytes": asym.get("trusted_resident_bytes"),
        "released_bytes": asym.get("released_bytes"),
    }


def derive(runs: Iterable[Mapping[str, Any]], ratio: float = DEFAULT_SPEED_RATIO, *, bootstrap: int = 2000,
           seed: int = 0) -> list[dict[str, Any]]:
    """Derived figures per model, input size, batch size, phase, asym instance (backward mode, variant) and
    sweep value."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in runs:
        key = (r["model"], r["input_size"], r["batch_size"], r["phase"], r.get("sweep_value"))
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        model, size, batch, phase, sv = key
        to = next((v for v in rs if v["mode"] == "trusted-only"), None)
        pl = next((v for v in rs if v["mode"] == "plain"), None)
        for asym in rs:
            if asym["mode"] != "asym" or to is None:
                continue
            d = {"model": model, "input_size": size, "batch_size": batch, "phase": phase,
                 "backward": asym.get("backward"), "variant": asym.get("variant"), "label": asym.get("label"),
                 "rank": asym.get("rank")}
            if sv is not None:
                d["sweep_value"] = sv
            d.update(derive_one(to, asym, pl, ratio, bootstrap=bootstrap, seed=seed))
            if asym.get("variant"):
                base = next((v for v in rs if v["mode"] == "asym" and not v.get("variant")
                             and v.get("backward") == asym.get("backward")), None)
                d["trusted_overhead_vs_asym"] = _overhead(asym, base)
                if asym.get("verify"):
                    d["verify_detection_per_job"] = asym["verify"].get("detection_per_job")
                    d["verify_sample"] = asym["verify"].get("sample")
            out.append(d)
    return out


def _overhead(variant: Mapping[str, Any], base: Mapping[str, Any] | None) -> float | None:
    """Median over rounds of trusted_s(variant) / trusted_s(asym) - 1 (rounds paired by index)."""
    if base is None:
        return None
    a, b = variant.get("samples", {}).get("trusted_s"), base.get("samples", {}).get("trusted_s")
    if a and b and len(a) == len(b):
        ratios = [x / y for x, y in zip(a, b) if y > 0]
        return statistics.median(ratios) - 1.0 if ratios else None
    r = _ratio(variant.get("trusted_s"), base.get("trusted_s"))
    return None if r is None else r - 1.0


# ------------------------------------------------------------------------------ analytic conv limit


def conv_geometry(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per ``nn.Conv2d`` (by module name): channels, kernel, groups, input and output spatial sizes."""
    rows: list[dict[str, Any]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            def hook(mod: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> None:
                rows.append({
                    "name": name, "cin": mod.in_channels, "cout": mod.out_channels, "groups": mod.groups,
                    "kk": mod.kernel_size[0] * mod.kernel_size[1],
                    "hw_in": inp[0].shape[-2] * inp[0].shape[-1], "hw_out": out.shape[-2] * out.shape[-1],
                })
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x[:1])
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return rows


def conv_macs(g: Mapping[str, Any], rank: int | None) -> tuple[int, int]:
    """(total MACs, trusted MACs) of one conv per sample with an input of rank ``rank`` (None: dense)."""
    cin_g = g["cin"] // g["groups"]
    total = g["cout"] * cin_g * g["kk"] * g["hw_out"]
    if rank is None or rank >= min(g["cin"], g["hw_in"]):
        return total, total
    fold = rank * cin_g * g["cout"] * g["kk"] + rank * g["cout"] * g["kk"] * g["hw_out"]
    direct = rank * g["cin"] * g["hw_in"] + total
    return total, min(fold, direct)


def analytic_fwd_conv_limit(geometry: list[dict[str, Any]], ranks: Mapping[str, int | None]) -> float | None:
    """Σ total conv MACs / Σ trusted conv MACs (forward, per sample); ``ranks`` maps conv names to ranks."""
    tot = tru = 0
    for g in geometry:
        a, b = conv_macs(g, ranks.get(g["name"]))
        tot += a
        tru += b
    return _ratio(float(tot), float(tru))
