"""Text generation: pure sampling functions and a jitted prefill + lax.while_loop decode over a KV cache.

One batch of prompts runs as: left-pad the prompts to a bucketed length P, allocate one KV cache of S slots,
prefill it with the whole prompt in one forward call, then decode inside a single jitted lax.while_loop. Rows
are independent: each has its own PRNG key (from the seed and the row id), its own position ids and padding
mask, and stops on its own. Shapes depend only on (B, P, S, N), which are bucketed, so thousands of prompts
of mixed length compile a handful of times (`compile_count` says how many).

Sliding window (opt-in): a row whose context would grow past block_size tokens restarts from its last
block_size // 2 tokens, with position ids from 0 again (nanoGPT crops to the last block_size tokens at every
step; restarting at half the window recomputes once per block_size // 2 tokens instead). When the shared cache is
full, it is rebuilt in one prefill call from every row's own context (rows not yet at block_size keep theirs
whole), so a row's output never depends on its neighbours' lengths.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
import warnings
from typing import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import cpu_kernels
from gpt2_jax.config import ModelConfig, is_integer, replace, seed_error
from gpt2_jax.model import (GPT2, IN_OUT, OUT_IN, PANELS, KVCache, Weights, arrange_weights, attention,
                            forward_unrolled, init_cache, outside)

EOT_TOKEN = 50256
MIN_PROMPT_BUCKET = 16
# How many compiled functions were traced, by name: jax.jit traces once per compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()


def compile_count() -> int:
    """How many times the prefill and decode functions have been compiled in this process."""
    return sum(TRACE_COUNTS.values())


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is drawn: temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        # An infinite temperature would silently sample uniformly; a string would fail in a comparison below.
        if not isinstance(self.temperature, numbers.Real) or not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite; got {self.temperature!r}")
        if not is_integer(self.top_k, 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off); got {self.top_k!r}")
        if not isinstance(self.top_p, numbers.Real) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off); got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def top_p_filter(logits_BK, top_p: float, weight_BK=None, iterations: int = 32):
    """Keep the smallest set of most probable entries whose probability reaches top_p; the rest become -inf.
    weight_BK: how many entries of the same logit each one stands for (1 if None).

    Without sorting (a full sort of 50,257 logits per row costs more than a decode step on a CPU): bisect for the
    largest probability threshold t whose entries p >= t still hold top_p of the mass. Entries tied with the
    last one kept (to within 2**-32 of the largest probability) are kept with it.
    """
    weight_BK = jnp.ones_like(logits_BK) if weight_BK is None else weight_BK
    mass_BK = jax.nn.softmax(logits_BK + jnp.log(weight_BK), axis=-1)
    probs_BK = mass_BK / weight_BK

    def halve(_, bounds):
        low_B, high_B = bounds
        mid_B = (low_B + high_B) / 2
        enough_B = jnp.sum(jnp.where(probs_BK >= mid_B[:, None], mass_BK, 0.0), axis=-1) >= top_p
        return jnp.where(enough_B, mid_B, low_B), jnp.where(enough_B, high_B, mid_B)

    low_B, _ = jax.lax.fori_loop(0, iterations, halve, (jnp.zeros(probs_BK.shape[:1]), probs_BK.max(axis=-1)))
    return jnp.where(probs_BK >= low_B[:, None], logits_BK, -jnp.inf)


def draw(keys_B, logits_BK):
    """One index per row from softmax(logits) by inverse CDF: one uniform number per row instead of the K Gumbel
    numbers of jax.random.categorical (4x faster for 8 rows of 50,257 on a CPU). -inf entries are never drawn."""
    probs_BK = jax.nn.softmax(logits_BK.astype(jnp.float32), axis=-1)
    cdf_BK = jnp.cumsum(probs_BK, axis=-1)
    u_B = jax.vmap(jax.random.uniform)(keys_B) * cdf_BK[:, -1]
    index_B = jnp.sum(cdf_BK <= u_B[:, None], axis=-1)
    # Rounding can put u at the very top of the CDF: fall back to the last entry that can be drawn.
    K = logits_BK.shape[-1]
    last_B = K - 1 - jnp.argmax((probs_BK > 0)[:, ::-1], axis=-1)
    return jnp.minimum(index_B, last_B).astype(jnp.int32)


def sample_logits(logits_BV, keys_B, sampler: Sampler):
    """One token per row from float logits [B, V] with one PRNG key per row; returns int32 [B].

    Order of the filters (as in transformers): temperature, top-k, top-p, then a draw from the renormalised rest.
    Top-k keeps every entry tied with the k-th largest (as transformers does: bfloat16 logits tie often), and a
    top_k of V or more keeps every entry. Top-p keeps the entries tied with the last one it needs too, where
    transformers keeps those that come first in its sort.
    """
    if logits_BV.ndim != 2 or keys_B.shape[:1] != logits_BV.shape[:1]:
        raise ValueError(f"sample_logits takes logits [batch, vocab] and one PRNG key per row; got logits of shape "
                         f"{tuple(logits_BV.shape)} and keys of shape {tuple(keys_B.shape)}")
    if sampler.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    # Shifted by the row's max first, so that a tiny temperature sends the rest towards -inf, not the max to inf;
    # 1 / temperature is capped at 1e30 (float32 would make it inf, and 0 * inf is NaN): greedy for such values.
    logits_BV = logits_BV.astype(jnp.float32)
    logits_BV = (logits_BV - logits_BV.max(axis=-1, keepdims=True)) * min(1.0 / sampler.temperature, 1e30)
    if sampler.top_k:
        return _sample_top_k(logits_BV, keys_B, sampler)
    if sampler.top_p < 1.0:
        logits_BV = top_p_filter(logits_BV, sampler.top_p)
    return draw(keys_B, logits_BV)


def _sample_top_k(logits_BV, keys_B, sampler: Sampler):
    """sample_logits' top-k path: filters and draws among the k largest only (a draw over all V entries costs
    2-5x more per decode step at 8 rows on a CPU), with the entries beyond them tied with the k-th counted in.

    The tie group of the k-th largest in the top k carries the weight of all its tied entries; a draw that lands
    in it picks one of them uniformly. Without ties this is a plain draw over the top k.
    """
    values_BK, index_BK = jax.lax.top_k(logits_BV, min(sampler.top_k, logits_BV.shape[-1]))
    # The min of the top k, not its last column: indexing that makes XLA:CPU sort every row (70 ms against 1.4).
    kth_B = values_BK.min(axis=-1)
    at_kth_BK = values_BK == kth_B[:, None]
    tied_BV = logits_BV == kth_B[:, None]
    tied_B, in_top_B = jnp.sum(tied_BV, axis=-1), jnp.sum(at_kth_BK, axis=-1)  # in all V, in the top k
    weight_BK = jnp.where(at_kth_BK, (tied_B / in_top_B)[:, None], 1.0)
    if sampler.top_p < 1.0:
        values_BK = top_p_filter(values_BK, sampler.top_p, weight_BK)
    choice_B = draw(keys_B, values_BK + jnp.log(weight_BK))
    token_B = jnp.take_along_axis(index_BK, choice_B[:, None], axis=-1)[:, 0]
    beyond_B = jnp.take_along_axis(at_kth_BK, choice_B[:, None], axis=-1)[:, 0] & (tied_B > in_top_B)

    def pick_tied(token_B):  # the r-th entry tied with the k-th, r uniform (a cumsum over V: only when needed)
        r_B = jax.vmap(lambda key, n: jax.random.randint(jax.random.fold_in(key, 1), (), 0, n))(keys_B, tied_B)
        tied_index_B = jnp.argmax(jnp.cumsum(tied_BV, axis=-1) > r_B[:, None], axis=-1)
        return jnp.where(beyond_B, tied_index_B, token_B)

    return jax.lax.cond(jnp.any(beyond_B), pick_tied, lambda t: t, token_B).astype(jnp.int32)


def restrict_vocab(config: ModelConfig, n_tokens: int) -> ModelConfig:
    """config returning only the first n_tokens logits (the tokenizer's ids), with the same parameter shapes.

    A model with more token ids than its tokenizer (nanoGPT pads GPT-2's 50257 to 50304) must never sample one
    the tokenizer cannot decode. pad_vocab_to = the padded size keeps wte and lm_head at their rows.
    """
    if config.vocab_size <= n_tokens:
        return config
    return replace(config, vocab_size=n_tokens, pad_vocab_to=config.padded_vocab_size)


def row_key(seed: int, row_id: int | Sequence[int]):
    """The PRNG key of one row, from the seed and the row's id (an int or a tuple of ints), never its position."""
    if seed_error(seed):
        raise ValueError(seed_error(seed))
    key = jax.random.key(seed)
    for part in (row_id,) if isinstance(row_id, (int, np.integer)) else row_id:
        key = jax.random.fold_in(key, int(part))
    return key


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries; rows are independent and a finished row is never written again."""

    cache: KVCache  # its index is the same for every row (left padding aligns them)
    mask_BS: jax.Array  # which cache slots hold real tokens (False = left padding)
    last_B: jax.Array  # the newest token of each row, not yet in the cache
    wrote_B: jax.Array  # whether last_B was appended to the row's output (False once finished or on a stop token)
    position_B: jax.Array  # its position id
    tokens_BN: jax.Array  # generated tokens; row b's are tokens_BN[b, :num_tokens_B[b]]
    num_tokens_B: jax.Array
    limit_B: jax.Array  # max new tokens of each row (0 for padding rows)
    done_B: jax.Array
    stopped_B: jax.Array  # finished on a stop token (else on its limit)
    failed_B: jax.Array  # finished because its logits were NaN or infinite (nothing drawn from them is written)
    keys_B: jax.Array
    step: jax.Array  # int32 scalar: tokens sampled so far (the same for every row, finished or not)


def _record(state: DecodeState, token_B, finite_B, stop_tokens: tuple[int, ...]) -> DecodeState:
    """Append a sampled token to every unfinished row whose logits were finite and update which rows are finished."""
    is_stop_B = jnp.isin(token_B, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else jnp.zeros_like(state.done_B)
    failed_B = state.failed_B | (~state.done_B & ~finite_B)
    write_B = ~state.done_B & ~is_stop_B & finite_B
    # Every unfinished row has written exactly `step` tokens before, so its next column is the shared `step`.
    column_B = jnp.where(write_B, token_B, state.tokens_BN[:, state.step])
    num_tokens_B = state.num_tokens_B + write_B
    stopped_B = state.stopped_B | (~state.done_B & is_stop_B & finite_B)
    return state.replace(
        tokens_BN=state.tokens_BN.at[:, state.step].set(column_B),
        num_tokens_B=num_tokens_B,
        stopped_B=stopped_B,
        failed_B=failed_B,
        done_B=state.done_B | stopped_B | failed_B | (num_tokens_B >= state.limit_B),
        last_B=token_B,
        wrote_B=write_B,
        step=state.step + 1,
    )


def _step_keys(state: DecodeState):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys_B, state.step)


# ---------------------------------------------------------------- decoding on model.py's functions
# A decode step reads every weight once per token, so its speed is memory traffic: it runs
# model.forward_unrolled on per-layer 2-D matrices in the layout that reads fastest here (bench/sample.py --layouts).
_copied_weights = jax.jit(arrange_weights, static_argnums=(0, 2))
# The last copy made, so that a run over many batches of the same params makes it once:
# (config, layout, the params' leaves, kept alive so that their ids stay theirs, the copy).
_WEIGHTS_CACHE: list[tuple] = []


def _kept_weights(config: ModelConfig, params, batch_size: int) -> Weights | None:
    """On CPU, the per-layer copy of params for batches of batch_size rows (made once, reused while the params and
    the layout are the same); else None (slices of the params are taken inside the jitted loop)."""
    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree.leaves(params)
    layout = _cpu_layout(config, leaves, batch_size)
    if _WEIGHTS_CACHE:
        cached_config, cached_layout, cached_leaves, weights = _WEIGHTS_CACHE[0]
        if (cached_config, cached_layout) == (config, layout) and len(cached_leaves) == len(leaves) and all(
                a is b for a, b in zip(cached_leaves, leaves)):
            return weights
    _WEIGHTS_CACHE.clear()  # drop the old copy before making the new one
    weights = _copied_weights(config, params, layout)
    _WEIGHTS_CACHE.append((config, layout, leaves, weights))
    return weights


def _cpu_layout(config: ModelConfig, leaves, batch_size: int) -> str:
    # XLA:CPU's matrix-vector product is faster on [out, in], its GEMM with several rows on [in, out]; the panel
    # kernel beats both up to its MAX_ROWS rows. It runs on one device's memory: sharded params keep XLA's matmuls.
    one_device = all(len(leaf.sharding.device_set) == 1 for leaf in leaves if hasattr(leaf, "sharding"))
    if (batch_size <= cpu_kernels.MAX_ROWS and jnp.dtype(config.dtype) in (jnp.float32, jnp.bfloat16)
            and one_device and cpu_kernels.available()):
        return PANELS
    return OUT_IN if batch_size == 1 else IN_OUT


def _read_block(caches: tuple, start, n: int) -> tuple:
    """Slots start..start+n of every layer's cache [B, H, S, D]."""
    return tuple(jax.lax.dynamic_slice_in_dim(c, start, n, axis=2) for c in caches)


def _write_block(caches: tuple, blocks: tuple, start) -> tuple:
    """Every layer's cache with its block written at slot start."""
    return tuple(jax.lax.dynamic_update_slice_in_dim(c, b, start, axis=2) for c, b in zip(caches, blocks))


def decode_step(config: ModelConfig, weights: Weights, token_B, position_B, mask_BS, cache: KVCache,
                block_k: tuple, block_v: tuple, base):
    """One token per row through model.forward_unrolled, the cache read-only: (float32 logits [B, vocab_size],
    block_k, block_v).

    The new key and value go to slot cache.index - base of a block (per layer [B, H, n, D], standing for cache
    slots base..base+n); attention sees the cache's visible slots before base and the block's up to the new one.
    """
    S, n = cache.slots, block_k[0].shape[2]
    slot = cache.index - base
    visible_B11S = (mask_BS & (jnp.arange(S) < base)[None, :])[:, None, None, :]
    visible_B11N = (jax.lax.dynamic_slice_in_dim(mask_BS, base, n, axis=1) & (jnp.arange(n) <= slot))[:, None, None]
    at_slot_11N1 = (jnp.arange(n) == slot)[None, None, :, None]

    def attend(k_BHSD, v_BHSD, k_BHND, v_BHND, qkv_B13HD):
        # The block is small: a select over its slots rewrites it whole at little cost.
        k_BHND = jnp.where(at_slot_11N1, qkv_B13HD[:, 0, 1, :, None].astype(k_BHND.dtype), k_BHND)
        v_BHND = jnp.where(at_slot_11N1, qkv_B13HD[:, 0, 2, :, None].astype(v_BHND.dtype), v_BHND)
        parts = [(k_BHSD, v_BHSD, visible_B11S), (k_BHND, v_BHND, visible_B11N)]
        return attention(config, qkv_B13HD[:, :, 0], parts), (k_BHND, v_BHND)

    attends = [functools.partial(attend, *kv) for kv in zip(cache.k, cache.v, block_k, block_v)]
    logits_B1V, blocks = forward_unrolled(config, weights, token_B[:, None], position_B[:, None], attends)
    return logits_B1V[:, 0], tuple(k for k, _ in blocks), tuple(v for _, v in blocks)


# Decode steps per write of the cache: XLA:CPU copies or rewrites a loop-carried cache that the same iteration
# reads and writes, so up to DECODE_BLOCK new keys and values go to a small block buffer first.
DECODE_BLOCK = 16


def _decode_block(config: ModelConfig, sampler: Sampler, stop_tokens, weights, running, emit,
                  state: DecodeState) -> DecodeState:
    """Up to DECODE_BLOCK decode steps (while running), then one write of their keys and values into the cache."""
    cache = state.cache
    S = cache.slots
    n = min(DECODE_BLOCK, S)
    base = jnp.minimum(cache.index, S - n)  # at the end of the cache the block starts with slots already filled

    def step(carry):  # feed each row's newest token at its own position and sample the next
        s, block_k, block_v = carry
        logits_BV, block_k, block_v = decode_step(config, weights, s.last_B, s.position_B, s.mask_BS,
                                                  cache.replace(index=s.cache.index), block_k, block_v, base)
        s = s.replace(cache=s.cache.replace(index=s.cache.index + 1), position_B=s.position_B + 1)
        token_B = sample_logits(logits_BV, _step_keys(s), sampler)
        finite_B = jnp.all(jnp.isfinite(logits_BV), axis=-1)
        return emit(_record(s, token_B, finite_B, stop_tokens)), block_k, block_v

    def more(carry):
        return running(carry[0]) & (carry[0].cache.index < base + n)

    inner = state.replace(cache=cache.replace(k=(), v=()))  # the cache stays out of the inner loop's carry
    state, block_k, block_v = jax.lax.while_loop(
        more, step, (inner, _read_block(cache.k, base, n), _read_block(cache.v, base, n)))
    return state.replace(cache=state.cache.replace(k=_write_block(cache.k, block_k, base),
                                                   v=_write_block(cache.v, block_v, base)))


def _prefill(config: ModelConfig, params, state: DecodeState, tokens_BP, mask_BP) -> DecodeState:
    """Fill the cache with left-padded tokens [B, P], all but the last column, whose token the decode loop feeds
    as its first step: GPT2.apply writes the P-1 columns into a cache of P-1 slots of the same layout, copied
    into the first slots of the decode cache (its logits are unused, so XLA drops the vocabulary projection)."""
    B, P = tokens_BP.shape
    S = state.cache.slots
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
    mask_BS = jnp.concatenate([mask_BP, jnp.ones((B, S - P), bool)], axis=1)
    cache = state.cache
    if P > 1:
        _, filled = GPT2(config).apply({"params": params}, tokens_BP[:, :-1], positions=positions_BP[:, :-1],
                                       attn_mask=mask_BP[:, :-1], cache=init_cache(config, B, P - 1))
        cache = cache.replace(k=_write_block(cache.k, filled.k, 0), v=_write_block(cache.v, filled.v, 0))
    return state.replace(cache=cache.replace(index=jnp.int32(P - 1)), mask_BS=mask_BS, last_B=tokens_BP[:, -1],
                         position_B=positions_BP[:, -1])


# The host function streaming tokens: the compiled loop calls _stream_tokens, which forwards to whatever
# generate_batch set here, so a new callback per call does not mean a new compilation.
_STREAM_TARGET: list[Callable | None] = [None]


def _stream_tokens(tokens_B, wrote_B) -> None:
    target = _STREAM_TARGET[0]
    if target is not None:
        target(np.asarray(tokens_B), np.asarray(wrote_B))


@functools.partial(jax.jit, static_argnames=("config", "sampler", "stop_tokens", "stream"),
                   donate_argnames=("state",))
def _run(config: ModelConfig, sampler: Sampler, stop_tokens, stream: bool, params, weights: Weights | None,
         state: DecodeState, tokens_BP, mask_BP, refill, stop_at) -> DecodeState:
    """If refill, prefill the cache from tokens_BP; then decode in a while_loop until step == stop_at, every row
    is finished, or the cache is full. Prefill and decode share one compilation per (B, P, S, N).

    stream (static): call _stream_tokens on the host with (tokens [B], wrote [B]) after every sampled token.
    weights: a per-layer copy from _kept_weights, or None to decode from the params as stored.
    """
    TRACE_COUNTS["run"] += 1
    S = state.cache.slots
    if weights is None:
        weights = arrange_weights(config, params)

    def emit(s: DecodeState) -> DecodeState:
        if stream:
            jax.debug.callback(_stream_tokens, s.last_B, s.wrote_B, ordered=True)
        return s

    state = jax.lax.cond(refill, lambda s: _prefill(config, params, s, tokens_BP, mask_BP), lambda s: s, state)

    def running(s: DecodeState):
        return (s.step < stop_at) & ~jnp.all(s.done_B) & (s.cache.index < S)

    block = functools.partial(_decode_block, config, sampler, stop_tokens, weights, running, emit)
    return jax.lax.while_loop(running, block, state)


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    # "stop" (a stop token or stop string), "length" (max_new_tokens) or "nonfinite": the model's logits for the
    # next token were NaN or infinite (float16 overflow, damaged weights); tokens holds those drawn before.
    finish_reason: str


def _bucket(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """The next power of two >= n (at least minimum): few distinct shapes, at most 2x padding."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def batch_shapes(config: ModelConfig, longest_prompt: int, max_new_tokens: int, sliding_window: bool):
    """(P, S): the padded prompt length and cache length of a batch whose longest prompt is longest_prompt."""
    T = config.block_size
    P = min(_bucket(longest_prompt), T)
    if not sliding_window:
        # The last new token is never fed back, so the cache holds P - 1 + max_new_tokens slots. Padding slots are
        # cache slots too: keep that within block_size (check_lengths makes each row fit by itself).
        P = max(longest_prompt, min(P, T + 1 - max_new_tokens))
    return P, min(T, P + max_new_tokens)


def context_length(prompt: Sequence[int], max_new_tokens: int) -> int:
    """Tokens the model reads to generate max_new_tokens after prompt: the last new token is never fed back
    (as in transformers' generate), so a prompt of block_size tokens can still get one."""
    return len(prompt) + max_new_tokens - 1


def check_lengths(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sliding_window: bool) -> None:
    """Raise a ValueError naming the first prompt that is empty, not a list of token ids, or does not fit with
    max_new_tokens."""
    if not is_integer(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or np.ndim(prompt) != 1:
            raise ValueError(f"prompt {i} must be a list of token ids; got {type(prompt).__name__} {prompt!r:.80}")
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. <|endoftext|> = {EOT_TOKEN})")
        # Token ids land in an int32 array: a float or a bool would be silently truncated to an id.
        ids = np.asarray(prompt)
        if ids.dtype.kind not in "iu":  # ints beyond int64 make an object array: the range check below names them
            bad = next((t for t in prompt if not is_integer(t)), None)
            if bad is not None:
                raise ValueError(f"prompt {i} has {bad!r}, not an integer token id")
        bad = outside(ids, config.vocab_size)
        if bad.size:
            raise ValueError(f"prompt {i} has token id {int(bad[0])} outside [0, {config.vocab_size})")
        if not sliding_window and context_length(prompt, max_new_tokens) > config.block_size:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} the model reads "
                f"{context_length(prompt, max_new_tokens)}, more than block_size {config.block_size} "
                "(shorten it, lower max_new_tokens, or ask for a sliding window)")


def _left_pad(rows: Sequence[Sequence[int]], B: int, P: int):
    tokens_BP = np.zeros((B, P), np.int32)
    mask_BP = np.zeros((B, P), bool)
    for b, row in enumerate(rows):
        row = list(row)[-P:]
        if row:
            tokens_BP[b, P - len(row):] = row
            mask_BP[b, P - len(row):] = True
    return tokens_BP, mask_BP


def _empty_state(config: ModelConfig, B: int, S: int, N: int, keys, limits) -> DecodeState:
    # Zeros made by numpy and copied over: 31 jnp.zeros dispatches took ~85 ms per batch (gpt2), and every field
    # needs a buffer of its own because the state is donated.
    def zeros(shape, dtype=np.int32):
        return jax.device_put(np.zeros(shape, dtype))

    kv_shape = (B, config.n_head, S, config.head_dim)
    kv = [zeros(kv_shape, jnp.dtype(config.dtype)) for _ in range(2 * config.n_layer)]
    limit_B = np.asarray(limits, np.int32)
    return DecodeState(
        cache=KVCache(k=tuple(kv[:config.n_layer]), v=tuple(kv[config.n_layer:]), index=zeros(())),
        mask_BS=zeros((B, S), bool), last_B=zeros(B), wrote_B=zeros(B, bool), position_B=zeros(B),
        tokens_BN=zeros((B, N)), num_tokens_B=zeros(B), limit_B=jax.device_put(limit_B),
        done_B=jax.device_put(limit_B == 0), stopped_B=zeros(B, bool), failed_B=zeros(B, bool), keys_B=keys,
        step=zeros(()))


def _contexts(config: ModelConfig, prompts, state: DecodeState | None, starts: list[int]) -> list[list[int]]:
    """What each unfinished row's cache must hold: its tokens since starts[b] (prompt + generated so far).

    A context longer than block_size restarts at its last block_size // 2 tokens (only reachable with a sliding
    window); finished rows get an empty context. The rule looks at the row alone, never at its neighbours.
    """
    T, W = config.block_size, config.block_size // 2
    if state is None:
        generated, done = [[] for _ in prompts], [False] * len(prompts)
    else:
        tokens_BN, num_B, done = (np.asarray(a) for a in (state.tokens_BN, state.num_tokens_B, state.done_B))
        generated = [tokens_BN[b, :num_B[b]].tolist() for b in range(len(prompts))]
    rows = []
    for b, prompt in enumerate(prompts):
        seq = list(prompt) + generated[b]
        if len(seq) - starts[b] > T:
            starts[b] = len(seq) - W
        rows.append([] if done[b] else seq[starts[b]:])
    return rows


def _prompt_arrays(contexts, B: int, P: int):
    tokens_BP, mask_BP = _left_pad(contexts, B, P)
    return jnp.asarray(tokens_BP), jnp.asarray(mask_BP)


def generate_batch(config: ModelConfig, params, prompts: Sequence[Sequence[int]], keys, *, max_new_tokens: int,
                   sampler: Sampler, batch_size: int | None = None, stop_tokens: tuple[int, ...] = (EOT_TOKEN,),
                   sliding_window: bool = False, is_finished: Callable[[list[int]], bool] | None = None,
                   check_every: int = 16, on_token: Callable | None = None) -> list[Completion]:
    """Generate for up to batch_size prompts in one padded batch (extra rows are padding and cost compute only).

    keys: one PRNG key per prompt (see row_key). is_finished: a host-side test on a row's tokens (stop strings),
    run every check_every tokens; a row it accepts is finished and left unchanged. on_token: called on the host
    with (tokens [B], wrote [B]) after every sampled token (for streaming); wrote says which rows took it.
    """
    B = batch_size or len(prompts)
    check_lengths(config, prompts, max_new_tokens, sliding_window)
    if len(prompts) > B:
        raise ValueError(f"generate_batch takes 1 to batch_size={B} prompts; got {len(prompts)}")
    if isinstance(stop_tokens, (int, np.integer)):
        raise ValueError(f"stop_tokens must be a sequence of token ids, e.g. ({stop_tokens},); got {stop_tokens!r}")
    keys = list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"generate_batch takes one PRNG key per prompt; got {len(keys)} keys for "
                         f"{len(prompts)} prompts")
    keys = keys + [jax.random.key(0)] * (B - len(prompts))
    limits = [max_new_tokens] * len(prompts) + [0] * (B - len(prompts))
    run = functools.partial(_run, config, sampler, tuple(int(t) for t in stop_tokens), on_token is not None, params,
                            _kept_weights(config, params, B))
    _STREAM_TARGET[0] = on_token
    try:
        state = _decode_all(config, run, prompts, jnp.stack(keys), limits, max_new_tokens, sliding_window,
                            is_finished, check_every if is_finished is not None else max_new_tokens)
    finally:
        _STREAM_TARGET[0] = None
    tokens_BN, num_B, stopped_B, failed_B = (np.asarray(a) for a in (state.tokens_BN, state.num_tokens_B,
                                                                    state.stopped_B, state.failed_B))
    reasons = np.where(failed_B, "nonfinite", np.where(stopped_B, "stop", "length"))
    return [Completion(tokens_BN[b, :num_B[b]].tolist(), str(reasons[b])) for b in range(len(prompts))]


def _decode_all(config: ModelConfig, run, prompts, keys, limits, N: int, sliding_window: bool, is_finished,
                chunk: int) -> DecodeState:
    """Prefill, then decode chunk tokens per call until every row is finished (host stop checks in between)."""
    B = len(limits)
    starts = [0] * len(prompts)
    contexts = _contexts(config, prompts, None, starts)
    P, S = batch_shapes(config, max(map(len, contexts)), N, sliding_window)
    tokens_BP, mask_BP = _prompt_arrays(contexts, B, P)
    state = run(_empty_state(config, B, S, N, keys, limits), tokens_BP, mask_BP, True, chunk)
    while not bool(jnp.all(state.done_B)):
        if is_finished is not None:
            state = _apply_host_stops(state, is_finished)
        refill = int(state.cache.index) == S and not bool(jnp.all(state.done_B))  # only with a sliding window
        if refill:
            contexts = _contexts(config, prompts, state, starts)
            P = batch_shapes(config, max(map(len, contexts)), N, sliding_window=True)[0]
            tokens_BP, mask_BP = _prompt_arrays(contexts, B, P)
        state = run(state, tokens_BP, mask_BP, refill, state.step + chunk)
    return state


def _apply_host_stops(state: DecodeState, is_finished: Callable[[list[int]], bool]) -> DecodeState:
    """Mark rows that is_finished accepts as finished (stopped), so the loop never writes to them again."""
    tokens_BN, num_B, done_B = (np.asarray(a) for a in (state.tokens_BN, state.num_tokens_B, state.done_B))
    hits = np.array([not done_B[b] and is_finished(tokens_BN[b, :num_B[b]].tolist()) for b in range(len(done_B))])
    if not hits.any():
        return state
    return state.replace(done_B=state.done_B | hits, stopped_B=state.stopped_B | hits)


def generate(model_cfg: ModelConfig, params, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens=(EOT_TOKEN,), batch_size: int = 16, sliding_window: bool = False) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded); row i's randomness comes from (seed, i) only.

    A prompt whose logits became NaN or infinite keeps the tokens drawn before, with a warning naming it
    (generate_batch's Completion.finish_reason says "nonfinite")."""
    sampler = Sampler(temperature, top_k, top_p)
    if not is_integer(batch_size, 1):
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    check_lengths(model_cfg, prompts, max_new_tokens, sliding_window)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    B = min(batch_size, _bucket(len(prompts), minimum=1))
    out: list[list[int]] = [[] for _ in prompts]
    failed: list[int] = []
    for start in range(0, len(order), B):
        ids = order[start:start + B]
        done = generate_batch(model_cfg, params, [prompts[i] for i in ids], [row_key(seed, i) for i in ids],
                              max_new_tokens=max_new_tokens, sampler=sampler, batch_size=B,
                              stop_tokens=stop_tokens, sliding_window=sliding_window)
        for i, completion in zip(ids, done):
            out[i] = completion.tokens
            if completion.finish_reason == "nonfinite":
                failed.append(i)
    if failed:
        warnings.warn(f"the model's logits became NaN or infinite for {len(failed)} of {len(prompts)} prompts "
                      f"(prompt {', '.join(map(str, failed[:5]))}{', ...' if len(failed) > 5 else ''}): their "
                      f"samples stop there (float16 overflow or damaged weights?)", RuntimeWarning, stacklevel=2)
    return out
