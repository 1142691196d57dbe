"""``asymml.fix(model, privacy=True)`` swaps BatchNorm for GroupNorm; ``validate(privacy=True)`` lists couplings."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import asymml
from asymml.validate import group_count


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(inplace=True),
                         nn.Conv2d(48, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5), nn.BatchNorm1d(5))


@pytest.mark.parametrize("c, g", [(1, 1), (6, 6), (32, 32), (48, 24), (64, 32), (100, 25), (97, 1)])
def test_group_count_divides_channels(c: int, g: int) -> None:
    assert group_count(c) == g and c % group_count(c) == 0


def test_fix_privacy_swaps_every_batchnorm_for_groupnorm() -> None:
    model = _model().train()
    report = asymml.validate(model, privacy=True)
    assert [n for n, _ in report.coupling] == ["1", "4", "8"] and not report.ok
    assert "couples samples" in str(report)
    bn1 = model[1]
    with torch.no_grad():
        bn1.weight.uniform_(0.5, 1.5)
    gamma = bn1.weight.detach().clone()
    out = asymml.fix(model, privacy=True)
    assert out is model  # in place, like fix() without privacy
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    gn = model[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_channels == 48 and gn.num_groups == 24
    assert torch.equal(gn.weight, gamma)  # affine parameters carried over
    assert model[4].num_channels == 6 and not model[4].affine and model[8].num_channels == 5
    assert not model[2].inplace  # the in-place fix still applies
    report = asymml.validate(model, privacy=True)
    assert report.coupling == [] and report.ok
    y = model(torch.randn(3, 3, 4, 4))  # still runs, per sample
    assert y.shape == (3, 5)
    # per sample: changing one sample leaves the others' outputs unchanged
    x = torch.randn(3, 3, 4, 4)
    x2 = x.clone()
    x2[0] += 1
    torch.testing.assert_close(model(x)[1:], model(x2)[1:])


def test_validate_without_privacy_is_unchanged() -> None:
    report = asymml.validate(_model().eval())
    assert report.coupling == []
