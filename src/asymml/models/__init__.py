"""Model zoo: CIFAR-style VGG/ResNet plus any torchvision classification model (random init).

``get_model`` never loads pretrained weights and never downloads anything.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .cifar import RESNET_DEPTHS, VGG, VGG_CONFIGS, BasicBlock, CifarResNet, cifar_resnet, vgg

__all__ = [
    "MODELS",
    "VGG",
    "BasicBlock",
    "CifarResNet",
    "get_model",
    "replace_first_conv",
    "torchvision_models",
]

_VGG_NAMES = tuple(n for base in VGG_CONFIGS for n in (base, f"{base}_bn"))
#: CIFAR-style model names built here (other names go to torchvision).
MODELS: tuple[str, ...] = _VGG_NAMES + tuple(RESNET_DEPTHS)

_TV_PREFIXES = ("torchvision:", "tv:")


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models (accepted by :func:`get_model`)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first ``nn.Conv2d`` of ``model`` for an equivalent one taking ``in_channels``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return model
            if m.groups != 1:
                raise ValueError(f"cannot change in_channels of grouped first conv {name!r}")
            new = nn.Conv2d(
                in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, bias=m.bias is not None, padding_mode=m.padding_mode,
            )
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return model
    raise ValueError("model has no nn.Conv2d to adapt to in_channels")


def get_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    **kw: Any,
) -> nn.Module:
    """Build model ``name`` with random weights.

    * :data:`MODELS` (``vgg11``..``vgg19``, ``*_bn``, ``resnet20/32/44/56/110``): CIFAR-style
      networks; ``width`` (float, default 1.0) scales every layer's channel count.
    * any other torchvision classification model name (e.g. ``resnet18``, ``mobilenet_v2``), built
      with ``torchvision.models.get_model(name, weights=None, num_classes=...)``; extra ``kw`` go to
      torchvision. Prefix ``tv:`` / ``torchvision:`` forces the torchvision model for a name that is
      also a CIFAR name (e.g. ``tv:vgg11``). If ``in_channels != 3`` the first conv is replaced.
      ``image_size`` is forwarded to ``vit_*`` models only.
    """
    key = name.strip()
    force_tv = key.lower().startswith(_TV_PREFIXES)
    if force_tv:
        key = key.split(":", 1)[1]
    low = key.lower()
    if not force_tv and low in MODELS:
        builder = cifar_resnet if low in RESNET_DEPTHS else vgg
        return builder(
            low, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kw
        )

    tv_names = torchvision_models()
    if low not in tv_names:
        raise ValueError(
            f"unknown model {name!r}; CIFAR-style models: {', '.join(MODELS)}; any torchvision "
            f"classification model name (e.g. resnet18, mobilenet_v2; see "
            f"torchvision.models.list_models()) is also accepted"
        )
    import torchvision

    if low.startswith("vit_"):
        kw.setdefault("image_size", image_size)
    model = torchvision.models.get_model(low, weights=None, num_classes=num_classes, **kw)
    if in_channels != 3:
        replace_first_conv(model, in_channels)
    return model
