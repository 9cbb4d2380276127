"""Compile generated CUDA sources to cubins with nvcc, behind a content-addressed disk cache.

The cache key covers everything that changes the binary: package version, source text, the runtime and
task headers, nvcc's version, flags and target architecture. Writes are atomic (temp file + os.replace),
so concurrent processes can share one cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

from . import config as config_module
from .errors import CompileError

log = logging.getLogger("jax_mpk")

NVCC_FLAGS = ("-cubin", "-std=c++17", "-O3", "-lineinfo")


def include_dir() -> pathlib.Path:
    """Headers of the device runtime: installed into the package, or the source tree's ffi/include."""
    package = pathlib.Path(__file__).resolve().parent
    for candidate in (package / "include", package.parent / "ffi" / "include"):
        if (candidate / "jax_mpk" / "runtime" / "megakernel.cuh").exists():
            return candidate
    raise CompileError("jax_mpk's CUDA headers are missing (neither jax_mpk/include nor ffi/include exists)")


@functools.cache
def nvcc() -> str:
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            found = os.path.join(home, "bin", "nvcc")
    if not found:
        raise CompileError("nvcc was not found (looked on PATH, $CUDA_HOME, /usr/local/cuda); install the CUDA toolkit")
    return found


@functools.cache
def nvcc_version() -> str:
    return subprocess.run([nvcc(), "--version"], capture_output=True, text=True, check=True).stdout.strip()


def arch_flags(compute_capability: str) -> list[str]:
    """sm_90a on Hopper (wgmma, setmaxnreg need the 'a' target), sm_XY elsewhere."""
    major, minor = compute_capability.split(".")
    suffix = "a" if (major, minor) == ("9", "0") else ""
    return [f"-gencode=arch=compute_{major}{minor}{suffix},code=sm_{major}{minor}{suffix}"]


def _headers_digest() -> str:
    digest = hashlib.sha256()
    root = include_dir()
    for path in sorted(root.rglob("*.cuh")) + sorted(root.rglob("*.h")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def compile_cubin(source: str, compute_capability: str = "9.0") -> bytes:
    """The cubin of ``source`` for the given architecture, from the cache when possible."""
    from . import __version__

    cfg = config_module.load()
    flags = [*NVCC_FLAGS, *arch_flags(compute_capability), f"-I{include_dir()}"]
    key = hashlib.sha256(
        "\0".join([__version__, source, " ".join(flags[:-1]), nvcc_version(), _headers_digest()]).encode()
    ).hexdigest()
    cache_dir = pathlib.Path(cfg.cache_dir)
    cached = cache_dir / f"{key}.cubin"
    if cached.exists() and not cfg.force_compile:
        return cached.read_bytes()
    with tempfile.TemporaryDirectory(prefix="jax_mpk_") as work:
        src = pathlib.Path(work) / "megakernel.cu"
        out = pathlib.Path(work) / "megakernel.cubin"
        src.write_text(source)
        command = [nvcc(), *flags, "-o", str(out), str(src)]
        start = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            keep = pathlib.Path(tempfile.mkdtemp(prefix="jax_mpk_failed_")) / "megakernel.cu"
            keep.write_text(source)
            raise CompileError(
                f"nvcc failed (exit {result.returncode}); reproduce with:\n  "
                f"{' '.join(command[:-1])} {keep}\n{result.stderr[-4000:]}"
            )
        log.info("jax_mpk: compiled megakernel in %.1f s (cache miss %s)", time.monotonic() - start, key[:12])
        cubin = out.read_bytes()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_bytes(cubin)
    os.replace(tmp, cached)
    return cubin
