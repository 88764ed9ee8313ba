"""Loss, optimizer and train step against PyTorch (transformers GPT2LMHeadModel + torch.optim.AdamW)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.config import ModelConfig, TrainConfig, replace
from gpt2_jax.model import GPT2, init_params
from gpt2_jax.optim import decay_mask, fused_update, lr_at, make_optimizer
from gpt2_jax.training import (cross_entropy, init_train_state, make_eval_step, make_train_step,
                               tied_output_loss)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_model import hf_model, params_from_hf  # noqa: E402  (the same random HF model as the logits tests)

TINY = ModelConfig.from_preset("tiny", vocab_size=4096)  # a small vocab keeps the many steps here cheap


def nanogpt_lr(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's get_lr, written out again in plain Python as the reference for optim.lr_at."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def torch_trainer(model, cfg: TrainConfig):
    """AdamW with nanoGPT's decay groups (ndim >= 2, embeddings per the flag) and the same schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # the tied lm_head is listed once, as transformer.wte.weight
        is_embedding = name in ("transformer.wte.weight", "transformer.wpe.weight")
        wanted = p.dim() >= 2 and (cfg.decay_embeddings or not is_embedding)
        (decay if wanted else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: nanogpt_lr(it, cfg) / cfg.learning_rate)

    def step(x, y):
        logits = model(torch.tensor(np.asarray(x), dtype=torch.long)).logits
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), torch.tensor(np.asarray(y), dtype=torch.long).flatten(), ignore_index=cfg.ignore_index,
            label_smoothing=cfg.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def text_batches(cfg: ModelConfig, n: int, batch: int, seed: int = 0):
    """n (x, y) batches of Shakespeare, y = x shifted by one; the distinct GPT-2 ids are renumbered 0, 1, ..."""
    from gpt2_jax.tokenizer import get_tokenizer

    with open("data/shakespeare/shakespeare.txt", encoding="utf-8") as f:
        gpt2_ids = np.asarray(get_tokenizer().encode(f.read(40_000)))
    _, tokens = np.unique(gpt2_ids, return_inverse=True)
    assert tokens.max() < cfg.vocab_size
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - T - 1, batch)
        window = np.stack([tokens[s: s + T + 1] for s in starts])
        out.append((window[:, :-1], window[:, 1:]))
    return out


def max_rel_err(ours, ref):
    """The largest over leaves of ||ours - ref|| / ||ref|| (a norm: Adam's first steps move parameters whose
    gradient is ~0 by +-lr on rounding noise alone, so a single element says little)."""
    errs = jax.tree.map(lambda a, b: float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)), ours, ref)
    return max(jax.tree.leaves(errs))


def run_ours(params, train_cfg, batches, model_cfg=TINY):
    state = init_train_state(model_cfg, train_cfg, None, params=params)
    step = jax.jit(make_train_step(model_cfg, train_cfg))
    losses = []
    for x, y in batches:
        state, metrics = step(state, jnp.asarray(x)[None], jnp.asarray(y)[None], jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_three_adamw_steps_match_torch(decay_embeddings):
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=2, lr_decay_iters=10, min_lr=1e-4, weight_decay=0.1,
                      grad_clip=0.5, decay_embeddings=decay_embeddings)
    model = hf_model(TINY)
    params0 = params_from_hf(model, TINY)
    batches = text_batches(TINY, 3, 4)
    torch_step = torch_trainer(model, cfg)
    ref_losses = [torch_step(x, y) for x, y in batches]
    state, losses = run_ours(params0, cfg, batches)
    ref = jax.tree.map(np.asarray, params_from_hf(model, TINY))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert max_rel_err(state.params, ref) <= 1e-5
    # The comparison is not vacuous: every leaf moved by far more than the tolerance.
    assert max_rel_err(params0, ref) > 1e-2


def test_thirty_steps_track_torch_loss():
    cfg = TrainConfig(learning_rate=3e-3, warmup_iters=5, lr_decay_iters=30, min_lr=3e-4)
    model = hf_model(TINY, seed=1)
    params0 = params_from_hf(model, TINY)
    batches = text_batches(TINY, 30, 4, seed=1)
    torch_step = torch_trainer(model, cfg)
    ref_losses = np.array([torch_step(x, y) for x, y in batches])
    _, losses = run_ours(params0, cfg, batches)
    assert ref_losses[-1] < ref_losses[0] - 1.0  # it trains
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-4)


def test_label_smoothing_and_ignore_index_reach_the_train_and_eval_steps():
    # The reference trainer's options: smoothing 0.05 and an ignore index, here on a quarter of the targets.
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=1, lr_decay_iters=10, label_smoothing=0.05, ignore_index=-1)
    model = hf_model(TINY, seed=2)
    params0 = params_from_hf(model, TINY)
    batches = [(x, np.where(np.arange(x.shape[1]) % 4 == 3, -1, y)) for x, y in text_batches(TINY, 3, 4, seed=2)]
    x0, y0 = batches[0]
    with torch.no_grad():
        ref_eval = torch.nn.functional.cross_entropy(
            model(torch.tensor(x0, dtype=torch.long)).logits.flatten(0, 1), torch.tensor(y0, dtype=torch.long).flatten(),
            ignore_index=-1, label_smoothing=0.05).item()
    ours_eval = float(jax.jit(make_eval_step(TINY, cfg))(params0, jnp.asarray(x0), jnp.asarray(y0)))
    assert ours_eval == pytest.approx(ref_eval, rel=1e-5)
    plain_eval = float(jax.jit(make_eval_step(TINY, TrainConfig()))(params0, jnp.asarray(x0), jnp.asarray(y0)))
    assert abs(plain_eval - ref_eval) > 1e-2  # without the options the number is another one
    torch_step = torch_trainer(model, cfg)
    ref_losses = [torch_step(x, y) for x, y in batches]
    state, losses = run_ours(params0, cfg, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert max_rel_err(state.params, jax.tree.map(np.asarray, params_from_hf(model, TINY))) <= 1e-5


@pytest.mark.parametrize("schedule, expected", [
    # warmup lr * (step + 1) / (warmup + 1) for steps 0..9, then by hand: linear from 1e-3 at step 10 to 1e-4 at
    # step 110 (step 60: half way, 5.5e-4), flat after; constant stays at 1e-3.
    ("linear", {0: 1e-3 / 11, 9: 1e-3 * 10 / 11, 10: 1e-3, 60: 5.5e-4, 85: 3.25e-4, 110: 1e-4, 500: 1e-4}),
    ("constant", {0: 1e-3 / 11, 9: 1e-3 * 10 / 11, 10: 1e-3, 60: 1e-3, 500: 1e-3}),
    ("cosine", {0: 1e-3 / 11, 10: 1e-3, 60: 5.5e-4, 110: 1e-4, 500: 1e-4}),
])
def test_schedules_by_hand(schedule, expected):
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, lr_schedule=schedule)
    got = {step: float(lr_at(step, cfg)) for step in expected}
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_shorter_than_warmup_is_get_lr(schedule):
    # lr_decay_iters < warmup_iters (e.g. --lr_decay_iters=max_iters in a short run): get_lr goes from warmup
    # straight to min_lr; step warmup_iters must not jump back to the peak learning rate for one step.
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=30, lr_decay_iters=20, lr_schedule=schedule)
    for step in (0, 19, 20, 21, 29, 30, 31, 100):
        assert float(lr_at(step, cfg)) == pytest.approx(nanogpt_lr(step, cfg), rel=1e-6), step


@pytest.mark.parametrize("label_smoothing", [0.0, 0.05])
def test_cross_entropy_and_grad_match_torch(label_smoothing):
    rng = np.random.default_rng(0)
    logits = (3.0 * rng.standard_normal((3, 7, 50))).astype(np.float32)
    labels = rng.integers(0, 50, (3, 7))
    labels[0, 2] = labels[2, 6] = labels[1, 0] = -1  # ignored positions

    def ours(lg):
        return cross_entropy(lg, jnp.asarray(labels), ignore_index=-1, label_smoothing=label_smoothing)

    loss_sum, count = ours(jnp.asarray(logits))
    grad = jax.grad(lambda lg: ours(lg)[0])(jnp.asarray(logits))
    t_logits = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t_logits.flatten(0, 1), torch.tensor(labels).flatten(), ignore_index=-1,
                                            label_smoothing=label_smoothing, reduction="sum")
    ref.backward()
    assert float(count) == 21 - 3
    np.testing.assert_allclose(float(loss_sum), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), t_logits.grad.numpy(), atol=1e-6)
    assert np.all(np.asarray(grad)[0, 2] == 0.0)


@pytest.mark.parametrize("label_smoothing, pad_rows, tokens",
                         [(0.0, 0, 8 * 128), (0.05, 14, 8 * 128), (0.1, 14, 60), (0.05, 14, 2 * 521)])
def test_tied_output_loss_and_its_grads_match_torch(label_smoothing, pad_rows, tokens):
    # The output layer and the loss chunk by chunk (8 chunks of 128 tokens; 60 tokens: one; 1042 tokens: 8 chunks
    # of 131, the last padded with 6 ignored tokens), on a wte with pad_vocab_to's extra rows, which torch's logits
    # do not have: they get no probability and no gradient.
    V, C = 300, 16
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, n_embd=C)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, tokens // 2, C)).astype(np.float32)
    w = (0.3 * rng.standard_normal((V + pad_rows, C))).astype(np.float32)
    labels = rng.integers(0, V, (2, tokens // 2))
    labels[0, 3] = labels[1, -1] = -1  # ignored
    (loss_sum, count), (dx, dw) = jax.value_and_grad(
        lambda x, w: tied_output_loss(x, w, jnp.asarray(labels), cfg, -1, label_smoothing), argnums=(0, 1),
        has_aux=True)(jnp.asarray(x), jnp.asarray(w))
    t_x, t_w = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    ref = torch.nn.functional.cross_entropy((t_x @ t_w[:V].T).flatten(0, 1), torch.tensor(labels).flatten(),
                                            ignore_index=-1, label_smoothing=label_smoothing, reduction="sum")
    ref.backward()
    assert float(count) == tokens - 2
    np.testing.assert_allclose(float(loss_sum), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), t_x.grad.numpy(), atol=1e-5 * np.abs(t_x.grad.numpy()).max())
    np.testing.assert_allclose(np.asarray(dw), t_w.grad.numpy(), atol=1e-5 * np.abs(t_w.grad.numpy()).max())
    assert not np.asarray(dw)[V:].any() and not np.asarray(dx)[0, 3].any()


@pytest.mark.parametrize("tokens, rows", [(60, 60), (1031, 129), (16 * 128 + 1, 129), (64 * 128, 512)])
def test_tied_output_loss_chunks_any_token_count_into_about_128_rows(tokens, rows, monkeypatch):
    # A prime number of tokens (1031) makes 8 chunks of 129, the last padded with an ignored token, not one chunk
    # of the whole logits; past 16 chunks of 128 the chunks grow. Equal logits: every loss is log V.
    from gpt2_jax import training

    chunk_rows, real = [], training._token_losses_fwd
    monkeypatch.setattr(training, "_token_losses_fwd",
                        lambda logits_nV, *args: chunk_rows.append(logits_nV.shape[0]) or real(logits_nV, *args))
    V, C = 50, 8
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, n_embd=C)
    loss_sum, count = tied_output_loss(jnp.ones((1, tokens, C)), jnp.ones((V, C)), jnp.zeros((1, tokens), int), cfg)
    assert set(chunk_rows) == {rows}
    assert float(count) == tokens and float(loss_sum) == pytest.approx(tokens * np.log(V), rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tied_losses_take_any_cotangent_per_token(dtype):
    # tied_output_loss sums the losses (a cotangent of 1 per token); the custom VJP under it takes any, e.g. a
    # per-token weighting, scaling rows of x and of dx rather than the [N, V] gradient it kept.
    from gpt2_jax.training import _tied_losses

    V, C, N = 200, 16, 256
    cfg = ModelConfig.from_preset("tiny", vocab_size=V, n_embd=C, dtype=dtype)
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((N, C)).astype(np.float32), (0.3 * rng.standard_normal((V, C))).astype(np.float32)
    labels, weights = rng.integers(0, V, N), rng.random(N).astype(np.float32)

    def ours(x, w):
        losses = _tied_losses(x.astype(cfg.dtype), w, jnp.asarray(labels), V, -100, 0.0, cfg.precision, 2)
        return jnp.sum(losses * weights)

    dx, dw = jax.grad(ours, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
    t_x, t_w = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    losses = torch.nn.functional.cross_entropy(t_x @ t_w.T, torch.tensor(labels), reduction="none")
    (losses * torch.tensor(weights)).sum().backward()
    tol = 1e-5 if dtype == "float32" else 2e-2  # bfloat16: x, w and the logits' gradient rounded to 8 bits
    for ours_grad, ref in ((dx, t_x.grad.numpy()), (dw, t_w.grad.numpy())):
        np.testing.assert_allclose(np.asarray(ours_grad, np.float32), ref, atol=tol * np.abs(ref).max())


def test_the_models_features_times_wte_are_its_logits():
    cfg = ModelConfig.from_preset("tiny", pad_vocab_to=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.arange(10, dtype=jnp.int32).reshape(2, 5)
    features = GPT2(cfg).apply({"params": params}, tokens, head=False)
    logits = GPT2(cfg).apply({"params": params}, tokens)
    np.testing.assert_allclose(np.asarray(features @ params["wte"][: cfg.vocab_size].T), np.asarray(logits),
                               atol=1e-5)
    untied = replace(cfg, tie_embeddings=False)
    with pytest.raises(ValueError, match="head=False needs tied embeddings"):
        GPT2(untied).apply({"params": init_params(untied, jax.random.PRNGKey(0))}, tokens, head=False)


def test_gradient_accumulation_equals_one_big_batch():
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=0, ignore_index=-100)
    params = init_params(TINY, jax.random.PRNGKey(0))
    (x, y), = text_batches(TINY, 1, 8, seed=2)
    y = y.copy()
    y[1, :40] = -100  # micro-batches count different numbers of tokens: the loss is still the mean over all
    step = jax.jit(make_train_step(TINY, cfg))
    one = init_train_state(TINY, cfg, None, params=params)
    one, m1 = step(one, jnp.asarray(x)[None], jnp.asarray(y)[None], jax.random.PRNGKey(0))
    acc = init_train_state(TINY, cfg, None, params=params)
    acc, m4 = step(acc, jnp.asarray(x).reshape(4, 2, -1), jnp.asarray(y).reshape(4, 2, -1), jax.random.PRNGKey(0))
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    assert max_rel_err(acc.params, jax.tree.map(np.asarray, one.params)) <= 1e-5


def test_decay_mask_never_decays_biases_or_layernorms():
    untied = ModelConfig.from_preset("tiny", tie_embeddings=False, lm_head_bias=True)
    params = init_params(untied, jax.random.PRNGKey(0))
    for flag in (True, False):
        mask = decay_mask(params, decay_embeddings=flag)
        flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
        decayed = sorted(k for k, v in flat.items() if v)
        expected = ["['h']['attn']['c_attn']['weight']", "['h']['attn']['c_proj']['weight']",
                    "['h']['mlp']['c_fc']['weight']", "['h']['mlp']['c_proj']['weight']", "['lm_head']['weight']"]
        if flag:
            expected += ["['wpe']", "['wte']"]
        assert decayed == sorted(expected)


def test_weight_decay_alone_shrinks_only_matrices():
    # With zero gradients Adam's step is 0, so each decayed parameter becomes p * (1 - lr * wd) (a hand computation).
    cfg = TrainConfig(learning_rate=0.5, warmup_iters=0, weight_decay=0.1, decay_embeddings=False, grad_clip=0.0)
    params = init_params(TINY, jax.random.PRNGKey(0))
    opt = make_optimizer(cfg)
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = jax.tree.map(jnp.add, params, updates)
    np.testing.assert_allclose(new["h"]["mlp"]["c_fc"]["weight"], params["h"]["mlp"]["c_fc"]["weight"] * 0.95,
                               rtol=1e-6)
    np.testing.assert_array_equal(new["wte"], params["wte"])
    np.testing.assert_array_equal(new["h"]["ln_1"]["weight"], params["h"]["ln_1"]["weight"])
    np.testing.assert_array_equal(new["h"]["attn"]["c_attn"]["bias"], params["h"]["attn"]["c_attn"]["bias"])


@pytest.mark.parametrize("grad_clip, decay_embeddings", [(1.0, True), (0.0, False)])
def test_fused_update_is_the_optax_chain(grad_clip, decay_embeddings):
    # train_step's one-pass update must be make_optimizer's optax chain: same state layout, same numbers.
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=2, grad_clip=grad_clip, decay_embeddings=decay_embeddings)
    params = init_params(TINY, jax.random.PRNGKey(0))
    opt = make_optimizer(cfg)
    ref_params, ref_state = params, opt.init(params)
    ours_params, ours_state = params, opt.init(params)
    ref_update = jax.jit(lambda g, s, p: opt.update(jax.tree.map(lambda x: x / 8.0, g), s, p))
    ours_update = jax.jit(lambda g, s, p: fused_update(cfg, g, s, p, 1.0 / 8.0))
    for i in range(4):
        sums = jax.tree.map(lambda p: 40.0 * jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
        updates, ref_state = ref_update(sums, ref_state, ref_params)
        ref_params = jax.tree.map(jnp.add, ref_params, updates)
        ours_params, ours_state, norm = ours_update(sums, ours_state, ours_params)
        np.testing.assert_allclose(float(norm), float(optax_norm(sums) / 8.0), rtol=1e-6)
    assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
    assert max_rel_err((ours_params, ours_state), jax.tree.map(np.asarray, (ref_params, ref_state))) <= 1e-6


def test_fused_update_keeps_bf16_state_dtypes():
    # param_dtype=bfloat16: optax.adamw's moments are bfloat16; the update must keep them so (a state that turned
    # float32 after one step no longer fit train.py's compiled step: "Argument types differ" at step 2).
    cfg = TrainConfig(learning_rate=1e-2, warmup_iters=0)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), init_params(TINY, jax.random.PRNGKey(0)))
    state = make_optimizer(cfg).init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    new_params, new_state, _ = jax.jit(lambda g, s, p: fused_update(cfg, g, s, p, 0.5))(grads, state, params)
    dtypes = lambda tree: [leaf.dtype for leaf in jax.tree.leaves(tree)]
    assert dtypes(new_state) == dtypes(state) and dtypes(new_params) == dtypes(params)


def optax_norm(tree):
    return np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree)))


def test_bf16_compute_keeps_fp32_params_and_close_loss():
    cfg = TrainConfig(learning_rate=1e-3, warmup_iters=0)
    params = init_params(TINY, jax.random.PRNGKey(0))
    batches = text_batches(TINY, 3, 4, seed=3)
    _, fp32_losses = run_ours(params, cfg, batches)
    bf16 = replace(TINY, dtype="bfloat16")
    state, bf16_losses = run_ours(params, cfg, batches, model_cfg=bf16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim > 0)
    np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=1e-2)
    assert bf16_losses != fp32_losses  # it did compute in bf16


def test_remat_and_unroll_give_the_same_grads():
    params = init_params(TINY, jax.random.PRNGKey(0))
    (x, y), = text_batches(TINY, 1, 2, seed=4)

    def grads(model_cfg):
        def loss(p):
            logits = GPT2(model_cfg).apply({"params": p}, jnp.asarray(x))
            s, n = cross_entropy(logits, jnp.asarray(y))
            return s / n

        return jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))

    base = grads(TINY)
    assert max_rel_err(grads(replace(TINY, remat=True)), base) <= 1e-6
    assert max_rel_err(grads(replace(TINY, scan_unroll=2)), base) <= 1e-5


def test_blocked_causal_attention_equals_the_masked_path():
    # Without a padding mask the attention skips the keys no query of its half can see; with an all-True
    # attn_mask it takes the general masked path over the full [T, T] scores. Same logits and gradients.
    params = init_params(TINY, jax.random.PRNGKey(1))
    (x, y), = text_batches(TINY, 1, 2, seed=5)
    for T in (TINY.block_size, 37):  # even and odd lengths split differently
        tokens, labels = jnp.asarray(x[:, :T]), jnp.asarray(y[:, :T])

        def loss(p, attn_mask):
            logits = GPT2(TINY).apply({"params": p}, tokens, attn_mask=attn_mask)
            return cross_entropy(logits, labels)[0], logits

        grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, blocked), g_blocked = grad_fn(params, None)
        (_, masked), g_masked = grad_fn(params, jnp.ones(tokens.shape, bool))
        np.testing.assert_allclose(blocked, masked, atol=1e-6, rtol=0)
        assert max_rel_err(g_blocked, jax.tree.map(np.asarray, g_masked)) <= 1e-6
