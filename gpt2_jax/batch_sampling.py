"""sample.py's prompts files and output JSONL: reading and checking prompts and their own settings, a sample's key
and record (with OpenAI-style logprobs), the settings every line carries, and what --resume checks before it
continues a file."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import numbers
import struct
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from gpt2_jax import sharding
from gpt2_jax.config import ModelConfig, is_integer, ranged, seed_error
from gpt2_jax.sampling import Request, Sampler, context_length, row_key
from gpt2_jax.tokenizer import get_tokenizer

MAX_LOGPROBS = 20  # OpenAI's completions API allows up to 5 (20 in its chat API); --logprobs takes up to 20


@dataclass(frozen=True)
class Settings:
    """What one prompt is sampled with: the flags, overridden by the fields of its JSONL line."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: tuple[str, ...]
    seed: int
    n: int  # samples of the prompt (--num_samples)

    @property
    def sampler(self) -> Sampler:
        return Sampler(self.temperature, self.top_k, self.top_p)


def _stop_error(value) -> str | None:
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
        return "a non-empty string or a list of them"
    return None


# Each numeric setting: (the type a flag's text is read as, whether a value is allowed, what is expected). sample.py's
# flags (setting_flag) and the JSONL fields (line_settings) are checked by this one table.
SETTING_RULES = {
    "max_new_tokens": (int, lambda v: is_integer(v, 1), "an integer >= 1"),
    "temperature": (float, lambda v: _is_real(v) and 0 <= v < math.inf, "a finite number >= 0 (0 = greedy)"),
    "top_k": (int, lambda v: is_integer(v, 0), "an integer >= 0 (0 = off)"),
    "top_p": (float, lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "seed": (int, lambda v: not seed_error(v), "an integer in [0, 2**32)"),
    "n": (int, lambda v: is_integer(v, 1), "an integer >= 1"),
}
SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "stop", "seed", "n")  # what a JSONL line may set


def setting_flag(name: str):
    """The argparse type of the flag that sets `name` (SETTING_RULES)."""
    return ranged(*SETTING_RULES[name])


def _setting_error(name: str, value) -> str | None:
    """What a JSONL line's `name` was expected to be, or None when value is allowed."""
    if name == "stop":
        return _stop_error(value)
    _, ok, expected = SETTING_RULES[name]
    return None if ok(value) else expected


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def line_settings(record: dict) -> tuple[dict, str | None]:
    """(the settings a JSONL line gives, in Settings' types; why one of them is wrong, or None)."""
    given = {}
    for name in sorted(record.keys() & set(SETTINGS)):
        value, expected = record[name], _setting_error(name, record[name])
        if expected:
            return {}, f"'{name}' must be {expected}; got {json.dumps(value, ensure_ascii=False)}"
        if name == "stop":
            value = (value,) if isinstance(value, str) else tuple(value)
        elif name in ("temperature", "top_p"):
            value = float(value)
        given[name] = value
    return given, None


def flag_settings(args) -> Settings:
    """The settings of a prompt whose line gives none."""
    return Settings(args.max_new_tokens, args.temperature, args.top_k, args.top_p, tuple(args.stop), args.seed,
                    args.num_samples)


@dataclass
class Prompt:
    id: str | int
    text: str
    tokens: list[int]
    settings: Settings


def read_prompts(path: Path) -> tuple[list[tuple[int, str | int, str, dict]], list[tuple[int, str]],
                                      dict[str, list[int]]]:
    """([(line, id, text, the line's own settings)], [(line, error)], {ignored JSONL field: its lines}) from a text
    or JSONL prompts file; ids default to the line number. Blank lines and a UTF-8 byte order mark (Windows editors
    write one) are skipped."""
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
            found.append((line_no, line_no, line, {}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append((line_no, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            errors.append((line_no, "expected a JSON object with a string 'prompt' field"))
            continue
        for field in record.keys() - {"prompt", "id"} - set(SETTINGS):
            ignored.setdefault(field, []).append(line_no)
        pid = record.get("id", line_no)
        given, problem = line_settings(record)
        if problem:
            errors.append((line_no, problem))
        elif not isinstance(pid, (str, int)) or isinstance(pid, bool):
            errors.append((line_no, f"'id' must be a string or an integer; got {pid!r}"))
        elif isinstance(pid, str) and (problem := utf8_error(pid)):
            errors.append((line_no, f"'id' {problem}"))
        elif pid in seen:
            errors.append((line_no, f"id {pid!r} is already used on line {seen[pid]}"))
        else:
            seen[pid] = line_no
            found.append((line_no, pid, record["prompt"], given))
    return found, errors, ignored


def ignored_fields_warning(path: Path, ignored: dict[str, list[int]]) -> str | None:
    """One line naming the JSONL fields sample.py does not read, or None."""
    if not ignored:
        return None
    fields = ", ".join(f"{json.dumps(name, ensure_ascii=False)} (line {lines[0]}"
                       + (f" and {len(lines) - 1} more)" if len(lines) > 1 else ")")
                       for name, lines in sorted(ignored.items()))
    return (f"warning: {path}: ignored: {fields}. A line's fields are 'prompt', 'id' and its own settings: "
            f"{', '.join(SETTINGS)}")


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
    """Prompts with their tokens and settings; prompts that are empty, are not UTF-8 or do not fit (with their own
    max_new_tokens), and token ids the model does not have, are (line, error)s."""
    errors, writable, flags = [], [], flag_settings(args)
    for line, pid, text, given in entries:
        problem = utf8_error(text)
        if problem:
            errors.append((line, f"prompt {problem}"))
        else:
            writable.append((line, pid, text, dataclasses.replace(flags, **given), "max_new_tokens" in given))
    token_lists = get_tokenizer().encode_batch([entry[2] for entry in writable], allow_special=True)
    prompts = []
    for (line, pid, text, own, own_limit), tokens in zip(writable, token_lists):
        new = own.max_new_tokens
        if not tokens:
            errors.append((line, "empty prompt (write <|endoftext|> to sample without one)"))
        elif max(tokens) >= cfg.vocab_size:  # a model with a smaller vocabulary than GPT-2's tokenizer
            errors.append((line, f"prompt has token id {max(tokens)}, outside the model's vocabulary "
                                 f"of {cfg.vocab_size}"))
        elif not args.sliding_window and context_length(tokens, new) > cfg.block_size:
            source = "this line's " if own_limit else "--"
            errors.append((line, f"prompt has {len(tokens)} tokens; with {source}max_new_tokens={new} that "
                                 f"exceeds block_size {cfg.block_size} (shorten it or pass --sliding_window)"))
        else:
            prompts.append(Prompt(pid, text, tokens, own))
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


# Settings of the whole run (the same for every line of an --out); the rest may be a line's own.
RUN_SETTINGS = ("sliding_window", "dtype", "weights", "logprobs", "echo")


def settings(args, own: Settings) -> dict:
    """What a sample depends on besides its prompt: its prompt's settings, the run's flags and the weights
    (weights_digest). Written on every line, and --resume must match them."""
    return {"seed": own.seed, "temperature": own.temperature, "top_k": own.top_k, "top_p": own.top_p,
            "max_new_tokens": own.max_new_tokens, "stop": list(own.stop), "sliding_window": args.sliding_window,
            "dtype": args.dtype, "weights": args.weights, "logprobs": args.logprobs, "echo": args.echo}


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


def record(prompt: Prompt, k: int, tokens: list[int], finish_reason: str, args, sample=None) -> dict:
    """One output line; sample (an Engine's Sample) gives the logprobs that --logprobs and --echo ask for."""
    text, n, reason = finish(tokens, finish_reason, prompt.settings.stop)
    line = {"id": prompt.id, "sample": k, "prompt": prompt.text,
            "completion": prompt.text + text if args.echo else text, "prompt_tokens": len(prompt.tokens),
            "completion_tokens": n, "finish_reason": reason, "settings": settings(args, prompt.settings)}
    if args.logprobs is not None:
        line["logprobs"] = logprobs_field(prompt.tokens, sample, n, args.echo, args.logprobs)
    return line


def token_string(token: int) -> str:
    """A token as text; a byte-level piece that is not whole UTF-8 characters as OpenAI writes it: bytes:\\xe2\\x80."""
    raw = get_tokenizer().decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def logprobs_field(prompt_tokens: list[int], sample, n: int, echo: bool, top: int) -> dict:
    """OpenAI's completions `logprobs` for the first n new tokens (the prompt's first with echo), plus token_ids and
    top_token_ids. text_offset: each token's first character in prompt + completion (a token that ends inside a
    UTF-8 character leaves the rest of it to the next one, as the text is decoded)."""
    ids, lps, tops = list(sample.tokens[:n]), list(sample.logprobs[:n]), list(sample.top_logprobs[:n])
    if echo:
        ids, lps, tops = list(prompt_tokens) + ids, list(sample.prompt_logprobs) + lps, \
            list(sample.prompt_top_logprobs) + tops
    tokenizer, decoder = get_tokenizer(), codecs.getincrementaldecoder("utf-8")(errors="replace")
    offset = len(decoder.decode(tokenizer.decode_bytes(prompt_tokens))) if not echo else 0
    offsets = []
    for token in ids:
        offsets.append(offset)
        offset += len(decoder.decode(tokenizer.decode_bytes([token])))
    tops = [None if t is None else list(t[:top]) for t in tops]
    return {"tokens": [token_string(t) for t in ids], "token_logprobs": lps,
            "top_logprobs": [None if t is None else {token_string(i): lp for i, lp in t} for t in tops],
            "text_offset": offsets, "token_ids": ids,
            "top_token_ids": [None if t is None else [i for i, _ in t] for t in tops]}


def stop_check(stops):
    if not stops:
        return None
    tokenizer = get_tokenizer()
    return lambda tokens: find_stop(tokenizer.decode(tokens), stops) >= 0


def requests(prompts: list[Prompt], skip: set[tuple]) -> list[tuple[Prompt, tuple[int, ...]]]:
    """(prompt, the sample numbers it still needs) for every prompt with some left; Request id i is entry i."""
    jobs = [(p, tuple(k for k in range(p.settings.n) if (p.id, k) not in skip)) for p in prompts]
    return [(p, ks) for p, ks in jobs if ks]


def engine_requests(jobs) -> list[Request]:
    """One Engine Request per prompt: its samples share its prefill; sample ks[i] runs with keys[i]."""
    return [Request(id=i, tokens=tuple(p.tokens), keys=tuple(sample_key(p.settings.seed, p.id, k) for k in ks),
                    max_new_tokens=p.settings.max_new_tokens, sampler=p.settings.sampler,
                    is_finished=stop_check(p.settings.stop)) for i, (p, ks) in enumerate(jobs)]


def nonfinite_errors(records: list[dict], dtype: str) -> list[str]:
    """An error for each sample cut short by NaN or infinite logits."""
    hint = "; float16 overflows past 65504: try --dtype=bfloat16" if dtype == "float16" else ""
    return [f"prompt {r['id']!r} sample {r['sample']}: the model's logits became NaN or infinite after "
            f"{r['completion_tokens']} new tokens, so the sample stops there{hint}"
            for r in records if r["finish_reason"] == "nonfinite"]


def write_lines(out_file, records: list[dict]) -> None:
    for r in records:
        out_file.write(json.dumps(r, ensure_ascii=False) + "\n")
    out_file.flush()


def out_problem(args) -> str | None:
    """What makes --out (with --prompts_file, --resume and --stop) unusable, or None."""
    out = args.out
    if args.resume and out is None:
        return "--resume needs --out"
    if out is not None and out.is_dir():
        return f"--out {out} is a directory; expected a file to append JSON lines to"
    if out is not None and args.prompts_file is not None and out.exists() and args.prompts_file.exists() and \
            out.samefile(args.prompts_file):
        return f"--out {out} is the --prompts_file; choose another file"
    if out is not None and out.exists() and not args.resume:
        return f"--out {out} exists; pass --resume to continue it, or choose another file"
    if out is not None and not out.absolute().parent.is_dir():
        return f"--out {out}: the directory {out.absolute().parent} does not exist"
    return "--stop must not be empty" if "" in args.stop else None


def done_samples(path: Path, prompts: list[Prompt], args) -> set[tuple]:
    """(id, sample) pairs already in an --out file, once every line is known to be made with the settings this run
    gives its id (a line of an id this run lacks: with this run's weights and run-wide flags) and to give its id the
    prompt this run gives it; then a last line cut short by an interruption is removed."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if raw[len(complete):] and not raw[len(complete):].startswith(b'{"id": '):
        raise ValueError(f"--resume: {path} ends in a line without a line break that this script did not begin")
    by_id, done = {p.id: p for p in prompts}, set()
    run_wide = settings(args, flag_settings(args))
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
        if made["weights"] != run_wide["weights"]:
            raise ValueError(f"--resume: {path}:{line_no} was made from other weights (SHA-256 "
                             f"{made['weights']}; --init_from {args.init_from} gives {run_wide['weights']}): "
                             "use those weights, or choose another --out")
        made.setdefault("logprobs", None)  # lines from before --logprobs and --echo were made without them
        made.setdefault("echo", False)
        prompt = by_id.get(pair[0])
        made_with = settings(args, prompt.settings) if prompt else run_wide
        names = made_with.keys() | made.keys() if prompt else RUN_SETTINGS
        differ = sorted(k for k in names if made.get(k) != made_with.get(k))
        if differ:
            raise ValueError(f"--resume: {path}:{line_no} was made with {_flags(made, differ)}; this run gives id "
                             f"{pair[0]!r} {_flags(made_with, differ)} (use those settings, or choose another --out)")
        if prompt and prompt.text != r.get("prompt"):
            raise ValueError(f"--resume: {path}:{line_no} has id {pair[0]!r} for the prompt "
                             f"{_quote(r.get('prompt'))}; this run gives it {_quote(prompt.text)} "
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


def load_prompts(args, cfg: ModelConfig) -> tuple[list[Prompt], list[str], str | None]:
    """(the prompts of --prompt or --prompts_file that can be sampled, an error for each of the others, a warning
    naming the JSONL fields that are not read, or None)."""
    if args.prompt is not None:
        prompts, errors = tokenize([(0, 0, args.prompt, {})], cfg, args)
        return prompts, [f"--prompt: {e}" for _, e in errors], None
    entries, line_errors, ignored = read_prompts(args.prompts_file)
    prompts, token_errors = tokenize(entries, cfg, args)
    errors = [f"{args.prompts_file}:{line}: {e}" for line, e in sorted(line_errors + token_errors)]
    return prompts, errors, ignored_fields_warning(args.prompts_file, ignored)


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
