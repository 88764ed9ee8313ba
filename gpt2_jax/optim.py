"""Learning-rate schedules, the weight-decay mask and the AdamW chain."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from gpt2_jax.config import TrainConfig


def lr_at(step, cfg: TrainConfig):
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear decay or constant.

    Same formula as nanoGPT's get_lr, so a PyTorch LambdaLR can reproduce it exactly.
    """
    step = jnp.asarray(step, jnp.float32)
    lr, min_lr = cfg.learning_rate, cfg.min_lr
    warm = lr * (step + 1) / (cfg.warmup_iters + 1)
    span = max(cfg.lr_decay_iters - cfg.warmup_iters, 1)
    ratio = jnp.clip((step - cfg.warmup_iters) / span, 0.0, 1.0)
    if cfg.lr_schedule == "cosine":
        decayed = min_lr + 0.5 * (1.0 + jnp.cos(math.pi * ratio)) * (lr - min_lr)
    elif cfg.lr_schedule == "linear":
        decayed = lr - ratio * (lr - min_lr)
    else:
        decayed = jnp.asarray(lr, jnp.float32)
    return jnp.where(step < cfg.warmup_iters, warm, decayed)


def decay_mask(params, decay_embeddings: bool = True):
    """True for the matrices that get weight decay: Linear weights (and embeddings if asked), never biases
    or LayerNorm parameters. Names decide, not ndim: stacked blocks make every leaf one dimension larger."""

    def is_matrix(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] in ("wte", "wpe"):
            return decay_embeddings
        return names[-1] == "weight" and not any(n.startswith("ln_") for n in names)

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decoupled decay scaled by the learning rate, as torch.optim.AdamW)."""
    adamw = optax.adamw(
        learning_rate=lambda count: lr_at(count, cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
