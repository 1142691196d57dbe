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
256-bit key from the OS).  The noise is float64, added to the float64 value of the clipped release and rounded
once to the release dtype: one Box–Muller draw per element for float32/float16/bfloat16 releases, the sum of
four (Opacus' ``secure_mode``) for float64 releases -- see :mod:`asymml.privacy.secure_rng` for what each
defends against.  The key is never in :meth:`ReleaseMechanism.state_dict` or a checkpoint, so a resumed run
draws fresh noise.  Each release is an addressed draw ``(layer, release index of that layer)``, which is what
lets the mechanism generate the next release's noise ahead, in the background, and still hand out exactly the
numbers an inline draw would (:meth:`ReleaseMechanism.noise_stats` says how much of the cost that hid).
``NoiseConfig(insecure_seed=s)`` (or :meth:`ReleaseMechanism.set_insecure_seed`) makes the noise reproducible
for experiments -- and removable by anyone who knows ``s``: it warns
(:class:`~asymml.privacy.secure_rng.InsecureNoiseWarning`) and :attr:`ReleaseMechanism.secure` is False.
Reproducible noise is also tied to the release's memory layout (noise is laid over the elements in memory
order).

Clip ``c``: a fixed float, or ``"auto"`` / ``"auto:q"`` -- adaptive, per layer, the exponential moving
average of the ``q``-quantile (default 0.5) of the per-sample norms of that layer's recent releases.
**An adaptive clip is not formally DP-accounted**: the bound itself is computed from private data and is
not privatised, so an epsilon reported for such a run is a heuristic figure, not a guarantee.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .secure_rng import HARDENING_DRAWS, InsecureNoiseWarning, SecureGenerator, single_threaded

__all__ = ["NoiseConfig", "ReleaseMechanism", "clip_per_sample", "per_sample_norms", "parse_clip"]

DEFAULT_AUTO_QUANTILE = 0.5
"""Quantile of recent per-sample norms used by ``clip="auto"``."""

_NORM_FLOOR = 1e-30  # avoids 0/0 when a sample's residual is exactly zero

DEFAULT_PREFETCH_BYTES = 256 << 20
"""Most bytes of float64 noise buffers a mechanism keeps (prefetched, free for reuse and in use together)."""

_COMBINE_ELEMS = 32760  # elements per op when adding noise (below torch's parallel grain: one thread)
_SINGLE_DRAW_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None or v.strip() == "" else v.strip().lower() not in ("0", "false", "no", "off")


@dataclass
class _Pending:
    """A draw generated ahead: address ``(layer, index)``, size, hardening, the generator it came from."""

    layer: str
    index: int
    n: int
    draws: int
    rng: SecureGenerator
    epoch: int
    buf: Tensor
    future: Future[None] = field(default_factory=Future)


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
                raise ConfigError(f"clip: cannot parse quantile in {clip!r}; use 'auto' or 'auto:q'") from None
            if not (0.0 < q <= 1.0):
                raise ConfigError(f"clip: the quantile in {clip!r} must be in (0, 1]")
            return None, q
        raise ConfigError(f"clip must be a positive number, 'auto' or 'auto:q' (got {clip!r})")
    if not _is_real(clip) or not math.isfinite(float(clip)) or float(clip) <= 0:
        raise ConfigError(f"clip must be a finite number > 0, 'auto' or 'auto:q' (got {clip!r})")
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
            raise ConfigError(
                f"conflicting options: {' and '.join(given)} are all set; "
                "give only one of sigma, nsr, epsilon"
            )
        if not given:
            raise ConfigError("NoiseConfig needs one of sigma, nsr, epsilon (sigma=0 clips without noise)")
        for name in ("sigma", "nsr"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a finite number >= 0 (got {value!r})")
        if self.epsilon is not None and (
            not _is_real(self.epsilon) or math.isnan(self.epsilon) or self.epsilon <= 0
        ):
            raise ConfigError(f"epsilon must be > 0 (got {self.epsilon!r})")
        if not _is_real(self.delta) or not (0.0 < self.delta < 1.0):
            raise ConfigError(f"delta must be in (0, 1) (got {self.delta!r})")
        parse_clip(self.clip)
        s = self.insecure_seed
        if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s < 0):
            raise ConfigError(f"insecure_seed must be an integer >= 0 or None (got {s!r})")

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
        raise ConfigError("expected a tensor with a leading sample dimension, got a scalar")
    mem = _memory_order(r)  # the norm does not depend on the layout: no copy of a channels-last release
    flat = mem.view(r.shape[0], -1) if mem is not None else r.reshape(r.shape[0], -1)
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
        raise ConfigError(f"clip must be a finite number >= 0 (got {clip!r})")
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

    Noise off the critical path (``prefetch``, default on; ``ASYMML_NOISE_PREFETCH=0`` turns the default
    off): the mechanism learns which layer releases after which (and each layer's size) and, once a release
    is noised, generates the *next expected* draw -- same address ``(layer, release index)``, hence the very
    numbers an inline draw would give -- on a background thread into a reused float64 buffer, while the
    trusted side waits for the accelerator.  A prefetched draw is taken out of the pending table under a lock
    before use and its buffer is only refilled after the noise was added to the release (a new tensor, or
    ``r`` itself with ``inplace=True``; never a buffer), so no draw is ever handed out twice and no release
    aliases a buffer.  While the caller has not yet asked for a prefetched draw, the thread goes on with the
    releases predicted after it, up to ``prefetch_depth`` draws ahead.  Buffers stay within ``prefetch_bytes``
    (a prediction that does not fit is skipped).  ``threads``: threads that generate one inline draw (the
    caller plus ``threads - 1`` pool threads); adding noise to a release, on the trusted side's critical path,
    uses at least as many and up to torch's thread count.  ``draws``: Gaussians summed per element; None = 1
    for float32 / float16 / bfloat16 releases (float64 noise rounded once) and ``HARDENING_DRAWS`` for float64
    releases (see :mod:`asymml.privacy.secure_rng`).  :meth:`noise_stats` reports where the time went.
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
        prefetch: bool | None = None,
        threads: int | None = None,
        prefetch_bytes: int = DEFAULT_PREFETCH_BYTES,
        draws: int | None = None,
        prefetch_depth: int = 2,
    ) -> None:
        config.validate()
        if draws is not None and (not isinstance(draws, int) or isinstance(draws, bool) or draws < 1):
            raise ConfigError(f"draws must be an integer >= 1 or None (got {draws!r})")
        if threads is None:
            threads = int(os.environ.get("ASYMML_NOISE_THREADS", "1") or 1)
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ConfigError(f"threads must be an integer >= 1 (got {threads!r})")
        if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ConfigError(f"prefetch_depth must be an integer >= 1 (got {prefetch_depth!r})")
        if prefetch_bytes < 0:
            raise ConfigError(f"prefetch_bytes must be >= 0 (got {prefetch_bytes!r})")
        if sigma is not None and (not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0):
            raise ConfigError(f"sigma must be a finite number >= 0 (got {sigma!r})")
        if config.nsr is not None:
            if sigma is not None:
                raise ConfigError("conflicting options: nsr config with an explicit sigma")
        elif config.epsilon is not None:
            if sigma is None:
                raise ConfigError(
                    f"epsilon={config.epsilon} config needs the sigma solved for the planned run: "
                    "pass sigma=config.resolve_noise_multiplier(...) "
                    "(see asymml.privacy.accounting.solve_sigma)"
                )
        else:
            if sigma is not None and float(sigma) != float(config.sigma):  # type: ignore[arg-type]
                raise ConfigError(f"conflicting options: config sigma={config.sigma} but sigma={sigma} given")
            sigma = config.sigma
        if not (0.0 <= ema < 1.0):
            raise ConfigError(f"ema must be in [0, 1) (got {ema!r})")
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
        # noise generation and prefetch (never part of the state: the key and the noise stay in memory)
        self._draws = draws
        self._threads = threads
        self._pool_workers = 1
        self._prefetch = _env_flag("ASYMML_NOISE_PREFETCH", True) if prefetch is None else bool(prefetch)
        self._budget = int(prefetch_bytes)
        self._depth = prefetch_depth
        self._plock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._pending: dict[str, _Pending] = {}
        self._free: list[Tensor] = []
        self._held_bytes = 0  # bytes of every buffer the mechanism owns (free, pending and in use)
        self._next: dict[str, str] = {}  # learned successor of each releasing layer
        self._size: dict[str, tuple[int, int]] = {}  # layer -> (numel, draws) of its latest release
        self._last: str | None = None
        self._stats = _new_stats()
        # background draws run only while the trusted side is idle, once a runtime reports its waits (see
        # trusted_idle); before that (a caller that never does) they run freely
        self._idle = threading.Event()
        self._idle_depth = 0
        self._gated = False
        _GATES.add(self._idle)

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
                "hardening_draws": self._draws or HARDENING_DRAWS, "float32_draws": self._draws or 1,
                "noise_dtype": "float64", "prefetch": self._prefetch, "threads": self._threads}

    def set_insecure_seed(self, seed: int | None) -> None:
        """**INSECURE**: key the noise by ``seed`` (reproducible experiments only; warns).  ``None``: a fresh
        OS key.  Counters are kept, so a resumed run with the same seed replays the same noise."""
        self._drain()
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
        self._drain()  # draws prefetched at the old counters under the old key are dropped, never used
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
    def __call__(self, r: Tensor, *, layer: str, generator: SecureGenerator | torch.Generator | None = None,
                 inplace: bool = False) -> Tensor:
        """Clip and noise ``r`` (``(B, ...)``, dim 0 = sample) for release; returns a new tensor.

        Noise comes from the mechanism's own generator; ``generator`` overrides it for this call (a
        ``torch.Generator`` is insecure and warns).  ``inplace=True``: write the release over ``r`` and
        return ``r`` (no new full-size tensor; for a residual nobody reads afterwards, e.g. the runtime's own;
        only for a CPU ``r`` that is contiguous or channels-last and does not need autograd -- otherwise a new
        tensor is returned as usual: always use the return value)."""
        if not isinstance(r, Tensor) or r.dim() == 0:
            raise InputError("release must be a tensor with a leading sample dimension")
        if not r.is_floating_point():
            raise InputError(f"release must be floating point (got {r.dtype})")
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
        scale = _clip_scale(norms, clip)
        std = multiplier * clip
        inplace = inplace and not (r.requires_grad and torch.is_grad_enabled())
        if not (std > 0 and r.numel() > 0):
            scale_b = scale.to(r.dtype).reshape((-1,) + (1,) * (r.dim() - 1))
            return r.mul_(scale_b) if inplace else r * scale_b
        draws = self._draws or (1 if r.dtype in _SINGLE_DRAW_DTYPES else HARDENING_DRAWS)
        if generator is not None or self._torch_generator is not None:  # an explicit source: inline, no prefetch
            noise = self._noise(r, generator, layer, index, draws)
            return _add_noise(r, scale, std, noise.reshape(-1), inplace=inplace)
        n = r.numel()
        t0 = time.perf_counter()
        buf = self._take(layer, index, n, draws)
        t1 = time.perf_counter()
        try:
            # adding the noise is on the trusted side's critical path: it uses that side's own threads
            # (at least ``threads``), never more than the pool's helpers (one worker is the prefetcher's)
            parts = max(self._threads, torch.get_num_threads())
            pool = self._executor() if parts > 1 else None
            parts = min(parts, self._pool_workers - 1) if pool is not None else 1
            out = _add_noise(r, scale, std, buf[:n], executor=pool, parts=parts, inplace=inplace)
        finally:
            self._give_back(buf)
        t2 = time.perf_counter()
        with self._plock:
            st = self._stats
            st["critical_s"] += t1 - t0
            st["combine_s"] += t2 - t1
            st["releases"] += 1
            st["elements"] += n
            if self._last is not None:
                self._next[self._last] = layer
            self._last = layer
            self._size[layer] = (n, draws)
        if self._prefetch:
            self._schedule(self._next.get(layer))
        return out

    # ----------------------------------------------------------------- noise generation and prefetch
    def noise_stats(self) -> dict[str, Any]:
        """Where the noise time went, since construction or :meth:`reset_noise_stats` (a copy).

        ``critical_s``: seconds the caller spent obtaining noise (inline generation + waiting for a draw still
        in flight); ``wait_s``: the waiting part; ``combine_s``: adding noise to releases (always on the
        caller); ``background_s``: seconds the prefetch thread spent generating; ``paused_s``: seconds its draws
        waited for the trusted side to be idle (see :meth:`trusted_idle`); ``hits`` (ready when asked),
        ``late`` (prefetched, still in flight when asked: the caller waited), ``misses`` (generated inline),
        ``discarded`` (prefetched for a release that did not come), ``skipped`` (a prediction that did not fit
        ``prefetch_bytes``); ``samples``/``inline_samples``/``prefetched_samples``: Gaussian elements
        generated; ``buffer_bytes``/``peak_buffer_bytes``: float64 noise buffers held; ``releases``,
        ``elements``: noised releases and their elements."""
        with self._plock:
            st = dict(self._stats)
            st["buffer_bytes"] = self._held_bytes
            st["prefetch"] = self._prefetch
            st["threads"] = self._threads
        st["samples"] = st["inline_samples"] + st["prefetched_samples"]
        return st

    def reset_noise_stats(self) -> None:
        """Zero the counters of :meth:`noise_stats` (the buffers and the learned order are kept)."""
        with self._plock:
            self._stats = _new_stats()
            self._stats["peak_buffer_bytes"] = self._held_bytes

    @contextlib.contextmanager
    def trusted_idle(self) -> Iterator[None]:
        """The trusted side waits (for the accelerator) inside this block. Once a runtime has reported a
        wait, background draws run only inside such windows (and while the caller waits for a draw it
        needs): generating ahead then uses CPU time the trusted side is not using, instead of competing with
        its computation."""
        with self._gate_open(gated=True):
            yield

    @contextlib.contextmanager
    def _gate_open(self, gated: bool = False) -> Iterator[None]:
        """Background draws may run inside this block (nested blocks keep the gate open until the last one
        ends); ``gated``: the caller is a runtime reporting its waits, so draws are gated from now on."""
        with self._plock:
            self._gated = self._gated or gated
            self._idle_depth += 1
            self._idle.set()
        try:
            yield
        finally:
            with self._plock:
                self._idle_depth -= 1
                if self._idle_depth <= 0:
                    self._idle_depth = 0
                    self._idle.clear()

    def _gate(self) -> None:
        """Called by a background draw before each chunk: pause while the trusted side computes (the pause
        is not generation time: it is kept apart in the ``paused_s`` statistic)."""
        if self._gated and not self._idle.is_set():
            t0 = time.perf_counter()
            self._idle.wait()
            _PAUSED.s += time.perf_counter() - t0

    def set_prefetch(self, enabled: bool) -> None:
        """Turn prefetching on or off (off: draws still pending are dropped, their buffers kept for reuse)."""
        self._prefetch = bool(enabled)
        if not enabled:
            self._drain()

    def close(self) -> None:
        """Drop pending draws, free the buffers and stop the worker threads (the mechanism stays usable)."""
        self._drain()
        with self._plock:
            pool, self._pool = self._pool, None
            self._held_bytes -= sum(b.numel() * 8 for b in self._free)
            self._free.clear()
        if pool is not None:
            with self._gate_open():  # (nothing may stay paused at the gate)
                pool.shutdown(wait=True)

    def _executor(self) -> ThreadPoolExecutor:
        with self._plock:
            if self._pool is None or self._pool_pid != os.getpid():  # (a forked child has no threads)
                # one thread for prefetch + helpers of the caller: threads - 1 for inline draws, one per
                # torch thread for adding noise (see __call__)
                self._pool_workers = max(self._threads, torch.get_num_threads()) + 1
                self._pool = ThreadPoolExecutor(max_workers=self._pool_workers, thread_name_prefix="asymml-noise")
                self._pool_pid = os.getpid()
                self._held_bytes -= sum(8 * p.buf.numel() for p in self._pending.values())
                self._pending.clear()
            return self._pool

    def _acquire(self, n: int, *, force: bool) -> Tensor | None:
        """A free float64 buffer of >= n elements (best fit), else a new one if the budget allows (always when
        ``force``: an inline draw must happen).  Caller holds ``_plock``."""
        fits = [i for i, b in enumerate(self._free) if b.numel() >= n]
        if fits:  # (by position: list.remove would compare tensors element-wise)
            return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        while self._free and self._held_bytes + 8 * n > self._budget:  # make room: drop unsuitable buffers
            self._held_bytes -= 8 * self._free.pop(0).numel()
        if not force and self._held_bytes + 8 * n > self._budget:
            return None
        self._held_bytes += 8 * n
        self._stats["peak_buffer_bytes"] = max(self._stats["peak_buffer_bytes"], self._held_bytes)
        return torch.empty(n, dtype=torch.float64)

    def _give_back(self, buf: Tensor) -> None:
        with self._plock:
            if self._held_bytes > self._budget:  # over budget after a forced inline draw: free it
                self._held_bytes -= 8 * buf.numel()
            else:
                self._free.append(buf)

    def _take(self, layer: str, index: int, n: int, draws: int) -> Tensor:
        """The noise of release ``(layer, index)``: the prefetched draw if it matches, else generated here."""
        rng = self._rng
        with self._plock:
            p = self._pending.pop(layer, None)
        if p is not None:
            ready = p.future.done()
            t0 = time.perf_counter()
            with self._gate_open():  # the caller waits for this draw: a paused background draw may go on
                p.future.result()  # (re-raises a failure of the worker)
            waited = time.perf_counter() - t0
            if p.index == index and p.n == n and p.draws == draws and p.rng is rng and p.epoch == rng.key_epoch:
                with self._plock:
                    self._stats["hits" if ready else "late"] += 1
                    self._stats["wait_s"] += waited
                return p.buf
            with self._plock:
                self._stats["discarded"] += 1
            self._give_back(p.buf)
        with self._plock:
            buf = self._acquire(n, force=True)
            self._stats["misses"] += 1
            self._stats["inline_samples"] += n
        assert buf is not None
        pool = self._executor() if self._threads > 1 else None
        rng.standard_normal((n,), label=layer, index=index, draws=draws, out=buf[:n], threads=self._threads,
                            executor=pool)
        return buf

    def _schedule(self, layer: str | None) -> None:
        """Start generating ``layer``'s next release in the background (if predicted, not pending, fits)."""
        if layer is None or self._torch_generator is not None:
            return
        size = self._size.get(layer)
        if size is None:
            return
        n, draws = size
        rng = self._rng
        with self._lock:
            index = self._counts.get(layer, 0)
        pool = self._executor()
        with self._plock:
            if layer in self._pending or not self._prefetch:
                return
            buf = self._acquire(n, force=False)
            if buf is None and self._evict_stale(keep=layer):
                buf = self._acquire(n, force=False)
            if buf is None:
                self._stats["skipped"] += 1
                return
            p = _Pending(layer, index, n, draws, rng, rng.key_epoch, buf)
            self._pending[layer] = p
            p.future = pool.submit(self._generate_ahead, p)

    def _evict_stale(self, keep: str) -> bool:
        """Drop finished draws waiting for a release other than ``keep``'s (e.g. for a layer that stopped
        releasing when the planner kept it trusted): their buffers would otherwise hold the prefetch budget
        forever. Caller holds ``_plock``; returns whether anything was dropped."""
        stale = [k for k, p in self._pending.items() if k != keep and p.future is not None and p.future.done()]
        for k in stale:
            p = self._pending.pop(k)
            self._stats["discarded"] += 1
            self._free.append(p.buf)
        return bool(stale)

    def _generate_ahead(self, p: _Pending) -> None:
        t0 = time.perf_counter()
        _PAUSED.s = 0.0
        p.rng.standard_normal((p.n,), label=p.layer, index=p.index, draws=p.draws, out=p.buf[: p.n],
                              gate=self._gate)
        paused = _PAUSED.s
        dt = time.perf_counter() - t0 - paused
        with self._plock:
            self._stats["background_s"] += dt
            self._stats["paused_s"] += paused
            self._stats["prefetched_samples"] += p.n
            chain = self._prefetch and len(self._pending) < self._depth and self._pending.get(p.layer) is p
        if chain:  # still ahead of the caller: go on with the release after this one
            self._schedule(self._next.get(p.layer))

    def _drain(self) -> None:
        """Drop every pending draw (waiting for those in flight) and keep their buffers for reuse."""
        with self._plock:
            pending, self._pending = list(self._pending.values()), {}
        for p in pending:
            with self._gate_open():  # a draw paused at the gate must finish before its buffer is reused
                try:
                    p.future.result()
                except Exception:  # noqa: BLE001 -- a dropped draw's failure does not matter
                    pass
            with self._plock:
                self._stats["discarded"] += 1
            self._give_back(p.buf)

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

    def _noise(self, out: Tensor, generator: Any, layer: str, index: int, draws: int) -> Tensor:
        """Standard normal noise shaped like ``out``, float64, on the CPU (trusted), from an explicit source."""
        if generator is None:
            generator = self._torch_generator
        if isinstance(generator, torch.Generator):  # legacy, insecure
            if generator is not self._torch_generator:
                _warn_torch_generator()
            return torch.randn(out.shape, generator=generator, device=generator.device, dtype=torch.float64)
        if not isinstance(generator, SecureGenerator):
            raise TypeError(f"generator must be a SecureGenerator (got {type(generator).__name__})")
        return generator.standard_normal(tuple(out.shape), label=layer, index=index, draws=draws)

    def __repr__(self) -> str:
        c = self.config
        noise = f"sigma={self._sigma}" if self._sigma is not None else f"nsr={c.nsr}"
        insecure = "" if self.secure else ", INSECURE noise"
        return f"ReleaseMechanism({noise}, clip={c.clip!r}{insecure})"


_GATES: weakref.WeakSet[threading.Event] = weakref.WeakSet()  # every mechanism's idle gate
_PAUSED = threading.local()  # seconds the current background draw waited at the gate


def _open_all_gates() -> None:
    """At interpreter exit: let paused background draws finish, so that the pool threads can be joined."""
    for gate in list(_GATES):
        gate.set()


# (threading's exit hooks run in reverse order of registration: this one before the pools join their threads)
threading._register_atexit(_open_all_gates)  # type: ignore[attr-defined]


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


def _new_stats() -> dict[str, Any]:
    return {"critical_s": 0.0, "wait_s": 0.0, "combine_s": 0.0, "background_s": 0.0, "paused_s": 0.0, "hits": 0,
            "late": 0, "misses": 0, "discarded": 0, "skipped": 0, "inline_samples": 0, "prefetched_samples": 0,
            "peak_buffer_bytes": 0, "releases": 0, "elements": 0}


def _memory_order(t: Tensor) -> Tensor | None:
    """A 1-D view of ``t``'s elements in memory order (contiguous or channels-last), or None."""
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(-1)
    return None


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.tmp = torch.empty(_COMBINE_ELEMS, dtype=torch.float64)


_SCRATCH = _Scratch()


def _add_noise(r: Tensor, scale: Tensor, std: float, noise: Tensor, *, executor: ThreadPoolExecutor | None = None,
               parts: int = 1, inplace: bool = False) -> Tensor:
    """``r_b * scale_b + std * noise`` per sample ``b``, computed in float64 and rounded once to ``r.dtype``,
    as a new tensor in ``r``'s memory format (``inplace``: over ``r``, CPU only).  ``noise``: float64,
    ``r.numel()`` elements, applied in memory order (the elements are i.i.d., so the layout does not matter).
    Cache-sized chunks on the CPU, shared out between the caller and ``parts - 1`` tasks on ``executor``."""
    shape_b = (-1,) + (1,) * (r.dim() - 1)
    if r.requires_grad and torch.is_grad_enabled() or r.device.type != "cpu" or not r.is_floating_point():
        # differentiable / other devices: whole-tensor ops (noise added in float64, rounded once)
        noise = noise.view(r.shape)
        return (r.to(torch.float64) * scale.to(device=r.device, dtype=torch.float64).reshape(shape_b)
                + std * noise.to(r.device)).to(r.dtype)
    src = _memory_order(r)
    if src is None:  # neither contiguous nor channels-last: work on a dense copy, which is ours to overwrite
        r = r.contiguous()
        src = r.view(-1)
        inplace = True
    if inplace:
        out, dst = r, src
    else:
        out = torch.empty_like(r)
        dst = _memory_order(out)
        assert dst is not None
    b_count = r.shape[0]
    d = r.numel() // max(b_count, 1)
    if d < 4096:  # small samples: a few whole-tensor float64 ops beat a loop over samples
        scale64 = scale.detach().to(torch.float64).cpu().reshape(-1, 1)
        t64 = src.view(b_count, d).to(torch.float64).mul_(scale64).add_(noise.view(b_count, d), alpha=std)
        dst.view(b_count, d).copy_(t64)
        return out
    sc = scale.detach().to(torch.float64).cpu().tolist()
    if r.dtype == torch.float64:  # one rounding already: whole-sample float64 ops
        for b in range(b_count):
            lo, hi = b * d, (b + 1) * d
            torch.mul(src[lo:hi], sc[b], out=dst[lo:hi])
            dst[lo:hi].add_(noise[lo:hi], alpha=std)
        return out
    chunks = [(lo, min(lo + _COMBINE_ELEMS, (b + 1) * d), sc[b])
              for b in range(b_count) for lo in range(b * d, (b + 1) * d, _COMBINE_ELEMS)]

    def run(part: list[tuple[int, int, float]]) -> None:
        tmp = _SCRATCH.tmp
        with single_threaded():  # chunks are sized for one thread (see secure_rng.single_threaded)
            for lo, hi, sb in part:
                t = tmp[: hi - lo]
                t.copy_(src[lo:hi])
                if sb != 1.0:
                    t.mul_(sb)
                t.add_(noise[lo:hi], alpha=std)
                dst[lo:hi].copy_(t)

    k = max(1, min(parts, len(chunks))) if executor is not None else 1
    cut = [len(chunks) * i // k for i in range(k + 1)]
    futures = [executor.submit(run, chunks[cut[i] : cut[i + 1]]) for i in range(1, k)] if executor is not None else []
    run(chunks[cut[0] : cut[1]])
    for f in futures:
        f.result()
    return out

