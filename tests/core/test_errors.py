"""Bad input gets a clear error that names the problem, and nothing is left half-modified."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision

import asymml
from asymml.errors import ConfigError, InputError, UnsupportedOperationError, UntraceableModelError
from asymml.models import get_model


@pytest.fixture
def model() -> torch.nn.Module:
    return get_model("resnet20", num_classes=10)


@pytest.mark.parametrize("x,match", [
    (torch.randn(2, 1, 32, 32), "channels"),
    (torch.randn(3, 32, 32), "4-D"),
    (torch.randint(0, 255, (2, 3, 32, 32)), "floating"),
    (torch.randn(2, 3, 32, 32, dtype=torch.float64), "dtype"),
    (torch.full((2, 3, 32, 32), float("nan")), "NaN"),
    (torch.full((2, 3, 32, 32), float("inf")), "NaN or Inf"),
    ([1, 2, 3], "torch.Tensor"),
])
def test_bad_inputs(model, x, match: str) -> None:
    sm = asymml.split(model)
    with pytest.raises(InputError, match=match):
        sm(x)


@pytest.mark.parametrize("kw,match", [
    ({"rank": 0}, "positive integer"),
    ({"rank": -3}, "positive integer"),
    ({"rank": [2, 0]}, "positive integer"),
    ({"rank": "adaptive:1.5"}, "tau"),
    ({"rank": "bogus"}, "invalid rank"),
    ({"decomposition": "qr"}, "decomposition"),
    ({"backward": "full"}, "backward"),
    ({"mode": "gpu"}, "mode"),
    ({"basis": "global"}, "basis"),
    ({"iters": 0}, "iters"),
    ({"input_rank": 0}, "input_rank"),
    ({"noise": -1.0}, "sigma"),
    ({"mode": "plain", "noise": 1.0}, "no effect"),
])
def test_bad_config(model, kw, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        asymml.split(model, **kw)


class _Dynamic(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.conv(x)
        return -self.conv(x)


def test_untraceable_model_says_why() -> None:
    with pytest.raises(UntraceableModelError, match="torch.fx cannot trace _Dynamic.*control flow"):
        asymml.split(_Dynamic())


class _Weird(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.up = torch.nn.PixelShuffle(2)

    def forward(self, x):
        return self.up(self.conv(x))


def test_strict_mode_names_layer_and_path() -> None:
    with pytest.raises(UnsupportedOperationError, match="PixelShuffle at up"):
        asymml.split(_Weird(), strict=True)
    # non-strict: falls back to the trusted context (never silently to the accelerator)
    sm = asymml.split(_Weird(), audit=True)
    out = sm(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 1, 12, 12)
    report = asymml.validate(_Weird())
    assert [p.node for p in report.unknown] == ["up"]


def test_errors_leave_model_untouched(model) -> None:
    before = copy.deepcopy(model.state_dict())
    sm = asymml.split(model)
    with pytest.raises(InputError):
        sm(torch.full((2, 3, 32, 32), float("nan")))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_validator_lists_placement_and_fixes_inplace() -> None:
    m = torchvision.models.resnet18()
    rep = asymml.validate(m.eval())
    where = {p.node: p.where for p in rep.placements}
    assert where["conv1"] == "split" and where["bn1"] == "split" and where["relu"] == "trusted"
    assert "relu" in rep.inplace_modules
    asymml.fix(m)
    assert not any(getattr(x, "inplace", False) for x in m.modules())
    rep_train = asymml.validate(m.train())
    assert {p.node: p.where for p in rep_train.placements}["bn1"] == "trusted"
