"""Token shards: text -> llm.c-format uint16 shards, memory-mapped reading, and deterministic batches.

Shard layout (llm.c): a header of 256 little-endian int32 (magic 20240520, version 1, token count, zeros),
then the tokens as uint16. nanoGPT's raw train.bin / val.bin (uint16 tokens, no header) are read too.

    python -m gpt2_jax.data prepare INPUT... --out DIR [--val_fraction F] [--shard_tokens N] [--text_field NAME]

Inputs are UTF-8 files and directories (recursive, sorted, following symbolic links, skipping hidden names and the
output directories of earlier prepares). A .jsonl or .json file holds one JSON object per line (JSON Lines, as
datasets' to_json writes) whose string "text" (--text_field) is a document; a .parquet file (FineWeb's) holds one
document a row in its column "text" (--text_field), read one row group at a time; any other file is one document,
read as open(path, encoding="utf-8-sig") reads it: a leading byte order mark dropped, CRLF and CR made LF; a tar or
zip archive is an error (extract it first). Files ending in .gz, .bz2 or .xz are decompressed as they are read (a
.jsonl.gz is JSONL), and .zst (The Pile's .jsonl.zst) when the zstandard package is installed. Each document is its
GPT-2 tokens then <|endoftext|> (50256); a literal "<|endoftext|>" inside a document is ordinary text (the tokens of
its characters, as tiktoken's encode_ordinary gives), so only prepare marks where documents end. Empty documents are
skipped. Long documents are tokenized in pieces on all cores, cut only where GPT-2's pre-tokenizer splits anyway, so
the tokens equal those of the whole text. A file reached twice is read once. The output appears only when complete;
the hidden temporary directory of a prepare killed outright (kill -9, the OOM killer) is removed by the next prepare
of the same output on that host.
"""

from __future__ import annotations

import argparse
import bz2
import codecs
import errno
import fcntl
import glob
import gzip
import io
import json
import lzma
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt2_jax.config import FlagParser, plain_warnings
from gpt2_jax.tokenizer import get_tokenizer

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the header holds the token count as an int32
RAW_NAMES = ("train.bin", "val.bin")  # nanoGPT's headerless files
SPLITS = ("train", "val")
_REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE_TEXT = _REPO / "data" / "shakespeare" / "shakespeare.txt"
SHAKESPEARE_PREPARED = _REPO / "data" / "shakespeare" / "prepared"
SHAKESPEARE_VAL_FRACTION = 0.1
_PIECE_CHARS = 1 << 18  # a long document is tokenized in pieces of about this many characters, in parallel
_BATCH_CHARS = 1 << 23  # characters per encode_batch call: bounds memory (text + Python ints) on any corpus
# GPT-2's pre-tokenizer never puts a non-space and a following space or newline into one pre-token, so a cut
# there leaves the tokens unchanged. Python's \S is narrower than tiktoken's (Unicode White_Space is a subset
# of str.isspace()), which only forgoes some cuts.
_SAFE_CUT = re.compile(r"(?<=\S)[ \n]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class DataError(ValueError):
    """A data file or directory that cannot be used; the message names it."""


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes: every frame in turn (zstd -d of concatenated frames), and an EOFError
    for a file cut short (zstandard's own stream reader returns the bytes it got and says nothing)."""

    def __init__(self, path: Path):
        self._file = None
        try:
            import zstandard  # optional: only .zst inputs need it
        except ImportError:
            raise DataError(f"{path}: reading .zst files needs the zstandard package (pip install zstandard); "
                            f"or decompress it first (zstd -d)") from None
        self._file = open(path, "rb")
        self._errors = (zstandard.ZstdError,)
        self._context = zstandard.ZstdDecompressor()
        self._frame = None
        self._ready, self._start = b"", 0  # decompressed bytes not yet handed out: self._ready[self._start:]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._start == len(self._ready):
            raw = self._file.read(1 << 16)  # zstd packs 1000:1 and more: a small read bounds the output
            if not raw:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the compressed data ends inside a zstd frame")
                return 0
            out = []
            while raw:
                if self._frame is None or self._frame.eof:
                    self._frame = self._context.decompressobj()
                try:
                    out.append(self._frame.decompress(raw))
                except self._errors as e:
                    raise OSError(str(e)) from None
                raw = self._frame.unused_data if self._frame.eof else b""
            self._ready, self._start = b"".join(out), 0
        n = min(len(buffer), len(self._ready) - self._start)
        buffer[:n] = self._ready[self._start:self._start + n]
        self._start += n
        return n

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


def _zstd_open(path: Path, mode: str):
    return io.BufferedReader(_ZstdReader(path))


# read through the standard library, and zstandard's decompressor
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open}


def write_shard(path, tokens) -> None:
    """Write tokens (each < 65536) as one llm.c shard."""
    tokens = np.asarray(tokens)
    if tokens.size > MAX_SHARD_TOKENS:
        raise DataError(f"{path}: {tokens.size} tokens do not fit one llm.c shard (at most {MAX_SHARD_TOKENS})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must be in [0, 65536) to fit uint16; got max {tokens.max()}")
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = MAGIC, VERSION, tokens.size
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(tokens, "<u2").data)  # no copy of a memory-mapped split


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
    """The files the inputs name: files as given, directories recursively (sorted), following symbolic links
    (each directory once) and skipping hidden names (such as prepare's own temporary output) and the output
    directories of earlier prepares (meta.json beside llm.c shards). A file reached twice (named twice, or
    through a symbolic or hard link) is read once, with a warning: a document in both train and val would make
    val loss a lie. A directory that cannot be listed is an error."""
    found = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += _directory_files(path)
        elif path.is_file():
            found.append(path)
        elif path.exists():  # a FIFO, socket or device: reading one would block or never end
            raise DataError(f"input {path} is neither a regular file nor a directory")
        else:
            raise DataError(f"input {path} does not exist")
    files, first = [], {}
    for path in found:
        stat = os.stat(path)
        same = (stat.st_dev, stat.st_ino)  # one file, however it is reached: a symbolic or a hard link
        if same in first:
            warnings.warn(f"input {path} is the same file as {first[same]}; it is read once", stacklevel=2)
            continue
        first[same] = path
        files.append(path)
    return files


def _unreadable_directory(error: OSError):
    """os.walk's onerror: a directory that cannot be listed is an error, not a silent gap in the corpus."""
    raise DataError(f"input directory {error.filename} cannot be read ({error.strerror})")


def _directory_files(root: Path) -> list[Path]:
    files, seen = [], set()
    for parent, dirs, names in os.walk(root, onerror=_unreadable_directory, followlinks=True):
        real = os.path.realpath(parent)
        if real in seen:  # a link loop, or a second link to a directory already read
            dirs.clear()
            continue
        seen.add(real)
        if _is_prepared(Path(parent)):
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # so `seen` keeps the same link everywhere
        for path in (Path(parent, name) for name in names if not name.startswith(".")):
            if path.is_file():
                files.append(path)
            elif not path.exists():
                raise DataError(f"input {path} is a broken symbolic link")
    return sorted(files)


def _is_prepared(directory: Path) -> bool:
    """Whether a directory is prepare's output: meta.json beside a train shard that starts with the llm.c magic."""
    magic = np.array(MAGIC, "<i4").tobytes()
    if not (directory / "meta.json").is_file():
        return False
    for shard in directory.glob("train_*.bin"):
        with open(shard, "rb") as f:
            if f.read(4) == magic:
                return True
    return False


def _archive_kind(head: bytes) -> str | None:
    """'tar' or 'zip' when the first bytes of a file (after decompression) are those of one."""
    if head[257:265] in (b"ustar\x0000", b"ustar  \x00"):  # POSIX and GNU tar headers (text holds no NUL)
        return "tar"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first local file header, or an empty zip
        return "zip"
    return None


def _text_blocks(path: Path) -> Iterator[str]:
    """A UTF-8 file's text in blocks, as open(path, encoding="utf-8-sig") reads it (CRLF and CR made LF)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line, carry, first = 1, "", True
    with _open_binary(path) as f:
        while True:
            raw = f.read(_PIECE_CHARS)
            if first and (kind := _archive_kind(raw)):  # its member names and headers would become text
                raise DataError(f"{path} is a {kind} archive; extract it and pass the directory")
            try:
                text = carry + decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:  # e.object holds no newline before this block's bytes
                line += e.object.count(b"\n", 0, e.start)
                raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}: byte {e.object[e.start]:#04x})") from None
            line += raw.count(b"\n")
            first = False
            carry = "\r" if raw and text.endswith("\r") else ""  # its \n may start the next block
            yield text[: len(text) - len(carry)].replace("\r\n", "\n").replace("\r", "\n")
            if not raw:
                return


_PARQUET_ROWS = 1024  # rows a Parquet batch turns into Python strings at once
_JSON_LINES = 'a .jsonl or .json input is JSON Lines: one {"text": ...} object per line'


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    """The string `field` of each line's object; lines end at LF only (JSON text may hold U+2028 and the like)."""
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason}: byte {raw[e.start]:#04x})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); {_JSON_LINES}") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{number}: expected an object with a string field \"{field}\"; {_JSON_LINES}")
            if bad := _SURROGATE.search(record[field]):
                raise DataError(f"{path}:{number}: \"{field}\" holds the lone surrogate \\u{ord(bad[0]):04x}, "
                                f"which is not Unicode text")
            yield record[field]


def _parquet_texts(path: Path, field: str) -> Iterator[str]:
    """The strings of column `field`, row by row, read one row group at a time (memory bounded by a row group)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet files needs the pyarrow package (pip install pyarrow)") from None
    try:  # read as a buffered stream: pre-buffering would hold the file's column chunks in memory (1 GB for 1 GB)
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a Parquet file ({e})") from None
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise DataError(f"{path} has no column {field!r}; its columns are {schema.names} (choose one with "
                        f"--text_field)")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {field!r} holds {kind}; expected strings")
    batches = (batch for group in range(parquet.num_row_groups)  # one row group at a time
               for batch in parquet.iter_batches(_PARQUET_ROWS, [group], [field], use_threads=False))
    row = 0
    for batch in batches:
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise DataError(f"{path}: row {row} has no {field!r} (null); expected a string")
            yield text


def _pieces(blocks) -> Iterator[tuple[str, bool]]:
    """(piece, is_last) for one document given in blocks: pieces of about _PIECE_CHARS, cut at _SAFE_CUT only."""
    # Each block is searched once and each piece joined once, so megabytes with no cut (CJK on one line, base64)
    # take linear time: the piece so far is held in parts, and only its last character (the look-behind) is kept.
    parts, held, last = [], 0, ""  # the piece so far, its length, and its last character
    for block in blocks:
        text, start = last + block, len(last)
        while cut := _SAFE_CUT.search(text, max(start, start + _PIECE_CHARS - held)):
            parts.append(text[start: cut.start()])
            yield "".join(parts), False
            parts, held, start = [], 0, cut.start()
        parts.append(text[start:])
        held += len(text) - start
        last = text[-1:]
    if held:
        yield "".join(parts), True


def _open_binary(path: Path):
    return COMPRESSED.get(path.suffix.lower(), open)(path, "rb")


def _document_pieces(files, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """(piece, is_last) for every non-empty document of the files, in order; a document is its pieces joined."""
    for path in files:
        compression = path.suffix.lower() if path.suffix.lower() in COMPRESSED else ""
        name = path.name.lower().removesuffix(compression)
        try:
            if name.endswith((".jsonl", ".json", ".parquet")):
                read = _parquet_texts if name.endswith(".parquet") else _jsonl_texts
                for text in read(path, text_field):
                    yield from _pieces([text])
            else:
                yield from _pieces(_text_blocks(path))
        # A damaged or cut-short archive (gzip raises zlib.error for a damaged deflate stream), a failing disk.
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
            what = f"not a complete {compression[1:]} file" if compression else "cannot be read"
            raise DataError(f"{path}: {what} ({e})") from None


def _tokenize_into(raw_file, files, num_threads: int, text_field: str = "text") -> int:
    """Append every document's tokens plus <|endoftext|> to raw_file as uint16; returns the document count."""
    tok = get_tokenizer()
    documents, chars = 0, 0
    batch: list[tuple[str, bool]] = []

    def flush():
        tokens = tok.encode_batch([piece for piece, _ in batch], num_threads=num_threads)
        for ids, (_, last) in zip(tokens, batch):
            raw_file.write(np.array(ids + [tok.eot_token] if last else ids, "<u2").tobytes())
        batch.clear()

    for piece, last in _document_pieces(files, text_field):
        batch.append((piece, last))
        documents += last
        chars += len(piece)
        if chars >= _BATCH_CHARS:
            flush()
            chars = 0
    flush()
    return documents


def prepare(inputs, out_dir, val_fraction: float = 0.1, shard_tokens: int = 100_000_000,
            num_threads: int | None = None, text_field: str = "text") -> dict:
    """Tokenize the inputs into out_dir/{train,val}_NNNNNN.bin; the last val_fraction of tokens is val.

    Documents are taken in the order given (directories sorted), so the split is deterministic. The
    shards are written into a temporary directory that is renamed to out_dir when complete.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1); got {val_fraction}")
    if not 0 < shard_tokens <= MAX_SHARD_TOKENS:
        raise DataError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}] (an llm.c shard header holds the count as "
                        f"an int32); got {shard_tokens}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output directory {out_dir} is a file")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"output directory {out_dir} is not empty")
    if out_dir.is_symlink():  # the finished output is renamed onto the directory it names, not onto the link
        out_dir = out_dir.resolve()
    if os.path.ismount(out_dir):
        raise DataError(f"output directory {out_dir} is a mount point, which the finished output cannot be renamed "
                        f"onto; pass a new directory inside it")
    files = input_files(inputs)  # listed before the temporary directory exists, which may be among them
    if not files:
        raise DataError(f"no input files in {', '.join(map(str, inputs))}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(out_dir)
    tmp, lock = None, None
    try:  # from its creation on: a Ctrl-C or SIGTERM that lands right after it must remove it too
        # Named before it is made: with mkdtemp, a signal landing inside it, after the directory exists, left it.
        tmp = out_dir.parent / (_temporary_prefix(out_dir, os.getpid()) + secrets.token_hex(8))
        tmp.mkdir()
        lock = lock_directory(tmp)  # held until this prepare ends, however it ends: the next one knows a dead one's
        with open(tmp / "all.raw", "wb") as raw_file:
            documents = _tokenize_into(raw_file, files, num_threads or os.cpu_count() or 1, text_field)
        if not documents:
            raise DataError(f"no text in {', '.join(map(str, inputs))}: every document is empty")
        n_tokens = (tmp / "all.raw").stat().st_size // 2
        n_val = max(1, int(round(n_tokens * val_fraction)))
        if n_val >= n_tokens:
            raise DataError(f"{n_tokens} tokens are too few to split into train and val")
        _split_into_shards(tmp / "all.raw", {"train": (0, n_tokens - n_val), "val": (n_tokens - n_val, n_tokens)},
                           shard_tokens)
        summary = {"tokenizer": "gpt2", "documents": documents, "train_tokens": n_tokens - n_val,
                   "val_tokens": n_val, "val_fraction": val_fraction, "inputs": [str(p) for p in inputs]}
        (tmp / "meta.json").write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, out_dir)  # atomic; replaces only a missing or empty directory
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DataError(f"the disk of {out_dir.parent} is full (prepare needs about 2 bytes a token, plus one "
                        f"shard of {shard_tokens:,} tokens, while it writes); nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)
    return summary


def _split_into_shards(raw_path: Path, splits: dict[str, tuple[int, int]], shard_tokens: int) -> None:
    """Write the token ranges of raw_path's splits as shards of shard_tokens, from the last shard to the first,
    cutting each one's tokens off raw_path once written: the disk holds the tokens once, plus one shard."""
    shards = [(f"{name}_{i:06d}.bin", start, min(start + shard_tokens, end))
              for name, (begin, end) in splits.items() for i, start in enumerate(range(begin, end, shard_tokens))]
    for name, start, end in reversed(shards):
        tokens = np.memmap(raw_path, "<u2", mode="r", offset=2 * start, shape=(end - start,))
        write_shard(raw_path.parent / name, tokens)
        del tokens  # unmapped before its part of the file is cut off
        os.truncate(raw_path, 2 * start)
    raw_path.unlink()


def _temporary_prefix(out_dir: Path, pid: int) -> str:
    """prepare's temporary directory beside out_dir: hidden, and naming the host and process that write it."""
    return f".{out_dir.name}.tmp-{socket.gethostname()}-{pid}-"


def _remove_abandoned_temporaries(out_dir: Path) -> None:
    """Delete the temporary directories that killed prepares of out_dir on this host left behind (kill -9 or the
    OOM killer skip the cleanup; a large corpus leaves gigabytes). Another live process's are left alone: its pid
    is alive here, or it holds its directory's lock (a prepare in another PID namespace, such as another container
    with this host name, has a pid this process cannot see)."""
    ours = _temporary_prefix(out_dir, 0).removesuffix("0-")
    for tmp in out_dir.parent.glob(glob.escape(ours) + "*"):
        # HOST-PID-RANDOM, and RANDOM (hex) has no '-': read from the right, so that host 'a' never takes
        # the directory of host 'a-7' (a shared filesystem) for one of its own pid 7's.
        head, pid, _ = (tmp.name.rsplit("-", 2) + ["", ""])[:3]
        if (f"{head}-" == ours and pid.isdigit() and tmp.is_dir() and not _process_alive(int(pid))
                and not _locked(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)


def lock_directory(path: Path) -> int | None:
    """An open descriptor of the directory path holding an exclusive lock, released when it is closed or the
    process ends (kill -9 included); None where locks do not work (some network mounts). BlockingIOError if
    another process holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # a filesystem without locks
        os.close(fd)
        return None
    return fd


def _locked(path: Path) -> bool:
    """Whether another process holds path's lock (False where locks do not work: the pid alone then decides)."""
    try:
        fd = lock_directory(path)
    except BlockingIOError:
        return True
    except OSError:
        return True  # cannot be opened, so cannot be judged: keep it
    if fd is not None:
        os.close(fd)
    return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


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
    parser = FlagParser(prog="python -m gpt2_jax.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize text, .jsonl or .parquet files and directories into shards",
                          description=__doc__.strip().rsplit("\n\n", 1)[1],
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("inputs", nargs="+", help="text files, directories, .jsonl/.json and .parquet files")
    prep.add_argument("--out", required=True, help="output directory (created; must be empty)")
    prep.add_flag("val_fraction", float, default=0.1, help="fraction of tokens (the last) for val")
    prep.add_flag("shard_tokens", int, default=100_000_000, help="tokens per shard file")
    prep.add_argument("--text_field", default="text", help="the field (JSONL) or column (Parquet) holding the text")
    args = parser.parse_args(argv)
    try:
        summary = prepare(args.inputs, args.out, args.val_fraction, args.shard_tokens, text_field=args.text_field)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: nothing was written to {args.out}", file=sys.stderr)
        return 130
    print(f"{summary['documents']} documents: {summary['train_tokens']:,} train and {summary['val_tokens']:,} "
          f"val tokens in {args.out}")
    return 0


if __name__ == "__main__":
    plain_warnings()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler or timeout stopping it: as Ctrl-C
    sys.exit(main())
