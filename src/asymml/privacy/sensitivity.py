"""Per-sample sensitivity: every accounted release must depend on exactly one sample (issue 9, item 2).

The Gaussian mechanism's guarantee needs each release ``r_b`` to be a function of sample ``b`` alone,
clipped to norm ``c``.  If changing sample ``j`` moves sample ``b``'s release, the sensitivity of the
batch's releases is no longer ``c`` and the accounted epsilon is wrong.  Configurations that couple samples
(all reproduced on this code base):

* **train-mode BatchNorm** -- normalises with batch statistics (other samples' gradient residuals moved
  87-99% when one sample changed).  Fix: :func:`asymml.fix` ``(model, privacy=True)`` swaps every BatchNorm
  for a GroupNorm (Opacus' ``ModuleValidator.fix``).  A BatchNorm with ``track_running_stats=False`` uses
  batch statistics even in eval mode.
* **basis="batch"** -- one basis ``U`` shared by the batch (5-34%).  Fix: ``basis="sample"``.
* **warm-started power iteration** -- the next step starts from the previous batch's ``U``, so a release
  depends on another batch's samples (up to 29%; exactly 0 cold).  Fix: ``warm_start=False``.
* **adaptive rank** (``rank="adaptive..."``) -- one rank for the batch, chosen from every sample's spectrum.
  Fix: a fixed rank, a per-point list, or the schedule.
* **adaptive clip** (``clip="auto"``) -- the bound is a quantile of the batch's norms (and is not
  privatised).  Fix: a fixed clip calibrated on public data.
* **mean loss reduction** under Poisson sampling -- every gradient is divided by the realised batch size,
  which depends on which other samples were drawn.  Fix: sum, divided by the *expected* batch size.
* **public random starts** of ``decomposition="power"``/``"rsvd"`` -- the start of the sample at batch
  position ``p`` is the ``p``-th draw of a generator seeded with the public ``seed``; adding or removing one
  sample (Poisson sampling's adjacency) shifts every later sample to another, *known* start.  Measured:
  removing sample 0 of 8 moved the other samples' releases by up to 100% with ``power`` (cold start), by
  2e-6 with ``eigh``.  With starts drawn fresh from the trusted secure generator the shift changes nothing
  in distribution (starts are i.i.d. and secret).  Fix: secret random starts, or ``decomposition="eigh"``.

:func:`check_independent` refuses these with :class:`~asymml.errors.PrivacyConfigError` whose message
says what to do; :func:`coupling_layers` lists the modules that couple samples (for ``asymml.validate``);
:func:`release_dependence` measures it empirically on a split model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import PrivacyConfigError

__all__ = ["check_independent", "coupling_layers", "release_dependence"]

_BN = nn.modules.batchnorm._BatchNorm


def coupling_layers(model: nn.Module, *, training: bool | None = None) -> list[tuple[str, str]]:
    """``(module name, reason)`` for every module that mixes the samples of a batch.

    ``training``: the mode the model will run in (default: its current ``model.training``).  Train-mode
    BatchNorm (and any BatchNorm without running statistics) is listed; GroupNorm, LayerNorm and
    InstanceNorm normalise each sample on its own and are not.
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, _BN):
            train = m.training if training is None else training
            if train:
                out.append((name or type(m).__name__, f"{type(m).__name__} in train mode normalises with batch "
                            "statistics (fix: asymml.fix(model, privacy=True) swaps in GroupNorm)"))
            elif not m.track_running_stats:
                out.append((name or type(m).__name__, f"{type(m).__name__} without running statistics uses batch "
                            "statistics even in eval mode (fix: asymml.fix(model, privacy=True))"))
    return out


def check_independent(
    model: nn.Module | None = None,
    *,
    basis: str = "sample",
    warm_start: bool = False,
    training: bool | None = True,
    decomposition: str = "power",
    rank: Any = None,
    clip: float | str | None = None,
    loss_reduction: str | None = None,
    public_random_start: bool = False,
) -> None:
    """Refuse (``PrivacyConfigError``) a noised configuration in which a release depends on other samples.

    Call it wherever an epsilon is going to be reported: ``asymml.split`` when noise is given, the training
    loop when ``--epsilon``/``--noise`` is set, the privacy report.  ``model`` (optional) is scanned for
    coupling modules in the mode given by ``training``; ``rank`` (a policy or its spec), ``clip`` and
    ``loss_reduction`` are checked when given; ``public_random_start=True`` says the decomposition's random
    starts come from a publicly seeded generator.  Every problem found is listed in one message.
    """
    problems: list[str] = []
    if model is not None:
        for name, reason in coupling_layers(model, training=training):
            problems.append(f"{name}: {reason}")
    if basis == "batch":
        problems.append("basis='batch' shares one basis U across the batch, so each release depends on the other "
                        "samples: use basis='sample'")
    elif basis != "sample":
        problems.append(f"unknown basis {basis!r}: use basis='sample'")
    if warm_start and decomposition == "power":
        problems.append("warm_start=True starts each power iteration from the previous batch's factors, so a "
                        "release depends on another batch's samples: use warm_start=False (cold start)")
    if rank is not None and _adaptive(rank):
        problems.append(f"rank={rank!r} picks one rank for the whole batch from every sample's spectrum: use a "
                        "fixed rank, a per-point list or 'schedule'")
    if isinstance(clip, str) and clip.strip().lower().startswith("auto"):
        problems.append(f"clip={clip!r} is a quantile of the batch's norms (and is not privatised): use a fixed "
                        "clip, e.g. calibrated on public data")
    if public_random_start and decomposition in ("power", "rsvd"):
        problems.append(f"decomposition={decomposition!r} starts from publicly seeded random matrices, one per batch "
                        "position, so adding or removing a sample moves every later sample's release: draw the starts "
                        "from the trusted secure generator, or use decomposition='eigh'")
    if loss_reduction == "mean":
        problems.append("a mean loss divides every gradient by the realised batch size, which depends on the other "
                        "samples drawn: use reduction='sum' divided by the expected batch size")
    if problems:
        raise PrivacyConfigError(
            "noise is on but releases would not depend on one sample each (the reported epsilon would not "
            "hold):\n  - " + "\n  - ".join(problems))


def _adaptive(rank: Any) -> bool:
    from ..decomposition import AdaptiveRank, parse_rank

    try:
        policy = parse_rank(rank)
    except ValueError:
        return False
    return isinstance(policy, AdaptiveRank)


def release_dependence(
    make_split: Callable[[], Any],
    x: Tensor,
    y: Tensor | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    sample: int = 0,
    kinds: Sequence[str] = ("residual", "activation", "grad_residual"),
    remove: bool = False,
) -> float:
    """Largest relative change of *other* samples' releases when sample ``sample`` of ``x`` is replaced
    (``remove=True``: removed from the batch, Poisson sampling's adjacency).

    ``make_split()`` must return a fresh audited split model (``audit=True``) on the same weights and with
    noise off (or a replayable seed); one forward (and backward, when ``y`` and ``loss_fn`` are given) runs
    on ``x`` and on ``x`` with sample ``sample`` replaced by noise (or left out).  0 means independent.
    """
    def releases(inp: Tensor, target: Tensor | None) -> list[Tensor]:
        sm = make_split()
        out = sm(inp)
        if target is not None and loss_fn is not None:
            loss_fn(out, target).backward()
        return [r.tensor for r in sm.executor.ledger if r.kind in kinds and r.tensor is not None
                and r.tensor.dim() > 0 and r.tensor.shape[0] == inp.shape[0]]

    keep = [i for i in range(x.shape[0]) if i != sample]
    if remove:
        x2, y2 = x[keep], (None if y is None else y[keep])
    else:
        x2, y2 = x.clone(), y
        x2[sample] = torch.randn(x[sample].shape, generator=torch.Generator().manual_seed(12345), dtype=x.dtype)
    a, b = releases(x, y), releases(x2, y2)
    if len(a) != len(b):
        return float("inf")
    worst = 0.0
    for ra, rb in zip(a, b):
        ra, rb = ra[keep].double(), (rb if remove else rb[keep]).double()
        den = torch.linalg.vector_norm(ra.reshape(len(keep), -1), dim=1).clamp_min(1e-12)
        num = torch.linalg.vector_norm((ra - rb).reshape(len(keep), -1), dim=1)
        worst = max(worst, float((num / den).max()))
    return worst
