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
from gpt2_jax.model import GPT2, gelu, init_cache, layer_norm, outside

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

    k: tuple  # per layer [B, H, S, D] keys (the decode layout, see decode_forward)
    v: tuple  # per layer [B, H, S, D] values
    index: jax.Array  # int32 scalar: cache slots filled, the same for every row (left padding aligns them)
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


# ---------------------------------------------------------------- the decode-layout forward
# A decode step reads every weight once per token, so its speed is memory traffic. GPT2.apply runs the blocks
# with lax.scan over weights stacked on L and contracts c_attn [3, H, D, C] / c_proj [C, H, D] over several axes;
# for a one-token step XLA CPU then copies every layer's weight slice (and transposes those two) on every step,
# about three times the bytes of the weights (visible in the compiled HLO). decode_forward computes the same
# function from per-layer 2-D matrices (decode_weights) and a per-layer cache laid out [B, H, S, D], so that
# attention is a plain batched matmul without a transpose. The prompt is still prefilled by GPT2.apply (large
# matmuls, where the stacked layout costs little); tests check decode_forward against GPT2.apply token by token
# and generation against transformers.
#
# Matrix layout on CPU (gpt2 fp32, 2 cores; `python bench/sample.py --layouts`, ms per decode step, B=1 / B=8):
#   [out, in] 18.8 / 52.5, [in, out] 20.6 / 40.0: XLA:CPU's matrix-vector product is faster on [out, in], its
#   GEMM with 8 rows on [in, out]. Slicing the layers out of the stacked params inside the jitted call also copies
#   them on every call (~145 ms at gpt2). So on CPU the per-layer matrices are copied once, [out, in] for batches of
#   one row and transposed to [in, out] for more, and the copy is kept for the next call on the same params and
#   layout (one entry). The transposed copy took generate_batch from 40 to 44 tokens/s at B=1 and from 186 to 199 at
#   B=8 (same-process A/B against rearranging per call); the [out, in] copy for one row, with the block cache writes
#   below, then 48.3 -> 60.9 at B=1 (same-process A/B, best of 8 runs). The cost is a second copy of the block
#   weights while sampling. On GPU/TPU the per-layer [out, in] slices are taken inside the call (no second copy).
#   For up to 8 rows in float32 or bfloat16, where cpu_kernels.panel_matmul builds, every matrix and the output
#   layer are packed in its panels instead (float32, --layouts on an idle machine: 15.7 / 19.0 ms, against 18.1 on
#   [out, in] at B=1 and 40.5 on [in, out] at B=8). Otherwise the output layer reads wte [V, C] as stored.


# Matrix layouts of DecodeWeights: as stored, transposed, or packed for cpu_kernels.panel_matmul.
OUT_IN, IN_OUT, PANELS = "out_in", "in_out", "panels"


@flax.struct.dataclass
class DecodeWeights:
    """The params arranged for decode_forward; matrices in one of the layouts OUT_IN, IN_OUT or PANELS."""

    layers: tuple
    wte: jax.Array
    wpe: jax.Array
    ln_f: tuple
    head: tuple  # (weight [V, C] (or packed [V / 48, C, 48] in PANELS), bias [V] or None)
    layout: str = flax.struct.field(pytree_node=False, default=OUT_IN)


def decode_weights(config: ModelConfig, params, layout: str = OUT_IN) -> DecodeWeights:
    """Per-layer 2-D matrices in the compute dtype: slices and reshapes of the params (inside jit no copy is
    made), or [in, out] transposed or panel-packed copies."""
    if layout not in (OUT_IN, IN_OUT, PANELS):
        raise ValueError(f"layout must be one of {OUT_IN!r}, {IN_OUT!r}, {PANELS!r}; got {layout!r}")
    dt, h, C = config.dtype, params["h"], config.n_embd

    def mat(w, n_out):  # torch layout [*out, *in] -> [out, in] (or [in, out], or its panels)
        w = w.reshape(n_out, -1).astype(dt)
        if layout == OUT_IN:
            return w
        return w.T if layout == IN_OUT else cpu_kernels.pack_panels(w.T)

    def opt(tree, name, i, shape=None):
        if name not in tree:
            return None
        return tree[name][i].reshape(shape or tree[name][i].shape)

    layers = tuple(dict(
        ln_1=(h["ln_1"]["weight"][i], opt(h["ln_1"], "bias", i)),
        ln_2=(h["ln_2"]["weight"][i], opt(h["ln_2"], "bias", i)),
        qkv=(mat(h["attn"]["c_attn"]["weight"][i], 3 * C), opt(h["attn"]["c_attn"], "bias", i, (3 * C,))),
        proj=(mat(h["attn"]["c_proj"]["weight"][i], C), opt(h["attn"]["c_proj"], "bias", i)),
        fc=(mat(h["mlp"]["c_fc"]["weight"][i], 4 * C), opt(h["mlp"]["c_fc"], "bias", i)),
        out=(mat(h["mlp"]["c_proj"]["weight"][i], C), opt(h["mlp"]["c_proj"], "bias", i)),
    ) for i in range(config.n_layer))
    head = params["wte"] if config.tie_embeddings else params["lm_head"]["weight"]
    head_bias = None if config.tie_embeddings else params["lm_head"].get("bias")
    head = cpu_kernels.pack_panels(head.astype(dt).T) if layout == PANELS else head.astype(dt)
    return DecodeWeights(layers=layers, wte=params["wte"], wpe=params["wpe"],
                         ln_f=(params["ln_f"]["weight"], params["ln_f"].get("bias")),
                         head=(head, head_bias), layout=layout)


_copied_weights = jax.jit(decode_weights, static_argnums=(0, 2))
# The last copy made, so that a run over many batches of the same params makes it once:
# (config, layout, the params' leaves, kept alive so that their ids stay theirs, the copy).
_WEIGHTS_CACHE: list[tuple] = []


def _kept_weights(config: ModelConfig, params, batch_size: int) -> DecodeWeights | None:
    """On CPU, the per-layer copy of params for batches of batch_size rows (made once, reused while the params and
    the layout are the same); else None."""
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
    # The kernel runs on one device's memory: params spread over several devices keep XLA's matmuls.
    one_device = all(len(leaf.sharding.device_set) == 1 for leaf in leaves if hasattr(leaf, "sharding"))
    if (batch_size <= cpu_kernels.MAX_ROWS and jnp.dtype(config.dtype) in (jnp.float32, jnp.bfloat16)
            and one_device and cpu_kernels.available()):
        return PANELS
    return OUT_IN if batch_size == 1 else IN_OUT


def _dense(config: ModelConfig, x, weight_bias, layout: str, n_out: int):
    weight, bias = weight_bias
    x = x.astype(config.dtype)
    if layout == PANELS:  # float32 sums, rounded once to the compute dtype
        y = cpu_kernels.panel_matmul(x, weight, n_out).astype(config.dtype)
    else:
        y = (jnp.dot(x, weight, precision=config.precision) if layout == IN_OUT
             else _matmul_nt(x, weight, precision=config.precision))
    return y if bias is None else y + bias.astype(config.dtype)


def _matmul_nt(x_BI, w_OI, **kw):
    """x @ w.T for w stored [out, in]."""
    return jax.lax.dot_general(x_BI, w_OI, (((1,), (1,)), ((), ())), **kw)


def decode_forward(config: ModelConfig, weights: DecodeWeights, token_B, position_B, mask_BS, k: tuple, v: tuple,
                   index):
    """One token per row through the model: float32 logits [B, vocab_size] and the caches with it written at index.

    Same numerics as GPT2.apply with a cache (compute dtype, float32 LayerNorm statistics and attention scores).
    The decode loop itself runs decode_block_forward and writes the caches once per block.
    """
    logits_BV, block_k, block_v = decode_block_forward(config, weights, token_B, position_B, mask_BS, k, v,
                                                       _read_block(k, index, 1), _read_block(v, index, 1),
                                                       index, index)
    return logits_BV, _write_block(k, block_k, index), _write_block(v, block_v, index)


def _read_block(caches: tuple, start, n: int) -> tuple:
    """Slots start..start+n of every layer's cache [B, H, S, D]."""
    return tuple(jax.lax.dynamic_slice_in_dim(c, start, n, axis=2) for c in caches)


def _write_block(caches: tuple, blocks: tuple, start) -> tuple:
    """Every layer's cache with its block written at slot start."""
    return tuple(jax.lax.dynamic_update_slice_in_dim(c, b, start, axis=2) for c, b in zip(caches, blocks))


def decode_block_forward(config: ModelConfig, weights: DecodeWeights, token_B, position_B, mask_BS, k: tuple,
                         v: tuple, block_k: tuple, block_v: tuple, base, index):
    """decode_forward with the caches read-only: attention sees cache slots < base, and slots base.. of the
    block (per layer [B, H, n, D], cache slots base..base+n), whose slot index - base takes the new key and value.
    Returns float32 logits [B, vocab_size] and the updated block."""
    B, H, D = token_B.shape[0], config.n_head, config.head_dim
    x_BC = (jnp.take(weights.wte, token_B, axis=0) + jnp.take(weights.wpe, position_B, axis=0))
    x_BC = x_BC.astype(config.dtype)
    S, n = k[0].shape[2], block_k[0].shape[2]
    visible_B1S = (mask_BS & (jnp.arange(S) < base)[None, :])[:, None, :]
    slot = index - base
    visible_B1N = (jax.lax.dynamic_slice_in_dim(mask_BS, base, n, axis=1) & (jnp.arange(n) <= slot))[:, None, :]
    at_slot_11N1 = (jnp.arange(n) == slot)[None, None, :, None]
    C = config.n_embd
    dense = functools.partial(_dense, config, layout=weights.layout)
    new_k, new_v = [], []
    for layer, k_BHSD, v_BHSD, k_BHND, v_BHND in zip(weights.layers, k, v, block_k, block_v):
        qkv_B3HD = dense(layer_norm(config, x_BC, *layer["ln_1"]), layer["qkv"], n_out=3 * C).reshape(B, 3, H, D)
        # The block is small: a select over its slots rewrites it whole at little cost.
        k_BHND = jnp.where(at_slot_11N1, qkv_B3HD[:, 1, :, None].astype(k_BHND.dtype), k_BHND)
        v_BHND = jnp.where(at_slot_11N1, qkv_B3HD[:, 2, :, None].astype(v_BHND.dtype), v_BHND)
        new_k.append(k_BHND)
        new_v.append(v_BHND)
        y_BC = _attend(config, qkv_B3HD[:, 0], (k_BHSD, v_BHSD, visible_B1S), (k_BHND, v_BHND, visible_B1N))
        x_BC = x_BC + dense(y_BC.reshape(B, H * D), layer["proj"], n_out=C)
        hidden = dense(layer_norm(config, x_BC, *layer["ln_2"]), layer["fc"], n_out=4 * C)
        hidden = gelu(hidden, config.activation == "gelu_tanh")
        x_BC = x_BC + dense(hidden, layer["out"], n_out=C)
    x_BC = layer_norm(config, x_BC, *weights.ln_f)
    head_VC, head_bias = weights.head
    # As GPT2 computes it: float32 accumulation for the tied head, the compute dtype (plus bias) for an untied one.
    # The head is never transposed: [V, C] as stored, or packed in panels.
    head_layout = PANELS if weights.layout == PANELS else OUT_IN
    if not config.tie_embeddings:
        logits_BV = _dense(config, x_BC, (head_VC, head_bias), head_layout, n_out=config.padded_vocab_size)
    elif head_layout == PANELS:  # float32 sums and result
        logits_BV = cpu_kernels.panel_matmul(x_BC, head_VC, config.padded_vocab_size)
    else:
        logits_BV = _matmul_nt(x_BC, head_VC, preferred_element_type=jnp.float32, precision=config.precision)
    return logits_BV[:, :config.vocab_size].astype(jnp.float32), tuple(new_k), tuple(new_v)


def _attend(config: ModelConfig, q_BHD, *parts):
    """softmax(q k^T / sqrt(D)) v over the visible slots of several (keys, values, visible) parts together:
    float32 scores, probabilities in the compute dtype; every row sees at least its newest token."""
    scale = 1.0 / np.sqrt(config.head_dim)
    scores = [jnp.where(visible, scale * jnp.einsum("bhd,bhsd->bhs", q_BHD, k.astype(config.dtype),
                                                    preferred_element_type=jnp.float32, precision=config.precision),
                        -jnp.inf)
              for k, _, visible in parts]
    max_BH1 = functools.reduce(jnp.maximum, [s.max(-1, keepdims=True) for s in scores])
    probs = [jnp.exp(s - max_BH1) for s in scores]
    total_BH1 = sum(p.sum(-1, keepdims=True) for p in probs)
    return sum(jnp.einsum("bhs,bhsd->bhd", (p / total_BH1).astype(config.dtype), v.astype(config.dtype),
                          precision=config.precision)
               for p, (_, v, _) in zip(probs, parts))


# Decode steps per write of the caches. XLA:CPU does not update a loop-carried cache in place while the same
# iteration reads it: dynamic_update_slice got the cache copied (twice per layer per token, even with an
# optimization_barrier ordering the read first), and a select rewrites it whole on every token. So up to
# DECODE_BLOCK tokens go to a small block buffer that attention reads besides the cache, and the cache is written
# once per block. gpt2 fp32, generate_batch, 32-token prompt + 128 tokens, same-process A/B (best of 8 / 6 runs):
# B=1 46.4 -> 48.6 tokens/s, B=8 182.5 -> 181.3 (unchanged).
DECODE_BLOCK = 16


def _decode_block(config: ModelConfig, sampler: Sampler, stop_tokens, weights, running, emit,
                  state: DecodeState) -> DecodeState:
    """Up to DECODE_BLOCK decode steps (while running), then one write of their keys and values into the caches."""
    S = state.k[0].shape[2]
    n = min(DECODE_BLOCK, S)
    base = jnp.minimum(state.index, S - n)  # at the end of the cache the block starts with slots already filled
    k, v = state.k, state.v

    def step(carry):  # feed each row's newest token at its own position and sample the next
        s, block_k, block_v = carry
        logits_BV, block_k, block_v = decode_block_forward(config, weights, s.last_B, s.position_B, s.mask_BS,
                                                           k, v, block_k, block_v, base, s.index)
        s = s.replace(index=s.index + 1, position_B=s.position_B + 1)
        token_B = sample_logits(logits_BV, _step_keys(s), sampler)
        finite_B = jnp.all(jnp.isfinite(logits_BV), axis=-1)
        return emit(_record(s, token_B, finite_B, stop_tokens)), block_k, block_v

    def more(carry):
        return running(carry[0]) & (carry[0].index < base + n)

    state, block_k, block_v = jax.lax.while_loop(
        more, step, (state.replace(k=(), v=()), _read_block(k, base, n), _read_block(v, base, n)))
    return state.replace(k=_write_block(k, block_k, base), v=_write_block(v, block_v, base))


def _prefill(config: ModelConfig, params, state: DecodeState, tokens_BP, mask_BP) -> DecodeState:
    """Fill the cache with left-padded tokens [B, P], all but the last column, whose token the decode loop feeds
    as its first step.

    The P-1 columns go through GPT2.apply in one call whose logits are unused, so XLA drops the [B, P-1, V]
    vocabulary projection.
    """
    B, P = tokens_BP.shape
    S = state.k[0].shape[2]
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0).astype(jnp.int32)
    mask_BS = jnp.concatenate([mask_BP, jnp.ones((B, S - P), bool)], axis=1)
    k, v = state.k, state.v
    if P > 1:
        _, cache = GPT2(config).apply({"params": params}, tokens_BP[:, :-1], positions=positions_BP[:, :-1],
                                      attn_mask=mask_BP[:, :-1], cache=init_cache(config, B, P - 1))
        # Model layout [L, B, P-1, H, D] -> per layer [B, H, S, D]; slots past the index are never attended.
        k = tuple(jax.lax.dynamic_update_slice(k[i], cache.k[i].transpose(0, 2, 1, 3).astype(k[i].dtype),
                                               (0, 0, 0, 0)) for i in range(config.n_layer))
        v = tuple(jax.lax.dynamic_update_slice(v[i], cache.v[i].transpose(0, 2, 1, 3).astype(v[i].dtype),
                                               (0, 0, 0, 0)) for i in range(config.n_layer))
    return state.replace(k=k, v=v, index=jnp.int32(P - 1), mask_BS=mask_BS, last_B=tokens_BP[:, -1],
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
def _run(config: ModelConfig, sampler: Sampler, stop_tokens, stream: bool, params, weights: DecodeWeights | None,
         state: DecodeState, tokens_BP, mask_BP, refill, stop_at) -> DecodeState:
    """If refill, prefill the cache from tokens_BP; then decode in a while_loop until step == stop_at, every row
    is finished, or the cache is full. Prefill and decode share one compilation per (B, P, S, N).

    stream (static): call _stream_tokens on the host with (tokens [B], wrote [B]) after every sampled token.
    weights: a per-layer copy from _kept_weights, or None to decode from the params as stored.
    """
    TRACE_COUNTS["run"] += 1
    S = state.k[0].shape[2]
    if weights is None:
        weights = decode_weights(config, params)

    def emit(s: DecodeState) -> DecodeState:
        if stream:
            jax.debug.callback(_stream_tokens, s.last_B, s.wrote_B, ordered=True)
        return s

    state = jax.lax.cond(refill, lambda s: _prefill(config, params, s, tokens_BP, mask_BP), lambda s: s, state)

    def running(s: DecodeState):
        return (s.step < stop_at) & ~jnp.all(s.done_B) & (s.index < S)

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
        k=tuple(kv[:config.n_layer]), v=tuple(kv[config.n_layer:]), index=zeros(()),
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
        refill = int(state.index) == S and not bool(jnp.all(state.done_B))  # only with a sliding window
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
