"""Utility side of the privacy report: train a small CNN on ``digits`` in one attacked mode and measure
its test accuracy, with the epsilon its noised releases cost (Opacus accountant, composed over every
release of a sample in the run).

The run is DP-SGD style:

* batches are drawn by Poisson sampling (each training sample independently with probability
  ``batch_size / N``) from a :class:`~asymml.privacy.secure_rng.SecureGenerator` (OS key), so batch
  membership is unpredictable to the accelerator and the accountant may use subsampling amplification;
* the loss is the per-sample sum divided by the *expected* batch size;
* with ``dp_updates`` (default) the trusted share of every update is clipped per sample and noised
  (:class:`asymml.training.dp.UpdatePrivatizer`, one more Gaussian per step);
* sigma is planned once (:func:`~asymml.privacy.accounting.plan_sigma`) for every Gaussian of a step and
  the run is accounted by one :class:`~asymml.privacy.accounting.PrivacyLedger` (activation and gradient
  releases and the update), whose ``covers`` says what the epsilon accounts for;
* the model's BatchNorm is swapped for GroupNorm and noised modes split per sample with cold starts, so
  each release depends on one sample (:func:`~asymml.privacy.sensitivity.check_independent`).

10% of the training split is held out as *public* calibration data (clip bounds are measured on it, never
on the training samples).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...validate import fix
from ..accounting import PrivacyLedger, plan_sigma
from ..secure_rng import SecureGenerator, poisson_mask
from .common import PRIVATE_SPLIT_DEFAULTS, AttackMode, Calibration, build_split, calibrate, check_privacy_options
from .statistics import energy_ratios

__all__ = ["UtilityConfig", "UtilityResult", "DigitsTask", "train_utility"]


@dataclass(frozen=True)
class UtilityConfig:
    """The digits training run whose accuracy and epsilon the report uses."""

    model: str = "vgg11_bn"
    width: float = 0.25
    image_size: int = 16
    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    public_fraction: float = 0.1
    noise_ratio: float = 0.1
    rank: Any = "schedule"
    seed: int = 0
    dp_updates: bool = True  # clip + noise the trusted share of every update (DP-SGD), covered by epsilon
    update_clip: float = 1.0  # per-sample L2 bound of the trusted share of a sample's gradient
    limit_train: int | None = None  # use only this many training samples (tests)

    def validate(self) -> None:
        if self.limit_train is not None and (isinstance(self.limit_train, bool) or not isinstance(self.limit_train, int)
                                             or self.limit_train < 2):
            raise ConfigError(f"limit_train must be an integer >= 2 (got {self.limit_train!r})")
        if not (isinstance(self.update_clip, (int, float)) and math.isfinite(self.update_clip) and self.update_clip > 0):
            raise ConfigError(f"update_clip must be a finite number > 0 (got {self.update_clip!r})")
        for name in ("epochs", "batch_size", "image_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer (got {v!r})")
        if not 0.0 < self.public_fraction < 1.0:
            raise ConfigError(f"public_fraction must be in (0, 1) (got {self.public_fraction!r})")
        if not (self.lr > 0 and self.width > 0):
            raise ConfigError("lr and width must be > 0")
        check_privacy_options(noise_ratio=self.noise_ratio)


class DigitsTask:
    """Data, model factory and training plan of the utility run (shared by every mode)."""

    def __init__(self, cfg: UtilityConfig | None = None) -> None:
        from ...data import load_dataset

        self.cfg = cfg = cfg or UtilityConfig()
        cfg.validate()
        ds = load_dataset("digits", image_size=cfg.image_size, seed=cfg.seed)
        x, y = ds.train.tensors
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))
        n_pub = max(1, int(round(cfg.public_fraction * len(y))))
        self.x_public, self.y_public = x[perm[:n_pub]], y[perm[:n_pub]]
        self.x_train, self.y_train = x[perm[n_pub:]], y[perm[n_pub:]]
        if cfg.limit_train is not None:
            self.x_train, self.y_train = self.x_train[:cfg.limit_train], self.y_train[:cfg.limit_train]
        self.x_test, self.y_test = ds.test.tensors
        self.num_classes = ds.num_classes
        self.in_channels = ds.in_channels
        self.sample_rate = min(1.0, cfg.batch_size / len(self.y_train))
        self.steps = cfg.epochs * math.ceil(len(self.y_train) / cfg.batch_size)
        self._cal: dict[str, Calibration] = {}

    def make_model(self) -> nn.Module:
        from ...models import get_model

        torch.manual_seed(self.cfg.seed)
        model = get_model(self.cfg.model, num_classes=self.num_classes, in_channels=self.in_channels,
                          image_size=self.cfg.image_size, width=self.cfg.width)
        return fix(model, privacy=True)  # GroupNorm: per-sample normalisation, as DP needs (same in every mode)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="sum") / self.cfg.batch_size

    def calibration(self, mode_name: str) -> Calibration:
        """Release statistics of ``mode_name`` on the public split (cached)."""
        cal = self._cal.get(mode_name)
        if cal is None:
            noisy = mode_name in ("noise-only", "asym+noise")
            cal = self._cal[mode_name] = calibrate(
                self.make_model(), mode_name, self.x_public, self.y_public, loss_fn=self.loss,
                split_kw={"rank": self.cfg.rank, **(PRIVATE_SPLIT_DEFAULTS if noisy else {})})
        return cal

    def sigma_for(self, mode_name: str, epsilon: float, delta: float) -> float:
        """Multiplier of every Gaussian of a step (releases and, with ``dp_updates``, the update) that makes
        this run cost ``(epsilon, delta)`` in ``mode_name`` (:func:`~asymml.privacy.accounting.plan_sigma`)."""
        check_privacy_options(epsilon=epsilon, delta=delta)
        k = self.calibration(mode_name).releases_per_step
        if k == 0:
            raise ConfigError(f"mode {mode_name!r} releases nothing to noise")
        try:
            return plan_sigma(epsilon, delta, steps=self.steps, releases_per_step=k,
                              updates_per_step=1 if self.cfg.dp_updates else 0, sample_rate=self.sample_rate,
                              poisson=True)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def mode(self, name: str, *, epsilon: float | None = None, sigma: float | None = None,
             delta: float = 1e-5) -> AttackMode:
        """An :class:`AttackMode` whose sigma is solved for this run when ``epsilon`` is given."""
        check_privacy_options(sigma=sigma, epsilon=epsilon, delta=delta)
        if epsilon is not None:
            return AttackMode(name, sigma=self.sigma_for(name, epsilon, delta), epsilon=epsilon, delta=delta)
        return AttackMode(name, sigma=sigma or 0.0, delta=delta)


@dataclass
class UtilityResult:
    """What one digits run gave."""

    mode: str
    sigma: float
    epsilon_target: float | None
    epsilon: float | None  # accounted over the run; None = infinite, or the updates are not noised (see notes)
    delta: float
    test_accuracy: float  # the split model as deployed (noise on at inference too)
    test_accuracy_noiseless: float  # the trained weights evaluated without any noise
    final_loss: float
    steps: int
    releases_per_step: int
    sample_rate: float
    seconds: float
    epsilon_releases_only: float | None = None  # the releases' epsilon alone (what a run without DP-SGD spends)
    covers: list[str] = field(default_factory=list)  # what epsilon accounts for (PrivacyLedger.covers)
    notes: list[str] = field(default_factory=list)
    accountant: dict[str, Any] = field(default_factory=dict)
    release_energy: dict[str, dict[str, float]] = field(default_factory=dict)  # test set, trained weights

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def _accuracy(f: Any, x: Tensor, y: Tensor, batch: int = 512) -> float:
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((f(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


def _step_multipliers(counts: dict[str, int], before: dict[str, int], sigma: float) -> tuple[list[float], list[float]]:
    acts, grads = [], []
    for layer, n in counts.items():
        new = n - before.get(layer, 0)
        (grads if layer.endswith(":grad") else acts).extend([sigma] * new)
    return acts, grads


def train_utility(task: DigitsTask, mode: AttackMode, *, progress: Any = None) -> UtilityResult:
    """Train ``task``'s model in ``mode`` (SGD + momentum, secure Poisson batches, DP-SGD updates when the
    mode is noised and ``dp_updates``) and measure test accuracy and the epsilon of everything released."""
    cfg = task.cfg
    model = task.make_model()
    clips = task.calibration(mode.name).clips(mode.sigma, cfg.noise_ratio) if mode.noisy else None
    sm = build_split(model, mode, clips, audit=False, rank=cfg.rank, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gen = SecureGenerator()  # batch membership and update noise: unpredictable to the accelerator
    ledger = PrivacyLedger("rdp")
    privatizer = None
    if mode.noisy and cfg.dp_updates:
        from ...training.dp import UpdatePrivatizer

        privatizer = UpdatePrivatizer(model.parameters(), clip=cfg.update_clip, noise_multiplier=mode.sigma,
                                      generator=gen)
        sm.public_grad_sink = privatizer.public_sink
    n = len(task.y_train)
    expected = task.sample_rate * n
    t0 = time.perf_counter()
    loss_v = math.nan
    model.train()
    for step in range(task.steps):
        mask = poisson_mask(n, task.sample_rate, generator=gen)
        before = dict(sm.mechanism.counts) if mode.noisy else {}
        idx = mask.nonzero().flatten()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        if privatizer is not None:
            privatizer.reset()
            for i in idx.tolist():  # one micro-batch per sample: its own trusted-share gradient
                loss = task.loss(sm(task.x_train[i:i + 1]), task.y_train[i:i + 1]) * cfg.batch_size
                loss.backward()
                privatizer.add_sample()
                total += float(loss.detach())
            privatizer.finish(expected, step=step)  # an empty batch still gets its noise
        elif len(idx):
            loss = task.loss(sm(task.x_train[idx]), task.y_train[idx])
            loss.backward()
            total = float(loss.detach()) * cfg.batch_size
        if len(idx) or privatizer is not None:
            opt.step()
        if len(idx):
            loss_v = total / len(idx)
        if mode.noisy:
            acts, grads = _step_multipliers(sm.mechanism.counts, before, mode.sigma)
            if privatizer is not None:
                # micro-batches of one: each sample went through the releases once; count one sample's share
                k = max(len(idx), 1)
                acts, grads = acts[: len(acts) // k], grads[: len(grads) // k]
                if not len(idx):
                    cal = task.calibration(mode.name)
                    acts, grads = [mode.sigma] * cal.releases_per_step, []
            ledger.step(task.sample_rate, activations=acts, gradients=grads,
                        updates=[mode.sigma] if privatizer is not None else [], sampled_by=gen)
        if progress is not None:
            progress(step + 1, task.steps, loss_v)
    seconds = time.perf_counter() - t0
    sm.public_grad_sink = None
    model.eval()
    test_acc = _accuracy(sm, task.x_test, task.y_test, batch=len(task.y_test))
    energy = energy_ratios(sm.release_stats()) if mode.split_mode != "plain" else {
        "input": {"rank": 0, "mean": 1.0, "max": 1.0}}
    clean = copy.deepcopy(model).eval()
    test_clean = _accuracy(clean, task.x_test, task.y_test)
    summary = ledger.summary(mode.delta) if mode.noisy else {"epsilon": None, "covers": [], "notes": [
        "no noise: nothing is protected"], "epsilon_releases_only": None}
    return UtilityResult(
        mode=mode.name, sigma=mode.sigma, epsilon_target=mode.epsilon,
        epsilon=summary["epsilon"], delta=mode.delta, epsilon_releases_only=summary.get("epsilon_releases_only"),
        test_accuracy=test_acc, test_accuracy_noiseless=test_clean, final_loss=loss_v, steps=task.steps,
        releases_per_step=task.calibration(mode.name).releases_per_step, sample_rate=task.sample_rate,
        seconds=seconds, covers=list(summary["covers"]), notes=list(summary["notes"]),
        accountant=ledger.describe() if mode.noisy else {}, release_energy=energy,
    )
