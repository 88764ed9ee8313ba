"""cpu_kernels: the panel-packed decode matmul against numpy, its packing by hand, and the fallback to XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax import cpu_kernels, sampling
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import init_params
from gpt2_jax.sampling import Sampler, generate_batch, row_key

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason=f"{cpu_kernels.unavailable_reason()}")


def test_pack_panels_by_hand():
    w_KN = np.arange(2 * 50, dtype=np.float32).reshape(2, 50)
    panels = np.asarray(cpu_kernels.pack_panels(jnp.asarray(w_KN)))
    assert panels.shape == (2, 2, 48)  # ceil(50 / 48) panels of [K, 48]
    np.testing.assert_array_equal(panels[0], w_KN[:, :48])
    np.testing.assert_array_equal(panels[1, :, :2], w_KN[:, 48:])
    assert not panels[1, :, 2:].any()  # zero padding past column N


@needs_kernel
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("K, N", [(37, 5), (64, 100), (768, 2304)])
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
        np.testing.assert_allclose(np.asarray(y), (i + 1) * np.asarray(x) @ w, rtol=2e-5, atol=2e-4)


@needs_kernel
def test_panel_matmul_names_bad_shapes():
    with pytest.raises(ValueError, match=r"x \[B <= 8, K\], panels \[P, K, 48\] and n_out <= 48P; got \(9, 4\)"):
        cpu_kernels.panel_matmul(jnp.zeros((9, 4)), jnp.zeros((1, 4, 48)), 48)
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


def test_without_the_kernel_panel_matmul_says_why(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {"error": "disabled by GPT2_JAX_CPU_KERNELS=0"})
    with pytest.raises(RuntimeError, match="the panel kernel cannot run here: disabled by GPT2_JAX_CPU_KERNELS=0"):
        cpu_kernels.panel_matmul(jnp.zeros((2, 4)), jnp.zeros((1, 4, 48)), 48)


def test_a_failed_build_says_why_and_sampling_falls_back_to_xla(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no library built before
    monkeypatch.setenv("CXX", "false --any-flag")  # a compiler (with an argument) that always fails
    if "avx512f" in cpu_kernels._cpu_description(cpu_kernels._cpuinfo()).split():
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
