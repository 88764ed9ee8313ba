"""What model.py checks before XLA sees anything: which attention can run here (a kernel asked for where it cannot
run is a ConfigError that says why), and what GPT2.apply is given (out-of-range token and position ids, which XLA's
gather would silently clamp; wrong shapes, which it would report from deep inside the computation). `cache` is a
model.KVCache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import cpu_kernels
from gpt2_jax.config import ConfigError, ModelConfig


def validate_tokens(tokens, config: ModelConfig, cache=None) -> None:
    """Raise a ValueError for token arrays the model cannot take (XLA's gather would silently clamp them)."""
    dtype = getattr(tokens, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array; got {type(tokens).__name__} of dtype {dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time]; got shape {tuple(tokens.shape)}")
    limit = cache.slots if cache is not None else config.block_size
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


def validate_inputs(config: ModelConfig, tokens, positions=None, attn_mask=None, cache=None):
    """Raise a ValueError for inputs of GPT2.apply that it cannot take: XLA would silently clamp out-of-range
    token ids, position ids and cache writes, and report wrong shapes from deep inside the computation.
    Values are only checked outside jit (shapes always)."""
    if cache is not None:
        _check_cache(config, tokens, cache)
    validate_tokens(tokens, config, cache)
    B, T = tokens.shape
    if cache is not None:
        index = _values(cache.index)
        if index is not None and not 0 <= int(index) <= cache.slots - T:
            raise ValueError(f"cache overflow: {T} tokens at cache.index {int(index)} do not fit in "
                             f"{cache.slots} slots")
    if positions is not None:
        dtype = getattr(positions, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"positions must be an integer array; got {type(positions).__name__} of dtype {dtype}")
        _check_shape("positions", positions, (B, T), "[batch, time]")
        values = _values(positions)
        if values is not None and (bad := outside(values, config.block_size)).size:
            raise ValueError(f"position id {int(bad.flat[0])} is outside [0, block_size={config.block_size})")
    if attn_mask is not None:
        S = cache.slots if cache is not None else T
        what = "[batch, cache length]" if cache is not None else "[batch, time]"
        _check_shape("attn_mask", attn_mask, (B, S), what)


def _check_cache(config: ModelConfig, tokens, cache) -> None:
    """The cache must hold n_layer keys [batch, heads, head_dim, slots] and values [batch, heads, slots, head_dim]
    for tokens' rows (model.KVCache)."""
    k, v = cache.k, cache.v
    k_shapes, v_shapes = ([[tuple(np.shape(a)) for a in part] for part in (k, v)]
                          if isinstance(k, tuple) and isinstance(v, tuple) else ([], []))
    S = v_shapes[0][2] if v_shapes and len(v_shapes[0]) == 4 else None
    B, H, D = tokens.shape[0], config.n_head, config.head_dim
    if (len(k_shapes), len(v_shapes)) != (config.n_layer,) * 2 or set(k_shapes) != {(B, H, D, S)} or set(
            v_shapes) != {(B, H, S, D)}:
        got = (f"{len(k)} and {len(v)} arrays of shapes {sorted(set(k_shapes))} and {sorted(set(v_shapes))}"
               if v_shapes else f"{type(k).__name__} and {type(v).__name__}")
        raise ValueError(f"cache keys and values must be tuples of n_layer={config.n_layer} arrays: keys [batch, "
                         f"heads, head_dim, slots] = {(B, H, D, S)} and values [batch, heads, slots, head_dim] = "
                         f"{(B, H, S, D)} for tokens of shape {tuple(tokens.shape)}; got {got}")


def _check_shape(name: str, x, shape: tuple[int, ...], what: str) -> None:
    """x must have shape `shape` or one that broadcasts to it (e.g. [1, T] for every row)."""
    x_shape = tuple(getattr(x, "shape", ()))
    if len(x_shape) != len(shape) or any(a not in (1, b) for a, b in zip(x_shape, shape)):
        raise ValueError(f"{name} must have shape {what} = {shape}; got {x_shape}")


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
