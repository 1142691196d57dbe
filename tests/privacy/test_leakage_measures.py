"""The scale-invariant leakage measures, re-identification and span(U) recovery (issue 9 item 5) can fail."""

from __future__ import annotations

import pytest
import torch

from asymml.privacy.attacks.common import affine_fit, normalized_psnr, psnr, reidentification
from asymml.privacy.attacks.inversion import JOINT, ReleaseCapture, inversion_attack, joint_releases, subspace_recovery


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)


def test_normalised_psnr_ignores_brightness_and_contrast_but_not_structure() -> None:
    x = _images()
    dim = 0.3 * x + 0.5  # the right structure, the wrong brightness and contrast
    assert float(psnr(dim, x).mean()) < 20
    assert float(normalized_psnr(dim, x).mean()) > 60
    shuffled = torch.roll(x, 1, 0)  # every image paired with another one
    flat = x.mean((2, 3), keepdim=True).expand_as(x)
    # wrong structure: no better than a flat image of the right colours (up to chance correlations)
    assert float(normalized_psnr(shuffled, x).mean()) < float(normalized_psnr(flat, x).mean()) + 1.0
    torch.testing.assert_close(affine_fit(x, x), x)


def test_reidentification_picks_the_right_image_only_when_it_leaked() -> None:
    x = _images(40)
    exact = reidentification(0.5 * x + 0.2, x)
    assert exact["accuracy"] == 1.0 and exact["chance"] == pytest.approx(1 / 40)
    noise = reidentification(torch.rand(x.shape, generator=torch.Generator().manual_seed(3)), x)
    assert noise["accuracy"] <= 0.15
    perm = torch.roll(torch.arange(40), 1)
    assert reidentification(x[perm], x)["accuracy"] == 0.0


def test_span_u_is_read_off_a_noise_free_residual_but_not_a_noisy_one() -> None:
    x = _images(16).double()
    b, c = x.shape[:2]
    xf = x.reshape(b, c, -1)
    u = torch.linalg.svd(xf, full_matrices=False).U[..., :1]
    r = (xf - u @ (u.transpose(1, 2) @ xf)).reshape(x.shape)  # R = (I - UU^T) X
    clean = subspace_recovery(r, x, 1)
    assert clean["cos"] > 0.999 and clean["cos_random"] < 0.8
    noisy = subspace_recovery(r + 10 * torch.randn(r.shape, generator=torch.Generator().manual_seed(0),
                                                   dtype=r.dtype), x, 1)
    assert noisy["cos"] < clean["cos_random"] + 0.2


def test_joint_attack_stacks_every_layer_of_a_sample() -> None:
    pub, priv = _images(32, 1), _images(8, 2)

    def rel(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input": x - x.mean(1, keepdim=True), "hidden": torch.nn.functional.avg_pool2d(x, 2).repeat(1, 2, 1, 1)}

    cap = ReleaseCapture(private=rel(priv), private_images=priv, public=rel(pub), public_images=pub, steps=1)
    a, b = joint_releases(cap)
    assert a.shape == (32, 9, 16, 16) and b.shape == (8, 9, 16, 16)
    res = inversion_attack(cap, JOINT, mode_name="asym", epochs=0)
    assert res.layer == JOINT and res.reid >= 0.5 and res.npsnr > res.baseline_npsnr
