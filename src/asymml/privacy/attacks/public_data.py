"""A larger public set for the attacker (issue 9 item 5): every offline image that is not private.

A decoder trained on six public photos cannot learn much about natural images, which makes the
inversion attack look weaker than it is.  Besides the public photos' patches
(:data:`asymml.data.PUBLIC_PHOTOS`), the attacker here also trains on

* the greyscale photos and textures bundled inside scikit-image (``camera``, ``coins``, ``moon``, ``brick``,
  ``grass``, ``gravel``, ``clock``, ``cell``, ``page``, ``text``) and its ``lfw_subset`` faces, tinted with a
  random RGB colour per patch so that the decoder also sees colour variation;
* scikit-learn's 8x8 ``digits``, upsampled and tinted the same way.

Nothing is downloaded.  ``cat`` is left out: it is the same picture as the private ``chelsea``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["EXTRA_GREY_IMAGES", "extra_public_patches"]

EXTRA_GREY_IMAGES: tuple[str, ...] = ("camera", "coins", "moon", "brick", "grass", "gravel", "clock", "cell", "page",
                                      "text")
"""Greyscale scikit-image images bundled in the wheel (no pooch download), none of them a private photo."""


def _grey(name: str) -> Tensor:
    import skimage.data

    arr = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    if arr.max() > 1.0:
        arr = arr / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr))


def _tint(x: Tensor, gen: torch.Generator) -> Tensor:
    """Greyscale ``(N, 1, H, W)`` -> RGB with a random per-patch colour ``lo + g * (hi - lo)``."""
    n = x.shape[0]
    lo = torch.rand(n, 3, 1, 1, generator=gen) * 0.3
    hi = 0.6 + torch.rand(n, 3, 1, 1, generator=gen) * 0.4
    return (lo + x * (hi - lo)).clamp(0, 1)


def _crops(img: Tensor, size: int, count: int, gen: torch.Generator) -> Tensor:
    h, w = img.shape
    scale = max(1.0, 2.0 * size / min(h, w)) if min(h, w) < 4 * size else 1.0
    if scale != 1.0:
        img = F.interpolate(img[None, None], scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
        h, w = img.shape
    ys = torch.randint(0, h - size + 1, (count,), generator=gen)
    xs = torch.randint(0, w - size + 1, (count,), generator=gen)
    return torch.stack([img[y:y + size, x:x + size] for y, x in zip(ys.tolist(), xs.tolist())])[:, None]


def extra_public_patches(patch_size: int, per_image: int, *, digits: int = 256, faces: int = 128,
                         seed: int = 0) -> Tensor:
    """RGB ``(N, 3, patch_size, patch_size)`` patches in [0, 1]: ``per_image`` crops of every image in
    :data:`EXTRA_GREY_IMAGES`, ``faces`` LFW faces and ``digits`` sklearn digits (resized), all tinted."""
    import skimage.data
    from sklearn.datasets import load_digits

    gen = torch.Generator().manual_seed(seed + 4242)
    parts = []
    if per_image > 0:
        for name in EXTRA_GREY_IMAGES:
            parts.append(_crops(_grey(name), patch_size, per_image, gen))
    if faces > 0:
        lfw = torch.from_numpy(np.asarray(skimage.data.lfw_subset(), dtype=np.float32))
        idx = torch.randperm(len(lfw), generator=gen)[:faces]
        parts.append(F.interpolate(lfw[idx, None], size=(patch_size, patch_size), mode="bilinear",
                                   align_corners=False).clamp(0, 1))
    if digits > 0:
        d = load_digits()
        imgs = torch.from_numpy(d.images.astype(np.float32) / 16.0)
        idx = torch.randperm(len(imgs), generator=gen)[:digits]
        parts.append(F.interpolate(imgs[idx, None], size=(patch_size, patch_size), mode="bilinear",
                                   align_corners=False).clamp(0, 1))
    if not parts:
        return torch.empty(0, 3, patch_size, patch_size)
    grey = torch.cat(parts)
    return _tint(grey, gen).contiguous()
