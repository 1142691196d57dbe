"""Process settings applied by ``import asymml`` (asymml._env)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = r"""
import asymml  # noqa
import asymml, asymml._env as e
print(e.MALLOC_TUNED)
"""


def _run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ASYMML_NO_ENV"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_malloc_tuning_applies_and_respects_the_user() -> None:
    import ctypes

    try:
        getattr(ctypes.CDLL(None), "gnu_get_libc_version")  # noqa: B009
    except AttributeError:
        pytest.skip("not glibc")
    assert _run({}) == "True"
    assert _run({"ASYMML_NO_ENV_TUNING": "1"}) == "False"  # opted out
    assert _run({"MALLOC_MMAP_MAX_": "65536"}) == "False"  # the user's own allocator settings win


def test_environment_is_reported_by_the_bench() -> None:
    from asymml.bench.runner import environment

    env = environment("cpu")
    assert "malloc_heap_reuse" in env and "omp_wait_policy" in env
