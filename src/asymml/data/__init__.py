"""Datasets for asymml: offline ``digits``, ``photos`` and ``synthetic``; CIFAR/ImageNet from disk.

See :func:`load_dataset` and :func:`load_photo_patches`.
"""

from .datasets import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSplit,
    ImageTensorDataset,
    default_data_dir,
    load_dataset,
)
from .photos import (
    PHOTOS,
    PRIVATE_PHOTOS,
    PUBLIC_PHOTOS,
    load_photo,
    load_photo_patches,
    photo_split_patches,
)

__all__ = [
    "DATASETS",
    "PHOTOS",
    "PRIVATE_PHOTOS",
    "PUBLIC_PHOTOS",
    "DatasetNotFoundError",
    "DatasetSplit",
    "ImageTensorDataset",
    "default_data_dir",
    "load_dataset",
    "load_photo",
    "load_photo_patches",
    "photo_split_patches",
]
