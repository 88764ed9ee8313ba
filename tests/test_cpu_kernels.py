"""cpu_kernels: the panel-packed decode matmul and the training attention against numpy, the panels' packing by
hand, and the fallback to XLA."""

import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import cpu_kernels, sampling
from gpt2_jax.config import ConfigError, ModelConfig, replace
from gpt2_jax.checks import causal_attention_impl
from gpt2_jax.model import GPT2, init_params
from gpt2_jax.sampling import Sampler, generate_batch, row_key

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")
KERNEL_CHECK = Path(__file__).parent / "kernel_check.cc"  # the kernels' arithmetic against references, without XLA
CROSS_COMPILER = shutil.which("aarch64-linux-gnu-g++")
NO_CROSS_COMPILER = "no aarch64-linux-gnu-g++ (Debian: apt-get install g++-aarch64-linux-gnu)"
ELF_MACHINE = {"aarch64": 183, "x86_64": 62}  # e_machine of an ELF header


def test_pack_panels_by_hand():
    w_KN = np.arange(2 * 50, dtype=np.float32).reshape(2, 50)
    panels = np.asarray(cpu_kernels.pack_panels(jnp.asarray(w_KN)))
    assert panels.shape == (2, 2, 48)  # ceil(50 / 48) panels of [K, 48]
    np.testing.assert_array_equal(panels[0], w_KN[:, :48])
    np.testing.assert_array_equal(panels[1, :, :2], w_KN[:, 48:])
    assert not panels[1, :, 2:].any()  # zero padding past column N


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [*range(1, 9), 21])  # 21: a prefill's groups of 8 rows, the last one short
# K=200: the kernel walks W in rows of 64 for several row blocks, the last walk shorter than the others
@pytest.mark.parametrize("K, N", [(37, 5), (64, 100), (200, 97), (768, 2304)])
def test_panel_matmul_matches_numpy(rows, K, N, dtype):
    rng = np.random.default_rng(rows * K + N)
    x, w = rng.standard_normal((rows, K), np.float32), jnp.asarray(rng.standard_normal((K, N)), dtype)
    panels = cpu_kernels.pack_panels(w)
    assert panels.dtype == dtype
    y = jax.jit(cpu_kernels.panel_matmul, static_argnums=2)(jnp.asarray(x), panels, N)
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)  # bfloat16 weights widen exactly
    assert y.shape == (rows, N) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@needs_kernel
def test_a_row_s_result_does_not_depend_on_the_other_rows():
    # The engine's batch invariance rests on it: a row gives the same bits alone, among 8 (a decode step) and among
    # 50 (a prefill, whose groups of 8 rows share each part of a panel).
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((50, 768), np.float32))
    panels = cpu_kernels.pack_panels(jnp.asarray(rng.standard_normal((768, 300), np.float32)))
    matmul = jax.jit(cpu_kernels.panel_matmul, static_argnums=2)
    together = np.asarray(matmul(x, panels, 300))
    in_eights = np.concatenate([matmul(x[i:i + 8], panels, 300) for i in range(0, 50, 8)])
    alone = np.concatenate([matmul(x[i:i + 1], panels, 300) for i in range(50)])
    np.testing.assert_array_equal(together, in_eights)
    np.testing.assert_array_equal(together, alone)


@needs_kernel
def test_independent_calls_in_one_program_all_finish():
    # XLA may run independent custom calls at once on its thread pool; each call's helper task must never be
    # waited for before it starts. (A variant of the kernel whose caller always waited for its task passed with
    # up to 16 calls here and hung with 20 or more.)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 256), np.float32))
    ws = [rng.standard_normal((256, 3000), np.float32) for _ in range(32)]
    panels = [cpu_kernels.pack_panels(w) for w in ws]
    ys = jax.jit(lambda x, ps: [cpu_kernels.panel_matmul(x * (i + 1), p, 3000) for i, p in enumerate(ps)])(x, panels)
    for i, (y, w) in enumerate(zip(ys, ws)):
        ref = (i + 1) * np.asarray(x, np.float64) @ w.astype(np.float64)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@needs_kernel
def test_panel_matmul_names_bad_shapes():
    with pytest.raises(ValueError, match=r"x \[B >= 1, K\], panels \[P, K, 48\] and n_out <= 48P; got \(0, 4\)"):
        cpu_kernels.panel_matmul(jnp.zeros((0, 4)), jnp.zeros((1, 4, 48)), 48)
    with pytest.raises(ValueError, match=r"got \(2, 4\), \(1, 5, 48\) and 48"):
        cpu_kernels.panel_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 5, 48)), 48)
    with pytest.raises(ValueError, match=r"got \(2, 4\), \(1, 4, 48\) and 49"):
        cpu_kernels.panel_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 4, 48)), 49)
    with pytest.raises(ValueError, match="float32 or bfloat16 panels .* got float16"):
        cpu_kernels.panel_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 4, 48), jnp.float16), 48)


def test_cache_key_ignores_the_clock_speed():
    # /proc/cpuinfo's "cpu MHz" changes between processes on most hosts; the key must not, or every process
    # would compile the kernel again.
    block = "processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu MHz\t\t: {}\nmodel name\t: X\nflags\t\t: fpu avx512f\n"
    slow, fast = ("\n".join(block.format(i, mhz) for i in range(2)) for mhz in ("2596.130", "3400.000"))
    expected = "vendor_id\t: AuthenticAMD\nmodel name\t: X\nflags\t\t: fpu avx512f"
    assert cpu_kernels._cpu_description(slow) == cpu_kernels._cpu_description(fast) == expected


def test_the_kernels_are_refused_only_where_they_cannot_vectorise():
    cpu = "vendor_id\t: AuthenticAMD\nmodel name\t: X\nflags\t\t: fpu sse2 avx {}"
    assert cpu_kernels.cpu_problem("x86_64", 64, cpu.format("avx2 fma")) is None
    assert cpu_kernels.cpu_problem("x86_64", 64, cpu.format("avx2 fma avx512f")) is None
    assert cpu_kernels.cpu_problem("aarch64", 64, "") is None  # NEON is part of every 64-bit ARM CPU
    assert cpu_kernels.cpu_problem("arm64", 64, "") is None
    assert cpu_kernels.cpu_problem("x86_64", 64, cpu.format("avx2")) == (
        "this CPU has neither AVX2 and FMA nor AVX-512 (flags in /proc/cpuinfo)")
    assert "64-bit system; this Python is 32-bit" in cpu_kernels.cpu_problem("x86_64", 32, cpu.format("avx2 fma"))
    assert "this is riscv64" in cpu_kernels.cpu_problem("riscv64", 64, "")


def test_without_the_kernel_panel_matmul_says_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"error": "disabled by GPT2_JAX_CPU_KERNELS=0"})
    with pytest.raises(RuntimeError, match="the panel kernel cannot run here: disabled by GPT2_JAX_CPU_KERNELS=0"):
        cpu_kernels.panel_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 4, 48)), 48)


def test_a_failed_build_says_why_and_sampling_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    monkeypatch.setenv("CXX", "false --any-flag")  # a compiler (with an argument) that always fails
    if cpu_kernels.cpu_problem(platform.machine(), 64, cpu_kernels._cpu_description(cpu_kernels._cpuinfo())) is None:
        assert not cpu_kernels.available()
        assert cpu_kernels.unavailable_reason().startswith("false --any-flag -O3 ... failed")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("GPT2_JAX_CPU_KERNELS", "0")
    assert cpu_kernels.unavailable_reason() == "disabled by GPT2_JAX_CPU_KERNELS=0"
    cfg = ModelConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    prompts, keys = [[1, 2, 3], [4, 5]], [row_key(0, 0), row_key(0, 1)]
    out = generate_batch(cfg, params, prompts, keys, max_new_tokens=6, sampler=Sampler(0.0), stop_tokens=())
    assert sampling._WEIGHTS_CACHE[0][1] == sampling.IN_OUT
    alone = [generate_batch(cfg, params, [p], [k], max_new_tokens=6, sampler=Sampler(0.0), stop_tokens=())[0]
             for p, k in zip(prompts, keys)]
    assert [c.tokens for c in out] == [c.tokens for c in alone]


def attention_numpy(qkv, dy):
    """Causal attention and its gradient with respect to qkv, by hand in float64: (y [B, T, H, D], dqkv)."""
    q, k, v = (np.moveaxis(qkv[:, :, i].astype(np.float64), 1, 2) for i in range(3))  # [B, H, T, D]
    T, D = q.shape[2], q.shape[3]
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(D) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    g = np.moveaxis(dy.astype(np.float64), 1, 2)
    dp = g @ np.swapaxes(v, -1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    dq, dk, dv = ds @ k / np.sqrt(D), np.swapaxes(ds, -1, -2) @ q / np.sqrt(D), np.swapaxes(p, -1, -2) @ g
    return np.moveaxis(p @ v, 1, 2), np.stack([np.moveaxis(a, 1, 2) for a in (dq, dk, dv)], axis=2)


@needs_kernel
@pytest.mark.parametrize("B, T, H, D", [(2, 7, 2, 16), (1, 33, 3, 32), (2, 64, 2, 48), (1, 100, 2, 64), (1, 1, 1, 64)])
def test_causal_attention_and_its_gradient_match_numpy(B, T, H, D):
    rng = np.random.default_rng(T)
    qkv = (2 * rng.standard_normal((B, T, 3, H, D))).astype(np.float32)  # scores of a few units: peaked softmax
    dy = rng.standard_normal((B, T, H, D)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(cpu_kernels.causal_attention), jnp.asarray(qkv))
    dqkv = vjp(jnp.asarray(dy))[0]
    y_ref, dqkv_ref = attention_numpy(qkv, dy)
    assert y.shape == (B, T, H, D) and dqkv.shape == qkv.shape
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=0, atol=2e-6 * np.abs(y_ref).max())
    for i in range(3):  # dq, dk, dv
        np.testing.assert_allclose(np.asarray(dqkv[:, :, i]), dqkv_ref[:, :, i], rtol=0,
                                   atol=2e-6 * np.abs(dqkv_ref[:, :, i]).max())


@needs_kernel
def test_causal_attention_gradient_stays_accurate_when_the_softmax_is_peaked():
    # Scores in the hundreds, as a trained model's can be. The backward pass recomputes P; from a log-sum-exp it
    # came out 1e-5 off (dq 1.1e-4 relative here) and training took another path after 50 steps of train.py.
    # XLA's attention, which keeps P, gets 2.6e-5 here.
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((2, 128, 3, 4, 32)).astype(np.float32) * np.array([16, 16, 1], np.float32)[:, None, None]
    dy = rng.standard_normal((2, 128, 4, 32)).astype(np.float32)
    _, vjp = jax.vjp(jax.jit(cpu_kernels.causal_attention), jnp.asarray(qkv))
    dqkv = np.asarray(vjp(jnp.asarray(dy))[0])
    _, dqkv_ref = attention_numpy(qkv, dy)
    for i in range(3):
        error = np.linalg.norm(dqkv[:, :, i] - dqkv_ref[:, :, i]) / np.linalg.norm(dqkv_ref[:, :, i])
        assert error < 4e-5, (i, error)


@needs_kernel
def test_independent_attention_calls_in_one_program_all_finish():
    # As for panel_matmul: a caller waits only for heads its pool task has started, never for the task itself.
    qkv = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 3, 2, 16))
    ys = jax.jit(lambda x: [cpu_kernels.causal_attention(x * (i + 1)) for i in range(24)])(qkv)
    for i, y in enumerate(ys):
        ref, _ = attention_numpy(np.asarray(qkv) * (i + 1), np.zeros((2, 40, 2, 16), np.float32))
        np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@needs_kernel
def test_causal_attention_names_bad_input():
    with pytest.raises(ValueError, match=r"qkv \[B, T, 3, H, D\] with D in \(16, 32, 48, 64\); got \(1, 4, 3, 2, 8\)"):
        cpu_kernels.causal_attention(jnp.zeros((1, 4, 3, 2, 8)))
    with pytest.raises(ValueError, match="float32 qkv; got bfloat16"):
        cpu_kernels.causal_attention(jnp.zeros((1, 4, 3, 2, 16), jnp.bfloat16))


@needs_kernel
def test_the_model_trains_with_the_attention_kernel_as_with_xla():
    cfg = ModelConfig.from_preset("tiny", attention="cpu_kernel")
    assert causal_attention_impl(cfg, training=True) == "cpu_kernel"
    assert causal_attention_impl(replace(cfg, attention="auto"), training=True) == "cpu_kernel"
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, cfg.block_size), 0, cfg.vocab_size)

    def loss(p, c):
        logits = GPT2(c).apply({"params": p}, tokens)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

    ours, xla = (jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
                 for c in (cfg, replace(cfg, attention="xla")))
    assert abs(float(ours[0]) - float(xla[0])) < 1e-6
    for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(xla[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6 * np.abs(np.asarray(b)).max())


def test_the_attention_kernel_is_taken_only_where_it_can_run(monkeypatch):
    dropout = ModelConfig.from_preset("tiny", dropout=0.1)
    assert causal_attention_impl(dropout, training=True) == "xla"  # only ours has attention dropout
    assert causal_attention_impl(ModelConfig.from_preset("tiny", dtype="bfloat16"), training=False) == "xla"
    with pytest.raises(ConfigError, match=r"attention='cpu_kernel' cannot run here: it computes in float32 only"):
        causal_attention_impl(ModelConfig.from_preset("tiny", dtype="bfloat16", attention="cpu_kernel"), False)
    with pytest.raises(ConfigError, match=r"head size in \(16, 32, 48, 64\) \(n_embd / n_head = 8\)"):
        causal_attention_impl(ModelConfig.from_preset("tiny", n_head=4, attention="cpu_kernel"), False)
    monkeypatch.setattr(cpu_kernels, "_state", {"error": "disabled by GPT2_JAX_CPU_KERNELS=0"})
    assert causal_attention_impl(ModelConfig.from_preset("tiny"), training=True) == "xla"
    with pytest.raises(ConfigError, match="cannot run here: disabled by GPT2_JAX_CPU_KERNELS=0"):
        causal_attention_impl(ModelConfig.from_preset("tiny", attention="cpu_kernel"), training=True)


def decode_attention_numpy(q, k, v, last):
    """Each row's attention over its slots 0..last[b], by hand in float64: y [B, H, D]."""
    D, S = q.shape[2], k.shape[3]
    scores = np.einsum("bhd,bhds->bhs", q.astype(np.float64), k) / np.sqrt(D)
    scores = np.where(np.arange(S) <= last[:, None, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("bhs,bhsd->bhd", p / p.sum(-1, keepdims=True), v)


@needs_kernel
@pytest.mark.parametrize("B, H, D, S", [(3, 2, 16, 64), (2, 3, 32, 100), (1, 2, 48, 256), (4, 12, 64, 512)])
def test_decode_attention_matches_numpy_and_reads_only_its_rows_slots(B, H, D, S):
    rng = np.random.default_rng(S)
    q = (2 * rng.standard_normal((B, H, D))).astype(np.float32)
    k, v = rng.standard_normal((B, H, D, S)).astype(np.float32), rng.standard_normal((B, H, S, D)).astype(np.float32)
    last = np.array([0, S - 1, 37, S + 5][:B], np.int32)  # one slot, all of them, a vector's tail, past the end
    attend = jax.jit(cpu_kernels.decode_attention)
    y = np.asarray(attend(q, k, v, last))
    want = decode_attention_numpy(q, k, v, np.minimum(last, S - 1))
    np.testing.assert_allclose(y, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # The same bits for a row alone, and with NaN in the slots it does not see (its own and a longer cache's).
    row = B - 1 if last[B - 1] < S - 1 else 0
    n = min(int(last[row]), S - 1) + 1
    k_nan = np.concatenate([k[row:row + 1], np.full((1, H, D, 64), np.nan, np.float32)], axis=3)
    v_nan = np.concatenate([v[row:row + 1], np.full((1, H, 64, D), np.nan, np.float32)], axis=2)
    k_nan[..., n:], v_nan[:, :, n:] = np.nan, np.nan
    assert np.array_equal(np.asarray(attend(q[row:row + 1], k_nan, v_nan, last[row:row + 1])), y[row:row + 1])


@needs_kernel
def test_decode_attention_names_bad_input():
    q, k, v, last = jnp.zeros((2, 3, 16)), jnp.zeros((2, 3, 16, 8)), jnp.zeros((2, 3, 8, 16)), jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match=r"keys \[B, H, D, S\], values \[B, H, S, D\] and last \[B\]; got "
                                         r"\(2, 3, 16\), \(2, 3, 16, 8\), \(2, 3, 16, 8\) and \(2,\)"):
        cpu_kernels.decode_attention(q, k, k, last)
    with pytest.raises(ValueError, match=r"D in \(16, 32, 48, 64\)"):
        cpu_kernels.decode_attention(q[..., :8], k[:, :, :8], v[..., :8], last)
    with pytest.raises(ValueError, match=r"float32 q, keys and values; got \['float32', 'bfloat16', 'float32'\]"):
        cpu_kernels.decode_attention(q, k.astype(jnp.bfloat16), v, last)


def adamw_by_hand(g, m, v, p, h):
    """optim.fused_update's arithmetic in numpy float32, one operation at a time (IEEE, no fused multiply-add)."""
    scale, b1, c1, b2, c2, bc1, bc2, eps, lr, decay = (np.float32(x) for x in h)
    g = g * scale
    m = b1 * m + c1 * g
    v = b2 * v + c2 * (g * g)
    u = (m / bc1) / (np.sqrt(v / bc2) + eps)
    if decay:
        u = u + decay * p
    return m, v, p - lr * u


@needs_kernel
@pytest.mark.parametrize("shape", [(5,), (3, 17), (12, 768, 31)])  # shorter than a vector, tails, many chunks
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_adamw_kernel_equals_the_update_by_hand_bit_for_bit(shape, decay):
    rng = np.random.default_rng(len(shape))
    g, m, p = (rng.standard_normal(shape, np.float32) for _ in range(3))
    v = rng.random(shape, np.float32) * 0.01
    h = [0.25, 0.9, 1 - 0.9, 0.95, 1 - 0.95, 1 - 0.9**3, 1 - 0.95**3, 1e-8, 3e-4, decay]
    got = jax.jit(cpu_kernels.adamw_update)(*map(jnp.asarray, (g, m, v, p)), jnp.asarray(h, jnp.float32))
    for name, a, b in zip("mvp", got, adamw_by_hand(g, m, v, p, h)):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


@needs_kernel
def test_fused_update_with_the_adamw_kernel_follows_the_xla_update():
    # XLA contracts multiply-adds and divides by multiplying with a reciprocal; the kernel does neither, so the two
    # differ in the last bits of some elements, and only there, over steps with clipping, decay and warmup.
    from gpt2_jax.config import TrainConfig
    from gpt2_jax.optim import fused_update
    from gpt2_jax.training import init_train_state

    cfg = ModelConfig.from_preset("tiny")
    train_cfg = TrainConfig(learning_rate=1e-2, warmup_iters=2, grad_clip=1.0)
    state = init_train_state(cfg, train_cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    runs = {kernel: (state.params, state.opt_state) for kernel in (False, True)}
    for step in range(4):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, np.float32) * 3.0 ** -step),
                             state.params)
        for kernel, (params, opt_state) in runs.items():
            params, opt_state, _ = jax.jit(fused_update, static_argnums=(0, 5))(train_cfg, grads, opt_state,
                                                                              params, 0.5, kernel)
            runs[kernel] = params, opt_state
        for a, b in zip(jax.tree.leaves(runs[False]), jax.tree.leaves(runs[True])):
            # (a moment that nearly cancels, b1 * m + (1 - b1) * g, keeps only its absolute error)
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6, atol=1e-6 * np.abs(a).max())
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(runs[False]), jax.tree.leaves(runs[True])))


@needs_kernel
def test_adamw_kernel_names_bad_input():
    x = jnp.zeros((4,), jnp.float32)
    with pytest.raises(ValueError, match=r"float32 g, m, v, p of one shape; got .*bfloat16"):
        cpu_kernels.adamw_update(x.astype(jnp.bfloat16), x, x, x, jnp.zeros(10))
    with pytest.raises(ValueError, match=r"takes 10 scalars"):
        cpu_kernels.adamw_update(x, x, x, x, jnp.zeros(9))


def compile_kernel_check(compiler: str, march: str, output: Path, *extra: str) -> None:
    command = [compiler, "-O2", f"-march={march}", "-std=c++17", "-w", "-I", jax.ffi.include_dir(), *extra,
               str(KERNEL_CHECK), "-o", str(output)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@needs_kernel
def test_the_standalone_kernel_check_passes_on_this_machine(tmp_path):
    # the program that runs under qemu for ARM, run natively: it must pass where the JAX tests above pass
    compile_kernel_check(shutil.which("c++") or "g++", "native", tmp_path / "kernel_check")
    run = subprocess.run([tmp_path / "kernel_check"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.endswith("all ok\n"), run.stdout


def elf_machine(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[18:20], "little")


@pytest.fixture(scope="module")
def arm_kernel_check(tmp_path_factory):
    """tests/kernel_check.cc, which includes the three kernels' sources, cross-compiled for 64-bit ARM with the
    library's own command (cpu_kernels.compile_command: -O3, -fPIC) made a static program (no ARM libraries needed
    under qemu): one build serves both tests below. (run, program path)."""
    if CROSS_COMPILER is None:
        pytest.skip(NO_CROSS_COMPILER)
    program = tmp_path_factory.mktemp("arm") / "kernel_check"
    command = [arg for arg in cpu_kernels.compile_command([CROSS_COMPILER], program, march="armv8-a")
               if not arg.endswith(".cc")]
    command[command.index("-shared")] = "-static"
    command[command.index("-o"):command.index("-o")] = [str(KERNEL_CHECK)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600), program


def test_the_kernels_compile_for_64_bit_arm(arm_kernel_check):
    run, program = arm_kernel_check
    assert run.returncode == 0, run.stderr[-3000:]
    assert elf_machine(program) == ELF_MACHINE["aarch64"]


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="no qemu-aarch64 (Debian: apt-get install qemu-user)")
def test_the_kernels_compute_right_on_64_bit_arm_under_qemu(arm_kernel_check):
    build, program = arm_kernel_check
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run(["qemu-aarch64", str(program)], capture_output=True, text=True, timeout=300)
    assert run.stdout.startswith("vectors of 4 floats, 32 registers"), run.stdout
    assert run.returncode == 0 and run.stdout.endswith("all ok\n"), run.stdout


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 variants need an x86 compiler")
def test_the_other_x86_vector_width_compiles(tmp_path):
    # one machine builds only its own variant; this builds the other (AVX-512 on an AVX2 CPU, AVX2 on AVX-512)
    cpu = cpu_kernels._cpu_description(cpu_kernels._cpuinfo()).split()
    march = "haswell" if "avx512f" in cpu else "skylake-avx512"
    library = tmp_path / "kernels.so"
    run = subprocess.run(cpu_kernels.compile_command([shutil.which("c++") or "g++"], library, march=march),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert elf_machine(library) == ELF_MACHINE["x86_64"]
