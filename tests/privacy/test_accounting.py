"""Accounting of released residuals: checked against analytic bounds, explicit composition, and PRV."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.optimize import brentq
from scipy.special import comb, logsumexp
from scipy.stats import norm

from asymml.privacy.accounting import (
    PrivacyLedgerAccountant,
    combine_noise_multipliers,
    epsilon_for,
    solve_sigma,
)

DELTA = 1e-5
# Opacus' default RDP orders, written out independently.
ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order")
        yield


def rdp_to_eps_balle(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Balle et al. 2020 (Thm 21) RDP -> (eps, delta) conversion, minimised over ``orders``."""
    eps = rdp - (np.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    return float(np.min(eps))


def rdp_to_eps_classic(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Mironov 2017 conversion: eps = min_a rdp(a) + log(1/delta)/(a-1)."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def exact_gaussian_eps(sigma: float, delta: float) -> float:
    """Tight epsilon of one Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, analytic Gaussian)."""

    def delta_of(eps: float) -> float:
        return norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma)

    return brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


def subsampled_gaussian_rdp_integer(q: float, sigma: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order (Mironov, Talwar, Zhang 2019, binomial sum)."""
    k = np.arange(alpha + 1)
    log_terms = (
        np.log(comb(alpha, k)) + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
    )
    return float(logsumexp(log_terms)) / (alpha - 1)


# --------------------------------------------------------------------------- single Gaussian, analytic


@pytest.mark.parametrize("sigma", [0.8, 1.0, 2.0, 5.0])
def test_rdp_single_gaussian_matches_analytic_rdp(sigma: float) -> None:
    eps = epsilon_for(noise_multiplier=sigma, releases_per_step=1, steps=1, delta=DELTA)
    rdp = ORDERS / (2 * sigma**2)  # RDP of the Gaussian mechanism at order alpha
    assert eps == pytest.approx(rdp_to_eps_balle(rdp, ORDERS, DELTA), rel=1e-9)
    # The textbook conversion is looser, never tighter, and the tight value is a lower bound.
    assert eps <= rdp_to_eps_classic(rdp, ORDERS, DELTA) + 1e-12
    assert eps >= exact_gaussian_eps(sigma, DELTA) - 1e-9


@pytest.mark.parametrize("sigma, releases", [(1.0, 1), (2.0, 1), (4.0, 3), (10.0, 10)])
def test_prv_close_to_exact_gaussian(sigma: float, releases: int) -> None:
    eps = epsilon_for(
        noise_multiplier=sigma, releases_per_step=releases, steps=1, delta=DELTA, mechanism="prv"
    )
    exact = exact_gaussian_eps(sigma / math.sqrt(releases), DELTA)
    assert exact - 1e-6 <= eps <= exact + 0.03


def test_published_value_abadi_et_al() -> None:
    # Abadi et al. 2016, §3.1: q=0.01, sigma=4, delta=1e-5, T=10000 -> eps ~= 1.26 (moments accountant,
    # classic conversion).  Opacus' RDP with Balle's conversion is a tighter valid bound.
    kw = dict(noise_multiplier=4.0, releases_per_step=1, steps=10_000, sample_rate=0.01, poisson=True)
    eps_rdp = epsilon_for(delta=DELTA, **kw)
    assert 0.9 < eps_rdp <= 1.26
    eps_prv = epsilon_for(delta=DELTA, mechanism="prv", **kw)
    assert 0.8 < eps_prv <= eps_rdp


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.0, 1000), (0.1, 2.0, 50), (0.5, 3.0, 10)])
def test_poisson_rdp_against_independent_integer_order_bound(q: float, sigma: float, steps: int) -> None:
    eps = epsilon_for(
        noise_multiplier=sigma, releases_per_step=1, steps=steps, sample_rate=q, poisson=True, delta=DELTA
    )
    orders = np.arange(2, 64, dtype=float)
    rdp = np.array([steps * subsampled_gaussian_rdp_integer(q, sigma, int(a)) for a in orders])
    indep = rdp_to_eps_balle(rdp, orders, DELTA)
    # Opacus also searches fractional orders, so it can only be (slightly) tighter.
    assert indep * 0.9 <= eps <= indep + 1e-9


@pytest.mark.parametrize(
    "sigma, releases, steps, q, poisson",
    [
        (1.0, 1, 1, 1.0, False),
        (2.0, 4, 10, 1.0, False),
        (1.5, 3, 200, 0.05, True),
        (5.0, 20, 100, 0.01, True),
    ],
)
def test_prv_below_rdp_within_factor(sigma, releases, steps, q, poisson) -> None:
    kw = dict(noise_multiplier=sigma, releases_per_step=releases, steps=steps, sample_rate=q, poisson=poisson)
    rdp = epsilon_for(delta=DELTA, mechanism="rdp", **kw)
    prv = epsilon_for(delta=DELTA, mechanism="prv", **kw)
    assert prv <= rdp
    assert rdp <= 2.0 * prv  # RDP is loosest at small epsilon (conversion floor)


# --------------------------------------------------------------------------- composition


@pytest.mark.parametrize("releases, steps", [(1, 1), (3, 1), (7, 5), (16, 40)])
def test_releases_compose_like_explicit_steps(releases: int, steps: int) -> None:
    sigma = 3.0
    ledger = PrivacyLedgerAccountant("rdp")
    ledger.step(noise_multiplier=sigma, releases=releases, steps=steps)
    explicit = RDPAccountant()
    for _ in range(releases * steps):
        explicit.step(noise_multiplier=sigma, sample_rate=1.0)
    assert ledger.get_epsilon(DELTA) == pytest.approx(explicit.get_epsilon(DELTA), rel=1e-9)
    # The same through repeated single steps of the ledger.
    ledger2 = PrivacyLedgerAccountant("rdp")
    for _ in range(steps):
        ledger2.step(noise_multiplier=sigma, releases=releases)
    assert ledger2.get_epsilon(DELTA) == pytest.approx(ledger.get_epsilon(DELTA), rel=1e-12)


def test_prv_composition_matches_explicit_steps() -> None:
    ledger = PrivacyLedgerAccountant("prv")
    ledger.step(noise_multiplier=4.0, releases=8)
    explicit = PRVAccountant()
    for _ in range(8):
        explicit.step(noise_multiplier=4.0, sample_rate=1.0)
    with np.errstate(divide="ignore"):
        ref = explicit.get_epsilon(DELTA)
    assert ledger.get_epsilon(DELTA) == pytest.approx(ref, abs=0.03)


def test_heterogeneous_multipliers_combine_exactly() -> None:
    sigmas = [1.0, 2.0, 3.5, 0.9]
    combined = combine_noise_multipliers(sigmas)
    ledger = PrivacyLedgerAccountant("rdp")
    ledger.step(noise_multiplier=combined, releases=1)
    explicit = RDPAccountant()
    for s in sigmas:
        explicit.step(noise_multiplier=s, sample_rate=1.0)
    assert ledger.get_epsilon(DELTA) == pytest.approx(explicit.get_epsilon(DELTA), rel=1e-9)
    assert combine_noise_multipliers([2.0] * 4) == pytest.approx(1.0)
    assert combine_noise_multipliers([]) == math.inf
    assert combine_noise_multipliers([1.0, 0.0]) == 0.0


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_more_steps_or_releases_cost_more(mechanism: str) -> None:
    def eps(steps: int, releases: int = 2) -> float:
        return epsilon_for(
            noise_multiplier=6.0, releases_per_step=releases, steps=steps, delta=DELTA, mechanism=mechanism
        )

    by_steps = [eps(t) for t in (1, 4, 16, 64)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    assert eps(4, 1) < eps(4, 2) < eps(4, 8)


def test_poisson_amplifies_only_when_poisson() -> None:
    kw = dict(noise_multiplier=1.0, releases_per_step=2, steps=100, delta=DELTA)
    full = epsilon_for(**kw)
    assert epsilon_for(sample_rate=0.01, poisson=False, **kw) == full
    assert epsilon_for(sample_rate=0.01, poisson=True, **kw) < full / 5


def test_replace_one_adjacency_doubles_sensitivity() -> None:
    replace = epsilon_for(
        noise_multiplier=4.0, releases_per_step=2, steps=3, delta=DELTA, adjacency="replace-one"
    )
    assert replace == pytest.approx(
        epsilon_for(noise_multiplier=2.0, releases_per_step=2, steps=3, delta=DELTA), rel=1e-12
    )


def test_edge_cases_empty_zero_noise_and_no_releases() -> None:
    ledger = PrivacyLedgerAccountant()
    assert ledger.get_epsilon(DELTA) == 0.0
    ledger.step(noise_multiplier=2.0, releases=0)
    assert ledger.get_epsilon(DELTA) == 0.0
    ledger.step(noise_multiplier=0.0, releases=1)
    assert ledger.get_epsilon(DELTA) == math.inf


def test_prv_falls_back_to_rdp_when_no_useful_privacy() -> None:
    ledger = PrivacyLedgerAccountant("prv")
    ledger.step(noise_multiplier=0.01, releases=5, steps=100)  # nsr-like per-release multiplier
    rdp = epsilon_for(noise_multiplier=0.01, releases_per_step=5, steps=100, delta=DELTA)
    assert ledger.get_epsilon(DELTA) == rdp
    assert "fallback" in ledger.describe()["epsilon_method"]


# --------------------------------------------------------------------------- describe / persistence


def test_describe_states_what_is_composed() -> None:
    ledger = PrivacyLedgerAccountant("rdp")
    for _ in range(5):
        ledger.step(noise_multiplier=1.3, releases=6, sample_rate=0.1, poisson=False)
    ledger.get_epsilon(DELTA)
    d = ledger.describe()
    assert d["mechanism"] == "rdp" and d["epsilon_method"] == "rdp"
    assert d["steps"] == 5 and d["releases_per_step"] == 6 and d["releases_total"] == 30
    assert d["noise_multiplier"] == 1.3
    assert d["sample_rate"] == 1.0  # not Poisson: no amplification claimed
    assert d["groups"][0]["sample_rate_requested"] == 0.1
    assert d["groups"][0]["effective_noise_multiplier_per_step"] == pytest.approx(1.3 / math.sqrt(6))
    assert d["sensitivity"] == "clip" and "sqrt(k)" in d["composition"]

    ledger.step(noise_multiplier=2.0, releases=6, sample_rate=0.1, poisson=True)
    d = ledger.describe()
    assert d["noise_multiplier"] is None and d["sample_rate"] is None and len(d["groups"]) == 2


def test_state_dict_round_trip() -> None:
    ledger = PrivacyLedgerAccountant("rdp")
    ledger.step(noise_multiplier=1.0, releases=3, steps=10)
    ledger.step(noise_multiplier=2.0, releases=3, sample_rate=0.2, poisson=True, steps=4)
    restored = PrivacyLedgerAccountant()
    restored.load_state_dict(ledger.state_dict())
    assert restored.get_epsilon(DELTA) == ledger.get_epsilon(DELTA)
    assert restored.steps == 14


# --------------------------------------------------------------------------- solve_sigma


@pytest.mark.parametrize(
    "target, releases, steps, q, poisson",
    [
        (1.0, 1, 1, 1.0, False),
        (3.0, 5, 20, 1.0, False),
        (2.0, 4, 500, 0.01, True),
        (50.0, 10, 100, 1.0, False),
    ],
)
def test_solve_sigma_round_trips(target, releases, steps, q, poisson) -> None:
    kw = dict(releases_per_step=releases, steps=steps, sample_rate=q, poisson=poisson, delta=DELTA)
    sigma = solve_sigma(target_epsilon=target, **kw)
    eps = epsilon_for(noise_multiplier=sigma, **kw)
    assert eps <= target
    assert eps == pytest.approx(target, rel=5e-3)


def test_solve_sigma_prv_round_trips() -> None:
    kw = dict(releases_per_step=4, steps=10, delta=DELTA, mechanism="prv")
    sigma = solve_sigma(target_epsilon=2.0, **kw)
    assert epsilon_for(noise_multiplier=sigma, **kw) == pytest.approx(2.0, rel=1e-2)
    # PRV is tighter, so it needs less noise than RDP for the same target.
    assert sigma < solve_sigma(target_epsilon=2.0, releases_per_step=4, steps=10, delta=DELTA)


def test_solve_sigma_unreachable_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unreachable"):
        solve_sigma(target_epsilon=0.01, delta=DELTA, releases_per_step=1, steps=1)


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: PrivacyLedgerAccountant("gdp"), "mechanism"),
        (lambda: PrivacyLedgerAccountant(adjacency="swap"), "adjacency"),
        (lambda: PrivacyLedgerAccountant().step(noise_multiplier=-1.0, releases=1), "noise_multiplier"),
        (lambda: PrivacyLedgerAccountant().step(noise_multiplier=1.0, releases=-1), "releases"),
        (lambda: PrivacyLedgerAccountant().step(noise_multiplier=1.0, releases=1.5), "releases"),
        (
            lambda: PrivacyLedgerAccountant().step(noise_multiplier=1.0, releases=1, sample_rate=0.0),
            "sample_rate",
        ),
        (
            lambda: PrivacyLedgerAccountant().step(noise_multiplier=1.0, releases=1, sample_rate=1.5),
            "sample_rate",
        ),
        (lambda: PrivacyLedgerAccountant().get_epsilon(0.0), "delta"),
        (lambda: PrivacyLedgerAccountant().get_epsilon(1.0), "delta"),
        (
            lambda: solve_sigma(target_epsilon=0.0, delta=DELTA, releases_per_step=1, steps=1),
            "target_epsilon",
        ),
        (lambda: solve_sigma(target_epsilon=1.0, delta=2.0, releases_per_step=1, steps=1), "delta"),
        (
            lambda: solve_sigma(target_epsilon=1.0, delta=DELTA, releases_per_step=0, steps=1),
            "releases_per_step",
        ),
        (lambda: epsilon_for(noise_multiplier=1.0, releases_per_step=1, steps=-1, delta=DELTA), "steps"),
    ],
)
def test_bad_options_raise_value_error_naming_them(call, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        call()
