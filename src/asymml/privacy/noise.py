"""Per-sample clipping and Gaussian noise for released residuals (SPEC §4 "Noise / DP").

Every tensor handed to the untrusted accelerator is a *release*.  When noise is on, each sample's release
``r_b`` (dim 0 of the tensor is the sample) is clipped to L2 norm ``c`` and perturbed with i.i.d. Gaussian
noise, drawn from a *trusted* generator only::

    release_b = r_b * min(1, c / ||r_b||) + N(0, (sigma_eff * c)^2 I)

This is a Gaussian mechanism with L2 sensitivity ``c`` (zero-out adjacency, see
:mod:`asymml.privacy.accounting`) and noise multiplier ``sigma_eff``; the accountant composes it over all
releases of a sample.  ``sigma_eff`` comes from exactly one of three options:

``sigma``
    the noise multiplier itself (``sigma_eff = sigma``, the same for every layer).
``epsilon``
    a target ``(epsilon, delta)`` for the planned run; ``sigma`` is solved by the accountant
    (:meth:`NoiseConfig.resolve_noise_multiplier`) and handed to :class:`ReleaseMechanism`.
``nsr``
    the prototype's *noise-to-signal ratio*, an **amplitude** ratio: the expected noise norm is
    ``nsr * c``, i.e. each element gets std ``nsr * c / sqrt(d)`` where ``d`` is the number of elements of
    one sample's release (``r[0].numel()``), so ``E||noise||^2 = nsr^2 * c^2``.  For a residual whose
    clipped norm equals ``c`` (the usual case: ``c`` at or below typical residual norms),
    ``||noise|| / ||clipped residual|| ~= nsr`` and the *energy* ratio is ``nsr^2``; for smaller residuals
    the realised ratio is larger (never smaller).  The noise is scaled to the clip bound, not to the
    sample's own norm, because a data-dependent scale would leak the norm and is no Gaussian mechanism.
    The per-release DP noise multiplier is therefore ``sigma_eff = nsr / sqrt(d)`` -- it depends on the
    layer's size and is tiny for real feature maps (d in the thousands), so an nsr setting that keeps
    accuracy usually buys a very large epsilon.  The accountant reports it honestly.

Noise source: every mechanism owns a :class:`~asymml.privacy.secure_rng.SecureGenerator` (ChaCha20 under a
256-bit key from the OS; hardened float64 Box–Muller Gaussians as Opacus' ``secure_mode``).  The key is never
in :meth:`ReleaseMechanism.state_dict` or a checkpoint, so a resumed run draws fresh noise.  Each release is
an addressed draw ``(layer, release index of that layer)``.  ``NoiseConfig(insecure_seed=s)`` (or
:meth:`ReleaseMechanism.set_insecure_seed`) makes the noise reproducible for experiments -- and removable
by anyone who knows ``s``: it warns (:class:`~asymml.privacy.secure_rng.InsecureNoiseWarning`) and
:attr:`ReleaseMechanism.secure` is False.

Clip ``c``: a fixed float, or ``"auto"`` / ``"auto:q"`` -- adaptive, per layer, the exponential moving
average of the ``q``-quantile (default 0.5) of the per-sample norms of that layer's recent releases.
**An adaptive clip is not formally DP-accounted**: the bound itself is computed from private data and is
not privatised, so an epsilon reported for such a run is a heuristic figure, not a guarantee.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .secure_rng import HARDENING_DRAWS, InsecureNoiseWarning, SecureGenerator

__all__ = ["NoiseConfig", "ReleaseMechanism", "clip_per_sample", "per_sample_norms", "parse_clip"]

DEFAULT_AUTO_QUANTILE = 0.5
"""Quantile of recent per-sample norms used by ``clip="auto"``."""

_NORM_FLOOR = 1e-30  # avoids 0/0 when a sample's residual is exactly zero


def _is_real(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def parse_clip(clip: float | str) -> tuple[float | None, float | None]:
    """Parse a clip option into ``(fixed_clip, auto_quantile)``; exactly one of them is not None.

    Raises ``ValueError`` (naming ``clip``) for non-positive / non-finite bounds or a malformed
    ``"auto:q"`` string.
    """
    if isinstance(clip, str):
        text = clip.strip().lower()
        if text == "auto":
            return None, DEFAULT_AUTO_QUANTILE
        if text.startswith("auto:"):
            try:
                q = float(text[len("auto:") :])
            except ValueError:
                raise ValueError(f"clip: cannot parse quantile in {clip!r}; use 'auto' or 'auto:q'") from None
            if not (0.0 < q <= 1.0):
                raise ValueError(f"clip: the quantile in {clip!r} must be in (0, 1]")
            return None, q
        raise ValueError(f"clip must be a positive number, 'auto' or 'auto:q' (got {clip!r})")
    if not _is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
        raise ValueError(f"clip must be a finite number > 0, 'auto' or 'auto:q' (got {clip!r})")
    return float(clip), None


@dataclass(frozen=True)
class NoiseConfig:
    """What noise to put on released residuals; exactly one of ``sigma``, ``nsr``, ``epsilon``.

    ``sigma``: noise multiplier (Gaussian std = ``sigma * clip``).  ``nsr``: the prototype's
    noise-to-signal amplitude ratio, ``E||noise|| ~= nsr * clip`` (per-release multiplier
    ``nsr / sqrt(d)``, see the module docstring).  ``epsilon``/``delta``: target privacy for the planned
    run, sigma solved by the accountant.  ``clip``: per-sample L2 bound of each release, or
    ``"auto"``/``"auto:q"`` (adaptive; not formally DP-accounted).  ``insecure_seed``: **INSECURE**,
    experiments only -- makes the noise reproducible and therefore removable by anyone who knows the seed
    (default None: a fresh 256-bit OS key per mechanism).  Validated on construction.
    """

    sigma: float | None = None
    nsr: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    clip: float | str = 1.0
    insecure_seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending option when the configuration is unusable."""
        given = [name for name in ("sigma", "nsr", "epsilon") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(
                f"conflicting options: {' and '.join(given)} are all set; "
                "give only one of sigma, nsr, epsilon"
            )
        if not given:
            raise ValueError("NoiseConfig needs one of sigma, nsr, epsilon (sigma=0 clips without noise)")
        for name in ("sigma", "nsr"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
        if self.epsilon is not None and (
            not _is_real(self.epsilon) or math.isnan(self.epsilon) or self.epsilon <= 0
        ):
            raise ValueError(f"epsilon must be > 0 (got {self.epsilon!r})")
        if not _is_real(self.delta) or not (0.0 < self.delta < 1.0):
            raise ValueError(f"delta must be in (0, 1) (got {self.delta!r})")
        parse_clip(self.clip)
        s = self.insecure_seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ValueError(f"insecure_seed must be an integer >= 0 or None (got {s!r})")

    @classmethod
    def from_options(
        cls,
        sigma: float | None = None,
        nsr: float | None = None,
        epsilon: float | None = None,
        delta: float = 1e-5,
        clip: float | str = 1.0,
        insecure_seed: int | None = None,
    ) -> NoiseConfig | None:
        """Build a config from CLI-style options; ``None`` when none of sigma/nsr/epsilon is given."""
        if sigma is None and nsr is None and epsilon is None:
            return None
        return cls(sigma=sigma, nsr=nsr, epsilon=epsilon, delta=delta, clip=clip, insecure_seed=insecure_seed)

    @property
    def kind(self) -> str:
        """Which option sets the noise: ``"sigma"``, ``"nsr"`` or ``"epsilon"``."""
        if self.sigma is not None:
            return "sigma"
        return "nsr" if self.nsr is not None else "epsilon"

    @property
    def fixed_clip(self) -> float | None:
        """The fixed clip bound, or None for an adaptive clip."""
        return parse_clip(self.clip)[0]

    @property
    def clip_quantile(self) -> float | None:
        """The quantile of an adaptive clip, or None for a fixed clip."""
        return parse_clip(self.clip)[1]

    @property
    def adaptive_clip(self) -> bool:
        """True for ``clip="auto"``/``"auto:q"``."""
        return self.fixed_clip is None

    @property
    def formally_accounted(self) -> bool:
        """Whether an epsilon computed for this config is a DP guarantee (False with an adaptive clip)."""
        return not self.adaptive_clip

    def resolve_noise_multiplier(
        self,
        *,
        releases_per_step: int,
        steps: int,
        sample_rate: float = 1.0,
        poisson: bool = False,
        mechanism: str = "rdp",
    ) -> float | None:
        """Per-release noise multiplier for the planned run.

        ``sigma`` configs return sigma; ``epsilon`` configs solve it with
        :func:`asymml.privacy.accounting.solve_sigma`; ``nsr`` configs return None (their multiplier
        ``nsr / sqrt(d)`` depends on each layer's size and is known per release).
        """
        if self.sigma is not None:
            return float(self.sigma)
        if self.nsr is not None:
            return None
        from asymml.privacy.accounting import solve_sigma

        assert self.epsilon is not None
        return solve_sigma(
            target_epsilon=self.epsilon,
            delta=self.delta,
            releases_per_step=releases_per_step,
            steps=steps,
            sample_rate=sample_rate,
            poisson=poisson,
            mechanism=mechanism,
        )


def per_sample_norms(r: Tensor) -> Tensor:
    """L2 norm of each sample (dim 0) of ``r``, as a float32 (or float64) tensor of shape ``(B,)``."""
    if r.dim() == 0:
        raise ValueError("expected a tensor with a leading sample dimension, got a scalar")
    flat = r.reshape(r.shape[0], -1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.linalg.vector_norm(flat, ord=2, dim=1)


def _clip_scale(norms: Tensor, clip: float) -> Tensor:
    return (clip / norms.clamp_min(_NORM_FLOOR)).clamp(max=1.0)


def clip_per_sample(r: Tensor, clip: float) -> Tensor:
    """Return a new tensor whose every sample (dim 0) has L2 norm ``<= clip`` (samples within it unchanged).

    Samples are scaled by ``min(1, clip / ||r_b||)``, which keeps their direction.  Differentiable.
    """
    if not _is_real(clip) or not math.isfinite(float(clip)) or clip < 0:
        raise ValueError(f"clip must be a finite number >= 0 (got {clip!r})")
    scale = _clip_scale(per_sample_norms(r), float(clip))
    return r * scale.to(r.dtype).reshape((-1,) + (1,) * (r.dim() - 1))


class ReleaseMechanism:
    """Clip each sample's release to L2 norm c and add N(0, (sigma*c)^2).

    The mechanism owns its noise generator: a :class:`~asymml.privacy.secure_rng.SecureGenerator` with a
    fresh OS key (or, **insecure**, one keyed by ``config.insecure_seed``), never torch's global RNG, which
    untrusted code could seed or read.  Runtimes call ``mechanism(release, layer=name)``.

    ``sigma`` is the resolved noise multiplier (required for ``epsilon`` configs, optional for ``sigma``
    configs, forbidden for ``nsr`` configs).  ``generator``: a ``SecureGenerator`` to use instead of the
    default one; a ``torch.Generator`` is accepted for old experiments only (**insecure**: its seeds alias
    modulo 2^32 and its stream is predictable; warns).  With ``clip="auto"`` the per-layer bound is an EMA
    (momentum ``ema``) of the configured quantile of the layer's per-sample norms.

    :meth:`state_dict` / :meth:`load_state_dict` carry the adaptive clip, norm history, multipliers and
    release counters -- never the generator's key or position.
    """

    def __init__(
        self,
        config: NoiseConfig,
        sigma: float | None = None,
        *,
        generator: SecureGenerator | torch.Generator | None = None,
        ema: float = 0.9,
        track_norms: bool = False,
        norm_history: int = 4096,
    ) -> None:
        config.validate()
        if sigma is not None and (not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0):
            raise ValueError(f"sigma must be a finite number >= 0 (got {sigma!r})")
        if config.nsr is not None:
            if sigma is not None:
                raise ValueError("conflicting options: nsr config with an explicit sigma")
        elif config.epsilon is not None:
            if sigma is None:
                raise ValueError(
                    f"epsilon={config.epsilon} config needs the sigma solved for the planned run: "
                    "pass sigma=config.resolve_noise_multiplier(...) "
                    "(see asymml.privacy.accounting.solve_sigma)"
                )
        else:
            if sigma is not None and float(sigma) != float(config.sigma):  # type: ignore[arg-type]
                raise ValueError(f"conflicting options: config sigma={config.sigma} but sigma={sigma} given")
            sigma = config.sigma
        if not (0.0 <= ema < 1.0):
            raise ValueError(f"ema must be in [0, 1) (got {ema!r})")
        self.config = config
        self._sigma: float | None = None if sigma is None else float(sigma)
        self._fixed_clip, self._quantile = parse_clip(config.clip)
        self._torch_generator: torch.Generator | None = None
        if isinstance(generator, torch.Generator):
            _warn_torch_generator()
            self._torch_generator = generator
            generator = None
        if generator is not None and not isinstance(generator, SecureGenerator):
            raise TypeError(f"generator must be a SecureGenerator (got {type(generator).__name__})")
        self._rng: SecureGenerator = generator if generator is not None else _default_rng(config.insecure_seed)
        self._ema = ema
        self._track_norms = track_norms or self._quantile is not None
        self._norm_history = int(norm_history)
        self._lock = threading.Lock()
        self._clip_state: dict[str, float] = {}
        self._norms: dict[str, Tensor] = {}
        self._multipliers: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    # ----------------------------------------------------------------- generator and state
    @property
    def secure(self) -> bool:
        """True when the noise comes from an OS-keyed generator (no insecure seed, no torch generator)."""
        return self._torch_generator is None and self._rng.secure

    def generator_info(self) -> dict[str, Any]:
        """What draws the noise: ``{"generator", "key_bits", "secure", "hardening_draws"}`` (never the key)."""
        if self._torch_generator is not None:
            return {"generator": "torch.Generator (INSECURE)", "key_bits": 32, "secure": False, "hardening_draws": 1}
        return {"generator": "chacha20", "key_bits": self._rng.key_bits, "secure": self._rng.secure,
                "hardening_draws": HARDENING_DRAWS}

    def set_insecure_seed(self, seed: int | None) -> None:
        """**INSECURE**: key the noise by ``seed`` (reproducible experiments only; warns).  ``None``: a fresh
        OS key.  Counters are kept, so a resumed run with the same seed replays the same noise."""
        with self._lock:
            self._rng = _default_rng(seed)
            self._torch_generator = None

    def state_dict(self) -> dict[str, Any]:
        """Adaptive clip, norm history, multipliers and release counters (never the noise key or position)."""
        with self._lock:
            return {
                "version": 1,
                "clip_state": dict(self._clip_state),
                "norms": {k: v.clone() for k, v in self._norms.items()},
                "multipliers": dict(self._multipliers),
                "counts": dict(self._counts),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.  A secure generator is re-keyed from the OS, so restored counters
        never replay noise already drawn under the current key (a resumed run draws fresh noise)."""
        unknown = set(state) - {"version", "clip_state", "norms", "multipliers", "counts"}
        if unknown:
            raise KeyError(f"unexpected mechanism state keys: {sorted(unknown)} (noise state is never restored)")
        with self._lock:
            self._clip_state = {str(k): float(v) for k, v in state.get("clip_state", {}).items()}
            self._norms = {str(k): torch.as_tensor(v).detach().float().cpu().clone()
                           for k, v in state.get("norms", {}).items()}
            self._multipliers = {str(k): float(v) for k, v in state.get("multipliers", {}).items()}
            self._counts = {str(k): int(v) for k, v in state.get("counts", {}).items()}
        self._rng.rekey()

    @property
    def releases(self) -> int:
        """Releases so far, all layers together."""
        with self._lock:
            return sum(self._counts.values())

    # ----------------------------------------------------------------- introspection
    @property
    def noise_multiplier(self) -> float:
        """The DP noise multiplier per release (what the accountant needs).

        For ``nsr`` configs it differs per layer (``nsr / sqrt(d)``); this returns the smallest one used so
        far, a conservative value for accounting every release with one multiplier.  Raises
        ``RuntimeError`` for an nsr config before any release.
        """
        if self._sigma is not None:
            return self._sigma
        with self._lock:
            if not self._multipliers:
                raise RuntimeError("nsr noise multiplier depends on the layer size; no release seen yet")
            return min(self._multipliers.values())

    def multiplier_for(self, numel_per_sample: int) -> float:
        """Noise multiplier of a release with ``numel_per_sample`` elements per sample."""
        if self._sigma is not None:
            return self._sigma
        assert self.config.nsr is not None
        return float(self.config.nsr) / math.sqrt(max(int(numel_per_sample), 1))

    def multipliers(self) -> Mapping[str, float]:
        """Noise multiplier of the latest release of each layer (a copy)."""
        with self._lock:
            return dict(self._multipliers)

    def release_counts(self) -> Mapping[str, int]:
        """How many tensors each layer has released through this mechanism (a copy)."""
        with self._lock:
            return dict(self._counts)

    def clip_for(self, layer: str) -> float:
        """Current clip bound of ``layer`` (for an adaptive clip: ``KeyError`` before its first release)."""
        if self._fixed_clip is not None:
            return self._fixed_clip
        with self._lock:
            return self._clip_state[layer]

    def norms_seen(self, layer: str) -> Tensor:
        """Recent pre-clip per-sample norms of ``layer`` (1-D CPU tensor, oldest first; empty if none).

        Recorded for adaptive clips, or when the mechanism was built with ``track_norms=True``.
        """
        with self._lock:
            return self._norms.get(layer, torch.empty(0)).clone()

    # ----------------------------------------------------------------- the release
    def __call__(self, r: Tensor, *, layer: str, generator: SecureGenerator | torch.Generator | None = None) -> Tensor:
        """Clip and noise ``r`` (``(B, ...)``, dim 0 = sample) for release; returns a new tensor.

        Noise comes from the mechanism's own generator; ``generator`` overrides it for this call (a
        ``torch.Generator`` is insecure and warns)."""
        if not isinstance(r, Tensor) or r.dim() == 0:
            raise ValueError("release must be a tensor with a leading sample dimension")
        if not r.is_floating_point():
            raise ValueError(f"release must be floating point (got {r.dtype})")
        d = int(r[0].numel()) if r.shape[0] > 0 else int(math.prod(r.shape[1:]))
        norms = per_sample_norms(r)
        clip = self._update_and_get_clip(layer, norms.detach())
        multiplier = self.multiplier_for(d)
        with self._lock:
            self._multipliers[layer] = multiplier
            index = self._counts.get(layer, 0)  # the release's address in the noise stream
            self._counts[layer] = index + 1
        if clip is None:  # adaptive clip, nothing seen yet and an empty batch: nothing to release
            return r.clone()
        scale = _clip_scale(norms, clip).to(r.dtype).reshape((-1,) + (1,) * (r.dim() - 1))
        out = r * scale
        std = multiplier * clip
        if std > 0 and out.numel() > 0:
            noise = self._noise(out, generator, layer, index)
            # added in float64, rounded once to the release's dtype
            out = (out.to(torch.float64) + std * noise.to(out.device)).to(out.dtype)
        return out

    def _update_and_get_clip(self, layer: str, norms: Tensor) -> float | None:
        if not self._track_norms:
            return self._fixed_clip
        cpu = norms.float().cpu()
        with self._lock:
            if cpu.numel() > 0:
                past = self._norms.get(layer)
                hist = cpu if past is None else torch.cat([past, cpu])
                self._norms[layer] = hist[-self._norm_history :]
            if self._quantile is None:
                return self._fixed_clip
            if cpu.numel() > 0:
                batch_q = float(torch.quantile(cpu, self._quantile))
                prev = self._clip_state.get(layer)
                ema = batch_q if prev is None else self._ema * prev + (1 - self._ema) * batch_q
                self._clip_state[layer] = ema
            return self._clip_state.get(layer)

    def _noise(self, out: Tensor, generator: Any, layer: str, index: int) -> Tensor:
        """Standard normal noise shaped like ``out``, float64, on the CPU (trusted)."""
        if generator is None:
            generator = self._torch_generator
        if isinstance(generator, torch.Generator):  # legacy, insecure
            if generator is not self._torch_generator:
                _warn_torch_generator()
            return torch.randn(out.shape, generator=generator, device=generator.device, dtype=torch.float64)
        rng = generator if generator is not None else self._rng
        if not isinstance(rng, SecureGenerator):
            raise TypeError(f"generator must be a SecureGenerator (got {type(rng).__name__})")
        return rng.standard_normal(tuple(out.shape), label=layer, index=index)

    def __repr__(self) -> str:
        c = self.config
        noise = f"sigma={self._sigma}" if self._sigma is not None else f"nsr={c.nsr}"
        insecure = "" if self.secure else ", INSECURE noise"
        return f"ReleaseMechanism({noise}, clip={c.clip!r}{insecure})"


def _default_rng(seed: int | None) -> SecureGenerator:
    if seed is None:
        return SecureGenerator()
    return SecureGenerator(insecure_seed=seed)


def _warn_torch_generator() -> None:
    warnings.warn(
        "DP noise from a torch.Generator is insecure (seeds alias modulo 2^32, the stream is predictable): "
        "experiments only; leave generator=None for the secure default",
        InsecureNoiseWarning,
        stacklevel=3,
    )
