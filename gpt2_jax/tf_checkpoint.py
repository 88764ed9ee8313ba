"""TensorFlow checkpoints (OpenAI's original GPT-2 release) read without TensorFlow.

A TF checkpoint `PREFIX` is `PREFIX.index`, a LevelDB-format table mapping each tensor name to a serialized
BundleEntryProto (dtype, shape, shard, offset, size), and `PREFIX.data-SSSSS-of-NNNNN` files holding the raw
tensor bytes. The table is parsed here (uncompressed blocks, as TensorFlow writes bundle indexes) and every
tensor becomes a read-only memory-mapped numpy view, so nothing is copied before conversion.
"""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np

from gpt2_jax.weight_files import WeightsError

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's table magic number, the last 8 bytes of the index
FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the magic
BLOCK_TRAILER_BYTES = 5  # after each block: compression type (1 byte), crc32c (4 bytes)
# TensorFlow's DataType enum values of the float types a GPT-2 checkpoint may hold.
TF_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 14: np.dtype(ml_dtypes.bfloat16), 19: np.dtype("<f2")}


def checkpoint_prefix(path: str | Path) -> Path | None:
    """The checkpoint prefix that path names (a directory holding one, the prefix, or one of its files), or None."""
    path = Path(path)
    if path.is_dir():
        indexes = sorted(path.glob("*.index"))
        named = path / "model.ckpt.index"  # OpenAI's download_model.py layout
        latest = _latest_index(path)  # the newest of a fine-tuning run's several, as tf.train.latest_checkpoint
        index = latest or (named if named in indexes else indexes[0] if len(indexes) == 1 else None)
        return index.with_suffix("") if index is not None else None
    if path.suffix == ".index" and path.is_file():
        return path.with_suffix("")
    # The checkpoint's other files (OpenAI's directory holds model.ckpt.meta and model.ckpt.data-00000-of-00001).
    other = re.fullmatch(r"(.+)\.(meta|data-\d{5}-of-\d{5})", path.name)
    if other is not None and path.is_file() and (path.parent / f"{other.group(1)}.index").is_file():
        return path.parent / other.group(1)
    if Path(f"{path}.index").is_file():
        return path
    return None


def _latest_index(directory: Path) -> Path | None:
    """The .index of the checkpoint that the `checkpoint` file TensorFlow's Saver writes beside its checkpoints
    names (model_checkpoint_path, relative to the directory or absolute), or None."""
    try:
        state = (directory / "checkpoint").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r'^model_checkpoint_path:\s*"(.*)"\s*$', state, re.MULTILINE)
    if found is None:
        return None
    # An absolute path written on another machine: the checkpoint of that name in this directory.
    for prefix in (directory / found.group(1), directory / Path(found.group(1)).name):
        if Path(f"{prefix}.index").is_file():
            return Path(f"{prefix}.index")
    return None


def is_training_state(name: str) -> bool:
    """Whether a tensor is a TF training run's bookkeeping rather than the model: a step counter, Adam's slots and
    beta powers (gpt-2-simple's fine-tuned checkpoints hold them), TF2's object graph."""
    return not name.startswith("model/") or name.rsplit("/", 1)[-1] in ("Adam", "Adam_1")


def read_tf_checkpoint(prefix: str | Path) -> dict[str, np.ndarray]:
    """name -> memory-mapped array of every tensor of the checkpoint PREFIX but its training state (which may
    hold integers and strings)."""
    prefix = Path(prefix)
    index = Path(f"{prefix}.index")
    entries = dict(_table_entries(index))
    if b"" not in entries:
        raise WeightsError(f"{index} has no bundle header: not a TensorFlow V2 checkpoint index")
    header = _fields(entries.pop(b""), index)
    shards, big_endian = header.get(1, 1), header.get(2, 0) == 1
    if big_endian:
        raise WeightsError(f"{index}: the checkpoint was written on a big-endian machine; expected little-endian")
    maps: dict[int, np.memmap] = {}
    arrays = {}
    for key, value in sorted(entries.items()):
        name = key.decode("utf-8", errors="replace")
        if not is_training_state(name):
            arrays[name] = _tensor(prefix, name, _fields(value, index), shards, maps)
    return arrays


def _tensor(prefix: Path, name: str, entry: dict, shards: int, maps: dict) -> np.ndarray:
    """The memory-mapped array that one BundleEntryProto describes."""
    if 7 in entry:
        raise WeightsError(f"{prefix}: tensor {name!r} is saved in slices (a partitioned variable); expected whole "
                           "tensors")
    dtype_id = entry.get(1, 0)
    if dtype_id not in TF_DTYPES:
        raise WeightsError(f"{prefix}: tensor {name!r} has TensorFlow dtype {dtype_id}; expected a float type "
                           "(float32, float16, bfloat16, float64)")
    dtype = TF_DTYPES[dtype_id]
    dims = _fields(entry.get(2, b""), prefix, repeated=(2,)).get(2, [])  # TensorShapeProto's repeated Dim
    shape = tuple(_fields(dim, prefix).get(1, 0) for dim in dims)
    shard, offset, size = entry.get(3, 0), entry.get(4, 0), entry.get(5, 0)
    if size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise WeightsError(f"{prefix}: tensor {name!r} of shape {shape} and dtype {dtype.name} has {size} bytes; "
                           f"expected {int(np.prod(shape)) * dtype.itemsize}")
    data = Path(f"{prefix}.data-{shard:05d}-of-{shards:05d}")
    if shard not in maps:
        if not data.is_file():
            raise WeightsError(f"{prefix}: tensor {name!r} is in {data.name}, which does not exist")
        maps[shard] = np.memmap(data, dtype=np.uint8, mode="r") if data.stat().st_size else np.zeros(0, np.uint8)
    raw = maps[shard]
    if offset + size > raw.size:
        raise WeightsError(f"{data} is truncated: tensor {name!r} needs bytes {offset} to {offset + size}, the file "
                           f"has {raw.size}")
    return raw[offset: offset + size].view(dtype).reshape(shape)


def _table_entries(index: Path):
    """(key, value) of every entry of a LevelDB-format table file, in key order."""
    try:
        table = index.read_bytes()
    except OSError as e:
        raise WeightsError(f"cannot read {index}: {e.strerror or e}") from None
    if len(table) < FOOTER_BYTES or int.from_bytes(table[-8:], "little") != TABLE_MAGIC:
        raise WeightsError(f"{index} is truncated or not a TensorFlow checkpoint index (no table magic at its end)")
    footer = table[-FOOTER_BYTES:]
    _, pos = _block_handle(footer, 0, index)  # the metaindex block: empty in checkpoint indexes
    index_block = _block(table, *_block_handle(footer, pos, index)[0], index)
    for _, handle in _block_entries(index_block, index):
        (offset, size), _ = _block_handle(handle, 0, index)
        yield from _block_entries(_block(table, offset, size, index), index)


def _block(table: bytes, offset: int, size: int, index: Path) -> bytes:
    if offset + size + BLOCK_TRAILER_BYTES > len(table):
        raise WeightsError(f"{index} is truncated: a block at byte {offset} runs past its end")
    compression = table[offset + size]
    if compression != 0:
        raise WeightsError(f"{index}: a block is compressed (type {compression}); expected an uncompressed index, "
                           "as TensorFlow writes them")
    return table[offset: offset + size]


def _block_entries(block: bytes, index: Path):
    """(key, value) pairs of one block: prefix-compressed keys, then a restart array that is not needed here."""
    if len(block) < 4:
        raise WeightsError(f"{index}: a table block of {len(block)} bytes is too short")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 * (restarts + 1)
    pos, key = 0, b""
    while pos < end:
        shared, pos = _varint(block, pos, index)
        unshared, pos = _varint(block, pos, index)
        value_size, pos = _varint(block, pos, index)
        key = key[:shared] + block[pos: pos + unshared]
        pos += unshared
        yield key, block[pos: pos + value_size]
        pos += value_size


def _block_handle(data: bytes, pos: int, index: Path) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(data, pos, index)
    size, pos = _varint(data, pos, index)
    return (offset, size), pos


def _varint(data: bytes, pos: int, index) -> tuple[int, int]:
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    raise WeightsError(f"{index}: a variable-length integer runs past its data: the index is damaged")


def _fields(message: bytes, index, repeated: tuple[int, ...] = ()) -> dict:
    """The fields of a protocol buffer message: number -> varint, fixed value or bytes (a list for `repeated`)."""
    fields: dict = {}
    pos = 0
    while pos < len(message):
        tag, pos = _varint(message, pos, index)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(message, pos, index)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(message[pos: pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(message, pos, index)
            value, pos = message[pos: pos + length], pos + length
        else:
            raise WeightsError(f"{index}: an entry has protocol buffer wire type {wire}: the index is damaged")
        if number in repeated:
            fields.setdefault(number, []).append(value)
        else:
            fields[number] = value
    return fields
