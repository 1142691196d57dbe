"""The release path as one object (``SplitModule.release_path``) and the runtime's observers.

* its state (random-start generator, warm-start bases) round-trips through ``state_dict`` and through the
  module's extra state, in the format checkpoints already hold;
* releases are exactly decomposition (seeded starts, warm-started from the previous step's basis) →
  noise (on the residual, with the layer's name; gradient residuals only when ``noise_grads``) → release,
  recomputed here by hand from :func:`asymml.decomposition.decompose`;
* an attached :class:`~asymml.profiling.RuntimeObserver` sees every split region, split point and release;
  with no profiler running the runtime opens no ``record_function`` label.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import asymml
from asymml.decomposition import decompose
from asymml.errors import CheckpointError
from asymml.profiling import Recorder, RuntimeObserver


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).double()


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _split(model: nn.Module, **kw) -> asymml.SplitModule:
    return asymml.split(model, rank=2, placement="split", audit=True, **kw)


def _releases(sm: asymml.SplitModule, kind: str | None = None) -> list:
    return [r for r in sm.executor.ledger if r.kind != "weight" and (kind is None or r.kind == kind)]


def _input_reference(x: torch.Tensor, init: torch.Tensor | None, gen: torch.Generator):
    """The input's release by hand: channels-last batch, rank 1, power iteration from ``gen``/``init``."""
    xc = x.contiguous(memory_format=torch.channels_last)
    f, R = decompose(xc.reshape(2, 3, 36), 1, method="power", iters=2, basis="sample", init=init, generator=gen)
    return f, R.reshape(xc.shape)


def test_state_dict_round_trip_continues_bit_for_bit() -> None:
    model = _net()
    sm = _split(model)
    sm(_x()).sum().backward()
    state = sm.release_path.state_dict()
    assert set(state) == {"version", "gen", "warm"} and state["version"] == 1
    assert set(state["warm"]) == set(sm.release_path.warm) and state["warm"]  # warm starts kept, no noise
    assert {k: v.shape for k, v in sm.get_extra_state()["warm"].items()} == {k: v.shape for k, v in state["warm"].items()}

    twin = _split(copy.deepcopy(model))
    twin.set_extra_state(sm.get_extra_state())  # the checkpoint's path (training/checkpoint.py)
    n, m = len(sm.executor.ledger), len(twin.executor.ledger)
    sm(_x(2)).sum().backward()
    twin(_x(2)).sum().backward()
    a = [r for r in sm.executor.ledger[n:] if r.kind != "weight"]
    b = [r for r in twin.executor.ledger[m:] if r.kind != "weight"]
    assert [(r.layer, r.kind) for r in a] == [(r.layer, r.kind) for r in b]
    assert all(torch.equal(r.tensor, s.tensor) for r, s in zip(a, b))
    # a fresh model without the state draws other starts: the state is what made them equal
    fresh = _split(copy.deepcopy(model))
    fresh(_x(2)).sum().backward()
    assert not all(torch.equal(r.tensor, s.tensor) for r, s in zip(a, _releases(fresh)))


def test_state_dict_refuses_foreign_state() -> None:
    sm = _split(_net())
    good = sm.release_path.state_dict()
    for bad in (None, {}, {**good, "version": 2}, {**good, "warm": {"x": 1}}, {**good, "gen": torch.zeros(3)}):
        with pytest.raises(CheckpointError):
            sm.set_extra_state(bad)


def test_releases_are_seeded_decomposition_warm_started_then_released() -> None:
    sm = _split(_net())
    x1, x2 = _x(1), _x(2)
    gen = torch.Generator().manual_seed(0)  # split(seed=0)
    with torch.no_grad():
        sm(x1)
        f1, r1 = _input_reference(x1, None, gen)
        assert torch.equal(_releases(sm)[0].tensor, r1)
        assert torch.equal(sm.release_path.warm["input"], f1.U)
        n = len(sm.executor.ledger)
        sm(x2)
    _, r2 = _input_reference(x2, f1.U, gen)  # warm-started from the first batch's basis
    second = [r for r in sm.executor.ledger[n:] if r.kind != "weight"][0]
    assert second.layer == "input" and torch.equal(second.tensor, r2)


class _AddOne:
    """A stand-in mechanism that records what it is given (a ReleaseMechanism is any callable)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, torch.Tensor]] = []

    def __call__(self, r: torch.Tensor, *, layer: str) -> torch.Tensor:
        self.calls.append((layer, r.clone()))
        return r + 1


@pytest.mark.parametrize("noise_grads", [True, False])
def test_noise_goes_on_every_residual_with_fresh_starts(noise_grads: bool) -> None:
    mech = _AddOne()
    sm = asymml.split(_net(), rank=2, placement="split", audit=True, noise=mech)
    sm.cfg.noise_grads = noise_grads
    path = sm.release_path
    assert not path.warm_starts and path.starts() is not path.generator
    assert path.starts().initial_seed() != path.starts().initial_seed()
    sm(_x()).sum().backward()
    assert path.warm == {}  # no warm starts with noise: each release depends on its own batch only
    fwd = [r for r in _releases(sm) if r.kind in ("residual", "activation")]
    grads = _releases(sm, "grad_residual")
    assert fwd and grads
    noised = {layer: t for layer, t in mech.calls}
    for r in fwd:
        assert torch.equal(r.tensor, noised[r.layer] + 1)
    for r in grads:
        assert (r.layer in noised) is noise_grads
        if noise_grads:
            assert torch.equal(r.tensor, noised[r.layer] + 1)


class _Seen(RuntimeObserver):
    def __init__(self) -> None:
        self.regions: list[tuple[str, str]] = []
        self.points: list[str] = []
        self.released_kinds: list[str] = []
        self.ops: list[str] = []

    def region(self, phase: str, layer: str, seconds: float) -> None:
        assert seconds >= 0
        self.regions.append((phase, layer))

    def trusted_op(self, layer: str, seconds: float) -> None:
        self.ops.append(layer)

    def split_point(self, layer: str, rank: int, energy_ratio: torch.Tensor) -> None:
        self.points.append(layer)

    def released(self, tensor: torch.Tensor, layer: str, kind: str) -> None:
        self.released_kinds.append(kind)


def test_observer_sees_every_region_split_point_and_release() -> None:
    sm = _split(_net())
    seen = _Seen()
    sm.add_observer(seen)
    sm(_x()).sum().backward()
    names = {lp.layer for lp in sm.profile().layers if lp.kind == "split"}  # regions that ran split
    assert {"0", "2"} <= names  # both convolutions (the linear layer's input is not split: plain ops)
    assert {layer for phase, layer in seen.regions if phase == "forward"} == names
    assert {layer for phase, layer in seen.regions if phase == "backward"} == names
    assert set(seen.points) == set(sm.release_stats())
    assert seen.released_kinds == [r.kind for r in _releases(sm)]
    assert "1" in seen.ops  # the ReLU between the convolutions ran trusted
    sm.remove_observer(seen)
    n = len(seen.regions)
    sm(_x())
    assert len(seen.regions) == n


def test_no_label_and_no_counting_when_nobody_looks() -> None:
    rec = Recorder()
    assert rec.label("decompose") is rec.label("release")  # one shared no-op context
    assert rec.forward_pass(torch.zeros(1)) is rec.label("decompose")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        assert isinstance(rec.label("decompose"), torch.profiler.record_function)
    sm = _split(_net())
    sm(_x()).sum().backward()
    prof = sm.profile()
    assert not prof.counted and prof.total["trusted_flops"] == 0 and prof.total["trusted_s"] > 0
