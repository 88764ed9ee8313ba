"""Training FLOPs per token and the peak FLOP/s of a device: the two halves of MFU (train.py and bench/ use them)."""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp

from gpt2_jax.config import ModelConfig
from gpt2_jax.model import count_params

# Dense peak TFLOP/s per chip: (16-bit; float32 at matmul_precision "default"/"high": TF32 on NVIDIA since Ampere,
# one bf16 pass on TPU; float32 at "highest": CUDA cores on NVIDIA, six bf16 passes on TPU). Matched against
# jax's device_kind, first match wins.
PEAK_TFLOPS = [
    ("gb200", (2500.0, 1250.0, 80.0)), ("b200", (2250.0, 1100.0, 75.0)), ("h100 nvl", (835.0, 418.0, 60.0)),
    ("h100 pcie", (756.0, 378.0, 51.0)), ("h100", (989.0, 494.0, 67.0)), ("h200", (989.0, 494.0, 67.0)),
    ("mi325x", (1307.4, 653.7, 163.4)), ("mi300x", (1307.4, 653.7, 163.4)), ("mi250x", (383.0, 95.7, 95.7)),
    ("a100", (312.0, 156.0, 19.5)), ("l40s", (362.0, 183.0, 91.6)), ("l40", (181.0, 90.5, 90.5)),
    ("l4", (121.0, 60.0, 30.3)), ("a10", (125.0, 62.5, 31.2)), ("v100", (125.0, 15.7, 15.7)),
    ("tpu v6", (918.0, 918.0, 153.0)), ("tpu v5 lite", (197.0, 197.0, 32.8)), ("tpu v5e", (197.0, 197.0, 32.8)),
    ("tpu v5", (459.0, 459.0, 76.5)), ("tpu v4", (275.0, 275.0, 45.8)), ("tpu v3", (123.0, 123.0, 20.5)),
]


def peak_flops(model_cfg: ModelConfig) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): the table for known chips, else a measured matmul."""
    device = jax.local_devices()[0]
    kind = device.device_kind.lower()
    dtype = model_cfg.dtype
    for name, (half, fast32, full32) in PEAK_TFLOPS:
        if name in kind:
            peak = half if dtype != "float32" else full32 if model_cfg.matmul_precision == "highest" else fast32
            return peak * 1e12, f"{device.device_kind} datasheet"
    n = 1024
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {n}x{n} {dtype} matmul on {device.device_kind}"


def flops_per_token(model_cfg: ModelConfig, params) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention (nanoGPT's estimate)."""
    n = count_params(params) - params["wpe"].size
    return 6 * n + 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size
