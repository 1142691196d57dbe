"""Level-2 deployment material: the Gramine manifest template and its checker.

No SGX hardware is needed to *check* the manifest: :func:`check_manifest` renders the Jinja template the way
``gramine-manifest`` would (with dummy values for the build-time variables), parses the result as TOML and
validates the keys an asymml enclave needs. See ``README.md`` in this package for the deployment itself.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ManifestError

TEMPLATE = Path(__file__).with_name("asymml.manifest.template")

MOUNT_TYPES = ("chroot", "encrypted", "tmpfs", "untrusted_shm")
LOG_LEVELS = ("none", "error", "warning", "debug", "trace", "all")
_SIZE = re.compile(r"^[0-9]+[KMG]?$")


def dummy_context() -> dict[str, Any]:
    """Stand-ins for what ``gramine-manifest`` provides (``gramine.*``, ``python.*``, ``env``) and for the
    ``-D`` variables of the asymml template."""
    runtime = "/usr/lib/x86_64-linux-gnu/gramine/runtime/glibc"
    stdlib = "/usr/lib/python3.11"
    return {
        "gramine": SimpleNamespace(libos="/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so",
                                   runtimedir=lambda *a, **k: runtime),
        "python": SimpleNamespace(stdlib=stdlib, distlib="/usr/lib/python3/dist-packages",
                                  get_sys_path=lambda *a, **k: [stdlib, "/usr/lib/python3/dist-packages"]),
        "env": {},
        "entrypoint": "/usr/bin/python3.11",
        "arch_libdir": "/lib/x86_64-linux-gnu",
        "site_packages": "/opt/asymml-venv/lib/python3.11/site-packages",
        "log_level": "error",
    }


def render_manifest(text: str, context: dict[str, Any] | None = None) -> str:
    """Render a Jinja manifest template; variables not in ``context`` become the string ``dummy``."""
    ctx = dummy_context()
    ctx.update(context or {})
    try:
        import jinja2
    except ImportError:  # pragma: no cover - jinja2 ships with torch
        text = re.sub(r"\{%.*?%\}", "", text, flags=re.S)
        return re.sub(r"\{\{.*?\}\}", "dummy", text, flags=re.S)

    class _Dummy(jinja2.Undefined):
        def __str__(self) -> str:
            return "dummy"

    env = jinja2.Environment(undefined=_Dummy, keep_trailing_newline=True, autoescape=False)
    try:
        return env.from_string(text).render(**ctx)
    except jinja2.TemplateError as e:
        raise ManifestError(f"template does not render: {e}") from None


def _parse_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        try:
            import tomli as tomllib
        except ImportError:
            raise ManifestError("checking a manifest needs Python >= 3.11 (tomllib) or the tomli package") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError(f"not valid TOML: {e}") from None


def _get(doc: dict[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _env_value(v: Any) -> Any:
    return v.get("value") if isinstance(v, dict) else v


def validate_manifest(doc: dict[str, Any], *, allow_insecure: bool = False) -> list[str]:
    """Problems with a parsed manifest (empty list: fine)."""
    p: list[str] = []
    ep = _get(doc, "libos.entrypoint")
    if not isinstance(ep, str) or not ep.startswith("/"):
        p.append("libos.entrypoint must be the absolute path of the Python interpreter")
    le = _get(doc, "loader.entrypoint")  # optional since Gramine 1.7 (gramine-manifest adds it)
    le_uri = le.get("uri") if isinstance(le, dict) else le
    if le is not None and (not isinstance(le_uri, str) or not le_uri.startswith("file:")):
        p.append("loader.entrypoint(.uri) must be a file: URI of Gramine's libsysdb.so")
    lvl = _get(doc, "loader.log_level")
    if lvl is not None and lvl not in LOG_LEVELS:
        p.append(f"loader.log_level must be one of {', '.join(LOG_LEVELS)}")
    env = _get(doc, "loader.env")
    if not isinstance(env, dict):
        p.append("loader.env must be a table (the enclave's environment)")
        env = {}
    argv_opts = [k for k in ("argv", "argv_src_file", "insecure__use_cmdline_argv") if _get(doc, f"loader.{k}")]
    if len(argv_opts) != 1:
        p.append("exactly one of loader.argv, loader.argv_src_file, loader.insecure__use_cmdline_argv is needed "
                 f"(found {argv_opts or 'none'})")
    if not allow_insecure:
        if _get(doc, "loader.insecure__use_cmdline_argv"):
            p.append("loader.insecure__use_cmdline_argv lets the host choose the run (e.g. --mode plain); "
                     "use loader.argv_src_file with a trusted file")
        if _get(doc, "loader.insecure__use_host_env"):
            p.append("loader.insecure__use_host_env hands the environment to the host")
        if _get(doc, "sgx.debug") is True:
            p.append("sgx.debug = true makes enclave memory readable by a debugger")
    mounts = _get(doc, "fs.mounts")
    if not isinstance(mounts, list) or not mounts:
        p.append("fs.mounts must be a non-empty array of mounts")
        mounts = []
    keys_needed = set()
    for i, m in enumerate(mounts):
        if not isinstance(m, dict):
            p.append(f"fs.mounts[{i}] must be a table")
            continue
        mtype = m.get("type", "chroot")
        path = m.get("path")
        if mtype not in MOUNT_TYPES:
            p.append(f"fs.mounts[{i}]: unknown type {mtype!r}")
        if not isinstance(path, str) or not path.startswith("/"):
            p.append(f"fs.mounts[{i}]: path must be absolute")
        if mtype != "tmpfs" and not (isinstance(m.get("uri"), str) and m["uri"].startswith(("file:", "dev:"))):
            p.append(f"fs.mounts[{i}] ({path}): uri must be a file: or dev: URI")
        if mtype == "encrypted":
            key = m.get("key_name", "default")
            if not isinstance(key, str) or not key:
                p.append(f"fs.mounts[{i}] ({path}): key_name must be a non-empty string")
            else:
                keys_needed.add(key)
    if not keys_needed:
        p.append("no encrypted mount: the dataset and checkpoints must live on an encrypted mount")
    insecure_keys = _get(doc, "fs.insecure__keys") or {}
    if insecure_keys and not allow_insecure:
        p.append("fs.insecure__keys hard-codes encryption keys in the manifest; provision them by attestation")
    provisioned = _env_value(env.get("SECRET_PROVISION_SET_KEY"))
    for key in sorted(keys_needed):
        if key.startswith("_sgx_") or key == provisioned or key in insecure_keys:
            continue
        p.append(f"encrypted-mount key {key!r} is never provisioned (set loader.env.SECRET_PROVISION_SET_KEY)")
    if provisioned is not None:
        if "secret_prov_attest" not in str(_env_value(env.get("LD_PRELOAD", ""))):
            p.append("SECRET_PROVISION_SET_KEY needs loader.env.LD_PRELOAD = libsecret_prov_attest.so")
        if not _env_value(env.get("SECRET_PROVISION_SERVERS")):
            p.append("SECRET_PROVISION_SET_KEY needs loader.env.SECRET_PROVISION_SERVERS")
    if _get(doc, "sgx.remote_attestation") != "dcap":
        p.append('sgx.remote_attestation must be "dcap" (keys are provisioned after attestation)')
    size = _get(doc, "sgx.enclave_size")
    if not isinstance(size, str) or not _SIZE.match(size):
        p.append('sgx.enclave_size must be a size string such as "16G"')
    threads = _get(doc, "sgx.max_threads")
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 4:
        p.append("sgx.max_threads must be an integer >= 4 (Gramine needs helper threads)")
    stack = _get(doc, "sys.stack.size")
    if stack is not None and (not isinstance(stack, str) or not _SIZE.match(stack)):
        p.append('sys.stack.size must be a size string such as "8M"')
    for name, required in (("sgx.trusted_files", True), ("sgx.allowed_files", False)):
        files = _get(doc, name)
        if files is None and not required:
            continue
        if not isinstance(files, list) or (required and not files):
            p.append(f"{name} must be a{' non-empty' if required else 'n'} array")
            continue
        for f in files:
            uri = f.get("uri") if isinstance(f, dict) else f
            if not isinstance(uri, str) or not uri.startswith(("file:", "dev:")):
                p.append(f"{name}: entry {f!r} is not a file: URI")
    trusted = " ".join(str(f.get("uri") if isinstance(f, dict) else f) for f in (_get(doc, "sgx.trusted_files") or []))
    if isinstance(ep, str) and ep not in trusted:
        p.append("the interpreter (libos.entrypoint) must be a trusted file")
    return p


def check_manifest(path: str | Path = TEMPLATE, *, context: dict[str, Any] | None = None,
                   allow_insecure: bool = False) -> dict[str, Any]:
    """Render (Jinja, dummy values), parse (TOML) and validate a manifest template or manifest.

    Returns the parsed manifest; raises :class:`ManifestError` listing every problem found.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"cannot read {path}: {e.strerror or e}") from None
    doc = _parse_toml(render_manifest(text, context))
    problems = validate_manifest(doc, allow_insecure=allow_insecure)
    if problems:
        raise ManifestError(f"{path}: " + "; ".join(problems))
    return doc


__all__ = ["TEMPLATE", "ManifestError", "check_manifest", "render_manifest", "validate_manifest", "dummy_context"]
