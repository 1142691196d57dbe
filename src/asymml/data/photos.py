"""Natural RGB photos that ship offline with scikit-image and scikit-learn.

Only photos bundled inside the installed wheels are used (nothing is ever downloaded): the
scikit-image images that need ``pooch`` (``eagle``, ``lily``, ``skin``, ``kidney``, ...) are
excluded, as are the synthetic/greyscale ones (``colorwheel``, ``logo``, ``camera``, ...) and
``cat`` (the same picture as ``chelsea``).

Every photo is rescaled (anti-aliased bilinear) so that its shorter side is ``photo_size`` pixels
(default 256) before patches are cut, so that a 32×32 patch holds some structure rather than a flat
piece of a large image. Patch values are RGB floats in ``[0, 1]`` (no normalisation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache, lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PHOTOS",
    "PUBLIC_PHOTOS",
    "PRIVATE_PHOTOS",
    "load_photo",
    "load_photo_patches",
    "photo_split_patches",
]

#: Photos an attacker may see (train a reconstruction decoder on these).
PUBLIC_PHOTOS: tuple[str, ...] = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "china",
)
#: Photos held back as "private" data (evaluate attacks on these). Disjoint from PUBLIC_PHOTOS.
PRIVATE_PHOTOS: tuple[str, ...] = ("chelsea", "motorcycle", "retina", "flower")
#: All photos, in label order for the ``photos`` dataset.
PHOTOS: tuple[str, ...] = PUBLIC_PHOTOS + PRIVATE_PHOTOS

_MIN_STD = 0.02  # crops flatter than this (e.g. black borders) are re-drawn when possible
_MAX_TRIES = 20


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]
        return getattr(skimage.data, name)()

    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(filename)

    return load


_LOADERS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "chelsea": _skimage("chelsea"),
    "motorcycle": _skimage("motorcycle"),
    "retina": _skimage("retina"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
}


@cache
def _raw_photo(name: str) -> Tensor:
    if name not in _LOADERS:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTOS)}")
    arr = np.asarray(_LOADERS[name]())
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise RuntimeError(f"photo {name!r} is not RGB (shape {arr.shape})")
    arr = np.array(arr[:, :, :3], dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


@lru_cache(maxsize=32)
def _scaled_photo(name: str, short_side: int) -> Tensor:
    img = _raw_photo(name)
    h, w = img.shape[1:]
    scale = short_side / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size == (h, w):
        return img
    out = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return out.clamp_(0.0, 1.0)


def load_photo(name: str, *, photo_size: int | None = 256) -> Tensor:
    """Return photo ``name`` as a ``(3, H, W)`` float tensor in ``[0, 1]``.

    ``photo_size`` is the length of the shorter side after rescaling; ``None`` keeps the original.
    """
    if photo_size is None:
        return _raw_photo(name).clone()
    return _scaled_photo(name, int(photo_size)).clone()


def _photo_index(name: str) -> int:
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; available: {', '.join(PHOTOS)}")
    return PHOTOS.index(name)


def _short_side(patch_size: int, photo_size: int | None) -> int | None:
    if photo_size is None:
        return None
    return max(int(photo_size), 4 * patch_size)


def _crop(
    img: Tensor,
    rng: np.random.Generator,
    cells: Sequence[tuple[int, int]],
    cell: tuple[int, int],
    patch: int,
) -> Tensor:
    """Random ``patch``-sized crop lying entirely inside one of ``cells`` (top-left corners)."""
    out = None
    for _ in range(_MAX_TRIES):
        top, left = cells[int(rng.integers(len(cells)))]
        dy = int(rng.integers(cell[0] - patch + 1))
        dx = int(rng.integers(cell[1] - patch + 1))
        out = img[:, top + dy : top + dy + patch, left + dx : left + dx + patch]
        if float(out.std()) >= _MIN_STD:
            break
    assert out is not None
    return out


def _check_names(names: Sequence[str] | None) -> tuple[str, ...]:
    names = PHOTOS if names is None else tuple(names)
    if not names:
        raise ValueError("need at least one photo name")
    for n in names:
        _photo_index(n)
    return names


def load_photo_patches(
    names: Sequence[str] | None = None,
    *,
    patch_size: int = 32,
    per_image: int = 64,
    seed: int = 0,
    photo_size: int | None = 256,
) -> tuple[Tensor, Tensor]:
    """Random crops from the offline photos.

    Returns ``(patches, labels)``: ``patches`` is ``(len(names) * per_image, 3, p, p)`` float32 in
    ``[0, 1]``, ``labels`` (int64) is the index of the source photo in ``names``. Crops are
    deterministic given ``seed`` (and a given photo's crops do not depend on which other photos are
    requested). Near-constant crops (e.g. black borders) are re-drawn a few times.
    """
    names = _check_names(names)
    xs, ys = [], []
    for label, name in enumerate(names):
        img = load_photo(name, photo_size=_short_side(patch_size, photo_size))
        h, w = img.shape[1:]
        if h < patch_size or w < patch_size:
            raise ValueError(f"patch_size {patch_size} larger than photo {name!r} ({h}x{w})")
        rng = np.random.default_rng([seed, _photo_index(name), 1])
        crops = [_crop(img, rng, [(0, 0)], (h, w), patch_size) for _ in range(per_image)]
        xs.append(torch.stack(crops))
        ys.append(torch.full((per_image,), label, dtype=torch.long))
    return torch.cat(xs).contiguous(), torch.cat(ys)


def photo_split_patches(
    names: Sequence[str] | None = None,
    *,
    patch_size: int = 32,
    train_per_image: int = 256,
    test_per_image: int = 64,
    test_fraction: float = 0.25,
    seed: int = 0,
    photo_size: int | None = 256,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Train/test patches for the ``photos`` classification dataset (label = photo index).

    Each photo is tiled into non-overlapping cells (``2 * patch_size`` wide when the photo has at
    least 4 of them, else ``patch_size``); a seeded random ``test_fraction`` of the cells is held
    out, and every crop lies entirely inside one cell, so train and test crops never share a pixel.
    """
    names = _check_names(names)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, name in enumerate(names):
        img = load_photo(name, photo_size=_short_side(patch_size, photo_size))
        h, w = img.shape[1:]
        cell = 2 * patch_size
        if (h // cell) * (w // cell) < 4:
            cell = patch_size
        grid = [(r * cell, c * cell) for r in range(h // cell) for c in range(w // cell)]
        if len(grid) < 2:
            raise ValueError(f"photo {name!r} ({h}x{w}) too small for patch_size {patch_size}")
        rng = np.random.default_rng([seed, _photo_index(name), 2])
        order = rng.permutation(len(grid))
        n_test = min(len(grid) - 1, max(1, round(test_fraction * len(grid))))
        test_cells = [grid[i] for i in sorted(order[:n_test])]
        train_cells = [grid[i] for i in sorted(order[n_test:])]
        for cells, n, xs, ys in (
            (train_cells, train_per_image, train_x, train_y),
            (test_cells, test_per_image, test_x, test_y),
        ):
            xs.append(torch.stack([_crop(img, rng, cells, (cell, cell), patch_size) for _ in range(n)]))
            ys.append(torch.full((n,), label, dtype=torch.long))
    return (
        (torch.cat(train_x).contiguous(), torch.cat(train_y)),
        (torch.cat(test_x).contiguous(), torch.cat(test_y)),
    )
