"""Attention over a sequence or a KV cache, and the fixed-order sums that keep a row's result its own.

attention() is softmax(q k / sqrt(D)) v over the slots a mask leaves visible; causal_attention (training and
evaluation: XLA, cuDNN or the CPU kernel), cached_attention (GPT2.apply with a KVCache) and masked_attention
(padded batches) call it. chunked_attention is the engine's prefill and decode over per-row cache slots, with every
sum in an order that neither the batch nor the cache's length changes. The cache holds keys [B, H, D, S] and
values [B, H, S, D]. pairwise_sum and pairwise_max reduce in an order that the axis alone fixes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from gpt2_jax import cpu_kernels
from gpt2_jax.checks import causal_attention_impl
from gpt2_jax.config import ModelConfig


def pairwise_sum(x):
    """x summed over its last axis in an order that the axis alone fixes: halves added elementwise, zeros padding
    it to a power of 2. XLA:CPU orders a reduction over the minor axis by the shape of the whole array, so a row's
    jnp.sum can change with the number of rows (a 768-channel layer norm does, between 1 and 8 rows)."""
    return _pairwise(jnp.add, 0.0, x)


def pairwise_max(x):
    """x's maximum over its last axis, as pairwise_sum takes it. The maximum is exact in any order; what this avoids
    is XLA:CPU's reduce: from some size on it runs it with the ops after it in one YNNPACK fusion, whose exp differs
    from XLA's own in the last bit, so that a row's softmax changed with the number of rows."""
    return _pairwise(jnp.maximum, -jnp.inf, x)


def _pairwise(combine, fill, x):
    n = x.shape[-1]
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (1 << (n - 1).bit_length()) - n)], constant_values=fill)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = combine(x[..., :half], x[..., half:])
    return x[..., 0]


def _no_dropout(x):
    return x


def attention(config: ModelConfig, q_BTHD, k_BHDS, v_BHSD, visible, dropout: Callable = _no_dropout):
    """softmax(q k / sqrt(D)) v over the key slots that visible (broadcast to [B, H, T, S]) allows: y [B, T, H, D].
    Float32 scores, probabilities in the compute dtype; a query that sees no slot gets the mean of the values
    instead of NaN (padding rows)."""
    scale = 1.0 / math.sqrt(config.head_dim)
    scores = scale * jnp.einsum("bthd,bhds->bhts", q_BTHD, k_BHDS.astype(config.dtype),
                                preferred_element_type=jnp.float32, precision=config.precision)
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhts,bhsd->bthd", dropout(probs).astype(config.dtype), v_BHSD.astype(config.dtype),
                      precision=config.precision)


ATTENTION_CHUNK = 256  # key slots per matmul of chunked_attention, and the cache's slots come in whole chunks


def chunked_attention(config: ModelConfig, q_BTHD, k_BHDS, v_BHSD, last_BT):
    """attention() over a cache where query t of row b sees slots 0..last_BT[b, t]: y [B, T, H, D].

    Every sum is in an order that neither the batch nor the cache's length changes, so that a row gets what it
    gets alone: q.k sums over the major axis D; each ATTENTION_CHUNK slots are a matmul of their own, their
    softmax sums and maximum pairwise; the chunks are added pairwise (those no query sees add exact zeros). The
    cache is read in place: slicing out only the chunks in use copied them, which took longer than the matmuls.
    """
    B, T, H, D = q_BTHD.shape
    S = v_BHSD.shape[2]
    n = min(ATTENTION_CHUNK, S)
    C = -(-S // n)
    if C * n != S:  # only for a block_size that is not a whole number of chunks
        k_BHDS = jnp.pad(k_BHDS, [(0, 0), (0, 0), (0, 0), (0, C * n - S)])
        v_BHSD = jnp.pad(v_BHSD, [(0, 0), (0, 0), (0, C * n - S), (0, 0)])
    q_BTHD = q_BTHD.astype(config.dtype)
    k_BHDCN = k_BHDS.astype(config.dtype).reshape(B, H, D, C, n)
    v_BHCND = v_BHSD.astype(config.dtype).reshape(B, H, C, n, D)
    dot = functools.partial(jnp.einsum, preferred_element_type=jnp.float32, precision=config.precision)
    scale = 1.0 / math.sqrt(config.head_dim)
    if T == 1:  # a decode step: one matmul over every slot, whose sums over D XLA:CPU orders alike for any S
        scores_BHTCN = dot("bthd,bhdcn->bhtcn", q_BTHD, k_BHDCN)
    else:  # with 16 queries and 768 slots it does not: a matmul per chunk (a prefill's row is small to slice)
        scores_BHTCN = jnp.stack([dot("bthd,bhdn->bhtn", q_BTHD, k_BHDCN[:, :, :, c]) for c in range(C)], axis=3)
    visible_BTCN = (jnp.arange(C * n) <= last_BT[..., None]).reshape(B, T, C, n)
    scores_BHTCN = jnp.where(visible_BTCN[:, None], scale * scores_BHTCN, jnp.finfo(jnp.float32).min)
    max_BHT = pairwise_max(pairwise_max(scores_BHTCN))
    probs_BHTCN = jnp.exp(scores_BHTCN - max_BHT[..., None, None])
    sum_BHT = pairwise_sum(pairwise_sum(probs_BHTCN))
    y_BHCTD = dot("bhtcn,bhcnd->bhctd", probs_BHTCN.astype(config.dtype), v_BHCND)
    y_BHTD = pairwise_sum(y_BHCTD.transpose(0, 1, 3, 4, 2))
    return (y_BHTD / sum_BHT[..., None]).transpose(0, 2, 1, 3).astype(config.dtype)


def keys_last(k_BTHD):
    """Keys as the cache and attention() take them: [B, H, D, T]."""
    return k_BTHD.transpose(0, 2, 3, 1)


def _heads_first(x_BTHD):
    return x_BTHD.transpose(0, 2, 1, 3)


def causal_attention(config: ModelConfig, qkv_BT3HD, training: bool = False, dropout: Callable = _no_dropout):
    """Causal self-attention over qkv's own T tokens (no cache, no padding): y [B, T, H, D]."""
    impl = causal_attention_impl(config, training)
    q_BTHD, k_BTHD, v_BTHD = qkv_BT3HD[:, :, 0], qkv_BT3HD[:, :, 1], qkv_BT3HD[:, :, 2]
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True, implementation="cudnn")
    if impl == "cpu_kernel":
        return cpu_kernels.causal_attention(qkv_BT3HD)
    # Queries of the first half never see keys of the second half: that quarter of the scores is not computed.
    k_BHDT, v_BHTD = keys_last(k_BTHD), _heads_first(v_BTHD)
    T = q_BTHD.shape[1]
    cuts = (0, T // 2, T) if T >= 2 else (0, T)
    chunks = []
    for t0, t1 in zip(cuts[:-1], cuts[1:]):
        visible_TS = jnp.arange(t0, t1)[:, None] >= jnp.arange(t1)[None, :]
        chunks.append(attention(config, q_BTHD[:, t0:t1], k_BHDT[..., :t1], v_BHTD[:, :, :t1], visible_TS, dropout))
    return jnp.concatenate(chunks, axis=1)


def cached_attention(config: ModelConfig, qkv_BT3HD, k_BHDS, v_BHSD, index, visible_BTS,
                     dropout: Callable = _no_dropout):
    """Write qkv's keys and values into one layer's cache at slot index, then attend over its visible slots:
    (y [B, T, H, D], (k, v) of the cache)."""
    k_BHDS = jax.lax.dynamic_update_slice(k_BHDS, keys_last(qkv_BT3HD[:, :, 1]).astype(k_BHDS.dtype),
                                          (0, 0, 0, index))
    v_BHSD = jax.lax.dynamic_update_slice(v_BHSD, _heads_first(qkv_BT3HD[:, :, 2]).astype(v_BHSD.dtype),
                                          (0, 0, index, 0))
    y_BTHD = attention(config, qkv_BT3HD[:, :, 0], k_BHDS, v_BHSD, visible_BTS[:, None], dropout)
    return y_BTHD, (k_BHDS, v_BHSD)


def masked_attention(config: ModelConfig, qkv_BT3HD, visible_BTS, dropout: Callable = _no_dropout):
    """Self-attention over qkv's own T tokens where visible_BTS allows: y [B, T, H, D]."""
    return attention(config, qkv_BT3HD[:, :, 0], keys_last(qkv_BT3HD[:, :, 1]), _heads_first(qkv_BT3HD[:, :, 2]),
                     visible_BTS[:, None], dropout)
