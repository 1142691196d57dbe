"""Measure (not a test): verification overhead and TLS overhead on one loopback training step.

    OMP_NUM_THREADS=1 python tests/executors/measure_overhead.py [--model resnet20] [--batch 32] [--steps 3]

Prints JSON: ``verify`` = :func:`asymml.executors.verify.time_overhead` (in-process accelerator: verification
seconds per step as a fraction of a forward+backward without it), ``detection`` = measure_detection, and
``tls`` = median step time against an ``asymml serve`` subprocess over loopback TCP with mutual TLS vs
``--insecure`` (verification on in both).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))
    from hostile_util import split_all

    import asymml
    from asymml.executors import make_executor
    from asymml.executors.tls import write_test_pki
    from asymml.executors.verify import measure_detection, time_overhead
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
