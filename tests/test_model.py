"""The Flax GPT-2 against transformers' GPT2LMHeadModel (torch, fp32) with the same random weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import forward, hf_model, ran_at_full_optimisation
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2, abstract_params, count_params, gelu, init_cache, init_params, output_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def params_from_hf(model, cfg: ModelConfig):
    """Copy a transformers GPT-2's weights into our layout: Conv1D is [in, out], ours is [out, in]."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    L, H, D, C = cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.n_embd

    def stack(suffix, fn=lambda a: a):
        return jnp.asarray(np.stack([fn(sd[f"transformer.h.{i}.{suffix}"]) for i in range(L)]))

    return {
        "wte": jnp.asarray(sd["transformer.wte.weight"]),
        "wpe": jnp.asarray(sd["transformer.wpe.weight"]),
        "ln_f": {"weight": jnp.asarray(sd["transformer.ln_f.weight"]), "bias": jnp.asarray(sd["transformer.ln_f.bias"])},
        "h": {
            "ln_1": {"weight": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
            "ln_2": {"weight": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
            "attn": {
                "c_attn": {"weight": stack("attn.c_attn.weight", lambda w: w.T.reshape(3, H, D, C)),
                           "bias": stack("attn.c_attn.bias", lambda b: b.reshape(3, H, D))},
                "c_proj": {"weight": stack("attn.c_proj.weight", lambda w: w.T.reshape(C, H, D)),
                           "bias": stack("attn.c_proj.bias")},
            },
            "mlp": {
                "c_fc": {"weight": stack("mlp.c_fc.weight", lambda w: w.T), "bias": stack("mlp.c_fc.bias")},
                "c_proj": {"weight": stack("mlp.c_proj.weight", lambda w: w.T), "bias": stack("mlp.c_proj.bias")},
            },
        },
    }


def max_logit_diff(cfg, tokens, seed=0):
    model = hf_model(cfg, seed)
    params = params_from_hf(model, cfg)
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(forward(cfg, params, jnp.asarray(tokens)))
    assert ours.shape == ref.shape and ours.dtype == np.float32
    return float(np.abs(ours - ref).max())


def test_logits_match_transformers_tiny():
    cfg = ModelConfig.from_preset("tiny")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, cfg.block_size))
    assert max_logit_diff(cfg, tokens) <= 1e-5


def test_logits_match_transformers_gpt2_shape():
    cfg = ModelConfig.from_preset("gpt2")
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 24))
    assert max_logit_diff(cfg, tokens) <= 1e-4


def test_gpt2_preset_has_124m_params():
    cfg = ModelConfig.from_preset("gpt2")
    assert count_params(abstract_params(cfg)) == 124_439_808


def test_init_statistics_follow_gpt2():
    cfg = ModelConfig.from_preset("tiny", n_layer=8, n_embd=128)
    p = init_params(cfg, jax.random.PRNGKey(0))
    assert abs(float(jnp.std(p["wte"])) - 0.02) < 1e-3
    assert abs(float(jnp.std(p["h"]["mlp"]["c_fc"]["weight"])) - 0.02) < 1e-3
    resid_std = 0.02 / np.sqrt(2 * cfg.n_layer)
    assert abs(float(jnp.std(p["h"]["mlp"]["c_proj"]["weight"])) - resid_std) < 0.05 * resid_std
    assert abs(float(jnp.std(p["h"]["attn"]["c_proj"]["weight"])) - resid_std) < 0.05 * resid_std
    assert float(jnp.abs(p["h"]["attn"]["c_attn"]["bias"]).max()) == 0.0
    assert bool(jnp.all(p["h"]["ln_1"]["weight"] == 1.0))
    # Each layer draws its own weights.
    assert not np.allclose(p["h"]["mlp"]["c_fc"]["weight"][0], p["h"]["mlp"]["c_fc"]["weight"][1])


def test_erf_gelu_matches_torch_exact_gelu():
    cfg = ModelConfig.from_preset("tiny", activation="gelu_exact")
    model = hf_model(cfg)
    model.config.activation_function = "gelu"
    for block in model.transformer.h:
        block.mlp.act = torch.nn.GELU()
        with torch.no_grad():  # pre-activations of order 1, where the two GELUs differ by up to ~1e-3
            block.mlp.c_fc.weight.mul_(20.0)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours = forward(cfg, params_from_hf(model, cfg), jnp.asarray(tokens))
    err_exact = np.abs(np.asarray(ours) - ref).max()
    assert err_exact <= 1e-5
    tanh_cfg = ModelConfig.from_preset("tiny")
    other = forward(tanh_cfg, params_from_hf(model, cfg), jnp.asarray(tokens))
    assert np.abs(np.asarray(other) - ref).max() > 10 * err_exact


@pytest.mark.parametrize("approximate", [True, False])
def test_gelu_value_and_hand_written_grad_match_torch(approximate):
    x = np.linspace(-9.0, 9.0, 20001, dtype=np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.gelu(tx, approximate="tanh" if approximate else "none")
    ty.backward(torch.ones_like(ty))
    y, vjp = jax.vjp(lambda v: gelu(v, approximate), jnp.asarray(x))
    grad = np.asarray(vjp(jnp.ones_like(y))[0])
    # torch and XLA saturate tanh differently far out: absolute differences of a few fp32 ulps of 1.
    np.testing.assert_allclose(np.asarray(y), ty.detach().numpy(), rtol=1e-6, atol=5e-6)
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-6, atol=5e-6)
    autodiff = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=approximate)))(jnp.asarray(x))
    np.testing.assert_allclose(grad, np.asarray(autodiff), rtol=0, atol=1e-6)


def test_causality():
    cfg = ModelConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 20))
    base = np.asarray(forward(cfg, params, jnp.asarray(tokens)))  # jitted: one compile for the four runs
    for t in (0, 7, 19):
        changed = tokens.copy()
        changed[0, t] = (changed[0, t] + 1) % cfg.vocab_size
        out = np.asarray(forward(cfg, params, jnp.asarray(changed)))
        np.testing.assert_array_equal(out[:, :t], base[:, :t])
        assert np.abs(out[:, t] - base[:, t]).max() > 0


def test_dropout_depends_on_rng_only_when_not_deterministic():
    cfg = ModelConfig.from_preset("tiny", dropout=0.1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 16)))
    model = GPT2(cfg)
    apply = jax.jit(model.apply, static_argnames="deterministic")  # op by op, six calls took 12 s
    a = apply({"params": params}, tokens, deterministic=True)
    b = apply({"params": params}, tokens, deterministic=True)
    np.testing.assert_array_equal(a, b)
    d1 = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    d1_again = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    d2 = apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(d1, d1_again)
    assert np.abs(np.asarray(d1) - np.asarray(d2)).max() > 1e-3
    assert np.abs(np.asarray(d1) - np.asarray(a)).max() > 1e-3
    with pytest.raises(ValueError, match="'dropout' rng"):
        model.apply({"params": params}, tokens, deterministic=False)


def test_padded_vocab_never_exposed():
    cfg = ModelConfig.from_preset("tiny", vocab_size=50257, pad_vocab_to=64)
    assert cfg.padded_vocab_size == 50304
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert params["wte"].shape == (50304, cfg.n_embd)
    logits = GPT2(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
    assert logits.shape == (1, 4, 50257)
    # The padded rows do not change the function: dropping them gives the same logits.
    unpadded = ModelConfig.from_preset("tiny")
    trimmed = dict(params, wte=params["wte"][:50257])
    ref = GPT2(unpadded).apply({"params": trimmed}, jnp.zeros((1, 4), jnp.int32))
    np.testing.assert_allclose(logits, ref, atol=1e-6)


@pytest.mark.parametrize("tokens, message", [
    (np.array([[1, 2, 50257]]), "token id 50257 is outside"),
    (np.array([[-1, 2]]), "token id -1 is outside"),
    (np.zeros((1, 65), np.int32), "sequence length 65 exceeds block_size 64"),
    (np.zeros((1, 4), np.float32), "integer array"),
    (np.zeros((4,), np.int32), r"shape \[batch, time\]"),
])
def test_bad_tokens_raise_before_compute(tokens, message):
    cfg = ModelConfig.from_preset("tiny")
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=message):
        GPT2(cfg).apply({"params": params}, jnp.asarray(tokens))


@pytest.mark.parametrize("kwargs, message", [
    (dict(positions=np.full((2, 4), 64)), r"position id 64 is outside \[0, block_size=64\)"),  # XLA clamped it
    (dict(positions=np.full((2, 4), -1)), r"position id -1 is outside"),
    (dict(positions=np.zeros((2, 4), np.float32)), "positions must be an integer array"),
    (dict(positions=np.zeros((2, 3), np.int32)), r"positions must have shape \[batch, time\] = \(2, 4\); got \(2, 3\)"),
    (dict(attn_mask=np.ones((3, 4), bool)), r"attn_mask must have shape \[batch, time\] = \(2, 4\); got \(3, 4\)"),
    (dict(attn_mask=np.ones((2, 4), bool), cache=(2, 8, 0)),
     r"attn_mask must have shape \[batch, cache length\] = \(2, 8\); got \(2, 4\)"),
    (dict(cache=(3, 8, 0)), r"cache keys and values must be tuples of n_layer=2 arrays: keys \[batch, heads, "
                            r"head_dim, slots\] = \(2, 2, 16, 8\) and values \[batch, heads, slots, head_dim\] = "
                            r"\(2, 2, 8, 16\) for tokens of shape \(2, 4\)"),
    (dict(cache=(2, 8, 6)), "cache overflow: 4 tokens at cache.index 6 do not fit in 8 slots"),  # XLA clamped it
])
def test_bad_positions_masks_and_caches_raise_before_compute(kwargs, message):
    cfg = ModelConfig.from_preset("tiny")
    params = jax.tree.map(jnp.zeros_like, abstract_params(cfg))
    if "cache" in kwargs:
        batch_size, max_len, index = kwargs["cache"]
        kwargs["cache"] = init_cache(cfg, batch_size, max_len).replace(index=jnp.int32(index))
    with pytest.raises(ValueError, match=message):
        GPT2(cfg).apply({"params": params}, jnp.zeros((2, 4), jnp.int32), **kwargs)


@pytest.mark.parametrize("batch_size, max_len, message", [
    (0, 8, "batch_size must be an integer >= 1; got 0"),
    (2, 0, "max_len must be an integer >= 1; got 0"),
    (2, 65, "cache length 65 exceeds block_size 64"),
])
def test_bad_cache_sizes_are_named(batch_size, max_len, message):
    with pytest.raises(ValueError, match=message):
        init_cache(ModelConfig.from_preset("tiny"), batch_size, max_len)


def _dot_precisions(lowered_text: str) -> list[str]:
    """The precision attribute of every dot_general in a lowered StableHLO module ("" where it has none)."""
    lines = [line for line in lowered_text.splitlines() if "stablehlo.dot_general" in line]
    return [line.partition("precision = [")[2].partition("]")[0] for line in lines]


@pytest.mark.parametrize("dtype, matmul_precision, expected, tied", [
    ("float32", "highest", "HIGHEST, HIGHEST", True),  # true float32: on NVIDIA GPUs XLA would otherwise use TF32
    ("float32", "highest", "HIGHEST, HIGHEST", False),
    ("float32", "high", "HIGH, HIGH", True),
    ("float32", "default", "DEFAULT, DEFAULT", True),
    ("bfloat16", "highest", "DEFAULT, DEFAULT", True),  # 16-bit compute keeps XLA's default
])
def test_every_matmul_of_forward_backward_and_decode_carries_the_precision(dtype, matmul_precision, expected, tied):
    from gpt2_jax import sampling
    from gpt2_jax.model import OUT_IN, arrange_weights

    cfg = ModelConfig.from_preset("tiny", dtype=dtype, matmul_precision=matmul_precision, tie_embeddings=tied,
                                  attention="xla")  # (the CPU attention kernel computes in float32 without XLA)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    weights_BTV = jax.random.normal(jax.random.PRNGKey(1), (2, 8, cfg.vocab_size))

    def loss(p):  # no matmul of its own
        return (GPT2(cfg).apply({"params": p}, tokens) * weights_BTV).sum()

    train = _dot_precisions(jax.jit(jax.grad(loss)).lower(params).as_text())
    assert len(train) >= 3 * 6 and set(train) == {expected}  # 6 matmuls a block, forward + 2 backward each
    weights = arrange_weights(cfg, params, OUT_IN)
    cache = init_cache(cfg, 2, 16)
    decode = jax.jit(functools.partial(sampling.decode_step, cfg)).lower(
        weights, tokens[:, 0], jnp.zeros((2,), jnp.int32), cache.k, cache.v)
    precisions = _dot_precisions(decode.as_text())
    assert len(precisions) >= 6 * cfg.n_layer and set(precisions) == {expected}


def test_output_logits_backward_rounds_the_gradient_to_the_compute_dtype():
    # float32 logits for the loss; their gradient rounded to bfloat16 before the two backward matmuls, as a
    # bfloat16 output layer (torch autocast) would have it, so those matmuls run at the 16-bit rate.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((40, 16)) * 0.1, jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    logits, vjp = jax.vjp(lambda x, w: output_logits(x, w, None), x, w)
    dx, dw = vjp(g)
    assert (logits.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    x64, w64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w.astype(jnp.bfloat16)))
    g64 = np.asarray(g.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
    np.testing.assert_allclose(logits, x64 @ w64.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx.astype(jnp.float32)), g64 @ w64, rtol=2**-8, atol=1e-3)
    np.testing.assert_allclose(dw, np.einsum("btv,btc->vc", g64, x64), rtol=1e-5, atol=1e-5)


def test_bf16_train_step_has_no_float32_matmul_over_the_vocabulary():
    # A dot_general of a float32 and a bfloat16 operand is computed in float32; over [B*T, V] that was the
    # logits' backward (float32 cotangent), the two largest matmuls of a GPT-2 step.
    from gpt2_jax.config import TrainConfig
    from gpt2_jax.training import init_train_state, make_train_step

    cfg = ModelConfig.from_preset("tiny", dtype="bfloat16")
    train_cfg = TrainConfig(batch_size=2)
    state = jax.eval_shape(lambda: init_train_state(cfg, train_cfg, jax.random.PRNGKey(0)))
    tokens = jnp.zeros((1, 2, 8), jnp.int32)
    text = jax.jit(make_train_step(cfg, train_cfg)).lower(state, tokens, tokens, jax.random.PRNGKey(1)).as_text()
    operands = [line.rpartition(": (")[2].partition(") ->")[0] for line in text.splitlines()
                if "stablehlo.dot_general" in line]
    assert not [o for o in operands if "f32>" in o and "bf16>" in o]
    vocab = [o for o in operands if f"x{cfg.vocab_size}x" in o or f"<{cfg.vocab_size}x" in o]
    assert len([o for o in vocab if o.count("bf16>") == 2]) == 3, vocab  # forward, d input, d weight


def test_matmul_precision_and_attention_are_checked():
    from gpt2_jax.config import ConfigError

    with pytest.raises(ConfigError, match="matmul_precision must be one of"):
        ModelConfig(matmul_precision="tf32")
    with pytest.raises(ConfigError, match="attention must be one of"):
        ModelConfig(attention="flash")


def test_cudnn_attention_is_chosen_only_where_it_can_run(monkeypatch):
    from gpt2_jax.config import ConfigError
    from gpt2_jax.checks import causal_attention_impl

    bf16 = ModelConfig.from_preset("tiny", dtype="bfloat16", dropout=0.1)
    assert jax.default_backend() == "cpu"
    assert causal_attention_impl(bf16, training=False) == "xla"  # auto, on CPU
    with pytest.raises(ConfigError, match=r"attention='cudnn' cannot run here: it runs on NVIDIA GPUs only"):
        causal_attention_impl(ModelConfig.from_preset("tiny", attention="cudnn"), training=False)
    with pytest.raises(ConfigError, match="cannot run here"):  # raised while tracing, before any compile
        GPT2(ModelConfig.from_preset("tiny", attention="cudnn")).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), int))

    class H100:
        device_kind = "NVIDIA H100 80GB HBM3"

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [H100()])
    assert causal_attention_impl(bf16, training=False) == "cudnn"
    assert causal_attention_impl(bf16, training=True) == "xla"  # attention dropout: only ours has it
    assert causal_attention_impl(ModelConfig.from_preset("tiny", dtype="bfloat16"), training=True) == "cudnn"
    assert causal_attention_impl(ModelConfig.from_preset("tiny"), training=False) == "xla"  # float32
    assert causal_attention_impl(ModelConfig.from_preset("tiny", dtype="bfloat16", attention="xla"), False) == "xla"
    with pytest.raises(ConfigError, match=r"bfloat16 or float16 only \(dtype is float32\)"):
        causal_attention_impl(ModelConfig.from_preset("tiny", attention="cudnn"), training=False)
    wide = ModelConfig.from_preset("tiny", dtype="bfloat16", n_head=1, n_embd=256, attention="cudnn")
    with pytest.raises(ConfigError, match="head size that is a multiple of 8 up to 128"):
        causal_attention_impl(wide, training=False)


def test_pairwise_sum_is_the_sum_and_batch_invariant_parts_sum_each_row_alone(request):
    """pairwise_sum adds halves elementwise (a hand computation for 3 numbers: (a + c) + b), and a batch-invariant
    layer norm and chunked_attention give each row what it gets alone, bitwise, at any number of rows (in programs
    compiled as users' are)."""
    if ran_at_full_optimisation(request):
        return
    from gpt2_jax.attention import chunked_attention, pairwise_sum
    from gpt2_jax.model import layer_norm
    x = np.float32([1e8, 1.0, -1e8])
    assert float(pairwise_sum(jnp.asarray(x))) == float((x[0] + x[2]) + x[1]) == 1.0
    cfg = ModelConfig.from_preset("gpt2")
    rng = np.random.default_rng(0)
    x_B1C = jnp.asarray(rng.normal(size=(16, 1, cfg.n_embd)), jnp.float32)
    w, b = (jnp.asarray(rng.normal(size=cfg.n_embd), jnp.float32) for _ in range(2))
    H, D, S = cfg.n_head, cfg.head_dim, 512
    q = jnp.asarray(rng.normal(size=(16, 1, H, D)), jnp.float32)
    k, v = jnp.asarray(rng.normal(size=(16, H, D, S)), jnp.float32), jnp.asarray(rng.normal(size=(16, H, S, D)),
                                                                                  jnp.float32)
    last = jnp.asarray(rng.integers(1, S, (16, 1)), jnp.int32)
    norm = jax.jit(lambda x: layer_norm(cfg, x, w, b, batch_invariant=True))
    attend = jax.jit(lambda *a: chunked_attention(cfg, *a))
    x64 = np.asarray(x_B1C, np.float64)
    want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + cfg.layer_norm_eps)
    np.testing.assert_allclose(norm(x_B1C), want * np.asarray(w) + np.asarray(b), rtol=1e-5, atol=1e-5)
    alone = [(norm(x_B1C[r:r + 1]), attend(q[r:r + 1], k[r:r + 1], v[r:r + 1], last[r:r + 1])) for r in range(16)]
    for B in (3, 8, 16):
        rows = norm(x_B1C[:B]), attend(q[:B], k[:B], v[:B], last[:B])
        for r in range(B):
            assert all(np.array_equal(got[r:r + 1], ref) for got, ref in zip(rows, alone[r])), (B, r)
    # Against float64 by hand, and the same bits in a longer cache (its other slots hold values no query sees).
    k64, v64, q64 = (np.asarray(a, np.float64) for a in (k, v, q))
    scores = np.einsum("bhd,bhds->bhs", q64[:, 0], k64) / np.sqrt(D)
    scores = np.where(np.arange(S) <= np.asarray(last)[:, :, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("bhs,bhsd->bhd", probs / probs.sum(-1, keepdims=True), v64)
    np.testing.assert_allclose(rows[1][:, 0], want, rtol=1e-5, atol=1e-5)
    longer_k = jnp.concatenate([k, k[::-1]], axis=3)
    longer_v = jnp.concatenate([v, v[::-1]], axis=2)
    assert np.array_equal(attend(q, longer_k, longer_v, last), rows[1])
    # A prefill's 16 queries (one row, slots 0..t visible to query t) see the same in 256 and 768 slots.
    q16, t = jnp.asarray(rng.normal(size=(1, 16, H, D)), jnp.float32), jnp.arange(100, 116)[None]
    short = attend(q16, k[:1, :, :, :256], v[:1, :, :256], t)
    assert np.array_equal(short, attend(q16, longer_k[:1, :, :, :768], longer_v[:1, :, :768], t))
