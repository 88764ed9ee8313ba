"""Training throughput on this machine: our jitted step against a PyTorch step, and against the matmul peak.

    python bench/train.py [--model=gpt2] [--batch_size=4] [--block_size=256] [--steps=4] [--dtype=float32]

One process measures everything, interleaving our steps with PyTorch's so that both see the same load:
  * the machine's fp32 matmul peak: the best of a 2048^3 jnp.dot and torch.mm;
  * our train_step (make_train_step, gradient_accumulation_steps=1, jitted with the state donated);
  * transformers' GPT2LMHeadModel (its default attention) + F.cross_entropy + clip_grad_norm_ +
    torch.optim.AdamW, with torch.set_num_threads(os.cpu_count()); the same batch.
FLOPs per token follow nanoGPT's estimate_mfu: 6 * N + 12 * L * C * T (N = parameters without wpe; the
second term is attention's QK^T and AV, forward and backward). The last line printed is a JSON object.
"""

from __future__ import annotations

import os
import sys

# Must happen before glibc's malloc initialises: big buffers (activations, gradients, logits) are fresh
# allocations every step, and with transparent huge pages on "madvise" (the common default) only memory that
# malloc madvises gets 2 MB pages. Without it each step pays a page fault per 4 KB of every new buffer.
if "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), "glibc.malloc.hugetlb=1"]))
    os.environ["GLIBC_TUNABLES"] = tunables
    os.execv(sys.executable, [sys.executable] + sys.argv)

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt2_jax.config import ModelConfig, TrainConfig  # noqa: E402
from gpt2_jax.training import init_train_state, make_train_step  # noqa: E402


def best_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(torch, n: int = 2048, reps: int = 5) -> dict:
    """fp32 FLOP/s of an n^3 matmul in XLA and in torch (the best of reps runs each)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    jax_s = best_seconds(lambda: dot(a, a).block_until_ready(), reps)
    t = torch.from_numpy(np.asarray(a))
    torch.mm(t, t)
    torch_s = best_seconds(lambda: torch.mm(t, t), reps)
    flops = 2 * n**3
    return {"jax_flops": flops / jax_s, "torch_flops": flops / torch_s}


def flops_per_token(cfg: ModelConfig, T: int) -> float:
    n_params = 12 * cfg.n_layer * cfg.n_embd**2 + 13 * cfg.n_layer * cfg.n_embd + cfg.vocab_size * cfg.n_embd \
        + 2 * cfg.n_embd  # blocks (weights + biases + LayerNorms), tied wte/lm_head, ln_f
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * T


def our_step(cfg: ModelConfig, batch_x: np.ndarray):
    """(compile seconds, a function running one step) for our jitted, donated train_step."""
    train_cfg = TrainConfig(batch_size=batch_x.shape[0], learning_rate=1e-4, warmup_iters=0)
    state = init_train_state(cfg, train_cfg, jax.random.PRNGKey(0))
    x = jnp.asarray(batch_x[:, :-1])[None]
    y = jnp.asarray(batch_x[:, 1:])[None]
    rng = jax.random.PRNGKey(1)
    t = time.perf_counter()
    step = jax.jit(make_train_step(cfg, train_cfg), donate_argnums=0).lower(state, x, y, rng).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], x, y, rng)
        return float(metrics["loss"])

    return compile_s, run


def torch_step(torch, cfg: ModelConfig, batch_x: np.ndarray):
    """One training step of transformers' GPT-2 with torch.optim.AdamW, the same hyperparameters as ours."""
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    x = torch.from_numpy(batch_x[:, :-1].astype(np.int64))
    y = torch.from_numpy(batch_x[:, 1:].astype(np.int64)).flatten()

    def run():
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def main(argv: list[str]) -> dict:
    bench_keys = {"model": "gpt2", "batch_size": 4, "block_size": 256, "steps": 4, "dtype": "float32"}
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in bench_keys:
            raise SystemExit(f"unknown flag {arg!r}; known: {', '.join('--' + k for k in bench_keys)}")
        bench_keys[key] = type(bench_keys[key])(value)
    import torch

    threads = os.cpu_count()
    torch.set_num_threads(threads)
    B, T, steps = bench_keys["batch_size"], bench_keys["block_size"], bench_keys["steps"]
    cfg = ModelConfig.from_preset(bench_keys["model"], dtype=bench_keys["dtype"])
    batch_x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T + 1)).astype(np.int32)
    load_before = os.getloadavg()[0]

    peak = matmul_peak(torch)
    peak_flops = max(peak.values())
    compile_s, ours = our_step(cfg, batch_x)
    theirs = torch_step(torch, cfg, batch_x)
    for run in (ours, theirs):  # warm-up: first-touch allocations, torch's lazy init
        run()
    times = {"ours": [], "torch": []}
    for _ in range(steps):  # interleaved so a burst of load elsewhere hits both sides
        for name, run in (("ours", ours), ("torch", theirs)):
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)

    tokens = B * T
    fpt = flops_per_token(cfg, T)
    result = {
        "model": bench_keys["model"], "batch_size": B, "block_size": T, "dtype": bench_keys["dtype"],
        "threads": threads, "jax": jax.__version__, "torch": torch.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "matmul_peak_gflops": round(peak_flops / 1e9, 1),
        "jax_matmul_gflops": round(peak["jax_flops"] / 1e9, 1),
        "torch_matmul_gflops": round(peak["torch_flops"] / 1e9, 1),
        "flops_per_token": fpt, "compile_s": round(compile_s, 2),
    }
    for name in ("ours", "torch"):
        best, median = min(times[name]), statistics.median(times[name])
        result[f"{name}_step_s"] = [round(t, 3) for t in times[name]]
        result[f"{name}_tokens_per_s"] = round(tokens / best, 2)
        result[f"{name}_tokens_per_s_median"] = round(tokens / median, 2)
        result[f"{name}_gflops"] = round(tokens / best * fpt / 1e9, 1)
    result["ratio"] = round(result["ours_tokens_per_s"] / result["torch_tokens_per_s"], 3)
    result["ratio_median"] = round(result["ours_tokens_per_s_median"] / result["torch_tokens_per_s_median"], 3)
    result["matmul_peak_fraction"] = round(result["ours_gflops"] * 1e9 / peak_flops, 3)
    result["torch_matmul_peak_fraction"] = round(result["torch_gflops"] * 1e9 / peak_flops, 3)
    return result


def print_table(r: dict) -> None:
    print(f"{r['model']} B={r['batch_size']} T={r['block_size']} {r['dtype']}, {r['threads']} threads, "
          f"load {r['load_avg_1m_before']} -> {r['load_avg_1m_after']}, jax {r['jax']}, torch {r['torch']}")
    print(f"matmul peak {r['matmul_peak_gflops']} GFLOP/s (XLA {r['jax_matmul_gflops']}, "
          f"torch {r['torch_matmul_gflops']}); {r['flops_per_token'] / 1e6:.1f} MFLOP per token")
    print(f"{'':8s} {'tokens/s best':>14s} {'median':>8s} {'GFLOP/s':>8s} {'of peak':>8s}  step seconds")
    for name in ("ours", "torch"):
        frac = r["matmul_peak_fraction" if name == "ours" else "torch_matmul_peak_fraction"]
        print(f"{name:8s} {r[name + '_tokens_per_s']:14.1f} {r[name + '_tokens_per_s_median']:8.1f} "
              f"{r[name + '_gflops']:8.1f} {frac:8.1%}  {r[name + '_step_s']}")
    print(f"ratio {r['ratio']:.3f} (median {r['ratio_median']:.3f}); compile {r['compile_s']:.1f} s")


if __name__ == "__main__":
    out = main(sys.argv[1:])
    print_table(out)
    print(json.dumps(out))
