"""FLOP counting for the bench: ``FlopCounterMode`` with a group-aware convolution-backward formula.

``torch.utils.flop_counter``'s ``convolution_backward`` formula ignores ``groups`` in the weight-gradient
term, over-counting it ``groups`` times. asymml's trusted side runs per-sample folded convolutions as one
grouped convolution with ``groups = batch size`` (and depthwise convs have ``groups = channels``), so the
stock counter would inflate trusted FLOPs by up to the batch size. The bench counts with this fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

aten = torch.ops.aten


def _t(shape: Any) -> list[int]:
    return [shape[1], shape[0], *shape[2:]]


def conv_backward_flop(grad_out_shape: Any, x_shape: Any, w_shape: Any, _bias: Any, _stride: Any,
                       _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, groups: int,
                       output_mask: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward`` (grad input + grad weight), correct for ``groups > 1``."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        gw = out_shape[1]
        if transposed:
            n = conv_flop_count(_t(grad_out_shape), _t(x_shape), _t(gw), transposed=False)
        else:
            n = conv_flop_count(_t(x_shape), _t(grad_out_shape), _t(gw), transposed=False)
        flops += n // max(1, int(groups))
    return flops


CUSTOM_FORMULAS = {aten.convolution_backward: conv_backward_flop}


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (no display) using :data:`CUSTOM_FORMULAS`."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM_FORMULAS)


@contextmanager
def group_aware_registry() -> Iterator[None]:
    """Temporarily install :data:`CUSTOM_FORMULAS` in torch's global FLOP registry, so that counters created
    elsewhere (the executor's, on the accelerator side) count grouped convolutions right too."""
    from torch.utils import flop_counter as fcm

    saved = {k: fcm.flop_registry.get(k) for k in CUSTOM_FORMULAS}
    fcm.flop_registry.update({k: fcm.shape_wrapper(v) for k, v in CUSTOM_FORMULAS.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                fcm.flop_registry.pop(k, None)
            else:
                fcm.flop_registry[k] = v
