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

Values the user set are never overridden; ``ASYMML_NO_ENV_TUNING=1`` disables both.
"""

from __future__ import annotations

import os

TUNED = {"OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}


def tune_process_environment() -> dict[str, str]:
    """Apply :data:`TUNED` where the user has not set the variables; return what is in effect."""
    if os.environ.get("ASYMML_NO_ENV_TUNING"):
        return {}
    for k, v in TUNED.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in TUNED}
