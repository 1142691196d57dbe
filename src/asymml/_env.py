"""Process settings the trusted runtime needs, applied by the library itself so no user has to.

* ``OMP_WAIT_POLICY=PASSIVE``: the trusted side and an in-process accelerator each run their own OpenMP
  team; with the default active policy, idle OpenMP threads spin for milliseconds and steal the cores the
  other side needs (2-thread runs measured 4–5× slower). libgomp reads this when it is loaded, so it is
  set here, before ``torch`` is imported — it has no effect when the caller imported torch first (the
  ``asymml`` command line always imports asymml first).
* ``THP_MEM_ALLOC_ENABLE=1``: PyTorch backs large CPU tensors with transparent huge pages. A fresh
  100 MB activation otherwise costs ~25,000 page faults (measured 2–4× the time of writing it); with huge
  pages ~600. Both the split and the trusted-only baseline run in the same process and benefit alike; an
  SGX enclave, whose memory is committed up front, does not page-fault on fresh allocations at all.

* glibc ``malloc``: large blocks come from the heap and freed memory is kept for reuse
  (``mallopt(M_MMAP_MAX, 0)``, ``M_TRIM_THRESHOLD`` 2 GiB), instead of one ``mmap``/``munmap`` per tensor.
  Every fresh activation otherwise page-faults its memory in again, even with huge pages: writing a fresh
  100 MB tensor measured 32 ms against 12–14 ms into reused memory (2 cores). The process keeps its
  high-water mark of memory instead of returning it to the system, which is how an enclave's committed
  memory behaves anyway. Skipped when ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` is set, and
  on C libraries other than glibc.

Values the user set are never overridden; ``ASYMML_NO_ENV_TUNING=1`` disables all three.
"""

from __future__ import annotations

import ctypes
import os
import sys

TUNED = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def tune_process_environment() -> dict[str, str]:
    """Apply :data:`TUNED` where the user has not set the variables; return what is in effect."""
    if os.environ.get("ASYMML_NO_ENV_TUNING"):
        return {}
    for k, v in TUNED.items():
        os.environ.setdefault(k, v)
    out = {k: os.environ[k] for k in TUNED}
    if _tune_malloc():
        out["malloc"] = "heap, no trim below 2 GiB"
    return out


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
MALLOC_TUNED = False  #: whether :func:`_tune_malloc` changed the allocator in this process


def _tune_malloc() -> bool:
    """glibc only: keep large blocks on the heap for reuse (see the module docstring)."""
    global MALLOC_TUNED
    if MALLOC_TUNED:
        return True
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_MMAP_MAX_",
                                                                            "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(None)
        gnu = libc.gnu_get_libc_version  # present in glibc only (musl has mallopt as a no-op stub)
        gnu.restype = ctypes.c_char_p
        gnu()
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    MALLOC_TUNED = ok
    return ok
