"""Run by tests/test_multidevice.py in subprocesses on simulated CPU devices; writes its findings as JSON.

    python tests/sharding_worker.py OUT.json [--memory]
    python tests/sharding_worker.py OUT.json --coordinator_address=127.0.0.1:PORT --process_id=I

The first form (8 devices, one process): the reference is the plain, unsharded path (init_train_state +
jax.jit(make_train_step) on one device); each mesh runs the same five steps through gpt2_jax.sharding, and the mesh
with all three axes also decodes. The test compares the numbers. (Plain data parallelism is train.py's data:4 axis
in tests/test_multidevice.py; here only its layout is read, from the abstract state.) The "memory" section holds the
per-device bytes of the real presets (computed from shapes, nothing allocated) quoted in docs/scaling.md. The second
form is one of 2 processes of 2 devices each (gloo collectives): the same five steps on data:2,fsdp:2, each process
feeding only its rows of every batch, then greedy sampling.generate on the parameters spread over both; process 0
alone writes OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PAIR = dict(arg.removeprefix("--").split("=", 1) for arg in sys.argv[2:] if "=" in arg)
# Before jax is imported: 8 CPU devices (2 for each process of a pair), and XLA's cheapest backend optimisation,
# which halves compile time (the reference and the sharded runs share it, so the comparison is unaffected).
DEVICES = 2 if PAIR else 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
                           " --xla_backend_optimization_level=0")
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt2_jax import sharding as sh  # noqa: E402
from gpt2_jax.config import ModelConfig, TrainConfig  # noqa: E402
from gpt2_jax.model import GPT2, init_cache  # noqa: E402
from gpt2_jax.sampling import generate  # noqa: E402
from gpt2_jax.training import init_train_state, make_train_step  # noqa: E402

MESHES = ("fsdp:8", "data:2,fsdp:2,tensor:2")
DECODES = "data:2,fsdp:2,tensor:2"  # greedy decoding on sharded params: on the mesh that splits the most
STEPS, ACCUM, BATCH, SEQ = 5, 2, 8, 32
PROMPTS = np.array([[464, 329, 318, 257], [40, 88, 284, 111]], np.int32)  # two 4-token prompts
NEW_TOKENS = 12
# pad_vocab_to=64 makes the vocabulary (50304 rows) divisible by every axis, so tensor really splits it;
# dropout checks that the random masks do not depend on the sharding.
MODEL = ModelConfig.from_preset("tiny", vocab_size=500, pad_vocab_to=64, dropout=0.1)
# Adam's eps is 1e-6, not 1e-8: a weight whose gradient is ~1e-9 (a unit the batch barely uses) gets an update
# of about lr * sign(g) when eps << |g|, and the sign of such a gradient is decided by float32 rounding, which
# the all-reduce order changes. eps = 1e-6 keeps those updates small, so 1e-5 compares the real arithmetic.
TRAIN = TrainConfig(batch_size=BATCH, gradient_accumulation_steps=ACCUM, warmup_iters=1, learning_rate=1e-3, eps=1e-6)


def batches():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, MODEL.vocab_size, size=(STEPS + 1, ACCUM, BATCH, SEQ + 1), dtype=np.int32)
    return tokens[..., :-1], tokens[..., 1:]


def greedy_full(params, prompts):
    """Greedy decoding by re-running the whole sequence: the causal model ignores the zeros after `pos`."""
    B, T0 = prompts.shape
    model = GPT2(MODEL)

    @jax.jit
    def run(params, buf):
        def body(pos, buf):
            logits = model.apply({"params": params}, buf)
            return buf.at[:, pos].set(jnp.argmax(logits[:, pos - 1], axis=-1).astype(buf.dtype))
        return jax.lax.fori_loop(T0, T0 + NEW_TOKENS, body, buf)

    buf = jnp.zeros((B, T0 + NEW_TOKENS), jnp.int32).at[:, :T0].set(prompts)
    return np.asarray(run(params, buf))[:, T0:].tolist()


def greedy_cached(params, prompts, mesh):
    """Greedy decoding with a KV cache laid out by sh.cache_shardings: prefill, then one token per step."""
    B, T0 = prompts.shape
    model = GPT2(MODEL)
    cache_sh = sh.cache_shardings(MODEL, mesh, B, T0 + NEW_TOKENS)

    @jax.jit
    def run(params, prompts, cache):
        logits, cache = model.apply({"params": params}, prompts, cache=cache)
        first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

        def body(i, carry):
            out, cache = carry
            logits, cache = model.apply({"params": params}, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1),
                                        cache=cache)
            return out.at[:, i].set(jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)), cache

        out = jnp.zeros((B, NEW_TOKENS), jnp.int32).at[:, 0].set(first)
        return jax.lax.fori_loop(1, NEW_TOKENS, body, (out, cache))[0]

    cache = jax.device_put(init_cache(MODEL, B, T0 + NEW_TOKENS), cache_sh)
    prompts = jax.device_put(jnp.asarray(prompts), sh.replicated(mesh))
    return np.asarray(run(params, prompts, cache)).tolist()


def greedy_generate(params):
    """sampling.generate with top_k=1 (greedy under any temperature) on whatever devices params live on."""
    return generate(MODEL, params, PROMPTS.tolist(), max_new_tokens=NEW_TOKENS, top_k=1, stop_tokens=())


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def specs_of(tree) -> list[str]:
    return [str(x.sharding.spec) for x in jax.tree.leaves(tree)]


def reference(x, y, rng):
    state = init_train_state(MODEL, TRAIN, rng)
    unsharded_bytes = sh.state_bytes_per_device(state)
    step = jax.jit(make_train_step(MODEL, TRAIN))
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, x[i], y[i], rng)
        losses.append(float(metrics["loss"]))
    return state, losses, unsharded_bytes


def run_mesh(spec, x, y, rng):
    mesh = sh.make_mesh(spec)
    state = sh.create_sharded_state(MODEL, TRAIN, mesh, rng)
    created_bytes = sh.state_bytes_per_device(state)
    first = [sh.host_local_to_global(a[0], mesh, BATCH) for a in (x, y)]
    step = sh.make_sharded_train_step(MODEL, TRAIN, mesh).lower(state, *first, rng).compile()
    losses = []
    for i in range(STEPS):
        xs, ys = (sh.host_local_to_global(a[i], mesh, BATCH) for a in (x, y))
        state, metrics = step(state, xs, ys, rng)
        losses.append(float(metrics["loss"]))
    expected = specs_of(sh.abstract_state(MODEL, TRAIN, mesh))
    return mesh, state, {"losses": losses, "bytes": created_bytes,
                         "abstract_bytes": sh.state_bytes_per_device(sh.abstract_state(MODEL, TRAIN, mesh)),
                         "specs_kept": specs_of(state) == expected,
                         "wte_spec": str(state.params["wte"].sharding.spec),
                         "c_attn_spec": str(state.params["h"]["attn"]["c_attn"]["weight"].sharding.spec),
                         "c_fc_spec": str(state.params["h"]["mlp"]["c_fc"]["weight"].sharding.spec),
                         "mu_wte_spec": str(state.opt_state[1][0].mu["wte"].sharding.spec),
                         "whole_batch_collectives": sh.whole_batch_collectives(step.as_text(), BATCH, SEQ)}


def memory_table() -> dict:
    """Per-device bytes of params and optimizer state for the real presets on several 8-device meshes."""
    table = {}
    for preset in ("gpt2", "gpt2-xl"):
        cfg = ModelConfig.from_preset(preset)
        table[preset] = {"n_params": sum(int(np.prod(a.shape)) for a in
                                         jax.tree.leaves(sh.abstract_state(cfg, TRAIN, sh.make_mesh("data:8")).params))}
        for spec in ("data:8", "fsdp:8", "data:2,fsdp:4", "fsdp:4,tensor:2"):
            table[preset][spec] = sh.state_bytes_per_device(sh.abstract_state(cfg, TRAIN, sh.make_mesh(spec)))
        table[preset]["fallbacks_fsdp:4,tensor:2"] = sh.sharding_fallbacks(cfg, sh.make_mesh("fsdp:4,tensor:2"))
    return table


def main(out_path: str) -> None:
    assert len(jax.devices()) == 8, f"need 8 devices (XLA_FLAGS), got {len(jax.devices())}"
    x, y = batches()
    rng = jax.random.PRNGKey(0)
    ref_state, ref_losses, unsharded_bytes = reference(x, y, rng)
    report = {"reference": {"losses": ref_losses, "bytes": unsharded_bytes,
                            "n_params": sum(int(np.prod(a.shape)) for a in jax.tree.leaves(ref_state.params)),
                            "tokens": greedy_full(ref_state.params, PROMPTS),
                            "generate_tokens": greedy_generate(ref_state.params)},
              "meshes": {}}
    ref_params = jax.device_get(ref_state.params)
    for spec in MESHES:
        mesh, state, result = run_mesh(spec, x, y, rng)
        result["max_param_diff"] = max_diff(state.params, ref_params)
        result["max_opt_diff"] = max_diff(state.opt_state, ref_state.opt_state)
        report["meshes"][spec] = result
        if spec == DECODES:
            result["tokens"] = greedy_generate(state.params)
            result["cached_tokens"] = greedy_cached(state.params, PROMPTS, mesh)
    data8 = sh.abstract_state(MODEL, TRAIN, sh.make_mesh("data:8"))
    report["data:8"] = {"bytes": sh.state_bytes_per_device(data8), "wte_spec": str(data8.params["wte"].sharding.spec)}
    report["memory"] = memory_table()
    report["mesh_minus_one"] = dict(sh.make_mesh("data:-1,tensor:2").shape)
    Path(out_path).write_text(json.dumps(report, indent=1))


def pair_main(out_path: str) -> None:
    """One process of two: the five steps on data:2,fsdp:2 from its rows alone, then sampling."""
    sh.initialize_distributed(PAIR["coordinator_address"], 2, int(PAIR["process_id"]))
    mesh = sh.make_mesh("data:2,fsdp:2")
    rows = sh.process_batch_rows(mesh, BATCH)
    print(f"process {jax.process_index()}/{jax.process_count()} devices {len(jax.local_devices())}"
          f"/{jax.device_count()} rows {rows.start}:{rows.stop}", flush=True)
    x, y = batches()
    rng = jax.random.PRNGKey(0)
    state = sh.create_sharded_state(MODEL, TRAIN, mesh, rng)
    step = sh.make_sharded_train_step(MODEL, TRAIN, mesh)
    losses = []
    for i in range(STEPS):
        xs, ys = (sh.host_local_to_global(a[i][:, rows], mesh, BATCH) for a in (x, y))
        state, metrics = step(state, xs, ys, rng)
        losses.append(float(metrics["loss"]))  # a replicated scalar: every process can read it
    tokens = greedy_generate(state.params)
    if sh.is_main_process():
        Path(out_path).write_text(json.dumps({"losses": losses, "tokens": tokens, "process_count": jax.process_count(),
                                              "device_count": jax.device_count()}))


if __name__ == "__main__":
    if sys.argv[2:] == ["--memory"]:  # only the per-device bytes of the real presets, in a second
        Path(sys.argv[1]).write_text(json.dumps(memory_table(), indent=1))
    elif PAIR:
        pair_main(sys.argv[1])
    else:
        main(sys.argv[1])
