"""The decode engine: batch_size slots that decode together, each with its own prompt, length, settings and key.

A slot's sample lives in its own row of the KV cache (model.KVCache's layout), from slot 0, at position ids equal
to its cache slots: nothing is padded to its neighbours. A prompt is prefilled (all but its last token, in chunks of
power-of-two lengths that depend on its own length only: prefill_chunks) into the row of a free slot (off the CPU
in one call with the prompts of other free slots whose chunks have the same lengths; on CPU, CPU_PREFILL_ROWS a
call), and copied to the rows of its other samples; then one jitted lax.while_loop decodes every slot a token per
step, each step writing the new keys and values straight into each row at the row's own length. Continuous
scheduling refills a slot as soon as its sample finishes; "buckets" (today's length-sorted batches) refills only
when the whole batch is done.

Batch invariance: every row is computed by itself (attention, layer norms and sampling are row-wise; the decode
and prefill matmuls are row by row with the CPU panel kernel), a prompt's prefill chunks depend on the prompt
alone, a sample's randomness comes from its own key folded with its own token count, and its sampler settings are
its own row's.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import cpu_kernels
from gpt2_jax.attention import ATTENTION_CHUNK, chunked_attention
from gpt2_jax.config import ModelConfig, is_integer
from gpt2_jax.checks import outside
from gpt2_jax.model import IN_OUT, OUT_IN, PANELS, Weights, arrange_weights, forward_unrolled, init_cache
from gpt2_jax.strategies import Sampler, by_row, logprob_outputs, sample_rows

EOT_TOKEN = 50256
MIN_PROMPT_BUCKET = 16
PREFILL_CHUNK = 256  # the longest prefill call: a longer prompt is prefilled in pieces of this many tokens
DECODE_STEPS = 16  # decode steps per call at most (the host checks stop strings and refills slots in between)
# Prompts per prefill call on CPU (elsewhere: batch_size, padded). On CPU a prefill's matmuls are compute-bound,
# continuous batching frees slots mostly one at a time, and XLA's GEMM rows would differ in the last bit with their
# number where the panel kernel does not run.
CPU_PREFILL_ROWS = 1
MAX_LOGPROBS = 20
# How many compiled functions were traced, by name: jax.jit traces once per compilation.
TRACE_COUNTS: collections.Counter = collections.Counter()


def compile_count() -> int:
    """How many times the prefill and decode functions have been compiled in this process."""
    return sum(TRACE_COUNTS.values())


# ---------------------------------------------------------------- what a prompt and a sample are
@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt and how to sample it: n = len(keys) samples (one PRNG key each) that share one prefill."""

    id: object  # opaque, handed back in each Sample
    tokens: tuple[int, ...]
    keys: tuple
    max_new_tokens: int
    sampler: Sampler = Sampler()
    is_finished: Callable[[list[int]], bool] | None = None  # a host-side test on the sample's new tokens


@dataclasses.dataclass
class Sample:
    """One finished sample: its new tokens (stop token excluded) and, if asked for, their log-probabilities."""

    request: Request
    index: int  # which of the request's samples (0..n-1)
    tokens: list[int]
    # "stop" (a stop token or is_finished), "length" (max_new_tokens) or "nonfinite": the model's logits for the
    # next token were NaN or infinite (float16 overflow, damaged weights); tokens holds those drawn before.
    finish_reason: str
    logprobs: list[float] | None = None  # per new token, float32 log-softmax of the raw logits
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per new token, the K most likely, best first
    prompt_logprobs: list[float | None] | None = None  # echo: per prompt token, None for the first
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


def context_length(prompt: Sequence[int], max_new_tokens: int) -> int:
    """Tokens the model reads to generate max_new_tokens after prompt: the last new token is never fed back
    (as in transformers' generate), so a prompt of block_size tokens can still get one."""
    return len(prompt) + max_new_tokens - 1


def check_prompt(config: ModelConfig, name: str, prompt, max_new_tokens: int, sliding_window: bool) -> None:
    """Raise a ValueError starting with name if prompt is empty, not a list of token ids, or does not fit with
    max_new_tokens."""
    if isinstance(prompt, (str, bytes)) or np.ndim(prompt) != 1:
        raise ValueError(f"{name} must be a list of token ids; got {type(prompt).__name__} {prompt!r:.80}")
    if len(prompt) == 0:
        raise ValueError(f"{name} is empty; give at least one token (e.g. <|endoftext|> = {EOT_TOKEN})")
    # Token ids land in an int32 array: a float or a bool would be silently truncated to an id.
    ids = np.asarray(prompt)
    if ids.dtype.kind not in "iu":  # ints beyond int64 make an object array: the range check below names them
        bad = next((t for t in prompt if not is_integer(t)), None)
        if bad is not None:
            raise ValueError(f"{name} has {bad!r}, not an integer token id")
    bad = outside(ids, config.vocab_size)
    if bad.size:
        raise ValueError(f"{name} has token id {int(bad[0])} outside [0, {config.vocab_size})")
    if not sliding_window and context_length(prompt, max_new_tokens) > config.block_size:
        raise ValueError(
            f"{name} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} the model reads "
            f"{context_length(prompt, max_new_tokens)}, more than block_size {config.block_size} "
            "(shorten it, lower max_new_tokens, or ask for a sliding window)")


def check_request(config: ModelConfig, request, sliding_window: bool) -> None:
    """Raise a ValueError naming the request's id for anything the engine cannot take."""
    if not isinstance(request, Request):
        raise ValueError(f"the engine takes Request objects; got {type(request).__name__} {request!r:.80}")
    name = f"request {request.id!r}"
    if not is_integer(request.max_new_tokens, 1):
        raise ValueError(f"{name}: max_new_tokens must be an integer >= 1; got {request.max_new_tokens!r}")
    if not isinstance(request.sampler, Sampler):
        raise ValueError(f"{name}: sampler must be a Sampler; got {type(request.sampler).__name__}")
    if not isinstance(request.keys, (tuple, list)) or len(request.keys) < 1:
        raise ValueError(f"{name}: keys must hold one PRNG key per sample, at least one (n >= 1); got "
                         f"{request.keys!r:.80}")
    if request.is_finished is not None and not callable(request.is_finished):
        raise ValueError(f"{name}: is_finished must be callable or None; got {request.is_finished!r:.80}")
    check_prompt(config, f"{name}: the prompt", request.tokens, request.max_new_tokens, sliding_window)


def prefill_chunks(n: int) -> list[tuple[int, int, int]]:
    """(start, tokens, padded length) of each prefill call for n tokens: PREFILL_CHUNK at a time, then the rest
    rounded up to a multiple of MIN_PROMPT_BUCKET in power-of-two pieces, longest first, so that a prompt pads fewer
    than MIN_PROMPT_BUCKET tokens and the calls have few distinct shapes. A function of n alone, so a prompt's
    prefill never depends on its neighbours."""
    chunks, start = [], 0
    while n - start > PREFILL_CHUNK:
        chunks.append((start, PREFILL_CHUNK, PREFILL_CHUNK))
        start += PREFILL_CHUNK
    padded = -((start - n) // MIN_PROMPT_BUCKET) * MIN_PROMPT_BUCKET  # n - start rounded up
    for bit in reversed(range(padded.bit_length())):
        if padded >> bit & 1:
            chunks.append((start, min(1 << bit, n - start), 1 << bit))
            start += 1 << bit
    return chunks


# ---------------------------------------------------------------- the weights a decode step reads
# A decode step reads every weight once per token, so its speed is memory traffic: it runs
# model.forward_unrolled on per-layer 2-D matrices in the layout that reads fastest here (bench/sample.py --layouts).
_copied_weights = jax.jit(arrange_weights, static_argnums=(0, 2))
# The last copy made, so that a run over many batches of the same params makes it once:
# (config, layout, the params' leaves, kept alive so that their ids stay theirs, the copy).
_WEIGHTS_CACHE: list[tuple] = []


def kept_weights(config: ModelConfig, params, batch_size: int) -> Weights | None:
    """On CPU, the per-layer copy of params that the decode steps of batch_size rows and the prefills read (made
    once, reused while the params and the layout are the same); else None (slices of the params are taken inside
    the jitted functions). Slices taken inside jit copy every matrix on every call: a 32-token prefill spent 3/4
    of its time so."""
    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree.leaves(params)
    layout = cpu_layout(config, leaves, batch_size)
    if _WEIGHTS_CACHE:
        cached_config, cached_layout, cached_leaves, weights = _WEIGHTS_CACHE[0]
        if (cached_config, cached_layout) == (config, layout) and len(cached_leaves) == len(leaves) and all(
                a is b for a, b in zip(cached_leaves, leaves)):
            return weights
    _WEIGHTS_CACHE.clear()  # drop the old copy before making the new one
    weights = _copied_weights(config, params, layout)
    _WEIGHTS_CACHE.append((config, layout, leaves, weights))
    return weights


def cpu_layout(config: ModelConfig, leaves, batch_size: int) -> str:
    """The matrix layout a decode step on CPU reads: the panel kernel where it runs (row by row, so that a row's
    result never depends on the batch); else XLA's matrix-vector product on [out, in] for one row and its GEMM on
    [in, out] for several."""
    # The kernel runs on one device's memory: sharded params keep XLA's matmuls.
    one_device = all(len(leaf.sharding.device_set) == 1 for leaf in leaves if hasattr(leaf, "sharding"))
    if jnp.dtype(config.dtype) in (jnp.float32, jnp.bfloat16) and one_device and cpu_kernels.available():
        return PANELS
    return OUT_IN if batch_size == 1 else IN_OUT


def uses_attention_kernel(config: ModelConfig, weights: Weights | None, cache_dtype) -> bool:
    """Whether a decode step's attention runs cpu_kernels.decode_attention: where its matmuls run the panel kernel
    (one CPU device) on a float32 cache, with a head size the kernel takes."""
    return (weights is not None and weights.head["weight"].layout == PANELS and jnp.dtype(cache_dtype) == jnp.float32
            and config.head_dim in cpu_kernels.ATTENTION_HEAD_SIZES)


# ---------------------------------------------------------------- the jitted programs
def decode_step(config: ModelConfig, weights: Weights, token_B, length_B, cache_k: tuple, cache_v: tuple):
    """One token per row through model.forward_unrolled: (float32 logits [B, vocab_size], cache_k, cache_v).

    Row b's token goes in at position length_B[b]; its key and value are written into every layer's cache
    (model.KVCache's layout) at slot length_B[b], and it attends to the row's slots 0..length_B[b].
    """
    B, S = token_B.shape[0], cache_v[0].shape[2]
    rows_B, slot_B = jnp.arange(B), jnp.minimum(length_B, S - 1)
    kernel = uses_attention_kernel(config, weights, cache_v[0].dtype)

    def attend(k_BHDS, v_BHSD, qkv_B13HD):
        k_BHDS = k_BHDS.at[rows_B, :, :, slot_B].set(qkv_B13HD[:, 0, 1].astype(k_BHDS.dtype))
        v_BHSD = v_BHSD.at[rows_B, :, slot_B].set(qkv_B13HD[:, 0, 2].astype(v_BHSD.dtype))
        if kernel:
            q_BHD = qkv_B13HD[:, 0, 0].astype(jnp.float32)
            y_B1HD = cpu_kernels.decode_attention(q_BHD, k_BHDS, v_BHSD, length_B)[:, None]
        else:
            y_B1HD = chunked_attention(config, qkv_B13HD[:, :, 0], k_BHDS, v_BHSD, length_B[:, None])
        return y_B1HD.astype(config.dtype), (k_BHDS, v_BHSD)

    attends = [functools.partial(attend, k, v) for k, v in zip(cache_k, cache_v)]
    logits_B1V, kv = forward_unrolled(config, weights, token_B[:, None], length_B[:, None], attends,
                                     batch_invariant=True)
    return logits_B1V[:, 0], tuple(k for k, _ in kv), tuple(v for _, v in kv)


# The slots' small state, host-side numpy between calls: name -> dtype.
SLOT_FIELDS = {"last": np.int32, "length": np.int32, "count": np.int32, "limit": np.int32, "key": np.uint32,
               "inverse_temperature": np.float32, "top_k": np.int32, "top_p": np.float32, "reason": np.int32}
RUNNING, STOP, LENGTH, NONFINITE, IDLE = 0, 1, 2, 3, 4
REASONS = {STOP: "stop", LENGTH: "length", NONFINITE: "nonfinite"}


@functools.partial(jax.jit, static_argnames=("config", "stop_tokens", "logprobs", "key_impl"),
                   donate_argnames=("cache_k", "cache_v"))
def _decode(config: ModelConfig, stop_tokens: tuple, logprobs: int, key_impl: str, params,
            weights: Weights | None, cache_k, cache_v, slots: dict, max_steps, exit_on_finish):
    """Decode every running slot a token per step for up to max_steps (at most DECODE_STEPS) steps; stop early
    when a slot finishes (if exit_on_finish) or a running slot's cache is full (sliding window: re-prefill it).
    Returns (cache_k, cache_v, slots, outputs [B, DECODE_STEPS, ...], steps run)."""
    TRACE_COUNTS["decode"] += 1
    if weights is None:
        weights = arrange_weights(config, params)
    B, S, N, K = slots["last"].shape[0], cache_v[0].shape[2], DECODE_STEPS, max(logprobs, 1)
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)
    outputs = {"token": jnp.zeros((B, N), jnp.int32), "kept": jnp.zeros((B, N), bool)}
    if logprobs:
        outputs.update(logprob=jnp.zeros((B, N)), top_ids=jnp.zeros((B, N, K), jnp.int32),
                       top_logprobs=jnp.zeros((B, N, K)))

    def going(carry):
        t, _, _, s, _, finished = carry
        full = jnp.any((s["reason"] == RUNNING) & (s["length"] >= S))
        return (t < max_steps) & ~(finished & exit_on_finish) & jnp.any(s["reason"] == RUNNING) & ~full

    def step(carry):
        t, ks, vs, s, out, finished = carry
        running_B = s["reason"] == RUNNING
        logits_BV, ks, vs = decode_step(config, weights, s["last"], s["length"], ks, vs)
        keys_B = jax.random.wrap_key_data(s["key"], impl=key_impl)
        keys_B = jax.vmap(jax.random.fold_in)(keys_B, s["count"])
        token_B = sample_rows(logits_BV, keys_B, s["inverse_temperature"], s["top_k"], s["top_p"])
        finite_B = jnp.all(jnp.isfinite(logits_BV), axis=-1)
        is_stop_B = jnp.isin(token_B, stops)
        kept_B = running_B & finite_B & ~is_stop_B
        count_B = s["count"] + kept_B
        reason_B = jnp.where(~finite_B, NONFINITE, jnp.where(is_stop_B, STOP, jnp.where(
            count_B >= s["limit"], LENGTH, RUNNING)))
        reason_B = jnp.where(running_B, reason_B, s["reason"])
        s = dict(s, count=count_B, reason=reason_B, last=jnp.where(kept_B, token_B, s["last"]),
                 length=s["length"] + running_B)
        new = {"token": token_B, "kept": kept_B}
        if logprobs:
            new["logprob"], new["top_ids"], new["top_logprobs"] = by_row(
                functools.partial(logprob_outputs, K=K), logits_BV, token_B)
        out = {name: out[name].at[:, t].set(new[name]) for name in out}
        return t + 1, ks, vs, s, out, finished | jnp.any(running_B & (reason_B != RUNNING))

    slots = {name: jnp.asarray(value) for name, value in slots.items()}
    t, cache_k, cache_v, slots, outputs, _ = jax.lax.while_loop(
        going, step, (jnp.int32(0), cache_k, cache_v, slots, outputs, jnp.bool_(False)))
    return cache_k, cache_v, slots, outputs, t


@functools.partial(jax.jit, static_argnames=("config", "logprobs"), donate_argnames=("cache_k", "cache_v"))
def _prefill(config: ModelConfig, logprobs: int, params, weights: Weights | None, cache_k, cache_v, tokens_RC,
             targets_RC, start_R, n_R, rows_R):
    """Write the keys and values of each row r of tokens_RC (its first n_R[r] real, the rest padding) into cache row
    rows_R[r] at slots start_R[r].., each token attending to its row's slots before it. Padding tokens, and rows
    whose rows_R is past the cache's rows (padding rows), are never written; every sum is the row's own.

    Returns (cache_k, cache_v, echo) where echo holds, with logprobs > 0, the log-probability of targets_RC (the
    token after each) and the top entries at every position."""
    TRACE_COUNTS["prefill"] += 1
    if weights is None:
        weights = arrange_weights(config, params)
    R, C = tokens_RC.shape
    S = cache_v[0].shape[2]
    last_RC = start_R[:, None] + jnp.arange(C)
    slot_RC = jnp.where(jnp.arange(C) < n_R[:, None], last_RC, S)  # padding goes past the end: dropped
    r_R1 = jnp.arange(R)[:, None]

    def attend(k_BHDS, v_BHSD, qkv_RC3HD):
        k_RHDS = k_BHDS.at[rows_R].get(mode="clip")
        v_RHSD = v_BHSD.at[rows_R].get(mode="clip")
        k_RHDS = k_RHDS.at[r_R1, :, :, slot_RC].set(qkv_RC3HD[:, :, 1].astype(k_RHDS.dtype), mode="drop")
        v_RHSD = v_RHSD.at[r_R1, :, slot_RC].set(qkv_RC3HD[:, :, 2].astype(v_RHSD.dtype), mode="drop")
        y = chunked_attention(config, qkv_RC3HD[:, :, 0], k_RHDS, v_RHSD, last_RC)
        return y, (k_BHDS.at[rows_R].set(k_RHDS, mode="drop"), v_BHSD.at[rows_R].set(v_RHSD, mode="drop"))

    attends = [functools.partial(attend, k, v) for k, v in zip(cache_k, cache_v)]
    positions_RC = jnp.minimum(last_RC, config.block_size - 1)
    logits_RCV, kv = forward_unrolled(config, weights, tokens_RC, positions_RC, attends, batch_invariant=True)
    echo = None
    if logprobs:  # row by row: a log-softmax over V sums in an order that the number of rows can change
        echo = jax.lax.map(lambda row: logprob_outputs(*row, logprobs), (logits_RCV, targets_RC))
    return tuple(k for k, _ in kv), tuple(v for _, v in kv), echo


@functools.partial(jax.jit, donate_argnames=("cache_k", "cache_v"))
def _copy_row(cache_k, cache_v, source, target):
    """The cache with row source copied to row target (the samples of one prompt share its prefill)."""
    TRACE_COUNTS["copy_row"] += 1

    def copy(c):
        return jax.lax.dynamic_update_index_in_dim(c, jax.lax.dynamic_index_in_dim(c, source), target, axis=0)
    return tuple(map(copy, cache_k)), tuple(map(copy, cache_v))


@functools.partial(jax.jit, donate_argnames=("cache_k", "cache_v"))
def _clear_row(cache_k, cache_v, row):
    """The cache with row's keys and values zeroed."""
    TRACE_COUNTS["clear_row"] += 1

    def clear(c):
        return jax.lax.dynamic_update_index_in_dim(c, jnp.zeros_like(c[0]), row, axis=0)
    return tuple(map(clear, cache_k)), tuple(map(clear, cache_v))


# ---------------------------------------------------------------- the engine
@dataclasses.dataclass
class _Slot:
    """What the host knows of a busy slot."""

    request: Request
    index: int
    context: list[int]  # prompt + new tokens (all of them, also those before a sliding window's restart)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    echo: tuple | None = None


class Engine:
    """batch_size slots decoding together; run(requests) yields each Sample as soon as it finishes.

    schedule="continuous" refills a slot as soon as its sample finishes; "buckets" sorts the prompts by length and
    refills only when every slot is done (the schedule of length-bucketed batches, for comparison).
    logprobs=K (0..20, 0 = off) adds each new token's log-probability and the K most likely; echo the prompt's.
    """

    def __init__(self, config: ModelConfig, params, *, batch_size: int = 8, stop_tokens=(EOT_TOKEN,),
                 logprobs: int = 0, echo: bool = False, sliding_window: bool = False, schedule: str = "continuous",
                 check_every: int = DECODE_STEPS, on_token: Callable | None = None):
        if not is_integer(batch_size, 1):
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        if not is_integer(logprobs, 0) or logprobs > MAX_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}] (0 = off); got {logprobs!r}")
        if not isinstance(echo, bool):
            raise ValueError(f"echo must be True or False; got {echo!r}")
        if schedule not in ("continuous", "buckets"):
            raise ValueError(f"schedule must be 'continuous' or 'buckets'; got {schedule!r}")
        if isinstance(stop_tokens, (int, np.integer)) or not all(is_integer(t, 0) for t in stop_tokens):
            raise ValueError(f"stop_tokens must be a sequence of token ids, e.g. ({stop_tokens},); got {stop_tokens!r}")
        if not is_integer(check_every, 1):
            raise ValueError(f"check_every must be an integer >= 1; got {check_every!r}")
        self.config, self.params, self.batch_size = config, params, batch_size
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.logprobs, self.echo, self.sliding_window, self.schedule = logprobs, echo, sliding_window, schedule
        self.check_every, self.on_token = check_every, on_token
        self.occupancy = 0.0  # after run: the fraction of slot-steps that produced a kept token

    def cache_slots(self, requests: Sequence[Request]) -> int:
        """S, the cache slots of every row: block_size with a sliding window, else the longest context any
        request reads, rounded up to whole attention chunks (so that the chunks, and a row's sums, are the same
        whatever the other requests)."""
        T = self.config.block_size
        if self.sliding_window:
            return T
        longest = max(context_length(r.tokens, r.max_new_tokens) for r in requests)
        return min(T, -(-longest // ATTENTION_CHUNK) * ATTENTION_CHUNK)

    def run(self, requests: Iterable[Request]) -> Iterator[Sample]:
        """Every sample of every request, each yielded as soon as it finishes (in no fixed order)."""
        requests = list(requests)
        for request in requests:
            check_request(self.config, request, self.sliding_window)
        if not requests:
            return
        if self.schedule == "buckets":
            requests = sorted(requests, key=lambda r: len(r.tokens))
        yield from _Run(self, requests).samples()


def _key_data(key) -> tuple[np.ndarray, str]:
    """(the key's raw uint32 words, its implementation's name) of a typed or a raw (legacy) PRNG key."""
    if jnp.issubdtype(getattr(key, "dtype", None), jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), str(jax.random.key_impl(key))
    return np.asarray(key, np.uint32), str(jax.random.key_impl(jax.random.key(0)))


class _Run:
    """One Engine.run: the host's view of the slots, and the calls that prefill and decode them."""

    def __init__(self, engine: Engine, requests: list[Request]):
        self.engine, self.config = engine, engine.config
        B, cfg = engine.batch_size, engine.config
        self.S = engine.cache_slots(requests)
        self.pending = collections.deque((r, i) for r in requests for i in range(len(r.keys)))
        self.slots: list[_Slot | None] = [None] * B
        words, self.key_impl = _key_data(requests[0].keys[0])
        self.state = {name: np.zeros(B, dtype) for name, dtype in SLOT_FIELDS.items()}
        self.state["key"] = np.zeros((B, *words.shape), np.uint32)
        self.state["reason"][:] = IDLE
        cache = init_cache(cfg, B, self.S)
        self.cache_k, self.cache_v = cache.k, cache.v
        self.weights = kept_weights(cfg, engine.params, B)
        self.prefill_rows = B if self.weights is None else min(B, CPU_PREFILL_ROWS)
        self.echo_k = max(engine.logprobs, 1) if engine.echo else 0
        self.kept = self.slot_steps = 0

    def samples(self) -> Iterator[Sample]:
        engine = self.engine
        steps = 1 if engine.on_token is not None else min(DECODE_STEPS, engine.check_every)
        continuous = engine.schedule == "continuous"
        while True:
            if continuous or all(s is None for s in self.slots):
                self._admit()
            if all(s is None for s in self.slots):
                break
            self.cache_k, self.cache_v, state, outputs, t = _decode(
                self.config, engine.stop_tokens, engine.logprobs, self.key_impl, engine.params, self.weights,
                self.cache_k, self.cache_v, self.state, np.int32(steps), continuous)
            yield from self._harvest(jax.device_get(state), jax.device_get(outputs), int(t))
        engine.occupancy = self.kept / self.slot_steps if self.slot_steps else 0.0

    def _admit(self) -> None:
        """Prefill the next pending samples into the free slots: one prefill per request (its other samples copy
        its cache row), several requests per call where prefill_rows allows."""
        free = [b for b, s in enumerate(self.slots) if s is None]
        starting = []
        while free and self.pending:
            request, _ = self.pending[0]
            group = []
            while free and self.pending and self.pending[0][0] is request:
                group.append((free.pop(0), self.pending.popleft()[1]))
            context = list(request.tokens)
            if len(context) > self.config.block_size:  # only with a sliding window
                context = context[-(self.config.block_size // 2):]
            starting.append((request, group, context))
        echoes = self._prefill([(group[0][0], context) for _, group, context in starting], self.echo_k > 0)
        for (request, group, context), echo in zip(starting, echoes):
            if echo is not None:
                echo = self._prompt_echo(request, context, echo)
            first, _ = group[0]
            for b, index in group:
                if b != first:
                    self.cache_k, self.cache_v = _copy_row(self.cache_k, self.cache_v, np.int32(first), np.int32(b))
                self._start(b, request, index, context, echo)

    def _start(self, b: int, request: Request, index: int, context: list[int], echo) -> None:
        state = self.state
        state["last"][b], state["length"][b] = context[-1], len(context) - 1
        state["count"][b], state["limit"][b], state["reason"][b] = 0, request.max_new_tokens, RUNNING
        state["key"][b] = _key_data(request.keys[index])[0]
        state["inverse_temperature"][b], state["top_k"][b], state["top_p"][b] = request.sampler.row()
        self.slots[b] = _Slot(request, index, list(request.tokens), echo=echo)

    def _prefill(self, jobs: list[tuple[int, list[int]]], echo: bool) -> list:
        """Prefill all but the last token of each (row, context) of jobs into its cache row: contexts whose chunks
        (prefill_chunks) have the same lengths go together, prefill_rows rows a call (padded). Per job, with echo,
        (logprobs, top ids, top logprobs) of each prompt token after the first as numpy arrays, else None."""
        plans = [prefill_chunks(len(context) - 1) for _, context in jobs]
        alike = collections.defaultdict(list)
        for j, plan in enumerate(plans):
            alike[tuple(C for _, _, C in plan)].append(j)
        R, pieces = self.prefill_rows, [[] for _ in jobs]
        for shape, members in alike.items():
            for batch in (members[i:i + R] for i in range(0, len(members), R)):
                for c, C in enumerate(shape):
                    tokens, targets = np.zeros((R, C), np.int32), np.zeros((R, C), np.int32)
                    start, n = np.zeros(R, np.int32), np.zeros(R, np.int32)
                    rows = np.full(R, len(self.slots), np.int32)  # past the cache's rows: padding, never written
                    for r, j in enumerate(batch):
                        (row, context), (start[r], n[r], _) = jobs[j], plans[j][c]
                        first, end = start[r], start[r] + n[r]
                        tokens[r, :n[r]], targets[r, :n[r]] = context[first:end], context[first + 1:end + 1]
                        rows[r] = row
                    self.cache_k, self.cache_v, out = _prefill(
                        self.config, self.echo_k if echo else 0, self.engine.params, self.weights, self.cache_k,
                        self.cache_v, tokens, targets, start, n, rows)
                    if echo:
                        out = [np.asarray(a) for a in out]
                        for r, j in enumerate(batch):
                            pieces[j].append([a[r, :n[r]] for a in out])
        if not echo:
            return [None] * len(jobs)
        empty = [np.zeros(0, np.float32), np.zeros((0, self.echo_k), np.int32), np.zeros((0, self.echo_k))]
        return [tuple(np.concatenate(parts) for parts in zip(*(p or [empty]))) for p in pieces]

    def _prompt_echo(self, request: Request, context: list[int], echo):
        """(prompt_logprobs, prompt_top_logprobs) of the request: None for the first token and any that a sliding
        window cut off."""
        logprob, top_ids, top_lp = echo
        skipped = len(request.tokens) - len(context) + 1
        lps = [None] * skipped + [float(x) for x in logprob]
        tops = None
        if self.engine.logprobs:
            tops = [None] * skipped + [list(zip(map(int, i), map(float, p))) for i, p in zip(top_ids, top_lp)]
        return lps, tops

    def _harvest(self, state: dict, out: dict, steps: int) -> Iterator[Sample]:
        """Take the new tokens of a decode call; yield the samples that finished and free their slots."""
        self.state = {name: np.array(value) for name, value in state.items()}
        self.slot_steps += steps * len(self.slots)
        if self.engine.on_token is not None:
            for t in range(steps):
                self.engine.on_token(out["token"][:, t], out["kept"][:, t])
        for b, slot in enumerate(self.slots):
            if slot is None:
                continue
            kept = out["kept"][b, :steps]
            new = out["token"][b, :steps][kept].tolist()
            slot.tokens += new
            slot.context += new
            self.kept += len(new)
            if self.engine.logprobs:
                slot.logprobs += out["logprob"][b, :steps][kept].tolist()
                slot.top += [list(zip(i.tolist(), p.tolist())) for i, p in
                             zip(out["top_ids"][b, :steps][kept, :self.engine.logprobs],
                                 out["top_logprobs"][b, :steps][kept, :self.engine.logprobs])]
            reason = int(self.state["reason"][b])
            stop = slot.request.is_finished
            if reason == RUNNING and new and stop is not None and stop(list(slot.tokens)):
                reason = STOP
            if reason != RUNNING:
                self.state["reason"][b], self.slots[b] = IDLE, None
                if reason == NONFINITE:  # its NaN keys and values would reach the next sample (0 * NaN)
                    self.cache_k, self.cache_v = _clear_row(self.cache_k, self.cache_v, np.int32(b))
                yield self._sample(slot, REASONS[reason])
            elif self.state["length"][b] >= self.S:  # a sliding window's restart, from this row's tokens alone
                window = slot.context[-(self.config.block_size // 2):]
                self._prefill([(b, window)], False)
                self.state["length"][b] = len(window) - 1

    def _sample(self, slot: _Slot, reason: str) -> Sample:
        logprobs = self.engine.logprobs > 0
        prompt_lps, prompt_tops = slot.echo if slot.echo is not None else (None, None)
        return Sample(slot.request, slot.index, slot.tokens, reason,
                      logprobs=slot.logprobs if logprobs else None, top_logprobs=slot.top if logprobs else None,
                      prompt_logprobs=prompt_lps, prompt_top_logprobs=prompt_tops)
