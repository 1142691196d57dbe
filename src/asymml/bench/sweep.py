"""Scaling sweeps: how trusted time, released bytes and trusted memory grow with batch size, input
resolution or rank, with log-log slopes (growth exponents) and a log-log plot."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from .runner import BenchConfig, resolve_family, run_bench

SWEEP_PARAMS = {"batch": "batch_size", "batch_size": "batch_size", "input": "input_size",
                "input_size": "input_size", "resolution": "input_size", "size": "input_size", "rank": "rank"}
METRICS = ("trusted_s", "accelerator_s", "released_bytes", "trusted_peak_bytes")


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    """``"batch=8,16,32"`` → ``("batch_size", [8, 16, 32])`` (params: batch, input, rank)."""
    name, sep, vals = spec.partition("=")
    param = SWEEP_PARAMS.get(name.strip().lower())
    if not sep or param is None:
        raise ValueError(f"invalid sweep {spec!r}; use PARAM=V1,V2,... with PARAM one of batch, input, rank")
    try:
        values = [int(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"invalid sweep values in {spec!r}: integers expected") from None
    if len(values) < 2 or any(v < 1 for v in values):
        raise ValueError(f"a sweep needs at least two positive values, got {spec!r}")
    return param, values


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (points with non-positive values are skipped)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def series(runs: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, mode label, phase): the swept values, each metric, and its log-log slope."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["label"], r["phase"]), []).append(r)
    out = []
    for (model, label, phase), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["sweep_value"])
        xs = [r["sweep_value"] for r in rs]
        s: dict[str, Any] = {"model": model, "label": label, "phase": phase, "x": xs, "slopes": {}}
        for m in METRICS:
            s[m] = [r[m] for r in rs]
            s["slopes"][m] = loglog_slope(xs, s[m])
        out.append(s)
    return out


def run_sweep(cfg: BenchConfig, param: str, values: list[int],
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the bench once per value of ``param`` (``batch_size``, ``input_size`` or ``rank``)."""
    base = dataclasses.replace(cfg)
    if param == "input_size":  # keep one architecture across the whole sweep
        base.models = [resolve_family(m, values[0]) for m in cfg.models]
    result: dict[str, Any] | None = None
    for v in values:
        if param == "batch_size":
            c = dataclasses.replace(base, batch_sizes=[v])
        elif param == "input_size":
            c = dataclasses.replace(base, input_sizes=[v])
        else:
            c = dataclasses.replace(base, rank=str(v))
        if result is not None and c.calibration is None:  # calibrate the machine once per sweep
            c = dataclasses.replace(c, calibration=result["environment"]["roofline_calibration"])
        res = run_bench(c, log)
        for r in res["runs"]:
            r["sweep_param"] = param
            r["sweep_value"] = v
        for d in res["derived"]:
            d["sweep_value"] = v
        if result is None:
            result = res
            result["config"] = dataclasses.asdict(base)
        else:
            result["runs"].extend(res["runs"])
            result["derived"].extend(res["derived"])
            result["warnings"] = result.get("warnings", []) + [w for w in res.get("warnings", [])
                                                               if w not in result.get("warnings", [])]
    assert result is not None
    result["sweep"] = {"param": param, "values": values, "series": series(result["runs"])}
    return result


def plot_sweep(result: Mapping[str, Any], path: str) -> str:
    """Log-log plot of each metric against the swept parameter, one line per model / mode / phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = result["sweep"]
    titles = {"trusted_s": "trusted time per step (s)", "accelerator_s": "accelerator time per step (s)",
              "released_bytes": "released bytes per step", "trusted_peak_bytes": "trusted peak bytes"}
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4.2), squeeze=False)
    for ax, m in zip(axes[0], METRICS):
        for s in sw["series"]:
            pts = [(x, y) for x, y in zip(s["x"], s[m]) if y and y > 0]
            if not pts:
                continue
            k = s["slopes"][m]
            label = f"{s['model']} {s['label']} {s['phase']}" + ("" if k is None else f" (slope {k:.2f})")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(sw["param"])
        ax.set_title(titles[m])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
