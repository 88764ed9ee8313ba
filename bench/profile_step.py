"""Where one train step's device time goes: a jax.profiler trace of a few steps, summed by kernel and by kind.

    python bench/profile_step.py [--model=gpt2] [--batch_size=16] [--block_size=1024] [--dtype=bfloat16]
                                 [--pad_vocab_to=128] [--variant=cudnn:12] [--steps=5] [--top=25]
                                 [--trace_dir=/tmp/gpt2_jax_profile]

The step is bench/train_gpu.py's (make_train_step, fp32 params and AdamW state, `dtype` compute, the state
donated; --variant is ATTENTION:SCAN_UNROLL). After 3 warm-up steps, `steps` steps run under
jax.profiler.trace; the Perfetto trace is read back and each timeline of the device is summed on its own:
GPU kernel streams ("Stream #..."), and XLA's per-HLO-op timeline ("XLA Ops") where the profiler derives one. On a
CPU (no device timelines) the XLA:CPU thunks of the host threads are summed instead, which overlap, so there the
shares are of busy time, not of the step. Kinds: matmul (cuBLAS/CUTLASS GEMMs, XLA:CPU dots), attention (cuDNN
and flash kernels, our CPU kernel), fusion (XLA's elementwise and reduction fusions), copy (copies, transposes,
memsets), collective, other. The trace directory is kept for Perfetto (ui.perfetto.dev) or TensorBoard. The last
line is JSON.
"""

from __future__ import annotations

import collections
import gzip
import json
import sys
import time
from pathlib import Path

import flags as flags_module  # bench/flags.py
from train_gpu import compiled_step, step_inputs

DEFAULTS = {"model": "gpt2", "batch_size": 16, "block_size": 1024, "dtype": "bfloat16", "pad_vocab_to": 128,
            "variant": "cudnn:12", "steps": 5, "top": 25, "trace_dir": "/tmp/gpt2_jax_profile"}
KINDS = [  # (kind, lowercase name fragments), first match wins
    ("attention", ("cudnn", "flash", "fmha", "sdpa", "causal_attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "dot", "ynn", "matmul")),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "all_reduce", "collective")),
    ("copy", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice", "dynamic_update_slice")),
    ("fusion", ("fusion", "reduce", "elementwise", "convert", "broadcast")),
]
HOST_NOISE = ("$", "Thunk", "np.", "Slinky", "PjRt", "Python", "jit_", "pjit", "ExecuteHelper")


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS if any(p in low for p in parts)), "other")


def timelines(events: list[dict]) -> dict[str, list[dict]]:
    """Complete ('X') events grouped by timeline: 'kernels' (GPU streams), 'xla_ops', or 'host' (XLA:CPU)."""
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
              if e.get("ph") == "M" and e["name"] == "thread_name"}
    groups = collections.defaultdict(list)
    for e in events:
        if e.get("ph") != "X":
            continue
        where, line = process.get(e["pid"], ""), thread.get((e["pid"], e.get("tid")), "")
        if where.startswith("/device:"):
            if line.startswith("Stream"):
                groups["kernels"].append(e)
            elif line == "XLA Ops":
                groups["xla_ops"].append(e)
        elif where.startswith("/host:") and not e["name"].startswith(HOST_NOISE) and "wait" not in e["name"]:
            groups["host"].append(e)
    if "kernels" in groups or "xla_ops" in groups:
        groups.pop("host", None)
    return dict(groups)


def summarize(events: list[dict], steps: int, top: int) -> dict:
    """Per timeline: ms a step by kind, and the `top` names by ms a step (with calls a step)."""
    out = {}
    for line, evs in timelines(events).items():
        by_name, calls = collections.Counter(), collections.Counter()
        for e in evs:
            by_name[e["name"]] += e["dur"] / 1e3 / steps
            calls[e["name"]] += 1
        by_kind = collections.Counter()
        for name, ms in by_name.items():
            by_kind[kind_of(name)] += ms
        span_ms = (max(e["ts"] + e["dur"] for e in evs) - min(e["ts"] for e in evs)) / 1e3 / steps
        out[line] = {"busy_ms_per_step": sum(by_name.values()), "span_ms_per_step": span_ms,
                     "kinds_ms_per_step": dict(by_kind.most_common()),
                     "top": [{"name": n, "ms_per_step": ms, "calls_per_step": calls[n] / steps, "kind": kind_of(n)}
                             for n, ms in by_name.most_common(top)]}
    return out


def read_trace(trace_dir: Path) -> list[dict]:
    path = max(trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    data = json.load(gzip.open(path))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile(flags: dict) -> dict:
    import jax

    attention, _, unroll = flags["variant"].partition(":")
    cfg, state, x, y, rng = step_inputs(flags, attention, int(unroll or 1))
    step = compiled_step(cfg, flags, state, x, y, rng)
    for _ in range(3):
        state, metrics = step(state, x, y, rng)
    float(metrics["loss"])
    trace_dir = Path(flags["trace_dir"])
    t = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for _ in range(flags["steps"]):
            state, metrics = step(state, x, y, rng)
        float(metrics["loss"])
    wall_ms = (time.perf_counter() - t) * 1e3 / flags["steps"]
    return {"device": jax.devices()[0].device_kind, "variant": flags["variant"], "wall_ms_per_step": wall_ms,
            "trace_dir": str(trace_dir),
            "timelines": summarize(read_trace(trace_dir), flags["steps"], flags["top"])}


def print_table(r: dict) -> None:
    print(f"{r['variant']} on {r['device']}: {r['wall_ms_per_step']:.1f} ms a step under the profiler "
          f"(trace in {r['trace_dir']})")
    if not r["timelines"]:
        print("no device or XLA:CPU events in the trace")
    for line, s in r["timelines"].items():
        print(f"\n{line}: busy {s['busy_ms_per_step']:.1f} ms a step over a span of {s['span_ms_per_step']:.1f} ms")
        for kind, ms in s["kinds_ms_per_step"].items():
            print(f"  {kind:10s} {ms:8.2f} ms  {ms / s['busy_ms_per_step']:6.1%}")
        print(f"  {'ms/step':>8s} {'calls':>6s}  kind        name")
        for t in s["top"]:
            print(f"  {t['ms_per_step']:8.2f} {t['calls_per_step']:6.1f}  {t['kind']:10s}  {t['name'][:110]}")


if __name__ == "__main__":
    result = profile(flags_module.parse_flags(sys.argv[1:], DEFAULTS))
    print_table(result)
    print(json.dumps(result))
