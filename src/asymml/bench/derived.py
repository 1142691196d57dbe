"""Derived figures of ``asymml bench`` (issue 4 §2) and the analytic forward-convolution FLOP limit.

Every figure is defined in :data:`DEFINITIONS`, which is copied into the JSON output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

DEFAULT_SPEED_RATIO = 10.0

DEFINITIONS: dict[str, str] = {
    "trusted_s": (
        "median over repeats of the trusted-side time of one step: wall time of the step measured in the "
        "trusted (calling) thread minus the time that thread spent blocked waiting on the accelerator. "
        "trusted-only: the whole wall time. plain: 0 (everything runs on the accelerator). With a CPU "
        "accelerator the two sides share the cores; --serialize runs each accelerator job only when the "
        "trusted side waits for it, which removes that contention (step_s is then the sum of both sides)."),
    "accelerator_s": (
        "median of the accelerator's busy time per step (sum of the executor's per-layer job times, "
        "synchronised on CUDA). plain: the whole step time. trusted-only: 0."),
    "step_s": (
        "median end-to-end wall time of one step (train: forward + loss + backward [+ optimizer step]; "
        "infer: forward under torch.no_grad in eval mode)."),
    "trusted_flops": (
        "FLOPs (2 per multiply-add) counted by torch.utils.flop_counter.FlopCounterMode in the trusted "
        "thread over one step, with asymml's QR/eigh/SVD formulas and a group-aware convolution-backward "
        "formula (torch's over-counts grouped weight gradients); element-wise ops count 0."),
    "total_flops": "FLOPs of the same step in `plain` mode (the whole model, unsplit).",
    "trusted_flop_fraction": "trusted_flops / total_flops.",
    "trusted_peak_bytes": (
        "peak bytes of live storages allocated by the trusted thread during one step (asymml's "
        "TrustedMemoryMeter, not counting op outputs that alias an input, e.g. views of weights; input batch "
        "and gradients created in the step included, released tensors and parameters excluded)."),
    "trusted_resident_bytes": "trusted_peak_bytes + parameter and buffer bytes (held by the trusted side).",
    "released_bytes": (
        "bytes of tensors derived from private data handed to the accelerator per step (all ledger kinds "
        "except 'weight'); weights are reported as released_weight_bytes."),
    "trusted_speedup": "trusted_s(trusted-only) / trusted_s(asym).",
    "limit": "total_flops / trusted_flops(asym): the speed-up if trusted time were proportional to FLOPs.",
    "efficiency": "trusted_speedup / limit.",
    "asym_vs_plain": "step_s(asym) / step_s(plain) (end-to-end cost of the split vs. no privacy).",
    "end_to_end_speedup": "step_s(trusted-only) / step_s(asym), as measured on this machine.",
    "projected_speedup": (
        "trusted_s(trusted-only) / max(trusted_s(asym), accelerator_s(asym) / speed_ratio). Model: the "
        "accelerator is speed_ratio times faster than the device its time was measured on, both sides "
        "overlap perfectly, a step takes as long as the slower side, transfers are free. With a real GPU "
        "accelerator use --speed-ratio 1."),
    "limit_fwd_conv_analytic": (
        "sum of conv MACs / sum of trusted conv MACs in the forward pass, per sample, with the ranks asym "
        "used: trusted MACs of a conv = min(fold, dense), fold = r*Cin/g*Cout*k^2 + r*Cout*k^2*H'W', "
        "dense = r*Cin*HW + Cout*Cin/g*k^2*H'W'; a conv whose input is not decomposed costs its full MACs."),
}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def projected_speedup(trusted_only_s: float, asym_trusted_s: float, asym_accel_s: float,
                      ratio: float = DEFAULT_SPEED_RATIO) -> float | None:
    """``trusted_only_s / max(asym_trusted_s, asym_accel_s / ratio)`` (see :data:`DEFINITIONS`)."""
    if ratio <= 0:
        raise ValueError(f"speed ratio must be > 0, got {ratio}")
    return _ratio(trusted_only_s, max(asym_trusted_s, asym_accel_s / ratio))


def derive_one(trusted_only: Mapping[str, Any], asym: Mapping[str, Any], plain: Mapping[str, Any] | None,
               ratio: float = DEFAULT_SPEED_RATIO) -> dict[str, Any]:
    """The derived figures for one (trusted-only, asym, plain) triple of run records."""
    sp = _ratio(trusted_only["trusted_s"], asym["trusted_s"])
    total = asym.get("total_flops") or (plain or {}).get("total_flops")
    limit = _ratio(total, asym.get("trusted_flops"))
    return {
        "trusted_speedup": sp,
        "limit": limit,
        "efficiency": _ratio(sp, limit),
        "asym_vs_plain": None if plain is None else _ratio(asym["step_s"], plain["step_s"]),
        "end_to_end_speedup": _ratio(trusted_only["step_s"], asym["step_s"]),
        "speed_ratio": ratio,
        "projected_speedup": projected_speedup(trusted_only["trusted_s"], asym["trusted_s"],
                                               asym["accelerator_s"], ratio),
        "limit_fwd_conv_analytic": asym.get("limit_fwd_conv_analytic"),
        "trusted_peak_bytes": asym.get("trusted_peak_bytes"),
        "trusted_resident_bytes": asym.get("trusted_resident_bytes"),
        "released_bytes": asym.get("released_bytes"),
    }


def derive(runs: Iterable[Mapping[str, Any]], ratio: float = DEFAULT_SPEED_RATIO) -> list[dict[str, Any]]:
    """Derived figures per model, input size, batch size, phase, backward mode (and sweep value)."""
    groups: dict[tuple, dict[tuple[str, str | None], Mapping[str, Any]]] = {}
    for r in runs:
        key = (r["model"], r["input_size"], r["batch_size"], r["phase"], r.get("sweep_value"))
        groups.setdefault(key, {})[(r["mode"], r.get("backward"))] = r
    out = []
    for key, by_mode in groups.items():
        model, size, batch, phase, sv = key
        to = next((v for (m, _), v in by_mode.items() if m == "trusted-only"), None)
        pl = next((v for (m, _), v in by_mode.items() if m == "plain"), None)
        for (mode, bwd), asym in by_mode.items():
            if mode != "asym" or to is None:
                continue
            d = {"model": model, "input_size": size, "batch_size": batch, "phase": phase, "backward": bwd,
                 "rank": asym.get("rank")}
            if sv is not None:
                d["sweep_value"] = sv
            d.update(derive_one(to, asym, pl, ratio))
            out.append(d)
    return out


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
