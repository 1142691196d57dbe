"""``asymml bench``: the four execution modes side by side — timings, FLOPs, trusted memory, releases,
derived speed-ups, scaling sweeps, tables and charts (issue 4)."""

from .derived import DEFINITIONS, analytic_fwd_conv_limit, derive, derive_one, projected_speedup
from .report import markdown, plot_chart
from .roofline import SGX1, TrustedOpCounter, calibrate, epc_page_moves, sgx1_projection
from .runner import BenchConfig, BenchRunner, build_model, run_bench
from .sweep import SWEEP_PARAMS, parse_sweep, plot_sweep, run_sweep

__all__ = [
    "BenchConfig", "BenchRunner", "build_model", "run_bench", "DEFINITIONS", "derive", "derive_one",
    "projected_speedup", "analytic_fwd_conv_limit", "markdown", "plot_chart", "SWEEP_PARAMS", "parse_sweep",
    "run_sweep", "plot_sweep", "SGX1", "TrustedOpCounter", "calibrate", "epc_page_moves", "sgx1_projection",
]
