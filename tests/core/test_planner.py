"""The cost-aware placement: its cost model, its calibration cache, and the runtime obeying it."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torchvision

import asymml
from asymml import planner
from asymml.models import get_model
from asymml.planner import ConvShape, FollowingPlanner, MachineRates, Planner, dense_cost, split_cost

# a CPU like this one: dense conv 100 GFLOP/s, GEMM 80 GFLOP/s, 10 GB/s passes, 2 µs per small op
RATES = MachineRates(conv_flops=100e9, gemm_flops=80e9, bandwidth=10e9, threads=1, op_overhead=2e-6, pilot=False)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Install ``RATES`` as this machine's calibration (a private cache directory)."""
    table = {str(t): {**RATES.__dict__, "threads": t, "version": planner.CALIBRATION_VERSION} for t in range(1, 257)}
    (tmp_path / "calibration.json").write_text(json.dumps(table))
    monkeypatch.setenv("ASYMML_CACHE", str(tmp_path))
    monkeypatch.setattr(planner, "_RATES", {})
    yield tmp_path
    planner._RATES.clear()


def test_cost_model_keeps_cheap_layers_trusted_and_splits_heavy_ones() -> None:
    # VGG-16's RGB input conv: 3 channels, nothing to save by splitting
    rgb = ConvShape(B=8, C=3, O=64, groups=1, kk=9, hw_in=224 * 224, hw_out=224 * 224)
    assert split_cost(rgb, 1, RATES, training=False) > dense_cost(rgb, RATES, training=False)
    # a 64→64 conv at 224 px, rank 2: ~1/32 of the FLOPs, bound by memory passes over the activation
    big = ConvShape(B=8, C=64, O=64, groups=1, kk=9, hw_in=224 * 224, hw_out=224 * 224)
    assert split_cost(big, 2, RATES, training=False) < 0.5 * dense_cost(big, RATES, training=False)
    # a tiny layer: the split's fixed per-op costs dominate
    tiny = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=8 * 8, hw_out=8 * 8)
    assert split_cost(tiny, 4, RATES, training=True) > dense_cost(tiny, RATES, training=True)


def test_policies() -> None:
    s = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=64, hw_out=64)
    assert Planner("split").split_pays("l", s, 4, training=False, shared=False)
    assert not Planner("trusted").split_pays("l", s, 4, training=False, shared=False)


def test_calibration_is_cached_and_versioned(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ASYMML_CACHE", str(tmp_path))
    monkeypatch.setattr(planner, "_RATES", {})
    stale = {str(torch.get_num_threads()): {"conv_flops": 1.0, "gemm_flops": 1.0, "bandwidth": 1.0, "threads": 1}}
    (tmp_path / "calibration.json").write_text(json.dumps(stale))  # an older format: measured again
    rates = planner.calibrate()
    assert rates.conv_flops > 1e6 and rates.op_overhead > 0
    saved = json.loads((tmp_path / "calibration.json").read_text())[str(torch.get_num_threads())]
    assert saved["version"] == planner.CALIBRATION_VERSION
    monkeypatch.setattr(planner, "_RATES", {})
    assert planner.calibrate() == rates  # read back, not re-measured


def test_runtime_keeps_the_input_conv_trusted_and_releases_nothing_for_it(machine) -> None:
    """VGG-11 at 64 px under the calibrated machine: the 3-channel input conv stays trusted (the raw input
    is not even decomposed), larger layers are split; the result is exact either way."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(num_classes=10).eval()
    sm = asymml.split(model, audit=True)
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        out = sm(x)
        ref = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    decisions = sm.planner.decisions()
    assert decisions["features.0:x"]["split"] is False
    assert any(d["split"] for d in decisions.values())
    layers = {r.layer for r in sm.executor.ledger if r.kind != "weight"}
    assert "input" not in layers and layers  # nothing released for the input; residuals for split layers
    kinds = {lp.layer: lp.kind for lp in sm.profile().layers}
    assert kinds["features.0"] in ("trusted (planner)", "trusted")


def test_model_with_nothing_worth_splitting_runs_as_trusted_only(machine) -> None:
    """ResNet-20 at 32 px, batch 2: every layer predicted cheaper dense; asym then runs the model as it is
    (nothing released) and matches it."""
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10)
    sm = asymml.split(model, audit=True)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(2):  # the second forward takes the all-trusted fast path
        out = sm(x)
        out.sum().backward()
    assert not [r for r in sm.executor.ledger if r.kind != "weight"]
    assert not any(d["split"] for d in sm.planner.decisions().values())
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def test_pilot_keeps_a_layer_trusted_when_the_split_measures_slower() -> None:
    """The model predicts, the measurement decides: a predicted split whose first forwards are slower than
    the measured dense layer is kept trusted from then on; a faster one stays split."""
    fast = MachineRates(conv_flops=1e6, gemm_flops=1e15, bandwidth=1e15, threads=1, op_overhead=0.0, pilot=True)
    s = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=64, hw_out=64)
    for split_s, stays in [(2e-3, False), (5e-4, True)]:
        p = Planner()
        planner._RATES[torch.get_num_threads()] = fast
        try:
            assert p.split_pays("conv:x", s, 4, training=False, shared=False, dense_timer=lambda: 1e-3)
            for _ in range(Planner.PILOT_FORWARDS):
                p.observe("conv", split_s)
            assert p.watching("conv") is not stays  # a faster split is confirmed at once; a reversal waits
            for _ in range(Planner.PILOT_MAX_FORWARDS - Planner.PILOT_FORWARDS):
                if p.watching("conv"):
                    p.observe("conv", split_s)
            assert not p.watching("conv")
            assert p.split_pays("conv:x", s, 4, training=False, shared=False) is stays
            d = p.decisions()["conv:x"]
            assert d["measured_dense_s"] == 1e-3 and d["measured_split_s"] == split_s
        finally:
            planner._RATES.clear()


def test_pilot_does_not_reverse_a_split_on_one_busy_moment() -> None:
    """A split whose first forwards were slowed by something else on the machine (VGG-16's 14×14 layers, 16 ms
    split against 27–36 ms dense, were kept trusted in some runs) stays split when a later forward of the
    longer trial is faster than the dense layer; the measured figure is the best of the trial."""
    fast = MachineRates(conv_flops=1e6, gemm_flops=1e15, bandwidth=1e15, threads=1, op_overhead=0.0, pilot=True)
    s = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=64, hw_out=64)
    p = Planner()
    planner._RATES[torch.get_num_threads()] = fast
    try:
        assert p.split_pays("conv:x", s, 4, training=False, shared=False, dense_timer=lambda: 1e-3)
        for t in (2e-3, 3e-3, 5e-4):
            p.observe("conv", t)
        assert not p.watching("conv")
        assert p.split_pays("conv:x", s, 4, training=False, shared=False)
        assert p.decisions()["conv:x"]["measured_split_s"] == 5e-4
    finally:
        planner._RATES.clear()


def test_training_pilot_judges_forward_and_backward() -> None:
    """In training the trial compares the split's forward *and* backward with the dense layer's: a split whose
    forward only breaks even but whose backward saves time stays split (VGG-16's features.5 at 224 px was
    kept trusted on its forward alone); one whose backward loses is kept trusted. The decision waits for
    the backwards."""
    fast = MachineRates(conv_flops=1e6, gemm_flops=1e15, bandwidth=1e15, threads=1, op_overhead=0.0, pilot=True)
    s = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=64, hw_out=64)
    dense = 3e-3  # forward 1 ms + backward 2 ms
    for fwd, bwd, stays in [(1.05e-3, 1.2e-3, True), (0.9e-3, 2.5e-3, False)]:
        p = Planner()
        planner._RATES[torch.get_num_threads()] = fast
        try:
            assert p.split_pays("conv:x", s, 4, training=True, shared=False, dense_timer=lambda: dense)
            for _ in range(Planner.PILOT_FORWARDS):
                p.observe("conv", fwd)
            assert p.watching("conv")  # forwards alone do not decide a layer planned for training
            for _ in range(50):  # (forwards whose backward has not come yet are not kept without bound)
                p.observe("conv", fwd)
            assert len(p._pilot["conv"].forward) == Planner.PILOT_MAX_FORWARDS
            for _ in range(Planner.PILOT_MAX_FORWARDS):
                if p.watching("conv"):
                    p.observe("conv", bwd, "backward")
            assert not p.watching("conv")
            assert p.split_pays("conv:x", s, 4, training=True, shared=False) is stays
            d = p.decisions()["conv:x"]
            assert d["measured_dense_s"] == dense and d["measured_split_s"] == pytest.approx(fwd + bwd)
        finally:
            planner._RATES.clear()


def test_training_pilot_times_a_split_models_backward() -> None:
    """The runtime feeds the trial: a split model's training steps report each piloted region's forward and
    backward, and the dense yardstick includes the backward."""
    seen: list[tuple[str, str]] = []
    dense_seen: list[float] = []

    class Recording(Planner):
        def split_pays(self, key, s, r, *, training, shared, dense_timer=None):  # noqa: ANN001
            if dense_timer is not None and training:
                dense_seen.append(dense_timer())
            return True

        def watching(self, region: str) -> bool:
            return True

        def observe(self, region: str, split_s: float, phase: str = "forward") -> None:
            seen.append((region, phase))

    torch.manual_seed(0)
    sm = asymml.split(torchvision.models.vgg11(num_classes=10), rank=2, placement="split")
    sm.planner = Recording("auto")
    sm(torch.rand(2, 3, 32, 32)).sum().backward()
    phases = {ph for _, ph in seen}
    assert phases == {"forward", "backward"} and dense_seen and all(t > 0 for t in dense_seen)
    assert {r for r, ph in seen if ph == "backward"} == {r for r, ph in seen if ph == "forward"}


def test_following_planner_makes_its_leaders_decisions_without_a_pilot() -> None:
    """A follower (the bench's verify variant) splits what its leader splits, including decisions the
    leader's pilot reversed, and never feeds the leader's pilot with its own forwards."""
    fast = MachineRates(conv_flops=1e6, gemm_flops=1e15, bandwidth=1e15, threads=1, op_overhead=0.0, pilot=True)
    s = ConvShape(B=2, C=16, O=16, groups=1, kk=9, hw_in=64, hw_out=64)
    lead = Planner()
    follow = FollowingPlanner(lead)
    planner._RATES[torch.get_num_threads()] = fast
    try:
        assert lead.split_pays("conv:x", s, 4, training=False, shared=False, dense_timer=lambda: 1e-3)
        assert follow.split_pays("conv:x", s, 4, training=False, shared=False, dense_timer=lambda: 1e-3)
        assert lead.watching("conv") and not follow.watching("conv")
        for _ in range(Planner.PILOT_MAX_FORWARDS):
            lead.observe("conv", 2e-3)  # the split measured slower: the leader keeps the layer trusted
        assert not follow.split_pays("conv:x", s, 4, training=False, shared=False)
        # a layer the leader has not seen: predicted by the follower, not put on trial anywhere
        assert follow.split_pays("conv2:x", s, 4, training=False, shared=False, dense_timer=lambda: 1e-3)
        assert not lead.watching("conv2") and not follow.watching("conv2") and "conv2:x" not in lead.decisions()
    finally:
        planner._RATES.clear()


def test_pilot_does_not_count_noise_drawn_while_the_prefetch_is_cold(monkeypatch) -> None:
    """In the pilot's (first) forwards the noise prefetch has not yet learned the order of the releases, so
    noise is drawn on the critical path; from then on it is drawn ahead. The trial must time the split
    without those draws, or a noised run keeps layers trusted that pay split (VGG-16 224 px, σ=1: 1 of 12
    layers split instead of 11)."""
    from asymml.privacy import NoiseConfig
    from asymml.privacy.noise import ReleaseMechanism
    from asymml.release import ReleasePath

    drawn = [0.0]  # every release draws its noise inline for 0.2 s, reported as critical-path noise time
    release = ReleaseMechanism.__call__

    def slow_release(self, r, **kw):
        time.sleep(0.2)
        drawn[0] += 0.2
        return release(self, r, **kw)

    monkeypatch.setattr(ReleaseMechanism, "__call__", slow_release)
    monkeypatch.setattr(ReleasePath, "noise_critical_s", lambda self: drawn[0])
    seen: list[float] = []

    class Recording(Planner):
        def watching(self, region: str) -> bool:
            return True

        def observe(self, region: str, split_s: float, phase: str = "forward") -> None:
            seen.append(split_s)

    torch.manual_seed(0)
    sm = asymml.split(torchvision.models.vgg11(num_classes=10).eval(), rank=2, placement="split",
                      noise=NoiseConfig(sigma=1.0, clip=1.0, insecure_seed=0))
    sm.planner = Recording("split")
    with torch.no_grad():
        sm(torch.rand(2, 3, 32, 32))
    assert seen and drawn[0] > 0 and all(s < 0.2 for s in seen)
