"""Micro-batched training by gradient accumulation (:func:`asymml.microbatch.accumulate`, ``Trainer`` with a
micro-batch): the step of the whole batch, exactly, with one micro-batch's activations on the trusted side."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import asymml
from asymml import accumulate
from asymml.errors import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net(norm: str = "group") -> nn.Module:
    """A small CIFAR-style CNN (float64): conv-norm-relu-pool twice, then a classifier."""
    def nrm(c: int) -> nn.Module:
        return nn.GroupNorm(2, c) if norm == "group" else nn.BatchNorm2d(c) if norm == "batch" else nn.Identity()

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nrm(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nrm(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    ).double()


def _batches(steps: int, b: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (b,), generator=g))
            for _ in range(steps)]


def _train(model: nn.Module, mode: str, backward: str, micro_batch: int | None, steps: int = 3,
           ) -> tuple[nn.Module, list[float], asymml.SplitModule]:
    sm = asymml.split(model, mode=mode, backward=backward, placement="split", audit=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, y in _batches(steps):
        opt.zero_grad(set_to_none=True)
        res = accumulate(sm, x, y, F.cross_entropy, micro_batch=micro_batch)
        losses.append(res.loss)
        opt.step()
    return model, losses, sm


@pytest.mark.parametrize("mode,backward", [("asym", "protected"), ("asym", "paper"), ("trusted-only", "protected")])
@pytest.mark.parametrize("norm", ["group", "none"])
def test_micro_batched_steps_equal_the_whole_batch(mode: str, backward: str, norm: str) -> None:
    base = _net(norm)
    whole, lw, _ = _train(copy.deepcopy(base), mode, backward, None)
    micro, lm, sm = _train(copy.deepcopy(base), mode, backward, 3)  # 8 = 3 + 3 + 2: unequal micro-batches
    for (name, p), q in zip(whole.named_parameters(), micro.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-10, msg=f"{mode}/{backward}: {name} differs")
    assert lm == pytest.approx(lw, rel=1e-10, abs=1e-12)
    # the parameters did move (a step that changes nothing would pass trivially)
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), micro.parameters()))
    if mode == "asym":  # every release is one micro-batch's, every sample went through
        res = [r for r in sm.executor.ledger if r.kind == "residual"]
        assert res and {r.shape[0] for r in res} == {3, 2}


def test_result_counts_loss_and_correct_of_the_whole_batch() -> None:
    model = _net()
    sm = asymml.split(model, mode="trusted-only")
    (x, y), = _batches(1)
    r = accumulate(sm, x, y, micro_batch=3)
    with torch.no_grad():
        out = model(x)
    assert r.samples == 8 and r.micro_batches == 3
    assert r.loss == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-12)
    assert r.correct == int((out.argmax(1) == y).sum())


def test_micro_batches_lower_the_trusted_training_peak() -> None:
    peaks = {}
    for mb in (None, 1):
        model = _net()
        sm = asymml.split(model, placement="split")
        sm.set_profiling(True)
        (x, y), = _batches(1, b=16)
        accumulate(sm, x, y, micro_batch=mb)
        peaks[mb] = sm.profile().trusted_peak_bytes
    assert peaks[1] is not None and peaks[None] is not None
    # one sample's saved activations instead of sixteen (weights are public, not counted)
    assert peaks[1] < peaks[None] / 4, peaks


def test_train_mode_batchnorm_is_refused() -> None:
    model = _net("batch")
    sm = asymml.split(model, placement="split")
    (x, y), = _batches(1)
    with pytest.raises(ConfigError, match="train-mode BatchNorm"):
        accumulate(sm, x, y, micro_batch=2)
    assert all(p.grad is None for p in model.parameters())  # refused before any backward
    accumulate(sm, x, y, micro_batch=8)  # one micro-batch of the whole batch: nothing to refuse
    model.eval()
    accumulate(sm, x, y, micro_batch=2)  # eval-mode BatchNorm: per-sample, exact


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_invalid_micro_batch(bad: Any) -> None:
    sm = asymml.split(_net(), mode="trusted-only")
    (x, y), = _batches(1)
    with pytest.raises(ConfigError, match="micro_batch"):
        accumulate(sm, x, y, micro_batch=bad)


def test_targets_must_match_inputs() -> None:
    sm = asymml.split(_net(), mode="trusted-only")
    (x, y), = _batches(1)
    with pytest.raises(asymml.InputError, match="8 inputs but 7 targets"):
        accumulate(sm, x, y[:7], micro_batch=2)


# ---------------------------------------------------------------------------------------- the trainer

TINY: dict[str, Any] = dict(image_size=16, width=0.25, limit_train=64, limit_test=64, batch_size=16,
                            test_batch_size=64, lr=0.05, progress=False, threads=1, epochs=1, norm="group")


def _trainer(out: Path, micro_batch: int | None, **kw: Any) -> Any:
    from asymml.training import TrainConfig, Trainer

    cfg = TrainConfig(**{**TINY, "out": str(out), **kw})
    if micro_batch is not None:
        cfg.micro_batch = micro_batch  # (TrainConfig's own field where it exists)
    return Trainer(cfg, echo=lambda s: None)


def test_trainer_micro_batched_run_equals_the_whole_batch_run(tmp_path: Path) -> None:
    losses: dict[Any, list[float]] = {}
    params = {}
    for mb in (None, 4):
        t = _trainer(tmp_path / f"mb{mb}", mb)
        t.callback = lambda tr, info, mb=mb: losses.setdefault(mb, []).append(info["loss"])
        t.fit()
        params[mb] = [p.detach().clone() for p in t.model.parameters()]
    assert len(losses[4]) == 4
    # float32: the same sums in another order, not bit for bit
    assert losses[4] == pytest.approx(losses[None], rel=1e-4)
    for p, q in zip(params[None], params[4]):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)


def test_trainer_refuses_batchnorm_with_micro_batches(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train-mode BatchNorm"):
        _trainer(tmp_path / "bn", 4, norm="batch")


def test_micro_batched_noised_steps_are_accounted_like_whole_batches(tmp_path: Path) -> None:
    """Each sample is in one micro-batch: a step is accounted with one micro-batch's releases (not their sum),
    the same as the whole batch's step; the ledger still counts every transfer."""
    acct, kinds = {}, {}
    for mb in (None, 4):
        t = _trainer(tmp_path / f"n{mb}", mb, noise=1.0, backward="paper", noise_seed=3)
        t.fit()
        acct[mb] = t.accountant.state_dict()
        kinds[mb] = dict(t.releases_by_kind_per_step)
    assert acct[4] == acct[None] and acct[None]
    assert kinds[None]["residual"] > 0 and kinds[4]["residual"] == 4 * kinds[None]["residual"]
