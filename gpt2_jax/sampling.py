"""Text generation: sampling strategies, and generate / generate_batch on the decode engine (engine.py).

generate_batch decodes up to batch_size prompts together, one engine slot each; generate runs any number of
prompts through one engine, whose slots are refilled as samples finish. Row i's randomness comes from its own
PRNG key (row_key: the seed and the row's id, never its position), so a sample never depends on its neighbours.

Sliding window (opt-in): a row whose context would grow past block_size tokens restarts from its last
block_size // 2 tokens, with position ids from 0 again (nanoGPT crops to the last block_size tokens at every
step; restarting at half the window recomputes once per block_size // 2 tokens instead). Only that row is
prefilled again.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Sequence

import jax
import numpy as np

from gpt2_jax.config import ModelConfig, is_integer, replace, seed_error
from gpt2_jax.engine import (EOT_TOKEN, IN_OUT, OUT_IN, PANELS, TRACE_COUNTS, Engine, Request, Sample, Sampler,
                             _WEIGHTS_CACHE, check_prompt, compile_count, context_length, decode_step, draw,
                             sample_rows, top_p_filter)

__all__ = ["EOT_TOKEN", "IN_OUT", "OUT_IN", "PANELS", "TRACE_COUNTS", "Completion", "Engine", "Request", "Sample",
           "Sampler", "_WEIGHTS_CACHE", "check_lengths", "compile_count", "context_length", "decode_step", "draw",
           "generate", "generate_batch", "restrict_vocab", "row_key", "sample_logits", "top_p_filter"]


def sample_logits(logits_BV, keys_B, sampler: Sampler):
    """One token per row from float logits [B, V] with one PRNG key per row and one Sampler for all; int32 [B]
    (engine.sample_rows, whose rows each take their own settings)."""
    if logits_BV.ndim != 2 or keys_B.shape[:1] != logits_BV.shape[:1]:
        raise ValueError(f"sample_logits takes logits [batch, vocab] and one PRNG key per row; got logits of shape "
                         f"{tuple(logits_BV.shape)} and keys of shape {tuple(keys_B.shape)}")
    B = logits_BV.shape[0]
    inverse, top_k, top_p = sampler.row()
    return sample_rows(logits_BV, keys_B, np.full(B, inverse, np.float32), np.full(B, top_k, np.int32),
                       np.full(B, top_p, np.float32))


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


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    # "stop" (a stop token or stop string), "length" (max_new_tokens) or "nonfinite": the model's logits for the
    # next token were NaN or infinite (float16 overflow, damaged weights); tokens holds those drawn before.
    finish_reason: str


def check_lengths(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  sliding_window: bool) -> None:
    """Raise a ValueError naming the first prompt that is empty, not a list of token ids, or does not fit with
    max_new_tokens."""
    if not is_integer(max_new_tokens, 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; give at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        check_prompt(config, f"prompt {i}", prompt, max_new_tokens, sliding_window)


def generate_batch(config: ModelConfig, params, prompts: Sequence[Sequence[int]], keys, *, max_new_tokens: int,
                   sampler: Sampler, batch_size: int | None = None, stop_tokens: tuple[int, ...] = (EOT_TOKEN,),
                   sliding_window: bool = False, is_finished: Callable[[list[int]], bool] | None = None,
                   check_every: int = 16, on_token: Callable | None = None) -> list[Completion]:
    """Generate for up to batch_size prompts together, prompt i in engine slot i (extra slots stay idle).

    keys: one PRNG key per prompt (see row_key). is_finished: a host-side test on a row's tokens (stop strings),
    run every check_every tokens; a row it accepts is finished and left unchanged. on_token: called on the host
    with (tokens [B], wrote [B]) after every sampled token (for streaming); wrote says which rows took it.
    """
    B = batch_size or len(prompts)
    check_lengths(config, prompts, max_new_tokens, sliding_window)
    if len(prompts) > B:
        raise ValueError(f"generate_batch takes 1 to batch_size={B} prompts; got {len(prompts)}")
    keys = list(keys)
    if len(keys) != len(prompts):
        raise ValueError(f"generate_batch takes one PRNG key per prompt; got {len(keys)} keys for "
                         f"{len(prompts)} prompts")
    engine = Engine(config, params, batch_size=B, stop_tokens=stop_tokens, sliding_window=sliding_window,
                    check_every=check_every, on_token=on_token)
    requests = [Request(i, tuple(p), (key,), max_new_tokens, sampler, is_finished)
                for i, (p, key) in enumerate(zip(prompts, keys))]
    out: list[Completion | None] = [None] * len(prompts)
    for sample in engine.run(requests):
        out[sample.request.id] = Completion(sample.tokens, sample.finish_reason)
    return out


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
    keys = [row_key(seed, i) for i in range(len(prompts))]
    engine = Engine(model_cfg, params, batch_size=min(batch_size, len(prompts)), stop_tokens=stop_tokens,
                    sliding_window=sliding_window)
    out: list[list[int]] = [[] for _ in prompts]
    failed: list[int] = []
    for sample in engine.run(Request(i, tuple(p), (key,), max_new_tokens, sampler)
                             for i, (p, key) in enumerate(zip(prompts, keys))):
        out[sample.request.id] = sample.tokens
        if sample.finish_reason == "nonfinite":
            failed.append(sample.request.id)
    if failed:
        failed.sort()
        warnings.warn(f"the model's logits became NaN or infinite for {len(failed)} of {len(prompts)} prompts "
                      f"(prompt {', '.join(map(str, failed[:5]))}{', ...' if len(failed) > 5 else ''}): their "
                      f"samples stop there (float16 overflow or damaged weights?)", RuntimeWarning, stacklevel=2)
    return out
