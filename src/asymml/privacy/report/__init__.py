"""``asymml privacy`` report: utility (digits test accuracy) and attacks (inversion, gradient leakage,
statistics) for the four modes -- plain, noise-only at several epsilon, asym, asym+noise at the same
epsilon -- written to a directory:

* ``privacy.json``  -- ``rows`` (one per mode and epsilon: ``mode, sigma, epsilon, delta, test_accuracy,
  inversion_psnr, inversion_ssim, dlg_psnr`` and more), the configuration, the claim check, notes;
* ``figures.json``  -- the data behind every plot;
* ``summary.md``    -- the table, the verdict on the paper's claim, what epsilon composes, caveats;
* ``grid_inversion.png`` / ``grid_dlg.png`` -- original | what the accelerator saw | best reconstruction;
* ``privacy_utility.png`` -- test accuracy vs epsilon and vs attack PSNR, asym against noise-only.

How epsilon is set: for each mode and target epsilon, one noise multiplier sigma is planned
(:func:`~asymml.privacy.accounting.plan_sigma`, Opacus RDP) for the digits training run -- every Gaussian a
sample goes through in a step (forward residuals, protected-mode gradient residuals and, with DP-SGD on the
updates, the clipped and noised trusted share of the update) composed over all steps, under Poisson sampling
from the secure generator.  Each row's ``covers`` lists what its epsilon accounts for
(:class:`~asymml.privacy.accounting.PrivacyLedger`).  The photo attacks use the same sigma and clip rule.

Leakage measures that can fail: besides PSNR/SSIM, normalised PSNR/SSIM (per-image affine fit), re-
identification accuracy among all private patches, a joint attack on all of a sample's releases, and how
well the accelerator recovers ``span(U)`` from the residual's null space (``span_u``).
"""

from .claims import claim_check
from .config import ReportConfig
from .markdown import summary_markdown
from .run import PrivacyRun, run_attack, run_report

__all__ = ["ReportConfig", "PrivacyRun", "run_report", "run_attack", "claim_check", "summary_markdown"]
