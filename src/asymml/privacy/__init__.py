"""Differential privacy for released residuals: clipping + Gaussian noise, and Opacus-based accounting."""

from asymml.privacy.accounting import (
    PrivacyLedgerAccountant,
    combine_noise_multipliers,
    epsilon_for,
    solve_sigma,
)
from asymml.privacy.noise import NoiseConfig, ReleaseMechanism, clip_per_sample, per_sample_norms

from . import attacks  # noqa: E402
from .report import ReportConfig, run_attack, run_report  # noqa: E402

__all__ = [
    "attacks",
    "ReportConfig",
    "run_report",
    "run_attack",
    "NoiseConfig",
    "ReleaseMechanism",
    "clip_per_sample",
    "per_sample_norms",
    "PrivacyLedgerAccountant",
    "combine_noise_multipliers",
    "epsilon_for",
    "solve_sigma",
]
