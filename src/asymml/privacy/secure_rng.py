"""Cryptographically secure randomness for DP noise and Poisson sampling (issue 9, item 1 and 4).

Why not ``torch.Generator``: its Mersenne Twister keeps only the low 32 bits of a seed (``s`` and
``s + 2**32`` give the same stream) and its outputs are predictable from a few hundred observed values;
an accelerator that tries all 2^32 seeds finds the one under which every released residual falls back
inside the clip bound and subtracts the noise exactly.

:class:`SecureGenerator`
    A ChaCha20 keystream (``cryptography``, i.e. OpenSSL) under a 256-bit key read from the OS
    (:func:`secrets.token_bytes`).  The key lives only in this object: it has no ``get_state``, is never
    part of a ``state_dict`` or checkpoint, and a copy or an unpickled generator gets a *new* OS key, so a
    resumed run draws fresh noise.  Draws are *addressed*: ``(label, index)`` select a 96-bit ChaCha20 nonce
    (``label`` is e.g. the released layer, ``index`` its release counter), so the same address under the
    same key gives the same numbers, and different addresses are independent.  Within one key an address
    must not be reused for different data; :class:`~asymml.privacy.noise.ReleaseMechanism` counts releases
    per layer and re-keys whenever its counters are restored.  Sequential draws (Poisson masks) use a
    separate nonce domain with a private counter.

``insecure_seed``
    For reproducible *experiments only*: the key is ``SHA-256(seed)`` of the whole integer (no 32-bit
    aliasing), so anyone who knows the seed can regenerate and subtract the noise.  Emits
    :class:`InsecureNoiseWarning`; :attr:`SecureGenerator.secure` is False, and callers must not claim
    sampling amplification or a DP guarantee against a party that may know the seed.

Gaussians (:meth:`SecureGenerator.standard_normal`)
    52-bit uniforms ``u = (k + 0.5) / 2^52`` in the open interval (0, 1) from 64-bit keystream words, then
    Box–Muller in float64 (both outputs used).  **Floating-point hardening** as Opacus' ``secure_mode``
    (``opacus.optimizers.optimizer._generate_noise``; Holohan et al., arXiv:2107.10138 §5.1): each output
    is the sum of ``2n = 4`` independent Gaussians divided by 2 (still exactly N(0, 1)).  A single
    floating-point Gaussian sample only takes values from a sparse, input-dependent set of doubles, which
    lets an observer of ``x + noise`` test candidate ``x`` (Mironov-style attacks on the low bits); summing
    four draws makes that search cost ~2^159 instead of 2^53.  Everything is computed in float64 and cast
    once, after the noise is added to the release (see the mechanism).  Box–Muller rather than torch's
    ``normal_`` because torch's sampler cannot take an external uniform source; it is exact up to
    float64 rounding of ``log``/``cos``/``sin``, with no rejection step whose timing could leak.

Throughput (one thread, float32 output, 4 draws per element): see :func:`benchmark` and the report.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from torch import Tensor

__all__ = [
    "SecureGenerator",
    "InsecureNoiseWarning",
    "KEY_BITS",
    "HARDENING_DRAWS",
    "poisson_mask",
    "poisson_batches",
    "PoissonSampler",
    "benchmark",
]

KEY_BITS = 256
"""Size of the ChaCha20 key drawn from the OS."""

HARDENING_DRAWS = 4
"""Gaussian draws summed per output element (Opacus' secure_mode: 2n with n = 2), divided by sqrt(4) = 2."""

_TWO_PI = 2.0 * math.pi
_MANTISSA = (1 << 52) - 1
_ONE_BITS = 0x3FF0000000000000  # IEEE-754 bits of 1.0
_CHUNK = 1 << 21  # Box–Muller pairs per chunk


class InsecureNoiseWarning(UserWarning):
    """DP noise or sampling from a reproducible (public) seed: fine for experiments, no privacy guarantee."""


def _seed_key(seed: int) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"insecure_seed must be an integer >= 0 (got {seed!r})")
    raw = seed.to_bytes(max(1, (seed.bit_length() + 7) // 8), "little")
    return hashlib.sha256(b"asymml insecure noise seed\x00" + raw).digest()


class SecureGenerator:
    """ChaCha20-keyed random numbers for the trusted context (see the module docstring).

    ``SecureGenerator()`` draws a fresh 256-bit key from the OS.  ``SecureGenerator(insecure_seed=s)`` is
    reproducible and **insecure** (warns).  Thread-safe.  The key is never exposed, serialised or copied.
    """

    def __init__(self, *, insecure_seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._sequence = 0
        self._insecure_seed: int | None = None
        if insecure_seed is None:
            self._key = secrets.token_bytes(KEY_BITS // 8)
        else:
            self._key = _seed_key(insecure_seed)
            self._insecure_seed = int(insecure_seed)
            warnings.warn(
                f"DP noise/sampling seeded with insecure_seed={insecure_seed}: reproducible for experiments, "
                "but anyone who knows the seed can regenerate and subtract the noise (no privacy guarantee)",
                InsecureNoiseWarning,
                stacklevel=2,
            )

    # ----------------------------------------------------------------- identity / hygiene
    @property
    def secure(self) -> bool:
        """True when the key came from the OS (not from an ``insecure_seed``)."""
        return self._insecure_seed is None

    @property
    def key_bits(self) -> int:
        """Size of the key in bits (256)."""
        return len(self._key) * 8

    def rekey(self) -> None:
        """Draw a new OS key (secure generators only; an insecure one keeps its seed's key)."""
        if self.secure:
            with self._lock:
                self._key = secrets.token_bytes(KEY_BITS // 8)
                self._sequence = 0

    def __repr__(self) -> str:
        kind = "OS key" if self.secure else f"INSECURE seed={self._insecure_seed}"
        return f"SecureGenerator(chacha20, {kind})"

    def __deepcopy__(self, memo: dict[int, Any]) -> SecureGenerator:
        # a copy must never replay the original's noise on other data: it gets a fresh OS key
        return _fresh(self._insecure_seed)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # pickling (torch.save, multiprocessing) never writes the key; an insecure generator keeps its seed
        return _fresh, (self._insecure_seed,)

    # ----------------------------------------------------------------- keystream
    def _nonce(self, label: str | None, index: int | None) -> bytes:
        if label is None:
            with self._lock:
                seq = self._sequence
                self._sequence += 1
            return b"\x00" + seq.to_bytes(8, "little") + b"\x00" * 3
        h = hashlib.sha256(label.encode("utf-8") + b"\x00" + int(index or 0).to_bytes(16, "little", signed=True))
        return b"\x01" + h.digest()[:11]

    def random_words(self, n: int, *, label: str | None = None, index: int | None = None) -> Tensor:
        """``n`` uniformly random 64-bit words as an int64 tensor (``label``/``index``: addressed draw)."""
        if n < 0:
            raise ValueError(f"n must be >= 0 (got {n})")
        nonce = self._nonce(label, index)
        out = torch.empty(n, dtype=torch.int64)
        if n:
            with self._lock:
                key = self._key
            enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 4 + nonce), mode=None).encryptor()
            enc.update_into(bytes(8 * n), out.numpy().view("uint8"))  # keystream = ChaCha20(zeros)
        return out

    def uniform(self, n: int, *, label: str | None = None, index: int | None = None) -> Tensor:
        """``n`` float64 uniforms in the open interval (0, 1): ``(k + 1/2) / 2^52`` for a uniform 52-bit ``k``."""
        w = self.random_words(n, label=label, index=index)
        # 52 random mantissa bits under the exponent of 1.0: a double uniform on [1, 2) (no rounding), then
        # shifted by 1 - 2^-53 so that neither 0 nor 1 can occur (Box–Muller takes log(u))
        return w.bitwise_and_(_MANTISSA).bitwise_or_(_ONE_BITS).view(torch.float64).sub_(1.0 - 2.0**-53)

    def standard_normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        label: str | None = None,
        index: int | None = None,
        draws: int = HARDENING_DRAWS,
    ) -> Tensor:
        """Hardened N(0, 1) samples of ``shape`` in float64: the mean of ``draws`` Box–Muller Gaussians
        times ``sqrt(draws)`` (``draws=4``: Opacus' secure_mode).  ``label``/``index`` address the draw."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1 (got {draws})")
        n = math.prod(shape)
        out = torch.zeros(n, dtype=torch.float64)
        pairs = (n + 1) // 2
        for s in range(0, pairs, _CHUNK):  # chunks bound the float64 temporaries (~draws * 64 MiB)
            k = min(pairs, s + _CHUNK) - s
            u = self.uniform(2 * k * draws, label=label, index=None if label is None else (index or 0) * 2**32 + s)
            u = u.view(draws, 2, k)
            rad = u[:, 0].log().mul_(-2.0).sqrt_()  # Box–Muller: pairs (rad cos, rad sin) of angle 2 pi u2
            ang = u[:, 1].mul_(_TWO_PI)
            z = torch.cat([ang.cos().mul_(rad).sum(0), ang.sin_().mul_(rad).sum(0)])
            lo = 2 * s
            hi = min(n, lo + 2 * k)
            out[lo:hi] = z[: hi - lo]
        if draws > 1:
            out.div_(math.sqrt(draws))
        return out.reshape(shape)


def _fresh(insecure_seed: int | None) -> SecureGenerator:
    if insecure_seed is None:
        return SecureGenerator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureNoiseWarning)  # already warned when the original was made
        return SecureGenerator(insecure_seed=insecure_seed)


# --------------------------------------------------------------------------- Poisson sampling


def poisson_mask(n: int, sample_rate: float, *, generator: SecureGenerator) -> Tensor:
    """Boolean mask of ``n`` samples, each ``True`` independently with probability ``sample_rate``.

    Drawn from ``generator`` (52-bit uniforms) so that batch membership is unpredictable to the
    accelerator -- the precondition of the accountant's subsampling amplification.
    """
    if not isinstance(generator, SecureGenerator):
        raise TypeError("poisson_mask needs an asymml.privacy.secure_rng.SecureGenerator "
                        "(a torch.Generator's batches are predictable)")
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate!r})")
    return generator.uniform(int(n)) < sample_rate


def poisson_batches(n: int, sample_rate: float, *, generator: SecureGenerator, steps: int | None = None
                    ) -> Iterator[Tensor]:
    """Yield the sample indices (int64, sorted) of Poisson-sampled batches of a dataset of ``n`` samples.

    Each sample is in each batch independently with probability ``sample_rate``; a batch may be empty
    (the step must still be accounted: skipping empty batches changes the mechanism).  ``steps`` batches,
    or forever when None.  Use with ``generator=SecureGenerator()``; only then may the accountant apply
    subsampling amplification (see :class:`PoissonSampler` and :class:`~asymml.privacy.accounting.PrivacyLedger`).
    """
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 (got {steps})")
    s = 0
    while steps is None or s < steps:
        yield poisson_mask(n, sample_rate, generator=generator).nonzero().flatten()
        s += 1


class PoissonSampler:
    """Iterable of Poisson-sampled index batches (one epoch = ``round(1 / sample_rate)`` steps by default).

    ``secure`` is True only when the generator has an OS key: the accountant amplifies by
    ``sample_rate`` only then.  Works as a ``torch.utils.data.DataLoader(batch_sampler=...)``.
    """

    def __init__(self, n: int, sample_rate: float, *, generator: SecureGenerator | None = None,
                 steps_per_epoch: int | None = None) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] (got {sample_rate!r})")
        if n < 1:
            raise ValueError(f"n must be >= 1 (got {n})")
        self.n = int(n)
        self.sample_rate = float(sample_rate)
        self.generator = generator if generator is not None else SecureGenerator()
        self.steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else max(1, round(1.0 / sample_rate))

    @property
    def secure(self) -> bool:
        """Whether batch membership is unpredictable to the accelerator (OS-keyed generator)."""
        return self.generator.secure

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        for idx in poisson_batches(self.n, self.sample_rate, generator=self.generator, steps=self.steps_per_epoch):
            yield idx.tolist()


def benchmark(n: int = 1 << 22, repeats: int = 3) -> dict[str, float]:
    """Million samples per second (current torch thread count) of hardened secure Gaussians vs ``torch.randn``."""
    import time

    gen = SecureGenerator()
    tg = torch.Generator().manual_seed(0)

    def best(f: Any) -> float:
        t = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            t = min(t, time.perf_counter() - t0)
        return n / t / 1e6

    return {
        "secure_hardened_msps": best(lambda: gen.standard_normal((n,), label="bench", index=0).float()),
        "secure_single_draw_msps": best(lambda: gen.standard_normal((n,), label="bench", index=1, draws=1).float()),
        "torch_randn_msps": best(lambda: torch.randn(n, generator=tg)),
        "n": float(n),
    }
