"""Training throughput on this machine: our jitted step against a PyTorch step, and against the matmul peak.

    python bench/train.py [--model=gpt2] [--batch_size=4] [--block_size=256] [--steps=3] [--rounds=2]
                          [--dtype=float32] [--hugetlb=none|ours|both] [--attention=auto|xla|cpu_kernel]

What it measures, in one run:
  * the machine's fp32 matmul peak: the best of 2048^3 jnp.dot and torch.mm, at the start and at the end;
  * our train_step (make_train_step, gradient_accumulation_steps=1, jitted with the state donated; its attention
    is ModelConfig.attention, "auto": the CPU attention kernel where it builds);
  * transformers' GPT2LMHeadModel (its default attention) + F.cross_entropy + clip_grad_norm_ +
    torch.optim.AdamW, with torch.set_num_threads(os.cpu_count()); the same batch and hyperparameters.
Each side runs in its own worker process (a step right after the other framework's step in the same process
ran up to 50% slower: memory the other side freed is faulted back in), and the sides alternate for
`rounds` rounds of `steps` timed steps (after one warm-up step), so load from elsewhere hits both.
Speeds use each side's best step; medians are printed too.
FLOPs per token follow nanoGPT's estimate_mfu: 6 * N + 12 * L * C * T (N = parameters without wpe; the
second term is attention's QK^T and AV, forward and backward, as if not causal). The last line is JSON.

Each side runs as its users run it: ours as `python train.py` does, which re-executes itself with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where glibc and the kernel allow it (gpt2_jax/huge_pages.py), torch in the
environment this script was started in (--hugetlb=ours, the default). --hugetlb=none runs both sides plain, and
both gives both the setting. With it, glibc's malloc asks for transparent huge pages, so the large buffers XLA
allocates afresh every step fault in per 2 MB instead of per 4 KB (docs/design.md, "Huge pages").
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from flags import parse_flags  # bench/flags.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2_jax.huge_pages import TUNABLE, huge_pages_env  # noqa: E402 (after the path)

DEFAULTS = {"model": "gpt2", "batch_size": 4, "block_size": 256, "steps": 3, "rounds": 2, "dtype": "float32",
            "hugetlb": "ours", "attention": "auto", "worker": ""}
HUGETLB = {"ours": ("ours",), "both": ("ours", "torch"), "none": ()}


def batch(cfg, flags) -> np.ndarray:
    """The shared batch: B rows of T + 1 random token ids (x = [:, :-1], y = [:, 1:])."""
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.vocab_size, (flags["batch_size"], flags["block_size"] + 1)).astype(np.int32)


def flops_per_token(cfg, T: int) -> float:
    """nanoGPT's estimate: 6 * (parameters without wpe) + 12 * L * C * T."""
    n_params = (12 * cfg.n_layer * cfg.n_embd**2 + 13 * cfg.n_layer * cfg.n_embd  # blocks incl. biases, LNs
                + cfg.vocab_size * cfg.n_embd + 2 * cfg.n_embd)  # tied wte/lm_head, ln_f
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_embd * T


def time_steps(run, n: int) -> list[float]:
    run()  # warm-up: first-touch allocations, lazy initialisation
    times = []
    for _ in range(n):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return times


def ours_worker(cfg, flags) -> dict:
    """Our jitted, donated train_step: compile seconds and step seconds."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.config import TrainConfig
    from gpt2_jax.checks import causal_attention_impl
    from gpt2_jax.training import init_train_state, make_train_step

    tokens = batch(cfg, flags)
    train_cfg = TrainConfig(batch_size=flags["batch_size"], learning_rate=1e-4, warmup_iters=0)
    state = init_train_state(cfg, train_cfg, jax.random.PRNGKey(0))
    x, y, rng = jnp.asarray(tokens[:, :-1])[None], jnp.asarray(tokens[:, 1:])[None], jax.random.PRNGKey(1)
    t = time.perf_counter()
    step = jax.jit(make_train_step(cfg, train_cfg), donate_argnums=0).lower(state, x, y, rng).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], x, y, rng)
        float(metrics["loss"])

    temp_bytes = step.memory_analysis().temp_size_in_bytes  # XLA's scratch for one step (activations, grads)
    return {"compile_s": compile_s, "temp_mb": temp_bytes / 1e6, "step_s": time_steps(run, flags["steps"]),
            "ours_attention": causal_attention_impl(cfg, training=True)}


def torch_worker(cfg, flags) -> dict:
    """transformers' GPT-2 + F.cross_entropy + clip_grad_norm_ + torch.optim.AdamW (nanoGPT's decay groups)."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    tokens = batch(cfg, flags)
    x = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    y = torch.from_numpy(tokens[:, 1:].astype(np.int64)).flatten()

    def run():
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    return {"step_s": time_steps(run, flags["steps"]), "attention": model.config._attn_implementation}


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
    """fp32 FLOP/s of an n^3 matmul in XLA and in torch (the best of reps runs each)."""
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(os.cpu_count())
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    dot = jax.jit(jnp.dot)
    best = {"jax": float("inf"), "torch": float("inf")}
    for name, fn in (("jax", lambda: dot(ja, ja).block_until_ready()), ("torch", lambda: torch.mm(ta, ta))):
        fn()
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: 2 * n**3 / s for name, s in best.items()}


def worker_env(side: str, flags: dict) -> dict:
    """The environment of side's worker: huge pages where --hugetlb names the side and the machine allows them."""
    env = dict(os.environ)
    if side in HUGETLB[flags["hugetlb"]]:
        env = huge_pages_env(env) or env  # None: set already, or this machine cannot
    return env


def run_worker(side: str, flags: dict) -> dict:
    args = [f"--{k}={v}" for k, v in flags.items() if k != "worker"] + [f"--worker={side}"]
    out = subprocess.run([sys.executable, __file__, *args], env=worker_env(side, flags), capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"the {side} worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(flags: dict) -> dict:
    from gpt2_jax.config import ModelConfig

    if flags["hugetlb"] not in HUGETLB:
        raise SystemExit(f"--hugetlb must be one of {sorted(HUGETLB)}; got {flags['hugetlb']!r}")
    cfg = ModelConfig.from_preset(flags["model"], dtype=flags["dtype"], attention=flags["attention"])
    load_before = os.getloadavg()[0]
    peaks = [matmul_peak()]
    times = {"ours": [], "torch": []}
    compile_s, attention, ours_attention, temp_mb = [], "", "", 0.0
    for _ in range(flags["rounds"]):
        for side in ("ours", "torch"):
            result = run_worker(side, flags)
            times[side] += result["step_s"]
            compile_s += [result["compile_s"]] if side == "ours" else []
            attention = result.get("attention", attention)
            ours_attention = result.get("ours_attention", ours_attention)
            temp_mb = result.get("temp_mb", temp_mb)
    peaks.append(matmul_peak())
    peak = max(max(p.values()) for p in peaks)
    tokens = flags["batch_size"] * flags["block_size"]
    fpt = flops_per_token(cfg, flags["block_size"])
    import jax
    import torch

    r = {
        "model": flags["model"], "batch_size": flags["batch_size"], "block_size": flags["block_size"],
        "dtype": flags["dtype"], "threads": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
        "ours_attention": ours_attention, "torch_attention": attention, "hugetlb": flags["hugetlb"],
        "huge_pages_for": [side for side in ("ours", "torch")  # what the workers got, not only what was asked
                           if f"{TUNABLE}=1" in worker_env(side, flags).get("GLIBC_TUNABLES", "").split(":")],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "jax_matmul_gflops": round(max(p["jax"] for p in peaks) / 1e9, 1),
        "torch_matmul_gflops": round(max(p["torch"] for p in peaks) / 1e9, 1),
        "flops_per_token": fpt, "compile_s": round(min(compile_s), 2), "ours_step_temp_mb": round(temp_mb, 1),
    }
    for side in ("ours", "torch"):
        best, median = min(times[side]), statistics.median(times[side])
        r[f"{side}_step_s"] = [round(t, 3) for t in times[side]]
        r[f"{side}_tokens_per_s"] = round(tokens / best, 2)
        r[f"{side}_tokens_per_s_median"] = round(tokens / median, 2)
        r[f"{side}_gflops"] = round(tokens / best * fpt / 1e9, 1)
        r[f"{side}_matmul_peak_fraction"] = round(tokens / best * fpt / peak, 3)
    r["ratio"] = round(r["ours_tokens_per_s"] / r["torch_tokens_per_s"], 3)
    r["ratio_median"] = round(r["ours_tokens_per_s_median"] / r["torch_tokens_per_s_median"], 3)
    r["matmul_peak_fraction"] = r["ours_matmul_peak_fraction"]
    return r


def print_table(r: dict) -> None:
    huge = ", ".join(r["huge_pages_for"]) or "neither side"
    print(f"{r['model']} B={r['batch_size']} T={r['block_size']} {r['dtype']}, {r['threads']} threads, "
          f"load {r['load_avg_1m_before']} -> {r['load_avg_1m_after']}, jax {r['jax']}, torch {r['torch']} "
          f"({r['torch_attention']} attention; ours: {r['ours_attention']}), huge pages for: {huge}")
    print(f"matmul peak {r['matmul_peak_gflops']} GFLOP/s (XLA {r['jax_matmul_gflops']}, "
          f"torch {r['torch_matmul_gflops']}); {r['flops_per_token'] / 1e6:.1f} MFLOP per token")
    print(f"{'':6s} {'tokens/s best':>14s} {'median':>8s} {'GFLOP/s':>8s} {'of peak':>8s}  step seconds")
    for side in ("ours", "torch"):
        print(f"{side:6s} {r[side + '_tokens_per_s']:14.1f} {r[side + '_tokens_per_s_median']:8.1f} "
              f"{r[side + '_gflops']:8.1f} {r[side + '_matmul_peak_fraction']:8.1%}  {r[side + '_step_s']}")
    print(f"ratio {r['ratio']:.3f} (median {r['ratio_median']:.3f}); compile {r['compile_s']:.1f} s; "
          f"our step's XLA temp memory {r['ours_step_temp_mb']:.0f} MB")


if __name__ == "__main__":
    flags = parse_flags(sys.argv[1:], DEFAULTS)
    if flags["worker"]:
        from gpt2_jax.config import ModelConfig

        cfg = ModelConfig.from_preset(flags["model"], dtype=flags["dtype"], attention=flags["attention"])
        if flags["worker"] not in ("ours", "torch"):
            raise SystemExit(f"--worker must be ours or torch; got {flags['worker']!r}")
        worker = ours_worker if flags["worker"] == "ours" else torch_worker
        print(json.dumps(worker(cfg, flags)))
    else:
        result = main(flags)
        print_table(result)
        print(json.dumps(result))
