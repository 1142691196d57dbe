"""Gradient-leakage attack (DLG / "inverting gradients") on the per-step parameter update.

The weights are public and reach the accelerator at every step (the ledger's ``weight`` releases; a
weight is re-sent when its value changed). With plain SGD (known ``lr``, no momentum) the accelerator
can difference two consecutive versions: ``W_{t+1} - W_t = -lr * grad_t``, the *full* gradient of the
step's loss for every released weight -- whatever the mode, and however little of the activations it
saw. The attack optimises a dummy batch so that the public model's gradient matches that update
(cosine distance over all revealed tensors plus total variation, Geiping et al. 2020; Adam, starting
from a prior such as the mean public image), then scores the
reconstruction against the private batch with PSNR/SSIM (best matching order for batches > 1).

Labels: when the ledger holds the released gradient of the logits (``plain`` mode, kind ``grad``) the
label of each row is its most negative entry (as in iDLG); when the classifier weight's update is revealed,
labels are inferred from its negative row sums; otherwise soft labels are optimised jointly (DLG).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .common import AttackMode, build_split, match_order, psnr, soft_cross_entropy, ssim

__all__ = ["UpdateCapture", "DLGResult", "capture_update", "gradient_leakage_attack", "weight_release_names"]


def weight_release_names(sm: Any) -> dict[str, str]:
    """Map the ledger names of weight releases to the model's parameter names.

    ``plain`` mode releases ``model.<param>``; split modes release ``<region>.<node>.<key>`` for the
    public tensors of the ops that run on the accelerator.
    """
    out: dict[str, str] = {}
    params = dict(sm.model.named_parameters())
    for name in params:
        out[f"model.{name}"] = name
    if sm.mode in ("asym", "noise-only"):
        for reg in sm.plan().regions:
            for n in reg.nodes:
                if n.op != "call_module":
                    continue
                for key in ("weight", "bias"):
                    pname = f"{n.target}.{key}"
                    if pname in params:
                        out[f"{reg.name}.{n.name}.{key}"] = pname
    return out


@dataclass
class UpdateCapture:
    """What one training step revealed: the public model before it and the update-derived gradients."""

    mode: str
    model: nn.Module  # the public model at W_t (a deep copy, train mode as in the step)
    grads: dict[str, Tensor]  # parameter name -> -(W_{t+1} - W_t) / lr
    revealed: list[str]
    hidden: list[str]  # parameters whose update the accelerator does not see
    label_hint: Tensor | None  # labels read from a released logits gradient, if any
    images: Tensor  # the private batch (ground truth, for scoring only)
    labels: Tensor
    lr: float


def capture_update(
    model: nn.Module,
    mode: AttackMode,
    clips: Mapping[str, float] | None,
    x: Tensor,
    y: Tensor,
    *,
    lr: float = 0.1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    probe: Tensor | None = None,
    split_kw: Mapping[str, Any] | None = None,
    dp_update: tuple[float, float] | None = None,
) -> UpdateCapture:
    """Run one real SGD step (no momentum) of ``model`` split in ``mode`` on ``(x, y)``; read the ledger.

    ``probe`` (public data, default: ``x[:1]`` zeroed) is forwarded after the step so that the updated
    weights reach the accelerator, as the next step's forward would. ``model`` itself is updated.
    ``dp_update=(clip, sigma)``: the step is DP-SGD -- per-sample trusted shares clipped to ``clip`` and
    noised with multiplier ``sigma`` (:class:`asymml.training.dp.UpdatePrivatizer`), as noised runs train.
    """
    loss_fn = loss_fn or F.cross_entropy
    before = copy.deepcopy(model)
    sm = build_split(model, mode, clips, audit=True, **dict(split_kw or {}))
    sm.executor.ledger.reset()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    opt.zero_grad(set_to_none=True)
    if dp_update is None:
        loss = loss_fn(sm(x), y)
        loss.backward()
    else:
        from ...training.dp import UpdatePrivatizer
        from ..secure_rng import SecureGenerator

        priv = UpdatePrivatizer(model.parameters(), clip=dp_update[0], noise_multiplier=dp_update[1],
                                generator=SecureGenerator())
        sm.public_grad_sink = priv.public_sink
        for i in range(len(x)):
            loss_fn(sm(x[i:i + 1]), y[i:i + 1]).backward()  # one sample's gradient (loss_fn: a mean)
            priv.add_sample()
        priv.finish(float(len(x)), step=0)
        sm.public_grad_sink = None
    opt.step()
    with torch.no_grad():
        sm(torch.zeros_like(x[:2]) if probe is None else probe)
    names = weight_release_names(sm)
    first: dict[str, Tensor] = {}
    last: dict[str, Tensor] = {}
    hint = None
    for r in sm.executor.ledger:
        if r.kind == "weight" and r.tensor is not None:
            pname = names.get(r.layer)
            if pname is None:
                continue
            first.setdefault(pname, r.tensor)
            last[pname] = r.tensor
        elif r.kind == "grad" and r.tensor is not None and r.tensor.dim() == 2 and hint is None:
            hint = r.tensor.argmin(1)  # d loss / d logits = (softmax - onehot) / B
    grads = {p: (first[p] - last[p]) / lr for p in first if not torch.equal(first[p], last[p])}
    all_params = [n for n, p in before.named_parameters() if p.requires_grad]
    return UpdateCapture(
        mode=mode.name, model=before, grads=grads, revealed=sorted(grads), hidden=[n for n in all_params if n not in grads],
        label_hint=hint, images=x.detach().clone(), labels=y.detach().clone(), lr=lr,
    )


@dataclass
class DLGResult:
    """Scores of one gradient-leakage reconstruction."""

    mode: str
    batch_size: int
    psnr: float
    ssim: float
    label_accuracy: float
    label_source: str
    revealed: list[str]
    grad_cosine: float  # final cosine similarity between dummy and revealed gradients
    baseline_psnr: float | None  # PSNR of the prior alone (what the attacker knew before the update)
    iters: int
    seconds: float
    originals: Tensor = field(repr=False)
    reconstructions: Tensor = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mode", "batch_size", "psnr", "ssim", "label_accuracy",
                                              "label_source", "revealed", "grad_cosine", "baseline_psnr", "iters",
                                              "seconds")}


def _labels_from_classifier(g: Tensor, batch: int) -> Tensor:
    """Labels from a classifier weight gradient ``(K, F)`` (non-negative features): negative row sums
    mark the classes present; counts are split in proportion to their magnitude."""
    s = g.sum(1)
    neg = (-s).clamp_min(0)
    if float(neg.sum()) == 0:
        return torch.full((batch,), int(s.argmin()), dtype=torch.long)
    share = neg / neg.sum() * batch
    counts = share.floor().long()
    for c in torch.argsort(share - counts, descending=True)[: batch - int(counts.sum())]:
        counts[c] += 1
    return torch.repeat_interleave(torch.arange(len(s)), counts)


def _tv(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def gradient_leakage_attack(
    capture: UpdateCapture,
    *,
    iters: int = 300,
    lr: float = 0.1,
    tv: float = 1e-2,
    restarts: int = 1,
    num_classes: int | None = None,
    seed: int = 0,
    classifier: str | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    per_layer: bool = False,
    prior: Tensor | None = None,
) -> DLGResult:
    """Reconstruct ``capture``'s private batch from its revealed update (Adam on the dummy batch).

    ``classifier``: name of the last linear weight (default: the last 2-D parameter) for label inference.
    ``per_layer``: average the cosine per revealed tensor instead of over their concatenation (weaker here).
    ``prior``: an image (e.g. the mean public image) the dummy batch starts from, plus small noise;
    default: uniform noise.
    """
    if not capture.grads:
        raise ConfigError(f"mode {capture.mode!r} revealed no parameter update: nothing to attack")
    t0 = time.perf_counter()
    model = capture.model
    params = dict(model.named_parameters())
    names = capture.revealed
    target = [capture.grads[n] for n in names]
    tnorm = torch.sqrt(sum((t * t).sum() for t in target))
    x_true = capture.images
    B = len(x_true)
    if num_classes is None:
        last2d = [n for n, p in params.items() if p.dim() == 2]
        num_classes = params[last2d[-1]].shape[0] if last2d else int(capture.labels.max()) + 1
    cls = classifier or next((n for n in reversed(list(params)) if params[n].dim() == 2), None)
    if capture.label_hint is not None:
        labels, source = capture.label_hint.clone(), "logits gradient"
    elif cls is not None and cls in capture.grads:
        labels, source = _labels_from_classifier(capture.grads[cls], B), "classifier update"
    else:
        labels, source = None, "soft (optimised)"
    loss_fn = loss_fn or F.cross_entropy
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, Tensor, Tensor | None] | None = None
    for _ in range(restarts):
        if prior is None:
            x = torch.rand(x_true.shape, generator=gen)
        else:
            x = (prior.expand_as(x_true) + 0.05 * torch.randn(x_true.shape, generator=gen)).clamp(0, 1)
        x.requires_grad_(True)
        z = None if labels is not None else torch.randn(B, num_classes, generator=gen).requires_grad_(True)
        opt = torch.optim.Adam([x] + ([z] if z is not None else []), lr=lr)
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1)
        cos_v = 0.0
        for _it in range(iters):
            out = model(x)
            loss = loss_fn(out, labels) if z is None else soft_cross_entropy(out, F.softmax(z, 1))
            g = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True)
            if per_layer:
                cos = sum(F.cosine_similarity(a.flatten(), b.flatten(), dim=0, eps=1e-20)
                          for a, b in zip(g, target)) / len(g)
            else:
                dot = sum((a * b).sum() for a, b in zip(g, target))
                gnorm = torch.sqrt(sum((a * a).sum() for a in g)).clamp_min(1e-12)
                cos = dot / (gnorm * tnorm)
            obj = 1 - cos + tv * _tv(x)
            opt.zero_grad(set_to_none=True)
            obj.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            cos_v = float(cos.detach())
        if best is None or -cos_v < best[0]:
            best = (-cos_v, x.detach().clone(), None if z is None else z.detach().argmax(1))
    assert best is not None
    rec = best[1]
    if labels is None:
        labels = best[2]
    if B > 1:
        order_rec = match_order(rec, x_true)
    else:
        order_rec = rec
    lab_acc = _label_accuracy(labels, capture.labels)
    return DLGResult(
        mode=capture.mode, batch_size=B, psnr=float(psnr(order_rec, x_true).mean()),
        ssim=float(ssim(order_rec, x_true).mean()), label_accuracy=lab_acc, label_source=source,
        revealed=list(names), grad_cosine=-best[0],
        baseline_psnr=None if prior is None else float(psnr(prior.expand_as(x_true), x_true).mean()),
        iters=iters, seconds=time.perf_counter() - t0,
        originals=x_true.clone(), reconstructions=order_rec,
    )


def _label_accuracy(est: Tensor | None, true: Tensor) -> float:
    """Fraction of labels recovered as a multiset (order-free)."""
    if est is None:
        return 0.0
    k = int(max(int(est.max()), int(true.max()))) + 1
    a = torch.bincount(est.long(), minlength=k)
    b = torch.bincount(true.long(), minlength=k)
    return float(torch.minimum(a, b).sum()) / len(true)


def revealed_summary(captures: Sequence[UpdateCapture]) -> dict[str, list[str]]:
    """Revealed parameter names per mode."""
    return {c.mode: c.revealed for c in captures}
