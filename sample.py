"""Sample from a trained or converted GPT-2: one prompt streamed to the terminal, or a file of prompts.

    python sample.py --init_from=out --prompt="ROMEO:"                    # streams the completion as it is decoded
    python sample.py --init_from=gpt2.safetensors --prompts_file=prompts.jsonl --out=samples.jsonl --batch_size=16
    python sample.py --init_from=out --prompts_file=prompts.txt --out=samples.jsonl --resume    # after a Ctrl-C

--init_from: a train.py out_dir (orbax: its latest step, or out_dir/STEP for another) or any weights
gpt2_jax.convert.load reads. A prompts file holds one prompt per line, or is JSONL (.jsonl / .json) with a "prompt"
field, an optional "id" and optional settings of its own (max_new_tokens, temperature, top_k, top_p, stop, seed, n:
they replace the flags for that line; other fields are warned about); blank lines and a UTF-8 byte order mark are
ignored. A prompt without an "id" has its line number as id. A file's prompts run in a continuous batch (a finished
sample's slot takes the next prompt at once; --schedule=buckets: length-sorted batches that run until their longest
sample is done), and each sample is appended to --out as it finishes, one JSON line: id, sample, prompt,
completion, prompt_tokens, completion_tokens, finish_reason ("stop", "length" or "nonfinite"), settings (the
line's effective settings, the run's flags that shape a sample and a SHA-256 of the weights) and, with
--logprobs=K, OpenAI-style logprobs (--echo: of the prompt's tokens too). A bad prompt is reported with its line
number and skipped; the others are written and the exit status is 1. --resume writes every missing sample once,
and refuses an --out made with other settings or weights, or one that gave an id another prompt. A sample's random
numbers depend only on its seed, its prompt id and its sample number (docs/sampling.md: batch invariance).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from gpt2_jax.huge_pages import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # glibc reads its tunables when a process starts: before jax allocates anything

import jax
from tqdm import tqdm

from gpt2_jax import sharding
from gpt2_jax.batch_sampling import (MAX_LOGPROBS, Prompt, TextStream, done_samples, engine_requests, kept_samples,
                                     load_prompts, nonfinite_errors, out_problem, record, requests, sample_key,
                                     sampling_failure, setting_flag, stop_check, weights_digest, write_lines)
from gpt2_jax.config import DTYPES, ConfigError, FlagParser, plain_warnings, ranged
from gpt2_jax.sampling import Engine, generate_batch

DEFAULT_NEW_TOKENS = 200
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)
AT_LEAST_1 = ranged(int, lambda v: v >= 1, "an integer >= 1")


def parse_args(argv: list[str]):
    p = FlagParser(description=__doc__)
    p.add_argument("--init_from", required=True, help="a train.py out_dir or a weights file/directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its completion is printed as it is decoded")
    source.add_argument("--prompts_file", type=Path, help="text (one prompt a line) or JSONL with a 'prompt' field")
    p.add_argument("--num_samples", type=setting_flag("n"), default=1)
    p.add_argument("--max_new_tokens", type=setting_flag("max_new_tokens"), default=None,
                   help=f"default {DEFAULT_NEW_TOKENS}, or block_size // 2 for a model with a shorter context")
    p.add_argument("--temperature", type=setting_flag("temperature"), default=0.8)
    p.add_argument("--top_k", type=setting_flag("top_k"), default=200)
    p.add_argument("--top_p", type=setting_flag("top_p"), default=1.0)
    p.add_argument("--seed", type=setting_flag("seed"), default=1337)
    p.add_argument("--batch_size", type=AT_LEAST_1, default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype")
    p.add_argument("--n_head", type=AT_LEAST_1, default=None,
                   help="heads of a weights file that no config JSON describes (tensor shapes cannot tell)")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); <|endoftext|> always")
    p.add_flag("sliding_window", bool, default=False,
               help="go past block_size: a context that outgrows it restarts from its last block_size // 2")
    p.add_argument("--logprobs", type=ranged(int, lambda v: 0 <= v <= MAX_LOGPROBS, f"an integer in [0, "
                                             f"{MAX_LOGPROBS}]"), default=None,
                   help="add each token's log-probability and the K most likely tokens' to every line")
    p.add_flag("echo", bool, default=False, help="put the prompt before the completion (and its logprobs first)")
    p.add_argument("--schedule", choices=("continuous", "buckets"), default="continuous",
                   help="a prompts file: refill each finished slot (continuous) or length-sorted batches (buckets)")
    p.add_argument("--out", type=Path, help="append one JSON line per sample to this file")
    p.add_flag("resume", bool, default=False, help="continue --out, skipping the samples it already has")
    p.add_argument("--mesh", default="", help="shard the weights over this process's devices, e.g. fsdp:8 "
                   "(docs/scaling.md); default: one device")
    args = p.parse_args(argv)
    problem = out_problem(args)
    if problem:
        p.fail(problem)
    return args


def report_nonfinite(records: list[dict], args) -> int:
    """Print an error for each sample cut short by NaN or infinite logits; returns how many there were."""
    errors = nonfinite_errors(records, args.dtype)
    for e in errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    return len(errors)


def run_one(cfg, params, prompt: Prompt, args, out_file, skip: set[tuple]) -> int:
    """Stream each sample of one prompt to stdout as its tokens are decoded (at the end, on a --mesh); returns
    how many samples hit non-finite logits."""
    own, failed = prompt.settings, 0
    for k in range(own.n):
        if (prompt.id, k) in skip:
            continue
        stream, closed = TextStream(own.stop), []
        print(prompt.text, end="", flush=True)

        def show(tokens_B, wrote_B):
            if wrote_B[0] and not closed:
                try:
                    print(stream.feed(int(tokens_B[0])), end="", flush=True)
                except BrokenPipeError as e:  # raised inside XLA's callback it would become an XLA error
                    closed.append(e)

        done = generate_batch(cfg, params, [prompt.tokens], [sample_key(own.seed, prompt.id, k)],
                              max_new_tokens=own.max_new_tokens, sampler=own.sampler,
                              on_token=None if args.mesh else show,
                              is_finished=stop_check(own.stop), sliding_window=args.sliding_window)[0]
        line = record(prompt, k, done.tokens, done.finish_reason, args)
        if out_file is not None:
            write_lines(out_file, [line])
        if closed:
            raise closed[0]
        if args.mesh:  # JAX's ordered host callbacks need one device: on a mesh, print the sample once done
            print("".join(stream.feed(t) for t in done.tokens), end="", flush=True)
        print(stream.flush(), flush=True)
        failed += report_nonfinite([line], args)
        print("-" * 60, flush=True)
    return failed


def run_file(cfg, params, prompts: list[Prompt], args, out_file, skip: set[tuple]) -> int:
    """Generate every (prompt, sample) not in skip on the Engine; write each sample as it finishes. Returns how many
    samples hit non-finite logits."""
    jobs = requests(prompts, skip)
    total = sum(len(ks) for _, ks in jobs)
    if not jobs:
        print(f"every sample is already in {args.out}: nothing to do", file=sys.stderr)
        return 0
    # --logprobs=0 still wants each token's own log-probability: ask the engine for one and keep none of the top.
    engine = Engine(cfg, params, batch_size=min(args.batch_size, total), sliding_window=args.sliding_window,
                    logprobs=0 if args.logprobs is None else max(1, args.logprobs), echo=args.echo,
                    schedule=args.schedule)
    start, made, failed = time.perf_counter(), 0, 0
    with tqdm(total=total, unit="sample", file=sys.stderr) as bar:
        for sample in engine.run(engine_requests(jobs)):
            prompt, ks = jobs[sample.request.id]
            line = record(prompt, ks[sample.index], sample.tokens, sample.finish_reason, args, sample)
            if out_file is not None:
                write_lines(out_file, [line])
            else:
                tqdm.write(json.dumps(line, ensure_ascii=False), file=sys.stdout)
                sys.stdout.flush()  # a line at a time down a pipe, as into --out
            failed += report_nonfinite([line], args)
            made += len(sample.tokens)
            bar.set_postfix_str(f"{made / (time.perf_counter() - start):.1f} tok/s")
            bar.update(1)
    return failed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"error: interrupted{kept_samples(args)}", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly; Python's flush at exit must not fail too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def run(args) -> int:
    """main after the arguments are parsed: load, read and check the prompts, then sample them."""
    from gpt2_jax import checkpoint, convert  # orbax (0.5 s): a damaged checkpoint is one line, not its tracebacks

    checkpoint.quiet_failed_io()
    sharding.order_host_collectives()
    try:
        cfg, params = convert.load_init_from(args.init_from, args.dtype, args.n_head)
        args.weights = weights_digest(params)
        if args.max_new_tokens is None:  # the default leaves room for a prompt in any model's context
            args.max_new_tokens = min(DEFAULT_NEW_TOKENS, max(1, cfg.block_size // 2))
        if not args.sliding_window and args.max_new_tokens > cfg.block_size:  # even a one-token prompt cannot fit
            raise ValueError(f"--max_new_tokens={args.max_new_tokens} is more than the model's block_size "
                             f"{cfg.block_size} (lower it, or pass --sliding_window)")
        if args.mesh:
            params = sharding.shard_params(cfg, params, sharding.make_mesh(args.mesh))
        prompts, errors, warning = load_prompts(args, cfg)
        if warning:
            print(warning, file=sys.stderr)
        skip = done_samples(args.out, prompts, args) if args.resume else set()
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    try:
        out_file = args.out.open("a", encoding="utf-8") if args.out is not None else None
    except OSError as e:
        print(f"error: --out {args.out}: cannot append to it ({e.strerror})", file=sys.stderr)
        return 1
    try:
        failed = 0
        if args.prompt is not None and prompts and args.logprobs is None and not args.echo:
            failed = run_one(cfg, params, prompts[0], args, out_file, skip)
        elif prompts:
            failed = run_file(cfg, params, prompts, args, out_file, skip)
    except jax.errors.JaxRuntimeError as e:
        print(f"error: {sampling_failure(e, args)}", file=sys.stderr)
        return 1
    finally:
        if out_file is not None:
            out_file.close()
    if errors:
        print(f"{len(errors)} prompt(s) skipped; the others are done", file=sys.stderr)
    return 1 if errors or failed else 0


if __name__ == "__main__":
    plain_warnings()
    status = main()
    if status == INTERRUPTED:
        # XLA may still be compiling or running in its own threads; tearing the interpreter down under them can
        # crash (pure virtual method called, segmentation fault). The --out file is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
