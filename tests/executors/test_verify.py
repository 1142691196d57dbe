"""Result verification (issue 12, item 1): every check catches its tamper; honest results always pass."""

from __future__ import annotations

import pytest
import torch
from hostile_util import batch, split_all, tiny

import asymml
from asymml.errors import IntegrityError
from asymml.executors import LocalExecutor
from asymml.executors.verify import Verifier, _honest, _run_checks, demo_case, measure_detection, time_overhead


@pytest.fixture(scope="module")
def case():
    c = demo_case(batch=4)
    fwd, bwd = _honest(c)
    return c, fwd, bwd


def _copy(fwd, bwd):
    return dict(fwd), {s: dict(d) for s, d in bwd.items()}


def test_detection_rates_and_no_false_alarms():
    rates = measure_detection(trials=6, batch=4)
    assert rates["false_alarm"] == 0.0
    for name in ("scale_x1.5", "one_element", "input_grad_one_element", "weight_grad_replaced", "value_x1.1"):
        assert rates[name] == 1.0, (name, rates)
    assert rates["value_x1.01"] >= 0.5, rates  # a 1% change is only 10× the float tolerance


@pytest.mark.parametrize("name,tamper,match", [
    ("nan", lambda f, b: f.__setitem__("a", f["a"].clone().index_fill_(0, torch.tensor([1]), float("nan"))), "NaN"),
    ("wrong shape", lambda f, b: f.__setitem__("a", f["a"][..., :-1]), "shape"),
    ("broadcast (1,)", lambda f, b: f.__setitem__("a", torch.ones(1)), "shape"),
    ("truncated batch", lambda f, b: f.__setitem__("l", f["l"][:-1]), "shape"),
    ("int64", lambda f, b: f.__setitem__("l", f["l"].long()), "dtype"),
    ("missing output", lambda f, b: f.pop("l"), "expected outputs"),
    ("extra section entry", lambda f, b: b["param_grads"].__setitem__("nope", torch.zeros(1)), "not requested"),
    ("gradient NaN", lambda f, b: b["input_grads"].__setitem__("in1", b["input_grads"]["in1"] * float("nan")), "NaN"),
    ("gradient dropped", lambda f, b: b["input_grads"].pop("in0"), "in0"),
    ("weight gradient x1.5", lambda f, b: b["param_grads"].__setitem__("l.weight", b["param_grads"]["l.weight"] * 1.5),
     "l.weight"),
    ("grouped conv gradient", lambda f, b: b["param_grads"].__setitem__("c2.weight", -b["param_grads"]["c2.weight"]),
     "c2.weight"),
    ("value gradient", lambda f, b: b["value_grads"].__setitem__("p", b["value_grads"]["p"] * 1.1), "gradient"),
])
def test_each_tamper_is_named(case, name, tamper, match):
    c, fwd, bwd = case
    f, b = _copy(fwd, bwd)
    tamper(f, b)
    with pytest.raises(IntegrityError, match=match) as e:
        _run_checks(Verifier(), c, f, b)
    assert "'demo'" in str(e.value)  # names the layer
    f, b = _copy(fwd, bwd)
    _run_checks(Verifier(), c, f, b)  # the untouched results pass


def test_split_verify_flag_and_end_to_end_no_false_alarm():
    ex = LocalExecutor("cpu")
    assert ex.verify is False  # off by default in-process
    sm = split_all(tiny(), executor=ex, verify=True)
    assert ex.verify is True
    for _ in range(2):
        sm(batch()).square().mean().backward()
    st = ex.verifier.stats()
    assert st["checks"] >= 8 and st["failures"] == 0 and st["seconds"] > 0
    split_all(tiny(), executor=ex, verify=False)
    assert ex.verify is False
    with pytest.raises(asymml.ConfigError):
        asymml.split(tiny(), executor=ex, verify="yes")
    ex.close()


def test_time_overhead_reports_a_fraction():
    r = time_overhead(tiny(), batch(), steps=1)
    assert r["step_s"] > 0 and r["verify_s"] > 0 and 0 < r["fraction"] < 10


def test_channels_last_tensors(case):
    """The trusted side works channels-last: the checks must read either layout."""
    c, fwd, bwd = case

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t

    c = dict(c, inputs={k: cl(v) for k, v in c["inputs"].items()}, grads={k: cl(v) for k, v in c["grads"].items()})
    f = {k: cl(v) for k, v in fwd.items()}
    b = {s: {k: cl(v) for k, v in d.items()} for s, d in bwd.items()}
    _run_checks(Verifier(), c, f, b)
    b["param_grads"]["c1.weight"] = b["param_grads"]["c1.weight"] * 1.5
    with pytest.raises(IntegrityError, match="c1.weight"):
        _run_checks(Verifier(), c, f, b)
