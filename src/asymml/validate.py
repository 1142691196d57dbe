"""Validator (like Opacus' ModuleValidator): what will run where, before any computation; and fixes."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .rules import INPLACE_MODULES
from .transform import Placement, build_plan, trace


@dataclass
class ValidationReport:
    """Placement of every op: ``split`` (trusted low-rank + accelerator residual) or ``trusted``."""

    placements: list[Placement]
    n_regions: int
    inplace_modules: list[str]

    @property
    def unknown(self) -> list[Placement]:
        return [p for p in self.placements if p.where == "trusted (unknown op)"]

    @property
    def ok(self) -> bool:
        return not self.unknown

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
        return "\n".join(lines)


def validate(model: nn.Module, *, strict: bool = False) -> ValidationReport:
    """Trace ``model`` and report where every op will run, in its current train/eval state.

    Raises :class:`~asymml.UntraceableModelError` if fx cannot trace it, and in strict mode
    :class:`~asymml.UnsupportedOperationError` for ops with no rule that are not known non-linear.
    """
    gm = trace(model)
    plan = build_plan(gm, strict=strict)
    inplace = [n for n, m in model.named_modules() if isinstance(m, INPLACE_MODULES) and getattr(m, "inplace", False)]
    return ValidationReport(plan.placements, len(plan.regions), inplace)


def fix(model: nn.Module) -> nn.Module:
    """Make in-place activations out-of-place, in place on ``model`` (returned for chaining)."""
    for m in model.modules():
        if isinstance(m, INPLACE_MODULES) and getattr(m, "inplace", False):
            m.inplace = False
    return model
