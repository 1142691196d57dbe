"""Per-sample sensitivity (issue 9 item 2): couplings are refused with what to do, and measured empirically."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asymml
from asymml.errors import PrivacyConfigError
from asymml.privacy.attacks.common import SPLIT_EVERY_LAYER
from asymml.privacy.sensitivity import check_independent, coupling_layers, release_dependence


def _cnn(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.GroupNorm(2, c))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), norm(8),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(basis="batch"), "basis='sample'"),
    (dict(warm_start=True), "warm_start=False"),
    (dict(rank="adaptive:0.1"), "fixed rank"),
    (dict(clip="auto"), "fixed clip"),
    (dict(loss_reduction="mean"), "expected batch size"),
    (dict(public_random_start=True), "decomposition='eigh'"),
])
def test_each_coupling_is_refused_with_what_to_do(kwargs, match) -> None:
    with pytest.raises(PrivacyConfigError, match=match):
        check_independent(_cnn(False), **kwargs)


def test_train_mode_batchnorm_is_refused_and_fix_makes_it_pass() -> None:
    model = _cnn(True).train()
    with pytest.raises(PrivacyConfigError, match=r"asymml.fix\(model, privacy=True\)"):
        check_independent(model)
    assert [n for n, _ in coupling_layers(model)] == ["1", "4"]
    assert coupling_layers(model.eval()) == []  # eval BatchNorm is per-channel affine: no coupling
    check_independent(model, training=False)
    asymml.fix(model, privacy=True)
    check_independent(model.train(), basis="sample", warm_start=False, rank="schedule", clip=1.0, loss_reduction="sum")


def _dependence(model: nn.Module, remove: bool = False, **split_kw) -> float:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    state = copy.deepcopy(model.state_dict())

    def make():
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        return asymml.split(m, rank=2, audit=True, **SPLIT_EVERY_LAYER, **split_kw)

    return release_dependence(make, x, y, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="sum"), remove=remove)


def test_release_of_one_sample_does_not_depend_on_another() -> None:
    # catches a release that depends on another sample: train-mode BatchNorm and basis='batch' move other samples'
    # releases; the fixed configuration leaves them bit-for-bit unchanged
    assert _dependence(_cnn(False).train(), basis="sample", warm_start=False, decomposition="eigh") < 1e-5
    assert _dependence(_cnn(True).train(), basis="sample", warm_start=False, decomposition="eigh") > 1e-2
    assert _dependence(_cnn(False).train(), basis="batch", warm_start=False, decomposition="eigh") > 1e-2
    # removing a sample (Poisson adjacency) leaves the others' releases unchanged too (deterministic eigh)
    assert _dependence(_cnn(False).train(), remove=True, basis="sample", warm_start=False, decomposition="eigh") < 1e-5
    assert _dependence(_cnn(True).train(), remove=True, basis="sample", warm_start=False, decomposition="eigh") > 1e-2
