"""HellaSwag scored completion-style, as llm.c's and build-nanogpt's hellaswag.py score it, jitted and sharded.

    python -m gpt2_jax.evaluate hellaswag --init_from=PATH --data=hellaswag_val.jsonl [--limit=N] [--batch_size=B]
        [--json] [--mesh=data:8] [--skip_bad] [--dtype=bfloat16]

The data file is the original release's (one JSON object a line with "ctx", "endings" (4) and "label" 0..3; the
validation split has 10,042 lines). Each candidate is tokens(ctx) + tokens(" " + ending); its loss is the cross
entropy of the ending's tokens only. acc picks the candidate with the lowest summed loss, acc_norm the lowest mean
loss (per ending token). A line with a missing or malformed field, a label outside 0..3, or a candidate longer than
the model's block_size is an error naming the line (--skip_bad: skipped and counted instead). Batches are padded to
a few lengths, so a whole file compiles a handful of programs. --init_from takes what gpt2_jax.convert.load reads
(a train.py out_dir, a Hugging Face directory, nanoGPT, llm.c, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import sharding
from gpt2_jax.config import DTYPES, ConfigError, FlagParser, ModelConfig, plain_warnings, ranged
from gpt2_jax.model import GPT2, KVCache, empty_cache, output_logits
from gpt2_jax.sampling import restrict_vocab
from gpt2_jax.tokenizer import get_tokenizer

N_ENDINGS = 4
# Padded sequence lengths: at most 1.5x padding, and a whole file compiles a handful of programs.
LENGTH_BUCKETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
AT_LEAST_1 = ranged(int, lambda v: v >= 1, "an integer >= 1")
PAD_TOKEN = 0  # right padding: causal attention never lets a real position see it


@dataclasses.dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in its file
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]  # tokens of " " + ending, one per candidate
    label: int


def _fields(record) -> tuple[str, list[str], int]:
    """(ctx, endings, label) of one parsed line, or a ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object with ctx, endings and label; got {type(record).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}; expected ctx, endings (4) and label")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise ValueError(f"ctx must be a non-empty string; got {ctx!r:.60}")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        raise ValueError(f"endings must be a list of {N_ENDINGS} strings; got {endings!r:.80}")
    if isinstance(label, str) and label.strip().isdigit():  # the Hugging Face copy stores labels as strings
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise ValueError(f"label must be an integer 0..{N_ENDINGS - 1}; got {label!r}")
    return ctx, endings, label


def parse_example(text: str, line: int, block_size: int) -> Example:
    """One line of the HellaSwag file as an Example, or a ValueError saying what is wrong with it."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    ctx, endings, label = _fields(record)
    tokenizer = get_tokenizer()
    context = tuple(tokenizer.encode(ctx))
    candidates = tuple(tuple(tokenizer.encode(" " + e)) for e in endings)
    longest = len(context) + max(map(len, candidates))
    if longest > block_size:
        raise ValueError(f"context + ending is {longest} tokens, more than the model's block_size {block_size}")
    return Example(line, context, candidates, label)


def read_hellaswag(path: str | Path, block_size: int, limit: int | None = None,
                   skip_bad: bool = False) -> tuple[list[Example], list[str]]:
    """(examples, one message per skipped line) from a HellaSwag JSONL file: its first `limit` examples.

    A bad line raises a ValueError naming the file and line, unless skip_bad, which skips it. Blank lines are ignored.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--data {path}: {getattr(e, 'strerror', None) or e}") from None
    examples, skipped = [], []
    for line_no, text in enumerate(lines, start=1):
        if limit is not None and len(examples) >= limit:
            break
        if not text.strip():
            continue
        try:
            examples.append(parse_example(text, line_no, block_size))
        except ValueError as e:
            message = f"{path}:{line_no}: {e}"
            if not skip_bad:
                raise ValueError(message + " (--skip_bad skips such lines)") from None
            skipped.append(message)
    if not examples:
        raise ValueError(f"--data {path}: no examples" + (f" ({len(skipped)} bad lines skipped)" if skipped else ""))
    return examples, skipped


@dataclasses.dataclass
class Rows:
    """A padded batch of scored rows: row r reads tokens_RT[r] and predicts targets_RT[r] (the same tokens one
    position on); its continuation's targets are at positions first_R[r] .. first_R[r] + length_R[r] - 1."""
    tokens_RT: np.ndarray
    targets_RT: np.ndarray
    first_R: np.ndarray
    length_R: np.ndarray
    window: int  # E: positions scored per row (a static shape)


def bucket(n: int, cap: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The first bucket >= n, at most cap (n <= cap)."""
    return min(cap, next((b for b in buckets if b >= n), cap))


def make_rows(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_rows: int, block_size: int) -> Rows:
    """(context, continuation) token pairs as n_rows padded rows; rows past the pairs score nothing. The last token
    is only predicted, never read: a pair fits in block_size + 1 tokens."""
    T = bucket(max(len(c) + len(e) for c, e in pairs) - 1, block_size)
    E = bucket(max(len(e) for _, e in pairs), T, (8, 16, 32, 64, 128, 256, 512, 1024, 2048))
    tokens_RT = np.full((n_rows, T + 1), PAD_TOKEN, np.int32)
    first_R, length_R = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.int32)
    for r, (context, continuation) in enumerate(pairs):
        row = list(context) + list(continuation)
        tokens_RT[r, :len(row)] = row
        first_R[r], length_R[r] = len(context) - 1, len(continuation)
    return Rows(tokens_RT[:, :-1], tokens_RT[:, 1:], first_R, length_R, E)


def row_scores(config: ModelConfig, params, tokens_RT, targets_RT, first_R, length_R, window: int):
    """(sum of log p(continuation token), whether every one is the argmax) per row, in float32.

    Only the window positions that predict a continuation get logits: [R, E, V] instead of [R, T, V].
    """
    model = GPT2(config)
    e_E = jnp.arange(window)
    at_RE = jnp.minimum(first_R[:, None] + e_E, tokens_RT.shape[1] - 1)
    target_RE = jnp.take_along_axis(targets_RT, at_RE, axis=1)
    if config.tie_embeddings:
        x_RTC = model.apply({"params": params}, tokens_RT, head=False)
        x_REC = jnp.take_along_axis(x_RTC, at_RE[..., None], axis=1)
        logits_REV = output_logits(x_REC, params["wte"], config.precision)[..., :config.vocab_size]
    else:
        logits_REV = jnp.take_along_axis(model.apply({"params": params}, tokens_RT), at_RE[..., None], axis=1)
    picked_RE = jnp.take_along_axis(logits_REV, target_RE[..., None], axis=-1)[..., 0]
    logp_RE = picked_RE - jax.nn.logsumexp(logits_REV, axis=-1)
    scored_RE = e_E < length_R[:, None]
    greedy_RE = jnp.argmax(logits_REV, axis=-1) == target_RE
    return jnp.sum(jnp.where(scored_RE, logp_RE, 0.0), axis=-1), jnp.all(greedy_RE | ~scored_RE, axis=-1)


@dataclasses.dataclass
class Choices:
    """A padded batch of examples, each context read once: prefix_BP = context[:-1] of example b (prefix_len_B real
    tokens); row r = 4b + k reads [context[-1]] + ending k[:-1] (inputs_RE) and predicts ending k (targets_RE),
    length_R real tokens."""
    prefix_BP: np.ndarray
    prefix_len_B: np.ndarray
    inputs_RE: np.ndarray
    targets_RE: np.ndarray
    length_R: np.ndarray


def make_choices(examples: Sequence[Example], n_examples: int) -> Choices:
    """Examples as a padded Choices batch of n_examples (extra examples score nothing)."""
    P = bucket(max(len(ex.context) - 1 for ex in examples), 1 << 30, (16,) + LENGTH_BUCKETS)
    E = bucket(max(len(e) for ex in examples for e in ex.endings), 1 << 30, (8, 16, 24) + LENGTH_BUCKETS)
    prefix_BP = np.full((n_examples, P), PAD_TOKEN, np.int32)
    prefix_len_B = np.zeros(n_examples, np.int32)
    inputs_RE = np.full((N_ENDINGS * n_examples, E), PAD_TOKEN, np.int32)
    targets_RE = np.full((N_ENDINGS * n_examples, E), PAD_TOKEN, np.int32)
    length_R = np.zeros(N_ENDINGS * n_examples, np.int32)
    for b, ex in enumerate(examples):
        prefix_BP[b, :len(ex.context) - 1] = ex.context[:-1]
        prefix_len_B[b] = len(ex.context) - 1
        for k, ending in enumerate(ex.endings):
            r = N_ENDINGS * b + k
            inputs_RE[r, :len(ending)] = (ex.context[-1],) + ending[:-1]
            targets_RE[r, :len(ending)] = ending
            length_R[r] = len(ending)
    return Choices(prefix_BP, prefix_len_B, inputs_RE, targets_RE, length_R)


def choice_scores(config: ModelConfig, params, prefix_BP, prefix_len_B, inputs_RE, targets_RE, length_R):
    """Summed log p of each ending [R = 4B], in float32. The contexts (less their last token) go through the model
    once into a KV cache that the example's four endings then attend to: about half the work of four full rows."""
    model = GPT2(config)
    (B, P), E = prefix_BP.shape, inputs_RE.shape[1]
    slot_S = jnp.arange(P + E)
    # Not init_cache: the padded P + E may pass block_size (positions are clipped below).
    cache = empty_cache(config, B, P + E)
    # The prefill's logits are unused, so XLA drops the output layer from it.
    _, cache = model.apply({"params": params}, prefix_BP, attn_mask=slot_S < prefix_len_B[:, None], cache=cache)
    cache = KVCache(k=tuple(jnp.repeat(k, N_ENDINGS, axis=0) for k in cache.k),
                    v=tuple(jnp.repeat(v, N_ENDINGS, axis=0) for v in cache.v), index=cache.index)
    prefix_len_R = jnp.repeat(prefix_len_B, N_ENDINGS)
    positions_RE = jnp.minimum(prefix_len_R[:, None] + jnp.arange(E), config.block_size - 1)
    seen_RS = (slot_S < prefix_len_R[:, None]) | (slot_S >= P)  # its own context and its own ending (causal)
    logits_REV, _ = model.apply({"params": params}, inputs_RE, positions=positions_RE, attn_mask=seen_RS, cache=cache)
    picked_RE = jnp.take_along_axis(logits_REV, targets_RE[..., None], axis=-1)[..., 0]
    logp_RE = picked_RE - jax.nn.logsumexp(logits_REV, axis=-1)
    return jnp.sum(jnp.where(jnp.arange(E) < length_R[:, None], logp_RE, 0.0), axis=-1)


@functools.lru_cache(maxsize=8)
def choice_scorer(config: ModelConfig, mesh=None) -> Callable:
    """jit(choice_scores) for this config (and mesh: examples and rows split over data and fsdp)."""
    fn = functools.partial(choice_scores, config)
    if mesh is None:
        return jax.jit(fn)
    rows, row = _split_rows(mesh, 2), _split_rows(mesh, 1)
    return jax.jit(sharding.with_activation_layout(fn, mesh),
                   in_shardings=(sharding.param_shardings(config, mesh), rows, row, rows, rows, row),
                   out_shardings=sharding.replicated(mesh))


def _on_mesh(arrays: Sequence[np.ndarray], mesh) -> tuple:
    """Host arrays as global arrays with rows split over data and fsdp; each process places its own devices'
    rows (the same on every process), so this works across hosts too."""
    if mesh is None:
        return tuple(arrays)
    return tuple(jax.make_array_from_callback(a.shape, _split_rows(mesh, a.ndim), lambda i, a=a: a[i])
                 for a in arrays)


def _split_rows(mesh, ndim: int):
    """Rows (the leading axis) split over data and fsdp, the rest whole."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES, *(None,) * (ndim - 1)))


@functools.lru_cache(maxsize=8)
def scorer(config: ModelConfig, mesh=None) -> Callable:
    """jit(row_scores) for this config (and mesh: rows split over data and fsdp, weights by the rules)."""
    fn = functools.partial(row_scores, config)
    if mesh is None:
        return jax.jit(fn, static_argnums=5)
    rep, rows, row = sharding.replicated(mesh), _split_rows(mesh, 2), _split_rows(mesh, 1)
    return jax.jit(sharding.with_activation_layout(fn, mesh), static_argnums=5,
                   in_shardings=(sharding.param_shardings(config, mesh), rows, rows, row, row),
                   out_shardings=(rep, rep))


def score(config: ModelConfig, params, rows: Rows, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """row_scores of a Rows batch as numpy, on the mesh if given (every process passes the same rows)."""
    arrays = _on_mesh((rows.tokens_RT, rows.targets_RT, rows.first_R, rows.length_R), mesh)
    logp_R, greedy_R = scorer(config, mesh)(params, *arrays, rows.window)
    return np.asarray(logp_R, np.float64), np.asarray(greedy_R)


def check_model(config: ModelConfig) -> ModelConfig:
    """config restricted to the tokenizer's ids (a padded vocabulary's extra logits are no candidates' tokens)."""
    n_vocab = get_tokenizer().n_vocab
    if config.vocab_size < n_vocab:
        raise ValueError(f"the model's vocabulary has {config.vocab_size} tokens; scoring text needs GPT-2's "
                         f"tokenizer's {n_vocab}")
    return restrict_vocab(config, n_vocab)


def batch_order(examples: Sequence[Example], batch_size: int) -> list[list[int]]:
    """Indices of examples in batches of batch_size, shortest first (little padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].context) + max(map(len, examples[i].endings)))
    return [order[lo:lo + batch_size] for lo in range(0, len(order), batch_size)]


def candidate_losses(config: ModelConfig, params, examples: Sequence[Example], batch_size: int, mesh=None,
                     on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(summed loss [N, 4], ending tokens [N, 4]) of every candidate: batch_size examples (4 rows each) a call,
    examples of similar length batched together. on_batch(examples done) after each batch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if not examples:
        raise ValueError("no examples to score")
    if mesh is not None:
        sharding.check_batch_size(mesh, batch_size)
    config = check_model(config)
    for ex in examples:
        if len(ex.context) + max(map(len, ex.endings)) > config.block_size:
            raise ValueError(f"line {ex.line}: context + ending is longer than the model's block_size "
                             f"{config.block_size}")
    loss_N4 = np.zeros((len(examples), N_ENDINGS))
    count_N4 = np.array([[len(e) for e in ex.endings] for ex in examples]).reshape(-1, N_ENDINGS)
    for ids in batch_order(examples, batch_size):
        c = make_choices([examples[i] for i in ids], batch_size)
        arrays = _on_mesh((c.prefix_BP, c.prefix_len_B, c.inputs_RE, c.targets_RE, c.length_R), mesh)
        logp_R = np.asarray(choice_scorer(config, mesh)(params, *arrays), np.float64)
        loss_N4[ids] = -logp_R[:N_ENDINGS * len(ids)].reshape(-1, N_ENDINGS)
        if on_batch is not None:
            on_batch(len(ids))
    return loss_N4, count_N4


def hellaswag(config: ModelConfig, params, examples: Sequence[Example], batch_size: int = 8, mesh=None,
              on_batch: Callable[[int], None] | None = None) -> dict:
    """{acc, acc_norm, n, seconds, examples_per_s} over examples (read_hellaswag), scored completion-style."""
    start = time.perf_counter()
    loss_N4, count_N4 = candidate_losses(config, params, examples, batch_size, mesh, on_batch)
    seconds = time.perf_counter() - start
    labels_N = np.array([ex.label for ex in examples])
    return {"acc": float(np.mean(np.argmin(loss_N4, axis=1) == labels_N)),
            "acc_norm": float(np.mean(np.argmin(loss_N4 / count_N4, axis=1) == labels_N)),
            "n": len(examples), "seconds": seconds, "examples_per_s": len(examples) / seconds}


def load_model(path: str, dtype: str = "float32") -> tuple[ModelConfig, dict]:
    """(config, params) from anything gpt2_jax.convert.load reads, params and compute in dtype."""
    from gpt2_jax import convert

    cfg, params = convert.load_init_from(path, dtype)
    return check_model(cfg), params


def parse_args(argv: list[str]):
    p = FlagParser(prog="python -m gpt2_jax.evaluate", description=__doc__)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    h = tasks.add_parser("hellaswag", help="HellaSwag, completion-style (llm.c's scoring)")
    h.add_argument("--init_from", required=True, help="a train.py out_dir or a weights file/directory")
    h.add_argument("--data", required=True, type=Path, help="HellaSwag JSONL (e.g. hellaswag_val.jsonl)")
    h.add_argument("--limit", type=AT_LEAST_1, default=None, help="score only the first N examples")
    h.add_argument("--batch_size", type=AT_LEAST_1, default=8, help="examples per batch (4 rows each)")
    h.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype")
    h.add_argument("--mesh", default="", help="shard over this process's devices, e.g. data:8 (docs/scaling.md)")
    h.add_flag("skip_bad", bool, default=False, help="skip (and count) bad lines instead of stopping")
    h.add_flag("json", bool, default=False, help="end with one JSON line: acc, acc_norm, n, seconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(sys.argv[1:] if argv is None else argv)
    sharding.order_host_collectives()
    try:
        cfg, params = load_model(args.init_from, args.dtype)
        mesh = sharding.make_mesh(args.mesh) if args.mesh else None
        if mesh is not None:
            sharding.check_batch_size(mesh, args.batch_size)
            params = sharding.shard_params(cfg, params, mesh)
        examples, skipped = read_hellaswag(args.data, cfg.block_size, args.limit, args.skip_bad)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    main_process = sharding.is_main_process()
    with tqdm(total=len(examples), unit="example", file=sys.stderr, disable=not main_process) as bar:
        result = hellaswag(cfg, params, examples, args.batch_size, mesh, on_batch=bar.update)
    result["skipped"] = len(skipped)
    if main_process:
        print(f"hellaswag: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} n {result['n']} "
              f"({len(skipped)} skipped) in {result['seconds']:.1f} s, {result['examples_per_s']:.1f} examples/s")
        if args.json:
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
