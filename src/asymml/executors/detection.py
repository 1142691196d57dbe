"""Measuring result verification: its detection rate against concrete tampers, its false alarms, and its
trusted-time overhead in a split run (for tests, ``tests/executors/measure_overhead.py`` and reports).

Kept apart from :mod:`asymml.executors.verify`, which the runtime imports: measuring needs the façade
(:func:`asymml.split`) and a local executor, which sit above the verifier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import IntegrityError
from .base import BackwardRequest
from .ops import Instr
from .verify import Verifier


# ---------------------------------------------------------------------------------------------- measurement
def demo_case(batch: int = 8, seed: int = 0) -> dict[str, Any]:
    """A small program covering every check (convolutions incl. grouped, BN scale, skip add, pooling,
    flatten, linear) with inputs, parameters and output gradients: for tests and :func:`measure_detection`."""
    g = torch.Generator().manual_seed(seed)

    def rn(*s: int) -> Tensor:
        return torch.randn(*s, generator=g)

    program = [
        Instr("c1", "conv2d", ("in0",), ("c1.weight",), {"stride": 1, "padding": 1, "dilation": 1, "groups": 1}),
        Instr("b1", "bn_scale", ("c1",), ("b1.running_var", "b1.weight"), {"eps": 1e-5}),
        Instr("a", "add", ("b1", "in1")),
        Instr("p", "avg_pool2d", ("a",), (), {"kernel_size": 2, "stride": 2}),
        Instr("c2", "conv2d", ("p",), ("c2.weight",), {"stride": 1, "padding": 1, "dilation": 1, "groups": 2}),
        Instr("f", "flatten", ("c2",), (), {"start_dim": 1, "end_dim": -1}),
        Instr("l", "linear", ("f",), ("l.weight",)),
    ]
    params = {"c1.weight": rn(6, 4, 3, 3), "b1.running_var": rn(6).abs() + 0.5, "b1.weight": rn(6),
              "c2.weight": rn(6, 3, 3, 3), "l.weight": rn(5, 96) * 0.1}
    inputs = {"in0": rn(batch, 4, 8, 8), "in1": rn(batch, 6, 8, 8)}
    grads = {"a": rn(batch, 6, 8, 8), "l": rn(batch, 5)}
    request = dict(input_grads=["in0", "in1"], param_grads=["c1.weight", "c2.weight", "l.weight"],
                   value_grads=["c1", "b1", "a", "p", "c2", "f", "l"], values=["in0", "c1", "p", "f"])
    return {"program": program, "params": params, "inputs": inputs, "grads": grads, "outputs": ["a", "l"],
            "request": request}


def _honest(case: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from .local import LocalExecutor

    ex = LocalExecutor("cpu")
    try:
        hs = {n: ex.release(x, layer="demo", kind="residual") for n, x in case["inputs"].items()}
        fwd = ex.forward(0, case["program"], hs, case["params"], case["outputs"], layer="demo", keep_graph=True,
                         grad_params=tuple(case["request"]["param_grads"])).result()
        gh = {n: ex.release(g, layer="demo", kind="grad") for n, g in case["grads"].items()}
        bwd = ex.backward(0, BackwardRequest(gh, **case["request"])).result()
    finally:
        ex.close()
    return ({k: (None if v is None else v.clone()) for k, v in fwd.items()},
            {s: {k: (None if v is None else v.clone()) for k, v in d.items()} for s, d in bwd.items()})


def _run_checks(v: Verifier, case: dict[str, Any], fwd: dict[str, Any], bwd: dict[str, Any]) -> None:
    from .base import Handle

    hids = {}
    for i, (n, x) in enumerate(case["inputs"].items()):
        v.release(i, x)
        hids[n] = i
    v.check_forward(0, case["program"], hids, case["params"], case["outputs"], fwd, layer="demo", keep_graph=True)
    gh = {}
    for j, (n, g) in enumerate(case["grads"].items()):
        v.release(100 + j, g)
        gh[n] = Handle(100 + j, tuple(g.shape))
    v.check_backward(0, BackwardRequest(gh, **case["request"]), bwd)


def _tampers() -> dict[str, Callable[[dict[str, Any], dict[str, Any], torch.Generator], None]]:
    def first(d: dict[str, Any]) -> str:
        return next(k for k, t in d.items() if t is not None)

    def scale(f: dict, b: dict, g: torch.Generator) -> None:
        f["a"] = f["a"] * 1.5

    def one(f: dict, b: dict, g: torch.Generator) -> None:
        t = f["a"].clone()
        i = int(torch.randint(t.numel(), (1,), generator=g))
        t.view(-1)[i] += t.abs().mean()  # one element off by its typical magnitude
        f["a"] = t

    def grad_in(f: dict, b: dict, g: torch.Generator) -> None:
        t = b["input_grads"]["in0"].clone()
        i = int(torch.randint(t.numel(), (1,), generator=g))
        t.view(-1)[i] += t.abs().mean()
        b["input_grads"]["in0"] = t

    def grad_w(f: dict, b: dict, g: torch.Generator) -> None:
        w = b["param_grads"]["c1.weight"]
        b["param_grads"]["c1.weight"] = torch.randn(w.shape, generator=g) * w.std()

    def value(f: dict, b: dict, g: torch.Generator) -> None:
        b["values"]["c1"] = b["values"]["c1"] * 1.1

    def value_small(f: dict, b: dict, g: torch.Generator) -> None:  # 10×rtol: near the float tolerance
        b["values"]["c1"] = b["values"]["c1"] * 1.01

    return {"scale_x1.5": scale, "one_element": one, "input_grad_one_element": grad_in,
            "weight_grad_replaced": grad_w, "value_x1.1": value, "value_x1.01": value_small}


def measure_detection(trials: int = 50, *, rounds: int = 2, rtol: float | None = None, batch: int = 8,
                      seed: int = 0) -> dict[str, float]:
    """Estimated detection rate of :class:`Verifier` against each tamper of :func:`demo_case` (fraction of
    ``trials`` with fresh secret randomness that raised :class:`IntegrityError`), and ``false_alarm`` on
    honest results. Also ``rounds`` and ``rtol`` used."""
    case = demo_case(batch, seed)
    fwd, bwd = _honest(case)
    g = torch.Generator().manual_seed(seed + 1)
    out: dict[str, float] = {}
    for name, tamper in {"false_alarm": None, **_tampers()}.items():
        caught = 0
        for _ in range(trials):
            f = dict(fwd)
            b = {s: dict(d) for s, d in bwd.items()}
            if tamper is not None:
                tamper(f, b, g)
            try:
                _run_checks(Verifier(rounds=rounds, rtol=rtol, sample=1.0), case, f, b)
            except IntegrityError:
                caught += 1
        out[name] = caught / trials
    out["rounds"] = float(rounds)
    out["rtol"] = Verifier(rounds=rounds, rtol=rtol).rtol
    return out


def time_overhead(model: torch.nn.Module, x: Tensor, *, steps: int = 3, **split_kw: Any) -> dict[str, float]:
    """Trusted-time cost of verification on one forward+backward of ``model`` split on an in-process
    accelerator: ``step_s`` (median step without verification), ``verify_s`` (verification time per step,
    as measured inside the verifier) and ``fraction`` = ``verify_s / step_s``. ``split_kw`` go to
    :func:`asymml.split`. Meant for ``asymml bench`` and quick checks (run with the thread settings of the
    trusted side)."""
    import statistics

    from ..api import split
    from .local import LocalExecutor

    def run(verify: bool) -> tuple[float, float]:
        ex = LocalExecutor("cpu", verify=verify)
        try:
            import inspect

            if "placement" in inspect.signature(split).parameters:
                split_kw.setdefault("placement", "split")  # time every splittable layer
            sm = split(model, executor=ex, **split_kw)
            times = []
            for _ in range(steps + 1):  # first step warms caches
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                sm(x).square().mean().backward()
                times.append(time.perf_counter() - t0)
                if ex.verifier is not None and len(times) == 1:
                    ex.verifier.reset_stats()
            vs = ex.verifier.stats()["seconds"] / steps if ex.verifier is not None else 0.0
            return statistics.median(times[1:]), vs
        finally:
            ex.close()

    step_s, _ = run(False)
    _, verify_s = run(True)
    return {"step_s": step_s, "verify_s": verify_s, "fraction": verify_s / step_s if step_s > 0 else float("nan")}
