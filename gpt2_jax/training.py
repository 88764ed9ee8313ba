"""TrainState, the loss, and pure train/eval steps (the caller jits them)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from gpt2_jax import cpu_kernels
from gpt2_jax.config import ModelConfig, TrainConfig
from gpt2_jax.model import GPT2, init_params, tied_logits, tied_logits_grads
from gpt2_jax.optim import fused_update, lr_at, make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32: optimizer steps taken
    params: Any
    opt_state: Any


def cross_entropy(logits_BTV, labels_BT, ignore_index: int = -100, label_smoothing: float = 0.0):
    """Sum of per-token losses and the number of counted tokens, in float32.

    Matches torch.nn.functional.cross_entropy(reduction="sum", ignore_index, label_smoothing):
    (1 - eps) * NLL(label) + eps * mean over classes of -log p.
    """
    valid_BT = labels_BT != ignore_index
    losses_BT = _token_losses(logits_BTV.astype(jnp.float32), labels_BT, ignore_index, float(label_smoothing))
    return jnp.sum(losses_BT), jnp.sum(valid_BT).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_losses(logits_BTV, labels_BT, ignore_index, label_smoothing):
    return _token_losses_fwd(logits_BTV, labels_BT, ignore_index, label_smoothing)[0]


def _row_sum(a_BTV):
    # On CPU a matrix-vector product with ones: XLA:CPU runs reductions on one thread and this GEMV on all of them
    # (on GPUs and TPUs the reduction fuses with the pass that produces a_BTV).
    if jax.default_backend() != "cpu":
        return a_BTV.sum(-1)
    ones_V = jnp.ones(a_BTV.shape[-1:], a_BTV.dtype)
    return jnp.einsum("...v,v->...", a_BTV, ones_V, precision=jax.lax.Precision.HIGHEST)  # no bf16/tf32 passes


def _real_columns(columns: int, vocab_size: int | None):
    """A [columns] mask of the columns that are classes, or None when all of them are."""
    if vocab_size is None or vocab_size == columns:
        return None
    return jnp.arange(columns) < vocab_size


def _token_losses_fwd(logits_BTV, labels_BT, ignore_index, label_smoothing, vocab_size=None):
    # p = exp(logits - max) is kept for the backward pass instead of the logits (same size), so the
    # exponentials are computed once; only [B, T] numbers are kept besides it. vocab_size: the classes, where
    # the logits have more columns (tied_output_loss's padded vocabulary): those get no probability.
    real_V = _real_columns(logits_BTV.shape[-1], vocab_size)
    raw_BTV = logits_BTV
    if real_V is not None:
        logits_BTV = jnp.where(real_V, logits_BTV, -jnp.inf)
    max_BT = logits_BTV.max(-1)
    p_BTV = jnp.exp(logits_BTV - max_BT[..., None])
    sum_BT = _row_sum(p_BTV)
    lse_BT = max_BT + jnp.log(sum_BT)
    valid_BT = labels_BT != ignore_index
    safe_BT = jnp.where(valid_BT, labels_BT, 0)
    target_BT = jnp.take_along_axis(logits_BTV, safe_BT[..., None], axis=-1)[..., 0]
    loss_BT = lse_BT - target_BT
    if label_smoothing:
        V = vocab_size or raw_BTV.shape[-1]
        mean_BT = _row_sum(raw_BTV if real_V is None else jnp.where(real_V, raw_BTV, 0.0)) / V
        loss_BT = (1.0 - label_smoothing) * loss_BT + label_smoothing * (lse_BT - mean_BT)
    return jnp.where(valid_BT, loss_BT, 0.0), (p_BTV, sum_BT, safe_BT, valid_BT)


def _token_losses_bwd(ignore_index, label_smoothing, residuals, g_BT, vocab_size=None):
    # d loss / d logits = softmax - (1 - eps) * onehot(label) - eps / V, in one elementwise pass over [B, T, V]
    # (autodiff of the gather would add a zero-filled scatter over the whole logits array).
    p_BTV, sum_BT, safe_BT, valid_BT = residuals
    V = vocab_size or p_BTV.shape[-1]
    g_BT = jnp.where(valid_BT, g_BT, 0.0)
    onehot_BTV = jnp.arange(p_BTV.shape[-1], dtype=safe_BT.dtype) == safe_BT[..., None]
    probs_BTV = p_BTV * (1.0 / sum_BT)[..., None]
    d_BTV = probs_BTV - jnp.where(onehot_BTV, 1.0 - label_smoothing, 0.0) - label_smoothing / V
    real_V = _real_columns(p_BTV.shape[-1], vocab_size)
    if real_V is not None:  # no gradient for the columns that are no classes (their p is 0, but not eps / V)
        d_BTV = jnp.where(real_V, d_BTV, 0.0)
    return g_BT[..., None] * d_BTV, None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)

LOSS_CHUNK_ROWS = 128  # tokens per chunk of tied_output_loss on CPU: [128, V] float32 logits fit in a 32 MB L3
MAX_LOSS_CHUNKS = 16  # the chunks are unrolled: more would only cost compile time


def tied_output_loss(x_BTC, wte_VC, labels_BT, config: ModelConfig, ignore_index: int = -100,
                     label_smoothing: float = 0.0):
    """cross_entropy(x @ wte.T, labels) for the tied output layer: (sum of per-token losses, counted tokens).

    The logits never exist whole: each chunk of tokens computes its logits, its losses and d loss / d logits
    (kept for the backward pass, in x's dtype) while they are in cache, and the backward pass is the two
    matmuls (the logits, exp(logits) and the gradient otherwise each make a pass over [B*T, V] in memory).
    Padded vocabulary rows (pad_vocab_to) get no probability and a zero gradient, as when the logits are cut.
    B*T tokens make up to MAX_LOSS_CHUNKS chunks of about LOSS_CHUNK_ROWS (larger batches get larger chunks); the
    last chunk is padded with ignored tokens.
    """
    B, T, C = x_BTC.shape
    N = B * T
    chunks = max(1, min(MAX_LOSS_CHUNKS, N // LOSS_CHUNK_ROWS))
    pad = -N % chunks
    x_NC = jnp.pad(x_BTC.reshape(N, C), ((0, pad), (0, 0)))
    labels_N = jnp.pad(labels_BT.reshape(N), (0, pad), constant_values=ignore_index)
    losses_N = _tied_losses(x_NC, wte_VC, labels_N, config.vocab_size, ignore_index, float(label_smoothing),
                            config.precision, chunks)[:N]
    return jnp.sum(losses_N), jnp.sum(labels_BT != ignore_index).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _tied_losses(x_NC, w_VC, labels_N, vocab_size, ignore_index, label_smoothing, precision, chunks):
    return _tied_losses_fwd(x_NC, w_VC, labels_N, vocab_size, ignore_index, label_smoothing, precision, chunks)[0]


def _tied_losses_fwd(x_NC, w_VC, labels_N, vocab_size, ignore_index, label_smoothing, precision, chunks):
    N, C = x_NC.shape
    w_VC_x = w_VC.astype(x_NC.dtype)

    def chunk(x_nC, labels_n):  # pad_vocab_to's extra rows of w are no classes (the vocab_size argument)
        logits_nV = tied_logits(x_nC, w_VC_x, precision)
        losses_n, residuals = _token_losses_fwd(logits_nV, labels_n, ignore_index, label_smoothing, vocab_size)
        d_nV = _token_losses_bwd(ignore_index, label_smoothing, residuals, jnp.ones_like(losses_n), vocab_size)[0]
        return losses_n, d_nV.astype(x_NC.dtype)

    if chunks == 1:
        losses_N, d_NV = chunk(x_NC, labels_N)
    else:
        xs = (x_NC.reshape(chunks, N // chunks, C), labels_N.reshape(chunks, N // chunks))
        # unrolled: a while loop would first fill the stacked [N, V] output with zeros, one more pass over it
        losses_N, d_NV = jax.lax.scan(lambda _, xy: (None, chunk(*xy)), None, xs, unroll=True)[1]
        losses_N, d_NV = losses_N.reshape(N), d_NV.reshape(N, -1)
    return losses_N, (x_NC, w_VC, d_NV)


def _tied_losses_bwd(vocab_size, ignore_index, label_smoothing, precision, chunks, residuals, g_N):
    x_NC, w_VC, d_NV = residuals
    # g_N (1 for every token of a summed loss) scales the rows of x and of dx, not the [N, V] gradient.
    g_N1 = g_N.astype(x_NC.dtype)[:, None]
    dx_NC, dw_VC = tied_logits_grads(d_NV, x_NC * g_N1, w_VC, precision)
    return dx_NC * g_N1, dw_VC, None


_tied_losses.defvjp(_tied_losses_fwd, _tied_losses_bwd)


def init_train_state(model_cfg: ModelConfig, train_cfg: TrainConfig, rng, params=None) -> TrainState:
    """A step-0 state from fresh parameters (or the given ones) and a zeroed optimizer state."""
    if params is None:
        params = init_params(model_cfg, rng)
    opt_state = make_optimizer(train_cfg).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)


def make_train_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Callable:
    """train_step(state, x [A, B, T], y [A, B, T], rng) -> (state, metrics), A = gradient_accumulation_steps.

    The micro-batches run under lax.scan inside the one step; the loss is the mean over all counted
    tokens of the whole batch, exactly as if it had been one batch.
    """
    model = GPT2(model_cfg)
    # On one CPU device the tied output layer and the loss go chunk by chunk (tied_output_loss); elsewhere XLA
    # fuses the passes over the logits itself, and a sharded vocabulary is laid out by the model.
    chunked = model_cfg.tie_embeddings and cpu_kernels.one_cpu_device()

    def micro_loss(params, x, y, rng):
        features = dict(deterministic=model_cfg.dropout == 0.0, rngs={"dropout": rng})
        if chunked:
            x_BTC = model.apply({"params": params}, x, head=False, **features)
            return tied_output_loss(x_BTC, params["wte"], y, model_cfg, train_cfg.ignore_index,
                                    train_cfg.label_smoothing)
        logits = model.apply({"params": params}, x, **features)
        return cross_entropy(logits, y, train_cfg.ignore_index, train_cfg.label_smoothing)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, x, y, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        if x.shape[0] == 1:  # no accumulation: skip the zero-filled gradient buffer and the loop
            (loss_sum, count), grads = grad_fn(state.params, x[0], y[0], jax.random.fold_in(step_rng, 0))
        else:
            def accumulate(carry, inputs):
                grads, loss_sum, count = carry
                i, xb, yb = inputs
                (l, n), g = grad_fn(state.params, xb, yb, jax.random.fold_in(step_rng, i))
                return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + n), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            micro = jnp.arange(x.shape[0])
            (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, x, y))
        count = jnp.maximum(count, 1.0)
        # grads are sums over tokens: fused_update divides by the count inside its single pass.
        params, opt_state, grad_norm = fused_update(train_cfg, grads, state.opt_state, state.params, 1.0 / count)
        metrics = {"loss": loss_sum / count, "grad_norm": grad_norm, "lr": lr_at(state.step, train_cfg)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model_cfg: ModelConfig, train_cfg: TrainConfig) -> Callable:
    """eval_step(params, x [B, T], y [B, T]) -> mean loss over counted tokens (no dropout)."""
    model = GPT2(model_cfg)

    def eval_step(params, x, y):
        logits = model.apply({"params": params}, x, deterministic=True)
        loss_sum, count = cross_entropy(logits, y, train_cfg.ignore_index, train_cfg.label_smoothing)
        return loss_sum / jnp.maximum(count, 1.0)

    return eval_step


def param_group(path) -> str:
    """A parameter's health group: wte, wpe, lm_head, ln (every LayerNorm) or its Linear, e.g. attn.c_attn."""
    names = [str(getattr(k, "key", k)) for k in path]
    if any(name.startswith("ln") for name in names):
        return "ln"
    return ".".join(names[1:3]) if names[0] == "h" else names[0]


@jax.jit
def update_ratios(old_params, new_params) -> dict:
    """{"update_ratio/<group>": ||new - old|| / ||old||} over each param_group's parameters (float32 sums)."""
    sums = {}
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(old_params), jax.tree.leaves(new_params),
                                strict=True):
        old32 = old.astype(jnp.float32)
        update, weight = sums.get(param_group(path), (0.0, 0.0))
        sums[param_group(path)] = (update + jnp.sum(jnp.square(new.astype(jnp.float32) - old32)),
                                   weight + jnp.sum(jnp.square(old32)))
    return {f"update_ratio/{group}": jnp.sqrt(update / weight) for group, (update, weight) in sums.items()}
