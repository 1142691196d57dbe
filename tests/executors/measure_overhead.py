"""Measure (not a test): verification overhead and TLS overhead on one loopback training step.

    OMP_NUM_THREADS=1 python tests/executors/measure_overhead.py [--model resnet20] [--batch 32] [--steps 3]

Prints JSON: ``verify`` = :func:`asymml.executors.detection.time_overhead` (in-process accelerator: verification
seconds per step as a fraction of a forward+backward without it), ``detection`` = measure_detection, and
``tls`` = median step time against an ``asymml serve`` subprocess over loopback TCP with mutual TLS vs
``--insecure`` (verification on in both).

    OMP_NUM_THREADS=2 python tests/executors/measure_overhead.py --replay --model vgg16 --size 224 --batch 8 \
        [--baseline GIT_REF] [--rounds 5] [--phase both]

``--replay``: before/after on the same work. One asym step per phase (``infer``: eval + no_grad;
``train``: forward + backward) runs with a recording verifier that keeps every release and reply; then the
recorded checks are replayed through the current :class:`~asymml.executors.verify.Verifier` checking every
job (``after_every_job``), with ``--sample P`` also past its warm-up with sampling ``P`` (the default is
``verify.SAMPLE``), and with ``--baseline`` through the one at that git revision, in paired interleaved
rounds (order alternating).
The denominator is the asym trusted time of the same step without verification (median of ``--rounds``
steps, accelerator jobs serialized as in ``asymml bench``: wall time minus waits on the accelerator), and
its CPU time (the trusted thread's). On a shared machine prefer OMP_NUM_THREADS=1 and the ``*_cpu``
figures: with one torch thread all verification and all trusted work run in the measuring thread, so its
CPU time does not count the time other processes held the cores. Prints JSON with per-round seconds,
per-round ratios and medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _serve(extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    p = subprocess.Popen([sys.executable, "-m", "asymml.cli.main", "serve", "--listen", "tcp://127.0.0.1:0",
                          "--device", "cpu", "--threads", "1", "--log-level", "warning", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = p.stdout.readline()
    return p, line.split("listening on ", 1)[1].split(" ", 1)[0]


def _baseline_verifier(ref: str) -> type:
    """The ``Verifier`` class of ``src/asymml/executors/verify.py`` at git revision ``ref``."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = subprocess.run(["git", "-C", root, "show", f"{ref}:src/asymml/executors/verify.py"], check=True,
                         capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("asymml.executors._verify_baseline", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "asymml.executors"
    sys.modules[spec.name] = mod  # dataclasses look their module up
    exec(compile(src, f"verify.py@{ref}", "exec"), mod.__dict__)
    return mod.Verifier


def _record(model: torch.nn.Module, x: torch.Tensor, phase: str, rounds: int,
            placement: str = "auto") -> tuple[list, tuple[float, float]]:
    """Run asym steps of ``phase`` on an in-process accelerator: ``rounds`` timed without verification
    (median asym trusted seconds), then one with a verifier that records every event for replay."""
    import asymml
    from asymml.executors import LocalExecutor
    from asymml.executors.verify import Verifier

    log: list = []

    def cl(t: object) -> object:
        return t.detach().clone() if isinstance(t, torch.Tensor) else t

    class Recorder(Verifier):
        def release(self, hid: int, tensor: torch.Tensor) -> None:
            log.append(("release", hid, tensor.detach().clone()))

        def discard(self, hids: list[int]) -> None:
            log.append(("discard", list(hids)))

        def free(self, key: int) -> None:
            log.append(("free", key))

        def check_forward(self, key, program, inputs, params, outputs, result, *, layer, keep_graph):  # noqa: ANN001
            log.append(("forward", key, program, dict(inputs), {n: p.detach() for n, p in params.items()},
                        list(outputs), {k: cl(v) for k, v in result.items()}, layer, keep_graph))

        def check_backward(self, key, request, result):  # noqa: ANN001
            log.append(("backward", key, request, {s: {k: cl(v) for k, v in d.items()} for s, d in result.items()}))

    try:  # the bench's serialized executor: accelerator jobs never share the CPU with trusted work
        from asymml.bench.runner import _BenchExecutor

        ex: LocalExecutor = _BenchExecutor("cpu", serialize=True)
    except Exception:  # noqa: BLE001 - fall back to a plain (concurrent) in-process accelerator
        ex = LocalExecutor("cpu")
    sm = asymml.split(model, executor=ex, placement=placement)
    model.train(phase == "train")

    import threading

    bench_ex = hasattr(ex, "blocked_s")
    if bench_ex:
        ex.step_thread = threading.get_ident()

    def step() -> tuple[float, float]:
        """Trusted seconds of one step: as the bench counts them (wall minus waits on the accelerator),
        else the split regions' trusted time from the profile; and the CPU time of this (trusted) thread."""
        sm.reset_profile()
        model.zero_grad(set_to_none=True)
        if bench_ex:
            ex.reset_counters()
        c0 = time.thread_time()
        t0 = time.perf_counter()
        if phase == "infer":
            with torch.no_grad():
                sm(x)
        else:
            sm(x).square().mean().backward()
        ex.synchronize()
        wall = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        return (wall - ex.blocked_s if bench_ex else sm.profile().total["trusted_s"]), cpu

    step()  # warm-up (planner pilot, caches)
    steps = [step() for _ in range(rounds)]
    trusted = (statistics.median(s[0] for s in steps), statistics.median(s[1] for s in steps))
    ex.verifier = Recorder()
    step()
    ex.verifier = None
    ex.close()
    return log, trusted


def _replay(cls: type, log: list) -> tuple[float, float]:
    """Verification seconds (as the verifier counts them, wall) to check the recorded events with ``cls``,
    and the CPU time of this thread over the replay (all of it with one torch thread)."""
    c0 = time.thread_time()
    v = cls()
    for ev in log:
        kind = ev[0]
        if kind == "release":
            v.release(ev[1], ev[2])
        elif kind == "discard":
            v.discard(ev[1])
        elif kind == "free":
            v.free(ev[1])
        elif kind == "forward":
            _, key, program, inputs, params, outputs, result, layer, keep = ev
            v.check_forward(key, program, inputs, params, outputs, dict(result), layer=layer, keep_graph=keep)
        else:
            _, key, request, result = ev
            v.check_backward(key, request, {s: dict(d) for s, d in result.items()})
    return v.stats()["seconds"], time.thread_time() - c0


def replay_main(a: argparse.Namespace) -> None:
    """Before/after verification overhead on recorded VGG-16 (or other torchvision model) checks."""
    import torchvision

    from asymml.executors.verify import Verifier

    torch.manual_seed(0)
    model = getattr(torchvision.models, a.model)(num_classes=1000)
    x = torch.randn(a.batch, 3, a.size, a.size)
    import functools

    classes: dict = {"after_every_job": functools.partial(Verifier, sample=1.0)}
    if a.sample is not None:  # steady state: past the warm-up, each job checked with probability a.sample
        classes[f"after_sample{a.sample}"] = functools.partial(Verifier, sample=a.sample, warmup=0)
    if a.baseline:
        classes["before"] = _baseline_verifier(a.baseline)
    out: dict = {"model": a.model, "size": a.size, "batch": a.batch, "threads": torch.get_num_threads(),
                 "baseline": a.baseline, "phases": {}}
    for phase in (["infer", "train"] if a.phase == "both" else [a.phase]):
        log, trusted = _record(model, x, phase, a.rounds, a.placement)
        secs: dict[str, list[tuple[float, float]]] = {k: [] for k in classes}
        for r in range(a.rounds):
            order = list(classes) if r % 2 == 0 else list(reversed(classes))
            for k in order:
                secs[k].append(_replay(classes[k], log))
        res: dict = {"asym_trusted_s": trusted[0], "asym_trusted_cpu_s": trusted[1]}
        for k, v in secs.items():
            wall, cpu = [t[0] for t in v], [t[1] for t in v]
            res[k] = {"verify_s": [round(t, 4) for t in wall], "verify_cpu_s": [round(t, 4) for t in cpu],
                      "overhead": statistics.median(wall) / trusted[0],
                      "overhead_cpu": statistics.median(cpu) / trusted[1]}
        if "before" in secs:
            for k in secs:
                if k != "before":
                    res[f"{k}_over_before_per_round_cpu"] = [round(b[1] / c[1], 3) for b, c in zip(secs[k], secs["before"])]
        out["phases"][phase] = res
        del log
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--replay", action="store_true", help="before/after verification cost on recorded checks")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--phase", choices=("infer", "train", "both"), default="both")
    ap.add_argument("--placement", default="auto", help="asymml.split placement (auto: as the bench)")
    ap.add_argument("--sample", type=float, default=None, help="also replay with Verifier(sample=P, warmup=0)")
    ap.add_argument("--baseline", default=None, help="git revision of verify.py to compare against")
    a = ap.parse_args()
    if a.replay:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        replay_main(a)
        return
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from hostile_util import split_all

    import asymml
    from asymml.executors import make_executor
    from asymml.executors.detection import measure_detection, time_overhead
    from asymml.executors.tls import write_test_pki
    from asymml.models import get_model

    torch.manual_seed(0)
    model = asymml.fix(get_model(a.model)) if a.model != "tiny" else __import__("hostile_util").tiny()
    x = torch.randn(a.batch, 3, 32, 32) if a.model != "tiny" else torch.randn(a.batch, 3, 16, 16)
    out: dict = {"model": a.model, "batch": a.batch, "threads": 1}
    out["verify"] = time_overhead(model, x, steps=a.steps)
    out["detection"] = measure_detection(trials=20)

    pki = tempfile.mkdtemp()
    write_test_pki(pki)
    creds = {"tls_cert": f"{pki}/client.pem", "tls_key": f"{pki}/client.key", "tls_ca": f"{pki}/ca.pem"}
    tls: dict = {}
    for name, extra, kw in (("insecure", ["--insecure"], {}),
                            ("mutual_tls", ["--tls-cert", f"{pki}/server.pem", "--tls-key", f"{pki}/server.key",
                                            "--tls-ca", f"{pki}/ca.pem"], creds)):
        proc, address = _serve(extra)
        try:
            with make_executor(address, **kw) as ex:
                sm = split_all(model, executor=ex)
                times = []
                for _ in range(a.steps + 1):
                    model.zero_grad(set_to_none=True)
                    t0 = time.perf_counter()
                    sm(x).square().mean().backward()
                    times.append(time.perf_counter() - t0)
                tls[f"{name}_step_s"] = statistics.median(times[1:])
        finally:
            proc.terminate()
            proc.wait()
    tls["tls_overhead_fraction"] = tls["mutual_tls_step_s"] / tls["insecure_step_s"] - 1
    out["tls"] = tls
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
