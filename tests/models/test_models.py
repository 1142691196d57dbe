"""Tests for asymml.models (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from asymml.models import MODELS, CifarResNet, get_model


def _inplace_free(model: nn.Module, gm: torch.fx.GraphModule) -> None:
    for m in model.modules():
        if getattr(m, "inplace", False):
            assert isinstance(m, nn.ReLU), f"in-place module {m}"
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            target = node.target if isinstance(node.target, str) else node.target.__name__
            assert not (target.endswith("_") and not target.startswith("_")), f"in-place op {node}"
            if node.op == "call_function" and node.target in (torch.relu, torch.nn.functional.relu):
                assert not node.kwargs.get("inplace", False)


@pytest.mark.parametrize("name", MODELS)
def test_cifar_model_forward_and_fx(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.allclose(gm(x), out, atol=1e-5)
    _inplace_free(model, gm)


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet20"])
def test_in_channels_1_and_small_images(name: str) -> None:
    model = get_model(name, num_classes=10, in_channels=1, image_size=16, width=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    torch.fx.symbolic_trace(model)


def test_vgg_skips_pools_below_1x1() -> None:
    model = get_model("vgg16", image_size=8, width=0.125)
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_width_multiplier() -> None:
    narrow = get_model("vgg11", width=0.5)
    full = get_model("vgg11")
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in full.parameters()) / 3
    assert narrow.classifier.in_features == 256


def test_resnet_structure() -> None:
    model = get_model("resnet56")
    assert isinstance(model, CifarResNet)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 9
    assert model.fc.in_features == 64
    # option B: projection shortcut where the shape changes
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)
    assert model.layer2[0].shortcut[0].kernel_size == (1, 1)


def test_deterministic_init_with_seed() -> None:
    torch.manual_seed(1)
    a = get_model("resnet20")
    torch.manual_seed(1)
    b = get_model("resnet20")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_torchvision_resnet18() -> None:
    model = get_model("resnet18", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    torch.fx.symbolic_trace(model)
    gray = get_model("resnet18", num_classes=5, in_channels=1).eval()
    assert gray.conv1.in_channels == 1 and gray.conv1.out_channels == 64
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_torchvision_prefix_and_other_models() -> None:
    import torchvision

    model = get_model("tv:vgg11", num_classes=3)
    assert isinstance(model, torchvision.models.VGG)
    mobile = get_model("mobilenet_v2", num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        assert mobile(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_unknown_model() -> None:
    with pytest.raises(ValueError) as info:
        get_model("not_a_model")
    msg = str(info.value)
    assert "resnet20" in msg and "vgg16_bn" in msg and "torchvision" in msg
