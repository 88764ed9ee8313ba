"""Sample from a trained or converted GPT-2: one prompt streamed to the terminal, or a file of prompts in batches.

    python sample.py --init_from=out --prompt="ROMEO:"                    # streams the completion as it is decoded
    python sample.py --init_from=gpt2.safetensors --prompts_file=prompts.jsonl --out=samples.jsonl --batch_size=16
    python sample.py --init_from=out --prompts_file=prompts.txt --out=samples.jsonl --resume    # after a Ctrl-C

--init_from: a train.py out_dir (orbax: its latest step, or out_dir/STEP for another) or any weights
gpt2_jax.convert.load reads (Hugging Face/OpenAI, nanoGPT ckpt.pt, llm.c .bin, the reference PyTorch layout,
OpenAI's TensorFlow checkpoint). A prompts file holds one prompt per line, or is JSONL (.jsonl / .json) with a
"prompt" field and an optional "id" per line (other fields are ignored, with a warning: settings come from the flags
only); blank lines and a UTF-8 byte order mark are ignored. A prompt without an "id" (every prompt of a text file)
has its line number as id, blank lines counted. Prompts are sorted by length into batches; each finished batch is
appended to --out at once, one JSON line per sample: id, sample, prompt, completion, prompt_tokens,
completion_tokens, finish_reason ("stop": <|endoftext|> or a --stop string; "length": --max_new_tokens; "nonfinite":
the model's logits became NaN or infinite, reported as an error too) and settings (the flags that shape a sample,
and a SHA-256 of the weights). A bad prompt is reported with its line number and skipped; the others are written and
the exit status is 1. --resume refuses an --out made with other settings or weights, or one that gave an id another
prompt. A sample's random numbers depend only on --seed, its prompt id and its sample number, never on --batch_size
or its batch neighbours. Those change a sample only through floating-point rounding (XLA rounds products of matrices
with different numbers of rows differently), which now and then tips a sampled token the other way.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gpt2_jax import sharding
from gpt2_jax.config import DTYPES, ConfigError, ModelConfig, plain_warnings, replace, seed_error
from gpt2_jax.sampling import Sampler, context_length, generate_batch, restrict_vocab, row_key
from gpt2_jax.tokenizer import get_tokenizer

DEFAULT_NEW_TOKENS = 200
INTERRUPTED = 130  # the exit status of a command stopped by Ctrl-C (128 + SIGINT)


def _ranged(name: str, cast, ok, expected: str):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text}")
        return value
    parse.__name__ = name
    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init_from", required=True, help="a train.py out_dir or a weights file/directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; its completion is printed as it is decoded")
    source.add_argument("--prompts_file", type=Path, help="text (one prompt a line) or JSONL with a 'prompt' field")
    p.add_argument("--num_samples", type=_ranged("int", int, lambda v: v >= 1, "an integer >= 1"), default=1)
    p.add_argument("--max_new_tokens", type=_ranged("int", int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help=f"default {DEFAULT_NEW_TOKENS}, or block_size // 2 for a model with a shorter context")
    p.add_argument("--temperature", type=_ranged("float", float, lambda v: 0 <= v < math.inf,
                                                 "a finite number >= 0 (0 = greedy)"),
                   default=0.8)
    p.add_argument("--top_k", type=_ranged("int", int, lambda v: v >= 0, "an integer >= 0 (0 = off)"), default=200)
    p.add_argument("--top_p", type=_ranged("float", float, lambda v: 0 < v <= 1, "in (0, 1] (1 = off)"),
                   default=1.0)
    p.add_argument("--seed", type=_ranged("int", int, lambda v: not seed_error(v), "an integer in [0, 2**32)"),
                   default=1337)
    p.add_argument("--batch_size", type=_ranged("int", int, lambda v: v >= 1, "an integer >= 1"), default=8)
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and compute dtype")
    p.add_argument("--n_head", type=_ranged("int", int, lambda v: v >= 1, "an integer >= 1"), default=None,
                   help="heads of a weights file that no config JSON describes (tensor shapes cannot tell)")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable); <|endoftext|> always")
    p.add_argument("--sliding_window", action="store_true",
                   help="go past block_size: a context that outgrows it restarts from its last block_size // 2")
    p.add_argument("--out", type=Path, help="append one JSON line per sample to this file")
    p.add_argument("--resume", action="store_true", help="continue --out, skipping the samples it already has")
    p.add_argument("--mesh", default="", help="shard the weights over this process's devices, e.g. fsdp:8 "
                   "(docs/scaling.md); default: one device")
    args = p.parse_args(argv)
    if args.resume and args.out is None:
        p.error("--resume needs --out")
    if args.out is not None and args.out.is_dir():
        p.error(f"--out {args.out} is a directory; expected a file to append JSON lines to")
    if args.out is not None and args.prompts_file is not None and args.out.exists() and \
            args.prompts_file.exists() and args.out.samefile(args.prompts_file):
        p.error(f"--out {args.out} is the --prompts_file; choose another file")
    if args.out is not None and args.out.exists() and not args.resume:
        p.error(f"--out {args.out} exists; pass --resume to continue it, or choose another file")
    if args.out is not None and not args.out.absolute().parent.is_dir():
        p.error(f"--out {args.out}: the directory {args.out.absolute().parent} does not exist")
    if "" in args.stop:
        p.error("--stop must not be empty")
    return args


def load_model(path: str, dtype: str, n_head: int | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) from --init_from, with params and compute in dtype, and logits for the tokenizer's ids
    only (a padded vocabulary's extra ids cannot be decoded)."""
    from gpt2_jax import convert, layouts

    # A step that an out_dir lacks (out/15) is left to convert.load, whose error names the steps it has.
    if not layouts.weights_exist(path) and convert.orbax_source(Path(path)) is None:
        raise FileNotFoundError(f"--init_from: {layouts.missing_message(path)}")

    cfg, params = convert.load(path, dtype=jnp.dtype(dtype), n_head=n_head)
    cfg = restrict_vocab(cfg, get_tokenizer().n_vocab)
    return replace(cfg, dtype=dtype, param_dtype=dtype), params


@dataclass
class Prompt:
    id: str | int
    text: str
    tokens: list[int]


def read_prompts(path: Path) -> tuple[list[tuple[int, str | int, str]], list[tuple[int, str]],
                                      dict[str, list[int]]]:
    """([(line, id, text)], [(line, error)], {ignored JSONL field: its lines}) from a text or JSONL prompts file;
    ids default to the line number. Blank lines and a UTF-8 byte order mark (Windows editors write one) are
    skipped."""
    jsonl = path.suffix.lower() in (".jsonl", ".json")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"--prompts_file {path}: {e.strerror}") from None
    lines = data.removeprefix(codecs.BOM_UTF8).splitlines()
    if not any(raw.strip() for raw in lines):
        raise ValueError(f"--prompts_file {path}: no prompts (the file is {'blank' if data else 'empty'})")
    if jsonl and data.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"["):  # not one error per line of it
        raise ValueError(f"--prompts_file {path} holds a JSON array; a .jsonl or .json prompts file is JSON Lines: "
                         f"one {{\"prompt\": ...}} object per line")
    found, errors, seen, ignored = [], [], {}, {}
    for line_no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:  # line by line, so that one undecodable line costs only its own prompt
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append((line_no, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"))
            continue
        if not jsonl:
            found.append((line_no, line_no, line))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((line_no, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            errors.append((line_no, "expected a JSON object with a string 'prompt' field"))
            continue
        for field in record.keys() - {"prompt", "id"}:  # e.g. a per-prompt max_new_tokens: not supported
            ignored.setdefault(field, []).append(line_no)
        pid = record.get("id", line_no)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            errors.append((line_no, f"'id' must be a string or an integer; got {pid!r}"))
        elif isinstance(pid, str) and (problem := utf8_error(pid)):
            errors.append((line_no, f"'id' {problem}"))
        elif pid in seen:
            errors.append((line_no, f"id {pid!r} is already used on line {seen[pid]}"))
        else:
            seen[pid] = line_no
            found.append((line_no, pid, record["prompt"]))
    return found, errors, ignored


def ignored_fields_warning(path: Path, ignored: dict[str, list[int]]) -> str | None:
    """One line naming the JSONL fields sample.py does not read (settings come from the flags only), or None."""
    if not ignored:
        return None
    fields = ", ".join(f"{json.dumps(name, ensure_ascii=False)} (line {lines[0]}"
                       + (f" and {len(lines) - 1} more)" if len(lines) > 1 else ")")
                       for name, lines in sorted(ignored.items()))
    return (f"warning: {path}: only 'prompt' and 'id' are read; ignored: {fields}. Every prompt is sampled with "
            "the command-line settings (there are no per-prompt settings)")


def utf8_error(text: str) -> str | None:
    """Why text cannot be written out as UTF-8 (it holds a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        # Python turns each command-line byte that is not UTF-8 into U+DC80..U+DCFF (surrogateescape).
        byte = f", from the byte 0x{code - 0xDC00:02x} that is not UTF-8" if 0xDC80 <= code <= 0xDCFF else ""
        return f"cannot be written as UTF-8: lone surrogate U+{code:04X} at character {e.start + 1}{byte}"
    return None


def tokenize(entries, cfg: ModelConfig, args) -> tuple[list[Prompt], list[tuple[int, str]]]:
    """Prompts with their tokens; prompts that are empty, are not UTF-8 or do not fit, and token ids the model
    does not have, are (line, error)s."""
    errors, writable = [], []
    for line, pid, text in entries:
        problem = utf8_error(text)
        if problem:
            errors.append((line, f"prompt {problem}"))
        else:
            writable.append((line, pid, text))
    token_lists = get_tokenizer().encode_batch([text for _, _, text in writable], allow_special=True)
    prompts = []
    for (line, pid, text), tokens in zip(writable, token_lists):
        if not tokens:
            errors.append((line, "empty prompt (write <|endoftext|> to sample without one)"))
        elif max(tokens) >= cfg.vocab_size:  # a model with a smaller vocabulary than GPT-2's tokenizer
            errors.append((line, f"prompt has token id {max(tokens)}, outside the model's vocabulary "
                                 f"of {cfg.vocab_size}"))
        elif not args.sliding_window and context_length(tokens, args.max_new_tokens) > cfg.block_size:
            errors.append((line, f"prompt has {len(tokens)} tokens; with --max_new_tokens={args.max_new_tokens} "
                                 f"that exceeds block_size {cfg.block_size} (shorten it or pass --sliding_window)"))
        else:
            prompts.append(Prompt(pid, text, tokens))
    return prompts, errors


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class TextStream:
    """Token ids in, printable text out: complete UTF-8 characters only, and never a possible start of a stop
    string until it is known not to be one. Once a stop string appears, nothing more comes out."""

    def __init__(self, stops: list[str]):
        self.tokenizer, self.stops = get_tokenizer(), stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending, self.stopped = "", False

    def feed(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        cut = find_stop(self.pending, self.stops)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out = "" if self.stopped else self.pending + self.decoder.decode(b"", final=True)
        self.pending = ""
        return out


def finish(tokens: list[int], reason: str, stops: list[str]) -> tuple[str, int, str]:
    """(completion text, completion tokens, finish_reason), cut before the first stop string."""
    tokenizer = get_tokenizer()
    text = tokenizer.decode(tokens)
    cut = find_stop(text, stops)
    if cut < 0:
        return text, len(tokens), reason
    n = next(n for n in range(1, len(tokens) + 1) if find_stop(tokenizer.decode(tokens[:n]), stops) >= 0)
    return text[:cut], n, "stop"


def sample_key(seed: int, prompt_id, k: int):
    """A sample's PRNG key from (seed, prompt id, sample number) only. The id enters as 64 bits of a hash of its
    JSON (7 and "7" differ), so two ids of a file share their random numbers with a chance of 2**-64."""
    id_words = struct.unpack("<2I", hashlib.sha256(json.dumps(prompt_id).encode()).digest()[:8])
    return row_key(seed, (*id_words, k))


def settings(args) -> dict:
    """What a sample depends on besides its prompt: the flags and the weights (weights_digest). Written on every
    line, and --resume must match them."""
    return {"seed": args.seed, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "max_new_tokens": args.max_new_tokens, "stop": args.stop, "sliding_window": args.sliding_window,
            "dtype": args.dtype, "weights": args.weights}


def weights_digest(params) -> str:
    """The first 16 hex digits of a SHA-256 of the weights as sampled (names, dtypes, shapes and values), so that
    --resume cannot continue a file with other weights, wherever they are loaded from (0.3 s for gpt2 in fp32)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for name, leaf in sorted((jax.tree_util.keystr(path), leaf) for path, leaf in leaves):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{name} {array.dtype} {array.shape}\n".encode())
        digest.update(array.view(np.uint8).data)
    return digest.hexdigest()[:16]


def record(prompt: Prompt, k: int, done, args) -> dict:
    text, n, reason = finish(done.tokens, done.finish_reason, args.stop)
    return {"id": prompt.id, "sample": k, "prompt": prompt.text, "completion": text,
            "prompt_tokens": len(prompt.tokens), "completion_tokens": n, "finish_reason": reason,
            "settings": settings(args)}


def stop_check(stops: list[str]):
    if not stops:
        return None
    tokenizer = get_tokenizer()
    return lambda tokens: find_stop(tokenizer.decode(tokens), stops) >= 0


def nonfinite(records: list[dict], args) -> int:
    """Print an error for each sample cut short by NaN or infinite logits; returns how many there were."""
    hint = "; float16 overflows past 65504: try --dtype=bfloat16" if args.dtype == "float16" else ""
    bad = [r for r in records if r["finish_reason"] == "nonfinite"]
    for r in bad:
        print(f"error: prompt {r['id']!r} sample {r['sample']}: the model's logits became NaN or infinite after "
              f"{r['completion_tokens']} new tokens, so the sample stops there{hint}", file=sys.stderr, flush=True)
    return len(bad)


def run_one(cfg, params, prompt: Prompt, args, out_file, skip: set[tuple]) -> int:
    """Stream each sample of one prompt to stdout as its tokens are decoded (at the end, on a --mesh); returns
    how many samples hit non-finite logits."""
    sampler, failed = Sampler(args.temperature, args.top_k, args.top_p), 0
    for k in range(args.num_samples):
        if (prompt.id, k) in skip:
            continue
        stream, closed = TextStream(args.stop), []
        print(prompt.text, end="", flush=True)

        def show(tokens_B, wrote_B):
            if wrote_B[0] and not closed:
                try:
                    print(stream.feed(int(tokens_B[0])), end="", flush=True)
                except BrokenPipeError as e:  # raised inside XLA's callback it would become an XLA error
                    closed.append(e)

        done = generate_batch(cfg, params, [prompt.tokens], [sample_key(args.seed, prompt.id, k)],
                              max_new_tokens=args.max_new_tokens, sampler=sampler,
                              on_token=None if args.mesh else show,
                              is_finished=stop_check(args.stop), sliding_window=args.sliding_window)[0]
        line = record(prompt, k, done, args)
        if out_file is not None:
            write_lines(out_file, [line])
        if closed:
            raise closed[0]
        if args.mesh:  # JAX's ordered host callbacks need one device: on a mesh, print the sample once done
            print("".join(stream.feed(t) for t in done.tokens), end="", flush=True)
        print(stream.flush(), flush=True)
        failed += nonfinite([line], args)
        print("-" * 60, flush=True)
    return failed


def write_lines(out_file, records: list[dict]) -> None:
    for r in records:
        out_file.write(json.dumps(r, ensure_ascii=False) + "\n")
    out_file.flush()


def done_samples(path: Path, prompts: list[Prompt], args) -> set[tuple]:
    """(id, sample) pairs already in an --out file, once every line is known to be made with this run's settings
    and to give its id the prompt this run gives it; then a last line cut short by an interruption is removed."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if raw[len(complete):] and not raw[len(complete):].startswith(b'{"id": '):
        raise ValueError(f"--resume: {path} ends in a line without a line break that this script did not begin")
    texts, made_with, done = {p.id: p.text for p in prompts}, settings(args), set()
    for line_no, line in enumerate(complete.splitlines(), start=1):
        try:
            r = json.loads(line)
            pair, made = (r["id"], r["sample"]), dict(r["settings"])
            hash(pair)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--resume: {path}:{line_no} is not a line this version of sample.py writes") from None
        if "weights" not in made:  # written before the settings named the weights: they cannot be checked
            raise ValueError(f"--resume: {path}:{line_no} has no SHA-256 of its weights (an earlier sample.py wrote "
                             "it), so this run cannot tell whether --init_from holds them: choose another --out")
        if made["weights"] != made_with["weights"]:
            raise ValueError(f"--resume: {path}:{line_no} was made from other weights (SHA-256 "
                             f"{made['weights']}; --init_from {args.init_from} gives {made_with['weights']}): "
                             "use those weights, or choose another --out")
        differ = sorted(k for k in made_with.keys() | made.keys() if made.get(k) != made_with.get(k))
        if differ:
            raise ValueError(f"--resume: {path}:{line_no} was made with {_flags(made, differ)}; this run has "
                             f"{_flags(made_with, differ)} (use those settings, or choose another --out)")
        if pair[0] in texts and texts[pair[0]] != r.get("prompt"):
            raise ValueError(f"--resume: {path}:{line_no} has id {pair[0]!r} for the prompt "
                             f"{_quote(r.get('prompt'))}; this run gives it {_quote(texts[pair[0]])} "
                             "(choose another --out)")
        done.add(pair)
    if len(complete) < len(raw):
        path.write_bytes(complete)
    return done


def _flags(values: dict, names: list[str]) -> str:
    return " ".join(f"--{name}={json.dumps(values.get(name))}" for name in names)


def _quote(text) -> str:
    """text as JSON, cut after 40 characters: an error message stays one readable line."""
    if isinstance(text, str) and len(text) > 40:
        return json.dumps(text[:40], ensure_ascii=False) + "..."
    return json.dumps(text, ensure_ascii=False)


def run_file(cfg, params, prompts: list[Prompt], args, out_file, skip: set[tuple]) -> int:
    """Generate every (prompt, sample) not in skip, in length-sorted batches; write each batch when done. Returns
    how many samples hit non-finite logits."""
    jobs = [(p, k) for p in sorted(prompts, key=lambda p: len(p.tokens)) for k in range(args.num_samples)
            if (p.id, k) not in skip]
    if not jobs:
        print(f"every sample is already in {args.out}: nothing to do", file=sys.stderr)
        return 0
    sampler, check = Sampler(args.temperature, args.top_k, args.top_p), stop_check(args.stop)
    B = min(args.batch_size, max(1, len(jobs)))
    start, made, failed = time.perf_counter(), 0, 0
    with tqdm(total=len(jobs), unit="sample", file=sys.stderr) as bar:
        for i in range(0, len(jobs), B):
            batch = jobs[i:i + B]
            done = generate_batch(cfg, params, [p.tokens for p, _ in batch],
                                  [sample_key(args.seed, p.id, k) for p, k in batch], batch_size=B,
                                  max_new_tokens=args.max_new_tokens, sampler=sampler, is_finished=check,
                                  sliding_window=args.sliding_window)
            records = [record(p, k, c, args) for (p, k), c in zip(batch, done)]
            if out_file is not None:
                write_lines(out_file, records)
            else:
                for r in records:
                    tqdm.write(json.dumps(r, ensure_ascii=False), file=sys.stdout)
                sys.stdout.flush()  # a batch at a time down a pipe, as into --out
            failed += nonfinite(records, args)
            made += sum(len(c.tokens) for c in done)
            bar.set_postfix_str(f"{made / (time.perf_counter() - start):.1f} tok/s")
            bar.update(len(batch))
    return failed


def sampling_failure(error: Exception, args) -> str:
    """XLA's first line, what to try, and where the finished samples are."""
    first, cause = sharding.runtime_error_cause(error)
    hint = {"memory": "; a batch does not fit in device memory: lower --batch_size (or --max_new_tokens)",
            "process": "; another process may have stopped: see its log"}.get(cause, "")
    return f"sampling failed: {first}{hint}{kept_samples(args)}"


def kept_samples(args) -> str:
    if args.out is None:
        return ""
    return f"; the samples written to {args.out} are kept: add --resume to make the rest"


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
    from gpt2_jax import checkpoint  # orbax (0.5 s to import): a damaged checkpoint is one line, not its tracebacks

    checkpoint.quiet_failed_io()
    sharding.order_host_collectives()
    try:
        cfg, params = load_model(args.init_from, args.dtype, args.n_head)
        args.weights = weights_digest(params)
        if args.max_new_tokens is None:  # the default leaves room for a prompt in any model's context
            args.max_new_tokens = min(DEFAULT_NEW_TOKENS, max(1, cfg.block_size // 2))
        if not args.sliding_window and args.max_new_tokens > cfg.block_size:  # even a one-token prompt cannot fit
            raise ValueError(f"--max_new_tokens={args.max_new_tokens} is more than the model's block_size "
                             f"{cfg.block_size} (lower it, or pass --sliding_window)")
        if args.mesh:
            params = sharding.shard_params(cfg, params, sharding.make_mesh(args.mesh))
        if args.prompt is not None:
            prompts, errors = tokenize([(0, 0, args.prompt)], cfg, args)
            errors = [f"--prompt: {e}" for _, e in errors]
        else:
            entries, line_errors, ignored = read_prompts(args.prompts_file)
            if warning := ignored_fields_warning(args.prompts_file, ignored):
                print(warning, file=sys.stderr)
            prompts, token_errors = tokenize(entries, cfg, args)
            errors = [f"{args.prompts_file}:{line}: {e}" for line, e in sorted(line_errors + token_errors)]
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
        if args.prompt is not None and prompts:
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
