"""Differential privacy for released residuals: clipping + Gaussian noise, and Opacus-based accounting."""

from asymml.privacy.accounting import (
    PrivacyLedgerAccountant,
    combine_noise_multipliers,
    epsilon_for,
    solve_sigma,
)
from asymml.privacy.noise import NoiseConfig, ReleaseMechanism, clip_per_sample, per_sample_norms

__all__ = [
    "NoiseConfig",
    "ReleaseMechanism",
    "clip_per_sample",
    "per_sample_norms",
    "PrivacyLedgerAccountant",
    "combine_noise_multipliers",
    "epsilon_for",
    "solve_sigma",
]
