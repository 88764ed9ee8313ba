"""Run the same GPT-2 weights in PyTorch and in JAX on the same tokens and say where the two part.

The torch side takes the file's tensors under their own key names, as read from the file, and none of
convert's mapping: transformers' GPT2LMHeadModel for the Hugging Face layout, torch_ref's ReferenceGPT or
NanoGPT for the reference and nanoGPT layouts, each through load_state_dict, and any tensor the model lacks
or does not take is an error (from_pretrained would initialise it at random, silently). llm.c files, OpenAI's
TensorFlow checkpoints and orbax directories have no torch reader: they are exported with convert.export_hf
(export_reference for a model with an lm_head bias) and that export is loaded.

Tolerance: the run is within tolerance when max |Δlogits| <= atol (default 1e-4, right for float32 weights at
GPT-2 scale) and every block's residual stream is within atol * max(1, max |h|) of torch, the relative form
because the residual stream of trained GPT-2 reaches magnitudes of thousands. The exit status is 1 otherwise.

With --train_steps N both sides also train N steps from those weights on the same batches of the bundled corpus
(token ids modulo vocab_size): JAX through training.make_train_step (optim.py's schedule, clipping, decay mask and
fused AdamW), torch through torch.optim.AdamW with nanoGPT's groups (tensors of 2 or more dimensions decay,
embeddings as decay_embeddings says), a LambdaLR of optim.lr_at and clip_grad_norm_. Within tolerance means every
step's loss and grad norm within rtol (relative, default 1e-5 for float32), and per parameter ||Δ|| / ||torch|| <=
rtol for the step-1 gradients and for the parameters after N steps, on the elements whose torch gradient was above
rtol x the model's largest gradient element (at step 1, and at every step): a gradient that is ~0 (a key bias's:
softmax ignores it) is rounding noise, different in each framework, and Adam moves such an element by up to +-lr
in the direction that noise picks. The report counts the elements left out.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import convert, layouts, optim, training
from gpt2_jax.config import FlagParser, ModelConfig, TrainConfig, plain_warnings, replace
from gpt2_jax.model import GPT2, count_params

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
DEFAULT_STEPS = 8
DEFAULT_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
                "of foolishness, it was the epoch of belief, it was the epoch of incredulity.")


def compare(src: str | Path, *, text: str | None = None, steps: int = DEFAULT_STEPS, atol: float = DEFAULT_ATOL,
            against: str | Path | None = None, n_head: int | None = None) -> dict:
    """Load src in JAX (float32) and in torch (or `against` in torch) and compare them on text's tokens."""
    cfg, params = convert.load(src, jnp.float32, n_head=n_head)
    cfg = float32_compute(cfg)  # an out_dir trained with --dtype=bfloat16 keeps that dtype in its model config
    if against is not None:
        _check_same_shape(cfg, _config_of(against, n_head), src, against)
    with tempfile.TemporaryDirectory() as workdir:
        model, blocks, torch_name = torch_model_for(against or src, Path(workdir), n_head=n_head)
        tokens = text_tokens(cfg, text, steps)
        report = compare_models(cfg, params, model, blocks, tokens, steps, atol)
    return {"src": str(src), "torch_src": str(against or src), "torch_model": torch_name,
            "n_params": count_params(params), **report}


SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_embd")


def float32_compute(cfg: ModelConfig) -> ModelConfig:
    """cfg computing in true float32, as torch does here: a saved compute dtype, TF32 matmul precision or cuDNN
    attention (bfloat16 and float16 only) would be measured as a difference of the weights."""
    attention = "auto" if cfg.attention == "cudnn" else cfg.attention
    return replace(cfg, dtype="float32", matmul_precision="highest", attention=attention)


def _config_of(path: str | Path, n_head: int | None = None) -> ModelConfig:
    """The ModelConfig of a weights file or directory, from its config and tensor shapes (no weights read)."""
    orbax = convert.orbax_source(Path(path))
    if orbax is not None:
        from gpt2_jax import checkpoint

        meta = checkpoint.read_meta(*orbax)
        return checkpoint.saved_config(meta, "model_config", ModelConfig, f"{orbax[0]}/{meta['step']}")
    return layouts.open_checkpoint(Path(path), n_head=n_head).config


def _check_same_shape(cfg: ModelConfig, other: ModelConfig, src, against) -> None:
    """A ValueError when --against is a model of another shape: its logits cannot be compared with src's (and torch
    would fail with an IndexError on a token or position it does not have)."""
    diffs = [f"{k}={getattr(other, k)} (src: {getattr(cfg, k)})" for k in SHAPE_FIELDS
             if getattr(other, k) != getattr(cfg, k)]
    if diffs:
        raise ValueError(f"--against {against} is not a model of {src}'s shape: {', '.join(diffs)}")


def text_tokens(cfg: ModelConfig, text: str | None, steps: int) -> np.ndarray:
    """GPT-2 tokens of text (or of the file it names), cut to leave room for `steps` greedy tokens."""
    from gpt2_jax.tokenizer import get_tokenizer

    if text is not None and _names(text, Path.is_file):
        try:
            text = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--text file {text} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif text is not None and _names(text, Path.is_dir):  # a path meant as a file, not a text to compare on
        raise ValueError(f"--text {text} is a directory; give a text or a UTF-8 text file")
    tokens = np.asarray(get_tokenizer().encode(text if text is not None else DEFAULT_TEXT), np.int32)
    room = cfg.block_size - steps
    if room < 2:
        raise ValueError(f"--steps {steps} leaves fewer than 2 tokens of context in block_size {cfg.block_size}")
    tokens = tokens[-room:]
    if tokens.size < 2:
        raise ValueError("the text must encode to at least 2 tokens (the loss needs a next token)")
    if tokens.max() >= cfg.vocab_size:
        raise ValueError(f"the text encodes to token id {int(tokens.max())} but the model's vocab_size is "
                         f"{cfg.vocab_size}")
    return tokens


def _names(text: str, is_kind) -> bool:
    """Whether text names a file (is_kind=Path.is_file) or directory; a text too long to be a name is neither."""
    try:
        return is_kind(Path(text))
    except OSError:  # e.g. ENAMETOOLONG
        return False


def torch_model_for(path: str | Path, workdir: Path, n_head: int | None = None):
    """(torch model in float32 eval mode, its blocks in order, a description) for a weights file or directory."""
    import torch

    from gpt2_jax import torch_ref

    path = Path(path)
    if convert.orbax_source(path) is not None:  # an out_dir or one of its steps: orbax has no torch reader
        return _via_export(*convert.load(path), workdir)
    ckpt = layouts.open_checkpoint(path, n_head=n_head)
    cfg = ckpt.config
    if ckpt.layout in ("llmc", "openai_tf"):
        return _via_export(cfg, convert.params_from(ckpt), workdir)
    state = {k: torch.from_numpy(np.array(layouts.to_numpy(v), np.float32)) for k, v in ckpt.arrays.items()}
    if ckpt.layout == "hf":
        return _transformers_model(cfg, state, path)
    if ckpt.layout == "reference":
        model, name = torch_ref.ReferenceGPT(convert.reference_config(cfg)), "torch_ref.ReferenceGPT"
        buffer = layouts.is_reference_buffer
    else:
        args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                    bias=cfg.bias, vocab_size=cfg.vocab_size)
        model, name, buffer = torch_ref.NanoGPT(args), "torch_ref.NanoGPT", layouts.is_hf_buffer
    _load_all(model, state, path, buffer)
    return model.float().eval(), model.blocks(), name


def _load_all(model, state: dict, path: Path, buffer, tied: tuple[str, ...] = ()) -> None:
    """load_state_dict, and a ValueError naming the tensors that the model lacks or does not take (buffers and the
    tied copies, which are shared with a loaded tensor, aside)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not buffer(k) and k not in tied]
    unexpected = [k for k in unexpected if not buffer(k)]
    if missing:
        raise ValueError(f"{path}: the torch model needs tensors the file lacks: {missing[:5]}")
    if unexpected:
        raise ValueError(f"{path}: the torch model does not take tensors {unexpected[:5]}")


def _transformers_model(cfg: ModelConfig, state: dict, path: Path):
    """transformers' GPT2LMHeadModel of cfg's shape holding the file's tensors (prefixed 'transformer.' if bare)."""
    import transformers
    from transformers.initialization import no_init_weights

    hf_cfg = transformers.GPT2Config(**convert.hf_config(cfg), attn_implementation="eager")
    with no_init_weights():  # every weight is loaded below, or named as missing
        model = transformers.GPT2LMHeadModel(hf_cfg)
    bare = not any(k.startswith("transformer.") for k in state)
    state = {("transformer." + k if bare and k != "lm_head.weight" else k): v for k, v in state.items()}
    _load_all(model, state, path, layouts.is_hf_buffer, ("lm_head.weight",) if cfg.tie_embeddings else ())
    model.tie_weights()
    return model.float().eval(), list(model.transformer.h), "transformers.GPT2LMHeadModel"


def _via_export(cfg: ModelConfig, params, workdir: Path):
    """Files without a torch reader: export them to a layout that torch reads, then read that."""
    if cfg.lm_head_bias:
        convert.export_reference(cfg, params, workdir / "reference.pt")
        model, blocks, name = torch_model_for(workdir / "reference.pt", workdir)
    else:
        convert.export_hf(cfg, params, workdir / "exported-hf")
        model, blocks, name = torch_model_for(workdir / "exported-hf", workdir)
    return model, blocks, name + " (after export)"


def torch_forward(model, blocks, tokens_T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits [T, V] and the residual stream after each block [L, T, C], caught with forward hooks."""
    import torch

    from gpt2_jax.torch_ref import causal_lm_logits

    caught = []

    def hook(module, inputs, output):
        caught.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [block.register_forward_hook(hook) for block in blocks]
    try:
        with torch.no_grad():
            logits = causal_lm_logits(model, torch.as_tensor(tokens_T, dtype=torch.long)[None])
    finally:
        for handle in handles:
            handle.remove()
    return logits[0].numpy(), np.stack([h[0].float().numpy() for h in caught])


def compare_models(cfg: ModelConfig, params, model, blocks, tokens_T: np.ndarray, steps: int = DEFAULT_STEPS,
                   atol: float = DEFAULT_ATOL) -> dict:
    """The comparison of a JAX model and a torch model on tokens_T; see the module docstring for tolerance."""
    n = tokens_T.size
    buffer = np.zeros(n + steps, np.int32)  # one length for every JAX call (one compile); causality makes the
    buffer[:n] = tokens_T                   # positions after n irrelevant to the first n
    logits_j, hidden_j = _jax_forward(cfg)(params, jnp.asarray(buffer[None]))
    logits_j, hidden_j = np.asarray(logits_j[0, :n]), np.asarray(hidden_j[:, 0, :n])
    logits_t, hidden_t = torch_forward(model, blocks, tokens_T)
    if logits_j.shape != logits_t.shape or hidden_j.shape != hidden_t.shape:
        raise ValueError(f"the models disagree on shapes: logits {logits_j.shape} (jax) vs {logits_t.shape} "
                         f"(torch), residual {hidden_j.shape} vs {hidden_t.shape}")
    diff = np.abs(logits_j - logits_t)
    per_layer = np.abs(hidden_j - hidden_t).reshape(len(hidden_t), -1).max(axis=1)
    scale = np.maximum(1.0, np.abs(hidden_t).reshape(len(hidden_t), -1).max(axis=1))
    beyond = np.flatnonzero(per_layer > atol * scale)
    agree = _greedy_agreement(cfg, params, model, buffer, n)
    first_layer = int(beyond[0]) if beyond.size else None
    return {
        "max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
        "loss_jax": _loss(logits_j, tokens_T), "loss_torch": _loss(logits_t, tokens_T),
        "per_layer_max_abs_diff": [float(d) for d in per_layer], "per_layer_max_abs": [float(s) for s in scale],
        "first_layer_beyond_tolerance": first_layer, "greedy_agree_steps": agree, "greedy_steps": steps,
        "n_tokens": int(n), "atol": atol,
        "within_tolerance": bool(diff.max() <= atol and first_layer is None),
    }


@functools.lru_cache(maxsize=8)
def _jax_forward(cfg: ModelConfig):
    return jax.jit(lambda params, tokens: GPT2(cfg).apply({"params": params}, tokens, return_hidden=True))


def _loss(logits_TV: np.ndarray, tokens_T: np.ndarray) -> float:
    """Mean next-token cross-entropy, in float64 so both sides are scored the same way."""
    x = logits_TV[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(x)), tokens_T[1:]].mean())


def _greedy_agreement(cfg: ModelConfig, params, model, buffer: np.ndarray, n: int) -> int:
    """Decode greedily in each framework separately (full forwards) from buffer[:n]; steps until they disagree."""
    import torch

    from gpt2_jax.torch_ref import causal_lm_logits

    buffer, steps = buffer.copy(), buffer.size - n
    torch_tokens = torch.as_tensor(buffer[:n], dtype=torch.long)[None]
    for s in range(steps):
        logits = _jax_forward(cfg)(params, jnp.asarray(buffer[None]))[0]
        buffer[n + s] = int(jnp.argmax(logits[0, n + s - 1]))
        with torch.no_grad():
            nxt = int(causal_lm_logits(model, torch_tokens)[0, -1].argmax())
        torch_tokens = torch.cat([torch_tokens, torch.tensor([[nxt]])], dim=1)
    agree = buffer[n:] == torch_tokens[0, n:].numpy()
    return int(steps if agree.all() else np.argmin(agree))


def compare_training(src: str | Path, *, train_steps: int, batch_size: int = 4, block_size: int | None = None,
                     rtol: float = DEFAULT_RTOL, n_head: int | None = None, train_cfg: TrainConfig | None = None,
                     seed: int = 0) -> dict:
    """Train src's weights train_steps AdamW steps in JAX and in torch on the same batches; see the module doc."""
    cfg, params = convert.load(src, jnp.float32, n_head=n_head)
    cfg = replace(float32_compute(cfg), dropout=0.0)
    T = block_size or min(cfg.block_size, 64)
    if not 2 <= T <= cfg.block_size or train_steps < 1 or batch_size < 1:
        raise ValueError(f"--block_size must be in [2, {cfg.block_size}] (got {T}), --train_steps >= 1 (got "
                         f"{train_steps}) and --batch_size >= 1 (got {batch_size})")
    train_cfg = train_cfg or TrainConfig(batch_size=batch_size, learning_rate=1e-3, warmup_iters=min(2, train_steps),
                                         lr_decay_iters=max(train_steps, 3), min_lr=1e-4)
    batches = corpus_batches(cfg.vocab_size, train_steps, batch_size, T, seed)
    with tempfile.TemporaryDirectory() as workdir:
        model, _, torch_name = torch_model_for(src, Path(workdir), n_head=n_head)
        torch_run = _torch_training(model, train_cfg, batches, rtol)
    jax_run = _jax_training(cfg, train_cfg, params, batches)
    entries = TORCH_ENTRIES[torch_name.removesuffix(" (after export)")](cfg)
    ours = {name: _theirs(cfg, entries, tree, set(torch_run["params"])) for name, tree in jax_run.items()
            if name in ("grads", "params")}
    grad_rel = {k: _rel_diff(ours["grads"][k][~torch_run["noise_1"][k]], g[~torch_run["noise_1"][k]])
                for k, g in torch_run["grads"].items()}
    param_rel = {k: _rel_diff(ours["params"][k][~torch_run["noise"][k]], p[~torch_run["noise"][k]])
                 for k, p in torch_run["params"].items()}
    pairs = list(zip(jax_run["loss"] + jax_run["grad_norm"], torch_run["loss"] + torch_run["grad_norm"]))
    beyond = sorted({k for k, r in [*grad_rel.items(), *param_rel.items()] if not r <= rtol})
    return {"train_steps": train_steps, "batch_size": batch_size, "block_size": T, "rtol": rtol,
            "train_torch_model": torch_name, "train_loss_jax": jax_run["loss"], "train_loss_torch": torch_run["loss"],
            "grad_norm_jax": jax_run["grad_norm"], "grad_norm_torch": torch_run["grad_norm"],
            "grad_norm_torch_clip": torch_run["clip_norm"],
            "grad_max_rel_diff": grad_rel, "param_rel_diff": param_rel,
            "param_elements_left_out": {k: int(n.sum()) for k, n in torch_run["noise"].items() if n.any()},
            "param_max_abs_diff": max(float(np.abs(ours["params"][k] - p).max())
                                      for k, p in torch_run["params"].items()),
            "train_params_beyond_tolerance": beyond,
            "train_within_tolerance": not beyond and all(abs(j - t) <= rtol * abs(t) for j, t in pairs)}


TORCH_ENTRIES = {"transformers.GPT2LMHeadModel": layouts.hf_entries, "torch_ref.NanoGPT": layouts.nanogpt_entries,
                 "torch_ref.ReferenceGPT": layouts.reference_entries}


def corpus_batches(vocab_size: int, n: int, batch_size: int, T: int, seed: int = 0) -> list[tuple]:
    """n (x, y) batches [B, T] of windows of the bundled corpus's GPT-2 tokens (modulo vocab_size), y = x shifted."""
    from gpt2_jax.data import SHAKESPEARE_TEXT
    from gpt2_jax.tokenizer import get_tokenizer

    tokens = np.asarray(get_tokenizer().encode(SHAKESPEARE_TEXT.read_text(encoding="utf-8")[:400_000])) % vocab_size
    rng = np.random.default_rng(seed)
    windows = [np.stack([tokens[s: s + T + 1] for s in rng.integers(0, len(tokens) - T - 1, batch_size)])
               for _ in range(n)]
    return [(w[:, :-1].astype(np.int32), w[:, 1:].astype(np.int32)) for w in windows]


def _jax_training(cfg: ModelConfig, train_cfg: TrainConfig, params, batches) -> dict:
    """Per-step loss and grad norm of the project's train step, the step-1 gradients, and the final params."""
    grads = jax.grad(training.make_eval_step(cfg, train_cfg))(params, *map(jnp.asarray, batches[0]))
    state = training.init_train_state(cfg, train_cfg, None, params=params)
    step = jax.jit(training.make_train_step(cfg, train_cfg))
    losses, norms = [], []
    for x, y in batches:
        state, metrics = step(state, jnp.asarray(x)[None], jnp.asarray(y)[None], jax.random.PRNGKey(0))
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return {"loss": losses, "grad_norm": norms, "grads": grads, "params": state.params}


def _torch_training(model, train_cfg: TrainConfig, batches, rtol: float) -> dict:
    """The same as _jax_training in torch: AdamW with nanoGPT's decay groups, a LambdaLR of lr_at, clipping; and
    the elements whose gradient was below rtol x the largest gradient element, at step 1 and at any step."""
    import torch

    named = dict(model.named_parameters())  # a tied head is listed once, under its embedding's name
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decays = {k: p.dim() >= 2 and (train_cfg.decay_embeddings or id(p) not in embeddings) for k, p in named.items()}
    groups = [{"params": [p for k, p in named.items() if decays[k] == d], "weight_decay": train_cfg.weight_decay * d}
              for d in (True, False)]
    opt = torch.optim.AdamW(groups, lr=train_cfg.learning_rate, betas=(train_cfg.beta1, train_cfg.beta2),
                            eps=train_cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(_lr_factor, train_cfg))
    losses, norms, clip_norms, grads, noise_1 = [], [], [], None, None
    noise = {k: np.zeros(p.shape, bool) for k, p in named.items()}
    for x, y in batches:
        logits = model(torch.as_tensor(x, dtype=torch.long))
        logits = logits if isinstance(logits, torch.Tensor) else logits.logits
        labels = torch.as_tensor(y, dtype=torch.long).flatten()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=
                                                 train_cfg.ignore_index, label_smoothing=train_cfg.label_smoothing)
        loss.backward()
        grads = grads or {k: p.grad.detach().numpy().copy() for k, p in named.items()}  # step 1, before clipping
        norms.append(_norm([p.grad.numpy() for p in named.values()]))
        floor = rtol * max(float(p.grad.abs().max()) for p in named.values())
        for k, p in named.items():
            noise[k] |= p.grad.abs().numpy() < floor
        noise_1 = noise_1 or {k: n.copy() for k, n in noise.items()}
        clip = train_cfg.grad_clip if train_cfg.grad_clip > 0 else float("inf")  # inf: the norm, nothing clipped
        clip_norms.append(float(torch.nn.utils.clip_grad_norm_(named.values(), clip)))
        losses.append(loss.item())
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    params = {k: p.detach().numpy().copy() for k, p in named.items()}
    return {"loss": losses, "grad_norm": norms, "clip_norm": clip_norms, "grads": grads, "params": params,
            "noise": noise, "noise_1": noise_1}


def _norm(arrays) -> float:
    """The global L2 norm in float64: torch's clip_grad_norm_ and numpy's float32 norm accumulate in float32 and are
    off by ~4e-4 on the gradient of GPT-2's 50257-row embedding, far more than the two gradients differ."""
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def _rel_diff(ours: np.ndarray, torch_: np.ndarray) -> float:
    """||ours - torch|| / ||torch||, in float64."""
    diff = ours.astype(np.float64) - torch_
    return float(_norm([diff]) / max(_norm([torch_]), float(np.finfo(np.float32).tiny)))


def _lr_factor(train_cfg: TrainConfig, it: int) -> float:
    """LambdaLR's factor of step it: optim.lr_at over the base learning rate."""
    return float(optim.lr_at(it, train_cfg)) / train_cfg.learning_rate


def _theirs(cfg: ModelConfig, entries: list[layouts.Entry], tree, names: set[str]) -> dict[str, np.ndarray]:
    """Our tree as the torch model's named tensors (the layout table's to_theirs); an error where they differ."""
    flat = convert.flatten(tree)
    if lacking := sorted({e.ours for e in entries} - set(flat)):  # e.g. bias=False exported with zero biases
        raise ValueError(f"the torch model of this checkpoint trains parameters that the JAX model lacks ({lacking}); "
                         f"training can be compared only where both sides have the same parameters")
    out = {name: np.asarray(make()) for name, _, _, make in convert._their_tensors(cfg, entries, flat)}
    if set(out) != names:
        raise AssertionError(f"layout table and torch model disagree on {sorted(set(out) ^ names)}")
    return out


def format_report(report: dict) -> str:
    lines = [f"jax: {report['src']} ({report['n_params']:,} parameters)",
             f"torch: {report['torch_src']} as {report['torch_model']}",
             f"tokens: {report['n_tokens']}",
             f"max |Δlogits| {report['max_abs_logit_diff']:.3g}   mean |Δlogits| {report['mean_abs_logit_diff']:.3g}"
             f"   (tolerance {report['atol']:g})",
             f"loss: jax {report['loss_jax']:.6f}   torch {report['loss_torch']:.6f}",
             "residual stream max |Δ| after each block (max |h|):"]
    lines += [f"  block {i:3d}: {d:.3g} ({s:.3g})"
              for i, (d, s) in enumerate(zip(report["per_layer_max_abs_diff"], report["per_layer_max_abs"]))]
    first = report["first_layer_beyond_tolerance"]
    lines.append(f"first block beyond tolerance: {'none' if first is None else first}")
    lines.append(f"greedy decoding: {report['greedy_agree_steps']}/{report['greedy_steps']} steps agree")
    lines.append("OK: within tolerance" if report["within_tolerance"] else "FAIL: beyond tolerance")
    return "\n".join(lines + (_training_lines(report) if "train_steps" in report else []))


def _training_lines(report: dict) -> list[str]:
    lines = [f"training: {report['train_steps']} AdamW steps on batches of {report['batch_size']} x "
             f"{report['block_size']} tokens, torch as {report['train_torch_model']}",
             "  step   loss jax    loss torch   grad norm jax  grad norm torch"]
    lines += [f"  {i:4d}  {lj:10.6f}  {lt:10.6f}  {gj:14.6g}  {gt:14.6g}" for i, (lj, lt, gj, gt) in enumerate(zip(
        report["train_loss_jax"], report["train_loss_torch"], report["grad_norm_jax"], report["grad_norm_torch"]), 1)]
    for title, key in (("step-1 gradients", "grad_max_rel_diff"), ("parameters after the last step", "param_rel_diff")):
        worst = sorted(report[key].items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"{title}, largest ||Δ|| / ||torch||: " + ", ".join(f"{k} {v:.3g}" for k, v in worst))
    left_out = report["param_elements_left_out"]
    lines.append(f"parameters after the last step, max |Δ|: {report['param_max_abs_diff']:.3g}; elements left out "
                 f"(gradient ~0): {sum(left_out.values())} in {len(left_out)} parameters")
    beyond = report["train_params_beyond_tolerance"]
    lines.append("OK: training within tolerance" if report["train_within_tolerance"] else
                 f"FAIL: training beyond tolerance {report['rtol']:g}" + (f" in {beyond}" if beyond else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m gpt2_jax.compare", description=(
        "Run SRC's weights in JAX and in PyTorch on the same tokens; exit 1 when they differ beyond tolerance."))
    parser.add_argument("src", help="any weights file or directory that gpt2_jax.convert.load reads")
    parser.add_argument("--text", default=None, help="the text (or a file of it) to run; a fixed sentence if absent")
    parser.add_flag("steps", int, default=DEFAULT_STEPS, help="greedy decoding steps to compare")
    parser.add_flag("atol", float, default=DEFAULT_ATOL, help="max |Δlogits| allowed (float32: 1e-4)")
    parser.add_argument("--against", default=None, help="run this file in torch instead of SRC (e.g. the original "
                                                        "of a converted checkpoint)")
    parser.add_flag("n_head", int, default=None, help="heads, when no config JSON gives them")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_flag("train_steps", int, default=0, help="also train this many AdamW steps on each side")
    parser.add_flag("batch_size", int, default=4, help="sequences per training batch")
    parser.add_flag("block_size", int, default=None, help="tokens per sequence (default min(64, model's))")
    parser.add_flag("rtol", float, default=DEFAULT_RTOL, help="relative tolerance of training (1e-5)")
    args = parser.parse_args(argv)
    if args.steps < 0 or not args.atol > 0 or args.train_steps < 0 or args.batch_size < 1 or not args.rtol > 0:
        parser.fail("--steps must be >= 0 and --atol > 0; --train_steps >= 0, --batch_size >= 1 and --rtol > 0")
    try:  # (not > 0 above: also NaN, which no difference would exceed)
        report = compare(args.src, text=args.text, steps=args.steps, atol=args.atol, against=args.against,
                         n_head=args.n_head)
        if args.train_steps:
            report.update(compare_training(args.src, train_steps=args.train_steps, batch_size=args.batch_size,
                                           block_size=args.block_size, rtol=args.rtol, n_head=args.n_head))
    except (ValueError, OSError) as e:  # OSError: a file that cannot be read
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["within_tolerance"] and report.get("train_within_tolerance", True) else 1


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
