"""A hand-written CPU kernel for the skinny matmuls of decoding, built on first use; XLA is the fallback.

panel_matmul computes x [B, K] @ W for B <= 8 rows with W packed by pack_panels into panels [N / 48, K, 48]
(kernels/panel_matmul.cc); W is float32 or bfloat16, the sums and the result float32. In a decode step every
weight is read once per token, and XLA:CPU's GEMM with 8 rows reads the weights at about half the machine's
bandwidth; the packed panels are one contiguous stream each.
The kernel is compiled with the system C++ compiler (-march=native, AVX-512 needed) into the user's cache
directory the first time a process asks for it, and registered as an XLA FFI target. Where that fails (no
compiler, no AVX-512, not x86) or GPT2_JAX_CPU_KERNELS=0 is set, available() is False and says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

PANEL_WIDTH = 48
MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "kernels" / "panel_matmul.cc"
_TARGETS = {jnp.dtype(jnp.float32): ("gpt2_jax_panel_matmul", "PanelMatmul"),
            jnp.dtype(jnp.bfloat16): ("gpt2_jax_panel_matmul_bf16", "PanelMatmulBf16")}
_state: dict = {}  # "error": why the kernel is unavailable, or "loaded": True


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2_jax"


def _build() -> Path:
    """Compile the kernel once per source, jaxlib version and host CPU; return the shared library's path."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX)")
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else platform.processor()
    key = hashlib.sha256(_SOURCE.read_bytes() + jax.__version__.encode() + cpu.split("\nprocessor")[0].encode())
    library = _cache_dir() / f"panel_matmul-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        command = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode:
            errors = [line for line in run.stderr.splitlines() if "error" in line]
            message = (errors or run.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{' '.join(command[:2])} ... failed: {message}")
        os.replace(built, library)  # atomic: processes building at the same time never see half a file
    return library


def available() -> bool:
    """True if panel_matmul can run here (builds and registers the kernel on the first call)."""
    if not _state:
        try:
            if os.environ.get("GPT2_JAX_CPU_KERNELS", "1") == "0":
                raise RuntimeError("disabled by GPT2_JAX_CPU_KERNELS=0")
            if platform.machine().lower() not in ("x86_64", "amd64"):
                raise RuntimeError(f"needs an x86-64 CPU with AVX-512; this is {platform.machine()}")
            library = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in _TARGETS.values():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            _state["loaded"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["error"] = str(e)
    return "loaded" in _state


def unavailable_reason() -> str | None:
    """Why panel_matmul cannot run here, or None if it can."""
    return None if available() else _state["error"]


def pack_panels(w_KN):
    """W [K, N] -> panels [ceil(N / 48), K, 48], zero-padded past column N; bfloat16 stays bfloat16, any other
    dtype becomes float32."""
    K, N = w_KN.shape
    P = -(-N // PANEL_WIDTH)
    dtype = jnp.bfloat16 if w_KN.dtype == jnp.bfloat16 else jnp.float32
    w_KN = jnp.pad(w_KN.astype(dtype), ((0, 0), (0, P * PANEL_WIDTH - N)))
    return w_KN.reshape(K, P, PANEL_WIDTH).transpose(1, 0, 2)


def panel_matmul(x_BK, w_PKW, n_out: int):
    """x [B, K] @ W [K, n_out] for 1 <= B <= 8, with W given as pack_panels(W); float32 result."""
    B, K = x_BK.shape
    if not 1 <= B <= MAX_ROWS or w_PKW.shape[1:] != (K, PANEL_WIDTH):
        raise ValueError(f"panel_matmul needs x [B <= {MAX_ROWS}, K] and panels [P, K, {PANEL_WIDTH}]; "
                         f"got {x_BK.shape} and {w_PKW.shape}")
    out = jax.ShapeDtypeStruct((B, w_PKW.shape[0] * PANEL_WIDTH), jnp.float32)
    y_BN = jax.ffi.ffi_call(_TARGETS[jnp.dtype(w_PKW.dtype)][0], out)(x_BK.astype(jnp.float32), w_PKW)
    return y_BN[:, :n_out]
