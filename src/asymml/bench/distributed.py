"""``asymml bench --nproc-per-node N``: data-parallel training throughput for 1 and N ranks, and the
trusted-side cost of the per-step gradient all-reduce.

Each measurement is a real short ``asymml train`` run (the same code path as a user's: one rank alone, then
``torchrun --nproc-per-node N`` on a loopback rendezvous), ``steps`` optimisation steps of ``batch_size``
images per rank; the figures come from the runs' ``summary.json``.  Throughput is global images per second
of training-step time (evaluation and start-up excluded); ``allreduce_s_per_step`` is rank 0's wall time of
the all-reduce (flattening included, and any wait for a slower rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["markdown_distributed", "run_distributed_bench"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_argv(world: int, out: Path, *, model: str, dataset: str, batch_size: int, steps: int, mode: str,
                device: str, threads: int, image_size: int | None) -> list[str]:
    argv = ["train", "--model", model, "--dataset", dataset, "--mode", mode, "--device", device,
            "--batch-size", str(batch_size), "--epochs", "1", "--limit-train", str(world * batch_size * steps),
            "--limit-test", str(batch_size), "--test-batch-size", str(batch_size), "--threads", str(threads),
            "--no-progress", "--no-tensorboard", "--checkpoint-every-minutes", "none", "--scheduler", "none",
            "--out", str(out)]
    if image_size is not None:
        argv += ["--image-size", str(image_size)]
    return argv


def run_distributed_bench(nproc: int, *, model: str = "vgg11_bn", dataset: str = "digits", batch_size: int = 64,
                          steps: int = 8, mode: str = "asym", device: str = "cpu", threads: int = 1,
                          image_size: int | None = None, timeout_s: float = 600.0,
                          worlds: Sequence[int] | None = None,
                          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``steps`` steps over 1 rank and over ``nproc`` ranks (``threads`` torch threads each); return
    throughput, step time and all-reduce cost per world size, and the speed-up of ``nproc`` ranks."""
    if nproc < 1 or steps < 2 or batch_size < 1:
        raise ConfigError("--nproc-per-node, the steps and the batch size must be positive (steps >= 2)")
    log = log or (lambda s: print(s, file=sys.stderr))
    worlds = sorted(set(worlds if worlds is not None else (1, nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="asymml-bench-dp-") as tmp:
        for world in worlds:
            out = Path(tmp) / f"world{world}"
            argv = _train_argv(world, out, model=model, dataset=dataset, batch_size=batch_size, steps=steps,
                               mode=mode, device=device, threads=threads, image_size=image_size)
            cmd = [sys.executable, "-m", "asymml", *argv]
            if world > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--nnodes", "1",
                       "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "asymml", *argv]
            log(f"bench: {world} rank(s) x batch {batch_size}, {steps} steps ...")
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise ConfigError(f"the {world}-rank bench run took more than {timeout_s:g} s") from None
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                raise ConfigError(f"the {world}-rank bench run failed (exit {proc.returncode}): " + " | ".join(tail))
            s = json.loads((out / "summary.json").read_text())
            h = s["history"][0]
            dist = s.get("distributed") or {}
            step_s = h["epoch_seconds"] / max(s["steps"], 1)
            ar = dist.get("allreduce_s_per_step")
            rows.append({
                "world_size": world, "batch_per_rank": batch_size, "global_batch": s["global_batch_size"],
                "steps": s["steps"], "throughput_img_s": h["throughput"], "step_s": step_s,
                "allreduce_s_per_step": ar, "allreduce_fraction": (ar / step_s) if ar is not None else None,
                "allreduce_bytes_per_step": dist.get("allreduce_bytes_per_step"),
                "launch_wall_s": time.perf_counter() - t0, "test_accuracy": s["test_accuracy"],
            })
    base = rows[0]["throughput_img_s"]
    for r in rows:
        r["speedup_vs_1"] = r["throughput_img_s"] / base if base else None
        r["scaling_efficiency"] = r["speedup_vs_1"] / r["world_size"] if r["speedup_vs_1"] else None
    return {"kind": "data-parallel", "model": model, "dataset": dataset, "mode": mode, "device": device,
            "threads_per_rank": threads, "cpus": os.cpu_count(), "runs": rows,
            "definition": "throughput = global images / training-step seconds (rank 0); allreduce = rank 0's "
                          "trusted-side seconds per step in the gradient all-reduce (gloo, loopback)"}


def markdown_distributed(result: dict[str, Any]) -> str:
    """The runs of :func:`run_distributed_bench` as a markdown table."""
    lines = [f"data parallel: {result['model']} on {result['dataset']}, mode {result['mode']}, accelerator "
             f"{result['device']}, {result['threads_per_rank']} thread(s) per rank, {result['cpus']} CPUs", "",
             "| ranks | global batch | img/s | step ms | all-reduce ms/step | all-reduce share | MB/step | speed-up |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        ar, frac, mb = r["allreduce_s_per_step"], r["allreduce_fraction"], r["allreduce_bytes_per_step"]
        ar_ms = "-" if ar is None else f"{1e3 * ar:.2f}"
        share = "-" if frac is None else f"{100 * frac:.1f}%"
        mbs = "-" if mb is None else f"{mb / 1e6:.2f}"
        lines.append(
            f"| {r['world_size']} | {r['global_batch']} | {r['throughput_img_s']:.1f} | {1e3 * r['step_s']:.1f} | "
            f"{ar_ms} | {share} | {mbs} | {r['speedup_vs_1']:.2f}x |")
    return "\n".join(lines) + "\n"
