"""Validator (like Opacus' ModuleValidator): what will run where, before any computation; and fixes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .rules import INPLACE_MODULES
from .transform import Placement, build_plan, trace


@dataclass
class ValidationReport:
    """Placement of every op: ``split`` (trusted low-rank + accelerator residual) or ``trusted``."""

    placements: list[Placement]
    n_regions: int
    inplace_modules: list[str]
    #: ``(module, reason)`` of modules that couple the samples of a batch (``validate(..., privacy=True)``)
    coupling: list[tuple[str, str]] = field(default_factory=list)

    @property
    def unknown(self) -> list[Placement]:
        return [p for p in self.placements if p.where == "trusted (unknown op)"]

    @property
    def ok(self) -> bool:
        return not self.unknown and not self.coupling

    def __str__(self) -> str:
        lines = [f"{len(self.placements)} ops, {self.n_regions} split regions"]
        for p in self.placements:
            if p.where == "io":
                continue
            reg = f" [region {p.region}]" if p.region is not None else ""
            lines.append(f"  {p.where:22s} {p.node}{reg}  ({p.detail})")
        if self.inplace_modules:
            lines.append("in-place modules (fine for asymml; asymml.fix() makes them out-of-place): "
                         + ", ".join(self.inplace_modules))
        for name, reason in self.coupling:
            lines.append(f"couples samples (breaks per-sample DP sensitivity): {name}: {reason}")
        return "\n".join(lines)


def validate(model: nn.Module, *, strict: bool = False, privacy: bool = False) -> ValidationReport:
    """Trace ``model`` and report where every op will run, in its current train/eval state.

    ``privacy=True`` also lists the modules that couple the samples of a batch (train-mode BatchNorm, ...),
    which break the per-sample sensitivity DP noise relies on (``report.ok`` is then False; fix them with
    ``fix(model, privacy=True)``).  Raises :class:`~asymml.UntraceableModelError` if fx cannot trace it,
    and in strict mode :class:`~asymml.UnsupportedOperationError` for ops with no rule that are not known
    non-linear.
    """
    gm = trace(model)
    plan = build_plan(gm, strict=strict)
    inplace = [n for n, m in model.named_modules() if isinstance(m, INPLACE_MODULES) and getattr(m, "inplace", False)]
    coupling: list[tuple[str, str]] = []
    if privacy:
        from .privacy.sensitivity import coupling_layers

        coupling = coupling_layers(model)
    return ValidationReport(plan.placements, len(plan.regions), inplace, coupling)


def group_count(num_channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``num_channels`` that is at most ``max_groups`` (Opacus uses ``min(32, C)``, which
    need not divide ``C``)."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1 (got {num_channels})")
    return max(g for g in range(1, min(max_groups, num_channels) + 1) if num_channels % g == 0)


def _group_norm_for(bn: nn.modules.batchnorm._BatchNorm) -> nn.GroupNorm:
    c = bn.num_features
    gn = nn.GroupNorm(group_count(c), c, eps=bn.eps, affine=bn.affine)
    if bn.affine and bn.weight is not None and not isinstance(bn.weight, nn.parameter.UninitializedParameter):
        gn.weight.data.copy_(bn.weight.detach())
        gn.bias.data.copy_(bn.bias.detach())
    if bn.affine and bn.weight is not None and bn.weight.device.type != "meta":
        gn = gn.to(bn.weight.device)
    gn.train(bn.training)
    return gn


def fix(model: nn.Module, *, privacy: bool = False) -> nn.Module:
    """Make in-place activations out-of-place, in place on ``model`` (returned for chaining).

    ``privacy=True`` also swaps every BatchNorm for a GroupNorm with the same channels (groups: the largest
    divisor of ``C`` up to 32; affine parameters copied), as Opacus' ``ModuleValidator.fix``: train-mode
    BatchNorm mixes the samples of a batch, GroupNorm normalises each sample on its own and keeps no
    running statistics computed from private data.
    """
    for m in model.modules():
        if isinstance(m, INPLACE_MODULES) and getattr(m, "inplace", False):
            m.inplace = False
    if privacy:
        if isinstance(model, nn.modules.batchnorm._BatchNorm):
            raise TypeError("fix(privacy=True) replaces BatchNorm children in place; wrap a bare BatchNorm in a module")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(parent, name, _group_norm_for(child))
    return model
