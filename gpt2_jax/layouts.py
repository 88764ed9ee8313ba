"""GPT-2 checkpoint layouts: one table per layout mapping checkpoint tensors to our parameters, and detection.

The layout is detected from the content (file magic, tensor names and shapes), never from the file name (but a
TensorFlow checkpoint, OpenAI's original release, is a set of files found through its PREFIX.index). Each
table is a list of Entry rows: which checkpoint tensors make one of our parameters, their shapes, and the
transform each way, so the same table serves reading (convert.load) and writing (convert.export_*).

n_head cannot be read from tensor shapes. It comes from a config JSON (an HF directory's config.json, or a JSON
beside the file: <stem>.json first, then config.json; nanoGPT's model_args, llm.c's header), else from the n_head
argument (which must agree with the file's config where both give it), else from the
OpenAI preset of the same width (768 -> 12, 1024 -> 16, 1280 -> 20, 1600 -> 25) with a warning. A TensorFlow
checkpoint's config JSON is the hparams.json beside it.
Everything else is inferred from the tensors; a config JSON that disagrees with them gives a warning. A config JSON
of another model_type, or with options that change the function in ways this model cannot compute (n_inner,
scale_attn_by_inverse_layer_idx, another activation), is refused.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gpt2_jax import tf_checkpoint
from gpt2_jax import weight_files as wf
from gpt2_jax.config import ConfigError, ModelConfig, is_integer
from gpt2_jax.weight_files import WeightsError

HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1600: 25}
PRETRAINED = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# transformers' activation names -> ours. gelu_fast, gelu_accurate and gelu_python_tanh are the tanh formula
# written another way (within 1e-12 of gelu_new in float64), gelu_python is erf's; gelu_10 clips, quick_gelu is
# another function: both refused.
HF_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "gelu_accurate": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "gelu": "gelu_exact",
                  "gelu_python": "gelu_exact"}


@dataclass(frozen=True)
class Entry:
    """One of our parameters and the checkpoint tensors it is made of; "{i}" in a key repeats per layer."""

    ours: str
    theirs: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    to_ours: Callable  # their arrays -> our array (one layer's slice for "h." parameters)
    to_theirs: Callable  # our array -> tuple of their arrays


def _same(ours: str, theirs: str, shape: tuple[int, ...]) -> Entry:
    return Entry(ours, (theirs,), (shape,), lambda a: a, lambda a: (a,))


def _rows(n: int) -> Callable:
    """Trim or zero-pad the first axis to n rows (padded vocabularies)."""
    def fit(a):
        if a.shape[0] >= n:
            return a[:n]
        return np.concatenate([a, np.zeros((n - a.shape[0],) + a.shape[1:], a.dtype)])
    return fit


def _vocab_entry(ours: str, theirs: str, cfg: ModelConfig, their_rows: int, width: int | None = None) -> Entry:
    shape = (their_rows, width) if width else (their_rows,)
    to_ours, to_theirs = _rows(cfg.padded_vocab_size), _rows(their_rows)
    return Entry(ours, (theirs,), (shape,), to_ours, lambda a: (to_theirs(a),))


@dataclass
class Checkpoint:
    """A readable weights file: its layout, the config inferred from it, and its tensors (not yet read)."""

    layout: str  # hf | nanogpt | reference | llmc | openai_tf
    config: ModelConfig
    arrays: dict  # name -> numpy array, SafetensorsTensor or torch tensor, read lazily where possible
    entries: list[Entry]
    source: str
    ignored: Callable[[str], bool] = lambda key: False
    aliases: dict[str, str] = field(default_factory=dict)  # tensor -> tensor it must equal (tied heads)
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------- layout tables


def hf_entries(cfg: ModelConfig, prefix: str = "transformer.") -> list[Entry]:
    """Hugging Face GPT2LMHeadModel: Conv1D weights stored [in, out]."""
    C, H, D, V, T = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.block_size
    p, h = prefix, prefix + "h.{i}."
    entries = [_vocab_entry("wte", p + "wte.weight", cfg, V, C), _same("wpe", p + "wpe.weight", (T, C)),
               _same("ln_f.weight", p + "ln_f.weight", (C,)), _same("ln_f.bias", p + "ln_f.bias", (C,))]
    if not cfg.tie_embeddings:
        entries.append(_vocab_entry("lm_head.weight", "lm_head.weight", cfg, V, C))
    for ln in ("ln_1", "ln_2"):
        entries += [_same(f"h.{ln}.weight", h + f"{ln}.weight", (C,)), _same(f"h.{ln}.bias", h + f"{ln}.bias", (C,))]
    return entries + [
        Entry("h.attn.c_attn.weight", (h + "attn.c_attn.weight",), ((C, 3 * C),),
               lambda w: w.T.reshape(3, H, D, C), lambda w: (w.reshape(3 * C, C).T,)),
        Entry("h.attn.c_attn.bias", (h + "attn.c_attn.bias",), ((3 * C,),),
               lambda b: b.reshape(3, H, D), lambda b: (b.reshape(3 * C),)),
        Entry("h.attn.c_proj.weight", (h + "attn.c_proj.weight",), ((C, C),),
               lambda w: w.T.reshape(C, H, D), lambda w: (w.reshape(C, C).T,)),
        _same("h.attn.c_proj.bias", h + "attn.c_proj.bias", (C,)),
        Entry("h.mlp.c_fc.weight", (h + "mlp.c_fc.weight",), ((C, 4 * C),), lambda w: w.T, lambda w: (w.T,)),
        _same("h.mlp.c_fc.bias", h + "mlp.c_fc.bias", (4 * C,)),
        Entry("h.mlp.c_proj.weight", (h + "mlp.c_proj.weight",), ((4 * C, C),), lambda w: w.T, lambda w: (w.T,)),
        _same("h.mlp.c_proj.bias", h + "mlp.c_proj.bias", (C,)),
    ]


def openai_tf_entries(cfg: ModelConfig) -> list[Entry]:
    """OpenAI's TensorFlow release (model/h{i}/attn/c_attn/w, ...): Hugging Face's tensors under their original
    names, the block weights with the leading 1 of a width-1 convolution ([1, in, out])."""
    entries = []
    for e in hf_entries(cfg, prefix=""):
        name = _openai_tf_name(e.theirs[0])
        if e.ours.startswith("h.") and len(e.shapes[0]) == 2:
            entries.append(Entry(e.ours, (name,), ((1, *e.shapes[0]),), lambda w, f=e.to_ours: f(w[0]),
                                 lambda a, f=e.to_theirs: (f(a)[0][None],)))
        else:
            entries.append(Entry(e.ours, (name,), e.shapes, e.to_ours, e.to_theirs))
    return entries


def _openai_tf_name(hf_name: str) -> str:
    """'h.{i}.ln_1.weight' -> 'model/h{i}/ln_1/g', 'h.{i}.mlp.c_fc.weight' -> 'model/h{i}/mlp/c_fc/w', 'wte.weight'
    -> 'model/wte'."""
    *parts, leaf = hf_name.split(".")
    if parts[0] in ("wte", "wpe"):
        return f"model/{parts[0]}"
    if parts[0] == "h":
        parts[:2] = ["h" + parts[1]]
    suffix = "b" if leaf == "bias" else "g" if parts[-1].startswith("ln_") else "w"
    return "model/" + "/".join(parts) + "/" + suffix


def linear_entries(cfg: ModelConfig, names: dict[str, str], vocab_rows: int) -> list[Entry]:
    """nanoGPT and llm.c: nn.Linear layout [out, in] with fused qkv; names maps our keys to theirs."""
    C, H, D, T = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.block_size
    shapes = {"ln_f.weight": (C,), "ln_f.bias": (C,), "h.ln_1.weight": (C,), "h.ln_1.bias": (C,),
              "h.ln_2.weight": (C,), "h.ln_2.bias": (C,), "h.attn.c_proj.bias": (C,), "h.mlp.c_fc.weight": (4 * C, C),
              "h.mlp.c_fc.bias": (4 * C,), "h.mlp.c_proj.weight": (C, 4 * C), "h.mlp.c_proj.bias": (C,)}
    entries = [_vocab_entry("wte", names["wte"], cfg, vocab_rows, C), _same("wpe", names["wpe"], (T, C))]
    entries += [_same(ours, names[ours], shape) for ours, shape in shapes.items()
                if ours in names and (cfg.bias or not ours.endswith("bias"))]
    entries.append(Entry("h.attn.c_attn.weight", (names["h.attn.c_attn.weight"],), ((3 * C, C),),
                          lambda w: w.reshape(3, H, D, C), lambda w: (w.reshape(3 * C, C),)))
    entries.append(Entry("h.attn.c_proj.weight", (names["h.attn.c_proj.weight"],), ((C, C),),
                          lambda w: w.reshape(C, H, D), lambda w: (w.reshape(C, C),)))
    if cfg.qkv_bias:
        entries.append(Entry("h.attn.c_attn.bias", (names["h.attn.c_attn.bias"],), ((3 * C,),),
                              lambda b: b.reshape(3, H, D), lambda b: (b.reshape(3 * C),)))
    return entries


def nanogpt_entries(cfg: ModelConfig) -> list[Entry]:
    modules = ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ours = ["ln_f.weight", "ln_f.bias"] + [f"h.{m}.{k}" for m in modules for k in ("weight", "bias")]
    names = {key: "transformer." + key.replace("h.", "h.{i}.", 1) for key in ours}
    names.update(wte="transformer.wte.weight", wpe="transformer.wpe.weight")
    return linear_entries(cfg, names, cfg.vocab_size)


LLMC_NAMES = {"ln_f.weight": "lnfw", "ln_f.bias": "lnfb", "h.ln_1.weight": "ln1w.{i}", "h.ln_1.bias": "ln1b.{i}",
              "h.attn.c_attn.weight": "qkvw.{i}", "h.attn.c_attn.bias": "qkvb.{i}",
              "h.attn.c_proj.weight": "attprojw.{i}", "h.attn.c_proj.bias": "attprojb.{i}",
              "h.ln_2.weight": "ln2w.{i}", "h.ln_2.bias": "ln2b.{i}", "h.mlp.c_fc.weight": "fcw.{i}",
              "h.mlp.c_fc.bias": "fcb.{i}", "h.mlp.c_proj.weight": "fcprojw.{i}", "h.mlp.c_proj.bias": "fcprojb.{i}",
              "wte": "wte", "wpe": "wpe"}


def reference_entries(cfg: ModelConfig) -> list[Entry]:
    """The reference GPT-2: separate W_Query/W_Key/W_Value in nn.Linear layout, untied out_head."""
    C, H, D, V, T = cfg.n_embd, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.block_size
    b = "trf_blocks.{i}."
    qkv = tuple(b + f"attention.W_{n}" for n in ("Query", "Key", "Value"))
    entries = [_vocab_entry("wte", "tok_emb.weight", cfg, V, C), _same("wpe", "pos_emb.weight", (T, C)),
               _same("ln_f.weight", "final_norm.scale", (C,)), _same("ln_f.bias", "final_norm.shift", (C,)),
               _vocab_entry("lm_head.weight", "out_head.weight", cfg, V, C),
               Entry("h.attn.c_attn.weight", tuple(k + ".weight" for k in qkv), ((C, C),) * 3,
                      lambda q, k, v: np.stack([q, k, v]).reshape(3, H, D, C), lambda w: tuple(w.reshape(3, C, C))),
               Entry("h.attn.c_proj.weight", (b + "attention.out_proj.weight",), ((C, C),),
                      lambda w: w.reshape(C, H, D), lambda w: (w.reshape(C, C),)),
               _same("h.attn.c_proj.bias", b + "attention.out_proj.bias", (C,)),
               _same("h.mlp.c_fc.weight", b + "feedforward.layers.0.weight", (4 * C, C)),
               _same("h.mlp.c_fc.bias", b + "feedforward.layers.0.bias", (4 * C,)),
               _same("h.mlp.c_proj.weight", b + "feedforward.layers.2.weight", (C, 4 * C)),
               _same("h.mlp.c_proj.bias", b + "feedforward.layers.2.bias", (C,))]
    for ours, theirs in (("ln_1", "norm_layer1"), ("ln_2", "norm_layer2")):
        entries += [_same(f"h.{ours}.weight", b + f"{theirs}.scale", (C,)),
                    _same(f"h.{ours}.bias", b + f"{theirs}.shift", (C,))]
    if cfg.qkv_bias:
        entries.append(Entry("h.attn.c_attn.bias", tuple(k + ".bias" for k in qkv), ((C,),) * 3,
                              lambda q, k, v: np.stack([q, k, v]).reshape(3, H, D), lambda a: tuple(a.reshape(3, C))))
    if cfg.lm_head_bias:
        entries.append(_vocab_entry("lm_head.bias", "out_head.bias", cfg, V))
    return entries


def is_reference_buffer(key: str) -> bool:
    return re.fullmatch(r"trf_blocks\.\d+\.(attention\.mask|feedforward\.layers\.1\.constant)", key) is not None


def is_hf_buffer(key: str) -> bool:
    return re.fullmatch(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", key) is not None


# ---------------------------------------------------------------- reading


def weights_exist(path: str | Path) -> bool:
    """Whether path names weights: an existing file or directory, or a TensorFlow checkpoint prefix."""
    return Path(path).exists() or tf_checkpoint.checkpoint_prefix(path) is not None


def check_n_head(n_head: int | None) -> None:
    """A ConfigError for an n_head argument (--n_head) that no model can have: the user's number, not the weights,
    is wrong."""
    if n_head is not None and not is_integer(n_head, 1):
        raise ConfigError(f"n_head must be an integer >= 1; got {n_head!r}")


def open_checkpoint(path: str | Path, *, n_head: int | None = None,
                    config_path: str | Path | None = None) -> Checkpoint:
    """Detect the layout of a weights file or Hugging Face directory and infer its ModelConfig (reads no weights)."""
    check_n_head(n_head)
    path = Path(path)
    tf_prefix = tf_checkpoint.checkpoint_prefix(path)
    if tf_prefix is not None and not (path.is_dir() and _is_hf_dir(path)):
        return _openai_tf_checkpoint(tf_prefix, config_path, n_head)
    if not path.exists():
        raise FileNotFoundError(missing_message(path))
    meta: dict = {}
    if path.is_dir():
        arrays = _read_hf_dir(path)
        if config_path is None and (path / "config.json").exists():
            config_path = path / "config.json"
    else:
        if path.suffix == ".json":  # e.g. an HF directory's config.json or model.safetensors.index.json
            raise WeightsError(f"{path} is a JSON file, not weights: pass the directory that holds it (a Hugging "
                               f"Face checkpoint), or the weights file itself")
        kind = wf.sniff(path)
        if kind == "llmc":
            return _llmc_checkpoint(path, *wf.read_llmc(path), n_head=n_head)
        if kind == "safetensors":
            arrays = wf.read_safetensors(path)[0]
        else:
            arrays, meta = _torch_state_dict(wf.read_torch(path), path)
    raw_json, json_path = _config_json(path, config_path)
    model_type = (raw_json or {}).get("model_type", "gpt2")
    if model_type != "gpt2":  # e.g. gpt_bigcode: GPT-2's tensor names, another function
        raise WeightsError(f"{json_path}: model_type {model_type!r} is not GPT-2; expected 'gpt2'")
    layout, prefix = _layout_of(arrays, meta, path)
    if layout == "reference":
        return _reference_checkpoint(path, arrays, raw_json, json_path, n_head)
    if layout == "nanogpt":
        return _nanogpt_checkpoint(path, arrays, meta, raw_json, json_path, n_head)
    return _hf_checkpoint(path, arrays, prefix, raw_json, json_path, n_head)


def missing_message(path: str | Path) -> str:
    """Why path names no weights, with how to get OpenAI's when it is one of their names (gpt2, gpt2-xl, ...)."""
    name = str(path)
    if name in PRETRAINED:
        repo = PRETRAINED[name]
        return (f"no file or directory named {name!r}. gpt2-jax does not download weights: to use OpenAI's "
                f"{name}, download model.safetensors and config.json from https://huggingface.co/{repo} into "
                f"a directory (e.g. `huggingface-cli download {repo} model.safetensors config.json "
                f"--local-dir {name}`) and pass that directory's path.")
    return f"no such weights file or directory: {path}"


def _is_hf_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("config.json", "model.safetensors", "model.safetensors.index.json",
                                                     "pytorch_model.bin"))


def _read_hf_dir(path: Path) -> dict:
    if (path / "model.safetensors").exists():
        return wf.read_safetensors(path / "model.safetensors")[0]
    index = path / "model.safetensors.index.json"
    if index.exists():
        arrays, found_in = {}, {}
        for shard in _index_shards(index):
            if not (path / shard).is_file():
                raise WeightsError(f"{index} names shard {shard!r}, but {path / shard} does not exist")
            for name, array in wf.read_safetensors(path / shard)[0].items():
                if name in arrays:
                    raise WeightsError(f"{path}: tensor {name!r} is in two shards, {found_in[name]} and {shard}; "
                                       f"expected each tensor in one shard")
                arrays[name], found_in[name] = array, shard
        return arrays
    if (path / "pytorch_model.bin").exists():
        return _torch_state_dict(wf.read_torch(path / "pytorch_model.bin"), path / "pytorch_model.bin")[0]
    raise WeightsError(f"{path} is a directory but neither an orbax checkpoint (train.py out_dir or "
                       f"save_weights output) nor a Hugging Face model directory (config.json with "
                       f"model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def _index_shards(index: Path) -> list[str]:
    """The shard file names of a model.safetensors.index.json, in order."""
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{index} is not valid JSON: {e}") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index} has no 'weight_map' object of tensor name -> shard file name; expected "
                           f'{{"weight_map": {{"transformer.wte.weight": "model-00001-of-00002.safetensors", ...}}}}')
    return sorted(set(weight_map.values()))


def _torch_state_dict(obj, path: Path) -> tuple[dict, dict]:
    """The tensors of a torch file: a bare state_dict, {"state_dict": ...}, or nanoGPT's {"model", "model_args"}."""
    import torch

    meta = {}
    if isinstance(obj, dict) and "model" in obj and "model_args" in obj:
        state, meta = obj["model"], {"model_args": dict(obj["model_args"])}
    elif isinstance(obj, dict) and ("state_dict" in obj or "model_state_dict" in obj):
        state = obj.get("state_dict", obj.get("model_state_dict"))
    else:
        state = obj
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors (nor a checkpoint "
                           f"dict with 'state_dict', 'model_state_dict' or nanoGPT's 'model' and 'model_args')")
    prefix = "_orig_mod."  # torch.compile wraps the model and prefixes every key
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return state, meta


def _config_json(path: Path, config_path) -> tuple[dict | None, Path | None]:
    """The config JSON given, else one beside a weights file (<stem>.json, then config.json), else None."""
    if config_path is not None:
        config_path = Path(config_path)
        if not config_path.exists():
            raise FileNotFoundError(f"config JSON {config_path} does not exist")
        candidates = [config_path]
    elif path.is_dir():
        candidates = []
    else:
        candidates = [p for p in (path.with_suffix(".json"), path.parent / "config.json") if p.exists()]
    for candidate in candidates:
        try:
            raw = json.loads(candidate.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"config JSON {candidate} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise WeightsError(f"config JSON {candidate} holds a {type(raw).__name__}, not an object")
        return raw, candidate
    return None, None


def _layout_of(arrays: dict, meta: dict, path: Path) -> tuple[str, str]:
    """("reference" | "nanogpt" | "hf", key prefix) from the tensor names and the fused qkv weight's shape."""
    if "model_args" in meta:
        return "nanogpt", "transformer."
    if "tok_emb.weight" in arrays:
        return "reference", ""
    prefix = "transformer." if any(k.startswith("transformer.") for k in arrays) else ""
    c_attn = arrays.get(prefix + "h.0.attn.c_attn.weight")
    if c_attn is not None and len(c_attn.shape) == 2:
        rows, cols = c_attn.shape
        if cols == 3 * rows:
            return "hf", prefix
        if rows == 3 * cols:
            return "nanogpt", prefix
        raise WeightsError(f"{path}: tensor {prefix + 'h.0.attn.c_attn.weight'!r} has shape {tuple(c_attn.shape)}; "
                           f"expected (C, 3C) (Hugging Face Conv1D) or (3C, C) (nanoGPT nn.Linear)")
    sample = ", ".join(repr(k) for k in list(arrays)[:5])
    raise WeightsError(f"{path} does not look like a GPT-2 checkpoint: its tensors start {sample}; expected "
                       f"'tok_emb.weight' (reference layout) or 'h.0.attn.c_attn.weight' with or without "
                       f"'transformer.' (Hugging Face, nanoGPT)")


def _shape(arrays: dict, key: str, path: Path, ndim: int) -> tuple[int, ...]:
    if key not in arrays:
        raise WeightsError(f"{path} lacks tensor {key!r}, from which the model's shape is read")
    shape = tuple(arrays[key].shape)
    if len(shape) != ndim:
        raise WeightsError(f"{path}: tensor {key!r} has shape {shape}; expected {ndim} dimensions")
    return shape


def _count_layers(arrays: dict, pattern: str, path: Path) -> int:
    found = [int(m.group(1)) for k in arrays if (m := re.match(pattern, k))]
    if not found:
        raise WeightsError(f"{path} has no transformer block tensors (keys matching {pattern!r})")
    return max(found) + 1


def _heads(n_head: int | None, raw_json: dict | None, keys: tuple[str, ...], n_embd: int, path: Path,
           json_path: Path | None) -> int:
    for key in keys:
        if raw_json and key in raw_json:
            value = raw_json[key]
            if not is_integer(value, 1):
                raise WeightsError(f"{json_path}: {key} is {value!r}; expected a positive integer")
            return agreed_heads(n_head, value, f"{json_path} ({key})")
    if n_head:
        return n_head
    if n_embd not in HEADS_BY_WIDTH:
        raise WeightsError(f"{path}: n_head cannot be read from tensor shapes and no config JSON gives it; "
                           f"pass n_head= (--n_head) or put a config JSON beside the weights")
    warnings.warn(f"{path}: no config JSON gives n_head; using {HEADS_BY_WIDTH[n_embd]}, the OpenAI GPT-2 value "
                  f"for n_embd={n_embd}", stacklevel=3)
    return HEADS_BY_WIDTH[n_embd]


def agreed_heads(n_head: int | None, stored: int, where: str) -> int:
    """The heads the file's own config gives; an n_head argument (--n_head) that disagrees with them is an error:
    the same weights split into other heads are another function, which nothing downstream would notice."""
    if n_head and n_head != stored:
        raise WeightsError(f"n_head={n_head} was given but {where} says n_head={stored}; the heads cannot be read "
                           f"from tensor shapes, and a wrong count computes another function: drop --n_head "
                           f"(or correct the config)")
    return stored


def _warn_disagreements(raw_json: dict | None, json_path: Path | None, found: dict[str, object]) -> None:
    for key, value in found.items():
        if raw_json is not None and key in raw_json and raw_json[key] != value:
            warnings.warn(f"config JSON {json_path} says {key}={raw_json[key]!r} but the tensors say {value!r}; "
                          f"using {value!r}", stacklevel=3)


def _reference_checkpoint(path, arrays, raw_json, json_path, n_head) -> Checkpoint:
    V, C = _shape(arrays, "tok_emb.weight", path, 2)
    T = _shape(arrays, "pos_emb.weight", path, 2)[0]
    L = _count_layers(arrays, r"trf_blocks\.(\d+)\.", path)
    qkv_bias = "trf_blocks.0.attention.W_Query.bias" in arrays
    _warn_disagreements(raw_json, json_path, dict(vocab_size=V, context_length=T, emb_dim=C, n_layers=L,
                                                  qkv_bias=qkv_bias))
    heads = _heads(n_head, raw_json, ("n_heads", "n_head"), C, path, json_path)
    cfg = _config(path, vocab_size=V, block_size=T, n_layer=L, n_head=heads, n_embd=C, qkv_bias=qkv_bias,
                  lm_head_bias=qkv_bias, tie_embeddings=False)
    return Checkpoint("reference", cfg, arrays, reference_entries(cfg), str(path), is_reference_buffer)


def _nanogpt_checkpoint(path, arrays, meta, raw_json, json_path, n_head) -> Checkpoint:
    if "model_args" in meta:
        args = meta["model_args"]
        missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size") if k not in args]
        if missing:
            raise WeightsError(f"{path}: nanoGPT model_args lacks {missing}")
        fields = dict(vocab_size=args["vocab_size"], block_size=args["block_size"], n_layer=args["n_layer"],
                      n_head=agreed_heads(n_head, args["n_head"], f"{path} (nanoGPT model_args)"),
                      n_embd=args["n_embd"], bias=bool(args["bias"]))
    else:
        V, C = _shape(arrays, "transformer.wte.weight", path, 2)
        L = _count_layers(arrays, r"transformer\.h\.(\d+)\.", path)
        fields = dict(vocab_size=V, block_size=_shape(arrays, "transformer.wpe.weight", path, 2)[0], n_layer=L,
                      n_head=_heads(n_head, raw_json, ("n_head",), C, path, json_path), n_embd=C,
                      bias="transformer.ln_f.bias" in arrays)
    cfg = _config(path, **fields, qkv_bias=fields["bias"], activation="gelu_exact")
    aliases = {"lm_head.weight": "transformer.wte.weight"} if "lm_head.weight" in arrays else {}
    return Checkpoint("nanogpt", cfg, arrays, nanogpt_entries(cfg), str(path), is_hf_buffer, aliases, meta)


def _hf_checkpoint(path, arrays, prefix, raw_json, json_path, n_head) -> Checkpoint:
    raw = raw_json or {}
    V, C = _shape(arrays, prefix + "wte.weight", path, 2)
    T = _shape(arrays, prefix + "wpe.weight", path, 2)[0]
    L = _count_layers(arrays, re.escape(prefix) + r"h\.(\d+)\.", path)
    _warn_disagreements(raw_json, json_path, dict(vocab_size=V, n_positions=T, n_embd=C, n_layer=L))
    activation, eps, tied = _hf_options(raw, json_path, C)
    aliases = {}
    if "lm_head.weight" in arrays:
        head, wte = arrays["lm_head.weight"], arrays[prefix + "wte.weight"]
        same = tuple(head.shape) == (V, C) and has_float_dtype(head) and has_float_dtype(wte) and np.array_equal(
            to_numpy(head), to_numpy(wte))
        if same:
            aliases["lm_head.weight"], tied = prefix + "wte.weight", True
        elif raw_json is not None and tied:
            raise WeightsError(f"{path}: lm_head.weight differs from {prefix}wte.weight but {json_path} ties them "
                               f"(tie_word_embeddings is true or absent)")
        else:
            tied = False
    cfg = _config(path, vocab_size=V, block_size=T, n_layer=L, n_embd=C, tie_embeddings=tied,
                  n_head=_heads(n_head, raw_json, ("n_head", "num_attention_heads"), C, path, json_path),
                  activation=HF_ACTIVATIONS[activation], layer_norm_eps=eps)
    return Checkpoint("hf", cfg, arrays, hf_entries(cfg, prefix), str(path), is_hf_buffer, aliases)


def _openai_tf_checkpoint(prefix: Path, config_path, n_head: int | None) -> Checkpoint:
    """OpenAI's TensorFlow checkpoint; its hparams.json (n_vocab, n_ctx, n_embd, n_head, n_layer) gives n_head."""
    arrays = tf_checkpoint.read_tf_checkpoint(prefix)
    if config_path is None and (prefix.parent / "hparams.json").exists():
        config_path = prefix.parent / "hparams.json"
    raw_json, json_path = _config_json(prefix, config_path)
    V, C = _shape(arrays, "model/wte", prefix, 2)
    T = _shape(arrays, "model/wpe", prefix, 2)[0]
    L = _count_layers(arrays, r"model/h(\d+)/", prefix)
    _warn_disagreements(raw_json, json_path, dict(n_vocab=V, n_ctx=T, n_embd=C, n_layer=L))
    # OpenAI's model.py: GELU's tanh form, LayerNorm epsilon 1e-5, logits from wte (tied).
    cfg = _config(prefix, vocab_size=V, block_size=T, n_layer=L, n_embd=C, activation="gelu_tanh",
                  layer_norm_eps=1e-5, n_head=_heads(n_head, raw_json, ("n_head",), C, prefix, json_path))
    return Checkpoint("openai_tf", cfg, arrays, openai_tf_entries(cfg), str(prefix))


def _hf_options(raw: dict, json_path: Path | None, n_embd: int) -> tuple[str, float, bool]:
    """(activation_function, layer_norm_epsilon, tie_word_embeddings) of a GPT2Config JSON, type-checked as
    transformers does; options that change the function in ways this model cannot compute are refused."""
    activation = raw.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in HF_ACTIVATIONS:
        raise WeightsError(f"{json_path}: activation_function {activation!r} is not supported; "
                           f"expected one of {sorted(HF_ACTIVATIONS)}")
    flags = {key: raw.get(key, default) for key, default in (
        ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
        ("tie_word_embeddings", True))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise WeightsError(f"{json_path}: {key} is {value!r}; expected true or false")
    if flags["scale_attn_by_inverse_layer_idx"] or not flags["scale_attn_weights"]:
        raise WeightsError(f"{json_path}: scale_attn_by_inverse_layer_idx / scale_attn_weights=false change the "
                           f"attention and are not supported")
    if raw.get("n_inner") not in (None, 4 * n_embd):
        raise WeightsError(f"{json_path}: n_inner={raw['n_inner']!r} is not supported; this model's MLP is "
                           f"4 * n_embd = {4 * n_embd} wide (n_inner null)")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise WeightsError(f"{json_path}: layer_norm_epsilon is {eps!r}; expected a number > 0")
    return activation, float(eps), flags["tie_word_embeddings"]


def _llmc_checkpoint(path: Path, fields: dict, stacked: dict, n_head: int | None = None) -> Checkpoint:
    agreed_heads(n_head, fields["n_head"], f"{path} (llm.c header)")
    V, Vp = fields["vocab_size"], fields["vocab_padded"]
    pad = next((p for p in (2 ** k for k in range(16, -1, -1)) if Vp % p == 0 and -(-V // p) * p == Vp), Vp)
    cfg = _config(path, vocab_size=V, block_size=fields["block_size"], n_layer=fields["n_layer"],
                  n_head=fields["n_head"], n_embd=fields["n_embd"], pad_vocab_to=pad)
    arrays = {}
    for name, array in stacked.items():  # layer tensors become one key per layer, like the other layouts
        if array.ndim >= 2 and name not in ("wte", "wpe"):
            arrays.update({f"{name}.{i}": array[i] for i in range(array.shape[0])})
        else:
            arrays[name] = array
    entries = linear_entries(cfg, LLMC_NAMES, Vp)
    return Checkpoint("llmc", cfg, arrays, entries, str(path), meta={"version": fields["version"]})


def _config(path: Path, **fields) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise WeightsError(f"{path}: the tensors describe an impossible model: {e}") from None


def has_float_dtype(array) -> bool:
    """Whether a checkpoint tensor (numpy or torch) holds float64, float32, float16 or bfloat16 numbers (not float8,
    which numpy cannot hold)."""
    return str(array.dtype).removeprefix("torch.") in ("float64", "float32", "float16", "bfloat16")


def to_numpy(array) -> np.ndarray:
    """A checkpoint tensor (numpy, safetensors or torch) as numpy, without a copy where it already is one."""
    if isinstance(array, np.ndarray):
        return array
    return array.numpy() if isinstance(array, wf.SafetensorsTensor) else wf.torch_to_numpy(array)
