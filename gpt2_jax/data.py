"""Token shards: text -> llm.c-format uint16 shards, memory-mapped reading, and deterministic batches.

Shard layout (llm.c): a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros),
then the tokens as uint16. nanoGPT's raw train.bin / val.bin (uint16 tokens, no header) are read too.

    python -m gpt2_jax.data prepare INPUT... --out DIR [--val_fraction F] [--shard_tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt2_jax.tokenizer import get_tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
RAW_NAMES = ("train.bin", "val.bin")  # nanoGPT's headerless files
SPLITS = ("train", "val")
_REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE_TEXT = _REPO / "data" / "shakespeare" / "shakespeare.txt"
SHAKESPEARE_PREPARED = _REPO / "data" / "shakespeare" / "prepared"
SHAKESPEARE_VAL_FRACTION = 0.1
_DOCS_PER_CHUNK = 256  # documents tokenized per encode_batch call, to bound memory on large corpora


class DataError(ValueError):
    """A data file or directory that cannot be used; the message names it."""


def write_shard(path, tokens) -> None:
    """Write tokens (each < 65536) as one llm.c shard."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must be in [0, 65536) to fit uint16; got max {tokens.max()}")
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_shard(path) -> np.ndarray:
    """The tokens of one shard (llm.c format, or raw uint16 for nanoGPT's train.bin/val.bin), memory-mapped."""
    path = Path(path)
    size = path.stat().st_size
    if path.name in RAW_NAMES:
        if size % 2:
            raise DataError(f"{path}: a raw uint16 token file must have an even size; it has {size} bytes")
        # (As tokens the magic reads 55432, 308: beyond GPT-2's vocabulary, so no real raw file starts so.)
        if size >= HEADER_BYTES and int(np.fromfile(path, dtype="<i4", count=1)[0]) == MAGIC:
            raise DataError(f"{path} starts with an llm.c shard header, but {path.name} is read as raw uint16 "
                            f"tokens (nanoGPT's layout); rename it, e.g. to {path.stem}_000000.bin")
        return np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, "<u2")
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is too short for the {HEADER_BYTES}-byte llm.c shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic number {magic} (an llm.c shard starts with {MAGIC})")
    if version != VERSION:
        raise DataError(f"{path}: shard version {version} is not supported (only version {VERSION}, uint16 tokens)")
    if size != HEADER_BYTES + 2 * count:
        raise DataError(f"{path}: header says {count} tokens but the file holds {(size - HEADER_BYTES) / 2:g}")
    if count == 0:
        return np.zeros(0, "<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def find_shards(data_dir, split: str) -> list[Path]:
    """A split's files: nanoGPT's {split}.bin, else llm.c shards named like *{split}_000001.bin, sorted."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"data directory {data_dir} {what}")
    raw = data_dir / f"{split}.bin"
    if raw.is_file():
        return [raw]
    pattern = re.compile(rf"(?:^|[_.-]){split}(?:[_.-]\d+)?\.bin$")
    shards = sorted(p for p in data_dir.iterdir() if p.is_file() and pattern.search(p.name))
    if not shards:
        raise DataError(f"no {split} data in {data_dir}: expected {split}.bin (nanoGPT) or llm.c shards "
                        f"named like {split}_000000.bin")
    return shards


class TokenShards:
    """The shards of one split, memory-mapped; batch i is a pure function of (seed, i)."""

    def __init__(self, paths, stream: int = 0):
        self.paths = [Path(p) for p in paths]
        self.shards = [read_shard(p) for p in self.paths]
        self.stream = stream  # keeps the train and val random streams apart
        self._shard_max: list[int] | None = None

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def shard_max(self) -> list[int]:
        """The largest token id of each shard (-1 for an empty one), read once."""
        if self._shard_max is None:
            self._shard_max = [int(s.max()) if len(s) else -1 for s in self.shards]
        return self._shard_max

    def check(self, vocab_size: int, block_size: int) -> None:
        """Raise a DataError if a token does not fit the model's vocabulary or no shard fits one sequence."""
        for path, top in zip(self.paths, self.shard_max()):
            if top >= vocab_size:
                raise DataError(f"{path}: token id {top} is outside the model's vocabulary (vocab_size {vocab_size})")
        if all(len(s) <= block_size for s in self.shards):
            longest = max(len(s) for s in self.shards)
            raise DataError(f"{self.paths[0].parent}: no {SPLITS[self.stream]} shard holds more than "
                            f"block_size={block_size} tokens "
                            f"(the longest has {longest}); use a smaller block_size or more data")

    def batch(self, seed: int, index: int, batch_size: int, block_size: int, accum: int = 1,
              rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
        """x, y int32 [accum, rows, block_size] from uniformly random windows; y is x shifted by one.

        batch_size is the global batch; every process draws all of its window starts (cheap) but reads only
        the windows of its `rows` (default all), so any number of processes trains on the same batches.
        """
        starts_per_shard = np.array([max(len(s) - block_size, 0) for s in self.shards])
        bounds = np.cumsum(starts_per_shard)
        rng = np.random.default_rng([self.stream, seed, index])
        picks = rng.integers(0, bounds[-1], size=(accum, batch_size))[:, rows or slice(None)].ravel()
        if picks.size == 0:
            raise DataError(f"rows {rows} select no row of a batch of {batch_size}")
        which = np.searchsorted(bounds, picks, side="right")
        offsets = picks - (bounds[which] - starts_per_shard[which])
        windows = np.stack([self.shards[w][o: o + block_size + 1] for w, o in zip(which, offsets)]).astype(np.int32)
        windows = windows.reshape(accum, -1, block_size + 1)
        return windows[..., :-1], windows[..., 1:]


def open_split(data_dir, split: str) -> TokenShards:
    """The train or val split of a prepared directory."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}; got {split!r}")
    return TokenShards(find_shards(data_dir, split), stream=SPLITS.index(split))


def input_files(inputs) -> list[Path]:
    """The files the inputs name: files as given, directories recursively (sorted), skipping hidden files and
    anything inside a hidden directory (such as prepare's own temporary output)."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"input {path} does not exist")
    return files


def iter_documents(inputs) -> Iterator[tuple[str, str]]:
    """(source, text) for every document: a file is one, a .jsonl line's "text" is one; directories recurse."""
    for path in input_files(inputs):
        yield from _file_documents(path)


def _file_documents(path: Path) -> Iterator[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix != ".jsonl":
        yield str(path), text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: expected an object with a string field \"text\"")
        yield f"{path}:{number}", record["text"]


def _tokenize_into(raw_file, inputs, num_threads: int) -> int:
    """Append every document's tokens plus <|endoftext|> to raw_file as uint16; returns the document count."""
    tok = get_tokenizer()
    count = 0
    chunk: list[str] = []

    def flush():
        for ids in tok.encode_batch(chunk, num_threads=num_threads):
            raw_file.write(np.asarray(ids + [tok.eot_token], "<u2").tobytes())
        chunk.clear()

    for _, text in iter_documents(inputs):
        chunk.append(text)
        count += 1
        if len(chunk) == _DOCS_PER_CHUNK:
            flush()
    flush()
    return count


def prepare(inputs, out_dir, val_fraction: float = 0.1, shard_tokens: int = 100_000_000,
            num_threads: int | None = None) -> dict:
    """Tokenize the inputs into out_dir/{train,val}_NNNNNN.bin; the last val_fraction of tokens is val.

    Documents are taken in the order given (directories sorted), so the split is deterministic. The
    shards are written into a temporary directory that is renamed to out_dir when complete.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive; got {shard_tokens}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output directory {out_dir} is a file")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"output directory {out_dir} is not empty")
    files = input_files(inputs)  # listed before the temporary directory exists, which may be among them
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, inputs))}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary data directory
    try:
        with open(tmp / "all.raw", "wb") as raw_file:
            documents = _tokenize_into(raw_file, files, num_threads or os.cpu_count() or 1)
        if not documents:
            raise DataError(f"no documents in {', '.join(map(str, inputs))} (only blank .jsonl lines)")
        tokens = np.memmap(tmp / "all.raw", dtype="<u2", mode="r")
        n_val = max(1, int(round(len(tokens) * val_fraction)))
        if n_val >= len(tokens):
            raise DataError(f"{len(tokens)} tokens are too few to split into train and val")
        splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val:]}
        for name, split in splits.items():
            for i, start in enumerate(range(0, len(split), shard_tokens)):
                write_shard(tmp / f"{name}_{i:06d}.bin", split[start: start + shard_tokens])
        summary = {"tokenizer": "gpt2", "documents": documents, "train_tokens": len(splits["train"]),
                   "val_tokens": n_val, "val_fraction": val_fraction, "inputs": [str(p) for p in inputs]}
        del tokens, splits
        (tmp / "all.raw").unlink()
        (tmp / "meta.json").write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, out_dir)  # atomic; replaces only a missing or empty directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def shakespeare(prepared_dir=SHAKESPEARE_PREPARED) -> Path:
    """The bundled Shakespeare corpus as shards, prepared on first use (last 10% of tokens = val)."""
    prepared_dir = Path(prepared_dir)
    if not (prepared_dir / "meta.json").is_file():
        if not SHAKESPEARE_TEXT.is_file():
            raise DataError(f"the bundled corpus {SHAKESPEARE_TEXT} is missing; pass --data=DIR")
        try:
            prepare([SHAKESPEARE_TEXT], prepared_dir, val_fraction=SHAKESPEARE_VAL_FRACTION)
        except (DataError, OSError):
            if not (prepared_dir / "meta.json").is_file():  # not just another process finishing first
                raise
    return prepared_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text files, directories or .jsonl into train/val shards")
    prep.add_argument("inputs", nargs="+", help="text files, directories, or .jsonl files with a 'text' field")
    prep.add_argument("--out", required=True, help="output directory (created; must be empty)")
    prep.add_argument("--val_fraction", type=float, default=0.1, help="fraction of tokens (the last) for val")
    prep.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.inputs, args.out, args.val_fraction, args.shard_tokens)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{summary['documents']} documents: {summary['train_tokens']:,} train and {summary['val_tokens']:,} "
          f"val tokens in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
