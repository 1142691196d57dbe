"""Decomposition algorithms and rank policies."""

from __future__ import annotations

import pytest
import torch

from asymml.decomposition import (
    AdaptiveRank,
    FixedRank,
    RankList,
    RankSchedule,
    adaptive_rank,
    decompose,
    parse_rank,
)


def _lowrank(B=3, C=16, N=64, r=4, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(B, C, r, generator=g)
    V = torch.randn(B, r, N, generator=g)
    return U @ V + noise * torch.randn(B, C, N, generator=g)


@pytest.mark.parametrize("method", ["power", "eigh", "svd", "rsvd"])
@pytest.mark.parametrize("basis", ["sample", "batch"])
def test_residual_is_exact_and_small(method: str, basis: str) -> None:
    X = _lowrank()
    f, R = decompose(X, 4, method=method, basis=basis, iters=4)
    assert torch.allclose(f.dense() + R, X, atol=1e-5)
    ratio = R.pow(2).sum() / X.pow(2).sum()
    limit = 1e-4 if basis == "sample" else 0.9  # a shared basis cannot capture 3 different subspaces
    assert ratio < limit
    if basis == "sample":
        assert torch.allclose(f.U.transpose(1, 2) @ f.U, torch.eye(4).expand(3, 4, 4), atol=1e-4)


@pytest.mark.parametrize("C,N", [(32, 8), (8, 32)])
def test_eigh_matches_svd_optimum(C: int, N: int) -> None:
    X = torch.randn(2, C, N, dtype=torch.float64)
    _, R = decompose(X, 3, method="eigh")
    s = torch.linalg.svdvals(X)
    assert torch.allclose(R.pow(2).sum((1, 2)), s[:, 3:].pow(2).sum(-1), rtol=1e-8)


def test_power_warm_start_converges_faster() -> None:
    X = _lowrank(noise=0.3)
    _, R_exact = decompose(X, 4, method="eigh")
    f1, R1 = decompose(X, 4, method="power", iters=1, generator=torch.Generator().manual_seed(0))
    f2, R2 = decompose(X, 4, method="power", iters=1, init=f1.U)
    assert R2.pow(2).sum() <= R1.pow(2).sum() + 1e-6
    assert R2.pow(2).sum() <= 1.05 * R_exact.pow(2).sum()


def test_rank_zero_releases_everything() -> None:
    X = torch.randn(2, 4, 9)
    f, R = decompose(X, 0)
    assert f.rank == 0 and torch.equal(R, X)


def test_policies() -> None:
    X = torch.randn(1, 64, 256)
    assert FixedRank(5).rank_for(3, X) == 5
    assert RankList((1, 2, 3)).rank_for(7, X) == 3
    sched = RankSchedule(2, 2, 32)
    assert [sched.rank_for(i, X) for i in range(7)] == [2, 4, 8, 16, 32, 32, 32]
    assert parse_rank("schedule") == sched
    assert parse_rank("schedule:1:3:20") == RankSchedule(1, 3.0, 20)
    assert parse_rank("2,4,8") == RankList((2, 4, 8))
    assert parse_rank(3) == FixedRank(3)
    assert parse_rank("adaptive:0.05") == AdaptiveRank(0.05)


def test_adaptive_rank_meets_tau() -> None:
    X = _lowrank(C=32, N=100, r=6, noise=0.05)
    for tau in (0.5, 0.1, 0.01, 1e-4):
        r = adaptive_rank(X, tau)
        _, R = decompose(X, r, method="eigh")
        ratios = R.pow(2).sum((1, 2)) / X.pow(2).sum((1, 2))
        assert (ratios <= tau + 1e-6).all(), (tau, r, ratios)
        if r > 1:
            _, R2 = decompose(X, r - 1, method="eigh")
            assert ((R2.pow(2).sum((1, 2)) / X.pow(2).sum((1, 2))) > tau).any(), "not the smallest rank"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "x", "adaptive:0", "schedule:2:0.5:8", [], True])
def test_bad_rank_specs(bad) -> None:
    with pytest.raises(ValueError):
        parse_rank(bad)
