"""Micro-batched inference (``split(micro_batch=m)``): the results of the whole batch, released in
micro-batches, with a trusted working set of one micro-batch."""

from __future__ import annotations

import pytest
import torch

import asymml
from asymml.errors import ConfigError, InputError
from asymml.models import get_model


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_model("vgg11_bn", num_classes=10).double().eval()


def _run(model: torch.nn.Module, x: torch.Tensor, audit: bool = True, **kw
         ) -> tuple[torch.Tensor, asymml.SplitModule]:
    sm = asymml.split(model, placement="split", audit=audit, **kw).eval()
    sm.set_profiling(True)
    with torch.no_grad():
        y = sm(x)
    return y, sm


@pytest.mark.parametrize("mb", [1, 3])
def test_micro_batched_inference_is_exact_and_releases_micro_batches(model, mb: int) -> None:
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    ref = model(x)
    y, sm = _run(model, x, micro_batch=mb)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    residuals = [r for r in sm.executor.ledger if r.kind in ("residual", "activation")]
    assert residuals, "nothing was split"
    assert max(r.shape[0] for r in residuals) == mb  # every release is one micro-batch's
    assert sum(r.shape[0] for r in residuals if r.layer == residuals[0].layer) == 8  # every sample went once


def test_micro_batches_bound_the_trusted_peak(model) -> None:
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    _, whole = _run(model, x, audit=False)  # (audit snapshots would be counted: they are made in process)
    _, micro = _run(model, x, audit=False, micro_batch=1)
    assert micro.profile().trusted_peak_bytes is not None
    # one sample's activations instead of eight: well under a quarter (weights are public, not counted)
    assert micro.profile().trusted_peak_bytes < whole.profile().trusted_peak_bytes / 4


def test_training_keeps_the_whole_batch(model) -> None:
    model.train()
    sm = asymml.split(model, placement="split", audit=True, micro_batch=2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    sm(x).sum().backward()
    assert {r.shape[0] for r in sm.executor.ledger if r.kind == "residual"} == {4}


def test_train_mode_batchnorm_is_refused_without_autograd(model) -> None:
    model.train()
    sm = asymml.split(model, placement="split", micro_batch=2)
    with torch.no_grad(), pytest.raises(InputError, match="eval-mode BatchNorm"):
        sm(torch.randn(4, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_invalid_micro_batch(model, bad) -> None:
    with pytest.raises(ConfigError, match="micro_batch"):
        asymml.split(model, micro_batch=bad)


def test_batchnorm_without_running_statistics_is_refused(model) -> None:
    # eval mode, but without running statistics BatchNorm still normalises with the batch's own statistics
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    sm = asymml.split(model, placement="split", micro_batch=2)
    with torch.no_grad(), pytest.raises(InputError, match="running statistics"):
        sm(torch.randn(4, 3, 32, 32, dtype=torch.float64))
