"""DP-SGD on the trusted share of every update (issue 9, item 3).

What leaves the trusted context in a training step of ``asym``/``noise-only`` mode: the released
residuals (clipped per sample to ``clip`` and noised by the release mechanism), the gradient residuals
(likewise, ``protected`` backward), and -- through the next step's weights -- the update.  The update of a
split layer's weight is ``∇W = L⋆δ + R̃⋆δ_L`` (trusted share) ``+ R̃⋆δ_R`` (accelerator share).  The
accelerator share is computed from released tensors only, so it is post-processing of already-accounted
releases; the runtime hands it to :meth:`UpdatePrivatizer.public_sink` (``SplitModule.public_grad_sink``)
instead of adding it to ``param.grad``.  Everything else -- the trusted share of split weights, biases,
normalisation and classifier gradients -- is private.  Per step:

1. each sample of the (Poisson) batch runs forward and backward as its own micro-batch, so ``param.grad``
   holds that one sample's trusted share (micro-batches of one also make ``basis="batch"`` per sample);
2. the sample's whole trusted-share vector (all parameters) is clipped to L2 norm ``C_u`` and summed;
3. ``N(0, (σ C_u)²)`` from the trusted secure generator is added to the sum -- one Gaussian mechanism per
   step with sensitivity ``C_u`` and multiplier ``σ``, accounted together with the step's releases;
4. the public shares are added, and the total is divided by the expected batch size ``q·n`` (Opacus'
   convention for Poisson batches) before the optimizer step.

Noise and Poisson masks come from :class:`asymml.privacy.secure_rng.SecureGenerator` (ChaCha20 under an
OS key, never saved); ``--noise-seed`` makes both reproducible and insecure.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["UpdatePrivatizer", "trusted_generator"]


def trusted_generator(noise_seed: int | None) -> Any:
    """The trusted context's secure generator for update noise and Poisson masks (fresh OS key; with
    ``noise_seed``: reproducible and insecure, for experiments only)."""
    from ..privacy.secure_rng import InsecureNoiseWarning, SecureGenerator

    if noise_seed is None:
        return SecureGenerator()
    with warnings.catch_warnings():  # the run says so itself, on the terminal and in the summary
        warnings.simplefilter("ignore", InsecureNoiseWarning)
        return SecureGenerator(insecure_seed=noise_seed)


class UpdatePrivatizer:
    """Per-sample clipping and Gaussian noise of the trusted share of a step's gradient.

    Use: ``sm.public_grad_sink = p.public_sink``; for each sample run forward/backward then
    :meth:`add_sample`; finally :meth:`finish` writes ``param.grad`` for the optimizer.
    """

    def __init__(self, params: Iterable[nn.Parameter], *, clip: float, noise_multiplier: float,
                 generator: Any) -> None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"update clip must be a finite number > 0 (got {clip!r})")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise multiplier must be a finite number >= 0 (got {noise_multiplier!r})")
        self.params = [p for p in params if p.requires_grad]
        self.clip = float(clip)
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator
        self._index = {id(p): i for i, p in enumerate(self.params)}
        self._sum: list[Tensor | None] = []
        self._public: list[Tensor | None] = []
        self.samples = 0
        self.clipped = 0
        self.norms: list[float] = []
        self.reset()

    def reset(self) -> None:
        """Start a new step."""
        self._sum = [None] * len(self.params)
        self._public = [None] * len(self.params)
        self.samples = 0
        self.clipped = 0
        self.norms = []

    # ------------------------------------------------------------------ accumulation
    def public_sink(self, param: nn.Parameter, grad: Tensor) -> None:
        """``SplitModule.public_grad_sink``: the accelerator's share of ``param``'s gradient (post-processing
        of noised releases), summed apart from the trusted share."""
        i = self._index.get(id(param))
        if i is None:  # a parameter the optimizer does not train
            return
        g = grad.detach().to(param.device, param.dtype)
        self._public[i] = g.clone() if self._public[i] is None else self._public[i].add_(g)

    def add_sample(self) -> float:
        """Clip the one sample's trusted share now in ``param.grad`` to ``clip``, add it to the sum, clear
        ``param.grad``; return the sample's norm before clipping."""
        grads = [p.grad for p in self.params]
        sq = torch.zeros((), dtype=torch.float64)
        for g in grads:
            if g is not None:
                sq += g.detach().double().square().sum()
        norm = float(sq.sqrt())
        if not math.isfinite(norm):
            raise FloatingPointError(f"a per-sample gradient is not finite (norm {norm})")
        factor = min(1.0, self.clip / (norm + 1e-12))
        for i, (p, g) in enumerate(zip(self.params, grads)):
            if g is None:
                continue
            g = g.detach() * factor
            self._sum[i] = g if self._sum[i] is None else self._sum[i].add_(g)
            p.grad = None
        self.samples += 1
        self.clipped += factor < 1.0
        self.norms.append(norm)
        return norm

    def finish(self, expected_batch_size: float, *, step: int) -> None:
        """``param.grad = (Σ clipped trusted shares + N(0, (σ C)²) + Σ public shares) / expected_batch_size``.

        ``step`` addresses the noise draw (unique per step of a run under one key)."""
        std = self.noise_multiplier * self.clip
        for i, p in enumerate(self.params):
            total = torch.zeros(p.shape, dtype=torch.float64)
            if self._sum[i] is not None:
                total += self._sum[i].double().cpu()
            if std > 0:
                total += std * self.generator.standard_normal(tuple(p.shape), label=f"dp-update:{i}", index=step)
            if self._public[i] is not None:
                total += self._public[i].double().cpu()
            p.grad = total.div_(expected_batch_size).to(device=p.device, dtype=p.dtype)
