#!/usr/bin/env python
"""Side-by-side cost of DP noise on the trusted side (issue 11 item 5); finishes in well under a minute.

1. Generator throughput, million N(0, 1) samples per second, in one interleaved run: ``torch.randn`` (not
   secure: Mersenne Twister), the previous secure generator (ChaCha20, 4 hardened Box–Muller draws computed in
   whole-tensor float64 passes; a faithful copy of it lives below), and the current kernel
   (:meth:`asymml.privacy.secure_rng.SecureGenerator.standard_normal`) with 1 draw (what float32 releases get)
   and 4 draws (float64 releases, dp-update noise), on 1 and 2 threads.
2. One step of VGG-16's release noise at 224 px, batch 8: every conv input (the residual released per conv,
   ``sum(C*H*W) * B`` elements), released through :class:`~asymml.privacy.noise.ReleaseMechanism` (clip +
   noise, float32, channels-last) inline, with prefetch, with prefetch and ``inplace=True`` (the release
   written over the residual), 1 or 2 draws ahead, on 1 and 2 threads.  Between two releases the script sleeps
   ``--accel-ns`` ns per released element to stand for the accelerator's conv (prefetch can only hide noise
   behind such a wait); the trusted-side time per step is reported with the mechanism's own ``noise_stats()``.

Usage: ``python scripts/bench_noise.py [--json] [--steps 2] [--accel-ns 6] [--torch-threads 2]``.
Figures depend on the load of the machine: the load average is printed with them.
"""

from __future__ import annotations

# ruff: noqa: I001
# asymml first, as in every asymml entry point: its process settings (OpenMP wait policy) must precede torch's load
import asymml

import argparse
import hashlib
import json
import math
import os
import secrets
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from asymml.privacy.noise import NoiseConfig, ReleaseMechanism
from asymml.privacy.secure_rng import SecureGenerator

# VGG-16 (torchvision "D") conv inputs at 224 px: (channels, side) of the 13 convs' inputs
VGG16_CONV_INPUTS = [(3, 224), (64, 224), (64, 112), (128, 112), (128, 56), (256, 56), (256, 56),
                     (256, 28), (512, 28), (512, 28), (512, 14), (512, 14), (512, 14)]


# mechanism configurations of the VGG step: name -> (prefetch depth (0: off), threads, inplace)
CONFIGS = {"inline_1t": (0, 1, False), "prefetch_1t": (2, 1, False), "prefetch_depth1_inplace_1t": (1, 1, True),
           "prefetch_inplace_1t": (2, 1, True), "prefetch_inplace_2t": (2, 2, True)}


# --------------------------------------------------------------------------- the previous generator (reference)


def old_standard_normal(key: bytes, n: int, label: str, index: int, draws: int = 4) -> torch.Tensor:
    """The secure generator as it was before issue 11 (commit 05f5430): ChaCha20 words -> 52-bit float64
    uniforms -> float64 Box–Muller over whole 2^21-pair chunks, ``draws`` summed.  For comparison only."""
    out = torch.zeros(n, dtype=torch.float64)
    pairs = (n + 1) // 2
    chunk = 1 << 21
    for s in range(0, pairs, chunk):
        k = min(pairs, s + chunk) - s
        idx = index * 2**32 + s
        h = hashlib.sha256(label.encode() + b"\x00" + idx.to_bytes(16, "little", signed=True))
        nonce = b"\x01" + h.digest()[:11]
        w = torch.empty(2 * k * draws, dtype=torch.int64)
        enc = Cipher(algorithms.ChaCha20(key, b"\x00" * 4 + nonce), mode=None).encryptor()
        enc.update_into(bytes(8 * w.numel()), w.numpy().view("uint8"))
        u = w.bitwise_and_((1 << 52) - 1).bitwise_or_(0x3FF0000000000000).view(torch.float64).sub_(1.0 - 2.0**-53)
        u = u.view(draws, 2, k)
        rad = u[:, 0].log().mul_(-2.0).sqrt_()
        ang = u[:, 1].mul_(2.0 * math.pi)
        z = torch.cat([ang.cos().mul_(rad).sum(0), ang.sin_().mul_(rad).sum(0)])
        lo = 2 * s
        hi = min(n, lo + 2 * k)
        out[lo:hi] = z[: hi - lo]
    if draws > 1:
        out.div_(math.sqrt(draws))
    return out


# --------------------------------------------------------------------------- measurements


def _best(f: Any, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(n: int, repeats: int, torch_threads: int) -> dict[str, float]:
    """Million samples/s of each generator (best of ``repeats``; the candidates take turns in every round)."""
    gen = SecureGenerator()
    key = secrets.token_bytes(32)
    tg = torch.Generator().manual_seed(0)
    buf64 = torch.empty(n, dtype=torch.float64)
    buf32 = torch.empty(n)
    n_old = n // 4  # the old generator is slow: a quarter of the size keeps the run short
    pool = ThreadPoolExecutor(1, thread_name_prefix="bench-noise")

    def with_threads(k: int, f: Any) -> Any:
        def g() -> None:
            before = torch.get_num_threads()
            torch.set_num_threads(k)
            try:
                f()
            finally:
                torch.set_num_threads(before)
        return g

    cands = {
        "torch_randn_1t": (n, with_threads(1, lambda: torch.randn(n, generator=tg))),
        f"torch_randn_{torch_threads}t": (n, with_threads(torch_threads, lambda: torch.randn(n, generator=tg))),
        f"torch_normal_into_buffer_{torch_threads}t": (n, with_threads(torch_threads, lambda: buf32.normal_(generator=tg))),
        "old_secure_4draws_1t": (n_old, with_threads(1, lambda: old_standard_normal(key, n_old, "b", 0))),
        "new_secure_1draw_1t": (n, lambda: gen.standard_normal((n,), label="b", index=0, draws=1, out=buf64)),
        "new_secure_1draw_2t": (n, lambda: gen.standard_normal((n,), label="b", index=0, draws=1, out=buf64,
                                                               threads=2, executor=pool)),
        "new_secure_4draws_1t": (n, lambda: gen.standard_normal((n,), label="b", index=0, draws=4, out=buf64)),
        "new_secure_4draws_2t": (n, lambda: gen.standard_normal((n,), label="b", index=0, draws=4, out=buf64,
                                                                threads=2, executor=pool)),
    }
    best = {k: math.inf for k in cands}
    for _ in range(repeats):
        for k, (_, f) in cands.items():
            best[k] = min(best[k], _best(f, 1))
    pool.shutdown()
    return {k: cands[k][0] / best[k] / 1e6 for k in cands}


def vgg_step(batch: int, steps: int, accel_ns: float, depth: int, threads: int, inplace: bool) -> dict[str, Any]:
    """Trusted-side noise cost of one VGG-16 224 px step of releases (median over ``steps`` after a warm-up)."""
    releases = [(f"conv{i}", torch.full((batch, c, s, s), 0.01).contiguous(memory_format=torch.channels_last))
                for i, (c, s) in enumerate(VGG16_CONV_INPUTS)]
    mech = ReleaseMechanism(NoiseConfig(sigma=1.0, clip=1.0), prefetch=depth > 0, prefetch_depth=max(1, depth),
                            threads=threads)
    per_step = []
    for step in range(steps + 1):
        if step == 1:
            mech.reset_noise_stats()  # step 0 learns the order of releases (all inline)
        trusted = 0.0
        for layer, r in releases:
            t0 = time.perf_counter()
            out = mech(r, layer=layer, inplace=inplace)
            trusted += time.perf_counter() - t0
            del out
            if accel_ns > 0:
                time.sleep(r.numel() * accel_ns * 1e-9)  # the accelerator's conv on this release
        if step >= 1:
            per_step.append(trusted)
    st = mech.noise_stats()
    mech.close()
    per_step.sort()
    return {"trusted_s_per_step": per_step[len(per_step) // 2], "elements_per_step": sum(r.numel() for _, r in releases),
            "noise_stats": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in st.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1 << 22, help="samples per throughput measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--accel-ns", type=float, default=6.0,
                    help="simulated accelerator time per released element between releases (0: none)")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.torch_threads)
    t_start = time.perf_counter()
    res: dict[str, Any] = {"load_avg_before": os.getloadavg()[0], "cpus": os.cpu_count(),
                           "torch_threads": args.torch_threads, "asymml": asymml.__version__,
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    res["throughput_msps"] = throughput(args.n, args.repeats, args.torch_threads)
    vgg: dict[str, Any] = {}
    for name, (depth, threads, inplace) in CONFIGS.items():
        vgg[name] = vgg_step(args.batch, args.steps, args.accel_ns, depth, threads, inplace)
    tg = torch.Generator().manual_seed(0)
    big = torch.empty(max(c * s * s for c, s in VGG16_CONV_INPUTS) * args.batch)
    elems = vgg["inline_1t"]["elements_per_step"]
    t = 0.0
    for c, s in VGG16_CONV_INPUTS:
        m = c * s * s * args.batch
        t += _best(lambda m=m: big[:m].normal_(generator=tg), 1)
    vgg["torch_normal_into_buffer_s"] = t
    vgg["old_secure_estimate_s"] = elems / (res["throughput_msps"]["old_secure_4draws_1t"] * 1e6)
    res["vgg16_224"] = vgg
    res["load_avg_after"] = os.getloadavg()[0]
    res["wall_s"] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"load average {res['load_avg_before']:.2f} -> {res['load_avg_after']:.2f} on {res['cpus']} CPUs, "
          f"torch threads {args.torch_threads}")
    print("\nGenerator throughput (million N(0,1) samples/s, best of interleaved rounds):")
    for k, v in res["throughput_msps"].items():
        print(f"  {k:34s} {v:8.1f}")
    print(f"\nVGG-16 224 px batch {args.batch}: {elems / 1e6:.1f} M noised elements per step (every conv input)")
    print(f"  torch normal_ into a reused buffer (insecure reference): {vgg['torch_normal_into_buffer_s'] * 1e3:7.0f} ms")
    print(f"  previous secure generator, noise only (extrapolated):    {vgg['old_secure_estimate_s'] * 1e3:7.0f} ms")
    for name in CONFIGS:
        v = vgg[name]
        st = v["noise_stats"]
        steps = max(1, args.steps)
        print(f"  {name:27s} trusted {v['trusted_s_per_step'] * 1e3:6.0f} ms/step | per step: "
              f"noise on critical path {st['critical_s'] / steps * 1e3:5.0f} ms (waiting {st['wait_s'] / steps * 1e3:4.0f}), "
              f"add {st['combine_s'] / steps * 1e3:4.0f} ms, background {st['background_s'] / steps * 1e3:5.0f} ms | "
              f"hits {st['hits']} late {st['late']} misses {st['misses']} | buffers {st['peak_buffer_bytes'] / 2**20:.0f} MiB")
    print(f"\n(wall {res['wall_s']:.1f} s; simulated accelerator wait {args.accel_ns} ns/element between releases)")


if __name__ == "__main__":
    main()
