"""Training throughput and MFU on one GPU: our jitted train step at T=1024, and a PyTorch step on the same card.

    python bench/train_gpu.py [--model=gpt2] [--batch_size=16] [--block_size=1024] [--dtype=bfloat16]
                              [--pad_vocab_to=128] [--steps=20] [--variants=cudnn:12,cudnn:1,xla:1] [--torch=eager|none]

What it measures, in one run:
  * the card's bf16 matmul rate: the best of ten 8192^3 jnp.dot (random data), beside the datasheet peak
    that train.py's MFU uses (gpt2_jax.flops.PEAK_TFLOPS: 989 TFLOP/s for an H100 SXM);
  * for each variant ATTENTION:SCAN_UNROLL (ModelConfig.attention and .scan_unroll), our train_step
    (make_train_step, fp32 params and AdamW state, `dtype` compute, jitted with the state donated): compile
    seconds, then `steps` steps dispatched back to back after 3 warm-up steps, timed to the last loss;
  * numerics of the variant's attention on 2 rows of the batch: loss and gradients against float32 with
    attention="xla" and matmul precision "highest" (relative L2 error of all gradients), and whether float32
    at the default matmul precision differs from "highest" (XLA's TF32 on NVIDIA GPUs);
  * with --torch=eager: transformers' GPT2LMHeadModel (sdpa attention) under bf16 autocast + F.cross_entropy +
    clip_grad_norm_ + fused torch.optim.AdamW, the same batch shape (its vocabulary is not padded).
Each side runs in its own worker process. MFU = tokens/s * FLOPs per token / datasheet peak, FLOPs per token
from gpt2_jax/flops.py (nanoGPT's 6 N + 12 L C T). The last line is JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import flags as flags_module  # bench/flags.py

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULTS = {"model": "gpt2", "batch_size": 16, "block_size": 1024, "dtype": "bfloat16", "pad_vocab_to": 128,
            "steps": 20, "variants": "cudnn:12,cudnn:1,xla:1", "torch": "eager", "worker": ""}


def parse_flags(argv: list[str]) -> dict:
    flags = flags_module.parse_flags(argv, DEFAULTS)
    if flags["torch"] not in ("eager", "none"):
        raise SystemExit(f"--torch must be eager or none; got {flags['torch']!r}")
    return flags


def batch(vocab_size: int, flags: dict) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab_size, (flags["batch_size"], flags["block_size"] + 1)).astype(np.int32)


def model_config(flags: dict, **overrides):
    from gpt2_jax.config import ModelConfig

    return ModelConfig.from_preset(flags["model"], block_size=flags["block_size"], dtype=flags["dtype"],
                                   pad_vocab_to=flags["pad_vocab_to"], **overrides)


def numerics(cfg, params, x, y) -> dict:
    """Loss and gradient errors of cfg's attention and dtype against float32, attention="xla", matmul precision
    "highest"; and those of float32 at matmul precision "default" (TF32 on NVIDIA GPUs)."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.config import replace
    from gpt2_jax.model import GPT2
    from gpt2_jax.training import cross_entropy

    def loss_and_grads(c):
        def loss(p):
            total, count = cross_entropy(GPT2(c).apply({"params": p}, x), y)
            return total / count

        return jax.jit(jax.value_and_grad(loss))(params)

    def rel(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
        num = sum(float(jnp.sum((u.astype(jnp.float32) - v) ** 2)) for u, v in pairs)
        return (num / sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(b))) ** 0.5

    f32 = replace(cfg, dtype="float32", attention="xla", matmul_precision="highest")
    ref_loss, ref_grads = loss_and_grads(f32)
    loss, grads = loss_and_grads(cfg)
    default_loss, default_grads = loss_and_grads(replace(f32, matmul_precision="default"))
    return {"loss_f32": float(ref_loss), "loss": float(loss), "grads_rel_err": rel(grads, ref_grads),
            "f32_default_precision_grads_rel_err": rel(default_grads, ref_grads),
            "f32_default_precision_loss_diff": abs(float(default_loss) - float(ref_loss))}


def step_inputs(flags: dict, attention: str, unroll: int):
    """(model config, step-0 state, x, y, rng) of the benchmarked step: fp32 params and AdamW state."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.training import init_train_state

    cfg = model_config(flags, attention=attention, scan_unroll=unroll)
    state = init_train_state(cfg, train_config(flags), jax.random.PRNGKey(0))
    tokens = batch(cfg.vocab_size, flags)
    return cfg, state, jnp.asarray(tokens[:, :-1])[None], jnp.asarray(tokens[:, 1:])[None], jax.random.PRNGKey(1)


def train_config(flags: dict):
    from gpt2_jax.config import TrainConfig

    return TrainConfig(batch_size=flags["batch_size"], learning_rate=1e-4, warmup_iters=0)


def compiled_step(cfg, flags: dict, state, x, y, rng):
    """make_train_step jitted with the state donated, compiled for these inputs."""
    import jax

    from gpt2_jax.training import make_train_step

    return jax.jit(make_train_step(cfg, train_config(flags)), donate_argnums=0).lower(state, x, y, rng).compile()


def ours_worker(flags: dict, attention: str, unroll: int, check: bool) -> dict:
    from gpt2_jax.checks import causal_attention_impl
    from gpt2_jax.flops import flops_per_token

    cfg, state, x, y, rng = step_inputs(flags, attention, unroll)
    result = {"attention_ran": causal_attention_impl(cfg, training=True), "fpt": flops_per_token(cfg, state.params)}
    if check:
        result.update(numerics(cfg, state.params, x[0, :2], y[0, :2]))
    t = time.perf_counter()
    step = compiled_step(cfg, flags, state, x, y, rng)
    result["compile_s"] = time.perf_counter() - t
    for _ in range(3):
        state, metrics = step(state, x, y, rng)
    float(metrics["loss"])
    t = time.perf_counter()
    for _ in range(flags["steps"]):
        state, metrics = step(state, x, y, rng)
    result["final_loss"] = float(metrics["loss"])
    result["step_s"] = (time.perf_counter() - t) / flags["steps"]
    result["temp_gb"] = step.memory_analysis().temp_size_in_bytes / 1e9
    return result


def torch_worker(flags: dict) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = model_config(flags)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf_cfg).cuda().train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    tokens = torch.from_numpy(batch(cfg.vocab_size, flags).astype(np.int64)).cuda()
    x, y = tokens[:, :-1], tokens[:, 1:].flatten()

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(flags["steps"]):
        loss = run()
    loss.item()
    return {"step_s": (time.perf_counter() - t) / flags["steps"], "attention": model.config._attn_implementation}


def matmul_rate(n: int = 8192) -> tuple[float, str]:
    """(best bf16 FLOP/s of ten n^3 jnp.dot on random data, the device's kind)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        dot(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, jax.devices()[0].device_kind


def run_worker(flags: dict, worker: str) -> dict:
    args = [f"--{k}={v}" for k, v in flags.items() if k != "worker"] + [f"--worker={worker}"]
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(out.stderr)  # the worker's own log (compiler warnings, a failure's traceback) stays visible
    if out.returncode:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        return {"error": f"exit {out.returncode}: " + " | ".join(lines[-3:])}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(flags: dict) -> dict:
    from gpt2_jax.flops import PEAK_TFLOPS

    matmul = run_worker(flags, "matmul")
    kind = matmul.get("device_kind", "")
    peak = next((half * 1e12 for name, (half, *_) in PEAK_TFLOPS if name in kind.lower()), None)
    tokens = flags["batch_size"] * flags["block_size"]
    r = {k: flags[k] for k in ("model", "batch_size", "block_size", "dtype", "pad_vocab_to", "steps")}
    r.update(device=kind, datasheet_tflops=peak and peak / 1e12, matmul_tflops=matmul.get("flops", 0) / 1e12,
             variants={})
    checked = set()
    for variant in flags["variants"].split(","):
        attention = variant.partition(":")[0]
        res = run_worker(flags, f"ours:{variant}:{'' if attention in checked else 'check'}")
        checked.add(attention)
        if "step_s" in res:
            res["tokens_per_s"] = tokens / res["step_s"]
            res["mfu"] = res["tokens_per_s"] * res["fpt"] / peak if peak else None
            res["matmul_fraction"] = res["tokens_per_s"] * res["fpt"] / matmul["flops"] if matmul.get("flops") else None
        r["variants"][variant] = res
    if flags["torch"] != "none":
        res = run_worker(flags, "torch")
        if "step_s" in res:
            res["tokens_per_s"] = tokens / res["step_s"]
        r["torch"] = res
    done = [v for v in r["variants"].values() if "mfu" in v and v["mfu"] is not None]
    best = max(done, key=lambda v: v["tokens_per_s"], default={})
    r["ours_tokens_per_s"] = best.get("tokens_per_s")
    r["mfu"] = best.get("mfu")
    r["torch_tokens_per_s"] = r.get("torch", {}).get("tokens_per_s")
    both = r["ours_tokens_per_s"] and r["torch_tokens_per_s"]
    r["ratio"] = r["ours_tokens_per_s"] / r["torch_tokens_per_s"] if both else None
    return r


def print_table(r: dict) -> None:
    print(f"{r['model']} B={r['batch_size']} T={r['block_size']} {r['dtype']} (vocab padded to a multiple of "
          f"{r['pad_vocab_to']}) on {r['device']}: datasheet {r['datasheet_tflops']} TFLOP/s, "
          f"measured bf16 8192^3 matmul {r['matmul_tflops']:.0f} TFLOP/s")
    print(f"{'variant':12s} {'tokens/s':>10s} {'ms/step':>8s} {'MFU':>6s} {'of matmul':>9s} {'compile s':>9s} "
          f"{'grad err':>9s}  attention ran")
    for name, v in r["variants"].items():
        if "step_s" not in v:
            print(f"{name:12s} failed: {v.get('error')}")
            continue
        print(f"{name:12s} {v['tokens_per_s']:10.0f} {v['step_s'] * 1e3:8.1f} {v['mfu'] or 0:6.1%} "
              f"{v['matmul_fraction'] or 0:9.1%} {v['compile_s']:9.1f} {v.get('grads_rel_err', float('nan')):9.2e}  "
              f"{v['attention_ran']}")
    t = r.get("torch")
    if t:
        print(f"{'torch':12s} {t.get('tokens_per_s') or 0:10.0f} {t.get('step_s', 0) * 1e3:8.1f}  "
              f"({t.get('attention', t.get('error'))})")
    if r["ratio"]:
        print(f"ours / torch: {r['ratio']:.2f}")
    for name, v in r["variants"].items():
        if "f32_default_precision_grads_rel_err" in v:
            print(f"{name}: loss {v['loss']:.5f} vs float32 {v['loss_f32']:.5f}; float32 at the default matmul "
                  f"precision vs highest: grads rel err {v['f32_default_precision_grads_rel_err']:.2e}, "
                  f"loss diff {v['f32_default_precision_loss_diff']:.2e}")


if __name__ == "__main__":
    flags = parse_flags(sys.argv[1:])
    worker = flags["worker"]
    if worker == "matmul":
        flops, kind = matmul_rate()
        print(json.dumps({"flops": flops, "device_kind": kind}))
    elif worker == "torch":
        print(json.dumps(torch_worker(flags)))
    elif worker.startswith("ours:"):
        attention, unroll, check = (worker.removeprefix("ours:").split(":") + ["", ""])[:3]
        print(json.dumps(ours_worker(flags, attention, int(unroll or 1), check == "check")))
    elif worker:
        raise SystemExit(f"--worker must be matmul, torch or ours:ATTENTION:UNROLL; got {worker!r}")
    else:
        result = main(flags)
        print_table(result)
        print(json.dumps(result))
