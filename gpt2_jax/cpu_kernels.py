"""Hand-written CPU kernels, built on first use; XLA is the fallback.

panel_matmul computes x [B, K] @ W with W packed by pack_panels into panels [N / 48, K, 48]
(kernels/panel_matmul.cc); W is float32 or bfloat16, the sums and the result float32, each row's sums its own
whatever the other rows. In a decode step every weight is read once per token, and XLA:CPU's GEMM with 8 rows
reads the weights at about half the machine's bandwidth; the packed panels are one contiguous stream each. A
prefill's many rows read each part of a panel once for all of them.
causal_attention is the causal self-attention of a training step, forward and backward, in float32
(kernels/causal_attention.cc): each (batch row, head) in cache-sized buffers, blocks above the diagonal skipped,
q, k and v read straight from the fused qkv projection.
decode_attention is the attention of a decode step over the KV cache, float32 (kernels/decode_attention.cc): each
(row, head) reads only its own row's slots, where XLA reads every slot of every row.
adamw_update is one AdamW step of a float32 parameter in place, in one pass over memory (kernels/adamw.cc):
optim.fused_update's arithmetic, which XLA:CPU computes in three passes that read the gradient three times.
The kernels are written once in vectors as wide as the CPU's (kernels/simd.h: AVX-512, AVX2 + FMA, or 64-bit ARM
NEON) and compiled with the system C++ compiler (-march=native) into the user's cache directory the first time they
are needed on a machine (one library per source, compiler, jaxlib version and CPU model); each process registers
them as XLA FFI targets. Where that fails (no compiler, a 32-bit system, an x86 CPU without AVX2 and FMA, another
architecture) or GPT2_JAX_CPU_KERNELS=0 is set, available() is False and says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

PANEL_WIDTH = 48
ATTENTION_HEAD_SIZES = (16, 32, 48, 64)
_SOURCES = [Path(__file__).parent / "kernels" / name for name in ("panel_matmul.cc", "causal_attention.cc",
                                                                   "decode_attention.cc", "adamw.cc")]
_HEADERS = [Path(__file__).parent / "kernels" / name for name in ("share_work.h", "simd.h")]
_TARGETS = {jnp.dtype(jnp.float32): ("gpt2_jax_panel_matmul", "PanelMatmul"),
            jnp.dtype(jnp.bfloat16): ("gpt2_jax_panel_matmul_bf16", "PanelMatmulBf16"),
            "attention_forward": ("gpt2_jax_causal_attention_fwd", "CausalAttentionForward"),
            "attention_backward": ("gpt2_jax_causal_attention_bwd", "CausalAttentionBackward"),
            "decode_attention": ("gpt2_jax_decode_attention", "DecodeAttention"),
            "adamw": ("gpt2_jax_adamw", "AdamW")}
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


def cpu_problem(machine: str, pointer_bits: int, cpu: str) -> str | None:
    """Why kernels/simd.h cannot vectorise for this CPU (machine as platform.machine() names it, cpu as
    _cpu_description gives it), or None if it can."""
    if pointer_bits != 64:
        return f"the kernels need a 64-bit system; this Python is {pointer_bits}-bit"
    if machine.lower() in ("aarch64", "arm64"):
        return None  # NEON and its fused multiply-add are part of every 64-bit ARM CPU
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the kernels need an x86-64 CPU with AVX2 and FMA or a 64-bit ARM CPU; this is {machine}"
    flags = set(next((line.split(":", 1)[1] for line in cpu.splitlines() if line.startswith("flags")), "").split())
    if flags and not ({"avx2", "fma"} <= flags or "avx512f" in flags):
        return "this CPU has neither AVX2 and FMA nor AVX-512 (flags in /proc/cpuinfo)"
    return None


def compile_command(compiler: list[str], output: Path, march: str = "native") -> list[str]:
    """The command that builds the kernels' library (march: the -march value)."""
    return [*compiler, "-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", "-w",
            "-I", jax.ffi.include_dir(), *map(str, _SOURCES), "-o", str(output)]


def _build() -> Path:
    """Compile the kernels once per source, compiler, jaxlib version and CPU model; return the library's path."""
    compiler = shlex.split(os.environ.get("CXX", "")) or [shutil.which("c++") or shutil.which("g++") or ""]
    if not compiler[0]:
        raise RuntimeError("no C++ compiler found (set CXX)")
    cpu = _cpu_description(_cpuinfo())
    problem = cpu_problem(platform.machine(), 64 if sys.maxsize > 2**32 else 32, cpu)
    if problem:
        raise RuntimeError(problem)
    parts = (*(f.read_bytes().decode() for f in _SOURCES + _HEADERS), " ".join(compiler), jaxlib.__version__, cpu)
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    library = _cache_dir() / f"kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        run = subprocess.run(compile_command(compiler, built), capture_output=True, text=True, timeout=300)
        if run.returncode:
            errors = [line for line in run.stderr.splitlines() if "error" in line]
            message = (errors or run.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{' '.join(compiler)} -O3 ... failed: {message}")
        os.replace(built, library)  # atomic: processes building at the same time never see half a file
    return library


def available() -> bool:
    """True if the kernels can run here (builds and registers them on the first call)."""
    if not _state:
        try:
            if os.environ.get("GPT2_JAX_CPU_KERNELS", "1") == "0":
                raise RuntimeError("disabled by GPT2_JAX_CPU_KERNELS=0")
            library = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in _TARGETS.values():
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
            _state["loaded"] = True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _state["error"] = str(e)
    return "loaded" in _state


def one_cpu_device() -> bool:
    """Whether this process computes on a single CPU device, where the kernels apply (nothing is sharded)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def unavailable_reason() -> str | None:
    """Why the kernels cannot run here, or None if they can."""
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
    """x [B, K] @ W [K, n_out] for B >= 1, with W given as pack_panels(W); float32 result, row by row."""
    if not available():
        raise RuntimeError(f"the panel kernel cannot run here: {unavailable_reason()}")
    B, K = x_BK.shape
    if B < 1 or w_PKW.shape[1:] != (K, PANEL_WIDTH) or n_out > w_PKW.shape[0] * PANEL_WIDTH:
        raise ValueError(f"panel_matmul needs x [B >= 1, K], panels [P, K, {PANEL_WIDTH}] and n_out <= "
                         f"{PANEL_WIDTH}P; got {x_BK.shape}, {w_PKW.shape} and {n_out}")
    if jnp.dtype(w_PKW.dtype) not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"panel_matmul takes float32 or bfloat16 panels (see pack_panels); got {w_PKW.dtype}")
    out = jax.ShapeDtypeStruct((B, w_PKW.shape[0] * PANEL_WIDTH), jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS[jnp.dtype(w_PKW.dtype)][0], out, vmap_method="sequential")
    return call(x_BK.astype(jnp.float32), w_PKW)[:, :n_out]


def _attention_forward(qkv_BT3HD):
    B, T, _, H, D = qkv_BT3HD.shape
    out = (jax.ShapeDtypeStruct((B, T, H, D), jnp.float32), jax.ShapeDtypeStruct((B, H, T, 2), jnp.float32))
    return jax.ffi.ffi_call(_TARGETS["attention_forward"][0], out, vmap_method="sequential")(qkv_BT3HD)


@jax.custom_vjp
def _attention(qkv_BT3HD):
    return _attention_forward(qkv_BT3HD)[0]


def _attention_fwd(qkv_BT3HD):
    y_BTHD, stats_BHT2 = _attention_forward(qkv_BT3HD)  # each softmax row's max and 1 / sum
    return y_BTHD, (qkv_BT3HD, stats_BHT2)


def _attention_bwd(residuals, dy_BTHD):
    qkv_BT3HD, stats_BHT2 = residuals
    out = jax.ShapeDtypeStruct(qkv_BT3HD.shape, jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS["attention_backward"][0], out, vmap_method="sequential")
    return (call(qkv_BT3HD, stats_BHT2, dy_BTHD.astype(jnp.float32)),)


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(qkv_BT3HD):
    """softmax(q k^T / sqrt(D), causal) v for qkv [B, T, 3, H, D] float32 (q, k, v on axis 2): y [B, T, H, D]."""
    if not available():
        raise RuntimeError(f"the attention kernel cannot run here: {unavailable_reason()}")
    if qkv_BT3HD.ndim != 5 or qkv_BT3HD.shape[2] != 3 or qkv_BT3HD.shape[4] not in ATTENTION_HEAD_SIZES:
        raise ValueError(f"causal_attention needs qkv [B, T, 3, H, D] with D in {ATTENTION_HEAD_SIZES}; "
                         f"got {qkv_BT3HD.shape}")
    if qkv_BT3HD.dtype != jnp.float32:
        raise ValueError(f"causal_attention takes float32 qkv; got {qkv_BT3HD.dtype}")
    return _attention(qkv_BT3HD)


def decode_attention(q_BHD, k_BHDS, v_BHSD, last_B):
    """softmax(q k / sqrt(D)) v over slots 0..last_B[b] of each row's cache: y [B, H, D] float32, for q [B, H, D],
    keys [B, H, D, S] and values [B, H, S, D] (model.KVCache's layout), all float32, D in ATTENTION_HEAD_SIZES."""
    if not available():
        raise RuntimeError(f"the decode attention kernel cannot run here: {unavailable_reason()}")
    B, H, D = q_BHD.shape
    if (D not in ATTENTION_HEAD_SIZES or k_BHDS.shape[:3] != (B, H, D) or
            v_BHSD.shape != (B, H, k_BHDS.shape[3], D) or last_B.shape != (B,)):
        raise ValueError(f"decode_attention needs q [B, H, D] with D in {ATTENTION_HEAD_SIZES}, keys [B, H, D, S], "
                         f"values [B, H, S, D] and last [B]; got {q_BHD.shape}, {k_BHDS.shape}, {v_BHSD.shape} and "
                         f"{last_B.shape}")
    if any(a.dtype != jnp.float32 for a in (q_BHD, k_BHDS, v_BHSD)):
        raise ValueError(f"decode_attention takes float32 q, keys and values; got "
                         f"{[a.dtype.name for a in (q_BHD, k_BHDS, v_BHSD)]}")
    out = jax.ShapeDtypeStruct((B, H, D), jnp.float32)
    call = jax.ffi.ffi_call(_TARGETS["decode_attention"][0], out, vmap_method="sequential")
    return call(q_BHD, k_BHDS, v_BHSD, last_B.astype(jnp.int32))


ADAMW_HYPER = ("scale", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "correction1", "correction2", "eps",
               "lr", "decay")  # the order kernels/adamw.cc reads them in


def adamw_update(g, m, v, p, hyper):
    """(m, v, p) after one AdamW step, computed in place: g, m, v, p float32 arrays of one shape, hyper the float32
    scalars named in ADAMW_HYPER (decay: the weight decay, 0 for a parameter without it)."""
    if not available():
        raise RuntimeError(f"the AdamW kernel cannot run here: {unavailable_reason()}")
    if any(a.dtype != jnp.float32 or a.shape != p.shape for a in (g, m, v, p)):
        raise ValueError(f"adamw_update takes float32 g, m, v, p of one shape; got "
                         f"{[(a.dtype.name, a.shape) for a in (g, m, v, p)]}")
    hyper = jnp.asarray(hyper, jnp.float32)
    if hyper.shape != (len(ADAMW_HYPER),):
        raise ValueError(f"adamw_update takes {len(ADAMW_HYPER)} scalars {ADAMW_HYPER}; got shape {hyper.shape}")
    out = tuple(jax.ShapeDtypeStruct(p.shape, jnp.float32) for _ in range(3))
    call = jax.ffi.ffi_call(_TARGETS["adamw"][0], out, input_output_aliases={1: 0, 2: 1, 3: 2},
                            vmap_method="sequential")
    return call(g, m, v, p, hyper)
