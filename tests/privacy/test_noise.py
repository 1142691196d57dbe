"""Clipping and noising of released residuals."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from asymml.privacy.accounting import solve_sigma
from asymml.privacy.noise import NoiseConfig, ReleaseMechanism, clip_per_sample, per_sample_norms
from asymml.privacy.secure_rng import InsecureNoiseWarning, SecureGenerator


@pytest.fixture(autouse=True)
def _insecure_seeds_are_deliberate():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureNoiseWarning)
        yield


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_shape(g: torch.Generator) -> tuple[int, ...]:
    ndim = int(torch.randint(1, 5, (1,), generator=g))
    return tuple(int(s) for s in torch.randint(1, 7, (ndim,), generator=g))


# --------------------------------------------------------------------------- clipping


def test_clip_bounds_every_sample_norm_over_random_shapes() -> None:
    g = gen(0)
    for _ in range(200):
        shape = random_shape(g)
        scale = float(10 ** torch.empty(1).uniform_(-3, 3, generator=g))
        clip = float(10 ** torch.empty(1).uniform_(-2, 2, generator=g))
        r = torch.randn(shape, generator=g) * scale
        out = clip_per_sample(r, clip)
        assert out.shape == r.shape
        norms, before = per_sample_norms(out), per_sample_norms(r)
        assert bool((norms <= clip * (1 + 1e-5)).all())
        inside = before <= clip
        assert torch.equal(out[inside], r[inside])  # samples within the bound are untouched
        # clipped samples keep their direction and land on the bound
        outside = ~inside
        if outside.any():
            torch.testing.assert_close(norms[outside], torch.full_like(norms[outside], clip))
            cos = torch.nn.functional.cosine_similarity(
                out[outside].reshape(int(outside.sum()), -1), r[outside].reshape(int(outside.sum()), -1)
            )
            torch.testing.assert_close(cos, torch.ones_like(cos))


def test_mechanism_clips_every_sample_with_zero_noise() -> None:
    g = gen(1)
    mech = ReleaseMechanism(NoiseConfig(sigma=0.0, clip=0.5))
    for _ in range(50):
        shape = (int(torch.randint(1, 6, (1,), generator=g)),) + random_shape(g)
        r = torch.randn(shape, generator=g) * 3
        assert bool((per_sample_norms(mech(r, layer="x")) <= 0.5 * (1 + 1e-5)).all())


def test_zero_residual_is_safe() -> None:
    r = torch.zeros(3, 4, 5)
    assert torch.equal(clip_per_sample(r, 1.0), r)
    out = ReleaseMechanism(NoiseConfig(sigma=0.0, clip="auto"))(r, layer="z")
    assert torch.equal(out, r)


# --------------------------------------------------------------------------- noise statistics


def test_noise_has_sigma_times_clip_std() -> None:
    sigma, clip = 0.7, 2.0
    r = torch.randn(2000, 8, 4, 4, generator=gen(2))
    mech = ReleaseMechanism(NoiseConfig(sigma=sigma, clip=clip))
    out = mech(r, layer="conv1")
    noise = out - clip_per_sample(r, clip)
    assert noise.mean().abs() < 0.01
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.02)
    assert mech.noise_multiplier == sigma
    assert mech.clip_for("conv1") == clip


def test_nsr_noise_norm_is_nsr_times_clip() -> None:
    nsr, clip = 0.3, 1.5
    r = torch.randn(1000, 4, 10, 10, generator=gen(4)) * 10  # norms well above the clip
    d = r[0].numel()
    mech = ReleaseMechanism(NoiseConfig(nsr=nsr, clip=clip))
    clipped = clip_per_sample(r, clip)
    noise = mech(r, layer="a") - clipped
    ratio = per_sample_norms(noise) / per_sample_norms(clipped)
    assert float(ratio.mean()) == pytest.approx(nsr, rel=0.02)  # amplitude ratio
    assert float((ratio**2).mean()) == pytest.approx(nsr**2, rel=0.03)  # energy ratio
    assert float(noise.std()) == pytest.approx(nsr * clip / math.sqrt(d), rel=0.02)
    assert mech.noise_multiplier == pytest.approx(nsr / math.sqrt(d))
    # a larger layer gets a smaller per-release multiplier; the reported one is the conservative minimum
    mech(torch.randn(2, 4, 20, 20, generator=gen(6)), layer="b")
    assert mech.multipliers()["b"] == pytest.approx(nsr / math.sqrt(1600))
    assert mech.noise_multiplier == pytest.approx(nsr / 40)


def test_nsr_multiplier_before_any_release_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no release"):
        _ = ReleaseMechanism(NoiseConfig(nsr=0.1)).noise_multiplier


# --------------------------------------------------------------------------- generator / purity


def test_noise_comes_from_the_given_generator_only() -> None:
    r = torch.randn(4, 3, 5, 5, generator=gen(7))
    state = torch.get_rng_state()

    def mech() -> ReleaseMechanism:
        return ReleaseMechanism(NoiseConfig(sigma=1.0))

    a = mech()(r, layer="l", generator=SecureGenerator(insecure_seed=11))
    b = mech()(r, layer="l", generator=SecureGenerator(insecure_seed=11))
    c = mech()(r, layer="l", generator=SecureGenerator(insecure_seed=12))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was neither used nor reseeded


def test_default_generator_is_private_not_global() -> None:
    r = torch.randn(4, 10, generator=gen(8))
    state = torch.get_rng_state()
    torch.manual_seed(0)
    a = ReleaseMechanism(NoiseConfig(sigma=1.0))(r, layer="l")
    torch.manual_seed(0)
    b = ReleaseMechanism(NoiseConfig(sigma=1.0))(r, layer="l")
    assert not torch.allclose(a, b)  # seeding torch's global RNG does not fix the noise
    fixed = ReleaseMechanism(NoiseConfig(sigma=1.0, insecure_seed=9))
    again = ReleaseMechanism(NoiseConfig(sigma=1.0, insecure_seed=9))
    assert torch.equal(fixed(r, layer="l"), again(r, layer="l"))
    torch.set_rng_state(state)


@pytest.mark.parametrize("config", [NoiseConfig(sigma=0.0, clip=100.0), NoiseConfig(sigma=1.0, clip="auto")])
def test_input_is_not_modified_and_output_is_new(config: NoiseConfig) -> None:
    r = torch.randn(5, 3, 4, generator=gen(10))
    before = r.clone()
    out = ReleaseMechanism(config)(r, layer="l")
    assert torch.equal(r, before)
    assert out.data_ptr() != r.data_ptr()
    out.add_(1.0)
    assert torch.equal(r, before)


def test_dtype_preserved_and_differentiable() -> None:
    mech = ReleaseMechanism(NoiseConfig(sigma=0.5, clip=1.0))
    r64 = torch.randn(3, 7, dtype=torch.float64, generator=gen(13))
    assert mech(r64, layer="l").dtype == torch.float64
    r = torch.randn(3, 7, generator=gen(14), requires_grad=True)
    mech(r, layer="l").sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()


# --------------------------------------------------------------------------- adaptive clip


def test_adaptive_clip_tracks_quantile_with_ema() -> None:
    cfg = NoiseConfig(sigma=0.0, clip="auto")
    assert cfg.adaptive_clip and not cfg.formally_accounted and cfg.clip_quantile == 0.5
    mech = ReleaseMechanism(cfg, ema=0.5)
    scales = torch.arange(1, 12, dtype=torch.float32).reshape(-1, 1)
    r = torch.ones(11, 4) * scales / 2  # per-sample norms 1..11, median 6
    out = mech(r, layer="c1")
    assert mech.clip_for("c1") == pytest.approx(6.0)
    assert bool((per_sample_norms(out) <= 6.0 * (1 + 1e-5)).all())
    mech(r * 3, layer="c1")  # batch median 18 -> EMA 0.5 * 6 + 0.5 * 18
    assert mech.clip_for("c1") == pytest.approx(12.0)
    assert mech.norms_seen("c1").shape == (22,)
    assert mech.release_counts() == {"c1": 2}
    with pytest.raises(KeyError):
        mech.clip_for("never-released")
    q90 = ReleaseMechanism(NoiseConfig(sigma=0.0, clip="auto:0.9"))
    q90(r, layer="c1")
    assert q90.clip_for("c1") == pytest.approx(float(torch.quantile(torch.arange(1.0, 12.0), 0.9)))


# --------------------------------------------------------------------------- options


def test_from_options() -> None:
    assert NoiseConfig.from_options() is None
    assert NoiseConfig.from_options(clip=3.0) is None
    cfg = NoiseConfig.from_options(sigma=1.0, clip="auto:0.7")
    assert cfg == NoiseConfig(sigma=1.0, clip="auto:0.7") and cfg.kind == "sigma"
    assert NoiseConfig.from_options(nsr=0.2).kind == "nsr"
    assert NoiseConfig.from_options(epsilon=3.0, delta=1e-6).kind == "epsilon"


def test_epsilon_config_resolves_sigma_through_the_accountant() -> None:
    cfg = NoiseConfig(epsilon=2.0, delta=1e-5)
    with pytest.raises(ValueError, match="sigma"):
        ReleaseMechanism(cfg)
    plan = dict(releases_per_step=6, steps=30)
    sigma = cfg.resolve_noise_multiplier(**plan)
    assert sigma == solve_sigma(target_epsilon=2.0, delta=1e-5, **plan)
    assert ReleaseMechanism(cfg, sigma=sigma).noise_multiplier == sigma
    assert NoiseConfig(sigma=1.5).resolve_noise_multiplier(**plan) == 1.5
    assert NoiseConfig(nsr=0.1).resolve_noise_multiplier(**plan) is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(nsr=-1.0), "nsr"),
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=-2.0), "epsilon"),
        (dict(sigma=1.0, delta=0.0), "delta"),
        (dict(sigma=1.0, delta=1.0), "delta"),
        (dict(sigma=1.0, delta=-1e-5), "delta"),
        (dict(sigma=1.0, clip=0.0), "clip"),
        (dict(sigma=1.0, clip=-1.0), "clip"),
        (dict(sigma=1.0, clip=float("inf")), "clip"),
        (dict(sigma=1.0, clip="often"), "clip"),
        (dict(sigma=1.0, clip="auto:1.5"), "clip"),
        (dict(sigma=1.0, clip="auto:x"), "clip"),
        (dict(sigma=1.0, nsr=0.1), "conflicting options: sigma and nsr"),
        (dict(nsr=0.1, epsilon=1.0), "conflicting options: nsr and epsilon"),
        (dict(sigma=1.0, nsr=0.1, epsilon=1.0), "conflicting options"),
        (dict(), "one of sigma, nsr, epsilon"),
    ],
)
def test_bad_options_raise_value_error_naming_them(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NoiseConfig(**kwargs)
    if kwargs:
        with pytest.raises(ValueError, match=name):
            NoiseConfig.from_options(**kwargs)


def test_mechanism_rejects_conflicting_sigma() -> None:
    with pytest.raises(ValueError, match="conflicting options"):
        ReleaseMechanism(NoiseConfig(sigma=1.0), sigma=2.0)
    with pytest.raises(ValueError, match="conflicting options"):
        ReleaseMechanism(NoiseConfig(nsr=0.1), sigma=2.0)
    with pytest.raises(ValueError, match="sigma"):
        ReleaseMechanism(NoiseConfig(epsilon=1.0), sigma=-1.0)
    with pytest.raises(ValueError, match="clip"):
        clip_per_sample(torch.ones(2, 2), -1.0)
    with pytest.raises(ValueError, match="sample dimension"):
        ReleaseMechanism(NoiseConfig(sigma=1.0))(torch.tensor(1.0), layer="l")
