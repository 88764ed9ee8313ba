"""GPT-2's arithmetic as plain functions, and the Flax Linen GPT2 built from them.

Parameter layout (names follow Hugging Face's GPT-2 so the key maps stay readable):
  wte [Vp, C]  wpe [T, C]                          ln_f.weight/bias [C]      lm_head.weight [Vp, C] (untied only)
  h.ln_1/ln_2.weight/bias [L, C]
  h.attn.c_attn.weight [L, 3, H, D, C]  .bias [L, 3, H, D]     h.attn.c_proj.weight [L, C, H, D]  .bias [L, C]
  h.mlp.c_fc.weight [L, 4C, C]  .bias [L, 4C]                   h.mlp.c_proj.weight [L, C, 4C]     .bias [L, C]
Matrices are stored [out, in] like torch.nn.Linear, so torch and reference checkpoints map without transposes.
Blocks are stacked on a leading L axis and run by lax.scan. Every parameter carries logical axis names (vocab,
embed, heads, head_dim, mlp, layers) that sharding.py maps onto a mesh.

embed, block (attention and mlp inside), layer_norm and head_logits are the model; GPT2.apply (training,
evaluation, prefill) and forward_unrolled (sampling's decode step) both call them. What differs between them is
only how each weight matrix is stored and multiplied: a Matrix, as stored, transposed or packed in the CPU
kernel's panels.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import cpu_kernels
from gpt2_jax.config import ModelConfig, is_integer
from gpt2_jax.attention import _no_dropout, cached_attention, causal_attention, masked_attention, pairwise_sum
from gpt2_jax.checks import validate_inputs


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for B rows and S slots; `index` is how many slots are filled.

    One array per layer: a decode step reads each layer's cache as a whole operand (a slice of a stacked [L, ...]
    array would be copied on every step). Keys are [B, H, D, S], slots last, so that q.k sums over a major axis
    as p.v does: XLA:CPU then sums each score in one order whatever the number of rows (design.md).
    """

    k: tuple  # per layer [B, H, D, S]
    v: tuple  # per layer [B, H, S, D]
    index: jax.Array  # int32 scalar

    @property
    def slots(self) -> int:
        return self.v[0].shape[2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for batch_size rows of up to max_len tokens (max_len <= block_size)."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not is_integer(value, 1):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if max_len > config.block_size:
        raise ValueError(f"cache length {max_len} exceeds block_size {config.block_size}")
    return empty_cache(config, batch_size, max_len, dtype)


def empty_cache(config: ModelConfig, batch_size: int, slots: int, dtype=None) -> KVCache:
    """init_cache without its checks (a cache may be longer than block_size where positions are clipped)."""
    dtype = dtype or config.dtype
    B, H, D, L = batch_size, config.n_head, config.head_dim, config.n_layer
    return KVCache(k=tuple(jnp.zeros((B, H, D, slots), dtype) for _ in range(L)),
                   v=tuple(jnp.zeros((B, H, slots, D), dtype) for _ in range(L)), index=jnp.zeros((), jnp.int32))


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


# ---------------------------------------------------------------- how a weight matrix is stored and multiplied
# As stored [*out, *in]; transposed to [in, out]; or packed for cpu_kernels.panel_matmul.
OUT_IN, IN_OUT, PANELS = "out_in", "in_out", "panels"


@flax.struct.dataclass
class Matrix:
    """A weight W and how it is stored; matmul(config, x, m) is x @ W.T in every layout.

    OUT_IN: as the params keep it, [*out, *in] with n_in input axes (torch layout, head axes possibly split).
    IN_OUT: [in, out]. PANELS: cpu_kernels.pack_panels of [in, out], n_out columns.
    """

    w: jax.Array
    layout: str = flax.struct.field(pytree_node=False, default=OUT_IN)
    n_in: int = flax.struct.field(pytree_node=False, default=1)
    n_out: int = flax.struct.field(pytree_node=False, default=0)


def as_layout(config: ModelConfig, w_OI, layout: str) -> Matrix:
    """A 2-D [out, in] weight in the compute dtype, stored in layout."""
    if layout not in (OUT_IN, IN_OUT, PANELS):
        raise ValueError(f"layout must be one of {OUT_IN!r}, {IN_OUT!r}, {PANELS!r}; got {layout!r}")
    w_OI = w_OI.astype(config.dtype)
    if layout == OUT_IN:
        return Matrix(w_OI)
    if layout == IN_OUT:
        return Matrix(w_OI.T, IN_OUT)
    return Matrix(cpu_kernels.pack_panels(w_OI.T), PANELS, n_out=w_OI.shape[0])


def matmul(config: ModelConfig, x, m: Matrix, x_in: int = 1, float32: bool = False):
    """x @ W.T over x's trailing x_in axes: [*lead, *out] (OUT_IN) or [*lead, n_out], in the compute dtype, or with
    float32 sums and result (float32=True)."""
    lead = x.shape[:x.ndim - x_in]
    x = x.astype(config.dtype)
    out_type = jnp.float32 if float32 else None
    if m.layout == PANELS:  # float32 sums, rounded once to the compute dtype
        x_BK = x.reshape(-1, math.prod(x.shape[len(lead):]))
        y = cpu_kernels.panel_matmul(x_BK, m.w, m.n_out).reshape(*lead, m.n_out)  # each row's sums its own
        return y if float32 else y.astype(config.dtype)
    w = m.w.astype(config.dtype)
    if m.layout == IN_OUT:
        return jnp.dot(x.reshape(*lead, -1), w, precision=config.precision, preferred_element_type=out_type)
    x = x.reshape(*lead, *w.shape[w.ndim - m.n_in:])
    contract = (tuple(range(len(lead), x.ndim)), tuple(range(w.ndim - m.n_in, w.ndim)))
    return jax.lax.dot_general(x, w, (contract, ((), ())), precision=config.precision,
                               preferred_element_type=out_type)


# ---------------------------------------------------------------- the model's arithmetic
def layer_norm(config: ModelConfig, x, weight, bias=None, batch_invariant: bool = False):
    """torch.nn.LayerNorm over the last axis: biased variance of (x - mean), computed in float32; the result in
    the compute dtype. batch_invariant: each row's sums in a fixed order (pairwise_sum), whatever the batch."""
    x32 = x.astype(jnp.float32)

    def average(y):
        return (pairwise_sum(y) / y.shape[-1])[..., None] if batch_invariant else y.mean(-1, keepdims=True)
    mean = average(x32)
    var = average(jnp.square(x32 - mean))
    y = (x32 - mean) * jax.lax.rsqrt(var + config.layer_norm_eps) * weight
    if bias is not None:
        y = y + bias
    return y.astype(config.dtype)


def dense(config: ModelConfig, x, weights: dict, out_shape: tuple[int, ...], out_axes: tuple[str | None, ...],
          x_in: int = 1):
    """A linear layer {"weight": Matrix, "bias": [*out_shape] or None} on x's trailing x_in axes:
    [*lead, *out_shape] in the compute dtype, laid out on the output's logical axes."""
    y = matmul(config, x, weights["weight"], x_in)
    y = y.reshape(*x.shape[:x.ndim - x_in], *out_shape)
    if weights.get("bias") is not None:
        y = y + weights["bias"].astype(config.dtype)
    return _laid_out(y, "batch", None, *_activation_axes(out_axes))


def embed(config: ModelConfig, wte, wpe, tokens_BT, positions_BT):
    """Token plus position embeddings [B, T, C] in the compute dtype."""
    return (jnp.take(wte, tokens_BT, axis=0) + jnp.take(wpe, positions_BT, axis=0)).astype(config.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def gelu(x, approximate: bool):
    """jax.nn.gelu whose backward pass keeps only x: autodiff of the tanh form saves four more [B, T, 4C]
    arrays per layer, which lax.scan stacks over all layers."""
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


def mlp(config: ModelConfig, weights: dict, x_BTC, dropout: Callable = _no_dropout):
    """c_fc, GELU, c_proj."""
    h = dense(config, x_BTC, weights["c_fc"], (4 * config.n_embd,), ("mlp",))
    h = gelu(h, config.activation == "gelu_tanh")
    return dropout(dense(config, h, weights["c_proj"], (config.n_embd,), ("embed",)))


def block(config: ModelConfig, layer: dict, x_BTC, attend: Callable, dropout: Callable = _no_dropout,
          batch_invariant: bool = False):
    """One pre-LayerNorm transformer block on the residual stream: (x, what attend returned besides y).

    attend(qkv [B, T, 3, H, D]) -> (y [B, T, H, D], keys and values to keep or None): causal_attention,
    cached_attention, or the decode loop's own. batch_invariant: the layer norms' as layer_norm's.
    """
    norm = functools.partial(layer_norm, batch_invariant=batch_invariant)
    H, D, C = config.n_head, config.head_dim, config.n_embd
    x_BTC = _laid_out(x_BTC, "batch", None, None)
    attn = layer["attn"]
    qkv_BT3HD = dense(config, norm(config, x_BTC, **layer["ln_1"]), attn["c_attn"], (3, H, D),
                      (None, "heads", "head_dim"))
    y_BTHD, kv = attend(qkv_BT3HD)
    y_BTHD = _laid_out(y_BTHD, "batch", None, "heads", None)
    x_BTC = x_BTC + dropout(dense(config, y_BTHD, attn["c_proj"], (C,), ("embed",), x_in=2))
    x_BTC = _laid_out(x_BTC, "batch", None, None)
    x_BTC = x_BTC + mlp(config, layer["mlp"], norm(config, x_BTC, **layer["ln_2"]), dropout)
    return _laid_out(x_BTC, "batch", None, None), kv


def tied_logits(x, w_VC, precision):
    """x @ w.T with float32 sums and result, w cast to x's dtype: the tied output layer."""
    return jnp.einsum("...c,vc->...v", x, w_VC.astype(x.dtype), preferred_element_type=jnp.float32,
                      precision=precision)


def tied_logits_grads(g, x, w_VC, precision):
    """(d x, d w) of tied_logits for the logits' gradient g, which is rounded to x's dtype before the two matmuls:
    in 16-bit compute autodiff would make both float32 matmuls over [B*T, V] (twice the memory traffic)."""
    g = g.astype(x.dtype)
    dx = jnp.einsum("...v,vc->...c", g, w_VC.astype(x.dtype), precision=precision)
    dw = jnp.einsum("...v,...c->vc", g, x, preferred_element_type=jnp.float32, precision=precision)
    return dx, dw.astype(w_VC.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def output_logits(x_BTC, w_VC, precision):
    """tied_logits with tied_logits_grads as its backward pass."""
    return tied_logits(x_BTC, w_VC, precision)


def _output_logits_fwd(x_BTC, w_VC, precision):
    return tied_logits(x_BTC, w_VC, precision), (x_BTC, w_VC)


def _output_logits_bwd(precision, residuals, g_BTV):
    return tied_logits_grads(g_BTV, *residuals, precision)


output_logits.defvjp(_output_logits_fwd, _output_logits_bwd)


def head_logits(config: ModelConfig, x_BTC, head: dict):
    """Float32 logits [B, T, vocab_size] from the final LayerNorm's output: the tied layer wte with float32 sums,
    an untied one in the compute dtype plus its bias."""
    m = head["weight"]
    if not config.tie_embeddings:
        logits = dense(config, x_BTC, head, (config.padded_vocab_size,), ("vocab",))
    elif m.layout == OUT_IN:
        logits = output_logits(x_BTC, m.w, config.precision)
    else:
        logits = matmul(config, x_BTC, m, float32=True)
    logits = _laid_out(logits.astype(jnp.float32), "batch", None, "vocab")
    return logits[..., :config.vocab_size] if config.padded_vocab_size != config.vocab_size else logits


# ---------------------------------------------------------------- the model on per-layer weights (decoding)
@flax.struct.dataclass
class Weights:
    """The params as per-layer trees whose matrices are Matrix objects, for forward_unrolled."""

    wte: jax.Array
    wpe: jax.Array
    layers: tuple  # per layer {"ln_1", "attn": {"c_attn", "c_proj"}, "ln_2", "mlp": {"c_fc", "c_proj"}}
    ln_f: dict
    head: dict  # {"weight": Matrix [V, C] as stored or in panels, "bias"}


def arrange_weights(config: ModelConfig, params, layout: str = OUT_IN) -> Weights:
    """Every block matrix 2-D [out, in] in the compute dtype, stored in layout; the output layer as stored (or
    in panels with PANELS). Inside jit, OUT_IN takes slices and reshapes of the params; the others are copies."""
    h, C = params["h"], config.n_embd

    def norm(tree, i):
        return {"weight": tree["weight"][i], "bias": tree["bias"][i] if "bias" in tree else None}

    def linear(tree, i, n_out):
        return {"weight": as_layout(config, tree["weight"][i].reshape(n_out, -1), layout),
                "bias": tree["bias"][i] if "bias" in tree else None}

    layers = tuple({
        "ln_1": norm(h["ln_1"], i), "ln_2": norm(h["ln_2"], i),
        "attn": {"c_attn": linear(h["attn"]["c_attn"], i, 3 * C), "c_proj": linear(h["attn"]["c_proj"], i, C)},
        "mlp": {"c_fc": linear(h["mlp"]["c_fc"], i, 4 * C), "c_proj": linear(h["mlp"]["c_proj"], i, C)},
    } for i in range(config.n_layer))
    head = params["wte"] if config.tie_embeddings else params["lm_head"]["weight"]
    head = {"weight": as_layout(config, head, PANELS if layout == PANELS else OUT_IN),
            "bias": None if config.tie_embeddings else params["lm_head"].get("bias")}
    ln_f = {"weight": params["ln_f"]["weight"], "bias": params["ln_f"].get("bias")}
    return Weights(wte=params["wte"], wpe=params["wpe"], layers=layers, ln_f=ln_f, head=head)


def forward_unrolled(config: ModelConfig, weights: Weights, tokens_BT, positions_BT, attends: Sequence[Callable],
                     batch_invariant: bool = False):
    """The model with a Python loop over the layers (no dropout): (float32 logits [B, T, vocab_size], what each
    layer's attend returned besides y). attends: one per layer (see block); batch_invariant: as block's."""
    x_BTC = embed(config, weights.wte, weights.wpe, tokens_BT, positions_BT)
    kept = []
    for layer, attend in zip(weights.layers, attends, strict=True):
        x_BTC, kv = block(config, layer, x_BTC, attend, batch_invariant=batch_invariant)
        kept.append(kv)
    x_BTC = layer_norm(config, x_BTC, **weights.ln_f, batch_invariant=batch_invariant)
    return head_logits(config, x_BTC, weights.head), tuple(kept)


# ---------------------------------------------------------------- the Linen modules: parameters, then the above
def _normal(std: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _const(value: float, axes: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.constant(value), axes)


class LayerNorm(nn.Module):
    """A LayerNorm's weight (and bias) [C], as layer_norm takes them."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        c = cfg.n_embd
        weight = self.param("weight", _const(1.0, ("embed",)), (c,), cfg.param_dtype)
        bias = self.param("bias", _const(0.0, ("embed",)), (c,), cfg.param_dtype) if cfg.bias else None
        # Gathered whole (C numbers) before use: their fsdp split would otherwise spread onto the activations.
        return {"weight": _laid_out(weight, None), "bias": None if bias is None else _laid_out(bias, None)}


class Linear(nn.Module):
    """W [*out, *in] (torch layout, possibly with split head axes) and its bias, as dense takes them."""

    config: ModelConfig
    out_shape: tuple[int, ...]
    out_axes: tuple[str | None, ...]
    in_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    std: float = 0.02
    use_bias: bool = True

    @nn.compact
    def __call__(self):
        cfg = self.config
        w = self.param("weight", _normal(self.std, self.out_axes + self.in_axes), self.out_shape + self.in_shape,
                       cfg.param_dtype)
        bias = (self.param("bias", _const(0.0, self.out_axes), self.out_shape, cfg.param_dtype) if self.use_bias
                else None)
        return {"weight": Matrix(w, n_in=len(self.in_axes)), "bias": bias}


class Attention(nn.Module):
    """A block's c_attn and c_proj."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        return {"c_attn": Linear(cfg, (3, H, D), (None, "heads", "head_dim"), (C,), ("embed",),
                                 use_bias=cfg.qkv_bias, name="c_attn")(),
                "c_proj": Linear(cfg, (C,), ("embed",), (H, D), ("heads", "head_dim"), std=std, use_bias=cfg.bias,
                                 name="c_proj")()}


class MLP(nn.Module):
    """A block's c_fc and c_proj."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        cfg = self.config
        C = cfg.n_embd
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
        return {"c_fc": Linear(cfg, (4 * C,), ("mlp",), (C,), ("embed",), use_bias=cfg.bias, name="c_fc")(),
                "c_proj": Linear(cfg, (C,), ("embed",), (4 * C,), ("mlp",), std=std, use_bias=cfg.bias,
                                 name="c_proj")()}


class Block(nn.Module):
    """One layer's parameters and block(); the scan carry is the residual stream."""

    config: ModelConfig
    deterministic: bool = True
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x_BTC, layer_cache, mask_BTS, cache_index):
        cfg = self.config
        layer = {"ln_1": LayerNorm(cfg, name="ln_1")(), "attn": Attention(cfg, name="attn")(),
                 "ln_2": LayerNorm(cfg, name="ln_2")(), "mlp": MLP(cfg, name="mlp")()}

        def dropout(x):
            return nn.Dropout(cfg.dropout)(x, deterministic=self.deterministic)

        def attend(qkv_BT3HD):
            if layer_cache is not None:
                return cached_attention(cfg, qkv_BT3HD, *layer_cache, cache_index, mask_BTS, dropout)
            if mask_BTS is not None:
                return masked_attention(cfg, qkv_BT3HD, mask_BTS, dropout), None
            return causal_attention(cfg, qkv_BT3HD, not self.deterministic, dropout), None

        x_BTC, new_cache = block(cfg, layer, x_BTC, attend, dropout)
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
            S = cache.slots if cache is not None else T
            mask_BTS = (start + jnp.arange(T))[:, None] >= jnp.arange(S)[None, :]
            mask_BTS = jnp.broadcast_to(mask_BTS, (B, T, S))
            if attn_mask is not None:
                mask_BTS = mask_BTS & attn_mask.astype(bool)[:, None, :]

        Vp = cfg.padded_vocab_size
        wte = self.param("wte", _normal(0.02, ("vocab", "embed")), (Vp, cfg.n_embd), cfg.param_dtype)
        wpe = self.param("wpe", _normal(0.02, (None, "embed")), (cfg.block_size, cfg.n_embd), cfg.param_dtype)
        # The lookups read whole rows: wte and wpe are gathered on embed (as the output layer needs wte anyway).
        x_BTC = embed(cfg, _laid_out(wte, "vocab", None), _laid_out(wpe, None, None), tokens, positions)
        x_BTC = _laid_out(nn.Dropout(cfg.dropout)(x_BTC, deterministic=deterministic), "batch", None, None)

        block_module = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
        blocks = nn.scan(
            block_module,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=cfg.n_layer,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, deterministic, return_hidden, name="h")
        # lax.scan takes the layers' caches stacked (a copy here; the decode loop reads them one by one).
        layer_caches = (jnp.stack(cache.k), jnp.stack(cache.v)) if cache is not None else None
        x_BTC, (new_kv, hidden_LBTC) = blocks(x_BTC, layer_caches, mask_BTS, start)

        x_BTC = layer_norm(cfg, x_BTC, **LayerNorm(cfg, name="ln_f")())
        if not head:
            return x_BTC
        if cfg.tie_embeddings:
            out_layer = {"weight": Matrix(wte), "bias": None}
        else:
            out_layer = Linear(cfg, (Vp,), ("vocab",), (cfg.n_embd,), ("embed",), use_bias=cfg.lm_head_bias,
                               name="lm_head")()
        out = (head_logits(cfg, x_BTC, out_layer),)
        if cache is not None:
            out += (KVCache(k=tuple(new_kv[0]), v=tuple(new_kv[1]), index=cache.index + T),)
        if return_hidden:
            out += (hidden_LBTC,)
        return out[0] if len(out) == 1 else out


def init_params(config: ModelConfig, rng, batch_size: int = 1):
    """Freshly initialised parameters as a plain pytree (logical-axis boxes removed)."""
    return _init_program(config, batch_size)(rng)


@functools.lru_cache(maxsize=16)
def _init_program(config: ModelConfig, batch_size: int):
    # Compiled: op by op, the init (a forward pass) took 3.4 s for the tiny preset, compiled 1.7 s, and a compiled
    # program is found in XLA's persistent cache, where one is set, the next time.
    return jax.jit(lambda rng: nn.unbox(GPT2(config).init(rng, jnp.zeros((batch_size, 1), jnp.int32))["params"]))


@functools.lru_cache(maxsize=16)
def _abstract_boxed(config: ModelConfig):
    """GPT2's parameters as shapes and dtypes with their logical axes (configs are frozen, so cached)."""
    return jax.eval_shape(lambda: GPT2(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def abstract_params(config: ModelConfig):
    """The params' pytree of jax.ShapeDtypeStruct, without computing them."""
    return nn.unbox(_abstract_boxed(config))


def logical_axes(config: ModelConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs shaped like the params."""
    return nn.get_partition_spec(_abstract_boxed(config))


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
