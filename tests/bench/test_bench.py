"""``asymml bench``: JSON fields, derived-figure formulas, sweeps and the CLI (tiny models; not speed)."""

from __future__ import annotations

import inspect
import json
import math
import statistics

import pytest
import torch
from torch.nn.grad import conv2d_weight
from torch.utils.flop_counter import FlopCounterMode

import asymml
from asymml.bench import (
    BenchConfig,
    analytic_fwd_conv_limit,
    derive_one,
    markdown,
    parse_sweep,
    projected_speedup,
    run_bench,
    run_sweep,
)
from asymml.bench.derived import conv_macs
from asymml.bench.flops import flop_counter, group_aware_registry
from asymml.bench.runner import build_model, resolve_family
from asymml.bench.sweep import loglog_slope
from asymml.cli.main import main

RUN_FIELDS = ("model", "input_size", "batch_size", "mode", "backward", "phase", "trusted_s", "accelerator_s",
              "step_s", "trusted_flops", "total_flops", "trusted_peak_bytes", "released_bytes")
DERIVED_FIELDS = ("trusted_speedup", "limit", "efficiency", "asym_vs_plain", "projected_speedup", "limit_roofline",
                  "efficiency_roofline", "projected_sgx1_speedup")


CAL = {"conv_gflops": 50.0, "mem_gbps": 5.0, "conv_gflops_nchw": 40.0, "conv_gflops_channels_last": 50.0,
       "threads": 1}


# force splitting where the runtime has a cost-aware placement (it would keep these tiny layers trusted)
PLACEMENT = "split" if "placement" in inspect.signature(asymml.split).parameters else None


def _tiny(**kw) -> BenchConfig:
    base = dict(models=["vgg11"], input_sizes=[8], batch_sizes=[2], width=0.125, repeats=2, rounds=3, warmup=1,
                device="cpu", calibration=CAL, placement=PLACEMENT)
    base.update(kw)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def result() -> dict:
    return run_bench(_tiny(), log=lambda s: None)


def test_runs_have_every_field_and_mode(result: dict) -> None:
    runs = result["runs"]
    for r in runs:
        for k in RUN_FIELDS:
            assert k in r, k
        assert r["phase"] in ("train", "infer")
        assert r["step_s"] > 0 and r["trusted_s"] >= 0 and r["accelerator_s"] >= 0
        # paired modes run every round, context modes (plain, noise-only) the first `repeats` rounds
        assert len(r["samples"]["step_s"]) == (3 if r["mode"] in ("trusted-only", "asym") else 2)
        assert r["rounds"] == 3 and r["serialized"] is True  # a CPU accelerator serializes by default
        assert r["optimizer_step"] is (r["phase"] == "train")
        assert r["spread"]["step_s"]["min"] <= r["step_s"] <= r["spread"]["step_s"]["max"]
    train = {(r["mode"], r["backward"]) for r in runs if r["phase"] == "train"}
    assert train == {("plain", None), ("trusted-only", None), ("asym", "protected"), ("asym", "paper"),
                     ("noise-only", "protected")}
    infer = {(r["mode"], r["backward"]) for r in runs if r["phase"] == "infer"}
    assert infer == {("plain", None), ("trusted-only", None), ("asym", None), ("noise-only", None)}


def test_asym_runs_record_the_planners_decisions() -> None:
    """Which layers ran split is part of what a speed-up means: every asym record carries the cost-aware
    planner's per-layer decision with its predicted costs, other modes none."""
    res = run_bench(_tiny(placement="auto", modes=("trusted-only", "asym"), phases=("infer",), repeats=1,
                          rounds=1), log=lambda s: None)
    for r in res["runs"]:
        if r["mode"] != "asym":
            assert r["planner"] is None
            continue
        assert r["planner"], "no decisions recorded"
        for layer, d in r["planner"].items():
            assert ":" in layer and isinstance(d["split"], bool) and d["dense_s"] > 0 and d["split_s"] > 0
    assert "planner" in res["definitions"]


def test_per_mode_semantics(result: dict) -> None:
    for r in result["runs"]:
        if r["mode"] == "plain":
            assert r["trusted_s"] == 0 and r["accelerator_s"] == r["step_s"]
            assert r["trusted_flops"] == 0 and r["accelerator_flops"] == r["total_flops"] > 0
        elif r["mode"] == "trusted-only":
            assert r["trusted_s"] == r["step_s"] and r["accelerator_s"] == 0
            assert r["released_bytes"] == 0 and r["accelerator_flops"] == 0
            # the trusted side runs the whole model: same FLOPs as plain
            assert r["trusted_flops"] == pytest.approx(r["total_flops"], rel=1e-6)
            assert r["trusted_peak_bytes"] > 0
        else:
            assert r["released_bytes"] > 0
            assert r["accelerator_flops"] > 0
            assert r["trusted_s"] <= r["step_s"] + 1e-9
            assert r["trusted_flop_fraction"] == pytest.approx(r["trusted_flops"] / r["total_flops"])
        if r["mode"] == "asym":
            assert set(r["released_by_kind"]) <= {"residual", "grad_residual", "grad", "weight"}
            assert r["limit_fwd_conv_analytic"] is not None and r["limit_fwd_conv_analytic"] > 1
            assert r["trusted_resident_bytes"] == r["trusted_peak_bytes"] + r["model_bytes"]
            assert r["trusted_peak_bytes"] > 0
        if r["mode"] == "asym" and r["backward"] == "protected":
            assert "grad" not in r["released_by_kind"]  # protected mode never releases a full gradient
        if r["mode"] == "asym" and r["backward"] == "paper":
            assert r["released_by_kind"].get("grad", 0) > 0
        if r["mode"] == "noise-only":  # where the noise time went (generated ahead or on the critical path)
            nz = r["noise"]
            assert nz["releases"] > 0 and nz["elements"] > 0 and nz["samples"] > 0
            assert nz["hits"] + nz["late"] + nz["misses"] == nz["releases"]
        else:
            assert r["noise"] is None


def test_derived_formulas(result: dict) -> None:
    runs = {(r["phase"], r["mode"], r["backward"]): r for r in result["runs"]}
    der = result["derived"]
    assert {(d["phase"], d["backward"]) for d in der} == {("train", "protected"), ("train", "paper"),
                                                          ("infer", None)}
    for d in der:
        for k in DERIVED_FIELDS:
            assert k in d and d[k] is not None, k
        to = runs[(d["phase"], "trusted-only", None)]
        pl = runs[(d["phase"], "plain", None)]
        a = runs[(d["phase"], "asym", d["backward"])]
        ratios = [t / v for t, v in zip(to["samples"]["trusted_s"], a["samples"]["trusted_s"])]
        assert to["samples"]["round"] == a["samples"]["round"] == [0, 1, 2]
        assert d["trusted_speedup"] == pytest.approx(statistics.median(ratios))  # paired, per round
        assert d["trusted_speedup_rounds"] == 3
        lo, hi = d["trusted_speedup_ci95"]
        assert min(ratios) <= lo <= d["trusted_speedup"] <= hi <= max(ratios)
        assert d["trusted_speedup_ratio_of_medians"] == pytest.approx(to["trusted_s"] / a["trusted_s"])
        assert d["limit_roofline"] == pytest.approx(to["roofline_s"] / a["roofline_s"])
        assert d["efficiency_roofline"] == pytest.approx(d["trusted_speedup"] / d["limit_roofline"])
        assert d["projected_sgx1_speedup"] == pytest.approx(
            to["sgx1"]["projected_trusted_s"] / a["sgx1"]["projected_trusted_s"])
        assert d["limit"] == pytest.approx(a["total_flops"] / a["trusted_flops"])
        assert d["efficiency"] == pytest.approx(d["trusted_speedup"] / d["limit"])
        assert d["asym_vs_plain"] == pytest.approx(a["step_s"] / pl["step_s"])
        assert d["projected_speedup"] == pytest.approx(
            to["trusted_s"] / max(a["trusted_s"], a["accelerator_s"] / d["speed_ratio"]))
        assert d["speed_ratio"] == 10
    for k in ("trusted_speedup", "limit", "efficiency", "projected_speedup", "asym_vs_plain", "limit_roofline",
              "efficiency_roofline", "projected_sgx1_speedup", "roofline_s"):
        assert k in result["definitions"]
    assert "PROJECTION" in result["definitions"]["projected_sgx1_speedup"]
    json.dumps(result)  # serialisable as is


def test_markdown_lists_every_run(result: dict) -> None:
    md = markdown(result)
    n_split = sum(r["mode"] in ("asym", "noise-only") for r in result["runs"])  # trusted-time breakdown rows
    for r in result["runs"]:
        if r["mode"] == "asym":  # layers the planner kept trusted are their own column, not "other"
            b = r["breakdown"]
            assert "planner_trusted_s" in b and b["planner_trusted_s"] >= 0
    assert md.count("| vgg11 |") == len(result["runs"]) + len(result["derived"]) + n_split
    assert "projected speed-up (ratio 10)" in md
    assert "projected SGX1 speed-up (projection, not measured)" in md and "limit (roofline)" in md


def test_formula_helpers() -> None:
    assert projected_speedup(10.0, 1.0, 5.0, ratio=10) == pytest.approx(10.0)
    assert projected_speedup(10.0, 1.0, 50.0, ratio=10) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        projected_speedup(1.0, 1.0, 1.0, ratio=0)
    to = {"trusted_s": 8.0, "step_s": 8.0}
    asym = {"trusted_s": 2.0, "accelerator_s": 30.0, "step_s": 4.0, "total_flops": 100, "trusted_flops": 20}
    d = derive_one(to, asym, {"step_s": 1.0}, ratio=5)
    assert d["trusted_speedup"] == 4.0 and d["limit"] == 5.0 and d["efficiency"] == pytest.approx(0.8)
    assert d["asym_vs_plain"] == 4.0 and d["end_to_end_speedup"] == 2.0
    assert d["projected_speedup"] == pytest.approx(8.0 / 6.0)


def test_analytic_conv_limit() -> None:
    g = {"name": "c", "cin": 64, "cout": 64, "groups": 1, "kk": 9, "hw_in": 1024, "hw_out": 1024}
    total, trusted = conv_macs(g, 4)
    assert total == 64 * 64 * 9 * 1024
    assert trusted == 4 * 64 * 64 * 9 + 4 * 64 * 9 * 1024
    assert conv_macs(g, None) == (total, total)
    assert conv_macs(g, 64) == (total, total)  # rank ≥ min(C, HW): not decomposed
    assert analytic_fwd_conv_limit([g], {"c": 4}) == pytest.approx(total / trusted)


def test_group_aware_conv_backward_flops() -> None:
    B, O, r, H = 4, 8, 2, 6
    x, d = torch.randn(1, B * r, H, H), torch.randn(1, B * O, H, H)
    true = 2 * B * O * r * 9 * H * H
    with flop_counter() as fc:
        conv2d_weight(x, (B * O, r, 3, 3), d, padding=1, groups=B)
    assert fc.get_total_flops() == true
    with group_aware_registry(), FlopCounterMode(display=False) as fc2:
        conv2d_weight(x, (B * O, r, 3, 3), d, padding=1, groups=B)
    assert fc2.get_total_flops() == true
    with FlopCounterMode(display=False) as fc3:  # importing asymml fixes torch's global registry itself
        conv2d_weight(x, (B * O, r, 3, 3), d, padding=1, groups=B)
    assert fc3.get_total_flops() == true


def test_split_settings_come_from_split_options() -> None:
    """The bench's split fields are SplitOptions' (same defaults, validated by it, one options object per
    mode instance)."""
    import dataclasses

    from asymml.errors import ConfigError
    from asymml.options import SplitOptions

    cfg = BenchConfig()
    split_fields = {f.name: f.metadata["split_option"] for f in dataclasses.fields(cfg) if "split_option" in f.metadata}
    assert {"rank", "decomposition", "iters", "basis", "input_rank", "grad_rank", "warm_start"} <= set(split_fields)
    defaults = SplitOptions()
    assert all(getattr(cfg, f) == getattr(defaults, o) for f, o in split_fields.items())
    opts = BenchConfig(rank="4", iters=3, placement="split").split_options("noise-only", "paper", verify=True)
    assert (opts.rank, opts.iters, opts.mode, opts.backward, opts.placement, opts.verify) == \
        ("4", 3, "noise-only", "paper", "split", True)
    assert BenchConfig(placement="split").split_options("trusted-only").placement == defaults.placement
    for bad in ({"decomposition": "nope"}, {"iters": 0}, {"rank": "adaptive:x"}, {"warm_start": "no"}):
        with pytest.raises(ConfigError):
            BenchConfig(**bad).validate()


def test_model_family_resolution() -> None:
    assert resolve_family("vgg16", 32) == "cifar:vgg16"
    assert resolve_family("vgg16", 224) == "tv:vgg16"
    assert resolve_family("resnet20", 224) == "cifar:resnet20"
    assert resolve_family("resnet18", 32) == "tv:resnet18"
    assert resolve_family("cifar:vgg11", 224) == "cifar:vgg11"
    _, arch, base = build_model("vgg11", 8, width=0.125)
    assert (arch, base) == ("cifar", "vgg11")


def test_sweep_and_slopes() -> None:
    assert parse_sweep("batch=2,4") == ("batch_size", [2, 4])
    assert parse_sweep("input=16,32") == ("input_size", [16, 32])
    assert parse_sweep("rank=1,2,4")[0] == "rank"
    for bad in ("batch", "foo=1,2", "batch=4", "rank=a,b"):
        with pytest.raises(ValueError):
            parse_sweep(bad)
    assert loglog_slope([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert loglog_slope([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    res = run_sweep(_tiny(modes=("trusted-only", "asym"), backwards=("paper",), phases=("infer",),
                          repeats=1, warmup=0, serialize=False), "batch_size", [2, 4], log=lambda s: None)
    assert all(r["serialized"] is False for r in res["runs"])  # the concurrent path
    assert any("no warm-up" in w for w in res["warnings"])
    assert res["sweep"]["param"] == "batch_size"
    assert {r["sweep_value"] for r in res["runs"]} == {2, 4}
    assert len(res["derived"]) == 2 and {d["sweep_value"] for d in res["derived"]} == {2, 4}
    s = next(s for s in res["sweep"]["series"] if s["label"] == "asym/paper")
    assert s["x"] == [2, 4] and s["released_bytes"][1] == 2 * s["released_bytes"][0]
    assert s["slopes"]["released_bytes"] == pytest.approx(1.0)


def test_cli_writes_json_markdown_and_png(tmp_path, capsys) -> None:
    out = tmp_path / "b.json"
    rc = main(["bench", "--model", "vgg11", "--width", "0.125", "--input-size", "8", "--batch-size", "2",
               "--phase", "infer", "--repeats", "1", "--rounds", "2", "--warmup", "0", "--device", "cpu",
               "--quiet", "--speed-ratio", "4", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {r["phase"] for r in data["runs"]} == {"infer"}
    assert data["derived"][0]["speed_ratio"] == 4
    assert math.isfinite(data["derived"][0]["projected_speedup"])
    assert (tmp_path / "b.md").read_text().startswith("## asymml bench")
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "| vgg11 |" in capsys.readouterr().out
    env = data["environment"]
    cal = env["roofline_calibration"]
    assert cal["conv_gflops"] >= max(cal["conv_gflops_nchw"], cal["conv_gflops_channels_last"]) > 0
    assert cal["mem_gbps"] > 0 and env["serialized"] is True
    for k in ("loadavg_before", "loadavg_after", "busy", "omp_wait_policy", "omp_num_threads", "torch_threads"):
        assert k in env
    # a second run reuses the stored calibration instead of measuring again
    out2 = tmp_path / "c.json"
    assert main(["bench", "--model", "vgg11", "--width", "0.125", "--input-size", "8", "--batch-size", "2",
                 "--phase", "infer", "--modes", "trusted-only,asym", "--rounds", "2", "--warmup", "0",
                 "--device", "cpu", "--quiet", "--plot", "none", "--calibration", str(out), "--json",
                 str(out2)]) == 0
    assert json.loads(out2.read_text())["environment"]["roofline_calibration"] == cal


def test_cli_rejects_bad_options(capsys) -> None:
    assert main(["bench", "--modes", "bogus", "--device", "cpu"]) == 2
    assert "invalid mode" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path() -> None:
    res = run_bench(_tiny(device="cuda", phases=("train",), backwards=("protected",)), log=lambda s: None)
    assert {r["accelerator"] for r in res["runs"] if r["mode"] != "trusted-only"} == {"cuda"}
    assert all(r["accelerator_s"] > 0 for r in res["runs"] if r["mode"] in ("plain", "asym"))


def _attributes(*objs: object) -> list[dict]:
    return [dict(vars(o)) for o in objs]


def test_attribution_labels_engine_without_patching() -> None:
    """The runtime labels its own steps while a torch profiler runs; attribution patches nothing (every
    class and module the engine runs is unchanged during and after the profiled step)."""
    import asymml
    from asymml import interpreter, region, release, rules, runtime
    from asymml.bench.attribution import attribute, attribution_table, op_class
    from asymml.executors import local

    engine = (runtime.SplitModule, region.RegionCall, region.ForwardPass, release.ReleasePath,
              interpreter.TrustedInterpreter, rules.Conv2dRule, rules.LinearRule, local.LocalExecutor, runtime,
              release, region)
    before = _attributes(*engine)
    model, _, _ = build_model("vgg11", 8, width=0.125)
    sm = asymml.split(model, mode="asym", **({"placement": PLACEMENT} if PLACEMENT else {}))
    x = torch.randn(2, 3, 8, 8)
    sm(x).sum().backward()
    during: list[list[dict]] = []
    att = attribute(lambda: (sm(x).sum().backward(), during.append(_attributes(*engine))))
    assert during == [before] and _attributes(*engine) == before
    assert not any(k in vars(sm) for k in ("forward", "_run_split"))  # nor the instance
    cats = att["by_category"]
    assert {"decompose", "conv fwd", "conv weight-grad"} <= set(cats)
    assert att["op_s"] == pytest.approx(sum(sum(d.values()) for d in cats.values()))
    assert "| **all ops** |" in attribution_table(att, att["step_wall_s"])
    assert op_class("aten::baddbmm_") == op_class("aten::addmm_") == "gemm"  # in place: the GEMM that merges
    assert op_class("aten::add_") == op_class("aten::relu_") == "elementwise/other"
    assert (op_class("aten::mkldnn_convolution"), op_class("aten::bmm"), op_class("aten::copy_"),
            op_class("aten::linalg_cholesky_ex"), op_class("aten::relu")) == (
        "conv", "gemm", "copy", "linalg", "elementwise/other")


def test_serialized_measurement_has_no_overlap() -> None:
    res = run_bench(_tiny(modes=("asym",), backwards=("protected",), repeats=1, warmup=0, serialize=True),
                    log=lambda s: None)
    for r in res["runs"]:
        assert r["serialized"] is True and r["round_trips"] > 0
        sm = r["samples"]
        for step, trusted, blocked, accel in zip(sm["step_s"], sm["trusted_s"], sm["blocked_s"], sm["accelerator_s"]):
            # every accelerator job starts only once the trusted side waits for it (blocked is the bench's own
            # measurement, around the executor's futures)
            assert blocked >= accel - 1e-3
            assert step == pytest.approx(trusted + blocked)


def test_deferred_pool_runs_jobs_in_order_on_demand() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from asymml.bench.runner import _DeferredPool

    order: list[int] = []
    pool = _DeferredPool(ThreadPoolExecutor(1))
    futs = [pool.submit(lambda i=i: order.append(i) or i) for i in range(3)]
    assert order == [] and not futs[0].done()
    assert futs[1].result() == 1 and order == [0, 1, 2]  # waiting flushes every pending job, in order
    pool.shutdown()


def test_memory_meter_ignores_views_of_weights() -> None:
    from asymml.bench.memory import AliasAwareMemoryMeter

    lin = torch.nn.Linear(512, 512)  # 1 MiB weight, viewed (t) inside F.linear
    x = torch.randn(2, 512)
    with torch.no_grad(), AliasAwareMemoryMeter() as meter:
        meter.add(x)
        lin(x)
    assert meter.peak <= 2 * x.numel() * 4 + 4096  # the input and the output, not the weight


def test_verify_variant_runs_the_asym_instances_placement() -> None:
    """The verify variant's overhead must be the checks' alone: it shares the planner (placement decisions
    and pilot) of the asym instance it is compared with, not one of its own that may split other layers."""
    from asymml.bench.runner import BenchRunner
    from asymml.planner import FollowingPlanner

    runner = BenchRunner(_tiny(verify=True, placement="auto", backwards=("protected", "paper")), log=lambda s: None)
    model, *_ = build_model("vgg11", 8, num_classes=10, width=0.125, in_channels=3)
    entries = runner._entries(model)
    try:
        base = next(e for e in entries if e.mode == "asym" and e.backward == "protected" and e.variant is None)
        other = next(e for e in entries if e.mode == "asym" and e.backward == "paper")
        v = next(e for e in entries if e.variant == "verify")
        assert isinstance(v.sm.planner, FollowingPlanner) and v.sm.planner.leader is base.sm.planner
        assert other.sm.planner is not base.sm.planner and not isinstance(other.sm.planner, FollowingPlanner)
    finally:
        for e in entries:
            e.sm.executor.close()


def test_verify_variant_reports_overhead_and_detection() -> None:
    res = run_bench(_tiny(verify=True, verify_sample=0.5, phases=("infer",), modes=("trusted-only", "asym")),
                    log=lambda s: None)
    v = next(r for r in res["runs"] if r.get("variant") == "verify")
    assert v["verify"]["sample"] == 0.5 and v["verify"]["checks"] > 0
    assert next(r for r in res["runs"] if r["mode"] == "asym" and not r.get("variant"))["verify"] is None
    d = next(d for d in res["derived"] if d.get("variant") == "verify")
    assert d["verify_detection_per_job"] == pytest.approx(0.5)
    assert d["trusted_overhead_vs_asym"] is not None and d["trusted_overhead_vs_asym"] > -1
    assert "trusted_overhead_vs_asym" not in next(d for d in res["derived"] if not d.get("variant"))


def test_micro_batched_training_step_lowers_the_trusted_peak() -> None:
    """--micro-batch in training: forward+backward per micro-batch (gradients accumulated), the same releases,
    a lower trusted peak in every trusted mode; a train-mode BatchNorm model is refused."""
    from asymml.errors import ConfigError

    runs = {}
    for mb in (None, 2):
        res = run_bench(_tiny(input_sizes=[32], batch_sizes=[8], rounds=1, phases=("train",),
                              modes=("trusted-only", "asym"), backwards=("protected",), micro_batch=mb),
                        log=lambda s: None)
        runs[mb] = {r["mode"]: r for r in res["runs"]}
    for mode in ("trusted-only", "asym"):
        # (at this size activations outweigh the parameter gradients, which accumulation keeps whole)
        assert runs[2][mode]["trusted_peak_bytes"] < 0.8 * runs[None][mode]["trusted_peak_bytes"], mode
    assert runs[2]["asym"]["released_bytes"] == runs[None]["asym"]["released_bytes"] > 0
    with pytest.raises(ConfigError, match="train-mode BatchNorm"):
        run_bench(_tiny(models=["vgg11_bn"], rounds=1, phases=("train",), modes=("trusted-only",), micro_batch=1),
                  log=lambda s: None)


def test_delivered_results_are_freed_without_garbage_collection() -> None:
    """The bench's future wrapper must not form a reference cycle with the executor's future: a delivered
    accelerator result dies with its last reference (not at the next GC), so it is not counted as live
    trusted memory for the rest of the step."""
    import gc
    import weakref

    from asymml.bench.runner import _BenchExecutor, _TimedFuture

    ex = _BenchExecutor("cpu", serialize=True)
    gc.disable()
    try:
        fut = ex._pool.submit(lambda: {"y": torch.ones(1000)})  # deferred: runs when waited for
        tf = _TimedFuture(fut, ex)
        res = tf.result()
        ref = weakref.ref(res["y"])
        del res, tf, fut
        assert ref() is None
    finally:
        gc.enable()
        ex.close()


def test_default_warm_up_covers_the_planner_pilot() -> None:
    """Timed steps must run the planner's final decisions: the default warm-up (library and CLI alike) is
    at least the pilot's longest trial (fewer made the first timed rounds release different bytes)."""
    from asymml.bench.runner import BenchConfig
    from asymml.cli.main import build_parser
    from asymml.planner import Planner

    assert BenchConfig().warmup >= Planner.PILOT_MAX_FORWARDS
    assert build_parser().parse_args(["bench"]).warmup == BenchConfig().warmup
