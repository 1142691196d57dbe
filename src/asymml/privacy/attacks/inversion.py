"""Model-inversion attack on released tensors: a decoder learnt on public photos maps what the accelerator
receives back to the input, and is scored on private photos with PSNR / SSIM.

Protocol (all of it is what an honest-but-curious accelerator can do, SPEC §2):

1. *Victim*: a split CNN trains on private photo patches (real SGD steps, audit on); the releases of the
   attacked layer are read from the ledger of those steps.
2. *Attacker*: before every victim step it knows the (public) weights, so it runs a copy of the same split
   configuration -- same mode, noise multiplier and clip bounds, its own noise -- on public photo patches and
   records the same layer's releases: (release, image) pairs for training.
3. A small conv decoder (upsampling to the image size, with a linear 1x1 skip path) is fitted on the
   public pairs and applied to the private releases.

``plain`` releases the raw input (layer ``"input"``), so the attack there must reach a high PSNR: a weak
attack would make every mode look safe. ``baseline_psnr`` is the score of guessing the mean public patch.

Scores that can fail (issue 9 item 5).  Plain PSNR is dominated by each image's colour and brightness,
which a decoder trained on public photos cannot infer even when the release shows every edge, so it barely
separates modes.  Each result therefore also has

* ``npsnr`` / ``nssim`` -- PSNR / SSIM after a per-image, per-channel affine fit of the reconstruction to
  the target (:func:`~.common.affine_fit`): scale-invariant, they measure the structure that leaked
  (baseline: a flat image of the right colour, ``baseline_npsnr``);
* ``reid`` -- re-identification: the fraction of reconstructions whose most correlated private image
  (among all ``n_private``) is their own (chance ``1 / n_private``).

The attacker's public set can be enlarged with every other offline image (:mod:`.public_data`), and
:data:`JOINT` attacks all of a sample's forward releases at once (every released layer, upsampled to the
image size and stacked as channels).  :func:`subspace_recovery` measures how well the accelerator recovers
each sample's trusted basis ``span(U)`` from the residual's null space.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from ...validate import fix
from .common import AttackMode, build_split, normalized_psnr, normalized_ssim, psnr, reidentification, ssim

__all__ = [
    "PhotoTask",
    "Decoder",
    "ReleaseCapture",
    "InversionResult",
    "release_of",
    "capture_training_releases",
    "train_decoder",
    "inversion_attack",
    "visualize_release",
    "JOINT",
    "joint_releases",
    "subspace_recovery",
]

JOINT = "joint"
"""Pseudo-layer name: all of a sample's forward releases attacked jointly."""

_FORWARD_KINDS = ("input", "residual", "activation")


def release_of(ledger: Sequence[Any], layer: str) -> list[Tensor]:
    """Tensors of the forward releases of ``layer`` in a ledger, in order.

    ``"input"`` also matches ``plain`` mode's raw-input release (layer ``"model"``, kind ``"input"``).
    """
    out = []
    for r in ledger:
        if r.kind not in _FORWARD_KINDS or r.tensor is None:
            continue
        if r.layer == layer or (layer == "input" and r.kind == "input"):
            out.append(r.tensor)
    return out


class PhotoTask:
    """Public / private photo patches and the photo classifier whose training is attacked."""

    def __init__(self, *, patch_size: int = 32, public_per_image: int = 192, private_per_image: int = 64,
                 model: str = "vgg11_bn", width: float = 0.25, rank: Any = "schedule", seed: int = 0,
                 extra_public: int = 0, group_norm: bool = True) -> None:
        """``extra_public``: crops per extra offline image added to the attacker's public set (with
        ``2 *`` that many digits and as many faces; 0: public photos only).  ``group_norm``: BatchNorm
        swapped for GroupNorm (:func:`asymml.fix` ``privacy=True``), as noised modes require."""
        from ...data import PRIVATE_PHOTOS, PUBLIC_PHOTOS, load_photo_patches
        from .public_data import extra_public_patches

        self.patch_size = patch_size
        self.model_name, self.width, self.rank, self.seed = model, width, rank, seed
        self.group_norm = group_norm
        self.x_public, self.y_public = load_photo_patches(PUBLIC_PHOTOS, patch_size=patch_size,
                                                          per_image=public_per_image, seed=seed)
        self.n_public_photos = len(self.x_public)
        if extra_public > 0:
            extra = extra_public_patches(patch_size, extra_public, digits=2 * extra_public, faces=extra_public,
                                         seed=seed)
            # labels of the extra patches are never used for training (only the attacker's forward passes)
            self.x_public = torch.cat([self.x_public, extra])
            self.y_public = torch.cat([self.y_public, torch.zeros(len(extra), dtype=torch.long)])
        self.x_private, y = load_photo_patches(PRIVATE_PHOTOS, patch_size=patch_size,
                                               per_image=private_per_image, seed=seed + 1)
        self.y_private = y + len(PUBLIC_PHOTOS)  # label = index in PHOTOS
        self.num_classes = len(PUBLIC_PHOTOS) + len(PRIVATE_PHOTOS)

    def make_model(self) -> nn.Module:
        from ...models import get_model

        torch.manual_seed(self.seed)
        model = get_model(self.model_name, num_classes=self.num_classes, in_channels=3,
                          image_size=self.patch_size, width=self.width)
        for m in model.modules():  # out-of-place activations (same maths; the attacker's replica of the
            if getattr(m, "inplace", False):  # model is differentiated twice by the gradient-leakage attack)
                m.inplace = False
        return fix(model, privacy=True) if self.group_norm else model

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y)


@dataclass
class ReleaseCapture:
    """Releases of the attacked layers: private ones (victim's ledger) and the attacker's public ones."""

    private: dict[str, Tensor]
    private_images: Tensor
    public: dict[str, Tensor]
    public_images: Tensor
    steps: int


def capture_training_releases(
    task: PhotoTask,
    mode: AttackMode,
    clips: Mapping[str, float] | None,
    layers: Sequence[str],
    *,
    batch_size: int = 64,
    lr: float = 0.01,
) -> ReleaseCapture:
    """Train ``task``'s model one epoch on the private patches in ``mode`` and capture ``layers``' releases.

    Before each victim step the attacker simulates the same split (deep copy at the current public weights)
    on a share of the public patches. Layers a mode does not release are left out of the result.
    """
    model = task.make_model().train()
    sm = build_split(model, mode, clips, audit=True, rank=task.rank, seed=task.seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    n_priv = len(task.x_private)
    steps = math.ceil(n_priv / batch_size)
    pub_chunks = torch.arange(len(task.x_public)).chunk(steps)
    priv: dict[str, list[Tensor]] = {k: [] for k in layers}
    pub: dict[str, list[Tensor]] = {k: [] for k in layers}
    for s in range(steps):
        # attacker: same configuration, public data, current public weights, its own noise
        shadow = copy.deepcopy(model)
        ssm = build_split(shadow, mode, clips, audit=True, rank=task.rank, seed=task.seed + 1000 + s)
        with torch.no_grad():
            ssm(task.x_public[pub_chunks[s]])
        for k in layers:
            pub[k].extend(release_of(ssm.executor.ledger, k))
        # victim: a real training step on private data
        sm.executor.ledger.reset()
        xb = task.x_private[s * batch_size:(s + 1) * batch_size]
        yb = task.y_private[s * batch_size:(s + 1) * batch_size]
        loss = task.loss(sm(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k in layers:
            priv[k].extend(release_of(sm.executor.ledger, k))
    keep = [k for k in layers if priv[k] and pub[k]]
    return ReleaseCapture(
        private={k: torch.cat(priv[k]) for k in keep}, private_images=task.x_private,
        public={k: torch.cat(pub[k]) for k in keep}, public_images=task.x_public, steps=steps,
    )


class Decoder(nn.Module):
    """Release ``(C, h, w)`` → image ``(3, H, W)``.

    A linear path (bilinear upsampling to the image size, then a 3×3 convolution) plus a non-linear
    refinement (conv stack at the release's resolution, upsampling, conv stack). :func:`train_decoder`
    first solves the linear path in closed form (ridge least squares, a local Wiener filter) and starts
    the refinement at zero, so the decoder is never worse than the best linear one on public data.
    """

    def __init__(self, in_channels: int, out_size: tuple[int, int], out_channels: int = 3, width: int = 24) -> None:
        super().__init__()
        self.out_size = tuple(out_size)
        self.linear = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.head = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        )
        self.body = nn.Sequential(
            nn.Conv2d(width + in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def _up(self, t: Tensor) -> Tensor:
        if tuple(t.shape[-2:]) == self.out_size:
            return t
        return F.interpolate(t, size=self.out_size, mode="bilinear", align_corners=False)

    def forward(self, r: Tensor) -> Tensor:
        up = self._up(r)
        return self.linear(up) + self.body(torch.cat([self._up(self.head(r)), up], 1))

    @torch.no_grad()
    def fit_linear(self, releases: Tensor, images: Tensor, ridge: float = 1e-3, batch: int = 128) -> None:
        """Closed-form ridge least squares of the linear path on (release, image) pairs."""
        conv = self.linear
        k = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels
        xtx = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        xty = torch.zeros(k + 1, conv.out_channels, dtype=torch.float64)
        for i in range(0, len(images), batch):
            cols = F.unfold(self._up(releases[i:i + batch].float()), conv.kernel_size, padding=conv.padding)
            a = torch.cat([cols, torch.ones_like(cols[:, :1])], 1).transpose(1, 2).reshape(-1, k + 1).double()
            t = images[i:i + batch].float().flatten(2).transpose(1, 2).reshape(-1, conv.out_channels).double()
            xtx += a.T @ a
            xty += a.T @ t
        reg = ridge * float(xtx.diagonal()[:k].mean().clamp_min(1e-12))
        xtx[:k, :k] += reg * torch.eye(k, dtype=torch.float64)
        sol = torch.linalg.solve(xtx, xty)
        conv.weight.copy_(sol[:k].T.reshape(conv.weight.shape).float())
        conv.bias.copy_(sol[k].float())


def train_decoder(
    releases: Tensor,
    images: Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    width: int = 24,
    seed: int = 0,
) -> tuple[Decoder, float]:
    """Fit a :class:`Decoder` on (release, image) pairs: the linear path in closed form, then everything
    with Adam (MSE, cosine schedule) for ``epochs`` (0: the linear decoder alone).

    Returns the decoder and the input scale it expects (releases are divided by their public RMS).
    """
    if len(releases) != len(images):
        raise ValueError("releases and images differ in length")
    torch.manual_seed(seed)
    scale = float(releases.float().pow(2).mean().sqrt().clamp_min(1e-12))
    rel = releases.float() / scale
    dec = Decoder(releases.shape[1], tuple(images.shape[-2:]), images.shape[1], width)
    dec.fit_linear(rel, images)
    n = len(images)
    total = epochs * math.ceil(n / batch_size)
    if total:
        opt = torch.optim.Adam(dec.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen)
            for i in range(0, n, batch_size):
                idx = perm[i:i + batch_size]
                loss = F.mse_loss(dec(rel[idx]), images[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return dec.eval(), scale


@dataclass
class InversionResult:
    """Scores of the inversion attack on one layer of one mode (private images)."""

    mode: str
    layer: str
    psnr: float
    ssim: float
    baseline_psnr: float
    baseline_ssim: float
    n_public: int
    n_private: int
    seconds: float
    originals: Tensor = field(repr=False)
    seen: Tensor = field(repr=False)
    reconstructions: Tensor = field(repr=False)
    npsnr: float = float("nan")
    nssim: float = float("nan")
    baseline_npsnr: float = float("nan")
    baseline_nssim: float = float("nan")
    reid: float = float("nan")
    reid_top5: float = float("nan")
    reid_chance: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mode", "layer", "psnr", "ssim", "baseline_psnr", "baseline_ssim",
                                              "npsnr", "nssim", "baseline_npsnr", "baseline_nssim", "reid",
                                              "reid_top5", "reid_chance", "n_public", "n_private", "seconds")}


def visualize_release(r: Tensor, size: tuple[int, int]) -> Tensor:
    """What the accelerator saw, as images in ``[0, 1]``: 3-channel releases as RGB, others as the
    per-pixel channel RMS; each image min-max scaled, upsampled (nearest) to ``size``."""
    r = r.detach().float()
    v = r if r.shape[1] == 3 else r.pow(2).mean(1, keepdim=True).sqrt().expand(-1, 3, -1, -1)
    flat = v.reshape(len(v), -1)
    lo, hi = flat.min(1).values.view(-1, 1, 1, 1), flat.max(1).values.view(-1, 1, 1, 1)
    v = (v - lo) / (hi - lo).clamp_min(1e-12)
    if tuple(v.shape[-2:]) != tuple(size):
        v = F.interpolate(v, size=size, mode="nearest")
    return v


@torch.no_grad()
def _decode(dec: Decoder, scale: float, rel: Tensor, batch: int = 256) -> Tensor:
    return torch.cat([dec(rel[i:i + batch].float() / scale) for i in range(0, len(rel), batch)]).clamp(0, 1)


def inversion_attack(
    capture: ReleaseCapture,
    layer: str,
    *,
    mode_name: str = "?",
    epochs: int = 10,
    width: int = 24,
    seed: int = 0,
    keep: int = 8,
) -> InversionResult:
    """Train a decoder on ``capture``'s public releases of ``layer`` and score it on the private ones.

    ``layer=JOINT`` attacks all captured layers of each sample together (:func:`joint_releases`).
    """
    t0 = time.perf_counter()
    if layer == JOINT:
        public, private = joint_releases(capture)
    else:
        if layer not in capture.private:
            raise ConfigError(f"layer {layer!r} was not released in mode {mode_name!r} "
                              f"(released: {', '.join(capture.private) or 'none'})")
        public, private = capture.public[layer], capture.private[layer]
    dec, scale = train_decoder(public, capture.public_images, epochs=epochs, width=width, seed=seed)
    rec = _decode(dec, scale, private)
    target = capture.private_images
    mean = capture.public_images.mean(0, keepdim=True).expand_as(target)
    reid = reidentification(rec, target)
    seen_src = capture.private[layer] if layer != JOINT else capture.private[next(iter(capture.private))]
    return InversionResult(
        mode=mode_name, layer=layer,
        psnr=float(psnr(rec, target).mean()), ssim=float(ssim(rec, target).mean()),
        baseline_psnr=float(psnr(mean, target).mean()), baseline_ssim=float(ssim(mean, target).mean()),
        n_public=len(capture.public_images), n_private=len(target), seconds=time.perf_counter() - t0,
        originals=target[:keep].clone(), seen=visualize_release(seen_src[:keep], target.shape[-2:]),
        reconstructions=rec[:keep].clone(),
        npsnr=float(normalized_psnr(rec, target).mean()), nssim=float(normalized_ssim(rec, target).mean()),
        baseline_npsnr=float(normalized_psnr(mean, target).mean()),
        baseline_nssim=float(normalized_ssim(mean, target).mean()),
        reid=reid["accuracy"], reid_top5=reid["top5"], reid_chance=reid["chance"],
    )


def joint_releases(capture: ReleaseCapture) -> tuple[Tensor, Tensor]:
    """``(public, private)``: every captured layer's releases of each sample, upsampled (bilinear) to the
    image size, each layer divided by its public RMS, stacked as channels -- one input per sample."""
    size = tuple(capture.public_images.shape[-2:])
    layers = [k for k in capture.private if len(capture.private[k]) == len(capture.private_images)
              and len(capture.public[k]) == len(capture.public_images)]
    if not layers:
        raise ConfigError("no layer released once per sample: nothing to attack jointly")

    def stack(src: dict[str, Tensor], scales: dict[str, float]) -> Tensor:
        parts = []
        for k in layers:
            t = src[k].float() / scales[k]
            if t.dim() == 2:  # a flat release: one channel per feature would be too many; keep it as a map
                t = t.reshape(len(t), 1, 1, -1)
            parts.append(t if tuple(t.shape[-2:]) == size else
                         F.interpolate(t, size=size, mode="bilinear", align_corners=False))
        return torch.cat(parts, 1)

    scales = {k: float(capture.public[k].float().pow(2).mean().sqrt().clamp_min(1e-12)) for k in layers}
    return stack(capture.public, scales), stack(capture.private, scales)


def subspace_recovery(releases: Tensor, inputs: Tensor, rank: int, *, seed: int = 0) -> dict[str, float]:
    """How well the accelerator recovers each sample's trusted basis ``span(U)`` from a release.

    Without noise the released residual is ``R = (I - U U^T) X``, so ``U^T R = 0``: the ``rank``
    eigenvectors of ``R R^T`` with the smallest eigenvalues estimate ``span(U)``.  Compared, per sample,
    with the top-``rank`` left singular subspace of the input ``X`` (what ``U`` approximates): ``cos`` is
    the mean cosine of the principal angles (1 = recovered exactly); ``cos_random`` is the same for a
    uniformly random subspace (what an attacker gets by guessing).  ``releases`` and ``inputs`` are
    ``(B, C, H, W)`` of the same layer (e.g. the input layer: ``inputs`` are the images).
    """
    if releases.shape != inputs.shape:
        raise ConfigError(f"release shape {tuple(releases.shape)} != input shape {tuple(inputs.shape)}")
    b, c = releases.shape[:2]
    if not 0 < rank < c:
        raise ConfigError(f"rank must be in [1, {c - 1}] for {c} channels (got {rank})")
    r = releases.detach().double().reshape(b, c, -1)
    x = inputs.detach().double().reshape(b, c, -1)
    est = torch.linalg.eigh(r @ r.transpose(1, 2)).eigenvectors[..., :rank]  # smallest eigenvalues first
    true = torch.linalg.svd(x, full_matrices=False).U[..., :rank]
    cos = torch.linalg.svdvals(true.transpose(1, 2) @ est).mean(-1)
    gen = torch.Generator().manual_seed(seed)
    rand = torch.linalg.qr(torch.randn(b, c, rank, generator=gen, dtype=torch.float64)).Q
    cos_rand = torch.linalg.svdvals(true.transpose(1, 2) @ rand).mean(-1)
    return {"cos": float(cos.mean()), "cos_min": float(cos.min()), "cos_random": float(cos_rand.mean()),
            "rank": float(rank), "channels": float(c), "samples": float(b)}
