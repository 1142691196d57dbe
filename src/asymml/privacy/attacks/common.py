"""Shared pieces of the privacy attacks: the four attacked modes, per-layer release noise, calibration of
clip bounds on public data, building an audited split model, and image-quality metrics.

The four modes (issue 5):

``plain``       the accelerator sees everything (raw input, all weights): attacks must succeed here.
``noise-only``  every activation is clipped + noised and released whole (the "DP-only" baseline).
``asym``        the low-rank part stays trusted, the exact residual is released (no noise).
``asym+noise``  asym, with every released residual (and gradient residual) clipped + noised.

Noise is always drawn by :class:`~asymml.privacy.noise.ReleaseMechanism` inside the trusted context
(the split runtime passes it its trusted generator); this module only chooses a clip bound per layer.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...api import split as _split
from ...errors import ConfigError
from ..noise import NoiseConfig, ReleaseMechanism

__all__ = [
    "ATTACK_MODES",
    "AttackMode",
    "LayerwiseNoise",
    "NormRecorder",
    "Calibration",
    "calibrate",
    "build_split",
    "check_privacy_options",
    "PSNR_CAP",
    "psnr",
    "ssim",
    "normalized_psnr",
    "normalized_ssim",
    "affine_fit",
    "reidentification",
    "match_order",
    "PRIVATE_SPLIT_DEFAULTS",
]

PRIVATE_SPLIT_DEFAULTS: dict[str, Any] = {"warm_start": False, "basis": "sample", "decomposition": "eigh"}
"""Split options every noised mode uses: releases must depend on one sample each
(:func:`asymml.privacy.sensitivity.check_independent`): per-sample bases, no warm start, and a deterministic
decomposition (the runtime's power-iteration starts are publicly seeded per batch position, which couples
samples under add/remove adjacency)."""

#: The attacks measure what a *split* layer releases: every layer that can be split is split (as the
#: prototype), whatever a cost-aware placement would keep fully trusted on this machine.
SPLIT_EVERY_LAYER: dict[str, Any] = {"placement": "split"} if "placement" in inspect.signature(_split).parameters else {}

ATTACK_MODES = ("plain", "noise-only", "asym", "asym+noise")
_SPLIT_MODE = {"plain": "plain", "noise-only": "noise-only", "asym": "asym", "asym+noise": "asym"}
_NOISY = ("noise-only", "asym+noise")


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_privacy_options(
    *,
    sigma: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    noise_ratio: float | None = None,
) -> None:
    """Refuse unusable privacy options with a :class:`~asymml.errors.ConfigError` naming the option.

    ``sigma`` must be a finite number >= 0, ``epsilon`` > 0 (finite), ``delta`` in (0, 1),
    ``noise_ratio`` > 0; ``sigma`` and ``epsilon`` together conflict (sigma is solved from epsilon).
    """
    if sigma is not None and epsilon is not None:
        raise ConfigError(
            f"conflicting options: sigma={sigma!r} and epsilon={epsilon!r} are both set; give one "
            "(sigma is solved from epsilon)"
        )
    if sigma is not None and (not _real(sigma) or not math.isfinite(sigma) or sigma < 0):
        raise ConfigError(f"sigma must be a finite number >= 0 (got {sigma!r})")
    if epsilon is not None and (not _real(epsilon) or not math.isfinite(epsilon) or epsilon <= 0):
        raise ConfigError(f"epsilon must be a finite number > 0 (got {epsilon!r})")
    if delta is not None and (not _real(delta) or not 0.0 < delta < 1.0):
        raise ConfigError(f"delta must be in (0, 1) (got {delta!r})")
    if noise_ratio is not None and (not _real(noise_ratio) or not math.isfinite(noise_ratio) or noise_ratio <= 0):
        raise ConfigError(f"noise_ratio must be a finite number > 0 (got {noise_ratio!r})")


@dataclass(frozen=True)
class AttackMode:
    """One attacked configuration: a mode name, its per-release noise multiplier and privacy target.

    ``epsilon`` is the target the multiplier was solved for (None when there is no noise, i.e. epsilon is
    infinite). ``plain``/``asym`` take no noise; ``noise-only``/``asym+noise`` need ``sigma > 0``.
    """

    name: str
    sigma: float = 0.0
    epsilon: float | None = None
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.name not in ATTACK_MODES:
            raise ConfigError(f"unknown mode {self.name!r}; choose from {', '.join(ATTACK_MODES)}")
        check_privacy_options(sigma=self.sigma, delta=self.delta)
        if self.epsilon is not None:
            check_privacy_options(epsilon=self.epsilon)
        if self.name in _NOISY and not self.sigma > 0:
            raise ConfigError(f"mode {self.name!r} needs a noise multiplier sigma > 0 (or a target epsilon)")
        if self.name not in _NOISY and (self.sigma != 0 or self.epsilon is not None):
            hint = "use 'asym+noise'" if self.name == "asym" else "plain releases everything"
            raise ConfigError(f"conflicting options: mode {self.name!r} takes no noise ({hint})")

    @property
    def split_mode(self) -> str:
        """The :func:`asymml.split` mode that runs it."""
        return _SPLIT_MODE[self.name]

    @property
    def noisy(self) -> bool:
        return self.name in _NOISY

    @property
    def label(self) -> str:
        """Short human label, e.g. ``"asym+noise ε=4"``."""
        return f"{self.name} ε={self.epsilon:g}" if self.epsilon is not None else (
            f"{self.name} σ={self.sigma:g}" if self.noisy else self.name
        )

    def slug(self) -> str:
        """File-name friendly label."""
        s = self.name.replace("+", "_")
        if self.epsilon is not None:
            return f"{s}_eps{self.epsilon:g}"
        return f"{s}_sigma{self.sigma:g}" if self.noisy else s


class LayerwiseNoise:
    """A release mechanism with one clip bound per layer and one noise multiplier ``sigma``.

    Each layer gets its own :class:`~asymml.privacy.noise.ReleaseMechanism` (clip to ``clips[layer]``,
    add ``N(0, (sigma * clip)^2)``), so every release is still one Gaussian mechanism with multiplier
    ``sigma`` and the accounting of :mod:`asymml.privacy.accounting` applies unchanged. The noise comes
    from each mechanism's own secure generator (a fresh OS key per layer, never torch's global RNG).
    """

    def __init__(self, sigma: float, clips: Mapping[str, float], *, default_clip: float | None = None) -> None:
        check_privacy_options(sigma=sigma)
        self.sigma = float(sigma)
        self.clips = {k: float(v) for k, v in clips.items()}
        self.default_clip = default_clip
        self._mechs: dict[str, ReleaseMechanism] = {}
        self.counts: dict[str, int] = {}

    def _mech(self, layer: str) -> ReleaseMechanism:
        m = self._mechs.get(layer)
        if m is None:
            clip = self.clips.get(layer, self.default_clip)
            if clip is None:
                raise ConfigError(f"no clip bound calibrated for released layer {layer!r}")
            m = self._mechs[layer] = ReleaseMechanism(NoiseConfig(sigma=self.sigma, clip=clip))
        return m

    def __call__(self, r: Tensor, *, layer: str, generator: Any = None) -> Tensor:
        self.counts[layer] = self.counts.get(layer, 0) + 1
        return self._mech(layer)(r, layer=layer, generator=generator)

    def multipliers_released(self) -> dict[str, float]:
        """Noise multiplier of each layer released so far (all ``sigma``)."""
        return {k: self.sigma for k in self.counts}

    @property
    def releases(self) -> int:
        """Noised releases so far (all layers)."""
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"LayerwiseNoise(sigma={self.sigma:g}, layers={len(self.clips)})"


class NormRecorder:
    """An identity "mechanism" that records each release's per-sample L2 norms and size (calibration)."""

    def __init__(self) -> None:
        self.norms: dict[str, list[Tensor]] = {}
        self.numel: dict[str, int] = {}
        self.calls = 0

    def __call__(self, r: Tensor, *, layer: str, generator: torch.Generator | None = None) -> Tensor:
        self.calls += 1
        self.norms.setdefault(layer, []).append(r.detach().reshape(r.shape[0], -1).norm(dim=1))
        self.numel[layer] = int(r[0].numel())
        return r

    def medians(self) -> dict[str, float]:
        return {k: float(torch.cat(v).median()) for k, v in self.norms.items()}


@dataclass
class Calibration:
    """Per-layer statistics of a mode's releases on public calibration data, and the clip rule.

    ``release_norm`` / ``full_norm``: median per-sample norm of the released tensor and of the whole
    activation (or activation gradient) it comes from; ``numel``: elements per sample;
    ``releases_per_step``: releases per training step (forward + backward).
    """

    mode: str
    release_norm: dict[str, float] = field(default_factory=dict)
    full_norm: dict[str, float] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    releases_per_step: int = 0

    def clips(self, sigma: float, noise_ratio: float) -> dict[str, float]:
        """Clip bound per layer: ``min(median release norm, noise_ratio * median full norm / (sigma sqrt(d)))``.

        The second term makes the expected noise norm ``sigma * clip * sqrt(d)`` at most ``noise_ratio``
        times the layer's typical whole activation, the same rule in every mode. It never changes the
        signal-to-noise ratio of a whole-activation release (noise-only: at best ``1 / (sigma sqrt(d))``);
        for asym it lets the trusted low-rank part carry the signal.
        """
        check_privacy_options(sigma=sigma, noise_ratio=noise_ratio)
        out = {}
        for layer, rn in self.release_norm.items():
            c = rn
            if sigma > 0:
                c = min(c, noise_ratio * self.full_norm.get(layer, rn) / (sigma * math.sqrt(self.numel[layer])))
            out[layer] = max(c, 1e-12)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "release_norm": self.release_norm, "full_norm": self.full_norm,
                "numel": self.numel, "releases_per_step": self.releases_per_step}


LossFn = Callable[[Tensor, Tensor], Tensor]


def _record(model: nn.Module, split_mode: str, x: Tensor, y: Tensor | None, loss_fn: LossFn | None,
            split_kw: Mapping[str, Any]) -> NormRecorder:
    rec = NormRecorder()
    m = copy.deepcopy(model)
    sm = _split(m, mode=split_mode, noise=rec, **{**SPLIT_EVERY_LAYER, **split_kw})
    if y is not None and loss_fn is not None:
        loss_fn(sm(x), y).backward()
    else:
        with torch.no_grad():
            sm(x)
    return rec


def calibrate(
    model: nn.Module,
    mode: AttackMode | str,
    x: Tensor,
    y: Tensor | None = None,
    *,
    loss_fn: LossFn | None = None,
    split_kw: Mapping[str, Any] | None = None,
) -> Calibration:
    """Measure a mode's releases on public data ``x`` (a forward, and a backward when ``y`` is given).

    The model is deep-copied (its parameters and BatchNorm statistics are not touched). Both the train
    and the eval plan are measured (their release points may differ); ``releases_per_step`` counts the
    train-mode forward + backward.
    """
    name = mode.name if isinstance(mode, AttackMode) else str(mode)
    if name not in ATTACK_MODES:
        raise ConfigError(f"unknown mode {name!r}; choose from {', '.join(ATTACK_MODES)}")
    cal = Calibration(name)
    if name == "plain":
        return cal
    kw = dict(split_kw or {})
    split_mode = _SPLIT_MODE[name]
    was_training = model.training
    for train in (False, True):
        model.train(train)
        try:
            full = _record(model, "noise-only", x, y if train else None, loss_fn, kw)
            rel = full if split_mode == "noise-only" else _record(
                model, split_mode, x, y if train else None, loss_fn, kw)
        finally:
            model.train(was_training)
        cal.release_norm.update(rel.medians())
        cal.full_norm.update(full.medians())
        cal.numel.update(rel.numel)
        if train:
            cal.releases_per_step = rel.calls
    return cal


def build_split(
    model: nn.Module,
    mode: AttackMode,
    clips: Mapping[str, float] | None = None,
    *,
    audit: bool = True,
    **split_kw: Any,
) -> Any:
    """``asymml.split`` ``model`` in ``mode`` (noise: :class:`LayerwiseNoise` with ``clips``).

    Noised modes get :data:`PRIVATE_SPLIT_DEFAULTS` (cold starts, per-sample bases) unless ``split_kw``
    overrides them, and are checked with :func:`~asymml.privacy.sensitivity.check_independent`.
    """
    from ..sensitivity import check_independent

    noise = None
    if mode.noisy:
        if clips is None:
            raise ConfigError(f"mode {mode.name!r} needs calibrated clip bounds")
        noise = LayerwiseNoise(mode.sigma, clips)
        split_kw = {**PRIVATE_SPLIT_DEFAULTS, **split_kw}
        check_independent(model, training=model.training, basis=split_kw["basis"], warm_start=split_kw["warm_start"],
                          decomposition=split_kw.get("decomposition", "power"), rank=split_kw.get("rank"),
                          public_random_start=True)
    return _split(model, mode=mode.split_mode, noise=noise, audit=audit, **{**SPLIT_EVERY_LAYER, **split_kw})


# --------------------------------------------------------------------------- image metrics


PSNR_CAP = 100.0
"""PSNR of an exact reconstruction is infinite; it is reported as this many dB."""


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image PSNR in dB (``(N,)``, capped at :data:`PSNR_CAP`), images in ``[0, data_range]``
    (torchmetrics)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    pred = pred.detach().float().clamp(0, data_range)
    target = target.detach().float()
    out = peak_signal_noise_ratio(pred, target, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return out.nan_to_num(PSNR_CAP, PSNR_CAP).clamp(max=PSNR_CAP)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM (``(N,)``; Gaussian window 11, sigma 1.5; torchmetrics)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    pred = pred.detach().float().clamp(0, data_range)
    target = target.detach().float()
    k = min(11, target.shape[-1] - (1 - target.shape[-1] % 2), target.shape[-2] - (1 - target.shape[-2] % 2))
    out = structural_similarity_index_measure(pred, target, data_range=data_range, reduction="none",
                                              kernel_size=max(k, 3))
    return out.reshape(-1)


def affine_fit(pred: Tensor, target: Tensor) -> Tensor:
    """``a * pred + b`` per image and channel, ``a, b`` least-squares fitted to ``target``, clamped to [0, 1].

    Removes what a decoder trained on a few public photos cannot know -- each image's brightness, contrast
    and colour balance -- so that the scores below measure the *structure* that leaked.  The fit uses the
    target (an oracle), so normalised scores are an upper bound on what the reconstruction reveals.
    """
    p = pred.detach().double().flatten(2)
    t = target.detach().double().flatten(2)
    pc = p - p.mean(-1, keepdim=True)
    tm = t.mean(-1, keepdim=True)
    a = (pc * (t - tm)).sum(-1, keepdim=True) / pc.square().sum(-1, keepdim=True).clamp_min(1e-12)
    return (a * pc + tm).clamp(0, 1).reshape(pred.shape).to(target.dtype)


def normalized_psnr(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR after :func:`affine_fit` (scale-invariant; a constant guess scores the image's
    per-channel-mean PSNR, ``-10 log10(variance)``)."""
    return psnr(affine_fit(pred, target), target)


def normalized_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image SSIM after :func:`affine_fit` (scale-invariant)."""
    return ssim(affine_fit(pred, target), target)


def _standardize(x: Tensor) -> Tensor:
    f = x.detach().double().flatten(2)
    f = f - f.mean(-1, keepdim=True)  # per channel: colour balance does not count
    f = f.flatten(1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reidentification(recon: Tensor, candidates: Tensor, truth: Tensor | None = None) -> dict[str, float]:
    """Does each reconstruction pick out its own private image among ``candidates``?

    Similarity: correlation of the per-channel-centred images (scale-invariant).  ``truth[i]`` is the
    index in ``candidates`` of ``recon[i]``'s image (default ``i``).  Returns ``accuracy`` (top-1),
    ``top5``, ``chance`` (``1 / len(candidates)``) and ``candidates``.
    """
    if truth is None:
        truth = torch.arange(len(recon))
    sim = _standardize(recon) @ _standardize(candidates).T
    ranks = (sim > sim.gather(1, truth.view(-1, 1))).sum(1)  # 0 = the right image is the most similar
    return {"accuracy": float((ranks == 0).double().mean()), "top5": float((ranks < 5).double().mean()),
            "chance": 1.0 / len(candidates), "candidates": float(len(candidates))}


def match_order(recon: Tensor, target: Tensor) -> Tensor:
    """Permute ``recon`` (a batch reconstructed in unknown order) to best match ``target`` (min MSE)."""
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(recon.reshape(len(recon), -1).float(), target.reshape(len(target), -1).float())
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty_like(recon)
    out[torch.as_tensor(cols)] = recon[torch.as_tensor(rows)]
    return out


def soft_cross_entropy(logits: Tensor, soft: Tensor) -> Tensor:
    """Mean cross-entropy against soft labels (probabilities)."""
    return -(soft * F.log_softmax(logits, dim=1)).sum(1).mean()
