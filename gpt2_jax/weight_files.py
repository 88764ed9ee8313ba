"""Weight files: safetensors through its library, llm.c .bin read and written with numpy, torch files read safely.

Readers return tensors lazily: safetensors tensors are read one at a time when used, llm.c tensors are views of a
read-only memory map, torch tensors come from torch.load(mmap=True) where the file allows it, so a converter
touches one tensor at a time and the whole checkpoint is never copied into memory before conversion. torch is
imported only to read torch files.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from gpt2_jax.config import is_integer

LLMC_MAGIC = 20240326
LLMC_DTYPES = {3: np.dtype(np.float32), 5: np.dtype(ml_dtypes.bfloat16)}  # llm.c file version -> weight dtype
LLMC_HEADER_INTS = 256
SAFETENSORS_DTYPES = {  # the dtypes of safetensors' header that numpy holds
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}


class WeightsError(ValueError):
    """A weights file or directory that cannot be read or written; the message names what is wrong."""


class WriteError(OSError):
    """Writing a file failed (disk full, no permission); the message names the file, not its temporary name."""


@contextlib.contextmanager
def replaced_when_done(path: str | Path):
    """A temporary path beside `path` to write; renamed onto path when the block succeeds and removed when it
    fails, so that path never holds a half-written file. An OSError names path, not the temporary one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, path)
    except WriteError:  # from a nested replaced_when_done, which named its own file
        raise
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    finally:
        partial.unlink(missing_ok=True)


def sniff(path: str | Path) -> str:
    """The kind of a weights file from its first bytes: "safetensors", "torch" or "llmc"."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a zip archive (torch.save) or a pickle stream
        return "torch"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == LLMC_MAGIC:
        return "llmc"
    if len(head) == 9 and head[8:9] == b"{":  # read_safetensors says when the header runs past the end
        return "safetensors"
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes): expected safetensors, a PyTorch file or an llm.c .bin")
    raise WeightsError(
        f"{path} is not a weights file this converter reads (first bytes {head[:8].hex()}): expected safetensors, "
        f"a PyTorch file (torch.save zip or pickle) or an llm.c .bin (magic {LLMC_MAGIC})")


class SafetensorsTensor:
    """One tensor of a safetensors file: shape and dtype from its header, values read only by numpy()."""

    def __init__(self, handle, name: str, shape: tuple[int, ...], dtype: np.dtype | str):
        self._handle, self.name, self.shape, self.dtype = handle, name, shape, dtype

    def numpy(self) -> np.ndarray:
        return self._handle.get_tensor(self.name)


def read_safetensors(path: str | Path) -> tuple[dict[str, SafetensorsTensor], dict]:
    """Tensors of a .safetensors file, read one at a time when used, and its __metadata__."""
    path = Path(path)
    try:  # pread: a tensor is read into its own array, so the file's pages never count in RSS
        handle = safetensors.safe_open(path, framework="np", backend="pread")
    except safetensors.SafetensorError as e:
        raise _explained(path, e) from None
    tensors = {}
    for name in handle.offset_keys():
        info = handle.get_slice(name)
        code = info.get_dtype()  # a dtype numpy cannot hold (float8) stays its name and is refused as not a float
        tensors[name] = SafetensorsTensor(handle, name, tuple(info.get_shape()), SAFETENSORS_DTYPES.get(code, code))
    return tensors, handle.metadata() or {}


def _explained(path: Path, error: Exception) -> WeightsError:
    """What is wrong with a file the safetensors library refused, naming the tensor where one is at fault."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return WeightsError(f"{path} is truncated or not safetensors: header of {n} bytes, file of {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return WeightsError(f"{path} is not a safetensors file: its header is not JSON ({e})")
    if not isinstance(header, dict):
        return WeightsError(f"{path}: the safetensors header is a JSON {type(header).__name__}; expected an object")
    header.pop("__metadata__", None)
    data_len, covered = size - 8 - n, 0
    for name, info in header.items():
        problem = _entry_problem(name, info)
        if problem:
            return WeightsError(f"{path}: {problem}")
        start, end = info["data_offsets"]
        if end > data_len:
            return WeightsError(f"{path} is truncated: tensor {name!r} needs bytes [{start}, {end}) of the data "
                                f"section, which holds {data_len}")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is not None and end - start != int(np.prod(info["shape"])) * dtype.itemsize:
            return WeightsError(f"{path}: tensor {name!r} of shape {tuple(info['shape'])} and dtype "
                                f"{info['dtype']} spans {end - start} bytes")
        covered = max(covered, end)
    if covered < data_len:
        return WeightsError(f"{path} is longer than its header says: the tensors cover {covered} bytes of the data "
                            f"section, which holds {data_len}")
    return WeightsError(f"{path} is not a valid safetensors file: {error}")


def _entry_problem(name: str, info) -> str | None:
    """What is wrong with one tensor's entry of a safetensors header, or None."""
    expected = 'expected {"dtype": "F32", "shape": [rows, ...], "data_offsets": [start, end]}'
    if not isinstance(info, dict):
        return f"safetensors header entry {name!r} is {info!r}; {expected}"
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        return f"safetensors header entry {name!r} lacks {missing}; {expected}"
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(is_integer(d, 0) for d in shape):
        return f"tensor {name!r} has shape {shape!r}; expected a list of integers >= 0"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_integer(o, 0) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"tensor {name!r} has data_offsets {offsets!r}; expected [start, end] with 0 <= start <= end"
    return None


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, tuple, np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict | None = None) -> None:
    """Write (name, shape, dtype, make_array) entries through the safetensors library."""
    with replaced_when_done(path) as partial:
        arrays = {}
        for name, shape, dtype, make in tensors:
            arrays[name] = np.ascontiguousarray(make(), dtype=dtype)  # a view of the params where the layout allows
            if arrays[name].shape != tuple(shape):
                raise WeightsError(f"tensor {name!r} has shape {arrays[name].shape}; its header says {tuple(shape)}")
        try:
            safetensors.numpy.save_file(arrays, partial, metadata=metadata or {"format": "pt"})
        except safetensors.SafetensorError as e:
            raise WriteError(f"cannot write {path}: {e}") from None


def read_torch(path: str | Path):
    """torch.load(weights_only=True) with memory mapping where possible; unsafe pickles are refused."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading the PyTorch file {path} needs torch (pip install torch)") from None
    is_zip = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text:
            reason = next((line for line in text.splitlines() if "GLOBAL" in line or "Unsupported" in line),
                          text.splitlines()[0])
            raise WeightsError(
                f"refusing to load {path}: it pickles Python objects other than tensors, and unpickling them "
                f"could run code ({reason.strip()}). Nothing from it was executed. Re-save the weights from "
                f"trusted code as a plain state_dict of tensors.") from None
        raise WeightsError(f"{path} is truncated or not a PyTorch file: {text}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise WeightsError(f"{path} is truncated or not a PyTorch file: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'unexpected end of file'}") from None


def torch_to_numpy(tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16 becomes ml_dtypes.bfloat16 without a copy."""
    import torch

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def llmc_shapes(block_size: int, vocab_padded: int, n_layer: int, n_embd: int) -> dict[str, tuple[int, ...]]:
    """The tensors of an llm.c GPT-2 file in file order, layer tensors stacked on a leading L axis."""
    T, Vp, L, C = block_size, vocab_padded, n_layer, n_embd
    return {
        "wte": (Vp, C), "wpe": (T, C), "ln1w": (L, C), "ln1b": (L, C), "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C),
        "attprojw": (L, C, C), "attprojb": (L, C), "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C), "fcprojb": (L, C), "lnfw": (C,), "lnfb": (C,),
    }


def read_llmc(path: str | Path) -> tuple[dict[str, int], dict[str, np.ndarray]]:
    """Header fields and memory-mapped tensors of an llm.c GPT-2 .bin (version 3 fp32 or 5 bf16)."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header.size < LLMC_HEADER_INTS or header[0] != LLMC_MAGIC:
        raise WeightsError(f"{path} is truncated or not an llm.c model file: the header needs "
                           f"{LLMC_HEADER_INTS} int32 starting with magic {LLMC_MAGIC}")
    version = int(header[1])
    if version not in LLMC_DTYPES:
        raise WeightsError(f"{path}: llm.c file version {version} is not supported; expected 3 (fp32) or 5 (bf16)")
    fields = dict(zip(("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_padded"),
                      (int(v) for v in header[2:8])), version=version)
    if min(fields.values()) <= 0 or fields["vocab_padded"] < fields["vocab_size"]:
        raise WeightsError(f"{path}: llm.c header has impossible sizes {fields}")
    shapes = llmc_shapes(fields["block_size"], fields["vocab_padded"], fields["n_layer"], fields["n_embd"])
    dtype = LLMC_DTYPES[version]
    count = sum(int(np.prod(s)) for s in shapes.values())
    have = path.stat().st_size - 4 * LLMC_HEADER_INTS
    if have != count * dtype.itemsize:
        state = "truncated" if have < count * dtype.itemsize else "longer than its header says"
        raise WeightsError(f"{path} is {state}: the header promises {count * dtype.itemsize} bytes of weights "
                           f"({count} {dtype.name} values), the file holds {have}")
    flat = np.memmap(path, dtype=dtype, mode="r", offset=4 * LLMC_HEADER_INTS, shape=(count,))
    tensors, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        tensors[name] = flat[offset: offset + n].reshape(shape)
        offset += n
    return fields, tensors


def write_llmc(path: str | Path, fields: dict[str, int], tensors: Iterable[tuple[str, Iterable[np.ndarray]]],
               version: int = 3) -> None:
    """Write an llm.c .bin: fields as read_llmc returns them, then each tensor as a sequence of chunks in order."""
    if version not in LLMC_DTYPES:
        raise WeightsError(f"llm.c version must be 3 (fp32) or 5 (bf16); got {version}")
    dtype = LLMC_DTYPES[version]
    header = np.zeros(LLMC_HEADER_INTS, "<i4")
    header[:8] = [LLMC_MAGIC, version, fields["block_size"], fields["vocab_size"], fields["n_layer"],
                  fields["n_head"], fields["n_embd"], fields["vocab_padded"]]
    shapes = llmc_shapes(fields["block_size"], fields["vocab_padded"], fields["n_layer"], fields["n_embd"])
    with replaced_when_done(path) as partial, open(partial, "wb") as f:
        f.write(header.tobytes())
        for (name, chunks), (expected, shape) in zip(tensors, shapes.items(), strict=True):
            if name != expected:
                raise WeightsError(f"llm.c tensors must come in file order: got {name!r} where {expected!r} goes")
            written = 0
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk, dtype=np.float32).astype(dtype)  # round to nearest even
                f.write(chunk.tobytes())
                written += chunk.size
            if written != int(np.prod(shape)):
                raise WeightsError(f"llm.c tensor {name!r} got {written} values; expected shape {shape}")
