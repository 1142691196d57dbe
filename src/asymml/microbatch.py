"""Micro-batched training by gradient accumulation (issue 11, item 4: trusted memory that fits an enclave).

Autograd keeps every saved activation of a forward pass until its backward, so a training step over a batch of
``B`` samples holds ``B`` samples' activations on the trusted side.  :func:`accumulate` runs forward and backward
micro-batch by micro-batch instead: micro-batch ``i`` (``n_i`` samples) contributes ``(n_i / B) · mean loss_i``,
so the gradients accumulated in ``param.grad`` are exactly those of the whole batch's mean loss, and the trusted
side holds one micro-batch's activations at a time.  The caller then takes one optimizer step (and, data
parallel, one all-reduce after the accumulation).

Exact only when no sample's output depends on the other samples of its batch: train-mode BatchNorm normalises
with the whole batch's statistics and is refused (:class:`~asymml.errors.ConfigError`); GroupNorm, LayerNorm,
eval-mode BatchNorm and no normalisation are exact.  The loss must be a per-sample mean (as
``F.cross_entropy``'s default ``reduction="mean"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError, InputError

__all__ = ["Accumulated", "accumulate", "check_micro_batchable"]


@dataclass
class Accumulated:
    """What one accumulated step computed: the whole batch's mean ``loss``, its ``correct`` top-1
    predictions (None when the outputs are not class logits), ``samples`` and the ``micro_batches`` run."""

    loss: float
    correct: int | None
    samples: int
    micro_batches: int


def check_micro_batchable(model: nn.Module) -> None:
    """Raise :class:`ConfigError` if micro-batches would change the step: a train-mode BatchNorm normalises each
    micro-batch with its own statistics (a different gradient, and different running statistics)."""
    from .privacy.sensitivity import coupling_layers

    bad = [name for name, _ in coupling_layers(model)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise ConfigError(
            f"micro-batched training needs a model without train-mode BatchNorm ({', '.join(bad[:3])}{more} "
            "normalise with the statistics of the whole batch, so micro-batches would change the gradient): "
            "use GroupNorm (asymml.fix(model, privacy=True), or asymml train --norm group), or leave the micro-batch "
            "unset")


def _micro_batch_of(sm: nn.Module, micro_batch: int | None) -> int | None:
    if micro_batch is None:
        cfg = getattr(sm, "cfg", None)
        micro_batch = getattr(cfg, "micro_batch", None)
    if micro_batch is not None and (isinstance(micro_batch, bool) or not isinstance(micro_batch, int)
                                    or micro_batch < 1):
        raise ConfigError(f"micro_batch must be a positive integer, got {micro_batch!r}")
    return micro_batch


def _correct(out: Tensor, y: Tensor) -> int | None:
    if out.dim() != 2 or y.dim() != 1 or y.dtype.is_floating_point or len(y) != out.shape[0]:
        return None
    return int((out.detach().argmax(1) == y).sum())


def accumulate(sm: nn.Module, x: Tensor, y: Tensor,
               loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
               micro_batch: int | None = None, *, after_each: Callable[[], None] | None = None) -> Accumulated:
    """Forward and backward of ``loss_fn(sm(x), y)`` (a per-sample mean), micro-batch by micro-batch,
    gradients accumulated into ``param.grad`` equal to the whole batch's; no optimizer step.

    ``sm``: a :class:`~asymml.SplitModule` (or any module); ``micro_batch``: samples per micro-batch (None: the
    split's own ``micro_batch`` option; unset or ``≥ len(x)``: one pass over the whole batch).  ``param.grad``
    is added to, as ``backward`` does: zero it before the step.  Raises :class:`ConfigError` for a model with
    train-mode BatchNorm when the batch is actually split.  ``after_each()`` is called after every micro-batch's
    backward (e.g. to count what that micro-batch released: each sample is in exactly one micro-batch).
    """
    m = _micro_batch_of(sm, micro_batch)
    n = int(x.shape[0])
    if len(y) != n:
        raise InputError(f"{n} inputs but {len(y)} targets")
    if m is None or m >= n:
        out = sm(x)
        loss = loss_fn(out, y.to(out.device))
        loss.backward()
        if after_each is not None:
            after_each()
        return Accumulated(float(loss.detach()), _correct(out, y.to(out.device)), n, 1)
    check_micro_batchable(getattr(sm, "model", sm))
    loss_sum = 0.0
    correct: int | None = 0
    chunks = 0
    for xs, ys in zip(x.split(m), y.split(m)):
        out = sm(xs)
        ys = ys.to(out.device)
        loss = loss_fn(out, ys)
        # the whole batch's mean = Σ_i (n_i / B) · mean_i: scaled so that the accumulated gradient is the mean's
        (loss * (len(ys) / n)).backward()
        loss_sum += float(loss.detach()) * len(ys)
        c = _correct(out, ys)
        correct = None if c is None or correct is None else correct + c
        chunks += 1
        if after_each is not None:
            after_each()
        del out, loss  # free this micro-batch's outputs before the next forward
    return Accumulated(loss_sum / n, correct, n, chunks)
