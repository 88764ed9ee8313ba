"""A hand-written CPU kernel for the skinny matmuls of decoding, built on first use; XLA is the fallback.

panel_matmul computes x [B, K] @ W for B <= 8 rows with W packed by pack_panels into panels [N / 48, K, 48]
(kernels/panel_matmul.cc); W is float32 or bfloat16, the sums and the result float32. In a decode step every
weight is read once per token, and XLA:CPU's GEMM with 8 rows reads the weights at about half the machine's
bandwidth; the packed panels are one contiguous stream each.
The kernel is compiled with the system C++ compiler (-march=native, AVX-512 needed) into the user's cache
directory the first time it is needed on a machine (one library per source, compiler, jaxlib version and CPU
model), and each process registers it as an XLA FFI target. Where that fails (no
compiler, no AVX-512, not x86) or GPT2_JAX_CPU_KERNELS=0 is set, available() is False and says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

PANEL_WIDTH = 48
MAX_ROWS = 8
_SOURCE = Path(__file__).parent / "kernels" / "panel_matmul.cc"
_TARGETS = {jnp.dtype(jnp.float32): ("gpt2_jax_panel_matmul", "PanelMatmul"),
            jnp.dtype(jnp.bfloat16): ("gpt2_jax_panel_matmul_bf16", "PanelMatmulBf16")}
_state: dict = {}  # "error": why the kernel is unavailable, or "loaded": True


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gpt2_jax"


def _cpuinfo() -> str | None:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else None


def _cpu_description(cpuinfo: str | None) -> str:
    """The first processor's lines of /proc/cpuinfo that -march=native depends on (not the clock speed, which
    changes from one process to the next); platform.processor() where there is no /proc/cpuinfo."""
    if cpuinfo is None:
        return platform.processor()
    first = cpuinfo.split("\n\n")[0].splitlines()
    return "\n".join(line for line in first if line.split(":")[0].strip() in ("vendor_id", "model name", "flags"))


def _build() -> Path:
    """Compile the kernel once per source, compiler, jaxlib version and CPU model; return the library's path."""
    compiler = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]
    if not compiler[0]:
        raise RuntimeError("no C++ compiler found (set CXX)")
    cpuinfo = _cpuinfo()
    cpu = _cpu_description(cpuinfo)
    if cpuinfo is not None and "avx512f" not in cpu.split():
        raise RuntimeError("this CPU has no AVX-512 (no avx512f in /proc/cpuinfo)")
    parts = (_SOURCE.read_bytes().decode(), " ".join(compiler), jaxlib.__version__, cpu)
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    library = _cache_dir() / f"panel_matmul-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        command = [*compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
                   "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", str(built)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if run.returncode:
            errors = [line for line in run.stderr.splitlines() if "error" in line]
            message = (errors or run.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{' '.join(compiler)} -O3 ... failed: {message}")
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
    if not available():
        raise RuntimeError(f"the panel kernel cannot run here: {unavailable_reason()}")
    B, K = x_BK.shape
    if not 1 <= B <= MAX_ROWS or w_PKW.shape[1:] != (K, PANEL_WIDTH) or n_out > w_PKW.shape[0] * PANEL_WIDTH:
        raise ValueError(f"panel_matmul needs x [B <= {MAX_ROWS}, K], panels [P, K, {PANEL_WIDTH}] and n_out <= "
                         f"{PANEL_WIDTH}P; got {x_BK.shape}, {w_PKW.shape} and {n_out}")
    if jnp.dtype(w_PKW.dtype) not in _TARGETS:
        raise ValueError(f"panel_matmul takes float32 or bfloat16 panels (see pack_panels); got {w_PKW.dtype}")
    out = jax.ShapeDtypeStruct((B, w_PKW.shape[0] * PANEL_WIDTH), jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS[jnp.dtype(w_PKW.dtype)][0], out, vmap_method="sequential")
    return call(x_BK.astype(jnp.float32), w_PKW)[:, :n_out]
