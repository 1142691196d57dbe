"""Split rules: how each linear op runs on a (trusted part, residual) pair.

A registry keyed by what torch.fx sees (module types, functions, method names), like Opacus'
``register_grad_sampler``; one module per op family:

* :mod:`.base` — trusted parts (``None`` / :class:`Low` / dense), :class:`Bound`, the :class:`SplitRule`
  contract and :class:`WeightedRule` (the weight/bias behaviour of layers with a weight);
* :mod:`.registry` — :func:`register_split_rule`, :func:`lookup`, and the ops known to run trusted;
* :mod:`.conv_linear` — Conv2d and Linear; :mod:`.norm` — eval-mode BatchNorm;
  :mod:`.pooling` — average pools and spatial means; :mod:`.shape` — flatten/view/reshape;
  :mod:`.arithmetic` — sums of activations and scaling by constants.

Ops that are not linear have no rule and run in the trusted context; the ``KNOWN_TRUSTED_*`` lists name
the ones that do so on purpose, so that strict mode can tell them apart from unknown ops.
"""

from __future__ import annotations

from .arithmetic import AddRule, ScalarMulRule
from .base import Bound, Low, SplitRule, TPart, WeightedRule, call_args, const_args, dense, tadd
from .conv_linear import Conv2dRule, LinearRule
from .norm import BatchNormEvalRule
from .pooling import AdaptiveAvgPoolRule, AvgPoolRule, MeanRule
from .registry import (
    INPLACE_MODULES,
    KNOWN_TRUSTED_FUNCTIONS,
    KNOWN_TRUSTED_METHODS,
    KNOWN_TRUSTED_MODULES,
    REGISTRY_FUNCTIONS,
    REGISTRY_METHODS,
    REGISTRY_MODULES,
    lookup,
    register_split_rule,
    registered_rules,
)
from .shape import FlattenRule, ReshapeRule

__all__ = [
    "AddRule", "AdaptiveAvgPoolRule", "AvgPoolRule", "BatchNormEvalRule", "Bound", "Conv2dRule", "FlattenRule",
    "INPLACE_MODULES", "KNOWN_TRUSTED_FUNCTIONS", "KNOWN_TRUSTED_METHODS", "KNOWN_TRUSTED_MODULES", "LinearRule",
    "Low", "MeanRule", "REGISTRY_FUNCTIONS", "REGISTRY_METHODS", "REGISTRY_MODULES", "ReshapeRule", "ScalarMulRule",
    "SplitRule", "TPart", "WeightedRule", "call_args", "const_args", "dense", "lookup", "register_split_rule",
    "registered_rules", "tadd",
]
