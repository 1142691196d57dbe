"""Evaluation of a split model over a dataset, and turning numerical blow-ups into a clear error."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import TrainingDivergedError
from .batches import Batches

__all__ = ["DIVERGED_HINT", "diverged_guard", "evaluate"]

DIVERGED_HINT = ("lower --lr, the noise (--noise/--nsr/--epsilon) or --clip (checkpoints written before are "
                 "kept)")


def evaluate(sm: nn.Module, batches: Batches, *, progress: bool = False, desc: str = "test", rank: int = 0,
             world: int = 1, reduce: Callable[[Sequence[float]], list[float]] | None = None) -> dict[str, float]:
    """Loss and accuracy of ``sm`` over ``batches`` in eval mode (no gradients).

    Data parallel: each of the ``world`` ranks evaluates its share of the batches and ``reduce`` (a sum
    over the ranks) combines the loss sums and counts, so every rank gets the figures of the whole set."""
    from tqdm.auto import tqdm

    was_training = sm.training
    sm.eval()
    crit = nn.CrossEntropyLoss(reduction="sum")
    loss_sum, correct, seen = 0.0, 0, 0
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), tqdm(total=batches.n, desc=desc, unit="img", leave=False, disable=not progress,
                                   dynamic_ncols=True) as bar:
            for x, y in batches.ordered(rank, world):
                out = sm(x)
                y = y.to(out.device)
                loss_sum += float(crit(out, y))
                correct += int((out.argmax(1) == y).sum())
                seen += len(y)
                bar.update(len(y))
    finally:
        sm.train(was_training)
    if reduce is not None:
        loss_sum, correct, seen = reduce([loss_sum, correct, seen])
        correct, seen = int(correct), int(seen)
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1), "samples": seen,
            "seconds": time.perf_counter() - t0}


@contextmanager
def diverged_guard(model: nn.Module, where: str) -> Iterator[None]:
    """Turn a decomposition failing on NaN/Inf activations into a :class:`TrainingDivergedError`."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        state = f"non-finite model state ({', '.join(bad[:3])})" if bad else "NaN/Inf activations"
        raise TrainingDivergedError(
            f"{where}: a low-rank decomposition failed ({str(e).splitlines()[0][:90]}); the model has diverged "
            f"({state}): {DIVERGED_HINT}"
        ) from None
