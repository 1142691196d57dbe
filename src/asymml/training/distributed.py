"""Data-parallel training over several trusted contexts (issue 10), on ``torch.distributed``.

Each rank of a ``torchrun`` job (or of ``asymml train --nproc-per-node N``) is one trusted context with its
own accelerator executor.  Per optimisation step every rank runs forward/backward on its shard of the global
batch, then one ``all_reduce`` (gloo on the CPU; the trusted side never needs a GPU) over a single flat
tensor -- every parameter gradient, every floating-point buffer (BatchNorm running statistics) and a few
scalars (the step's loss sum, correct count and sample count, and a stop flag) -- makes every rank's
gradients and buffers identical before the optimizer step, so every rank ends each step with the same
parameters.  One flat tensor means one collective per step whatever the number of layers (the bucketing
of ``DistributedDataParallel``, done once after backward: the split runtime writes some gradients itself,
outside autograd, so DDP's per-parameter hooks would not see them all).

Privacy across ranks: the exchanged partial gradients are the trusted shares of the update before DP
noise, as private as anything inside one trusted context.  Gloo can run over TLS (``GLOO_DEVICE_TRANSPORT
=TCP_TLS``) only when PyTorch was built with ``USE_GLOO_WITH_OPENSSL=1``; :func:`gloo_tls_available` probes
the installed build.  Without TLS, a rendezvous on a non-loopback address is refused unless the user states
that the network between the trusted contexts is protected (``--trusted-interconnect``).

Failures: every collective runs under ``--dist-timeout`` seconds (``init_process_group(timeout=...)``); a
rank that dies closes its sockets and the others fail at their next collective at once, a rank that hangs
makes them fail after the timeout; either way each surviving rank raises :class:`PeerLostError`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, PeerLostError

__all__ = ["DistributedContext", "PeerLostError", "gloo_tls_available", "init_from_env", "is_loopback",
           "launched_world_size", "rank_device", "TLS_ENV"]

TLS_ENV = ("GLOO_DEVICE_TRANSPORT_TCP_TLS_PKEY", "GLOO_DEVICE_TRANSPORT_TCP_TLS_CERT",
           "GLOO_DEVICE_TRANSPORT_TCP_TLS_CA_FILE")
"""The environment variables PyTorch's gloo TLS transport reads: private key, certificate, CA file (PEM)."""


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 outside a distributed launch)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def gloo_tls_available() -> bool:
    """Whether the installed PyTorch's gloo has the TLS transport (built with ``USE_GLOO_WITH_OPENSSL``):
    creating a ``TCP_TLS`` device fails with "unsupported gloo device" otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        return False
    old = os.environ.get("GLOO_DEVICE_TRANSPORT")
    os.environ["GLOO_DEVICE_TRANSPORT"] = "TCP_TLS"
    try:
        dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    except RuntimeError as e:
        return "unsupported gloo device" not in str(e)  # other errors: TLS is built in, its files are missing
    finally:
        if old is None:
            os.environ.pop("GLOO_DEVICE_TRANSPORT", None)
        else:
            os.environ["GLOO_DEVICE_TRANSPORT"] = old
    return True


def rank_device(device: str, rank: int, world_size: int) -> str:
    """This rank's accelerator: ``device`` itself, a ``{rank}`` placeholder filled in
    (``tcp://gpu{rank}:7777``), or the rank-th of a comma-separated list of addresses (one per rank)."""
    if "," in device:
        devices = [d.strip() for d in device.split(",") if d.strip()]
        if len(devices) != world_size:
            raise ConfigError(f"--device lists {len(devices)} accelerators for {world_size} ranks: give one per "
                              "rank, or one address with a {rank} placeholder")
        device = devices[rank]
    return device.replace("{rank}", str(rank))


def _security(master_addr: str, *, trusted_interconnect: bool, tls: bool) -> str:
    """How the gradients exchanged between ranks are protected; refuses an unprotected network."""
    if tls:
        if not gloo_tls_available():
            raise ConfigError(
                f"--dist-tls: this PyTorch ({torch.__version__}) was built without gloo's TLS transport "
                "(USE_GLOO_WITH_OPENSSL=1 at build time); run on one host (loopback rendezvous), or over a "
                "network you protect yourself (VPN, IPsec, WireGuard) with --trusted-interconnect")
        missing = [k for k in TLS_ENV if not os.environ.get(k)]
        if missing:
            raise ConfigError(f"--dist-tls needs the gloo TLS files in the environment: set {', '.join(missing)} "
                              "(PEM files; `asymml certs --out DIR` writes a test set)")
        os.environ["GLOO_DEVICE_TRANSPORT"] = "TCP_TLS"
        return "gloo TLS"
    if is_loopback(master_addr):
        return "loopback"
    if trusted_interconnect:
        return "trusted interconnect (declared by --trusted-interconnect; gloo without encryption)"
    raise ConfigError(
        f"MASTER_ADDR {master_addr!r} is not a loopback address: the ranks would exchange unnoised gradient "
        "shares over the network in clear (this PyTorch's gloo "
        + ("has TLS: pass --dist-tls with the TLS files in the environment" if gloo_tls_available()
           else "has no TLS transport")
        + "). Pass --trusted-interconnect only if the network between the trusted contexts is protected "
        "(a VPN, IPsec, WireGuard, or a private link)")


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name == "lo" or name.startswith("lo"):
            return name
    return None


class DistributedContext:
    """This process's place in a data-parallel run: ``rank`` of ``world_size``, the gloo process group
    (collectives time out after ``timeout_s``), and the step synchronisation of :meth:`sync_step`."""

    def __init__(self, rank: int, world_size: int, *, timeout_s: float, transport: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.transport = transport
        self.allreduce_s = 0.0
        self.allreduce_steps = 0
        self.allreduce_bytes = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, TensorBoard, checkpoints and the summary."""
        return self.rank == 0

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a failed collective into :class:`PeerLostError` naming what failed."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed.DistError and gloo's RuntimeErrors
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise PeerLostError(
                f"rank {self.rank} of {self.world_size}: the {what} with the other ranks failed ({first}); another "
                f"rank died, was stopped, or did not answer within --dist-timeout {self.timeout_s:g} s") from None

    # ------------------------------------------------------------------ collectives
    def broadcast_text(self, value: str | None) -> str | None:
        """Rank 0's ``value`` on every rank (e.g. the output directory)."""
        import torch.distributed as dist

        data = (value or "").encode() if self.is_main else b""
        n = torch.tensor([len(data) if self.is_main else 0, value is None], dtype=torch.int64)
        with self.guard("broadcast of the run's settings"):
            dist.broadcast(n, src=0)
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main and data else \
                torch.empty(int(n[0]), dtype=torch.uint8)
            if int(n[0]):
                dist.broadcast(buf, src=0)
        return None if bool(n[1]) else bytes(buf.tolist()).decode()

    def broadcast_module(self, module: nn.Module) -> None:
        """Overwrite every rank's parameters and buffers with rank 0's (one flat broadcast)."""
        import torch.distributed as dist

        tensors = [t for t in (*module.parameters(), *module.buffers())]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors])
        with self.guard("broadcast of the initial parameters"):
            dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[offset:offset + n].view(t.shape).to(t.dtype))
                offset += n

    def sync_step(self, params: Sequence[nn.Parameter], buffers: Sequence[torch.Tensor], *, grad_scale: float,
                  extras: Sequence[float]) -> list[float]:
        """One all-reduce (sum) of a flat tensor holding every gradient, every floating buffer and ``extras``;
        then ``grad = sum * grad_scale`` (``1/world_size``: the mean of the ranks' mean-loss gradients;
        ``1``: DP-SGD sums), buffers become the ranks' mean; returns the summed ``extras``."""
        import torch.distributed as dist

        t0 = time.perf_counter()
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in (*params, *buffers)) else torch.float32
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to("cpu", dtype)
                 for p in params]
        parts += [b.detach().reshape(-1).to("cpu", dtype) for b in buffers]
        parts.append(torch.tensor(list(extras), dtype=dtype))  # small counts and sums: exact enough in fp32
        flat = torch.cat(parts)
        with self.guard("gradient all-reduce"):
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        extra_sum = flat[flat.numel() - len(extras):].tolist()
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                g = flat[offset:offset + n].view(p.shape).mul_(grad_scale).to(p.device, p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
                offset += n
            for b in buffers:
                n = b.numel()
                b.copy_(flat[offset:offset + n].view(b.shape).div_(self.world_size).to(b.device, b.dtype))
                offset += n
        self.allreduce_s += time.perf_counter() - t0
        self.allreduce_steps += 1
        self.allreduce_bytes = flat.numel() * flat.element_size()
        return [float(v) for v in extra_sum]

    def all_max(self, values: Sequence[float]) -> list[float]:
        """The element-wise maximum of ``values`` over the ranks."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        with self.guard("all-reduce of the step's release counts"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [float(v) for v in t]

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The element-wise sum of ``values`` over the ranks (float64)."""
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64)
        with self.guard("all-reduce of the evaluation sums"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return [float(v) for v in t]

    def barrier(self, what: str = "barrier") -> None:
        """Wait for every rank (bounded by the collective timeout)."""
        import torch.distributed as dist

        with self.guard(what):
            dist.barrier()

    def describe(self) -> dict[str, Any]:
        """The ``distributed`` part of the summary (per-rank figures are rank 0's)."""
        steps = max(self.allreduce_steps, 1)
        return {"world_size": self.world_size, "backend": "gloo", "transport": self.transport,
                "timeout_s": self.timeout_s, "allreduce_s_per_step": self.allreduce_s / steps,
                "allreduce_bytes_per_step": self.allreduce_bytes,
                "allreduce_definition": "rank 0's trusted-side wall time of the per-step all-reduce, flattening "
                                        "and unflattening included (waiting for slower ranks included)"}

    def close(self) -> None:
        """Leave the process group (quietly: the peers may be gone)."""
        import torch.distributed as dist

        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def init_from_env(*, timeout_s: float = 60.0, trusted_interconnect: bool = False, tls: bool = False
                  ) -> DistributedContext | None:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``); None outside a distributed launch (``WORLD_SIZE`` unset or 1).

    The rendezvous address must be loopback, or the transport TLS (``tls``), or the network declared
    protected (``trusted_interconnect``).  On a loopback rendezvous gloo is bound to the loopback interface
    (``GLOO_SOCKET_IFNAME``, unless set), so no gradient leaves the host."""
    import torch.distributed as dist

    world = launched_world_size()
    if world <= 1:
        return None
    if not (dist.is_available() and dist.is_gloo_available()):
        raise ConfigError(f"this PyTorch ({torch.__version__}) has no torch.distributed gloo backend")
    try:
        rank = int(os.environ["RANK"])
    except (KeyError, ValueError):
        raise ConfigError("WORLD_SIZE is set but RANK is not: launch with torchrun (or asymml train "
                          "--nproc-per-node N)") from None
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    transport = _security(master, trusted_interconnect=trusted_interconnect, tls=tls)
    if transport == "loopback" and "GLOO_SOCKET_IFNAME" not in os.environ:
        lo = _loopback_interface()
        if lo is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = lo
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise PeerLostError(f"rank {rank} of {world}: joining the other ranks at {master}:"
                                f"{os.environ.get('MASTER_PORT', '?')} failed ({first})") from None
    return DistributedContext(rank, world, timeout_s=timeout_s, transport=transport)
