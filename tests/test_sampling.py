"""Generation against independent references: a full forward per step without cache, transformers' generate,
and the exact truncated distributions of top-k / top-p computed by hand in numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from gpt2_jax import cpu_kernels, sampling
from gpt2_jax.config import ModelConfig
from gpt2_jax.model import GPT2, abstract_params, arrange_weights, init_cache
from gpt2_jax.sampling import Sampler, generate, generate_batch, row_key, sample_logits


@functools.lru_cache(maxsize=None)
def tiny(block_size: int = 128):
    cfg = ModelConfig.from_preset("tiny", block_size=block_size)
    return cfg, random_params(cfg)


def random_prompts(lengths, seed=0, vocab=50257):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def full_forward(cfg, params, tokens):
    return GPT2(cfg).apply({"params": params}, tokens)


def uncached_greedy(cfg, params, prompt, n, sliding_window=False):
    """A full forward over the whole context for every new token (no cache), right-padded to block_size so it
    compiles once; with a sliding window, a context past block_size restarts at its last block_size // 2."""
    T, W = cfg.block_size, cfg.block_size // 2
    seq, start = list(prompt), 0
    for _ in range(n):
        if sliding_window and len(seq) - start > T:
            start = len(seq) - W
        context = seq[start:]
        buf = np.zeros((1, T), np.int32)
        buf[0, :len(context)] = context
        seq.append(int(jnp.argmax(full_forward(cfg, params, jnp.asarray(buf))[0, len(context) - 1])))
    return seq[len(prompt):]


# Most tests share these shapes (batch 4, prompts padded to 32, 64 or 20 new tokens) so that they share compilations.
GREEDY_PROMPTS = random_prompts((5, 17, 1, 30))  # across the prompt-length buckets 16 / 32
SAMPLER = Sampler(temperature=0.9, top_k=50, top_p=0.95)


@functools.lru_cache(maxsize=None)
def greedy_batch(stop_tokens=()):
    cfg, params = tiny()
    keys = [row_key(0, i) for i in range(4)]
    return generate_batch(cfg, params, GREEDY_PROMPTS, keys, max_new_tokens=64, sampler=Sampler(0.0),
                          stop_tokens=stop_tokens)


def test_cached_greedy_equals_uncached_for_64_tokens():
    cfg, params = tiny()
    for prompt, row in zip(GREEDY_PROMPTS, greedy_batch()):
        assert row.tokens == uncached_greedy(cfg, params, prompt, 64)


def test_greedy_equals_transformers_generate():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_model import hf_model, params_from_hf

    cfg = ModelConfig.from_preset("tiny")
    model = hf_model(cfg, seed=1)
    params = params_from_hf(model, cfg)
    prompts = random_prompts((7, 12, 3), seed=1)
    ours = generate(cfg, params, prompts, max_new_tokens=40, temperature=0.0, stop_tokens=())
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        assert tokens == ref[0, len(prompt):].tolist()


def test_prompts_that_fill_the_context_equal_transformers_generate():
    """The last new token is never fed back: a block_size-token prompt gets 1 token and block_size - 1 tokens get 2,
    as in transformers, with every cache write inside the cache (a clamped write would change the tokens)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from test_model import hf_model, params_from_hf

    cfg = ModelConfig.from_preset("tiny")  # block_size 64
    model = hf_model(cfg, seed=3)
    params = params_from_hf(model, cfg)
    for lengths, n in (((64, 40), 1), ((63, 10), 2)):
        prompts = random_prompts(lengths, seed=n)
        ours = generate(cfg, params, prompts, max_new_tokens=n, temperature=0.0, stop_tokens=())
        for prompt, tokens in zip(prompts, ours):
            with torch.no_grad():
                ref = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, eos_token_id=None)
            assert tokens == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="prompt 0 has 64 tokens; with max_new_tokens=2 the model reads 65"):
        generate(cfg, params, [list(range(64))], max_new_tokens=2)


def favour_ids_from(cfg, params, n):
    """params whose logits are about 50 at ids >= n and near 0 below, at every position: ln_f outputs its bias b,
    and the head's rows >= n are 50 b / |b|^2 (the lm_head bias, if any, is small noise)."""
    b = params["ln_f"]["bias"]
    ln_f = dict(params["ln_f"], weight=jnp.zeros_like(params["ln_f"]["weight"]))
    if cfg.tie_embeddings:
        return dict(params, ln_f=ln_f, wte=params["wte"].at[n:].set(50 * b / jnp.sum(b * b)))
    head = params["lm_head"]["weight"].at[n:].set(50 * b / jnp.sum(b * b))
    return dict(params, ln_f=ln_f, lm_head=dict(params["lm_head"], weight=head))


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False, lm_head_bias=True)])
def test_restricted_vocabulary_never_samples_ids_the_tokenizer_lacks(overrides):
    from gpt2_jax.tokenizer import get_tokenizer

    n = get_tokenizer().n_vocab  # 50257
    cfg = ModelConfig.from_preset("tiny", vocab_size=50304, **overrides)  # nanoGPT's padded vocabulary
    params = favour_ids_from(cfg, random_params(cfg, seed=11), n)
    small = sampling.restrict_vocab(cfg, n)
    assert (small.vocab_size, small.padded_vocab_size) == (n, 50304)
    assert sampling.restrict_vocab(small, n) == small and sampling.restrict_vocab(cfg, 50304) == cfg
    shapes = [abstract_params(c) for c in (cfg, small)]
    assert jax.tree.map(lambda a: a.shape, shapes[0]) == jax.tree.map(lambda a: a.shape, shapes[1])
    tokens = jnp.asarray(random_prompts((12,), seed=11))
    np.testing.assert_array_equal(full_forward(small, params, tokens), full_forward(cfg, params, tokens)[..., :n])
    prompts = random_prompts((3, 9), seed=11)
    kw = dict(max_new_tokens=8, temperature=1.0, stop_tokens=())
    assert all(t >= n for row in generate(cfg, params, prompts, **kw) for t in row)  # the test has power
    out = generate(small, params, prompts, **kw)
    assert all(0 <= t < n for row in out for t in row) and [len(row) for row in out] == [8, 8]
    assert all(get_tokenizer().decode(row) for row in out)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
    (dict(seed=2**64), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
])
def test_bad_generate_arguments_are_named(kwargs, message):
    cfg, params = tiny()
    with pytest.raises(ValueError, match=message):
        generate(cfg, params, [[1, 2]], max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "prompts is empty"),  # was [] without a word
    ([[1, 2.7]], {}, "prompt 0 has 2.7, not an integer token id"),  # was silently truncated to token 2
    ([[1], "hello"], {}, "prompt 1 must be a list of token ids; got str 'hello'"),
    ([1, 2], {}, "prompt 0 must be a list of token ids; got int 1"),
    ([[1, 2]], dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1; got 2.5"),
    ([[1, 2]], dict(stop_tokens=5), r"stop_tokens must be a sequence of token ids, e.g. \(5,\); got 5"),
])
def test_bad_prompts_are_named(prompts, kwargs, message):
    cfg, params = tiny()
    with pytest.raises(ValueError, match=message):
        generate(cfg, params, prompts, **{"max_new_tokens": 2, **kwargs})


def test_generate_batch_needs_one_key_per_prompt():
    cfg, params = tiny()
    # Too few keys used to be padded with jax.random.key(0): rows silently sharing their randomness.
    for n_keys in (1, 3):
        with pytest.raises(ValueError, match=f"one PRNG key per prompt; got {n_keys} keys for 2 prompts"):
            generate_batch(cfg, params, [[1], [2]], [row_key(0, i) for i in range(n_keys)], max_new_tokens=2,
                           sampler=SAMPLER)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate_batch(cfg, params, [], [], max_new_tokens=2, sampler=SAMPLER)


def test_ragged_batch_rows_equal_their_output_alone():
    cfg, params = tiny()
    for prompt, row in zip(GREEDY_PROMPTS, greedy_batch()):
        assert row.tokens == generate(cfg, params, [prompt], max_new_tokens=64, temperature=0.0, stop_tokens=())[0]


def test_sampled_row_does_not_depend_on_neighbours_or_slot():
    cfg, params = tiny()
    x, a, b, c = random_prompts((20, 17, 30, 25), seed=3)
    kw = dict(max_new_tokens=20, sampler=SAMPLER, stop_tokens=(), batch_size=4)
    key_x = row_key(7, (4, 1))
    first = generate_batch(cfg, params, [x, a, b], [key_x, row_key(7, 0), row_key(7, 1)], **kw)[0]
    second = generate_batch(cfg, params, [c, b, a, x], [row_key(7, 2), row_key(7, 3), row_key(7, 4), key_x], **kw)[3]
    alone = generate_batch(cfg, params, [x], [key_x], **kw)[0]
    assert first.tokens == second.tokens == alone.tokens
    other_seed = generate_batch(cfg, params, [x], [row_key(8, (4, 1))], **kw)[0]
    assert other_seed.tokens != alone.tokens


def draw(logits_V, sampler, n=40_000, seed=0):
    logits_NV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
    keys = jax.random.split(jax.random.key(seed), n)
    tokens = np.asarray(jax.jit(sample_logits, static_argnums=2)(logits_NV, keys, sampler))
    return np.bincount(tokens, minlength=len(logits_V)) / n


def truncated_distribution(logits_V, temperature, top_k, top_p):
    """By hand: softmax(logits / T), keep the top_k, renormalise, keep the smallest prefix reaching top_p."""
    p = np.exp(np.asarray(logits_V, np.float64) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros(len(p), bool)
    keep[order[:top_k or len(p)]] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    mass = 0.0
    for i in order:
        if keep[i] and mass >= top_p:
            keep[i] = False
        mass += q[i]
    return np.where(keep, q, 0.0) / q[keep].sum()


LOGITS = [1.2, -0.3, 2.0, 0.4, -1.5, 0.9, 0.0, 1.6]


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 3, 1.0), (1.0, 0, 0.7), (0.7, 5, 0.6), (1.5, 0, 1.0), (2.0, 6, 0.9),
])
def test_draws_follow_the_renormalised_truncated_distribution(temperature, top_k, top_p):
    expected = truncated_distribution(LOGITS, temperature, top_k, top_p)
    empirical = draw(LOGITS, Sampler(temperature, top_k, top_p))
    assert np.all(empirical[expected == 0] == 0), "a filtered-out token was drawn"
    # Total-variation distance; with 40,000 draws its sampling noise is about 0.005.
    assert 0.5 * np.abs(empirical - expected).sum() < 0.015
    # The threshold has power: the untruncated softmax is far from the truncated one in every filtered case.
    if top_k or top_p < 1:
        assert 0.5 * np.abs(truncated_distribution(LOGITS, temperature, 0, 1.0) - expected).sum() > 0.05


def test_greedy_is_argmax_for_any_key():
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(6, 100)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 6)
    np.testing.assert_array_equal(sample_logits(logits, keys, Sampler(0.0)), np.argmax(np.asarray(logits), -1))
    # top_k=1 is greedy too, whatever the temperature.
    np.testing.assert_array_equal(sample_logits(logits, keys, Sampler(3.0, top_k=1)), np.argmax(logits, -1))
    # A temperature so small that logits / temperature overflows float32 is greedy too, not a NaN draw.
    for sampler in (Sampler(1e-40), Sampler(1e-40, top_k=5), Sampler(1e-40, top_p=0.9)):
        np.testing.assert_array_equal(sample_logits(logits, keys, sampler), np.argmax(np.asarray(logits), -1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=float("inf")), "temperature must be >= 0 .* and finite; got inf"),  # was uniform sampling
    (dict(temperature="0.7"), "temperature must be >= 0 .* and finite; got '0.7'"),
    (dict(top_p="0.9"), r"top_p must be in \(0, 1\] \(1 = off\); got '0.9'"),
])
def test_bad_sampler_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampler(**kwargs)


def test_sample_logits_needs_one_key_per_row():
    logits = jnp.zeros((2, 10))
    keys = jax.random.split(jax.random.key(0), 2)
    # One key for two rows used to broadcast: both rows drew the same uniform number.
    with pytest.raises(ValueError, match=r"logits of shape \(2, 10\) and keys of shape \(1,\)"):
        sample_logits(logits, keys[:1], SAMPLER)
    with pytest.raises(ValueError, match=r"logits \[batch, vocab\]"):
        sample_logits(logits[0], keys[0], SAMPLER)


def test_stop_token_ends_each_row_on_its_own():
    free = greedy_batch()
    stop = free[0].tokens[5]
    stopped = greedy_batch(stop_tokens=(stop,))
    for f, s in zip(free, stopped):
        if stop in f.tokens:
            assert (s.tokens, s.finish_reason) == (f.tokens[:f.tokens.index(stop)], "stop")
        else:
            assert (s.tokens, s.finish_reason) == (f.tokens, "length")
    assert stopped[0].tokens == free[0].tokens[:free[0].tokens.index(stop)]


def test_host_stop_check_leaves_finished_rows_unchanged():
    cfg, params = tiny()
    prompts = random_prompts((18, 23), seed=6)
    keys = [row_key(0, i) for i in range(2)]
    kw = dict(max_new_tokens=20, sampler=SAMPLER, stop_tokens=(), batch_size=4)
    free = generate_batch(cfg, params, prompts, keys, **kw)
    marker = free[0].tokens[9]
    first = free[0].tokens.index(marker)
    checked = generate_batch(cfg, params, prompts, keys, is_finished=lambda t: marker in t, check_every=4, **kw)
    row = checked[0]
    assert row.finish_reason == "stop" and row.tokens == free[0].tokens[:len(row.tokens)]
    assert first < len(row.tokens) <= first + 1 + 4  # stopped at the first check after the marker appeared
    if marker not in free[1].tokens:
        assert (checked[1].tokens, checked[1].finish_reason) == (free[1].tokens, "length")


def test_too_long_is_an_error_unless_sliding_window():
    cfg, params = tiny(block_size=32)
    with pytest.raises(ValueError, match="prompt 1 has 20 tokens; with max_new_tokens=20 the model reads 39, more "
                                         "than block_size 32"):
        generate(cfg, params, [[1, 2], list(range(20))], max_new_tokens=20)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(cfg, params, [[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="token id 99999 outside"):
        generate(cfg, params, [[99999]], max_new_tokens=4)


def test_sliding_window_matches_recomputing_from_the_last_half_block():
    cfg, params = tiny(block_size=32)
    prompts = random_prompts((3, 20, 40, 9), seed=7)  # the 40-token prompt starts already cropped
    out = generate(cfg, params, prompts, max_new_tokens=70, temperature=0.0, stop_tokens=(), sliding_window=True)
    for prompt, tokens in zip(prompts, out):
        assert tokens == uncached_greedy(cfg, params, prompt, 70, sliding_window=True)


def test_1000_mixed_length_prompts_compile_at_most_8_times():
    # A config no other test uses, so no shape is already compiled. block_size 128 keeps it fast; the README's
    # number for block_size 1024 comes from bench/sample.py --compile_count.
    cfg = ModelConfig.from_preset("tiny", n_layer=1, block_size=128)
    params = random_params(cfg, seed=1)
    lengths = np.random.default_rng(8).integers(1, 121, 1000)
    prompts = random_prompts(lengths, seed=8)
    before = sampling.compile_count()
    out = generate(cfg, params, prompts, max_new_tokens=8, temperature=0.0, batch_size=64, stop_tokens=())
    compiles = sampling.compile_count() - before
    assert [len(o) for o in out] == [8] * 1000
    # By hand: one decode program, and one prefill program per power of two that a prompt's first len - 1 tokens
    # (the last token is the decode loop's first), rounded up to a multiple of 16, are written with in binary.
    rounded = {16 * -(-(n - 1) // 16) for n in lengths}
    pieces = {2 ** i for r in rounded for i, bit in enumerate(reversed(f"{r:b}")) if bit == "1"}
    assert compiles == len(pieces) + 1 <= 8


def test_on_token_streams_every_token_in_order_without_recompiling():
    cfg, params = tiny()
    prompts = random_prompts((18, 20), seed=9)
    keys = [row_key(0, 0), row_key(0, 1)]
    kw = dict(max_new_tokens=20, sampler=SAMPLER, stop_tokens=(), batch_size=4)
    for attempt in range(2):  # a new callback each time; the second reuses the first's compilation
        seen = []
        before = sampling.compile_count()
        out = generate_batch(cfg, params, prompts, keys, on_token=lambda t, w: seen.append((t.copy(), w.copy())),
                             **kw)
        # At most one prefill program (both prompts pad to 32) and one decode program, then none.
        assert sampling.compile_count() - before <= (2 if attempt == 0 else 0)
        assert len(seen) == 20
        for b in range(2):
            assert [int(t[b]) for t, w in seen if w[b]] == out[b].tokens


@pytest.mark.parametrize("overrides, tol", [
    (dict(bias=False, qkv_bias=False, pad_vocab_to=64, n_head=4), 1e-5),
    (dict(tie_embeddings=False, lm_head_bias=True, activation="gelu_exact"), 1e-5),
    (dict(dtype="bfloat16", param_dtype="bfloat16"), 0.03),  # measured 0.013 on logits of scale 1.4
])
@pytest.mark.parametrize("layout", [sampling.OUT_IN, sampling.IN_OUT, sampling.PANELS])
def test_decode_step_matches_the_model_token_by_token(overrides, tol, layout):
    # Row 1 runs the same tokens 3 steps behind row 0: each row writes and reads the cache at its own length.
    cfg = ModelConfig.from_preset("tiny", **overrides)
    params = jax.tree.map(lambda a: a.astype(cfg.param_dtype), random_params(cfg, seed=2))
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, cfg.vocab_size, (1, 12)), jnp.int32)
    ref = np.asarray(GPT2(cfg).apply({"params": params}, tokens), np.float32)[0]
    if layout == sampling.PANELS and not cpu_kernels.available():
        pytest.skip(f"no panel kernel here: {cpu_kernels.unavailable_reason()}")
    weights = arrange_weights(cfg, params, layout)
    T, S, lag = tokens.shape[1], 16, 3
    cache = init_cache(cfg, 2, S)
    k, v = cache.k, cache.v
    step = jax.jit(functools.partial(sampling.decode_step, cfg))
    for t in range(T + lag):
        length_B = jnp.asarray([min(t, T - 1), max(t - lag, 0)], jnp.int32)
        logits, k, v = step(weights, tokens[0, length_B], length_B, k, v)
        assert logits.shape == (2, cfg.vocab_size) and logits.dtype == jnp.float32
        if t < T:
            np.testing.assert_allclose(np.asarray(logits[0]), ref[t], atol=tol, rtol=0)
        if t >= lag:
            np.testing.assert_allclose(np.asarray(logits[1]), ref[t - lag], atol=tol, rtol=0)


@pytest.mark.parametrize("kernel", [False, True])
def test_decoding_follows_the_params_it_is_given(kernel, monkeypatch):
    """On CPU decoding reads a copy of the weights kept between calls (the kernel's panels for up to 8 rows, else
    [out, in] for one row and [in, out] for more): new params must never decode with the copy of the old ones,
    nor one layout with another's copy."""
    if kernel and not cpu_kernels.available():
        pytest.skip(f"no panel kernel here: {cpu_kernels.unavailable_reason()}")
    if not kernel:
        monkeypatch.setattr(cpu_kernels, "_state", {"error": "switched off by the test"})
    one_row, several_rows = (sampling.PANELS,) * 2 if kernel else (sampling.OUT_IN, sampling.IN_OUT)
    cfg, first = tiny()
    second = random_params(cfg, seed=5)
    keys = [row_key(0, i) for i in range(4)]
    kw = dict(max_new_tokens=20, sampler=Sampler(0.0), stop_tokens=())
    rows = [generate_batch(cfg, params, GREEDY_PROMPTS, keys, **kw) for params in (first, second, first)]
    alone = [generate_batch(cfg, second, [prompt], [key], **kw)[0] for prompt, key in zip(GREEDY_PROMPTS, keys)]
    assert sampling._WEIGHTS_CACHE[0][1] == one_row  # the last call had one row
    assert [r.tokens for r in rows[1]] == [r.tokens for r in alone]
    assert [r.tokens for r in rows[0]] == [r.tokens for r in rows[2]] != [r.tokens for r in rows[1]]
    assert [r.tokens for r in generate_batch(cfg, second, GREEDY_PROMPTS, keys, **kw)] == [r.tokens for r in alone]
    assert len(sampling._WEIGHTS_CACHE) == 1 and sampling._WEIGHTS_CACHE[0][1] == several_rows


def test_top_k_keeps_the_entries_tied_with_the_kth_as_transformers_does():
    import torch
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    # bfloat16 logits tie often: three entries share the 2nd largest value, two the 5th. top_p values where
    # transformers does not split a tie (its top-p drops tied entries in sort order; ours keeps them all).
    logits = [2.0, 1.0, 1.0, 1.0, 0.5, 0.5, -1.0, 0.0]
    for top_k, top_p in [(2, 1.0), (5, 1.0), (2, 0.4), (5, 0.8)]:
        scores = torch.tensor([logits])
        for warper in [TopKLogitsWarper(top_k)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else []):
            scores = warper(None, scores)
        expected = torch.softmax(scores, -1)[0].numpy()
        empirical = draw(logits, Sampler(1.0, top_k, top_p))
        assert np.all(empirical[expected == 0] == 0), (top_k, top_p)
        assert 0.5 * np.abs(empirical - expected).sum() < 0.015, (top_k, top_p, empirical, expected)
    # top_k=2 keeps 2.0 and all three 1.0s: e / (e**2 + 3e) = 0.175 each (the first 1.0 alone would get 0.27).
    np.testing.assert_allclose(draw(logits, Sampler(1.0, 2))[1:4], np.e / (np.e**2 + 3 * np.e), atol=0.01)


def test_a_row_whose_logits_become_nan_stops_there_and_says_so():
    cfg, params = tiny(block_size=64)
    broken = dict(params, wpe=params["wpe"].at[5].set(jnp.nan))  # any row fed at position 5 gets NaN logits
    prompts = [[464, 3290, 318], [464]]  # fed at positions 2, 3, 4, 5 and 0, 1, 2, 3
    greedy = dict(max_new_tokens=4, sampler=Sampler(0.0), stop_tokens=())
    clean = generate_batch(cfg, params, prompts, [row_key(0, 0), row_key(0, 1)], **greedy)
    for sampler in (Sampler(0.0), SAMPLER):
        done = generate_batch(cfg, broken, prompts, [row_key(0, 0), row_key(0, 1)], **dict(greedy, sampler=sampler))
        assert [c.finish_reason for c in done] == ["nonfinite", "length"]
        assert len(done[0].tokens) == 3 and len(done[1].tokens) == 4
        if sampler.greedy:
            assert done[0].tokens == clean[0].tokens[:3] and done[1].tokens == clean[1].tokens
    with pytest.warns(RuntimeWarning, match=r"NaN or infinite for 1 of 2 prompts \(prompt 0\)"):
        out = generate(cfg, broken, prompts, max_new_tokens=4, temperature=0.0, stop_tokens=())
    assert out == [c.tokens for c in generate_batch(cfg, broken, prompts, [row_key(0, 0), row_key(0, 1)], **greedy)]
