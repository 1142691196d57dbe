"""Differential privacy for what leaves the trusted context.

The DP core (imported eagerly; the runtime and training depend on it, and it never imports the
``asymml`` façade): secure randomness (:mod:`.secure_rng`), clipping + Gaussian noise (:mod:`.noise`),
accounting and sigma planning (:mod:`.accounting`), per-sample independence checks (:mod:`.sensitivity`).

The experiments -- attacks (:mod:`.attacks`) and the ``asymml privacy`` report (:mod:`.report`) -- sit above
the façade and are imported lazily, on first use of ``asymml.privacy.attacks`` / ``run_report`` / ...
"""

from __future__ import annotations

import importlib
from typing import Any

from asymml.privacy.accounting import (
    RELEASE_KINDS,
    PrivacyLedger,
    PrivacyLedgerAccountant,
    combine_noise_multipliers,
    epsilon_for,
    plan_sigma,
    solve_sigma,
)
from asymml.privacy.noise import NoiseConfig, ReleaseMechanism, clip_per_sample, per_sample_norms
from asymml.privacy.secure_rng import (
    InsecureNoiseWarning,
    PoissonSampler,
    SecureGenerator,
    poisson_batches,
    poisson_mask,
)
from asymml.privacy.sensitivity import check_independent, coupling_layers

_LAZY = {
    "attacks": ("asymml.privacy.attacks", None),
    "report": ("asymml.privacy.report", None),
    "ReportConfig": ("asymml.privacy.report", "ReportConfig"),
    "run_report": ("asymml.privacy.report", "run_report"),
    "run_attack": ("asymml.privacy.report", "run_attack"),
}


def __getattr__(name: str) -> Any:
    """Import the experiments (attacks, report) on first use only."""
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'asymml.privacy' has no attribute {name!r}")
    module = importlib.import_module(target[0])
    value = module if target[1] is None else getattr(module, target[1])
    globals()[name] = value
    return value


__all__ = [
    "attacks",
    "ReportConfig",
    "run_report",
    "run_attack",
    "NoiseConfig",
    "ReleaseMechanism",
    "clip_per_sample",
    "per_sample_norms",
    "PrivacyLedger",
    "PrivacyLedgerAccountant",
    "RELEASE_KINDS",
    "combine_noise_multipliers",
    "epsilon_for",
    "plan_sigma",
    "solve_sigma",
    "SecureGenerator",
    "InsecureNoiseWarning",
    "PoissonSampler",
    "poisson_batches",
    "poisson_mask",
    "check_independent",
    "coupling_layers",
]
