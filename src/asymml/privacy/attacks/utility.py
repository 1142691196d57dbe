"""Utility side of the privacy report: train a small CNN on ``digits`` in one attacked mode and measure
its test accuracy, with the epsilon its noised releases cost (Opacus accountant, composed over every
release of a sample in the run).

The run is DP-style: batches are drawn by Poisson sampling (each training sample independently with
probability ``batch_size / N``), so the accountant may use the subsampling amplification; the loss is
the per-sample sum divided by the *expected* batch size. 10% of the training split is held out as
*public* calibration data (clip bounds are measured on it, never on the training samples).
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
from ..accounting import PrivacyLedgerAccountant, solve_sigma
from .common import AttackMode, Calibration, build_split, calibrate, check_privacy_options
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

    def validate(self) -> None:
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
        self.x_test, self.y_test = ds.test.tensors
        self.num_classes = ds.num_classes
        self.in_channels = ds.in_channels
        self.sample_rate = min(1.0, cfg.batch_size / len(self.y_train))
        self.steps = cfg.epochs * math.ceil(len(self.y_train) / cfg.batch_size)
        self._cal: dict[str, Calibration] = {}

    def make_model(self) -> nn.Module:
        from ...models import get_model

        torch.manual_seed(self.cfg.seed)
        return get_model(self.cfg.model, num_classes=self.num_classes, in_channels=self.in_channels,
                         image_size=self.cfg.image_size, width=self.cfg.width)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction="sum") / self.cfg.batch_size

    def calibration(self, mode_name: str) -> Calibration:
        """Release statistics of ``mode_name`` on the public split (cached)."""
        cal = self._cal.get(mode_name)
        if cal is None:
            cal = self._cal[mode_name] = calibrate(
                self.make_model(), mode_name, self.x_public, self.y_public, loss_fn=self.loss,
                split_kw={"rank": self.cfg.rank})
        return cal

    def sigma_for(self, mode_name: str, epsilon: float, delta: float) -> float:
        """Per-release multiplier that makes this run cost ``(epsilon, delta)`` in ``mode_name``."""
        check_privacy_options(epsilon=epsilon, delta=delta)
        k = self.calibration(mode_name).releases_per_step
        if k == 0:
            raise ConfigError(f"mode {mode_name!r} releases nothing to noise")
        try:
            return solve_sigma(target_epsilon=epsilon, delta=delta, releases_per_step=k, steps=self.steps,
                               sample_rate=self.sample_rate, poisson=True)
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
    epsilon: float | None  # accounted over the run; None = infinite (no noise on some release)
    delta: float
    test_accuracy: float  # the split model as deployed (noise on at inference too)
    test_accuracy_noiseless: float  # the trained weights evaluated without any noise
    final_loss: float
    steps: int
    releases_per_step: int
    sample_rate: float
    seconds: float
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


def train_utility(task: DigitsTask, mode: AttackMode, *, progress: Any = None) -> UtilityResult:
    """Train ``task``'s model in ``mode`` (SGD + momentum, Poisson batches) and measure test accuracy."""
    cfg = task.cfg
    model = task.make_model()
    clips = task.calibration(mode.name).clips(mode.sigma, cfg.noise_ratio) if mode.noisy else None
    sm = build_split(model, mode, clips, audit=False, rank=cfg.rank, seed=cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    acc = PrivacyLedgerAccountant("rdp")
    n = len(task.y_train)
    t0 = time.perf_counter()
    loss_v = math.nan
    model.train()
    for step in range(task.steps):
        mask = torch.rand(n, generator=gen) < task.sample_rate
        if not bool(mask.any()):
            continue
        before = sm.mechanism.releases if mode.noisy else 0
        out = sm(task.x_train[mask])
        loss = task.loss(out, task.y_train[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = float(loss.detach()) * cfg.batch_size / int(mask.sum())
        if mode.noisy:
            acc.step(noise_multiplier=mode.sigma, releases=sm.mechanism.releases - before,
                     sample_rate=task.sample_rate, poisson=True)
        if progress is not None:
            progress(step + 1, task.steps, loss_v)
    seconds = time.perf_counter() - t0
    model.eval()
    test_acc = _accuracy(sm, task.x_test, task.y_test, batch=len(task.y_test))
    energy = energy_ratios(sm.release_stats()) if mode.split_mode != "plain" else {
        "input": {"rank": 0, "mean": 1.0, "max": 1.0}}
    clean = copy.deepcopy(model).eval()
    test_clean = _accuracy(clean, task.x_test, task.y_test)
    eps = acc.get_epsilon(mode.delta) if mode.noisy else math.inf
    return UtilityResult(
        mode=mode.name, sigma=mode.sigma, epsilon_target=mode.epsilon,
        epsilon=None if not math.isfinite(eps) else eps, delta=mode.delta,
        test_accuracy=test_acc, test_accuracy_noiseless=test_clean, final_loss=loss_v, steps=task.steps,
        releases_per_step=task.calibration(mode.name).releases_per_step, sample_rate=task.sample_rate,
        seconds=seconds, accountant=acc.describe() if mode.noisy else {}, release_energy=energy,
    )
