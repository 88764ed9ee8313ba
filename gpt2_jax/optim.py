"""Learning-rate schedules, the weight-decay mask and the AdamW chain."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from gpt2_jax import cpu_kernels
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
    if cfg.lr_schedule != "constant":  # as get_lr: past lr_decay_iters min_lr, also at warmup_iters > lr_decay_iters
        decayed = jnp.where(step > cfg.lr_decay_iters, min_lr, decayed)
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
    """Global-norm clipping then AdamW (decoupled decay scaled by the learning rate, as torch.optim.AdamW).

    train_step applies it through fused_update (same state, same numbers, one pass over memory); the optax
    chain defines the state layout that checkpoints and sharding see.
    """
    adamw = optax.adamw(
        learning_rate=lambda count: lr_at(count, cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=lambda p: decay_mask(p, cfg.decay_embeddings))
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw


def fused_update(cfg: TrainConfig, grads, opt_state, params, grad_scale=1.0, kernel: bool | None = None):
    """make_optimizer(cfg)'s update and optax.apply_updates in one elementwise pass per parameter.

    grads are multiplied by grad_scale first (train_step passes 1 / token count, so the division costs no
    extra pass). Returns (new params, new opt_state, global norm of the scaled grads). The optax chain runs
    clip, Adam moments, bias correction, decay, -lr scaling and the final add as separate tree_maps whose
    intermediates XLA:CPU keeps in memory; here each leaf reads g, m, v, p once and writes m, v, p once
    (gpt2 124M on 2 CPU cores: 0.35 s -> 0.23 s per step, bench notes in bench/train.py). XLA:CPU still makes
    that three loops (one per output); on one CPU device cpu_kernels.adamw_update makes it one (IEEE float32
    operation by operation, where XLA contracts multiply-adds: the last bit of some elements differs).
    kernel=None: the kernel where it runs; False: never.
    """
    chained = not isinstance(opt_state[0], optax.ScaleByAdamState)  # clip + adamw, or adamw alone
    adam, masked, schedule = opt_state[-1] if chained else opt_state
    if not isinstance(adam, optax.ScaleByAdamState) or not isinstance(schedule, optax.ScaleByScheduleState):
        raise TypeError(f"opt_state was not made by make_optimizer: {jax.tree.structure(opt_state)}")
    norm = optax.tree.norm(grads) * grad_scale
    scale = jnp.asarray(grad_scale, jnp.float32)
    if cfg.grad_clip > 0:  # optax.clip_by_global_norm: untouched below the threshold
        scale = jnp.where(norm < cfg.grad_clip, scale, scale * cfg.grad_clip / norm)
    count = optax.safe_increment(adam.count)
    bc1 = 1 - cfg.beta1 ** count.astype(jnp.float32)
    bc2 = 1 - cfg.beta2 ** count.astype(jnp.float32)
    lr = lr_at(schedule.count, cfg)
    mask = decay_mask(params, cfg.decay_embeddings)

    if kernel is None:
        kernel = cpu_kernels.one_cpu_device() and cpu_kernels.available()
    hyper = dict(scale=scale, beta1=cfg.beta1, one_minus_beta1=1 - cfg.beta1, beta2=cfg.beta2,
                 one_minus_beta2=1 - cfg.beta2, correction1=bc1, correction2=bc2, eps=cfg.eps, lr=lr)

    def leaf(g, m, v, p, decay):
        if kernel and all(a.dtype == jnp.float32 for a in (g, m, v, p)):
            values = dict(hyper, decay=cfg.weight_decay if decay else 0.0)
            scalars = jnp.stack([jnp.asarray(values[name], jnp.float32) for name in cpu_kernels.ADAMW_HYPER])
            m, v, p = cpu_kernels.adamw_update(g, m, v, p, scalars)
            return p, m, v
        g = g.astype(jnp.float32) * scale
        m_new = cfg.beta1 * m + (1 - cfg.beta1) * g
        v_new = cfg.beta2 * v + (1 - cfg.beta2) * (g * g)
        u = (m_new / bc1) / (jnp.sqrt(v_new / bc2) + cfg.eps)
        if decay and cfg.weight_decay:
            u = u + cfg.weight_decay * p
        # m and v keep the state's dtypes (bfloat16 with param_dtype=bfloat16, as optax.adamw makes them): a
        # state whose dtypes changed after one step no longer fits the compiled step nor the checkpoint's layout.
        return p - (lr * u).astype(p.dtype), m_new.astype(m.dtype), v_new.astype(v.dtype)

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params, mask)
    treedef = jax.tree.structure(params)
    new_params, mu, nu = (treedef.unflatten(x) for x in zip(*treedef.flatten_up_to(out)))
    adamw_state = (adam._replace(count=count, mu=mu, nu=nu), masked,
                   schedule._replace(count=optax.safe_increment(schedule.count)))
    return new_params, (opt_state[:-1] + (adamw_state,) if chained else adamw_state), norm
