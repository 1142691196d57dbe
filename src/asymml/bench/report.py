"""Markdown tables and the PNG chart of ``asymml bench``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MiB = 2**20


def _f(v: Any, fmt: str = ".2f", none: str = "–") -> str:
    return none if v is None else format(v, fmt)


def _key(r: Mapping[str, Any]) -> tuple:
    return (r["model"], r["input_size"], r["batch_size"], r["phase"], r.get("sweep_value"))


def _iqr(r: Mapping[str, Any], k: str) -> str:
    s = r.get("spread", {}).get(k)
    if not s:
        return ""
    return f" ±{50 * s['rel_iqr']:.0f}%"


def markdown(result: Mapping[str, Any]) -> str:
    """Three tables (runs, derived figures, trusted-time breakdown) and the definitions used."""
    runs = result["runs"]
    env = result.get("environment", {})
    serialized = env.get("serialized", result.get("config", {}).get("serialize"))
    load = env.get("loadavg_before", env.get("loadavg_1min"))
    out = [f"## asymml bench — accelerator `{env.get('accelerator', '?')}`, torch {env.get('torch', '?')}, "
           f"{env.get('torch_threads', '?')} torch threads on {env.get('cpu_count', '?')} CPUs"
           + (", serialized (no trusted/accelerator overlap)" if serialized else "")
           + (f", load average {load:.1f}" if load is not None else "")
           + (f" → {env['loadavg_after']:.1f}" if env.get("loadavg_after") is not None else "")
           + f", OMP_NUM_THREADS={env.get('omp_num_threads')}, OMP_WAIT_POLICY={env.get('omp_wait_policy')}", ""]
    cal = env.get("roofline_calibration")
    if cal:
        out += [f"Roofline calibration: dense conv {cal['conv_gflops']:.0f} GFLOP/s (NCHW {cal['conv_gflops_nchw']:.0f}, "
                f"channels_last {cal['conv_gflops_channels_last']:.0f}), memory pass {cal['mem_gbps']:.1f} GB/s"
                + (f", Gaussian RNG {1e3 * cal['rng_gsamples']:.0f} M samples/s" if cal.get("rng_gsamples") else "")
                + ".", ""]
    for w in result.get("warnings", []):
        out += [f"**WARNING**: {w}", ""]
    sweep = any(r.get("sweep_value") is not None for r in runs)
    sv_h = "| sweep " if sweep else ""
    out += [f"{sv_h}| model | input | batch | phase | mode | steps | trusted ms | accel ms | step ms | "
            "trusted GFLOP | trusted FLOP % | roofline ms (% of trusted) | trusted peak MiB (persistent) | "
            "resident MiB / EPC | released MiB/step | SGX1 projected trusted ms |",
            "|" + "---|" * (16 + sweep)]
    for r in runs:
        sv = f"| {r.get('sweep_value')} " if sweep else ""
        frac = r.get("trusted_flop_fraction")
        roof, rfrac = r.get("roofline_s"), r.get("roofline_fraction")
        sgx = (r.get("sgx1") or {}).get("projected_trusted_s")
        out.append(
            f"{sv}| {r['model']} | {r['input_size']} | {r['batch_size']} | {r['phase']} | {r['label']} | "
            f"{r.get('n_samples', len(r.get('samples', {}).get('step_s', [])))} | "
            f"{1e3 * r['trusted_s']:.1f}{_iqr(r, 'trusted_s')} | {1e3 * r['accelerator_s']:.1f} | "
            f"{1e3 * r['step_s']:.1f}{_iqr(r, 'step_s')} | {r['trusted_flops'] / 1e9:.3f} | "
            f"{_f(None if frac is None else 100 * frac, '.1f')} | "
            f"{_f(None if roof is None else 1e3 * roof, '.1f')}"
            f"{'' if rfrac is None else f' ({100 * rfrac:.0f}%)'} | {r['trusted_peak_bytes'] / MiB:.1f}"
            f" ({r.get('persistent_bytes', 0) / MiB:.1f}) | "
            f"{r['trusted_resident_bytes'] / MiB:.1f} / {r['epc_bytes'] / MiB:.0f}"
            f"{'' if r['resident_within_epc'] else ' ⚠'} | {r['released_bytes'] / MiB:.2f} | "
            f"{_f(None if sgx is None else 1e3 * sgx, '.1f')} (projection) |"
        )
    der = result.get("derived", [])
    if der:
        ratio = der[0].get("speed_ratio")
        out += ["", f"{sv_h}| model | input | batch | phase | asym | trusted speed-up [95% CI] (rounds) | "
                f"limit (FLOPs) | efficiency | limit (roofline) | efficiency (roofline) | "
                f"fwd-conv limit (analytic) | asym ÷ plain | e2e speed-up | projected speed-up (ratio {ratio:g}) | "
                f"projected SGX1 speed-up (projection, not measured) |", "|" + "---|" * (15 + sweep)]
        for d in der:
            sv = f"| {d.get('sweep_value')} " if sweep else ""
            ci = d.get("trusted_speedup_ci95")
            ci_s = "" if not ci else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
            name = d.get("label") or (d["backward"] or "asym")
            out.append(
                f"{sv}| {d['model']} | {d['input_size']} | {d['batch_size']} | {d['phase']} | {name} | "
                f"{_f(d['trusted_speedup'])}×{ci_s} ({d.get('trusted_speedup_rounds', '–')}) | "
                f"{_f(d['limit'])}× | {_f(d['efficiency'])} | {_f(d.get('limit_roofline'))}× | "
                f"{_f(d.get('efficiency_roofline'))} | {_f(d['limit_fwd_conv_analytic'])}× | "
                f"{_f(d['asym_vs_plain'])} | {_f(d['end_to_end_speedup'])}× | {_f(d['projected_speedup'])}× | "
                f"{_f(d.get('projected_sgx1_speedup'))}× (projection) |"
            )
    variants = [d for d in der if d.get("variant")]
    if variants:
        out += ["", "What the variants add to asym's trusted time (median of per-round ratios):", "",
                f"{sv_h}| model | input | batch | phase | asym | trusted overhead vs asym | verification: "
                "checked share of jobs, detection per tampered job |", "|" + "---|" * (7 + sweep)]
        for d in variants:
            sv = f"| {d.get('sweep_value')} " if sweep else ""
            ov = d.get("trusted_overhead_vs_asym")
            det = d.get("verify_detection_per_job")
            vs = "–" if det is None else f"{d.get('verify_sample'):g}, {det:.2f} (within 8 jobs: 1)"
            out.append(f"{sv}| {d['model']} | {d['input_size']} | {d['batch_size']} | {d['phase']} | {d['label']} | "
                       f"{'–' if ov is None else f'{100 * ov:+.1f}%'} | {vs} |")
    split = [r for r in runs if r["mode"] in ("asym", "noise-only") and r.get("breakdown")]
    if split:
        out += ["", "Trusted time of the split modes, ms (last timed step):", "",
                f"{sv_h}| model | input | batch | phase | mode | decompose | split fwd (excl. decompose) | "
                "split bwd | trusted ops fwd | layers kept trusted by the planner (fwd+bwd) | "
                "other (autograd of trusted ops, loss, glue) | blocked |",
                "|" + "---|" * (12 + sweep)]
        for r in split:
            b = r["breakdown"]
            sv = f"| {r.get('sweep_value')} " if sweep else ""
            out.append(
                f"{sv}| {r['model']} | {r['input_size']} | {r['batch_size']} | {r['phase']} | {r['label']} | "
                + " | ".join(f"{1e3 * b.get(k, 0.0):.1f}" for k in
                             ("decompose_s", "split_forward_s", "split_backward_s", "trusted_ops_forward_s",
                              "planner_trusted_s", "other_s"))
                + f" | {1e3 * r['blocked_s']:.1f} |"
            )
    from .attribution import attribution_table

    for r in runs:
        att = r.get("attribution")
        if att:
            out += ["", f"Trusted-thread time of {r['model']} {r['input_size']}px b{r['batch_size']} {r['phase']} "
                    f"{r['label']} by engine function × op kind, ms (one profiled step, profiled trusted time "
                    f"{1e3 * att['profiled_trusted_s']:.1f} ms):", "",
                    attribution_table(att, att["profiled_trusted_s"])]
    defs = result.get("definitions")
    if defs:
        out += ["", "Definitions:", ""] + [f"* **{k}**: {v}" for k, v in defs.items()]
    return "\n".join(out) + "\n"


def plot_chart(result: Mapping[str, Any], path: str) -> str:
    """One row per (model, input, batch, phase): time per side, trusted memory vs EPC, released bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(_key(r), []).append(r)
    n = max(1, len(groups))
    fig, axes = plt.subplots(n, 3, figsize=(16, 3.6 * n), squeeze=False)
    for row, (key, rs) in enumerate(groups.items()):
        model, size, batch, phase, sv = key
        title = f"{model} {size}×{size} b{batch} {phase}" + (
            "" if sv is None else f" [{rs[0].get('sweep_param', 'sweep')}={sv}]")
        labels = [r["label"] for r in rs]
        xs = range(len(rs))
        ax = axes[row][0]
        w = 0.27
        for j, (k, name) in enumerate((("trusted_s", "trusted"), ("accelerator_s", "accelerator"),
                                       ("step_s", "end-to-end"))):
            vals = [1e3 * r[k] for r in rs]
            errs = [[1e3 * (r[k] - r["spread"][k]["q1"]) for r in rs], [1e3 * (r["spread"][k]["q3"] - r[k])
                                                                       for r in rs]]
            ax.bar([x + (j - 1) * w for x in xs], vals, w, yerr=errs, label=name, capsize=2)
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
        ax.set_ylabel("ms per step (median, IQR)")
        ax.set_title(title + ": time")
        ax.legend(fontsize=7)
        ax = axes[row][1]
        ax.bar([x - 0.2 for x in xs], [r["trusted_peak_bytes"] / 2**20 for r in rs], 0.4, label="peak (step)")
        ax.bar([x + 0.2 for x in xs], [r["trusted_resident_bytes"] / 2**20 for r in rs], 0.4,
               label="peak + weights")
        ax.axhline(rs[0]["epc_bytes"] / 2**20, color="red", linestyle="--", label="EPC budget")
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
        ax.set_ylabel("trusted MiB")
        ax.set_title("trusted memory")
        ax.legend(fontsize=7)
        ax = axes[row][2]
        ax.bar(list(xs), [r["released_bytes"] / 2**20 for r in rs], color="tab:purple")
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
        ax.set_ylabel("MiB per step")
        ax.set_title("released to the accelerator (private-derived)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
