"""Decoding speed on this CPU: gpt2 (124M, random weights), 32-token prompt, 128 new tokens (greedy).

Ours (gpt2_jax.sampling.generate_batch) against transformers' GPT2LMHeadModel.generate (torch, KV cache, the
same number of threads), fp32 and bf16, batch 1 and 8; compile time separately; and the memory-bandwidth
ceiling: the bytes a decode step must read (all weights once, plus the filled part of the KV cache) over the
copy bandwidth measured here. Prints a table, then one JSON line.

    python bench/sample.py            # about 3 minutes; check `uptime` first: other processes skew it
    python bench/sample.py --dtypes=float32   # float32 only (torch's bfloat16 is very slow without AVX-512 BF16)
    python bench/sample.py --layouts  # ms per decode step: GPT2.apply vs sampling.decode_step on each matrix layout
    python bench/sample.py --compile_count   # compilations for 1,000 prompts of 1 to 1,016 tokens
    python bench/sample.py --workload=mixed  # continuous batching: 200 prompts of mixed lengths, limits and stops

--workload=mixed (--prompts=N, default 200; --batch=B, default 8): prompts of 8-256 tokens cut from data/shakespeare (fixed seed), each
with its own max_new_tokens (8-128) and a stop string, greedy, gpt2 124M fp32 at batch 8: generated tokens/s (kept
tokens: cut at the stop string) of the continuous Engine, of its length-bucketed schedule and of transformers'
generate on length-sorted batches, plus slot occupancy. Random weights never write "\n\n": the default
--stop=frequent uses the token the model writes most often (a few minutes; --stop=$'\n\n' for the literal).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flags import parse_flags  # noqa: E402  (bench/flags.py)
from gpt2_jax.config import ModelConfig, replace  # noqa: E402
from gpt2_jax.model import GPT2, abstract_params, arrange_weights, count_params, init_cache, init_params  # noqa: E402
from gpt2_jax import cpu_kernels, sampling  # noqa: E402
from gpt2_jax.sampling import EOT_TOKEN, Sampler, decode_step, generate, generate_batch, row_key  # noqa: E402

PROMPT, NEW, REPEATS = 32, 128, 2


def copy_bandwidth(n_bytes: int = 1 << 28) -> float:
    """Best bytes moved per second (read + write) copying n_bytes, by numpy and by an XLA fusion (both cores)."""
    src = np.random.default_rng(0).random(n_bytes // 8)
    dst = np.empty_like(src)
    x = jnp.asarray(src)
    scale = jax.jit(lambda a: a * 1.0000001)
    scale(x).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t))
        t = time.perf_counter()
        scale(x).block_until_ready()
        best = max(best, 2 * n_bytes / (time.perf_counter() - t))
    return best


def bytes_per_step(cfg: ModelConfig, batch: int, itemsize: int) -> float:
    """Weights read once per step plus the real keys and values, averaged over the decode steps."""
    weights = count_params(abstract_params(cfg)) * itemsize
    mean_len = PROMPT + NEW / 2
    return weights + 2 * cfg.n_layer * batch * mean_len * cfg.n_embd * itemsize


def ours_runner(cfg: ModelConfig, params, prompts):
    keys = [row_key(0, i) for i in range(len(prompts))]

    def run() -> float:
        t = time.perf_counter()
        done = generate_batch(cfg, params, prompts, keys, max_new_tokens=NEW, sampler=Sampler(0.0), stop_tokens=())
        assert all(len(c.tokens) == NEW for c in done)
        return time.perf_counter() - t
    return run


def torch_model(torch_dtype):
    import torch
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval().to(torch_dtype)


def torch_runner(model, prompts):
    import torch

    x = torch.tensor(prompts)
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))

    def run() -> float:
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(x, max_new_tokens=NEW, min_new_tokens=NEW, **kw)
            seconds = time.perf_counter() - t
        assert out.shape[1] == PROMPT + NEW
        return seconds
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm up
    return run


def measure(cfg: ModelConfig, params, model, prompts) -> tuple[float, float, float]:
    """(ours tokens/s, torch tokens/s, our compile seconds): best of REPEATS runs each, interleaved so that load
    from other processes hits both alike."""
    ours, theirs = ours_runner(cfg, params, prompts), torch_runner(model, prompts)
    first = ours()
    best_ours, best_theirs = float("inf"), float("inf")
    for _ in range(REPEATS):
        best_ours = min(best_ours, ours())
        best_theirs = min(best_theirs, theirs())
    tokens = len(prompts) * NEW
    return tokens / best_ours, tokens / best_theirs, max(0.0, first - best_ours)


def step_ms(batch: int, steps: int = 16) -> dict:
    """ms per decode step of gpt2 fp32 at cache position 32 of 160: GPT2.apply with its KVCache vs decode_step
    on each matrix layout (weights prepared before timing)."""
    cfg = ModelConfig.from_preset("gpt2")
    params = init_params(cfg, jax.random.PRNGKey(0))
    S, start = 160, 32
    token_B = jnp.zeros((batch,), jnp.int32)

    @jax.jit
    def model_path(params, token_B):
        def body(i, carry):
            cache, token_B = carry
            logits, cache = GPT2(cfg).apply({"params": params}, token_B[:, None], cache=cache)
            return cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        cache = init_cache(cfg, batch, S).replace(index=jnp.int32(start))
        return jax.lax.fori_loop(0, steps, body, (cache, token_B))[1]

    @jax.jit
    def decode_path(weights, token_B):  # the decode loop's steps: one token per row into its slot of the cache
        def body(i, carry):
            cache_k, cache_v, token_B = carry
            logits, cache_k, cache_v = decode_step(cfg, weights, token_B, jnp.full((batch,), start + i, jnp.int32),
                                                   cache_k, cache_v)
            return cache_k, cache_v, jnp.argmax(logits, -1).astype(jnp.int32)
        cache = init_cache(cfg, batch, S)
        return jax.lax.fori_loop(0, steps, body, (cache.k, cache.v, token_B))[2]

    copy = jax.jit(arrange_weights, static_argnums=(0, 2))
    paths = {"GPT2.apply (scan over stacked weights)": (model_path, params),
             "decode_step, [out, in] as stored": (decode_path, arrange_weights(cfg, params)),
             "decode_step, [in, out] copy": (decode_path, copy(cfg, params, sampling.IN_OUT))}
    if cpu_kernels.available():
        paths["decode_step, panel kernel"] = (decode_path, copy(cfg, params, sampling.PANELS))
    for f, w in paths.values():
        f(w, token_B).block_until_ready()
    best = {name: float("inf") for name in paths}
    for _ in range(3):  # interleaved, so that load from other processes hits both alike
        for name, (f, w) in paths.items():
            t = time.perf_counter()
            f(w, token_B).block_until_ready()
            best[name] = min(best[name], (time.perf_counter() - t) / steps * 1e3)
    return best


def layouts() -> None:
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for batch in (1, 8):
        for name, ms in step_ms(batch).items():
            print(f"B={batch}  {name:<40}{ms:8.1f} ms per decode step")


def compile_counts() -> None:
    """1,000 prompts of uniformly random length 1..1016 with max_new_tokens=8 and block_size 1024 (a one-layer
    tiny model: the count depends on shapes only), at several batch sizes."""
    cfg = ModelConfig.from_preset("tiny", n_layer=1, block_size=1024)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in rng.integers(1, 1017, 1000)]
    for batch in (8, 16, 64):
        before = sampling.compile_count()
        generate(cfg, params, prompts, max_new_tokens=8, temperature=0.0, batch_size=batch)
        print(f"batch_size {batch:>2}: {sampling.compile_count() - before} compilations for 1,000 prompts")


def main(dtypes: str) -> None:
    import torch

    load = os.getloadavg()[0]
    bandwidth = copy_bandwidth()
    base = ModelConfig.from_preset("gpt2")
    params32 = init_params(base, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    rows, result, compile_s = [], {}, []
    for dtype in dtypes.split(","):
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        cfg = replace(base, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda a: a.astype(dtype), params32)
        model = torch_model(torch_dtype)
        for batch in (1, 8):
            prompts = rng.integers(0, base.vocab_size, (batch, PROMPT)).tolist()
            ours_tps, torch_tps, comp = measure(cfg, params, model, prompts)
            ceiling = bandwidth / bytes_per_step(base, batch, jnp.dtype(dtype).itemsize) * batch
            tag = f"b{batch}_{'fp32' if dtype == 'float32' else 'bf16'}"
            result.update({f"{tag}_ours_tok_s": round(ours_tps, 2), f"{tag}_torch_tok_s": round(torch_tps, 2),
                           f"{tag}_ratio": round(ours_tps / torch_tps, 3),
                           f"{tag}_bandwidth_fraction": round(ours_tps / ceiling, 3)})
            compile_s.append(comp)
            rows.append((dtype, batch, ours_tps, torch_tps, ours_tps / torch_tps, ceiling, ours_tps / ceiling, comp))
        del model
    print(f"load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; torch threads {torch.get_num_threads()}; jax {jax.__version__}")
    kernel = cpu_kernels.unavailable_reason() or "built"
    print("decode and prefill matmuls: " + ("panel kernel" if kernel == "built" else f"XLA (no kernel: {kernel})"))
    print(f"{'dtype':<9}{'B':>3}{'ours tok/s':>12}{'torch tok/s':>13}{'ratio':>7}{'ceiling':>9}{'of ceil':>9}"
          f"{'compile s':>11}")
    for dtype, batch, o, t, r, c, f, comp in rows:
        print(f"{dtype:<9}{batch:>3}{o:>12.1f}{t:>13.1f}{r:>7.2f}{c:>9.1f}{f:>9.2f}{comp:>11.1f}")
    result.update(compile_s=round(max(compile_s), 2), copy_bandwidth_gb_s=round(bandwidth / 1e9, 2),
                  load_average=round(load, 2), panel_kernel=kernel == "built")
    print(json.dumps(result))


# ---------------------------------------------------------------- --workload=mixed: continuous batching
MIXED_SEED = 0


def mixed_workload(n: int) -> list[tuple[list[int], int]]:
    """n (prompt, max_new_tokens): prompts of 8-256 tokens cut from data/shakespeare at seeded random places,
    limits drawn from 8-128."""
    from gpt2_jax.tokenizer import get_tokenizer

    text = (Path(__file__).resolve().parents[1] / "data" / "shakespeare" / "shakespeare.txt").read_text()
    tokens = get_tokenizer().encode(text[:400_000])
    rng = np.random.default_rng(MIXED_SEED)
    work = []
    for length, limit in zip(rng.integers(8, 257, n), rng.integers(8, 129, n)):
        start = int(rng.integers(0, len(tokens) - length))
        work.append((tokens[start:start + length], int(limit)))
    return work


def frequent_token_stop(cfg: ModelConfig, params, work, batch: int) -> str:
    """The text of the token that the model emits most often over the first 16 prompts (greedy, 16 new tokens):
    random weights never write "\\n\\n", so a stop string they do write makes the workload's lengths mixed."""
    from gpt2_jax.tokenizer import get_tokenizer

    engine = sampling.Engine(cfg, params, batch_size=batch)
    counts = collections.Counter(t for s in engine.run(mixed_requests(work[:16], [], cap=16)) for t in s.tokens)
    tokenizer = get_tokenizer()
    return next(tokenizer.decode([t]) for t, _ in counts.most_common() if tokenizer.decode([t]).strip())


def mixed_requests(work, stops: list[str], cap: int | None = None) -> list:
    from gpt2_jax.batch_sampling import stop_check

    return [sampling.Request(id=i, tokens=tuple(p), keys=(row_key(MIXED_SEED, i),),
                             max_new_tokens=min(limit, cap or limit), sampler=Sampler(0.0),
                             is_finished=stop_check(stops)) for i, (p, limit) in enumerate(work)]


def kept_tokens(new_tokens: dict[int, list[int]], stops: list[str]) -> dict:
    """Tokens kept (each sample cut at its stop string as sample.py counts completion_tokens), the kept texts by
    id, and how many samples a stop string ended."""
    from gpt2_jax.batch_sampling import finish

    texts, kept, stopped = {}, 0, 0
    for i, tokens in new_tokens.items():
        texts[i], n, reason = finish(tokens, "length", stops)
        kept, stopped = kept + n, stopped + (reason == "stop")
    return dict(kept=kept, texts=texts, stopped=stopped)


def run_engine(cfg: ModelConfig, params, work, stops: list[str], schedule: str, batch: int) -> dict:
    """Seconds, kept tokens, texts and occupancy of one Engine run over the workload, after a warm-up run."""
    engine = sampling.Engine(cfg, params, batch_size=batch, schedule=schedule)
    # One prompt of each power-of-two length (the prefill shapes), 8 new tokens each, and the longest context whole
    # (the KV cache is sized from it): the timed run then compiles little or nothing (compiles_in_timed_runs).
    one_each = {(len(p) - 1).bit_length(): (p, 8) for p, _ in work}
    longest = max(work, key=lambda w: len(w[0]) + w[1])
    list(engine.run(mixed_requests(list(one_each.values()) + [longest], stops)))
    compiled = sampling.compile_count()
    t = time.perf_counter()
    new = {s.request.id: s.tokens for s in engine.run(mixed_requests(work, stops))}
    seconds = time.perf_counter() - t
    return dict(kept_tokens(new, stops), seconds=seconds, occupancy=engine.occupancy,
                compiles_in_timed_run=sampling.compile_count() - compiled)


def run_torch(model, work, stops: list[str], batch: int) -> dict:
    """transformers' generate on length-sorted batches of batch rows (left-padded): each row stops at its own
    limit, <|endoftext|> or a stop string (a per-row StoppingCriteria; the batch runs until its last row stops)."""
    import torch
    import transformers

    from gpt2_jax.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()

    class RowStops(transformers.StoppingCriteria):
        def __init__(self, limits, start):
            self.limits, self.start = limits, start

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, self.start:]
            return torch.tensor([new.shape[1] >= limit or any(s in tokenizer.decode(row.tolist()) for s in stops)
                                 for row, limit in zip(new, self.limits)])

    order = sorted(range(len(work)), key=lambda i: len(work[i][0]))
    new, t = {}, time.perf_counter()
    for b in range(0, len(order), batch):
        ids = order[b:b + batch]
        P = max(len(work[i][0]) for i in ids)
        x = torch.tensor([[0] * (P - len(work[i][0])) + work[i][0] for i in ids])
        mask = torch.tensor([[0] * (P - len(work[i][0])) + [1] * len(work[i][0]) for i in ids])
        limits = [work[i][1] for i in ids]
        with torch.no_grad():
            out = model.generate(x, attention_mask=mask, max_new_tokens=max(limits), do_sample=False,
                                 pad_token_id=EOT_TOKEN, eos_token_id=EOT_TOKEN,
                                 stopping_criteria=transformers.StoppingCriteriaList([RowStops(limits, P)]))
        for i, row, limit in zip(ids, out[:, P:].tolist(), limits):
            row = row[:limit]
            new[i] = row[:row.index(EOT_TOKEN)] if EOT_TOKEN in row else row
    seconds = time.perf_counter() - t
    return dict(kept_tokens(new, stops), seconds=seconds)


def mixed(n_prompts: int, stop: str, batch: int) -> None:
    """The mixed workload on gpt2 124M fp32 (random weights, the same in both frameworks): continuous engine,
    length-bucketed engine and transformers' generate, one after the other in this process."""
    import torch
    import transformers

    from gpt2_jax import convert

    load = os.getloadavg()[0]
    cfg = ModelConfig.from_preset("gpt2")
    params = init_params(cfg, jax.random.PRNGKey(0))
    work = mixed_workload(n_prompts)
    t = time.perf_counter()
    stops = [frequent_token_stop(cfg, params, work, batch) if stop == "frequent" else stop]
    print(f"stop string {stops[0]!r} ({time.perf_counter() - t:.1f} s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        convert.export_hf(cfg, params, tmp)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    with torch.no_grad():  # warm up
        model.generate(torch.tensor([work[0][0]]), max_new_tokens=4, do_sample=False, pad_token_id=EOT_TOKEN)
    runs = {}
    for name in ("continuous", "buckets", "transformers"):
        t = time.perf_counter()
        runs[name] = (run_torch(model, work, stops, batch) if name == "transformers" else
                      run_engine(cfg, params, work, stops, name, batch))
        print(f"{name}: {time.perf_counter() - t:.1f} s in all", file=sys.stderr, flush=True)
    same = {name: sum(r["texts"][i] == runs["continuous"]["texts"][i] for i in range(len(work))) / len(work)
            for name, r in runs.items()}
    print(f"load average before: {load:.2f}, after: {os.getloadavg()[0]:.2f}; {len(work)} prompts of "
          f"{min(len(p) for p, _ in work)}-{max(len(p) for p, _ in work)} tokens, limits 8-128, stop {stops[0]!r}, "
          f"greedy, gpt2 124M float32 (random weights), batch {batch}; torch threads {torch.get_num_threads()}")
    print(f"{'schedule':<14}{'kept tokens':>12}{'seconds':>9}{'tok/s':>9}{'occupancy':>11}{'same text':>11}")
    for name, r in runs.items():
        occupancy = f"{r['occupancy']:.3f}" if "occupancy" in r else "-"
        print(f"{name:<14}{r['kept']:>12}{r['seconds']:>9.1f}{r['kept'] / r['seconds']:>9.1f}{occupancy:>11}"
              f"{same[name]:>11.3f}")
    tps = {name: r["kept"] / r["seconds"] for name, r in runs.items()}
    print(json.dumps({
        "continuous_tokens_per_s": round(tps["continuous"], 2), "buckets_tokens_per_s": round(tps["buckets"], 2),
        "torch_tokens_per_s": round(tps["transformers"], 2), "occupancy": round(runs["continuous"]["occupancy"], 4),
        "buckets_occupancy": round(runs["buckets"]["occupancy"], 4),
        "continuous_over_buckets": round(tps["continuous"] / tps["buckets"], 3),
        "continuous_over_torch": round(tps["continuous"] / tps["transformers"], 3), "prompts": len(work), "batch": batch,
        "device": jax.devices()[0].device_kind,
        "stop": stops[0], "stopped_fraction": round(runs["continuous"]["stopped"] / len(work), 3),
        "same_text_as_continuous": {k: round(v, 3) for k, v in same.items() if k != "continuous"},
        "compiles_in_timed_runs": {k: r["compiles_in_timed_run"] for k, r in runs.items() if "occupancy" in r},
        "load_average": round(load, 2)}))


if __name__ == "__main__":
    mode = parse_flags(sys.argv[1:], {"layouts": False, "compile_count": False, "dtypes": "float32,bfloat16",
                                      "workload": "fixed", "prompts": 200, "stop": "frequent", "batch": 8},
                       __doc__)  # a typo: no 3-minute run
    if mode["layouts"] + mode["compile_count"] + (mode["workload"] != "fixed") > 1:
        raise SystemExit("--layouts, --compile_count and --workload=mixed are separate runs: pass one of them")
    if set(mode["dtypes"].split(",")) - {"float32", "bfloat16"}:
        raise SystemExit(f"--dtypes takes float32, bfloat16 or both (comma-separated); got {mode['dtypes']!r}")
    if mode["workload"] not in ("fixed", "mixed") or min(mode["prompts"], mode["batch"]) < 1 or not mode["stop"]:
        raise SystemExit(f"--workload takes fixed or mixed, --prompts and --batch integers >= 1 and --stop a "
                         f"non-empty string; got {mode['workload']!r}, {mode['prompts']!r}, {mode['batch']!r}, "
                         f"{mode['stop']!r}")
    if mode["layouts"] or mode["compile_count"]:
        (layouts if mode["layouts"] else compile_counts)()
    elif mode["workload"] == "mixed":
        mixed(mode["prompts"], mode["stop"], mode["batch"])
    else:
        main(mode["dtypes"])
