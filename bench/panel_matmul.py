"""The decode kernel alone: cpu_kernels' panel matmul on gpt2's matrices at 1 and 8 rows (a decode step) or more
(a prefill), in microseconds a call, GB/s of weights read (against the copy bandwidth measured here) and GFLOP/s.

    python bench/panel_matmul.py [--baseline=REV] [--baseline_rows=0] [--dtype=float32] [--rows=1,8] [--reps=10]
                                 [--copies=12]

Each matrix shape (768x2304, 768x768, 768x3072, 3072x768 and the 768x50257 head) is held in `copies` copies
(the head in 2), more than the L3 cache holds, and one jitted call multiplies by all of them in a chain: as in a
decode step, every weight comes from memory. With --baseline=REV, kernels/panel_matmul.cc and its headers at git
revision REV are built too, and the two kernels are timed in alternation in this process (same load, same memory);
--baseline_rows=8 calls the baseline on 8 rows at a time, as model.matmul called kernels that took at most 8 (up to
f96dc95).
Times are each call's best of `reps`. Check `uptime` first: other processes skew it. The last line is JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flags import parse_flags  # bench/flags.py
from gpt2_jax import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]  # K, N: qkv, proj, fc, fc proj, head
DEFAULTS = {"baseline": "", "baseline_rows": 0, "dtype": "float32", "rows": "1,8", "reps": 10, "copies": 12}


def copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    """Best bytes moved per second (read + write) copying n_bytes with numpy, as bench/sample.py measures it."""
    src = np.random.default_rng(0).random(n_bytes // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t))
    return best


def baseline_target(rev: str, dtype) -> str:
    """The panel kernel at git revision rev, built and registered as an FFI target; its name."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("panel_matmul.cc", "simd.h", "share_work.h"):
            show = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:gpt2_jax/kernels/{name}"],
                                  capture_output=True, text=True)
            if show.returncode:
                raise SystemExit(f"--baseline={rev}: {show.stderr.strip()}")
            (Path(tmp) / name).write_text(show.stdout)
        library = Path(tmp) / "baseline.so"
        subprocess.run(["c++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", "-I",
                        jax.ffi.include_dir(), str(Path(tmp) / "panel_matmul.cc"), "-o", str(library)], check=True)
        handle = ctypes.cdll.LoadLibrary(str(library))
    symbol = "PanelMatmulBf16" if dtype == jnp.bfloat16 else "PanelMatmul"
    target = f"gpt2_jax_panel_matmul_baseline_{symbol}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    return target


def chain(target: str, B: int, n_padded: int, rows_a_call: int = 0):
    """jit(x, [panels...]): x @ W for every W, each call's input depending on the one before; rows_a_call > 0:
    that many rows of x a kernel call."""
    step = rows_a_call or B

    def call(x_BK, w_PKW):
        return jnp.concatenate([jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((len(x), n_padded), jnp.float32))(
            x, w_PKW) for x in (x_BK[i:i + step] for i in range(0, B, step))])

    def run(x_BK, panels):
        firsts = []
        for w_PKW in panels:
            y_BN = call(x_BK, w_PKW)
            firsts.append(y_BN[:, :1])
            x_BK = x_BK + 0 * y_BN[:, :1]
        return jnp.concatenate(firsts, 1)
    return jax.jit(run)


def measure(flags: dict) -> dict:
    if not cpu_kernels.available():
        raise SystemExit(f"the panel kernel cannot run here: {cpu_kernels.unavailable_reason()}")
    dtype = jnp.dtype(flags["dtype"])
    targets = {"ours": cpu_kernels._TARGETS[dtype][0]}
    if flags["baseline"]:
        targets["baseline"] = baseline_target(flags["baseline"], dtype)
    rng = np.random.default_rng(0)
    load, bandwidth = os.getloadavg()[0], copy_bandwidth()
    rows = []
    for K, N in SHAPES:
        copies = 2 if N > 10_000 else flags["copies"]
        panels = [cpu_kernels.pack_panels(jnp.asarray(rng.standard_normal((K, N), np.float32) * 0.02, dtype))
                  for _ in range(copies)]
        n_padded = panels[0].shape[0] * cpu_kernels.PANEL_WIDTH
        for B in map(int, flags["rows"].split(",")):
            x = jnp.asarray(rng.standard_normal((B, K), np.float32))
            fns = {name: chain(target, B, n_padded, flags["baseline_rows"] if name == "baseline" else 0)
                   for name, target in targets.items()}
            outs = {name: np.asarray(f(x, panels)) for name, f in fns.items()}
            best = {name: float("inf") for name in fns}
            for _ in range(flags["reps"]):
                for name, f in fns.items():
                    t = time.perf_counter()
                    f(x, panels).block_until_ready()
                    best[name] = min(best[name], (time.perf_counter() - t) / copies)
            row = {"K": K, "N": N, "B": B}
            for name, s in best.items():
                row[f"{name}_us"] = round(s * 1e6, 1)
                row[f"{name}_gb_s"] = round(K * n_padded * dtype.itemsize / s / 1e9, 2)  # weights read
                row[f"{name}_gflop_s"] = round(2 * B * K * N / s / 1e9, 1)
            if "baseline" in outs:
                row["same_result"] = bool(np.allclose(outs["ours"], outs["baseline"], rtol=1e-5, atol=1e-5))
            rows.append(row)
    return {"dtype": flags["dtype"], "baseline": flags["baseline"], "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
            "load_average_before": round(load, 2), "load_average_after": round(os.getloadavg()[0], 2),
            "threads": os.cpu_count(), "rows": rows}


def print_table(r: dict) -> None:
    names = ["ours"] + (["baseline"] if r["baseline"] else [])
    print(f"panel matmul, {r['dtype']} weights, {r['threads']} threads, load {r['load_average_before']} -> "
          f"{r['load_average_after']}, copy bandwidth {r['copy_bandwidth_gb_s']} GB/s (read + write)"
          + (f"; baseline: {r['baseline']}" if r["baseline"] else ""))
    print(f"{'K x N':>11} {'B':>2}" + "".join(f"{n + ' us':>14}{'GB/s':>7}{'GFLOP/s':>9}" for n in names))
    for row in r["rows"]:
        print(f"{row['K']:>5}x{row['N']:<5} {row['B']:>2}" + "".join(
            f"{row[n + '_us']:>14.1f}{row[n + '_gb_s']:>7.1f}{row[n + '_gflop_s']:>9.1f}" for n in names))


if __name__ == "__main__":
    flags = parse_flags(sys.argv[1:], DEFAULTS, __doc__)
    if flags["dtype"] not in ("float32", "bfloat16"):
        raise SystemExit(f"--dtype takes float32 or bfloat16; got {flags['dtype']!r}")
    result = measure(flags)
    print_table(result)
    print(json.dumps(result))
