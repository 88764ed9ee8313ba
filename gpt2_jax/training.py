"""TrainState, the loss, and pure train/eval steps (the caller jits them)."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from gpt2_jax.config import ModelConfig, TrainConfig
from gpt2_jax.model import GPT2, init_params
from gpt2_jax.optim import lr_at, make_optimizer


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
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    valid = labels_BT != ignore_index
    safe = jnp.where(valid, labels_BT, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


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
    optimizer = make_optimizer(train_cfg)

    def micro_loss(params, x, y, rng):
        logits = model.apply({"params": params}, x, deterministic=model_cfg.dropout == 0.0,
                             rngs={"dropout": rng})
        return cross_entropy(logits, y, train_cfg.ignore_index, train_cfg.label_smoothing)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, x, y, rng):
        step_rng = jax.random.fold_in(rng, state.step)

        def accumulate(carry, inputs):
            grads, loss_sum, count = carry
            i, xb, yb = inputs
            (l, n), g = grad_fn(state.params, xb, yb, jax.random.fold_in(step_rng, i))
            return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        micro = jnp.arange(x.shape[0])
        (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), (micro, x, y))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads), "lr": lr_at(state.step, train_cfg)}
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
