"""The rule registry (keyed by what torch.fx sees: module types, functions, method names), like Opacus'
``register_grad_sampler``, and the lists of ops known to run in the trusted context on purpose."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Bound, SplitRule

REGISTRY_MODULES: dict[type, SplitRule] = {}
REGISTRY_FUNCTIONS: dict[Any, SplitRule] = {}
REGISTRY_METHODS: dict[str, SplitRule] = {}


def register_split_rule(*targets: Any) -> Callable[[type[SplitRule]], type[SplitRule]]:
    """Register a rule class for module types, functions, or method names (strings).

    Every registered target is checked alone against its unsplit op by ``tests/core/test_rules.py``;
    a rule without a test-case generator there fails that suite until one is added.
    """

    def deco(cls: type[SplitRule]) -> type[SplitRule]:
        inst = cls()
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                REGISTRY_MODULES[t] = inst
            elif isinstance(t, str):
                REGISTRY_METHODS[t] = inst
            else:
                REGISTRY_FUNCTIONS[t] = inst
        return cls

    return deco


def registered_rules() -> Iterator[tuple[str, Any, SplitRule]]:
    """Every registry entry as ``(kind, target, rule)``, kind being the fx node op that reaches it
    (``call_module``, ``call_function`` or ``call_method``)."""
    for kind, reg in (("call_module", REGISTRY_MODULES), ("call_function", REGISTRY_FUNCTIONS),
                      ("call_method", REGISTRY_METHODS)):
        for target, rule in reg.items():
            yield kind, target, rule


# ------------------------------------------------------- ops known to run in the trusted context
# Ops with no split rule that strict mode accepts: non-linear ops (activations, max-pool, train-mode
# normalisation, softmax), shape queries and layout ops that may mix samples. They run trusted on purpose.
# Ops that *do* have a rule (BatchNorm, ``mul``, ``view``, ...) are not listed: when their rule declines
# a node (train-mode BN, a product of two activations, a batch-mixing reshape) the node is still known
# and runs trusted; the registry alone decides that.

KNOWN_TRUSTED_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.ELU, nn.Mish, nn.Hardtanh, nn.PReLU, nn.MaxPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d,
    nn.Softmax, nn.LogSoftmax, nn.Identity, nn.LayerNorm, nn.GroupNorm,
)
KNOWN_TRUSTED_FUNCTIONS: tuple[Any, ...] = (
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid, torch.sigmoid, torch.tanh,
    torch.relu, F.max_pool2d, F.adaptive_max_pool2d, F.dropout, F.softmax, F.log_softmax, torch.softmax,
    operator.getitem, getattr, torch.cat, F.batch_norm, F.layer_norm,
)
KNOWN_TRUSTED_METHODS: tuple[str, ...] = (
    "relu", "relu_", "sigmoid", "tanh", "softmax", "size", "dim", "contiguous", "mul_", "clamp", "chunk",
    "split", "transpose", "permute",
)
INPLACE_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.ELU, nn.Hardtanh, nn.Mish,
    nn.Dropout, nn.Dropout2d,
)


def _rule_for(node: Any, module: nn.Module | None) -> tuple[SplitRule | None, bool]:
    """The registered rule of ``node`` (or ``None``) and whether the op is known at all."""
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in REGISTRY_MODULES:
                return REGISTRY_MODULES[cls], True
        return None, isinstance(module, KNOWN_TRUSTED_MODULES)
    if node.op == "call_function":
        rule = REGISTRY_FUNCTIONS.get(node.target)
        return rule, rule is not None or node.target in KNOWN_TRUSTED_FUNCTIONS
    if node.op == "call_method":
        rule = REGISTRY_METHODS.get(node.target)
        return rule, rule is not None or node.target in KNOWN_TRUSTED_METHODS
    return None, True


def lookup(node: Any, module: nn.Module | None) -> tuple[Bound | None, bool]:
    """Resolve a node to a bound rule. Returns ``(bound or None, known)``; ``known`` is False for ops
    that neither have a rule nor are known to run trusted (strict mode refuses those).

    Only "no rule" and a rule declining the node (``bind`` returning ``None``) are silent; an exception
    raised by ``bind`` is a bug in the rule and propagates, with a note naming the rule and the node.
    """
    rule, known = _rule_for(node, module)
    if rule is None:
        return None, known
    try:
        return rule.bind(node, module), True
    except Exception as e:
        if hasattr(e, "add_note"):  # Python ≥ 3.11
            e.add_note(f"raised by {type(rule).__name__}.bind for fx node {node.format_node()}")
        raise
