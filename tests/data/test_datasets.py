"""Tests for asymml.data (all offline, CPU)."""

from __future__ import annotations

import socket

import pytest
import torch
from torch.utils.data import DataLoader

from asymml.data import (
    DATASETS,
    PHOTOS,
    PRIVATE_PHOTOS,
    PUBLIC_PHOTOS,
    DatasetNotFoundError,
    DatasetSplit,
    load_dataset,
    load_photo,
    load_photo_patches,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _all(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(DataLoader(ds, batch_size=len(ds))))  # type: ignore[arg-type]
    return x, y


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_and_items(no_network: None) -> None:
    split = load_dataset("digits")
    assert isinstance(split, DatasetSplit)
    assert (split.name, split.num_classes, split.in_channels, split.image_size) == ("digits", 10, 1, 32)
    assert len(split.train) + len(split.test) == 1797
    assert len(split.test) == pytest.approx(0.25 * 1797, abs=1)
    x, y = split.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert isinstance(y, int) and 0 <= y < 10
    xb, yb = next(iter(DataLoader(split.train, batch_size=8)))
    assert xb.shape == (8, 1, 32, 32) and yb.dtype == torch.int64


def test_digits_normalised_with_train_stats() -> None:
    split = load_dataset("digits", image_size=16)
    x_tr, _ = _all(split.train)
    assert x_tr.shape[1:] == (1, 16, 16)
    assert float(x_tr.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x_tr.std()) == pytest.approx(1.0, abs=1e-3)
    assert split.mean is not None and split.std is not None
    assert 0.0 < split.mean[0] < 1.0


def test_digits_stratified() -> None:
    split = load_dataset("digits")
    _, y_tr = _all(split.train)
    _, y_te = _all(split.test)
    total = torch.bincount(torch.cat([y_tr, y_te]), minlength=10).float()
    expected = total * len(y_te) / (len(y_tr) + len(y_te))
    assert torch.all((torch.bincount(y_te, minlength=10).float() - expected).abs() <= 1.0)


def test_digits_deterministic_given_seed() -> None:
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert torch.equal(_all(a.train)[0], _all(b.train)[0])
    assert torch.equal(_all(a.test)[1], _all(b.test)[1])
    assert not torch.equal(_all(a.test)[0], _all(c.test)[0])


# ----------------------------------------------------------------------------- photos


def test_photo_sets_disjoint_and_complete() -> None:
    assert set(PUBLIC_PHOTOS).isdisjoint(PRIVATE_PHOTOS)
    assert len(PUBLIC_PHOTOS) >= 2 and len(PRIVATE_PHOTOS) >= 2
    assert set(PUBLIC_PHOTOS) | set(PRIVATE_PHOTOS) == set(PHOTOS)


@pytest.mark.parametrize("name", PHOTOS)
def test_each_photo_loads_offline(name: str, no_network: None) -> None:
    img = load_photo(name)
    assert img.ndim == 3 and img.shape[0] == 3 and min(img.shape[1:]) == 256
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert float(img.std()) > 0.02


def test_load_photo_patches_shapes_and_determinism(no_network: None) -> None:
    x, y = load_photo_patches(PUBLIC_PHOTOS, patch_size=16, per_image=8, seed=3)
    assert x.shape == (8 * len(PUBLIC_PHOTOS), 3, 16, 16) and x.dtype == torch.float32
    assert y.tolist() == [i for i in range(len(PUBLIC_PHOTOS)) for _ in range(8)]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    x2, y2 = load_photo_patches(PUBLIC_PHOTOS, patch_size=16, per_image=8, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = load_photo_patches(PUBLIC_PHOTOS, patch_size=16, per_image=8, seed=4)
    assert not torch.equal(x, x3)


def test_public_and_private_patches_differ() -> None:
    xp, _ = load_photo_patches(PUBLIC_PHOTOS, per_image=4)
    xq, yq = load_photo_patches(PRIVATE_PHOTOS, per_image=4)
    assert xq.shape[0] == 4 * len(PRIVATE_PHOTOS) and int(yq.max()) == len(PRIVATE_PHOTOS) - 1
    assert not any(torch.equal(a, b) for a in xp for b in xq)


def test_photos_dataset(no_network: None) -> None:
    split = load_dataset("photos", train_per_image=16, test_per_image=4, seed=0)
    assert (split.num_classes, split.in_channels, split.image_size) == (len(PHOTOS), 3, 32)
    assert split.mean is None  # photos are not normalised
    x_tr, y_tr = _all(split.train)
    x_te, y_te = _all(split.test)
    assert x_tr.shape == (16 * len(PHOTOS), 3, 32, 32) and x_te.shape == (4 * len(PHOTOS), 3, 32, 32)
    assert torch.equal(torch.bincount(y_tr), torch.full((len(PHOTOS),), 16))
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0
    # train and test crops come from disjoint cells: no test crop equals a train crop
    flat_tr = x_tr.flatten(1)
    for xt in x_te.flatten(1):
        assert not torch.any(torch.all(flat_tr == xt, dim=1))
    again = load_dataset("photos", train_per_image=16, test_per_image=4, seed=0)
    assert torch.equal(_all(again.test)[0], x_te)


def test_photos_subset_labels() -> None:
    split = load_dataset("photos", names=PRIVATE_PHOTOS, image_size=16, train_per_image=4, test_per_image=2)
    assert split.num_classes == len(PRIVATE_PHOTOS)
    x, y = split.train[0]
    assert x.shape == (3, 16, 16) and y == 0


# ----------------------------------------------------------------------------- synthetic


def test_synthetic() -> None:
    split = load_dataset("synthetic", num_classes=5, n_train=100, n_test=20, channels=1, image_size=16)
    assert (split.num_classes, split.in_channels, split.image_size) == (5, 1, 16)
    x, y = _all(split.train)
    assert x.shape == (100, 1, 16, 16) and len(split.test) == 20
    assert set(y.tolist()) == set(range(5))
    default = load_dataset("synthetic")
    assert len(default.train) == 512 and len(default.test) == 128 and default.train[0][0].shape == (3, 32, 32)
    same = load_dataset("synthetic")
    assert torch.equal(_all(default.train)[0], _all(same.train)[0])
    assert torch.equal(_all(default.test)[1], _all(same.test)[1])
    other = load_dataset("synthetic", seed=1)
    assert not torch.equal(_all(default.train)[0], _all(other.train)[0])


# ----------------------------------------------------------------------------- on-disk datasets


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_raises(name: str, tmp_path, no_network: None) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, data_dir=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path) in msg and "--download" in msg
    assert isinstance(info.value, FileNotFoundError)
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing downloaded


def test_corrupt_cifar_raises(tmp_path, no_network: None) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_default_data_dir_from_env(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASYMML_DATA", str(tmp_path / "root"))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "root")):
        load_dataset("cifar10")


def test_missing_imagenet_raises(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path)):
        load_dataset("imagenet", data_dir=str(tmp_path))


def test_imagenet_imagefolder(tmp_path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 30), color=(10, 200, 30)).save(d / "0.png")
    ds = load_dataset("imagenet", data_dir=str(tmp_path), image_size=24)
    assert ds.num_classes == 2 and ds.image_size == 24
    x, y = ds.test[0]
    assert x.shape == (3, 24, 24) and y == 0
    assert ds.train[1][0].shape == (3, 24, 24)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError) as info:
        load_dataset("mnist-ish")
    for name in DATASETS:
        assert name in str(info.value)
