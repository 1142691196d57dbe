"""One ledger for a run (issue 8 item 4, issue 9 item 3): activations, gradients and DP-SGD updates composed in
one accountant, checked against the analytic RDP of the Gaussian mechanism; sigma planned in one place."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from asymml.privacy import PrivacyLedger, SecureGenerator, plan_sigma
from asymml.privacy.accounting import solve_sigma
from asymml.privacy.secure_rng import InsecureNoiseWarning, PoissonSampler

DELTA = 1e-5
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")
        warnings.simplefilter("ignore", InsecureNoiseWarning)
        yield


def balle_eps(rdp: np.ndarray) -> float:
    """RDP -> (eps, delta), Balle et al. 2020 Thm 21 (what Opacus uses), written out independently."""
    return float(np.min(rdp - (np.log(DELTA) + np.log(ORDERS)) / (ORDERS - 1) + np.log((ORDERS - 1) / ORDERS)))


@pytest.mark.parametrize("k_act, k_grad, sigma, sigma_u, steps", [(3, 3, 4.0, 2.0, 10), (5, 0, 8.0, 1.5, 30)])
def test_ledger_composes_releases_and_update_like_analytic_rdp(k_act, k_grad, sigma, sigma_u, steps) -> None:
    # catches: a release kind or the update left out of the composition, or multipliers off by sqrt(k)
    led = PrivacyLedger()
    for _ in range(steps):
        led.step(activations=[sigma] * k_act, gradients=[sigma] * k_grad, updates=[sigma_u])
    rdp = steps * ORDERS / 2 * ((k_act + k_grad) / sigma**2 + 1 / sigma_u**2)
    assert led.epsilon(DELTA) == pytest.approx(balle_eps(rdp), rel=1e-9)
    assert led.releases() == {"activations": steps * k_act, "gradients": steps * k_grad, "updates": steps}
    assert led.covers == ["activations", "gradients", "updates"] if k_grad else ["activations", "updates"]
    s = led.summary(DELTA)
    assert s["epsilon"] == pytest.approx(balle_eps(rdp)) and "updates" in s["covers"] and s["delta"] == DELTA


def test_without_noised_updates_epsilon_is_null_with_a_note() -> None:
    led = PrivacyLedger()
    led.step(activations=[2.0, 2.0], gradients=[2.0])
    s = led.summary(DELTA)
    assert s["epsilon"] is None and math.isfinite(s["epsilon_releases_only"])
    assert "updates" not in s["covers"] and any("updates are not noised" in n for n in s["notes"])


def test_unnoised_private_release_makes_epsilon_infinite() -> None:
    led = PrivacyLedger()
    led.step(activations=[2.0], updates=[2.0], unnoised=1)
    assert led.epsilon(DELTA) == math.inf and led.summary(DELTA)["epsilon"] is None


def test_amplification_only_with_a_secure_sampler() -> None:
    # catches: Poisson amplification claimed for predictable batches (issue 9 item 4)
    def eps(sampled_by) -> float:
        led = PrivacyLedger()
        led.step(0.01, activations=[1.0], updates=[1.0], sampled_by=sampled_by, steps=100)
        return led.epsilon(DELTA), led.covers

    secure, covers = eps(SecureGenerator())
    assert "sampling" in covers
    for predictable in (None, SecureGenerator(insecure_seed=1), object()):
        e, c = eps(predictable)
        assert e > 3 * secure and "sampling" not in c
    assert eps(PoissonSampler(100, 0.01))[0] == pytest.approx(secure)


def test_plan_sigma_spends_the_budget_with_updates_included() -> None:
    plan = dict(steps=50, releases_per_step=6, sample_rate=0.02, poisson=True)
    sigma = plan_sigma(8.0, DELTA, updates_per_step=1, **plan)
    assert sigma == pytest.approx(solve_sigma(target_epsilon=8.0, delta=DELTA, releases_per_step=7, steps=50,
                                              sample_rate=0.02, poisson=True))
    led = PrivacyLedger()
    led.step(0.02, activations=[sigma] * 3, gradients=[sigma] * 3, updates=[sigma], sampled_by=SecureGenerator(),
             steps=50)
    assert 8.0 * 0.98 <= led.epsilon(DELTA) <= 8.0
    # a fixed update sigma: the releases get what is left
    s_rel = plan_sigma(8.0, DELTA, updates_per_step=1, update_sigma=3.0, **plan)
    led = PrivacyLedger()
    led.step(0.02, activations=[s_rel] * 6, updates=[3.0], sampled_by=SecureGenerator(), steps=50)
    assert 8.0 * 0.98 <= led.epsilon(DELTA) <= 8.0
    with pytest.raises(ValueError, match="updates alone"):
        plan_sigma(1.0, DELTA, steps=1000, releases_per_step=2, updates_per_step=1, update_sigma=0.3)
    with pytest.raises(ValueError, match="nothing is released"):
        plan_sigma(1.0, DELTA, steps=10, releases_per_step=0)


def test_ledger_state_round_trip_and_bad_input() -> None:
    led = PrivacyLedger("rdp")
    led.step(0.5, activations=[2.0], updates=[3.0], sampled_by=SecureGenerator(), steps=4)
    other = PrivacyLedger()
    other.load_state_dict(led.state_dict())
    assert other.epsilon(DELTA) == led.epsilon(DELTA) and other.covers == led.covers
    with pytest.raises(ValueError, match="activations"):
        led.step(activations=[-1.0])
    with pytest.raises(ValueError, match="sample_rate"):
        led.step(0.0, activations=[1.0])
