"""FLOP counting for the bench: ``FlopCounterMode`` with a group-aware convolution-backward formula.

``torch.utils.flop_counter``'s ``convolution_backward`` formula ignores ``groups`` in the weight-gradient
term, over-counting it ``groups`` times. asymml's trusted side runs per-sample folded convolutions as one
grouped convolution with ``groups = batch size`` (and depthwise convs have ``groups = channels``), so the
stock counter would inflate trusted FLOPs by up to the batch size. The bench counts with this fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..profiling import conv_backward_flop

aten = torch.ops.aten


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
