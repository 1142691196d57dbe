"""Privacy attacks: they must work against plain (a broken attack would make every mode look safe), noise is
drawn only in the trusted context, and bad privacy options are refused."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn as nn

import asymml
import asymml.privacy
from asymml.errors import ConfigError
from asymml.privacy.attacks.common import (
    AttackMode,
    LayerwiseNoise,
    build_split,
    calibrate,
    check_privacy_options,
    psnr,
)
from asymml.privacy.attacks.gradient import capture_update, gradient_leakage_attack
from asymml.privacy.attacks.inversion import PhotoTask, capture_training_releases, inversion_attack
from asymml.privacy.attacks.statistics import mutual_information
from asymml.privacy.report import ReportConfig, claim_check
from asymml.privacy.secure_rng import SecureGenerator


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def photos() -> PhotoTask:
    return PhotoTask(public_per_image=48, private_per_image=16)


def _tiny_cnn(channels: int = 3, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes),
    )


# --------------------------------------------------------------------------- inversion


def test_inversion_reaches_high_psnr_against_plain(photos: PhotoTask) -> None:
    cap = capture_training_releases(photos, AttackMode("plain"), None, ["input"])
    assert cap.private["input"].shape == photos.x_private.shape  # plain releases the raw input
    res = inversion_attack(cap, "input", mode_name="plain", epochs=0)
    assert res.psnr >= 25.0, res
    assert res.psnr > res.baseline_psnr + 10
    assert res.ssim > 0.9


def test_inversion_of_pure_noise_is_no_better_than_guessing(photos: PhotoTask) -> None:
    mode = AttackMode("noise-only", sigma=50.0)
    cal = calibrate(photos.make_model(), mode, photos.x_public[:32], photos.y_public[:32], loss_fn=photos.loss)
    cap = capture_training_releases(photos, mode, cal.clips(mode.sigma, 0.1), ["input"])
    res = inversion_attack(cap, "input", mode_name=mode.name, epochs=0)
    assert res.psnr < res.baseline_psnr + 1.0, res


def test_asym_releases_residual_not_input(photos: PhotoTask) -> None:
    cap = capture_training_releases(photos, AttackMode("asym"), None, ["input"])
    r, x = cap.private["input"], photos.x_private
    assert r.shape == x.shape
    energy = r.pow(2).sum((1, 2, 3)) / x.pow(2).sum((1, 2, 3))
    assert float(energy.max()) < 0.5  # rank-1 input split: most energy stays trusted


# --------------------------------------------------------------------------- gradient leakage


def test_weight_update_reveals_the_full_gradient_in_asym() -> None:
    torch.manual_seed(1)
    model = _tiny_cnn()
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 3])
    ref = _tiny_cnn()
    nn.functional.cross_entropy(ref(x), y).backward()
    cap = capture_update(model, AttackMode("asym"), None, x, y, lr=0.1, split_kw={"rank": 2})
    assert cap.revealed, "asym must reveal the update of the weights the accelerator uses"
    for name in cap.revealed:
        want = dict(ref.named_parameters())[name].grad
        assert float((cap.grads[name] - want).norm() / want.norm()) < 1e-2, name
    plain = capture_update(_tiny_cnn(), AttackMode("plain"), None, x, y, lr=0.1)
    assert set(plain.revealed) == {n for n, _ in ref.named_parameters()}
    assert plain.label_hint is not None and plain.label_hint.tolist() == y.tolist()


def test_gradient_leakage_reconstructs_against_plain() -> None:
    task = PhotoTask(patch_size=16, public_per_image=16, private_per_image=16, model="vgg11")
    prior = task.x_public.mean(0, keepdim=True)  # the attacker's prior: the mean public patch
    gains = []
    for i in (5, 40):
        x, y = task.x_private[i:i + 1], task.y_private[i:i + 1]
        cap = capture_update(task.make_model(), AttackMode("plain"), None, x, y, lr=0.1, loss_fn=task.loss)
        res = gradient_leakage_attack(cap, iters=200, num_classes=task.num_classes, loss_fn=task.loss, prior=prior)
        assert res.label_accuracy == 1.0 and res.label_source == "logits gradient"
        assert res.grad_cosine > 0.99
        gains.append(res.psnr - float(psnr(prior, x).mean()))
    assert sum(gains) / len(gains) > 5.0, gains


# --------------------------------------------------------------------------- noise in the trusted context


def test_noise_is_drawn_only_in_the_trusted_context() -> None:
    model = _tiny_cnn()
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    sigma = 10.0
    mode = AttackMode("asym+noise", sigma=sigma)
    clips = calibrate(model, mode, x, y, split_kw={"rank": 1},
                      loss_fn=nn.functional.cross_entropy).clips(sigma, 1.0)
    sm = build_split(model, mode, clips, audit=True, rank=1)
    threads: list[str] = []
    real_normal = SecureGenerator.standard_normal

    def spy(self, *args, **kw):
        threads.append(threading.current_thread().name)
        assert self.secure, "noise must come from the OS-keyed secure generator"
        return real_normal(self, *args, **kw)

    rng = torch.random.get_rng_state()
    SecureGenerator.standard_normal = spy  # type: ignore[method-assign]
    try:
        nn.functional.cross_entropy(sm(x), y).backward()
    finally:
        SecureGenerator.standard_normal = real_normal  # type: ignore[method-assign]
    assert torch.equal(rng, torch.random.get_rng_state())  # the global RNG is not used for noise
    # drawn in the trusted process only: the main thread or the mechanism's own prefetch thread, never in
    # the accelerator's worker thread
    assert threads and all(t == threading.main_thread().name or t.startswith("asymml-noise") for t in threads)
    # every private-derived release reached the executor already noised: its norm is the noise's
    released = [r for r in sm.executor.ledger if r.kind != "weight"]
    assert released and all(r.kind in ("residual", "grad_residual") for r in released)
    for r in released:
        d = r.tensor[0].numel()
        expected = sigma * clips[r.layer] * math.sqrt(d)
        norms = r.tensor.reshape(len(r.tensor), -1).norm(dim=1)
        assert float(norms.min()) > 0.8 * expected, r.layer
    assert isinstance(sm.mechanism, LayerwiseNoise) and sm.mechanism.releases == len(released)


def test_layerwise_noise_clips_each_layer() -> None:
    mech = LayerwiseNoise(0.0, {"a": 0.5, "b": 2.0})
    r = torch.randn(3, 4, 5, 5) * 10
    for layer, c in (("a", 0.5), ("b", 2.0)):
        out = mech(r, layer=layer, generator=torch.Generator().manual_seed(0))
        assert float(out.reshape(3, -1).norm(dim=1).max()) <= c * (1 + 1e-5)
    with pytest.raises(ConfigError, match="no clip bound"):
        mech(r, layer="unknown")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -3.0}, "epsilon"),
        ({"epsilon": float("inf")}, "epsilon"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"sigma": 1.0, "epsilon": 2.0}, "conflicting"),
        ({"noise_ratio": 0.0}, "noise_ratio"),
    ],
)
def test_bad_privacy_options_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        check_privacy_options(**kw)


def test_bad_modes_are_refused() -> None:
    with pytest.raises(ConfigError, match="conflicting"):
        AttackMode("asym", sigma=1.0)
    with pytest.raises(ConfigError, match="conflicting"):
        AttackMode("plain", epsilon=1.0)
    with pytest.raises(ConfigError, match="sigma > 0"):
        AttackMode("asym+noise", sigma=0.0)
    with pytest.raises(ConfigError, match="sigma"):
        AttackMode("noise-only", sigma=-2.0)
    with pytest.raises(ConfigError, match="delta"):
        AttackMode("noise-only", sigma=2.0, delta=2.0)
    with pytest.raises(ConfigError, match="unknown mode"):
        AttackMode("trusted")
    with pytest.raises(ConfigError, match="conflicting"):
        ReportConfig(epsilons=(1.0,), sigmas=(1.0,)).validate()
    with pytest.raises(ConfigError, match="epsilon"):
        ReportConfig(epsilons=(0.0,)).validate()
    with pytest.raises(ConfigError, match="delta"):
        ReportConfig(delta=0.0).validate()
    with pytest.raises(ConfigError, match="unknown mode"):
        ReportConfig(modes=("asym", "dp")).validate()


# --------------------------------------------------------------------------- statistics and verdict


def test_mutual_information_ranks_identity_above_noise() -> None:
    g = torch.Generator().manual_seed(0)
    pub, priv = torch.rand(300, 3, 4, 4, generator=g), torch.rand(300, 3, 4, 4, generator=g)
    same = mutual_information(pub, pub, priv, priv)
    noise = mutual_information(pub, torch.randn(300, 8, generator=g), priv, torch.randn(300, 8, generator=g))
    assert same.total > 1.0 and noise.total < 0.2
    assert "KSG" in same.estimator and "biased downward" in same.estimator


def test_claim_check() -> None:
    def row(mode, eps, acc, inv, dlg):
        return {"mode": mode, "epsilon_target": eps, "test_accuracy": acc, "inversion_psnr": inv,
                "inversion_baseline_psnr": 13.0, "dlg_psnr": dlg, "dlg": {"1": {"psnr": dlg, "baseline_psnr": 13.0}}}

    rows = [row("plain", None, 0.97, 48.0, 20.0), row("asym", None, 0.97, 15.0, 12.0),
            row("noise-only", 8.0, 0.10, 13.2, 9.0), row("asym+noise", 8.0, 0.95, 13.3, 11.5)]
    verdict = claim_check(rows)
    assert verdict["holds"]  # both DLG runs are below the prior: neither gains anything
    assert verdict["per_epsilon"][0]["attack_gain_db_asym_noise"]["dlg_b1"] == 0.0
    rows[-1]["dlg"]["1"]["psnr"] = 18.0
    assert not claim_check(rows)["holds"]
    rows[-1]["dlg"]["1"]["psnr"] = 11.5
    rows[-1]["test_accuracy"] = 0.80
    assert not claim_check(rows)["holds"]


def test_noise_cannot_be_replayed_from_the_public_default_seed() -> None:
    model = _tiny_cnn()
    sm = asymml.split(model, rank=2, noise=asymml.privacy.NoiseConfig(sigma=5.0, clip=1.0), audit=True)
    sm(torch.rand(4, 3, 8, 8)).sum().backward()
    g = torch.Generator().manual_seed(0 + 1)  # what an attacker who read the library's defaults would try
    for r in sm.executor.ledger:
        if r.kind in ("residual", "activation", "grad_residual"):
            n = torch.randn(r.shape, generator=g)
            std = float((r.tensor * n).sum() / (n * n).sum())
            assert abs(std - 5.0) > 0.5, f"noise of {r.layer} replayed: the release is de-noised exactly"
