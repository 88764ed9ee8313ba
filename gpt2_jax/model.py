"""GPT-2 as pure Flax Linen modules.

Parameter layout (names follow Hugging Face's GPT-2 so the key maps stay readable):
  wte [Vp, C]  wpe [T, C]                          ln_f.weight/bias [C]      lm_head.weight [Vp, C] (untied only)
  h.ln_1/ln_2.weight/bias [L, C]
  h.attn.c_attn.weight [L, 3, H, D, C]  .bias [L, 3, H, D]     h.attn.c_proj.weight [L, C, H, D]  .bias [L, C]
  h.mlp.c_fc.weight [L, 4C, C]  .bias [L, 4C]                   h.mlp.c_proj.weight [L, C, 4C]     .bias [L, C]
Matrices are stored [out, in] like torch.nn.Linear, so torch and reference checkpoints map without transposes
(on CPU sampling.py decodes from its own per-layer copy). Blocks are stacked on a leading L axis and run
by lax.scan. Every parameter carries logical axis names (vocab, embed, heads, head_dim, mlp, layers) that
sharding.py maps onto a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import cpu_kernels
from gpt2_jax.config import ConfigError, ModelConfig, is_integer


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for B rows and S slots; `index` is how many slots are filled."""

    k: jax.Array  # [L, B, S, H, D]
    v: jax.Array  # [L, B, S, H, D]
    index: jax.Array  # int32 scalar


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for batch_size rows of up to max_len tokens (max_len <= block_size)."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not is_integer(value, 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if max_len > config.block_size:
        raise ValueError(f"cache length {max_len} exceeds block_size {config.block_size}")
    shape = (config.n_layer, batch_size, max_len, config.n_head, config.head_dim)
    dtype = dtype or config.dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), index=jnp.zeros((), jnp.int32))


# How activations are laid out on a device mesh while a step is traced: set by sharding.with_activation_layout
# (constrain(x, logical_axes) -> x), unset (no constraint) on one device and in plain apply calls.
_ACTIVATION_LAYOUT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("activation_layout",
                                                                                      default=None)


@contextlib.contextmanager
def activation_layout(constrain: Callable):
    """While tracing inside this block, _laid_out(x, *axes) returns constrain(x, axes)."""
    token = _ACTIVATION_LAYOUT.set(constrain)
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def _laid_out(x, *axes: str | None):
    """x with the layout the active activation_layout gives these logical axes; x itself outside one."""
    constrain = _ACTIVATION_LAYOUT.get()
    return x if constrain is None else constrain(x, axes)


def _activation_axes(param_axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
    # An activation is split like the weights only on heads, MLP units and vocabulary (tensor); its embed
    # dimension stays whole, since the rows already use the fsdp axis that splits the weights' embed.
    return tuple(a if a in ("heads", "mlp", "vocab") else None for a in param_axes)


def _normal(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _const(value: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.constant(value), axes)


def layer_norm(config: ModelConfig, x, weight, bias=None):
    """torch.nn.LayerNorm over the last axis: biased variance of (x - mean), computed in float32; the result in
    the compute dtype. LayerNorm below and sampling's decode step both use it."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + config.layer_norm_eps) * weight
    if bias is not None:
        y = y + bias
    return y.astype(config.dtype)


class LayerNorm(nn.Module):
    """layer_norm with its weight (and bias) [C] as parameters."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        c = x.shape[-1]
        weight = self.param("weight", _const(1.0, ("embed",)), (c,), cfg.param_dtype)
        bias = self.param("bias", _const(0.0, ("embed",)), (c,), cfg.param_dtype) if cfg.bias else None
        # Gathered whole (C numbers) before use: their fsdp split would otherwise spread onto the activations.
        return layer_norm(cfg, x, _laid_out(weight, None), None if bias is None else _laid_out(bias, None))


class Linear(nn.Module):
    """y = x @ W.T + b with W stored [*out, *in] (torch layout, possibly with split head axes)."""

    config: ModelConfig
    out_shape: tuple[int, ...]
    out_axes: tuple[str | None, ...]
    in_axes: tuple[str | None, ...]
    std: float = 0.02
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        n_in = len(self.in_axes)
        in_shape = x.shape[x.ndim - n_in:]
        w = self.param("weight", _normal(self.std, self.out_axes + self.in_axes),
                       self.out_shape + in_shape, cfg.param_dtype)
        # Contract the trailing n_in axes of x with the trailing n_in axes of W.
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(len(self.out_shape), w.ndim)))
        y = jax.lax.dot_general(x.astype(cfg.dtype), w.astype(cfg.dtype), (contract, ((), ())),
                                precision=cfg.precision)
        if self.use_bias:
            y = y + self.param("bias", _const(0.0, self.out_axes), self.out_shape, cfg.param_dtype).astype(cfg.dtype)
        return _laid_out(y, "batch", None, *_activation_axes(self.out_axes))


def causal_attention_impl(config: ModelConfig, training: bool) -> str:
    """Which attention runs plain causal self-attention: "cudnn", "cpu_kernel" or "xla" (ModelConfig.attention).

    attention="cudnn" or "cpu_kernel" where that kernel cannot run is a ConfigError that says why; "auto" takes
    the first that can run, else "xla".
    """
    dropout = training and config.dropout > 0
    for impl, blockers in (("cudnn", _cudnn_blockers), ("cpu_kernel", _cpu_kernel_blockers)):
        if config.attention in ("auto", impl):
            reasons = blockers(config, dropout)
            if not reasons:
                return impl
            if config.attention == impl:
                raise ConfigError(f"attention={impl!r} cannot run here: {'; '.join(reasons)}; "
                                  "use attention='auto' or 'xla'")
    return "xla"


def _cudnn_blockers(config: ModelConfig, dropout: bool) -> list[str]:
    reasons = []
    if jax.default_backend() != "gpu" or "nvidia" not in jax.devices()[0].device_kind.lower():
        reasons.append(f"it runs on NVIDIA GPUs only (jax's devices: {jax.devices()[0].device_kind})")
    if config.dtype not in ("bfloat16", "float16"):
        reasons.append(f"it computes in bfloat16 or float16 only (dtype is {config.dtype})")
    if dropout:
        reasons.append(f"it has no attention dropout (dropout is {config.dropout} in training)")
    if config.head_dim % 8 or config.head_dim > 128:
        reasons.append(f"it needs a head size that is a multiple of 8 up to 128 (n_embd / n_head = {config.head_dim})")
    return reasons


def _cpu_kernel_blockers(config: ModelConfig, dropout: bool) -> list[str]:
    reasons = []
    if not cpu_kernels.one_cpu_device():
        reasons.append(f"it runs on one CPU device only (jax has {jax.device_count()} {jax.default_backend()})")
    if config.dtype != "float32":
        reasons.append(f"it computes in float32 only (dtype is {config.dtype})")
    if dropout:
        reasons.append(f"it has no attention dropout (dropout is {config.dropout} in training)")
    if config.head_dim not in cpu_kernels.ATTENTION_HEAD_SIZES:
        reasons.append(f"it needs a head size in {cpu_kernels.ATTENTION_HEAD_SIZES} "
                       f"(n_embd / n_head = {config.head_dim})")
    if not reasons and not cpu_kernels.available():
        reasons.append(cpu_kernels.unavailable_reason())
    return reasons


class CausalSelfAttention(nn.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTC, mask_BTS, layer_cache, cache_index):
        """mask_BTS None means plain causal attention over x's own T tokens (no cache, no padding)."""
        cfg = self.config
        H, D = cfg.n_head, cfg.head_dim
        qkv = Linear(cfg, (3, H, D), (None, "heads", "head_dim"), ("embed",), use_bias=cfg.qkv_bias,
                     name="c_attn")(x_BTC)
        q_BTHD, k_BTHD, v_BTHD = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        dropout = nn.Dropout(cfg.dropout)
        new_cache = None
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            start = (0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k_BTHD.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v_BTHD.astype(v_cache.dtype), start)
            new_cache = (k_cache, v_cache)
            k_BTHD, v_BTHD = k_cache.astype(cfg.dtype), v_cache.astype(cfg.dtype)
        impl = causal_attention_impl(cfg, not self.deterministic) if mask_BTS is None else None
        if impl == "cudnn":
            y_BTHD = jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, is_causal=True, implementation="cudnn")
        elif impl == "cpu_kernel":
            y_BTHD = cpu_kernels.causal_attention(qkv)
        elif mask_BTS is None:
            y_BTHD = self._causal(q_BTHD, k_BTHD, v_BTHD, dropout)
        else:
            y_BTHD = self._attend(q_BTHD, k_BTHD, v_BTHD, mask_BTS[:, None], dropout)
        y_BTHD = _laid_out(y_BTHD, "batch", None, "heads", None)
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        y_BTC = Linear(cfg, (cfg.n_embd,), ("embed",), ("heads", "head_dim"), std=std, use_bias=cfg.bias,
                       name="c_proj")(y_BTHD)
        return y_BTC, new_cache

    def _causal(self, q_BTHD, k_BTHD, v_BTHD, dropout):
        # Queries of the first half never see keys of the second half, so that quarter of the score matrix is
        # not computed: the same numbers with 25% fewer attention FLOPs (gpt2, B=4, T=256, 2 CPU cores:
        # attention forward+backward 41 ms -> 27 ms per layer; more chunks gained nothing there).
        T = q_BTHD.shape[1]
        cuts = (0, T // 2, T) if T >= 2 else (0, T)
        chunks = []
        for t0, t1 in zip(cuts[:-1], cuts[1:]):
            mask_TS = jnp.arange(t0, t1)[:, None] >= jnp.arange(t1)[None, :]
            chunks.append(self._attend(q_BTHD[:, t0:t1], k_BTHD[:, :t1], v_BTHD[:, :t1], mask_TS, dropout))
        return jnp.concatenate(chunks, axis=1)

    def _attend(self, q_BTHD, k_BSHD, v_BSHD, mask, dropout):
        """softmax(q k^T / sqrt(D)) v over the key slots that mask (broadcast to [B, H, T, S]) allows."""
        cfg = self.config
        scores_BHTS = jnp.einsum("bthd,bshd->bhts", q_BTHD, k_BSHD, preferred_element_type=jnp.float32,
                                 precision=cfg.precision)
        scores_BHTS = scores_BHTS * (1.0 / math.sqrt(cfg.head_dim))
        scores_BHTS = jnp.where(mask, scores_BHTS, jnp.finfo(jnp.float32).min)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1)
        probs_BHTS = dropout(probs_BHTS, deterministic=self.deterministic)
        return jnp.einsum("bhts,bshd->bthd", probs_BHTS.astype(cfg.dtype), v_BSHD, precision=cfg.precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def output_logits(x_BTC, w_VC, precision):
    """x @ w.T as float32 logits, w cast to x's dtype. The backward casts the logits' gradient to x's dtype before
    its two matmuls: in 16-bit compute autodiff would hand them the float32 cotangent, making both float32
    matmuls over [B*T, V] (twice the memory traffic, and not the 16-bit GEMM rate)."""
    return _output_logits_fwd(x_BTC, w_VC, precision)[0]


def _output_logits_fwd(x_BTC, w_VC, precision):
    logits_BTV = jnp.einsum("btc,vc->btv", x_BTC, w_VC.astype(x_BTC.dtype), preferred_element_type=jnp.float32,
                            precision=precision)
    return logits_BTV, (x_BTC, w_VC)


def _output_logits_bwd(precision, residuals, g_BTV):
    x_BTC, w_VC = residuals
    g_BTV = g_BTV.astype(x_BTC.dtype)
    dx_BTC = jnp.einsum("btv,vc->btc", g_BTV, w_VC.astype(x_BTC.dtype), precision=precision)
    dw_VC = jnp.einsum("btv,btc->vc", g_BTV, x_BTC, preferred_element_type=jnp.float32, precision=precision)
    return dx_BTC, dw_VC.astype(w_VC.dtype)


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, approximate: bool):
    """jax.nn.gelu whose backward pass keeps only x: autodiff of the tanh form saves four more [B, T, 4C]
    arrays per layer, which lax.scan stacks over all layers (gpt2, B=4, T=256: 5 x 151 MB zero-filled and
    written every step)."""
    return jax.nn.gelu(x, approximate=approximate)


def _gelu_fwd(x, approximate):
    return jax.nn.gelu(x, approximate=approximate), x


def _gelu_bwd(approximate, x, g):
    xf = x.astype(jnp.float32)
    if approximate:  # d/dx 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        t = jnp.tanh(c * (xf + 0.044715 * xf**3))
        d = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * xf * xf)
    else:  # d/dx x Phi(x) = Phi(x) + x phi(x)
        d = 0.5 * (1.0 + jax.lax.erf(xf / math.sqrt(2.0))) + xf * jnp.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi)
    return ((g.astype(jnp.float32) * d).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class MLP(nn.Module):
    config: ModelConfig
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BTC):
        cfg = self.config
        h = Linear(cfg, (4 * cfg.n_embd,), ("mlp",), ("embed",), use_bias=cfg.bias, name="c_fc")(x_BTC)
        h = gelu(h, cfg.activation == "gelu_tanh")
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        h = Linear(cfg, (cfg.n_embd,), ("embed",), ("mlp",), std=std, use_bias=cfg.bias, name="c_proj")(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; the scan carry is the residual stream."""

    config: ModelConfig
    deterministic: bool = True
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x_BTC, layer_cache, mask_BTS, cache_index):
        cfg = self.config
        x_BTC = _laid_out(x_BTC, "batch", None, None)
        a, new_cache = CausalSelfAttention(cfg, self.deterministic, name="attn")(
            LayerNorm(cfg, name="ln_1")(x_BTC), mask_BTS, layer_cache, cache_index)
        x_BTC = x_BTC + nn.Dropout(cfg.dropout)(a, deterministic=self.deterministic)
        x_BTC = _laid_out(x_BTC, "batch", None, None)
        x_BTC = x_BTC + MLP(cfg, self.deterministic, name="mlp")(LayerNorm(cfg, name="ln_2")(x_BTC))
        x_BTC = _laid_out(x_BTC, "batch", None, None)
        return x_BTC, (new_cache, x_BTC if self.return_hidden else None)


class GPT2(nn.Module):
    """GPT-2 language model: tokens [B, T] -> float32 logits [B, T, vocab_size]."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True, positions=None, attn_mask=None,
                 cache: KVCache | None = None, return_hidden: bool = False, head: bool = True):
        """Forward pass.

        positions [B, T]: position ids (default 0..T-1, or cache.index.. with a cache).
        attn_mask [B, S]: which key slots are real tokens (S = T, or the cache length); False = padding.
        cache: a KVCache; the new keys and values are written at cache.index and (logits, cache) is returned.
        return_hidden: also return the residual stream after each block, [L, B, T, C].
        head=False: return the final LayerNorm's output [B, T, C] instead of logits (for a loss that applies the
        output layer itself: training.tied_output_loss); no cache or return_hidden with it.
        Inputs it cannot take raise a ValueError (validate_inputs; values are checked outside jit only).
        """
        cfg = self.config
        validate_inputs(cfg, tokens, positions, attn_mask, cache)
        if not head and (cache is not None or return_hidden):
            raise ValueError("head=False returns the features alone: no cache or return_hidden with it")
        if not head and not cfg.tie_embeddings:  # lm_head's params would not be created (nor trained)
            raise ValueError("head=False needs tied embeddings (the output layer is wte)")
        if not deterministic and cfg.dropout > 0 and not self.has_rng("dropout"):
            raise ValueError("deterministic=False with dropout > 0 needs a 'dropout' rng: "
                             "apply(..., rngs={'dropout': key})")
        B, T = tokens.shape
        start = cache.index if cache is not None else 0
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        mask_BTS = None  # plain causal: the attention builds its own (cheaper, blocked) masks
        if cache is not None or attn_mask is not None:
            S = cache.k.shape[2] if cache is not None else T
            mask_BTS = (start + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
            mask_BTS = jnp.broadcast_to(mask_BTS, (B, T, S))
            if attn_mask is not None:
                mask_BTS = mask_BTS & attn_mask.astype(bool)[:, None, :]

        Vp = cfg.padded_vocab_size
        wte = self.param("wte", _normal(0.02, ("vocab", "embed")), (Vp, cfg.n_embd), cfg.param_dtype)
        wpe = self.param("wpe", _normal(0.02, (None, "embed")), (cfg.block_size, cfg.n_embd), cfg.param_dtype)
        # The lookups read whole rows: wte and wpe are gathered on embed (as the output layer needs wte anyway).
        x_BTC = (jnp.take(_laid_out(wte, "vocab", None), tokens, axis=0)
                 + jnp.take(_laid_out(wpe, None, None), positions, axis=0)).astype(cfg.dtype)
        x_BTC = _laid_out(nn.Dropout(cfg.dropout)(x_BTC, deterministic=deterministic), "batch", None, None)

        block = Block
        if cfg.remat:
            block = nn.remat(Block, prevent_cse=False)
        blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, return_hidden, name="h")
        layer_caches = (cache.k, cache.v) if cache is not None else None
        x_BTC, (new_kv, hidden_LBTC) = blocks(x_BTC, layer_caches, mask_BTS, start)

        x_BTC = LayerNorm(cfg, name="ln_f")(x_BTC)
        if not head:
            return x_BTC
        if cfg.tie_embeddings:
            logits = output_logits(x_BTC, wte, cfg.precision)
        else:
            logits = Linear(cfg, (Vp,), ("vocab",), ("embed",), use_bias=cfg.lm_head_bias, name="lm_head")(x_BTC)
        logits = _laid_out(logits.astype(jnp.float32), "batch", None, "vocab")
        if Vp != cfg.vocab_size:
            logits = logits[..., : cfg.vocab_size]
        out = (logits,)
        if cache is not None:
            out += (KVCache(k=new_kv[0], v=new_kv[1], index=cache.index + T),)
        if return_hidden:
            out += (hidden_LBTC,)
        return out[0] if len(out) == 1 else out


def validate_tokens(tokens, config: ModelConfig, cache: KVCache | None = None) -> None:
    """Raise a ValueError for token arrays the model cannot take (XLA's gather would silently clamp them)."""
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array; got {type(tokens).__name__} of dtype {dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time]; got shape {tuple(tokens.shape)}")
    limit = cache.k.shape[2] if cache is not None else config.block_size
    if tokens.shape[1] > limit:
        what = "the cache length" if cache is not None else "block_size"
        raise ValueError(f"sequence length {tokens.shape[1]} exceeds {what} {limit}")
    values = _values(tokens)
    if values is not None and (bad := outside(values, config.vocab_size)).size:
        raise ValueError(f"token id {int(bad.flat[0])} is outside [0, {config.vocab_size}) "
                         f"({bad.size} such ids)")


def _values(x):
    """x as a numpy array, or None inside jit or vmap, where only its shape is known."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def outside(values: np.ndarray, limit: int) -> np.ndarray:
    """The entries of values outside [0, limit), in order."""
    return values[(values < 0) | (values >= limit)]


def validate_inputs(config: ModelConfig, tokens, positions=None, attn_mask=None, cache: KVCache | None = None):
    """Raise a ValueError for inputs of GPT2.apply that it cannot take: XLA would silently clamp out-of-range
    token ids, position ids and cache writes, and report wrong shapes from deep inside the computation.
    Values are only checked outside jit (shapes always)."""
    validate_tokens(tokens, config, cache)
    B, T = tokens.shape
    if cache is not None:
        expected = (config.n_layer, B, cache.k.shape[2], config.n_head, config.head_dim)
        if tuple(cache.k.shape) != expected or tuple(cache.v.shape) != expected:
            raise ValueError(f"cache keys and values must have shape [layers, batch, slots, heads, head_dim] = "
                             f"{expected} for tokens of shape {(B, T)}; got {tuple(cache.k.shape)} and "
                             f"{tuple(cache.v.shape)}")
        index = _values(cache.index)
        if index is not None and not 0 <= int(index) <= cache.k.shape[2] - T:
            raise ValueError(f"cache overflow: {T} tokens at cache.index {int(index)} do not fit in "
                             f"{cache.k.shape[2]} slots")
    if positions is not None:
        dtype = getattr(positions, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"positions must be an integer array; got {type(positions).__name__} of dtype {dtype}")
        _check_shape("positions", positions, (B, T), "[batch, time]")
        values = _values(positions)
        if values is not None and (bad := outside(values, config.block_size)).size:
            raise ValueError(f"position id {int(bad.flat[0])} is outside [0, block_size={config.block_size})")
    if attn_mask is not None:
        S = cache.k.shape[2] if cache is not None else T
        what = "[batch, cache length]" if cache is not None else "[batch, time]"
        _check_shape("attn_mask", attn_mask, (B, S), what)


def _check_shape(name: str, x, shape: tuple[int, ...], what: str) -> None:
    """x must have shape `shape` or one that broadcasts to it (e.g. [1, T] for every row)."""
    x_shape = tuple(getattr(x, "shape", ()))
    if len(x_shape) != len(shape) or any(a not in (1, b) for a, b in zip(x_shape, shape)):
        raise ValueError(f"{name} must have shape {what} = {shape}; got {x_shape}")


def init_params(config: ModelConfig, rng, batch_size: int = 1):
    """Freshly initialised parameters as a plain pytree (logical-axis boxes removed)."""
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    return nn.unbox(GPT2(config).init(rng, tokens)["params"])


def logical_axes(config: ModelConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs shaped like the params."""
    boxed = jax.eval_shape(lambda: GPT2(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    return nn.get_partition_spec(boxed["params"])


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def abstract_params(config: ModelConfig):
    """The parameters' shapes and dtypes (jax.ShapeDtypeStruct leaves), without allocating them."""
    return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
