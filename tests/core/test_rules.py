"""Per-rule harness (like Opacus' per-layer grad-sampler tests): every registered split rule, alone.

For every entry of the rule registry (module type, function or method name) a generator below builds
tiny models around the op and the harness runs them through ``asymml.split`` (noise off) in float64,
comparing the forward output, the input gradient and every parameter gradient to the unsplit model,
over seeded random shapes, both backward modes and both bases. Registering a rule is enough to get it
tested; a rule with no generator here fails :func:`test_rule_matches_unsplit_op` with a message saying
how to add one.

Each model places the op where the runtime feeds it every kind of trusted part:

* ``f(x)``, with ``x`` decomposed (it also feeds a convolution in the same region): a low-rank input;
* ``f(conv(x))``: a dense trusted input plus an accelerator residual;
* ``f(conv2(x))`` as a model output of its own: in protected backward its output gradient is decomposed,
  so ``input_grad``/``param_grads`` receive low-rank gradient parts.
"""

from __future__ import annotations

import copy
import operator
import random
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import asymml
from asymml.rules import (
    KNOWN_TRUSTED_FUNCTIONS,
    KNOWN_TRUSTED_METHODS,
    KNOWN_TRUSTED_MODULES,
    AdaptiveAvgPoolRule,
    AddRule,
    AvgPoolRule,
    BatchNormEvalRule,
    Conv2dRule,
    FlattenRule,
    LinearRule,
    MeanRule,
    ReshapeRule,
    ScalarMulRule,
    SplitRule,
    lookup,
    registered_rules,
)

TOL = 1e-9
SHAPES_PER_TARGET = 2
#: more shapes where the rule has cost-model branches (fold into the weights or not, on either side)
SHAPES_FOR: dict[str, int] = {"Conv2dRule": 8}
BATCH = 3


@dataclass
class Case:
    """One tiny model around the op under test."""

    model: nn.Module
    shape: tuple[int, int, int, int]  # input (B, C, H, W)
    rank: int
    #: the fx target the op is traced as, when fx normalises the registered one (``x.__add__(y)`` and
    #: ``operator.iadd`` trace as ``operator.add``); their binding is then checked on a hand-built node
    traced_as: Any = None


Generator = Callable[[Any, random.Random], Case]
GENERATORS: dict[type[SplitRule], Generator] = {}


def cases_for(*rule_classes: type[SplitRule]) -> Callable[[Generator], Generator]:
    """Register ``gen(target, rng) -> Case`` as the test-case generator of ``rule_classes``."""

    def deco(gen: Generator) -> Generator:
        for cls in rule_classes:
            GENERATORS[cls] = gen
        return gen

    return deco


class _Unary(nn.Module):
    """``(f(x) + f(same(x)), f(same2(x)))`` for an op ``f(mods, t)`` that uses the modules ``mods``."""

    def __init__(self, f: Callable[[nn.ModuleDict, Any], Any], mods: dict[str, nn.Module], channels: int) -> None:
        super().__init__()
        self.f = f
        self.mods = nn.ModuleDict(mods)
        self.same = nn.Conv2d(channels, channels, 3, padding=1)
        self.same2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        f, m = self.f, self.mods
        return f(m, x) + f(m, self.same(x)), f(m, self.same2(x))


def _shape(rng: random.Random, cmin: int = 3, cmax: int = 6, smin: int = 4, smax: int = 8) -> tuple[int, ...]:
    return (BATCH, rng.randint(cmin, cmax), rng.randint(smin, smax), rng.randint(smin, smax))


def _unary(f: Callable, mods: dict[str, nn.Module], shape: tuple[int, ...], rng: random.Random, **kw: Any) -> Case:
    return Case(_Unary(f, mods, shape[1]), shape, rng.randint(1, min(shape[1], shape[2] * shape[3]) - 1), **kw)


def _randomise(module: nn.Module, rng: random.Random) -> nn.Module:
    """Non-trivial parameters and running statistics (seeded)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "var" in _name(module, t) else
                        torch.randn(t.shape, generator=g))
    return module


def _name(module: nn.Module, t: torch.Tensor) -> str:
    return next((n for n, b in module.named_buffers() if b is t), "")


# ------------------------------------------------------------------------------- conv and linear


@cases_for(Conv2dRule)
def _conv(target: Any, rng: random.Random) -> Case:
    B, C, H, W = _shape(rng, cmin=3, cmax=8, smin=6, smax=9)
    if rng.random() < 0.4:  # the common VGG/ResNet layer (stride 1, "same" padding, ungrouped), low rank
        k = rng.choice([1, 3])
        conv = nn.Conv2d(C, rng.randint(6, 10), k, padding=k // 2, bias=rng.random() < 0.5)
        return Case(_Unary(lambda m, t: m["op"](t), {"op": conv}, C), (B, C, H, W), rng.randint(1, 2))
    groups = rng.choice([g for g in (1, 1, 2, 3, C) if C % g == 0])
    out = groups * rng.randint(1, 8 // groups + 1)
    k = rng.choice([1, 2, 3, 3, (3, 1), (1, 2)])
    stride = rng.choice([1, 1, 2, (2, 1)])
    dilation = rng.choice([1, 1, 2])
    padding = rng.choice([0, 1, 2, (1, 0)])
    conv = nn.Conv2d(C, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     bias=rng.random() < 0.7)
    return _unary(lambda m, t: m["op"](t), {"op": conv}, (B, C, H, W), rng)


@cases_for(LinearRule)
def _linear(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng)
    fc = nn.Linear(shape[3], rng.randint(2, 6), bias=rng.random() < 0.7)
    return _unary(lambda m, t: m["op"](t), {"op": fc}, shape, rng)


# --------------------------------------------------------------------------------- normalisation


@cases_for(BatchNormEvalRule)
def _batchnorm(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng)
    affine = rng.random() < 0.7
    bn = _randomise(target(shape[1], affine=affine, eps=rng.choice([1e-5, 1e-3])), rng)
    if target is nn.BatchNorm1d:  # (B, C, L)
        case = _unary(lambda m, t: m["op"](t.flatten(2)), {"op": bn}, shape, rng)
    else:
        case = _unary(lambda m, t: m["op"](t), {"op": bn}, shape, rng)
    case.model.eval()  # train-mode BatchNorm is not linear: it runs trusted
    return case


# ------------------------------------------------------------------------------------- pooling


@cases_for(AvgPoolRule)
def _avg_pool(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng, smin=5, smax=9)
    k = rng.choice([2, 3, (2, 3)])
    stride = rng.choice([None, 1, 2])
    pad = rng.choice([0, 1])
    ceil, incl = rng.random() < 0.5, rng.random() < 0.5
    if target is nn.AvgPool2d:
        pool = nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=incl)
        return _unary(lambda m, t: m["op"](t), {"op": pool}, shape, rng)
    return _unary(lambda m, t: F.avg_pool2d(t, k, stride, pad, ceil, count_include_pad=incl), {}, shape, rng)


@cases_for(AdaptiveAvgPoolRule)
def _adaptive_pool(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng)
    size = rng.choice([1, 2, (2, 3), (3, 1)])
    if target is nn.AdaptiveAvgPool2d:
        return _unary(lambda m, t: m["op"](t), {"op": nn.AdaptiveAvgPool2d(size)}, shape, rng)
    return _unary(lambda m, t: F.adaptive_avg_pool2d(t, size), {}, shape, rng)


@cases_for(MeanRule)
def _mean(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng)
    dim = rng.choice([[2, 3], (2, 3), 3, -1, [1, 3]])
    keep = rng.random() < 0.5
    if target == "mean":
        return _unary(lambda m, t: t.mean(dim, keep), {}, shape, rng)
    return _unary(lambda m, t: torch.mean(t, dim=dim, keepdim=keep), {}, shape, rng)


# ------------------------------------------------------------------------------------ shape ops


@cases_for(FlattenRule)
def _flatten(target: Any, rng: random.Random) -> Case:
    shape = _shape(rng)
    start = rng.choice([1, 2])
    if target is nn.Flatten:
        return _unary(lambda m, t: m["op"](t), {"op": nn.Flatten(start)}, shape, rng)
    if target == "flatten":
        return _unary(lambda m, t: t.flatten(start), {}, shape, rng)
    return _unary(lambda m, t: torch.flatten(t, start), {}, shape, rng)


@cases_for(ReshapeRule)
def _reshape(target: Any, rng: random.Random) -> Case:
    B, C, H, W = shape = _shape(rng)
    new = rng.choice([(-1, C * H * W), (B, C, H * W), (B, C * H, W), (-1, H, C, W)])
    if target == "view":
        return _unary(lambda m, t: t.view(*new), {}, shape, rng)
    if target == "reshape":
        return _unary(lambda m, t: t.reshape(new), {}, shape, rng)
    return _unary(lambda m, t: torch.reshape(t, new), {}, shape, rng)


# ------------------------------------------------------------------------------------ arithmetic

_ADD: dict[Any, Callable[[Any, Any], Any]] = {
    operator.add: lambda a, b: a + b,
    operator.iadd: operator.iadd,  # traces as operator.add
    torch.add: torch.add,
    "add": lambda a, b: a.add(b),
    "add_": lambda a, b: a.add_(b),
    "__add__": lambda a, b: a.__add__(b),  # traces as operator.add
    "__iadd__": lambda a, b: a.__iadd__(b),
}


class _Add(nn.Module):
    """A residual sum (conv output + the decomposed input), a sum with a value the accelerator never
    held (a trusted ReLU), and a broadcasting sum."""

    def __init__(self, add: Callable[[Any, Any], Any], channels: int) -> None:
        super().__init__()
        self.add = add
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 1, bias=False)
        self.c3 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        add = self.add
        return add(self.c1(x), x), add(self.c2(x), torch.relu(x)), add(self.c3(x), x.mean([2, 3], keepdim=True))


@cases_for(AddRule)
def _add(target: Any, rng: random.Random) -> Case:
    if target not in _ADD:
        raise KeyError(f"no case for the add target {target!r}: add it to _ADD in tests/core/test_rules.py")
    shape = _shape(rng)
    traced = operator.add if target in (operator.iadd, "__add__") else None
    return Case(_Add(_ADD[target], shape[1]), shape, rng.randint(1, shape[1] - 1), traced_as=traced)


@cases_for(ScalarMulRule)
def _scalar_mul(target: Any, rng: random.Random) -> Case:
    c = rng.choice([0.5, -3, 2.25, 7])
    ops = {
        operator.mul: lambda m, t: t * c,
        operator.truediv: lambda m, t: t / c,
        "mul": lambda m, t: t.mul(c),
        "div": lambda m, t: t.div(c),
        torch.mul: lambda m, t: torch.mul(t, c),
    }
    if target not in ops:
        raise KeyError(f"no case for the scalar-mul target {target!r}: add it in _scalar_mul")
    return _unary(ops[target], {}, _shape(rng), rng)



# ------------------------------------------------------------------------------------- harness


def _target_id(kind: str, target: Any) -> str:
    name = target if isinstance(target, str) else f"{getattr(target, '__module__', '')}.{target.__name__}"
    return f"{kind}:{name}"


ENTRIES = list(registered_rules())


def _generator_for(rule: SplitRule, target: Any) -> Generator:
    gen = GENERATORS.get(type(rule))
    if gen is None:
        name = type(rule).__name__
        pytest.fail(
            f"split rule {name} (registered for {target!r}) has no test-case generator. Add one to "
            f"tests/core/test_rules.py:\n\n    @cases_for({name})\n    def _my_op(target, rng) -> Case:\n"
            "        ...  # build a tiny model around the op, e.g. _unary(lambda m, t: my_op(t), {}, _shape(rng), rng)\n\n"
            "and the harness checks it against the unsplit op (forward, input and parameter gradients)."
        )
    return gen


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / max(float(b.norm()), floor, 1e-300))


def _outputs(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _split_nodes(sm: Any, rule: SplitRule) -> list[fx.Node]:
    return [n for reg in sm.plan().regions for n in reg.nodes if reg.bound[n].rule is rule]


def _node_target(sm: Any, n: fx.Node) -> Any:
    return type(sm._gm.get_submodule(n.target)) if n.op == "call_module" else n.target


def _check(case: Case, rule: SplitRule, target: Any, backward: str, basis: str, seed: int) -> None:
    import copy

    model = case.model.double()
    ref = copy.deepcopy(model)
    # placement="split": the cost-aware default may keep a tiny layer trusted; the harness wants every op split
    sm = asymml.split(model, rank=case.rank, input_rank=None, backward=backward, basis=basis, seed=seed,
                      placement="split")
    split_targets = {_node_target(sm, n) for n in _split_nodes(sm, rule)}
    want = case.traced_as if case.traced_as is not None else target
    assert want in split_targets, (
        f"{type(rule).__name__} did not split {want!r} in this case (split: {split_targets}); the "
        "comparison below would not test the rule")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, dtype=torch.float64, generator=g)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    with _counting_calls(rule) as calls:
        outs = _outputs(sm(xs))
        outs_ref = _outputs(ref(xr))
        _compare_and_backward(sm, model, ref, xs, xr, outs, outs_ref, g)
    # not vacuous: the rule ran on the trusted side (in paper backward the accelerator computes every
    # input gradient of a split value), and residuals reached the accelerator
    assert calls["trusted_forward"] and (calls["input_grad"] or backward == "paper"), calls
    assert sm.executor.ledger.count_by_kind["residual"] > 0, dict(sm.executor.ledger.count_by_kind)


@contextmanager
def _counting_calls(rule: SplitRule) -> Iterator[Counter]:
    """Count calls of the rule's trusted-side methods (instance attributes, removed on exit)."""
    calls: Counter = Counter()
    for name in ("trusted_forward", "input_grad", "param_grads"):
        method = getattr(rule, name)

        def counted(*a: Any, _m: Any = method, _n: str = name, **k: Any) -> Any:
            calls[_n] += 1
            return _m(*a, **k)

        setattr(rule, name, counted)
    try:
        yield calls
    finally:
        for name in ("trusted_forward", "input_grad", "param_grads"):
            delattr(rule, name)


def _compare_and_backward(sm: Any, model: nn.Module, ref: nn.Module, xs: torch.Tensor, xr: torch.Tensor,
                          outs: list[torch.Tensor], outs_ref: list[torch.Tensor], g: torch.Generator) -> None:
    assert len(outs) == len(outs_ref)
    loss = loss_ref = 0.0
    for o, r in zip(outs, outs_ref):
        assert o.shape == r.shape, (o.shape, r.shape)
        err = _rel(o, r)
        assert err <= TOL, ("output", err)
        w = torch.randn(r.shape, dtype=torch.float64, generator=g)
        loss, loss_ref = loss + (o * w).sum(), loss_ref + (r * w).sum()
    loss.backward()
    loss_ref.backward()
    ref_grads = [p.grad for p in ref.parameters() if p.grad is not None] + [xr.grad]
    scale = float(torch.sqrt(sum((q**2).sum() for q in ref_grads)))
    err = _rel(xs.grad, xr.grad, 1e-6 * scale)
    assert err <= TOL, ("input grad", err)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{name}: unexpected gradient"
            continue
        assert p.grad is not None, f"{name}: gradient missing"
        err = _rel(p.grad, q.grad, 1e-6 * scale)
        assert err <= TOL, (f"{name} grad", err)


COMBOS = [(backward, basis) for backward in ("protected", "paper") for basis in ("sample", "batch")]


@pytest.mark.parametrize("entry", range(len(ENTRIES)), ids=[_target_id(k, t) for k, t, _ in ENTRIES])
def test_rule_matches_unsplit_op(entry: int) -> None:
    """The op alone, split (noise off), equals the unsplit op: output, input and parameter gradients, for
    both backward modes and both bases (one test per registry entry: the suite's per-test garbage
    collection costs more than a small case)."""
    kind, target, rule = ENTRIES[entry]
    gen = _generator_for(rule, target)
    seed = zlib.crc32(_target_id(kind, target).encode())
    for backward, basis in COMBOS:
        rng = random.Random(seed)  # the same shapes for every combination
        for k in range(SHAPES_FOR.get(type(rule).__name__, SHAPES_PER_TARGET)):
            case = gen(target, rng)
            try:
                _check(case, rule, target, backward, basis, seed + k)
            except AssertionError as e:
                raise AssertionError(f"{type(rule).__name__} on {target!r}, {backward} backward, {basis} basis, "
                                     f"input {case.shape}, rank {case.rank}, model {case.model}: {e}") from None


_NODE_ARGS: dict[Any, tuple[Any, ...]] = {
    "view": (3, -1), "reshape": (3, -1), torch.reshape: ((3, -1),), "flatten": (1,), torch.flatten: (1,),
    "mean": ([2, 3],), torch.mean: ([2, 3],), F.avg_pool2d: (2,), F.adaptive_avg_pool2d: (1,),
}


def _hand_built_node(kind: str, target: Any) -> fx.Node:
    """One node calling ``target`` on a placeholder (with a second operand or constant arguments)."""
    g = fx.Graph()
    x, y = g.placeholder("x"), g.placeholder("y")
    args = (x, y) if target in _ADD else (x, *_NODE_ARGS.get(target, (2,)))
    if kind == "call_function":
        return g.call_function(target, args)
    return g.call_method(target, args)


@pytest.mark.parametrize("entry", [i for i, (k, _, _) in enumerate(ENTRIES) if k != "call_module"],
                         ids=[_target_id(k, t) for k, t, _ in ENTRIES if k != "call_module"])
def test_every_registered_target_binds(entry: int) -> None:
    """Every registered function/method target binds to its rule on a plain node (covers targets that
    fx tracing normalises to another one, such as ``__add__`` and ``operator.iadd``)."""
    kind, target, rule = ENTRIES[entry]
    bound, known = lookup(_hand_built_node(kind, target), None)
    assert known and bound is not None and bound.rule is rule, (target, bound)


def test_known_trusted_ops_have_no_rule() -> None:
    """``KNOWN_TRUSTED_*`` list ops without a rule (those with one are known through the registry)."""
    ruled = {t for _, t, _ in registered_rules()}
    overlap = [t for t in (*KNOWN_TRUSTED_MODULES, *KNOWN_TRUSTED_FUNCTIONS, *KNOWN_TRUSTED_METHODS) if t in ruled]
    assert not overlap


def test_missing_generator_fails_with_instructions() -> None:
    class Unregistered(SplitRule):
        pass

    with pytest.raises(pytest.fail.Exception, match=r"@cases_for\(Unregistered\)"):
        _generator_for(Unregistered(), "my_op")


def test_bind_errors_propagate(monkeypatch) -> None:
    """A bug in a rule's ``bind`` surfaces (it used to be swallowed and the op silently ran trusted)."""
    from asymml.rules import REGISTRY_METHODS

    rule = REGISTRY_METHODS["mean"]

    def broken(node: Any, module: Any) -> Any:
        raise IndexError("bug in bind")

    monkeypatch.setattr(rule, "bind", broken)
    model = _Unary(lambda m, t: t.mean([2, 3]), {}, 3)
    with pytest.raises(IndexError, match="bug in bind") as info:
        asymml.split(model)
    assert any("MeanRule.bind" in n for n in getattr(info.value, "__notes__", ["MeanRule.bind"]))


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_low_rank_conv_made_a_few_samples_at_a_time_is_exact(monkeypatch, train: bool) -> None:
    """The forward im2col of a low-rank input is made in chunks of samples when it is large (trusted
    memory); forced here to one sample per chunk, outputs and gradients still equal the unsplit model's
    (float64), merged into the accelerator's reply (inference) or into a fresh tensor (training)."""
    from conftest import compare_with_reference

    from asymml.rules import conv_linear

    monkeypatch.setattr(conv_linear, "COLS_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 6, 3, padding=1, bias=False)).double()
    x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
    if train:
        out_err, grad_err, _, _ = compare_with_reference(model, x, rank=2)
        assert out_err <= 1e-10 and grad_err <= 1e-10, (out_err, grad_err)
    else:
        ref = copy.deepcopy(model)
        sm = asymml.split(model, rank=2, placement="split")
        with torch.no_grad():
            torch.testing.assert_close(sm(x), ref(x), rtol=1e-10, atol=1e-10)
