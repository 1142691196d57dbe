"""Result verification (issue 12, item 1): every check catches its tamper; honest results always pass."""

from __future__ import annotations

import math

import pytest
import torch
from hostile_util import batch, split_all, tiny

import asymml
from asymml.errors import IntegrityError
from asymml.executors import LocalExecutor
from asymml.executors.detection import _honest, _run_checks, demo_case, measure_detection, time_overhead
from asymml.executors.verify import Verifier


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


# ------------------------------------------------------------------ sampled randomized checks
def _scaled(fwd, bwd):
    f, b = _copy(fwd, bwd)
    f["a"] = f["a"] * 1.5
    return f, b


def test_sampling_catches_a_persistent_tamper_within_max_gap_jobs(case):
    """Past the warm-up a job is drawn with probability ``sample``; a layer is never left unchecked for
    ``max_gap`` jobs in a row, so a tamper in every job is caught by job ``max_gap`` at the latest."""
    c, fwd, bwd = case
    caught_at = []
    for _ in range(12):
        v = Verifier(sample=0.25, warmup=0, max_gap=4)
        for job in range(1, 5):
            try:
                _run_checks(v, c, *_scaled(fwd, bwd))
            except IntegrityError:
                caught_at.append(job)
                break
        else:
            pytest.fail("a persistent ×1.5 tamper survived max_gap=4 jobs")
    assert max(caught_at) <= 4
    assert len(set(caught_at)) > 1  # the draw is random: not always the same job


def test_sampled_out_jobs_still_get_the_basic_checks(case):
    c, fwd, bwd = case
    v = Verifier(sample=1e-12, warmup=0, max_gap=None)  # practically never drawn
    for _ in range(3):
        _run_checks(v, c, *_scaled(fwd, bwd))  # a finite tamper in an undrawn job passes...
    st = v.stats()
    assert st["full"] == 0 and st["sampled_out"] == 3
    for tamper, match in ((lambda f: f.__setitem__("a", f["a"].clone().fill_(float("nan"))), "NaN"),
                          (lambda f: f.__setitem__("a", f["a"][..., :-1]), "shape"),
                          (lambda f: f.__setitem__("l", f["l"].long()), "dtype")):
        f, b = _copy(fwd, bwd)
        tamper(f)
        with pytest.raises(IntegrityError, match=match):  # ...but non-finite, reshaped, recast ones never do
            _run_checks(v, c, f, b)
    b2 = _copy(fwd, bwd)[1]
    b2["input_grads"]["in1"] = b2["input_grads"]["in1"] * float("nan")
    with pytest.raises(IntegrityError, match="NaN"):
        _run_checks(v, c, fwd, b2)


def test_warm_up_jobs_are_always_checked(case):
    c, fwd, bwd = case
    for job in range(2):
        v = Verifier(sample=1e-12, warmup=2, max_gap=None)
        for _ in range(job):
            _run_checks(v, c, fwd, bwd)
        with pytest.raises(IntegrityError, match="randomized check"):
            _run_checks(v, c, *_scaled(fwd, bwd))


def test_sampled_honest_jobs_pass_and_are_counted(case):
    c, fwd, bwd = case
    v = Verifier(sample=0.5, warmup=1, max_gap=3)
    for _ in range(8):
        _run_checks(v, c, fwd, bwd)
    st = v.stats()
    assert st["failures"] == 0 and st["full"] + st["sampled_out"] == 8 and st["full"] >= 3


def test_detection_probability():
    v = Verifier(sample=0.25, warmup=2, max_gap=8)
    assert v.detection_probability() == pytest.approx(0.25)
    assert v.detection_probability(4) == pytest.approx(1 - 0.75 ** 4)
    assert v.detection_probability(8) == 1.0
    assert v.detection_probability(1, per_check=0.5) == pytest.approx(0.125)
    assert Verifier(sample=1.0).detection_probability() == 1.0
    sm = v.summary()
    assert (sm["sample"], sm["max_gap"], sm["caught_within_jobs"], sm["checks"]) == (0.25, 8, 8, 0)
    assert sm["detection_per_job"] == pytest.approx(0.25)
    assert Verifier(sample=1.0).summary()["caught_within_jobs"] == 1
    assert Verifier(sample=0.5, max_gap=None).detection_probability(3) == pytest.approx(0.875)
    for bad in (dict(sample=0.0), dict(sample=1.5), dict(warmup=-1), dict(max_gap=0)):
        with pytest.raises(ValueError):
            Verifier(**bad)


def test_checks_run_single_threaded_and_restore_the_thread_count(case):
    c, fwd, bwd = case
    n = torch.get_num_threads()
    seen = []
    v = Verifier(threads=1)
    orig = v._tensor_ok
    v._tensor_ok = lambda *a, **k: (seen.append(torch.get_num_threads()), orig(*a, **k))[1]
    try:
        torch.set_num_threads(2)
        _run_checks(v, c, fwd, bwd)
        assert torch.get_num_threads() == 2 and set(seen) == {1}
        f, b = _scaled(fwd, bwd)
        with pytest.raises(IntegrityError):
            _run_checks(v, c, f, b)
        assert torch.get_num_threads() == 2  # restored after a failed check too
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------ fused passes (norm, finiteness, projection)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d", "weight"])
def test_square_sum_finiteness_is_exact(monkeypatch, layout):
    """The norm pass doubles as the finiteness check: NaN/±Inf anywhere (also +Inf and -Inf together, which
    cancel in a plain sum) must make it NaN, an honest float32 overflow of the squares must not."""
    from asymml.executors import verify as vf

    monkeypatch.setattr(vf, "_CHUNK_BYTES", 256)  # many chunks, so the bad element may sit in any of them
    g = torch.Generator().manual_seed(3)
    shape = {"nchw": (3, 4, 5, 6), "channels_last": (3, 4, 5, 6), "2d": (7, 33), "weight": (6, 4, 3, 3)}[layout]

    def make():
        t = torch.randn(shape, generator=g)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t

    def storage(t):  # the tensor's elements in memory order, as a view
        return t.view(-1) if t.is_contiguous() else t.permute(0, 2, 3, 1).reshape(-1)

    t = make()
    assert vf._norm2(t) == pytest.approx(float(t.double().square().sum()), rel=1e-5)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        for _ in range(3):
            t = make()
            idx = torch.randperm(t.numel(), generator=g)[:len(bad)]
            storage(t)[idx] = torch.tensor(bad)
            assert not bool(torch.isfinite(t).all())
            assert math.isnan(vf._norm2(t)), (layout, bad)
    big = make() * 1e30  # finite, but its squares overflow float32
    storage(big)[-1] = 3.0e38
    n2 = vf._norm2(big)
    assert math.isfinite(n2) and n2 == pytest.approx(float(big.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_projection_matches_dense_reference(monkeypatch, channels_last):
    from asymml.executors import verify as vf

    monkeypatch.setattr(vf, "_CHUNK_BYTES", 512)
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, 5, 6, 7, generator=g)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    v = Verifier()
    items = [(vf.Sep.rank1(v._randn(5), v._randn(6), v._randn(7)), v._randn(3)),
             (vf.Sep(v._randn(5, 3, 3), v._randn(3, 6), v._randn(3, 7)), v._randn(3))]
    vals, n2 = vf._sep_batch(t, items, sq=True)
    for (s, r), got in zip(items, vals):
        ref = float((r.view(-1, 1, 1, 1) * s.dense() * t.double()).sum())
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert n2 == pytest.approx(float(t.double().square().sum()), rel=1e-5)
    W = torch.randn(4, 5, 3, 3, generator=g)
    T, m, K = v._randn(2, 4), v._randn(2, 5), v._randn(2, 3, 3)
    lhs, n2 = vf._wproj(W, T, m, K, True)
    ref = torch.einsum("oikl,ro,ri,rkl->r", W.double(), T, m, K)
    assert torch.allclose(lhs, ref, rtol=1e-5) and n2 == pytest.approx(float(W.double().square().sum()), rel=1e-5)


@pytest.mark.parametrize("where", ["output", "weight gradient"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_in_fused_passes_is_named(case, where, bad):
    """NaN/Inf in a tensor whose norm is taken in its projection pass is still reported as such."""
    c, fwd, bwd = case
    for cl in (False, True):
        f, b = _copy(fwd, bwd)
        if where == "output":
            t = f["a"].clone()
            t[1, 2, 3, 4] = bad
            f["a"] = t.contiguous(memory_format=torch.channels_last) if cl else t
        else:
            t = b["param_grads"]["c1.weight"].clone()
            t[2, 1, 0, 2] = bad
            b["param_grads"]["c1.weight"] = t
        with pytest.raises(IntegrityError, match="NaN or Inf"):
            _run_checks(Verifier(sample=1.0), c, f, b)


def test_checks_take_the_trusted_threads_only_where_the_accelerator_is_the_trusted_cores() -> None:
    """An in-process CPU executor runs its jobs on the trusted side's cores and the trusted side waits for
    each result it checks: its checks stream on all torch threads. Elsewhere (GPU, remote) a check may run
    beside the trusted side's own share: one thread."""
    ex = LocalExecutor("cpu", verify=True)
    try:
        assert ex.shares_trusted_cores and ex.verifier.threads is None
        ex.set_verify_sample(0.5)
        assert ex.verifier.threads is None and ex.verifier.sample == 0.5
        ex.shares_trusted_cores = False  # as an off-core accelerator
        ex.verify = False
        ex.verify = True
        assert ex.verifier.threads == 1
        ex.set_verify_sample(1.0)
        assert ex.verifier.threads == 1 and ex.verifier.sample == 1.0
    finally:
        ex.close()
