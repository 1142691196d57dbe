"""``asymml bench`` measuring instrument: roofline counter, EPC paging model, paired statistics, the bench's
own blocked-time wrapper, persistent-memory accounting, step checks, rounds/batches/variants (small, fast)."""

from __future__ import annotations

import inspect
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import asymml
from asymml.bench import BenchConfig, derive_one, run_bench
from asymml.bench.derived import bootstrap_median_ci, paired_ratios
from asymml.bench.roofline import PAGE, SGX1, TrustedOpCounter, epc_page_moves, sgx1_projection
from asymml.bench.runner import BenchRunner, _BenchExecutor, _DeferredPool, _Entry, _TimedFuture, machine_busy
from asymml.profiling import TrustedMemoryMeter

CAL = {"conv_gflops": 50.0, "mem_gbps": 5.0, "conv_gflops_nchw": 40.0, "conv_gflops_channels_last": 50.0,
       "threads": 1}
PLACEMENT = "split" if "placement" in inspect.signature(asymml.split).parameters else None


def test_op_counter_counts_flops_and_full_size_bytes() -> None:
    x, w = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3)
    nb = x.numel() * 4
    with TrustedOpCounter(1.0, 1.0) as c:  # 1 GFLOP/s, 1 GB/s
        y = F.conv2d(x, w, padding=1)  # reads x and w, writes y
        z = torch.relu(y)  # reads y, writes z
        z.add_(1.0)  # in place: reads and writes z
        z.view(-1).t()  # views move nothing
        b = torch.empty_like(z)  # allocation only
        b.copy_(z)  # reads z, writes b (the destination is not read)
        b.normal_()  # writes b only
    conv_flops = 2 * 2 * 4 * 4 * 9 * 64
    assert c.flops == conv_flops
    assert c.bytes_read == (nb + w.numel() * 4) + nb + nb + nb
    assert c.bytes_written == nb + nb + nb + nb + nb
    assert c.ops == 5
    per_op = [max(conv_flops / 1e9, (2 * nb + w.numel() * 4) / 1e9), 2 * nb / 1e9, 2 * nb / 1e9, 2 * nb / 1e9,
              nb / 1e9]
    assert c.roofline_s == pytest.approx(sum(per_op))
    s = c.summary()
    assert s["top_ops"][0]["op"] in ("convolution", "relu", "add_", "copy_")
    assert {"roofline_s", "flops", "bytes_read", "bytes_written", "compute_bound_s", "memory_bound_s"} <= set(s)


def test_op_counter_out_arguments_and_foreach() -> None:
    a, o = torch.randn(100), torch.empty(100)
    ps, gs = [torch.randn(10), torch.randn(30)], [torch.randn(10), torch.randn(30)]
    with TrustedOpCounter(1.0, 1.0) as c:
        torch.add(a, 1.0, out=o)  # reads a, writes o (the out= buffer is not read)
    assert (c.bytes_read, c.bytes_written) == (400, 400)
    with TrustedOpCounter(1.0, 1.0) as c:
        torch._foreach_add_(ps, gs, alpha=-0.1)  # an SGD step: reads params and grads, writes params
    assert (c.bytes_read, c.bytes_written) == (320, 160)


def test_op_counter_charges_random_numbers_at_the_generator_rate() -> None:
    b = torch.empty(1000)
    with TrustedOpCounter(1.0, 1000.0, rng_gsamples=1e-3) as c:  # 1 M samples/s, 1 TB/s
        b.normal_()
    assert c.roofline_s == pytest.approx(1000 / 1e6)
    with TrustedOpCounter(1.0, 1000.0) as c:  # without a generator rate: the write alone
        b.normal_()
    assert c.roofline_s == pytest.approx(4000 / 1e12)


def test_op_counter_ignores_other_threads_and_skipped_storages() -> None:
    w = torch.randn(64)
    with TrustedOpCounter(1.0, 1.0, skip_storages={w.untyped_storage().data_ptr()}) as c:
        t = threading.Thread(target=lambda: torch.randn(1000).sum())  # another thread: not the trusted side
        t.start()
        t.join()
        (w * 2).sum()
    assert c.bytes_read == 64 * 4 + 64 * 4 and c.bytes_written == 64 * 4 + 4
    keys = {k for _, k, _ in c.trace}
    assert w.untyped_storage().data_ptr() not in keys  # public parameter: out of the EPC trace
    assert any(kind == "f" for kind, _, _ in c.trace)  # the temporary w*2 was freed inside


def test_epc_model_counts_page_moves() -> None:
    mib = 2**20
    # fits: nothing moves
    trace = [("w", 1, mib), ("r", 1, mib), ("w", 2, mib), ("r", 2, mib)]
    assert epc_page_moves(trace, 4 * mib)["pages_moved"] == 0
    # cyclic reads of 3 objects of 1 MiB through a 2 MiB EPC thrash: every touch pages its object in and
    # another one out (LRU), in the steady state
    cyc = [("r", k, mib) for k in (1, 2, 3)]
    m = epc_page_moves(cyc, 2 * mib)
    assert m["bytes_in"] == 3 * mib and m["bytes_out"] == 3 * mib and m["pages_moved"] == 6 * mib // PAGE
    # freeing an object returns its pages: the next fresh allocation needs no eviction
    fr = [("w", 1, mib), ("w", 2, mib), ("f", 1, 0), ("w", 3, mib), ("r", 2, mib), ("r", 3, mib), ("f", 2, 0),
          ("f", 3, 0)]
    assert epc_page_moves(fr, 2 * mib)["pages_moved"] == 0
    # sizes round up to whole pages
    assert epc_page_moves([("r", 1, 1), ("r", 2, 1)], PAGE)["bytes_in"] == 2 * PAGE


def test_sgx1_projection_arithmetic() -> None:
    mib = 2**20
    cyc = [("r", k, mib) for k in (1, 2, 3)]
    p = sgx1_projection(0.5, cyc, round_trips=10, transfer_bytes=10**9, mem_gbps=2.0, clock_hz=2e9,
                        constants={"epc_usable_bytes": 2 * mib})
    pages = 6 * mib // PAGE
    assert p["paging_s"] == pytest.approx(pages * SGX1["page_swap_cycles"] / 2 / 2e9)
    assert p["transitions_s"] == pytest.approx(10 * SGX1["transition_cycles"] / 2e9)
    assert p["copy_s"] == pytest.approx(1.0)
    assert p["projected_trusted_s"] == pytest.approx(0.5 + p["paging_s"] + p["transitions_s"] + 1.0)
    for k in ("epc_bytes", "epc_usable_bytes", "page_swap_cycles", "transition_cycles"):
        assert k in SGX1["sources"]


def test_paired_ratios_and_bootstrap() -> None:
    to = {"trusted_s": 3.0, "step_s": 3.0, "samples": {"trusted_s": [2.0, 4.0, 3.0], "step_s": [2.0, 4.0, 3.0],
                                                       "round": [0, 1, 2]}}
    a = {"trusted_s": 1.0, "step_s": 1.0, "accelerator_s": 0.0,
         "samples": {"trusted_s": [1.0, 4.0, 1.0], "step_s": [1.0, 4.0, 1.0], "round": [0, 1, 2]}}
    assert paired_ratios(to, a) == [2.0, 1.0, 3.0]
    d = derive_one(to, a, None)
    assert d["trusted_speedup"] == 2.0 and d["trusted_speedup_rounds"] == 3
    assert d["trusted_speedup_ratio_of_medians"] == pytest.approx(3.0 / 1.0)  # what paired ratios avoid
    lo, hi = bootstrap_median_ci([1.0, 2.0, 3.0, 4.0, 5.0], n=500, seed=1)
    assert 1.0 <= lo <= 3.0 <= hi <= 5.0
    assert bootstrap_median_ci([1.0]) is None
    # rounds missing on one side are not paired
    a2 = dict(a, samples={"trusted_s": [1.0, 2.0], "round": [1, 2]})
    assert paired_ratios(to, a2) == [4.0, 1.5]
    # roofline and SGX1 figures come from the records
    to.update(roofline_s=1.0, sgx1={"projected_trusted_s": 8.0, "paging_s": 5.0})
    a.update(roofline_s=0.25, sgx1={"projected_trusted_s": 2.0, "paging_s": 0.0})
    d = derive_one(to, a, None)
    assert d["limit_roofline"] == 4.0 and d["efficiency_roofline"] == 0.5 and d["projected_sgx1_speedup"] == 4.0


def test_timed_future_measures_waits_and_counts_results() -> None:
    ex = _BenchExecutor("cpu", serialize=False)
    try:
        ex.step_thread = threading.get_ident()
        meter = TrustedMemoryMeter()
        ex.instruments = (meter,)
        out = torch.ones(256)
        fut = _TimedFuture(ex._pool.submit(lambda: time.sleep(0.05) or {"y": out}), ex)
        with meter:
            assert fut.result(timeout=10)["y"] is out
        assert ex.blocked_s >= 0.04
        assert ex.received_bytes == 1024 and meter.peak >= 1024  # a held accelerator result is trusted memory
        # waits of other threads do not block the trusted thread
        ex.reset_counters()
        f2 = _TimedFuture(ex._pool.submit(lambda: time.sleep(0.03)), ex)
        t = threading.Thread(target=f2.result)
        t.start()
        t.join(10)
        assert ex.blocked_s == 0.0
        # exceptions pass through
        f3 = _TimedFuture(ex._pool.submit(lambda: 1 / 0), ex)
        with pytest.raises(ZeroDivisionError):
            f3.result(timeout=10)
        assert isinstance(f3.exception(timeout=10), ZeroDivisionError)
    finally:
        ex.close()


def test_timed_future_starts_deferred_jobs() -> None:
    pool = ThreadPoolExecutor(1)
    ex = _BenchExecutor("cpu", serialize=False)
    try:
        ex.step_thread = threading.get_ident()
        dp = _DeferredPool(pool)
        ran: list[int] = []
        fut = _TimedFuture(dp.submit(lambda: ran.append(1) or 7), ex)
        assert ran == [] and not fut.done()
        assert fut.result(timeout=10) == 7 and ran == [1]
    finally:
        ex.close()
        pool.shutdown()


def test_memory_meter_carries_persistent_storages_over() -> None:
    keep = []
    with TrustedMemoryMeter() as warm:
        keep.append(torch.ones(1024) * 2)  # survives: a persistent cache
        (torch.ones(4096) * 2).sum()  # freed inside
    alive = warm.live_storages()
    assert [st.nbytes() for st in alive] == [4096]
    m = TrustedMemoryMeter()
    for st in alive:
        m.add_storage(st)
    assert m.current == m.peak == 4096
    keep.clear()
    del alive, st
    assert m.current == 0  # freed caches leave the count


def test_cholesky_and_triangular_solve_flops() -> None:
    n, k, b = 30, 7, 4
    a = torch.randn(b, n, n)
    g = a @ a.mT + n * torch.eye(n)
    rhs = torch.randn(b, n, k)
    with FlopCounterMode(display=False) as fc:
        L, _ = torch.linalg.cholesky_ex(g)
    assert fc.get_total_flops() == b * (n**3 // 3)
    with FlopCounterMode(display=False) as fc:
        torch.linalg.solve_triangular(L, rhs, upper=False)
    assert fc.get_total_flops() == b * n * n * k
    with FlopCounterMode(display=False) as fc:
        torch.linalg.solve_triangular(L, rhs.mT, upper=False, left=False)
    assert fc.get_total_flops() == b * n * n * k


def test_machine_busy_flag() -> None:
    assert machine_busy(3.5, 1.0, 2, 2) is True  # other work before the run
    assert machine_busy(0.5, 3.9, 2, 2) is False  # the run's own load
    assert machine_busy(0.5, 4.5, 2, 2) is True
    assert machine_busy(None, None, 2, 1) is False


def test_step_checks_flag_mismatches() -> None:
    e = _Entry("asym", "asym", None, None, torch.nn.Linear(1, 1), None, False)
    e.steps = [{"released_bytes": 10, "ranks": {"a": 2}}, {"released_bytes": 12, "ranks": {"a": 3}}]
    c = BenchRunner._step_checks(e, {"released_bytes": 10, "ranks": {"a": 2}})
    assert not c["released_match"] and not c["ranks_match"] and len(c["warnings"]) == 2
    e.steps = e.steps[:1]
    c = BenchRunner._step_checks(e, {"released_bytes": 10, "ranks": {"a": 2}})
    assert c["released_match"] and c["ranks_match"] and not c["warnings"]


def test_rounds_shuffle_modes_with_fresh_batches_and_variants(monkeypatch) -> None:
    seen: list[tuple[str, int, float]] = []
    orig = BenchRunner._timed_step

    alive: list[torch.Tensor] = []

    def spy(self, e, phase, x, y):  # type: ignore[no-untyped-def]
        alive.append(x)  # kept, so that ids are not reused
        seen.append((e.label, id(x), float(x.sum())))
        return orig(self, e, phase, x, y)

    monkeypatch.setattr(BenchRunner, "_timed_step", spy)
    cfg = BenchConfig(models=["vgg11"], input_sizes=[8], batch_sizes=[2], width=0.125, phases=("infer",),
                      modes=("trusted-only", "asym"), rounds=6, repeats=1, warmup=0, device="cpu",
                      calibration=CAL, noise=0.5, verify=True, placement=PLACEMENT)
    res = run_bench(cfg, log=lambda s: None)
    labels = {r["label"] for r in res["runs"]}
    assert {"trusted-only", "asym/protected", "asym/protected+noise"} <= labels
    verify_ok = "asym/protected+verify" in labels
    assert verify_ok or any("verify" in w for w in res["warnings"])
    n = len(labels)
    rounds = [seen[i:i + n] for i in range(0, len(seen), n)]
    assert len(rounds) == 6
    orders = {tuple(lbl for lbl, _, _ in r) for r in rounds}
    assert len(orders) > 1  # the order of modes is shuffled per round
    assert len({i for _, i, _ in seen}) == len(seen)  # every step gets its own tensor
    sums = [{s for _, _, s in r} for r in rounds]
    assert all(len(s) == 1 for s in sums)  # the same batch values within a round (paired)
    assert len({next(iter(s)) for s in sums}) == 6  # fresh values every round
    der = {d["label"]: d for d in res["derived"]}
    assert der["asym/protected+noise"]["variant"] == "noise"
    assert statistics.median(res["runs"][0]["samples"]["trusted_s"]) == res["runs"][0]["trusted_s"]
    noisy = next(r for r in res["runs"] if r["label"] == "asym/protected+noise")
    assert noisy["released_bytes"] > 0 and noisy["step_checks"]["released_match"]


def _paired_infer(warmup: int) -> BenchConfig:
    """A tiny trusted-only/asym inference bench of one round with ``warmup`` warm-up steps."""
    return BenchConfig(models=["vgg11"], input_sizes=[8], batch_sizes=[2], width=0.125, phases=("infer",),
                       modes=("trusted-only", "asym"), rounds=1, repeats=1, warmup=warmup, device="cpu",
                       calibration=CAL, placement=PLACEMENT)


def test_persistent_caches_and_received_results_count_as_trusted_memory(monkeypatch) -> None:
    cache: dict[str, torch.Tensor] = {}
    orig = BenchRunner._step

    def step(self, e, phase, x, y):  # type: ignore[no-untyped-def]
        if e.mode == "trusted-only" and "c" not in cache:
            cache["c"] = torch.ones(2**18)  # 1 MiB made by the trusted thread in a step, kept across steps
        return orig(self, e, phase, x, y)

    monkeypatch.setattr(BenchRunner, "_step", step)
    res = run_bench(_paired_infer(warmup=1), log=lambda s: None)
    to = next(r for r in res["runs"] if r["mode"] == "trusted-only")
    assert to["persistent_bytes"] >= 2**20 and to["trusted_peak_bytes"] >= to["persistent_bytes"]
    a = next(r for r in res["runs"] if r["mode"] == "asym")
    assert a["persistent_bytes"] < 2**20
    assert a["received_bytes"] > 0 and a["round_trips"] > 0  # accelerator results the trusted side held


def test_warm_up_steps_between_the_first_and_last_run_without_the_memory_meter(monkeypatch) -> None:
    """The planner's trial times the warm-up steps; the memory meter's per-op bookkeeping slows a split (many
    ops) far more than the dense layer it is compared with, so only the first and the last warm-up step run
    under it (what they make and survives is the persistent state): a cache made in the first step is still
    counted as persistent, one remade every step in the instrumented step's own peak."""
    from asymml.profiling import TrustedMemoryMeter

    seen: list[tuple[str, bool]] = []
    cache: dict[str, torch.Tensor] = {}
    orig = BenchRunner._step

    def step(self, e, phase, x, y):  # type: ignore[no-untyped-def]
        seen.append((e.mode, TrustedMemoryMeter.active() is not None))
        if e.mode == "trusted-only":
            cache.setdefault("once", torch.ones(2**18))  # 1 MiB made in the first step, kept
            cache["every"] = torch.ones(2**18)  # 1 MiB remade every step, the last one kept
        return orig(self, e, phase, x, y)

    monkeypatch.setattr(BenchRunner, "_step", step)
    res = run_bench(_paired_infer(warmup=4), log=lambda s: None)
    warm = [m for mode, m in seen if mode == "trusted-only"][:4]
    assert warm == [True, False, False, True]
    to = next(r for r in res["runs"] if r["mode"] == "trusted-only")
    assert to["persistent_bytes"] >= 2**20 and to["trusted_peak_bytes"] >= 2 * 2**20
