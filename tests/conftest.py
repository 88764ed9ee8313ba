"""Shared helpers: random PyTorch GPT-2s of each layout (torch imported only when used), subprocesses (a free port,
start with the output going to a log file, wait, finish), the tiny train.py run of the test_train_*.py files, and
the suite's persistent XLA compilation cache."""

import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def tiny_param_count(V, T, C=32, L=2):
    """Hand count of a GPT-2: embeddings, L blocks (12C^2 weights + 13C biases/LayerNorm), final LayerNorm."""
    return V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(argv, log_path: Path, env=None) -> subprocess.Popen:
    """python argv in the repository, its output going to log_path (a pipe could fill up and block it)."""
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-u", *map(str, argv)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, text=True, env=env)
    proc.log_path = Path(log_path)
    return proc


def process_environ(pid: int) -> dict:
    """The environment a running process started with (/proc/PID/environ)."""
    return dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)


def stop_all(procs) -> None:
    """Kill each process still running (after a failed wait, so that no test leaves one behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def finish(proc, timeout=600) -> tuple[int, str]:
    """Wait for a process of start() (killed if it overruns); its exit code and its log."""
    try:
        proc.wait(timeout=timeout)
    finally:
        stop_all([proc])
    return proc.returncode, proc.log_path.read_text()


def finish_all(procs, timeout=600) -> list[tuple[int, str]]:
    """finish() each process; those still running when that fails are killed."""
    try:
        return [finish(p, timeout) for p in procs]
    finally:
        stop_all(procs)


VOCAB = 256
# A small model and vocabulary so that each run compiles and steps in moments; dropout on, so the rng matters.
MODEL_FLAGS = ["--config=tiny", f"--vocab_size={VOCAB}", "--block_size=32", "--dropout=0.1"]
RUN_FLAGS = ["--batch_size=8", "--gradient_accumulation_steps=2", "--max_iters=20", "--eval_interval=10",
             "--log_interval=5", "--eval_iters=2", "--warmup_iters=5", "--lr_decay_iters=20", "--num_samples=0"]


def records(out: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def resolve(argv: list[str]):
    """train.py's (model config, train config, initial params) for these flags."""
    from gpt2_jax import run_config

    return run_config.resolve(run_config.read_flags(argv))


def main_error(capsys, *argv) -> str:
    """What train.main prints to stderr when it refuses these flags (exit status 2)."""
    import train

    assert train.main(list(argv)) == 2
    return capsys.readouterr().err


@functools.cache
def _jitted_forward():
    import jax

    from gpt2_jax.model import GPT2

    return jax.jit(lambda cfg, params, tokens: GPT2(cfg).apply({"params": params}, tokens, deterministic=True),
                   static_argnums=0)


def forward(model_cfg, params, tokens):
    """GPT2(model_cfg)'s logits of tokens [B, T], jitted (run op by op, each call re-traces and compiles its
    layer scan: about a second a call)."""
    return _jitted_forward()(model_cfg, params, tokens)


def hand_loss(model_cfg, params, split, seed: int, batches: int, B: int) -> float:
    """The mean cross entropy of the first `batches` batches of a split, computed here from the logits."""
    import jax
    import jax.numpy as jnp

    losses = []
    for i in range(batches):
        x, y = split.batch(seed, i, B, model_cfg.block_size)
        logits = forward(model_cfg, params, jnp.asarray(x[0]))
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        losses.append(-np.mean(np.take_along_axis(logp, y[0][..., None], axis=-1)))
    return float(np.mean(losses))


def start_train(*flags, out: Path, env, log_name=None) -> subprocess.Popen:
    """train.py with these flags and --out_dir=out, its log next to out."""
    return start(["train.py", *flags, f"--out_dir={out}"], out.parent / f"{log_name or out.name}.log", env=env)


def run_train(*flags, out: Path, env) -> tuple[int, str]:
    return finish(start_train(*flags, out=out, env=env))


XLA_CACHE = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
# XLA's cheapest backend optimisation: the suite's models are tiny, so compiling is most of its time and this
# roughly halves it (test_training.py: 206 s -> 122 s on the 2-core EPYC); it changes no result beyond rounding,
# and every comparison a test makes is between programs built with the same flags or within a tolerance.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def ran_at_full_optimisation(request) -> bool:
    """For a test of bitwise results: where this process compiles with FAST_COMPILE, run the test again in a pytest
    subprocess at XLA's default level (what users' programs get: level 0 emits other loops) and return True once
    it passed there; False where this process compiles at another level (the caller then runs the test itself)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE not in flags:
        return False
    env = dict(os.environ, XLA_FLAGS=flags.replace(FAST_COMPILE, "--xla_backend_optimization_level=3"))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider",
                           request.node.nodeid], cwd=request.config.rootpath, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"at XLA's default optimisation level:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
    return True


def host_devices(env, n: int) -> dict:
    """env, with XLA splitting the host CPU into n devices (keeping env's other XLA flags)."""
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip())


def pytest_configure(config):
    """XLA's fast compile (FAST_COMPILE) unless the caller's XLA_FLAGS choose a level, and the suite's persistent
    XLA compilation cache (xla_cache_dir), shared by the xdist workers (which inherit the environment) and their
    subprocesses: a program that many tests and train.py runs compile compiles once, and a rerun compiles only
    what changed. A cache directory set by the caller is kept."""
    if hasattr(config.option, "loadscopereorder"):  # else xdist (>= 3.6) reorders the files by their test count
        config.option.loadscopereorder = False
    if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    cache = xla_cache_dir()
    os.environ.update(XLA_CACHE, JAX_COMPILATION_CACHE_DIR=str(cache))
    if "jax" in sys.modules:  # imported by a plugin or by xla_cache_dir: its config already read the environment
        import jax

        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


XLA_CACHE_LIMIT = 2**30


def xla_cache_dir() -> Path:
    """The user's cache directory's xla-tests/<key>: one per jaxlib version and CPU, as the kernels' library is
    keyed (XLA's cache key holds neither the CPU's features nor, usefully, a bound on its size: a directory past
    XLA_CACHE_LIMIT bytes is emptied first). About half of the suite's time is compiling its programs."""
    import jaxlib

    from gpt2_jax import cpu_kernels

    cpu = cpu_kernels._cpu_description(cpu_kernels._cpuinfo())
    key = hashlib.sha256(f"{jaxlib.__version__}\0{cpu}".encode()).hexdigest()[:16]
    cache = cpu_kernels._cache_dir() / "xla-tests" / key
    if cache.is_dir() and sum(f.stat().st_size for f in cache.iterdir() if f.is_file()) > XLA_CACHE_LIMIT:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    return cache


# The files that take longest, longest first (each file alone, `pytest -n 0 --durations`, on the 2-core EPYC: 370,
# 259, 248, 133, 122, 113, 92, 90, 76, 72, 67, 64, 50, 42 and 37 s). xdist hands out whole files in collection order
# (pytest_configure turns off its reordering by test count), so these start first and the two workers finish
# together, not one waiting on a long file handed out last; the others (under 10 s each) follow by name.
LONGEST_FIRST = ("test_multidevice.py", "test_sampling.py", "test_sample_script.py", "test_train_finetune.py",
                 "test_training.py", "test_engine.py", "test_cpu_kernels.py", "test_train_script.py", "test_model.py",
                 "test_convert.py", "test_evaluate.py", "test_compare.py", "test_train_failures.py", "test_lm_eval.py",
                 "test_checkpoint.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first (LONGEST_FIRST); each file's tests keep their order."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def without_xla_cache(env) -> dict:
    """env without the persistent XLA cache's settings."""
    return {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR" and k not in XLA_CACHE}


@pytest.fixture(scope="module")
def env():
    """The environment of train.py subprocesses: CPU, and the suite's persistent XLA cache (pytest_configure)."""
    return dict(os.environ, JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """llm.c shards of random tokens below 256: 4,000 for train, 1,000 for val."""
    from gpt2_jax import data

    out = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    data.write_shard(out / "train_000000.bin", rng.integers(0, 256, 4000))
    data.write_shard(out / "val_000000.bin", rng.integers(0, 256, 1000))
    return out


def wait_until(condition, proc, what: str, timeout=600) -> None:
    """Poll condition() until it holds; fail, naming what, if proc exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[2]} exited before {what}:\n{finish(proc)[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def random_params(cfg, seed=0, std=0.05):
    """Our parameters of cfg's shapes drawn by numpy (fast: no per-op compilation): LayerNorm weights 1 + noise,
    everything else noise, so that biases and LayerNorms are not trivial."""
    import jax
    import jax.numpy as jnp

    from gpt2_jax.model import abstract_params

    rng = np.random.default_rng(seed)
    shapes = abstract_params(cfg)

    def draw(path, leaf):
        is_ln_weight = "ln_" in jax.tree_util.keystr(path) and path[-1].key == "weight"
        noise = rng.normal(0.0, std, leaf.shape)
        return jnp.asarray((1.0 + noise if is_ln_weight else noise).astype(np.float32))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _randomize(model, seed, std):
    from gpt2_jax.torch_ref import randomize_

    return randomize_(model, seed=seed, std=std)


def random_hf_model(seed=0, tie=True, activation="gelu_new", std=0.05, n_layer=2, n_head=2, n_embd=32, vocab_size=96,
                    n_positions=32, layer_norm_epsilon=1e-5):
    """A transformers GPT2LMHeadModel (eval, no dropout) with every weight random: LayerNorm weights around 1."""
    import transformers
    from transformers.initialization import no_init_weights

    cfg = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        activation_function=activation, layer_norm_epsilon=layer_norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, tie_word_embeddings=tie, attn_implementation="eager",
        bos_token_id=None if vocab_size <= 50256 else 50256, eos_token_id=None if vocab_size <= 50256 else 50256)
    with no_init_weights():  # randomize_ sets every weight: skip transformers' own (slow) init
        model = transformers.GPT2LMHeadModel(cfg)
    model.tie_weights()
    return _randomize(model, seed, std)


def hf_model(cfg, seed: int = 0):
    """A transformers GPT-2 of a ModelConfig's shape with GPT-2's own init, its biases and LayerNorms perturbed
    (GPT-2's init leaves them at 0 and 1) so that they are tested too."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture
def random_hf():
    """random_hf_model(seed=0, tie=True, activation="gelu_new", std=0.05, **GPT2Config fields)."""
    return random_hf_model


@pytest.fixture
def random_reference():
    """make(seed=0, qkv_bias=True, std=0.05, **reference config fields) -> (ReferenceGPT, its config dict)."""
    from gpt2_jax.torch_ref import ReferenceGPT

    def make(seed=0, qkv_bias=True, std=0.05, vocab_size=96, context_length=32, emb_dim=32, n_heads=2, n_layers=2):
        cfg = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
                   n_layers=n_layers, drop_rate=0.0, qkv_bias=qkv_bias)
        return _randomize(ReferenceGPT(cfg), seed, std), cfg

    return make


@pytest.fixture
def random_nanogpt():
    """make(seed=0, bias=True, approximate="none", std=0.05, **model_args) -> (NanoGPT, model_args)."""
    from gpt2_jax.torch_ref import NanoGPT

    def make(seed=0, bias=True, approximate="none", std=0.05, vocab_size=96, block_size=32, n_embd=32, n_head=2,
             n_layer=2):
        args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                    vocab_size=vocab_size, dropout=0.0)
        return _randomize(NanoGPT(args, approximate), seed, std), args

    return make


@pytest.fixture
def torch_logits():
    """logits(model, tokens [B, T] numpy) -> float32 numpy logits of any of the torch models."""
    import torch

    from gpt2_jax.torch_ref import causal_lm_logits

    def logits(model, tokens):
        with torch.no_grad():
            return causal_lm_logits(model, torch.as_tensor(np.asarray(tokens), dtype=torch.long)).numpy()

    return logits
