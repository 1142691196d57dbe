"""Dataset loaders: offline ``digits``/``photos``/``synthetic`` and torchvision CIFAR/ImageNet.

Nothing is downloaded unless ``download=True`` is passed explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..errors import DatasetNotFoundError
from .photos import photo_split_patches

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSplit",
    "ImageTensorDataset",
    "default_data_dir",
    "load_dataset",
]

#: Names accepted by :func:`load_dataset`.
DATASETS: tuple[str, ...] = ("digits", "photos", "synthetic", "cifar10", "cifar100", "imagenet")

_CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_TEACHER_FEATURES = 16
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class DatasetSplit:
    """A train/test pair plus the metadata needed to build a matching model.

    ``mean``/``std`` are the per-channel normalisation constants already applied to the images
    (``None`` when the images are not normalised, e.g. ``photos`` in ``[0, 1]``).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


class ImageTensorDataset(TensorDataset):
    """In-memory ``(images, labels)`` dataset yielding ``(float32 C×H×W tensor, int)``.

    ``.tensors`` holds the full ``(N, C, H, W)`` images and ``(N,)`` int64 labels for fast batched use.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__(images.float().contiguous(), labels.long().contiguous())

    @property
    def images(self) -> Tensor:
        return self.tensors[0]

    @property
    def targets(self) -> Tensor:
        return self.tensors[1]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # type: ignore[override]
        return self.tensors[0][index], int(self.tensors[1][index])


def default_data_dir() -> Path:
    """Root for on-disk datasets: ``$ASYMML_DATA`` or ``~/.cache/asymml/data``."""
    env = os.environ.get("ASYMML_DATA")
    return Path(env).expanduser() if env else Path("~/.cache/asymml/data").expanduser()


# --------------------------------------------------------------------------- offline datasets


def _load_digits(
    image_size: int | None, seed: int, *, test_size: float = 0.25, normalize: bool = True
) -> DatasetSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    size = 32 if image_size is None else int(image_size)
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).div_(16.0)[:, None]  # (N,1,8,8) in [0,1]
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y.numpy())
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    x_tr, x_te = x[tr], x[te]
    mean = std = None
    if normalize:
        m, s = float(x_tr.mean()), float(x_tr.std())
        x_tr, x_te = (x_tr - m) / s, (x_te - m) / s
        mean, std = (m,), (s,)
    return DatasetSplit(
        "digits", ImageTensorDataset(x_tr, y[tr]), ImageTensorDataset(x_te, y[te]),
        num_classes=10, in_channels=1, image_size=size, mean=mean, std=std,
    )


def _load_photos(
    image_size: int | None,
    seed: int,
    *,
    names: Sequence[str] | None = None,
    train_per_image: int = 256,
    test_per_image: int = 64,
    test_fraction: float = 0.25,
    photo_size: int | None = 256,
) -> DatasetSplit:
    from .photos import PHOTOS

    size = 32 if image_size is None else int(image_size)
    names = PHOTOS if names is None else tuple(names)
    (x_tr, y_tr), (x_te, y_te) = photo_split_patches(
        names, patch_size=size, train_per_image=train_per_image, test_per_image=test_per_image,
        test_fraction=test_fraction, seed=seed, photo_size=photo_size,
    )
    return DatasetSplit(
        "photos", ImageTensorDataset(x_tr, y_tr), ImageTensorDataset(x_te, y_te),
        num_classes=len(names), in_channels=3, image_size=size,
    )


def _load_synthetic(
    image_size: int | None,
    seed: int,
    *,
    num_classes: int = 10,
    n_train: int = 512,
    n_test: int = 128,
    channels: int = 3,
) -> DatasetSplit:
    """Gaussian random images labelled by a fixed random linear teacher.

    Each image is a smooth Gaussian field (standard normal noise at 1/4 resolution, bilinearly
    upsampled) plus white Gaussian noise, scaled to roughly unit variance per pixel. The label is
    the argmax of a fixed random linear map applied to fixed random translation-invariant features
    (3×3 conv with 16 random filters → ReLU → global average pool, standardised), i.e. a tiny
    random CNN teacher that the models here can represent exactly. The teacher's biases are tuned
    (a fixed, deterministic procedure) so that the classes are roughly balanced.
    """
    size = 32 if image_size is None else int(image_size)
    g = torch.Generator().manual_seed(int(seed))
    n = n_train + n_test
    low = max(1, size // 4)
    smooth = torch.randn(n, channels, low, low, generator=g)
    smooth = F.interpolate(smooth, size=(size, size), mode="bilinear", align_corners=False)
    smooth = smooth / smooth.std().clamp_min(1e-8)
    x = (smooth + 0.5 * torch.randn(n, channels, size, size, generator=g)) / (1.25**0.5)
    filters = torch.randn(_TEACHER_FEATURES, channels, 3, 3, generator=g) / (9 * channels) ** 0.5
    w = torch.randn(_TEACHER_FEATURES, num_classes, generator=g)
    feats = F.adaptive_avg_pool2d(F.relu(F.conv2d(x, filters, padding=1)), 1).flatten(1)
    feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-8)
    logits = feats @ w
    bias, best, best_err = torch.zeros(num_classes), torch.zeros(num_classes), float("inf")
    for it in range(300):  # balance the classes: raise the bias of rare ones (decaying steps)
        freq = torch.bincount((logits + bias).argmax(1), minlength=num_classes).float() / n
        err = float((freq - 1.0 / num_classes).abs().sum())
        if err < best_err:
            best, best_err = bias.clone(), err
        bias += (0.5 / (1.0 + it / 10)) * torch.log((1.0 / num_classes + 1e-3) / (freq + 1e-3))
    bias = best
    y = (logits + bias).argmax(1)
    return DatasetSplit(
        "synthetic",
        ImageTensorDataset(x[:n_train], y[:n_train]),
        ImageTensorDataset(x[n_train:], y[n_train:]),
        num_classes=num_classes, in_channels=channels, image_size=size,
    )


# --------------------------------------------------------------------------- torchvision datasets


def _not_found(
    name: str, searched: Sequence[Path], what: str, *, can_download: bool = True
) -> DatasetNotFoundError:
    paths = ", ".join(str(p) for p in searched)
    hint = (
        " or pass --download (download=True) to fetch them"
        if can_download
        else " (it cannot be downloaded automatically)"
    )
    return DatasetNotFoundError(
        f"{name} not found: looked for {what} in {paths}. Put the files there or point to them "
        f"with --data-dir / data_dir=... (or the ASYMML_DATA environment variable),{hint}."
    )


def _load_cifar(
    name: str,
    data_dir: str | None,
    image_size: int | None,
    download: bool,
    *,
    augment: bool = True,
) -> DatasetSplit:
    from torchvision import datasets
    from torchvision import transforms as T

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    candidates = [root, root / name]
    found = next((c for c in candidates if (c / cls.base_folder).is_dir()), None)
    if found is None and not download:
        raise _not_found(name, candidates, f"'{cls.base_folder}/'")
    if found is None:
        root.mkdir(parents=True, exist_ok=True)
        found = root

    size = 32 if image_size is None else int(image_size)
    mean, std = _CIFAR_STATS[name]
    resize: list[Callable[..., Any]] = [T.Resize(size, antialias=True)] if size != 32 else []
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    aug: list[Callable[..., Any]] = (
        [T.RandomCrop(size, padding=4 * size // 32), T.RandomHorizontalFlip()] if augment else []
    )
    train_tf = T.Compose(resize + aug + norm)
    test_tf = T.Compose(resize + norm)
    try:
        train = cls(str(found), train=True, transform=train_tf, download=download)
        test = cls(str(found), train=False, transform=test_tf, download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise _not_found(name, candidates, f"intact '{cls.base_folder}/' ({e})") from e
    return DatasetSplit(
        name, train, test, num_classes=100 if name == "cifar100" else 10, in_channels=3,
        image_size=size, mean=mean, std=std,
    )


def _load_imagenet(
    data_dir: str | None, image_size: int | None, download: bool, *, augment: bool = True
) -> DatasetSplit:
    from torchvision import datasets
    from torchvision import transforms as T

    if download:
        raise ValueError("ImageNet cannot be downloaded automatically; put train/ and val/ in data_dir")
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir() / "imagenet"
    candidates = [root] if data_dir is None else [root, root / "imagenet"]
    found = next((c for c in candidates if (c / "train").is_dir() and (c / "val").is_dir()), None)
    if found is None:
        raise _not_found(
            "imagenet", candidates, "'train/' and 'val/' ImageFolder directories", can_download=False
        )

    size = 224 if image_size is None else int(image_size)
    mean, std = _IMAGENET_STATS
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if augment:
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
    else:
        train_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    test_tf = T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size), *norm])
    train = datasets.ImageFolder(str(found / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(found / "val"), transform=test_tf)
    return DatasetSplit(
        "imagenet", train, test, num_classes=len(train.classes), in_channels=3, image_size=size,
        mean=mean, std=std,
    )


# --------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    seed: int = 0,
    **kw: Any,
) -> DatasetSplit:
    """Load dataset ``name`` (one of :data:`DATASETS`) as a :class:`DatasetSplit`.

    Items are ``(float32 C×H×W tensor, int label)``. ``digits``, ``photos`` and ``synthetic`` are
    built in memory and fully determined by ``seed``; ``cifar10``/``cifar100``/``imagenet`` read
    torchvision-format files under ``data_dir`` (default :func:`default_data_dir`) and raise
    :class:`DatasetNotFoundError` when missing unless ``download=True`` (CIFAR only). Their train
    augmentation (random crop + flip, ``augment=False`` to disable) uses torch's global RNG.

    Extra keyword arguments by dataset:

    * ``digits``: ``test_size`` (0.25), ``normalize`` (True; mean/std of the train split).
    * ``photos``: ``names`` (photo subset, label = index), ``train_per_image`` (256),
      ``test_per_image`` (64), ``test_fraction`` (0.25), ``photo_size`` (256). Values in ``[0, 1]``,
      not normalised.
    * ``synthetic``: ``num_classes`` (10), ``n_train`` (512), ``n_test`` (128), ``channels`` (3).
    * ``cifar10``/``cifar100``/``imagenet``: ``augment`` (True).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "digits":
        return _load_digits(image_size, seed, **kw)
    if key == "photos":
        return _load_photos(image_size, seed, **kw)
    if key == "synthetic":
        return _load_synthetic(image_size, seed, **kw)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir, image_size, download, **kw)
    if key == "imagenet":
        return _load_imagenet(data_dir, image_size, download, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
