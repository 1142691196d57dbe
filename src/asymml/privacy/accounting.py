"""Differential-privacy accounting of released residuals, on top of Opacus' RDP and PRV accountants.

What is composed (SPEC §4 "Noise / DP"): every noised release of a sample -- each forward residual
release and, in ``protected`` backward mode, each gradient residual release -- is one Gaussian mechanism
with L2 sensitivity ``clip`` and noise multiplier ``sigma`` (noise std ``sigma * clip``).  ``k`` releases
per step compose, and ``T`` steps compose.

* **Within a step.**  ``k`` Gaussian mechanisms with multiplier ``sigma`` (adaptively chosen, each with
  sensitivity equal to its own clip) compose *exactly* like one Gaussian mechanism with multiplier
  ``sigma / sqrt(k)``: their privacy-loss distributions are Gaussian and add up (so the RDP curves
  ``alpha / (2 sigma^2)`` add, and the PRVs convolve to the same Gaussian).  In general, multipliers
  ``s_i`` combine to ``(sum_i s_i^-2)^-1/2`` (:func:`combine_noise_multipliers`).  Doing it once per step is
  also what makes subsampling right: a sampled sample releases all ``k`` at once, so the *composed*
  mechanism is what gets subsampled.
* **Sampling.**  Batch sampling amplifies privacy only when batches are drawn by Poisson sampling
  (``poisson=True``, each sample independently with probability ``sample_rate``); for shuffled
  fixed-size batches the sample rate is taken as 1 (no amplification).
* **Adjacency.**  ``"zero-out"`` (default, the Opacus convention): a neighbouring dataset replaces one
  sample by a null sample whose releases are zero, so a release's sensitivity is ``clip``.  For
  ``"replace-one"`` (a sample replaced by an arbitrary other one) the sensitivity is ``2 * clip``, which is
  accounted as a noise multiplier of ``sigma / 2``.
* **Caveat.**  With an adaptive clip (``clip="auto"``) the bound is data dependent and not privatised; the
  epsilon then is a heuristic figure, not a guarantee.

**One place** (issue 8 item 4): :func:`plan_sigma` plans the noise multiplier of a run and
:class:`PrivacyLedger` counts what each step released -- activation residuals, gradient residuals and the
DP-SGD update (one more Gaussian per step, with its own multiplier and clip) -- in one Opacus accountant.
Training and the privacy report both use them.

The PRV accountant is only practical for moderate epsilon: when RDP already certifies no useful privacy
(epsilon above :data:`PRV_MAX_RDP_EPSILON`), or PRV fails numerically, the (valid, looser) RDP bound is
returned and :meth:`PrivacyLedgerAccountant.describe` says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant

from ..errors import ConfigError

__all__ = [
    "PrivacyLedger",
    "plan_sigma",
    "RELEASE_KINDS",
    "PrivacyLedgerAccountant",
    "epsilon_for",
    "solve_sigma",
    "combine_noise_multipliers",
    "MECHANISMS",
    "ADJACENCIES",
]

MECHANISMS = ("rdp", "prv")
ADJACENCIES = ("zero-out", "replace-one")
PRV_MAX_RDP_EPSILON = 64.0
"""Above this RDP epsilon, PRV discretisation gets slow or overflows; RDP's bound is reported instead."""


def _check_mechanism(mechanism: str) -> str:
    if mechanism not in MECHANISMS:
        raise ConfigError(f"mechanism must be one of {MECHANISMS} (got {mechanism!r})")
    return mechanism


def _check_adjacency(adjacency: str) -> str:
    if adjacency not in ADJACENCIES:
        raise ConfigError(f"adjacency must be one of {ADJACENCIES} (got {adjacency!r})")
    return adjacency


def _check_delta(delta: float) -> float:
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not (0.0 < delta < 1.0):
        raise ConfigError(f"delta must be in (0, 1) (got {delta!r})")
    return float(delta)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum} (got {value!r})")
    return int(value)


def _check_eps_error(eps_error: float) -> float:
    if isinstance(eps_error, bool) or not eps_error > 0:
        raise ConfigError(f"eps_error must be > 0 (got {eps_error!r})")
    return float(eps_error)


def _append_run(groups: list[Any], group: Any, steps: int) -> None:
    """Append ``group`` (a run of ``steps`` identical steps), or lengthen the last run if it is the same."""
    if groups and groups[-1].same_as(group):
        groups[-1].steps += steps
    else:
        groups.append(group)


def combine_noise_multipliers(multipliers: Iterable[float]) -> float:
    """Multiplier of the single Gaussian mechanism equivalent to composing Gaussians with ``multipliers``.

    ``(sum_i s_i^-2)^-1/2`` -- exact for Gaussian mechanisms (RDP and PRV alike).  Any zero gives 0
    (no privacy); an empty input gives ``inf`` (nothing released).
    """
    total = 0.0
    for s in multipliers:
        if not s >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0 (got {s!r})")
        if s == 0:
            return 0.0
        total += 1.0 / (s * s)
    return math.inf if total == 0 else 1.0 / math.sqrt(total)


@dataclass
class _Group:
    """A run of identical steps."""

    noise_multiplier: float
    releases_per_step: int
    sample_rate_requested: float
    poisson: bool
    sample_rate_used: float
    adjacency: str
    steps: int

    def same_as(self, other: _Group) -> bool:
        a, b = asdict(self), asdict(other)
        a.pop("steps")
        b.pop("steps")
        return a == b

    @property
    def effective_noise_multiplier(self) -> float:
        """Multiplier of the one Gaussian that the step's releases compose to (sensitivity ``clip``)."""
        if self.releases_per_step == 0:
            return math.inf
        s = self.noise_multiplier / math.sqrt(self.releases_per_step)
        return s / 2 if self.adjacency == "replace-one" else s


class PrivacyLedgerAccountant:
    """Composes every noised release of a sample over a run.

    Each forward residual release and (protected backward mode) each gradient residual release is one
    Gaussian mechanism with sensitivity = clip and noise multiplier sigma; k releases per step compose;
    T steps compose.  Batch sampling amplifies only when sampling is Poisson (``poisson=True``); otherwise
    ``sample_rate`` is taken as 1.

    The ``k`` releases of a step are composed as one Gaussian with multiplier ``sigma / sqrt(k)`` (exact,
    see the module docstring), then handed to Opacus' ``RDPAccountant`` or ``PRVAccountant`` once per step.
    ``eps_error`` is PRV's epsilon accuracy (its result is an upper bound).
    """

    def __init__(
        self, mechanism: str = "rdp", *, adjacency: str = "zero-out", eps_error: float = 0.01
    ) -> None:
        self.mechanism = _check_mechanism(mechanism)
        self.adjacency = _check_adjacency(adjacency)
        self.eps_error = _check_eps_error(eps_error)
        self._groups: list[_Group] = []
        self._last_method: str | None = None

    # ----------------------------------------------------------------- recording
    def step(
        self,
        *,
        noise_multiplier: float,
        releases: int,
        sample_rate: float = 1.0,
        poisson: bool = False,
        steps: int = 1,
    ) -> None:
        """Record ``steps`` identical training steps, each releasing every sampled sample ``releases`` times.

        ``noise_multiplier`` is the per-release multiplier sigma (0 means no noise: epsilon is infinite).
        ``sample_rate`` counts only when ``poisson`` is True.
        """
        if isinstance(noise_multiplier, bool) or not (noise_multiplier >= 0) or math.isinf(noise_multiplier):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0 (got {noise_multiplier!r})")
        releases = _check_count("releases", releases, 0)
        steps = _check_count("steps", steps, 0)
        if isinstance(sample_rate, bool) or not (0.0 < sample_rate <= 1.0):
            raise ConfigError(f"sample_rate must be in (0, 1] (got {sample_rate!r})")
        if steps == 0:
            return
        group = _Group(
            noise_multiplier=float(noise_multiplier),
            releases_per_step=releases,
            sample_rate_requested=float(sample_rate),
            poisson=bool(poisson),
            sample_rate_used=float(sample_rate) if poisson else 1.0,
            adjacency=self.adjacency,
            steps=steps,
        )
        _append_run(self._groups, group, steps)

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return sum(g.steps for g in self._groups)

    @property
    def releases(self) -> int:
        """Total number of releases of one (always-sampled) sample recorded."""
        return sum(g.steps * g.releases_per_step for g in self._groups)

    # ----------------------------------------------------------------- epsilon
    def _history(self) -> list[tuple[float, float, int]] | None:
        """Opacus history ``(multiplier, sample_rate, steps)``; None when some release had no noise."""
        history = []
        for g in self._groups:
            s = g.effective_noise_multiplier
            if s == 0:
                return None
            if math.isinf(s):
                continue
            history.append((s, g.sample_rate_used, g.steps))
        return history

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any release; ``inf`` if any release was noiseless)."""
        delta = _check_delta(delta)
        history = self._history()
        if history is None:
            self._last_method = self.mechanism
            return math.inf
        if not history:
            self._last_method = self.mechanism
            return 0.0
        rdp = RDPAccountant()
        rdp.history = list(history)
        eps_rdp = float(rdp.get_epsilon(delta))
        if self.mechanism == "rdp":
            self._last_method = "rdp"
            return eps_rdp
        if not eps_rdp <= PRV_MAX_RDP_EPSILON:
            self._last_method = "rdp (prv fallback: epsilon beyond PRV's practical range)"
            return eps_rdp
        prv = PRVAccountant()
        prv.history = list(history)
        try:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                eps_prv = float(prv.get_epsilon(delta, eps_error=self.eps_error))
        except (ValueError, FloatingPointError, OverflowError, MemoryError):
            eps_prv = math.nan
        if not math.isfinite(eps_prv):
            self._last_method = "rdp (prv fallback: PRV failed numerically)"
            return eps_rdp
        self._last_method = "prv"
        return eps_prv

    # ----------------------------------------------------------------- reporting / persistence
    def describe(self) -> dict[str, Any]:
        """Exactly what is composed: mechanism, steps, releases per step, sample rate used, sigma.

        Top-level ``noise_multiplier`` / ``releases_per_step`` / ``sample_rate`` are set when every step
        agrees (else None); ``groups`` lists each run of identical steps.
        """
        groups = [
            {**asdict(g), "effective_noise_multiplier_per_step": g.effective_noise_multiplier}
            for g in self._groups
        ]

        def uniform(key: str) -> Any:
            values = {g[key] for g in groups}
            return values.pop() if len(values) == 1 else None

        return {
            "mechanism": self.mechanism,
            "epsilon_method": self._last_method,
            "adjacency": self.adjacency,
            "sensitivity": "2 * clip" if self.adjacency == "replace-one" else "clip",
            "steps": self.steps,
            "releases_total": self.releases,
            "noise_multiplier": uniform("noise_multiplier"),
            "releases_per_step": uniform("releases_per_step"),
            "sample_rate": uniform("sample_rate_used"),
            "poisson": uniform("poisson"),
            "groups": groups,
            "composition": (
                "each release of a sample = Gaussian mechanism (sensitivity "
                + ("2*clip" if self.adjacency == "replace-one" else "clip")
                + ", std sigma*clip); the k releases of a step compose exactly to one Gaussian with "
                "multiplier sigma/sqrt(k); steps compose over the run, amplified by sample_rate only "
                "under Poisson sampling"
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (for checkpoints / ``--resume``)."""
        return {
            "mechanism": self.mechanism,
            "adjacency": self.adjacency,
            "eps_error": self.eps_error,
            "groups": [asdict(g) for g in self._groups],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.mechanism = _check_mechanism(state["mechanism"])
        self.adjacency = _check_adjacency(state.get("adjacency", "zero-out"))
        self.eps_error = float(state.get("eps_error", self.eps_error))
        self._groups = [_Group(**g) for g in state["groups"]]
        self._last_method = None

    def __repr__(self) -> str:
        return (
            f"PrivacyLedgerAccountant(mechanism={self.mechanism!r}, steps={self.steps}, "
            f"releases={self.releases})"
        )


def epsilon_for(
    *,
    noise_multiplier: float,
    releases_per_step: int,
    steps: int,
    sample_rate: float = 1.0,
    poisson: bool = False,
    delta: float,
    mechanism: str = "rdp",
    adjacency: str = "zero-out",
) -> float:
    """Epsilon of ``steps`` steps, each with ``releases_per_step`` releases of multiplier sigma."""
    acc = PrivacyLedgerAccountant(mechanism, adjacency=adjacency)
    acc.step(
        noise_multiplier=noise_multiplier,
        releases=releases_per_step,
        sample_rate=sample_rate,
        poisson=poisson,
        steps=steps,
    )
    return acc.get_epsilon(delta)


def solve_sigma(
    *,
    target_epsilon: float,
    delta: float,
    releases_per_step: int,
    steps: int,
    sample_rate: float = 1.0,
    poisson: bool = False,
    mechanism: str = "rdp",
    adjacency: str = "zero-out",
    rtol: float = 1e-3,
) -> float:
    """Smallest per-release noise multiplier (to ``rtol``) whose run epsilon is ``<= target_epsilon``.

    Bisection (in log sigma) on :func:`epsilon_for`; the returned sigma is on the safe side.  Raises
    ``ValueError`` when the target is unreachable (RDP cannot certify an epsilon below about
    ``log(1/delta) / 62`` with Opacus' orders, however large sigma is).
    """
    if isinstance(target_epsilon, bool) or not (target_epsilon > 0) or math.isinf(target_epsilon):
        raise ConfigError(f"target_epsilon must be a finite number > 0 (got {target_epsilon!r})")
    _check_delta(delta)
    _check_count("releases_per_step", releases_per_step, 1)
    _check_count("steps", steps, 1)
    _check_mechanism(mechanism)
    if not rtol > 0:
        raise ConfigError(f"rtol must be > 0 (got {rtol!r})")

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' "optimal order is the largest alpha" hints
            return epsilon_for(
                noise_multiplier=sigma,
                releases_per_step=releases_per_step,
                steps=steps,
                sample_rate=sample_rate,
                poisson=poisson,
                delta=delta,
                mechanism=mechanism,
                adjacency=adjacency,
            )

    scale = math.sqrt(releases_per_step * steps)
    sigma_max = 1e4 * scale * (2.0 if adjacency == "replace-one" else 1.0)
    hi = max(scale, 1e-3)
    while eps(hi) > target_epsilon:
        if hi >= sigma_max:
            raise ConfigError(
                f"target epsilon {target_epsilon} is unreachable with the {mechanism} accountant at "
                f"delta={delta}: even noise_multiplier={hi:.3g} gives epsilon={eps(hi):.4g}; use a larger "
                "epsilon or delta" + (", or mechanism='prv'" if mechanism == "rdp" else "")
            )
        hi *= 4.0
    lo = hi / 4.0
    while eps(lo) <= target_epsilon:
        hi = lo
        lo /= 4.0
        if lo < 1e-6:
            return hi
    while hi / lo > 1.0 + rtol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------- one ledger for a whole run

RELEASE_KINDS = ("activations", "gradients", "updates")
"""What a step can release to the accelerator through a Gaussian mechanism (the ``covers`` vocabulary,
with ``"sampling"`` added when Poisson subsampling amplification is used)."""


def _check_sigmas(kind: str, sigmas: Iterable[float]) -> list[float]:
    out = []
    for s in sigmas:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (s >= 0) or math.isinf(s):
            raise ConfigError(f"{kind}: noise multipliers must be finite numbers >= 0 (got {s!r})")
        out.append(float(s))
    return out


def plan_sigma(
    epsilon: float,
    delta: float,
    *,
    steps: int,
    releases_per_step: int,
    sample_rate: float = 1.0,
    poisson: bool = False,
    accountant: str = "rdp",
    updates_per_step: int = 0,
    update_sigma: float | None = None,
    adjacency: str = "zero-out",
) -> float:
    """Per-release noise multiplier sigma that makes a run cost ``(epsilon, delta)``.

    Each step releases ``releases_per_step`` Gaussian mechanisms (activation and gradient residuals, each
    with sensitivity = its clip) and ``updates_per_step`` DP-SGD update mechanisms (sensitivity = the
    update clip).  With ``update_sigma=None`` every mechanism gets the returned sigma (they compose to
    ``sigma / sqrt(releases + updates)`` per step); with ``update_sigma`` fixed, the releases' sigma is
    solved for what the updates leave of the budget.  ``poisson=True`` (amplification by
    ``sample_rate``) is only sound when batch membership comes from a secure generator
    (:func:`~asymml.privacy.secure_rng.poisson_batches`).  Raises ``ValueError`` when unreachable.
    """
    k = _check_count("releases_per_step", releases_per_step, 0)
    u = _check_count("updates_per_step", updates_per_step, 0)
    if k + u == 0:
        raise ConfigError("nothing is released per step: no noise to plan (releases_per_step + updates_per_step = 0)")
    if update_sigma is None:
        return solve_sigma(target_epsilon=epsilon, delta=delta, releases_per_step=k + u, steps=steps,
                           sample_rate=sample_rate, poisson=poisson, mechanism=accountant, adjacency=adjacency)
    _check_sigmas("update_sigma", [update_sigma])
    if k == 0:
        raise ConfigError("update_sigma is fixed and there are no other releases: nothing to solve")
    s_eff = solve_sigma(target_epsilon=epsilon, delta=delta, releases_per_step=1, steps=steps,
                        sample_rate=sample_rate, poisson=poisson, mechanism=accountant, adjacency=adjacency)
    left = 1.0 / s_eff**2 - (u / update_sigma**2 if update_sigma > 0 else math.inf)
    if not left > 0:
        raise ConfigError(
            f"the updates alone (update_sigma={update_sigma}, {u} per step) spend more than epsilon={epsilon}: "
            f"raise update_sigma above {s_eff * math.sqrt(u):.4g} or the target epsilon"
        )
    return math.sqrt(k / left)


@dataclass
class _LedgerGroup:
    counts: dict[str, int]
    sigmas: dict[str, list[float]]
    sample_rate: float
    amplified: bool
    steps: int

    def same_as(self, other: _LedgerGroup) -> bool:
        return (self.counts, self.sigmas, self.sample_rate, self.amplified) == (
            other.counts, other.sigmas, other.sample_rate, other.amplified)

    @property
    def noise_multiplier(self) -> float:
        """The one Gaussian the step's mechanisms compose to (``inf``: nothing released)."""
        return combine_noise_multipliers(s for v in self.sigmas.values() for s in v)


class PrivacyLedger:
    """One accountant for everything that leaves the trusted context, step by step.

    Each :meth:`step` records the Gaussian mechanisms one (sampled) sample went through in a training
    step -- ``activations`` and ``gradients`` (noise multipliers of the released residuals) and
    ``updates`` (the DP-SGD update mechanism's multiplier, sensitivity = its own clip) -- and composes them
    exactly into one Gaussian per step (:func:`combine_noise_multipliers`), handed to Opacus' RDP or PRV
    accountant.  Subsampling amplification by ``sample_rate`` is used only when ``sampled_by`` is a
    *secure* sampler or generator (OS key, :mod:`asymml.privacy.secure_rng`): predictable batch
    membership gives no amplification.  ``unnoised`` counts private releases without noise: epsilon is
    then infinite.
    """

    def __init__(self, accountant: str = "rdp", *, adjacency: str = "zero-out", eps_error: float = 0.01) -> None:
        self.accountant = _check_mechanism(accountant)
        self.adjacency = _check_adjacency(adjacency)
        self.eps_error = _check_eps_error(eps_error)
        self._groups: list[_LedgerGroup] = []
        self.unnoised = 0
        self._last_method: str | None = None

    def step(
        self,
        sample_rate: float = 1.0,
        *,
        activations: Iterable[float] = (),
        gradients: Iterable[float] = (),
        updates: Iterable[float] = (),
        sampled_by: Any = None,
        unnoised: int = 0,
        steps: int = 1,
    ) -> None:
        """Record ``steps`` identical steps (multipliers per mechanism, one entry per release)."""
        sig = {"activations": _check_sigmas("activations", activations),
               "gradients": _check_sigmas("gradients", gradients),
               "updates": _check_sigmas("updates", updates)}
        steps = _check_count("steps", steps, 0)
        self.unnoised += _check_count("unnoised", unnoised, 0) * steps
        if isinstance(sample_rate, bool) or not (0.0 < sample_rate <= 1.0):
            raise ConfigError(f"sample_rate must be in (0, 1] (got {sample_rate!r})")
        amplified = bool(sample_rate < 1.0 and sampled_by is not None and getattr(sampled_by, "secure", False))
        if steps == 0:
            return
        group = _LedgerGroup(counts={k: len(v) for k, v in sig.items()}, sigmas=sig, sample_rate=float(sample_rate),
                             amplified=amplified, steps=steps)
        _append_run(self._groups, group, steps)

    @property
    def steps(self) -> int:
        """Steps recorded."""
        return sum(g.steps for g in self._groups)

    def releases(self) -> dict[str, int]:
        """Noised mechanisms one always-sampled sample went through, per kind."""
        return {k: sum(g.steps * g.counts[k] for g in self._groups) for k in RELEASE_KINDS}

    @property
    def covers(self) -> list[str]:
        """What the epsilon accounts for: the kinds released with noise, and ``"sampling"`` if amplified."""
        rel = self.releases()
        out = [k for k in RELEASE_KINDS if rel[k]]
        if self._groups and all(g.amplified for g in self._groups):
            out.append("sampling")
        return out

    def _accountant(self) -> PrivacyLedgerAccountant:
        acc = PrivacyLedgerAccountant(self.accountant, adjacency=self.adjacency, eps_error=self.eps_error)
        for g in self._groups:
            s = g.noise_multiplier
            if math.isinf(s):
                continue
            acc.step(noise_multiplier=s, releases=1, sample_rate=g.sample_rate, poisson=g.amplified, steps=g.steps)
        return acc

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (``inf`` if some private release had no noise)."""
        _check_delta(delta)
        if self.unnoised:
            self._last_method = self.accountant
            return math.inf
        acc = self._accountant()
        eps = acc.get_epsilon(delta)
        self._last_method = acc.describe()["epsilon_method"]
        return eps

    def notes(self) -> list[str]:
        """Plain-language caveats about what the epsilon does and does not cover."""
        out = []
        if self.unnoised:
            out.append(f"{self.unnoised} private releases had no noise: epsilon is infinite")
        if "updates" not in self.covers:
            out.append("the weight updates are not noised (no DP-SGD): the accelerator sees them, epsilon does "
                       "not cover them")
        if any(g.sample_rate < 1.0 and not g.amplified for g in self._groups):
            out.append("batches were not Poisson-sampled by a secure generator: no subsampling amplification")
        return out

    def summary(self, delta: float) -> dict[str, Any]:
        """``{"epsilon", "delta", "covers", "notes"}`` (``epsilon`` None when infinite or nothing is
        covered but the releases: a run whose updates are not noised has no valid epsilon)."""
        eps = self.epsilon(delta)
        valid = math.isfinite(eps) and "updates" in self.covers
        return {"epsilon": eps if valid else None, "delta": float(delta), "covers": self.covers,
                "notes": self.notes(), "epsilon_releases_only": eps if math.isfinite(eps) else None}

    def describe(self) -> dict[str, Any]:
        """What is composed, group by group."""
        return {
            "accountant": self.accountant,
            "epsilon_method": self._last_method,
            "adjacency": self.adjacency,
            "steps": self.steps,
            "releases": self.releases(),
            "unnoised": self.unnoised,
            "covers": self.covers,
            "groups": [{**asdict(g), "noise_multiplier_per_step": g.noise_multiplier} for g in self._groups],
            "composition": "per step, every Gaussian mechanism a sample went through (activation and gradient "
                           "residuals, the DP-SGD update) composes exactly to one Gaussian with multiplier "
                           "(sum sigma_i^-2)^-1/2; steps compose, amplified by sample_rate only under Poisson "
                           "sampling from a secure generator",
        }

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (for checkpoints)."""
        return {"accountant": self.accountant, "adjacency": self.adjacency, "eps_error": self.eps_error,
                "unnoised": self.unnoised, "groups": [asdict(g) for g in self._groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.accountant = _check_mechanism(state["accountant"])
        self.adjacency = _check_adjacency(state.get("adjacency", "zero-out"))
        self.eps_error = float(state.get("eps_error", self.eps_error))
        self.unnoised = int(state.get("unnoised", 0))
        self._groups = [_LedgerGroup(**g) for g in state["groups"]]
        self._last_method = None

    def __repr__(self) -> str:
        return f"PrivacyLedger(accountant={self.accountant!r}, steps={self.steps}, covers={self.covers})"
