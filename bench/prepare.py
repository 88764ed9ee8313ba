"""Tokens/s of `python -m gpt2_jax.data prepare` against a plain loop of tiktoken's encode_ordinary_batch.

    python bench/prepare.py [--mb=50] [--threads=2] [--format=parquet|jsonl|txt]

Cuts documents (500-6,000 characters) from the bundled corpus at random offsets (fixed seed) until they hold --mb
million characters, writes them as one input file in a temporary directory, then times, in this process:
  ours      data.prepare on that file with --threads tokenizer threads: reading, cutting long documents into
            pieces, encoding, <|endoftext|> between documents, writing the llm.c shards;
  baseline  one process looping over the same documents in batches of 1,024, calling tiktoken's
            encode_ordinary_batch(num_threads=--threads) and appending <|endoftext|>, nothing written.
Both count the same tokens (checked). The last line is JSON with ours_tokens_per_s, baseline_tokens_per_s, ratio.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import flags as flags_module  # bench/flags.py

DEFAULTS = {"mb": 50.0, "threads": 2, "format": "parquet", "seed": 0}


def documents(corpus: str, chars: int, seed: int) -> list[str]:
    """Documents cut from the corpus at random offsets until they hold `chars` characters."""
    import numpy as np

    rng, docs, total = np.random.default_rng(seed), [], 0
    while total < chars:
        start, length = int(rng.integers(0, len(corpus) - 6000)), int(rng.integers(500, 6000))
        docs.append(corpus[start: start + length])
        total += length
    return docs


def write_input(path: Path, docs: list[str], kind: str) -> Path:
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), path, row_group_size=10_000)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    else:  # one document a file
        path.mkdir()
        for i, doc in enumerate(docs):
            (path / f"{i:07d}.txt").write_text(doc, encoding="utf-8")
    return path


def baseline(docs: list[str], threads: int) -> int:
    """Tokens of a plain single-process loop over tiktoken's encode_ordinary_batch (plus one <|endoftext|> each)."""
    from gpt2_jax.tokenizer import get_tokenizer

    encoding = get_tokenizer().encoding
    return sum(len(ids) + 1 for i in range(0, len(docs), 1024)
               for ids in encoding.encode_ordinary_batch(docs[i: i + 1024], num_threads=threads))


def main(flags: dict) -> dict:
    if flags["format"] not in ("parquet", "jsonl", "txt"):
        raise SystemExit(f"--format must be parquet, jsonl or txt; got {flags['format']!r}")
    if flags["mb"] <= 0 or flags["threads"] < 1:
        raise SystemExit(f"--mb must be > 0 and --threads >= 1; got {flags['mb']} and {flags['threads']}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gpt2_jax import data

    docs = documents(data.SHAKESPEARE_TEXT.read_text(encoding="utf-8"), int(flags["mb"] * 1e6), flags["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        source = write_input(Path(tmp) / f"docs.{flags['format']}", docs, flags["format"])
        start = time.perf_counter()
        summary = data.prepare([source], Path(tmp) / "out", num_threads=flags["threads"])
        ours_s = time.perf_counter() - start
    ours_tokens = summary["train_tokens"] + summary["val_tokens"]
    start = time.perf_counter()
    base_tokens = baseline(docs, flags["threads"])
    base_s = time.perf_counter() - start
    if base_tokens != ours_tokens:
        raise SystemExit(f"prepare wrote {ours_tokens} tokens but tiktoken gives {base_tokens} for the same text")
    ours, base = ours_tokens / ours_s, base_tokens / base_s
    print(f"{len(docs)} documents, {ours_tokens:,} tokens, {flags['threads']} threads: prepare ({flags['format']}) "
          f"{ours:,.0f} tokens/s in {ours_s:.1f} s; encode_ordinary_batch loop {base:,.0f} tokens/s in {base_s:.1f} s")
    return {"ours_tokens_per_s": ours, "baseline_tokens_per_s": base, "ratio": ours / base, "tokens": ours_tokens,
            "threads": flags["threads"], "format": flags["format"], "mb": flags["mb"]}


if __name__ == "__main__":
    print(json.dumps(main(flags_module.parse_flags(sys.argv[1:], DEFAULTS))))
