"""Privacy attacks on the release ledger (what an honest-but-curious accelerator can learn, SPEC §2).

* :func:`inversion_attack` -- a decoder trained on public photos maps releases back to private inputs;
* :func:`gradient_leakage_attack` -- DLG / inverting gradients on the per-step weight update that the
  public weight releases reveal (:func:`capture_update`);
* :func:`mutual_information`, :func:`energy_ratios` -- statistics of the releases;
* :func:`train_utility` -- digits test accuracy and accounted epsilon of one mode.

Modes are :class:`AttackMode` (``plain``, ``noise-only``, ``asym``, ``asym+noise``); noised modes use
:class:`LayerwiseNoise` (one clip bound per layer, calibrated on public data with :func:`calibrate`).
"""

from .common import (
    ATTACK_MODES,
    AttackMode,
    Calibration,
    LayerwiseNoise,
    NormRecorder,
    build_split,
    calibrate,
    check_privacy_options,
    match_order,
    psnr,
    ssim,
)
from .gradient import DLGResult, UpdateCapture, capture_update, gradient_leakage_attack, weight_release_names
from .inversion import (
    Decoder,
    InversionResult,
    PhotoTask,
    ReleaseCapture,
    capture_training_releases,
    inversion_attack,
    release_of,
    train_decoder,
    visualize_release,
)
from .statistics import MI_ESTIMATOR, MIEstimate, energy_ratios, mutual_information
from .utility import DigitsTask, UtilityConfig, UtilityResult, train_utility

__all__ = [
    "ATTACK_MODES", "AttackMode", "Calibration", "LayerwiseNoise", "NormRecorder", "build_split", "calibrate",
    "check_privacy_options", "match_order", "psnr", "ssim",
    "DLGResult", "UpdateCapture", "capture_update", "gradient_leakage_attack", "weight_release_names",
    "Decoder", "InversionResult", "PhotoTask", "ReleaseCapture", "capture_training_releases", "inversion_attack",
    "release_of", "train_decoder", "visualize_release",
    "MI_ESTIMATOR", "MIEstimate", "energy_ratios", "mutual_information",
    "DigitsTask", "UtilityConfig", "UtilityResult", "train_utility",
]
