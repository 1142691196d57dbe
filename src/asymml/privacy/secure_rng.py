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
    Box–Muller in float64 on the keystream, both outputs of each pair used: radius ``sqrt(-2 ln u1)`` with
    ``u1 = (j + 1/2) 2^-62`` from 62 random bits (largest radius ``sqrt(126 ln 2) = 9.35``), angle ``2 pi v``
    with ``v`` on the 2^52-point grid of [1, 2).  No rejection step (no timing that depends on the numbers); Box–Muller
    rather than torch's ``normal_`` because torch's sampler cannot take an external uniform source.
    Each output is the sum of ``draws`` such Gaussians divided by ``sqrt(draws)`` (still exactly N(0, 1)).

    *Speed* (issue 11 item 5).  The work is cut into chunks of at most 32 760 elements that stay in cache and
    run on one thread each (below torch's parallel grain), with per-thread scratch buffers reused from chunk
    to chunk and the result written into a caller's reused buffer (``out=``).  Chunk ``c`` reads the keystream
    at a fixed offset (ChaCha20's block counter), so a draw can be shared out between threads (``threads``,
    ``executor``) and still give the same numbers.  Measured on this project's 2-core Xeon (AVX-512; one
    thread, ``python scripts/bench_noise.py``; the box is shared, figures from its quieter moments): keystream
    ~1 ns per normal (ChaCha20 3.4 GB/s; AES-128-CTR with AES-NI measured 3.5 GB/s here, no gain, so ChaCha20
    stays: constant-time without AES-NI, 256-bit key); 1 draw 125-150 M normals/s, 4 draws 25-31 M/s, against
    8-11 M/s for the previous whole-tensor float64 code and 75-210 M/s for ``torch.randn`` on one thread.
    :class:`~asymml.privacy.noise.ReleaseMechanism` also generates the next expected draws in the background
    (prefetch), off the trusted side's critical path.

    *Floating-point hardening: what it defends against.*  A floating-point noise sample takes values in a
    known, sparse set; an observer of ``fl(x + noise)`` can test a candidate ``x`` by asking whether
    ``y - x`` is a reachable noise value (Mironov, CCS 2012; Holohan & Braghin, arXiv:2107.10138).  Noise
    drawn and added in float32 is exposed: where ``y`` and ``x`` are close (Sterbenz: ``y - x`` is exact) and
    where scaling by ``sigma * c`` leaves gaps in the float32 grid, a wrong candidate is rejected with
    constant probability per element, and a release has millions of elements.  Two defences are used:

    * float32 / float16 / bfloat16 releases (everything the split releases): the noise is float64 from 52-
      and 62-bit inputs, added to the float64 value of the clipped release and rounded **once** to the
      release dtype (``draws=1``).  The reachable set of ``x + noise`` is then at least 2^29 times denser than
      the float32 grid, except for outputs within ~2^-29 noise standard deviations of zero (probability
      ~1e-9 per element), so every candidate ``x`` stays consistent with the output and each float32 value's
      probability is the Gaussian mass of its rounding cell to a relative 2^-29.
    * float64 releases, and :meth:`SecureGenerator.standard_normal`'s default (DP-SGD update noise):
      ``draws = HARDENING_DRAWS = 4``, Opacus' ``secure_mode`` (``opacus.optimizers.optimizer._generate_noise``):
      there the output grid is as fine as the noise's own, and summing four draws makes the reachable-set
      search cost ~2^159 instead of 2^53.

    What the single draw gives up against four: that margin for float64 outputs (hence four draws there), and
    tail reach.  One draw is truncated at 9.35 standard deviations (four: 17): a neighbour that differs by the
    whole clip ``c`` in one element makes outputs that one of the two inputs cannot produce, with probability
    ``P(Z > 9.35 - 1/sigma)`` per release -- 4e-17 at ``sigma = 1``, 1e-13 at 0.5, 9e-10 at 0.3 -- a term to
    add to ``delta`` per release at small ``sigma``.  Neither variant defends against timing side channels of
    the floating-point units (as before).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import secrets
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
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
_LOW63 = (1 << 63) - 1
_RAD_OFFSET = 126.0 * math.log(2.0)  # -2 ln(k 2^-63) = -2 ln k + 126 ln 2
_CHUNK_ELEMS = 32760  # elements per op of the kernel: below torch's 32768 grain, so one thread per chunk
_MAX_STREAM_BYTES = 64 << 32  # ChaCha20's 32-bit block counter


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
        self._epoch = 0
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
                self._epoch += 1

    @property
    def key_epoch(self) -> int:
        """How many times :meth:`rekey` replaced the key (lets a holder of draws made ahead drop stale ones)."""
        return self._epoch

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
        out: Tensor | None = None,
        threads: int = 1,
        executor: Executor | None = None,
        gate: Callable[[], Any] | None = None,
    ) -> Tensor:
        """N(0, 1) samples of ``shape`` in float64: ``sum of draws Box–Muller Gaussians / sqrt(draws)``.

        ``draws=4`` is Opacus' secure_mode hardening (float64 outputs); ``draws=1`` suffices when the result is
        rounded once into a float32 release (see the module docstring).  ``label``/``index`` address the draw
        (same address, same key, same numbers -- whatever ``threads`` is).  ``out``: a contiguous float64
        tensor with ``prod(shape)`` elements to fill (a reused buffer: no allocation).  ``threads > 1`` with an
        ``executor``: the draw is cut in ``threads`` contiguous ranges, one computed here, the others on the
        executor's threads (the cipher and torch's kernels release the GIL).  ``gate``: called before each
        cache-sized chunk of a single-threaded draw (it may block: a background draw pauses there while the
        trusted side computes; the numbers do not depend on it)."""
        if draws < 1:
            raise ValueError(f"draws must be >= 1 (got {draws})")
        n = math.prod(shape)
        if out is None:
            out = torch.empty(n, dtype=torch.float64)
        elif out.dtype != torch.float64 or out.numel() != n or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU float64 tensor of {n} elements "
                             f"(got {out.dtype}, {out.numel()} elements)")
        flat = out.view(-1)
        if n:
            pairs = _chunk_pairs(draws)
            chunks = -(-((n + 1) // 2) // pairs)
            if 16 * draws * pairs * chunks > _MAX_STREAM_BYTES:
                raise ValueError(f"a single draw of {n} normals exceeds one ChaCha20 stream (2^32 blocks)")
            nonce = self._nonce(label, index)
            with self._lock:
                key = self._key
            parts = max(1, min(int(threads), chunks)) if executor is not None else 1
            bounds = [chunks * i // parts for i in range(parts + 1)]
            futures = [executor.submit(_fill_chunks, flat, key, nonce, draws, bounds[i], bounds[i + 1])
                       for i in range(1, parts)] if executor is not None else []
            _fill_chunks(flat, key, nonce, draws, bounds[0], bounds[1], gate if parts == 1 else None)
            for f in futures:
                f.result()
        return out.view(tuple(shape))


# --------------------------------------------------------------------------- the Gaussian kernel


def _find_omp_set_num_threads() -> Any:
    try:
        return ctypes.CDLL(None).omp_set_num_threads  # torch's OpenMP runtime is loaded with RTLD_GLOBAL
    except (OSError, AttributeError):
        return None


_OMP_SET_NUM_THREADS = _find_omp_set_num_threads()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU kernels on the calling thread only, for the duration (this thread's OpenMP setting;
    every other thread and torch's global setting are untouched).

    Why: torch's float64 ``log``/``sqrt``/``cos``/``sin`` go parallel on far smaller sizes than the kernel's
    chunks, so each chunk would wake the OpenMP workers several times; on the busy 2-core box such calls took
    ~10 ms instead of ~40 us, and a 2-thread process drew 2-30 M normals/s instead of 55-130.  The kernel's
    chunks are sized for one thread; parallelism comes from running chunks on several threads (``threads``)."""
    global _OMP_SET_NUM_THREADS
    n = torch.get_num_threads()  # this thread's OpenMP setting (and torch's lazy per-thread initialisation)
    if _OMP_SET_NUM_THREADS is None or n == 1:
        yield
        return
    _OMP_SET_NUM_THREADS(1)
    if torch.get_num_threads() != 1:  # not torch's OpenMP runtime after all: leave it alone from now on
        _OMP_SET_NUM_THREADS(n)
        _OMP_SET_NUM_THREADS = None
        yield
        return
    try:
        yield
    finally:
        _OMP_SET_NUM_THREADS(n)


class _Workspace(threading.local):
    """Per-thread scratch buffers of the kernel (reused: no allocation, no page faults per chunk)."""

    def __init__(self) -> None:
        self.zeros = memoryview(bytes(16 * _CHUNK_ELEMS))
        self.words = torch.empty(2 * _CHUNK_ELEMS, dtype=torch.int64)
        self.words_u8 = self.words.numpy().view("uint8")
        self.rad = torch.empty(_CHUNK_ELEMS, dtype=torch.float64)
        self.trig = torch.empty(2 * _CHUNK_ELEMS, dtype=torch.float64)
        self.total = torch.empty(2 * _CHUNK_ELEMS, dtype=torch.float64)


_WS = _Workspace()


def _chunk_pairs(draws: int) -> int:
    """Box–Muller pairs per chunk: every element-wise op of a chunk stays below torch's parallel grain (one
    thread per chunk, whichever thread runs it) and each chunk starts on a 64-byte ChaCha20 block."""
    return max(4, (_CHUNK_ELEMS // draws) // 4 * 4)


def _fill_chunks(flat: Tensor, key: bytes, nonce: bytes, draws: int, c0: int, c1: int,
                 gate: Callable[[], Any] | None = None) -> None:
    """Fill chunks ``[c0, c1)`` of the addressed draw ``(key, nonce)`` into ``flat`` (float64, 1-D).

    Chunk ``c`` covers output elements ``[2 c P, 2 c P + 2 P)`` (``P = _chunk_pairs(draws)``) and reads the
    keystream at byte ``16 * draws * P * c``: the result does not depend on how chunks are shared out."""
    if c0 >= c1:
        return
    with single_threaded():
        _fill(flat, key, nonce, draws, c0, c1, gate)


def _fill(flat: Tensor, key: bytes, nonce: bytes, draws: int, c0: int, c1: int,
          gate: Callable[[], Any] | None = None) -> None:
    ws = _WS
    n = flat.numel()
    pairs = _chunk_pairs(draws)
    counter = (16 * draws * pairs * c0) // 64
    enc = Cipher(algorithms.ChaCha20(key, counter.to_bytes(4, "little") + nonce), mode=None).encryptor()
    inv = 1.0 / math.sqrt(draws)
    for c in range(c0, c1):
        if gate is not None:
            gate()
        lo = 2 * pairs * c
        m = min(n, lo + 2 * pairs) - lo
        pc = (m + 1) // 2
        k = draws * pc
        nbytes = 16 * k
        enc.update_into(ws.zeros[:nbytes], ws.words_u8[:nbytes])
        words = ws.words[: 2 * k]
        # radius sqrt(-2 ln u1), u1 = (j + 1/2) 2^-62 from 62 random bits (odd 63-bit integers): the largest
        # radius is sqrt(2 * 62.7 ln 2) = 9.3, the Gaussian tail beyond it is ~1e-20
        w0 = words[:k].bitwise_and_(_LOW63).bitwise_or_(1)
        rad = ws.rad[:k]
        rad.copy_(w0)  # int64 -> float64 (rounded to 53 bits: the relative precision of a double)
        rad.log_().mul_(-2.0).add_(_RAD_OFFSET).sqrt_()
        # angle 2 pi v, v uniform on the 2^52-point grid of [1, 2) (cos and sin have period 2 pi)
        theta = words[k:].bitwise_and_(_MANTISSA).bitwise_or_(_ONE_BITS).view(torch.float64).mul_(_TWO_PI)
        dst = flat[lo : lo + m]
        if draws == 1 and m == 2 * pc:
            z = dst.view(2, pc)
            torch.cos(theta, out=z[0]).mul_(rad)  # (two row products: a broadcast one measured 5x slower)
            torch.sin(theta, out=z[1]).mul_(rad)
            continue
        z = ws.trig[: 2 * k].view(2, draws, pc)
        torch.cos(theta.view(draws, pc), out=z[0]).mul_(rad.view(draws, pc))
        torch.sin(theta.view(draws, pc), out=z[1]).mul_(rad.view(draws, pc))
        if draws == 1:
            dst.copy_(z.reshape(-1)[:m])
            continue
        total = ws.total[: 2 * pc].view(2, pc)
        torch.add(z[:, 0], z[:, 1], out=total)
        for d in range(2, draws):
            total.add_(z[:, d])
        dst.copy_(total.view(-1)[:m]).mul_(inv)


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
