"""GPT-2 weights in and out: Hugging Face/OpenAI, nanoGPT, llm.c, the reference PyTorch GPT-2, and orbax; OpenAI's
original TensorFlow checkpoints in only.

load() detects the layout (layouts.py), checks that every expected tensor is present with its shape and that
every tensor present is used before reading any weight, then builds our parameters one at a time from
memory-mapped tensors into buffers that jax adopts without a copy: memory peaks at the parameters plus the
pages of the checkpoint file read, two copies of the weights (bench/convert_memory.py measures it).
The export_* functions walk the same tables the other way. They refuse a destination that already holds the files
they write, and write each file beside it and rename it when complete, so that no file is overwritten or left
half-written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from gpt2_jax import layouts
from gpt2_jax import weight_files as wf
from gpt2_jax.config import FlagParser, ModelConfig, plain_warnings, replace
from gpt2_jax.layouts import Checkpoint, WeightsError, open_checkpoint, to_numpy
from gpt2_jax.model import abstract_params

TARGETS = ("orbax", "hf", "nanogpt", "reference", "llmc")
# Files of a Hugging Face directory that an hf export would overwrite or sit beside (a second set of weights).
HF_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
LLMC_VOCAB_MULTIPLE = 128  # llm.c pads the token table to a multiple of 128 rows


# ---------------------------------------------------------------- checkpoint -> params


def load(path: str | Path, dtype=jnp.float32, *, n_head: int | None = None,
         config_path: str | Path | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from any supported weights file or directory, params cast to dtype.

    Reads Hugging Face/OpenAI (directory or bare safetensors/pytorch_model.bin), nanoGPT ckpt.pt, llm.c .bin,
    the reference PyTorch layout, OpenAI's TensorFlow release (the directory download_model.py fills, or a
    checkpoint prefix or its .index file), and this project's orbax checkpoints (a train.py out_dir: its
    latest step; one of its step directories, such as out/15: that step).
    """
    np_dtype = _float_dtype(dtype)
    path = Path(path)
    orbax = orbax_source(path)
    if orbax is not None:
        from gpt2_jax import checkpoint  # orbax is only needed for orbax directories

        layouts.check_n_head(n_head)
        cfg, params = checkpoint.load_weights(*orbax, dtype=jnp.dtype(np_dtype))
        layouts.agreed_heads(n_head, cfg.n_head, f"{path} (its saved model config)")
        return replace(cfg, param_dtype=np_dtype.name), params
    ckpt = open_checkpoint(path, n_head=n_head, config_path=config_path)
    return replace(ckpt.config, param_dtype=np_dtype.name), params_from(ckpt, np_dtype)


def load_init_from(path: str, dtype: str = "float32", n_head: int | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) for an --init_from flag: params and compute in dtype, logits for the tokenizer's ids
    only (a padded vocabulary's extra ids cannot be decoded); a path that holds no weights names what it lacks."""
    from gpt2_jax.sampling import restrict_vocab
    from gpt2_jax.tokenizer import get_tokenizer

    # A step that an out_dir lacks (out/15) is left to load, whose error names the steps it has.
    if not layouts.weights_exist(path) and orbax_source(Path(path)) is None:
        raise FileNotFoundError(f"--init_from: {layouts.missing_message(path)}")
    cfg, params = load(path, dtype=jnp.dtype(dtype), n_head=n_head)
    cfg = restrict_vocab(cfg, get_tokenizer().n_vocab)
    return replace(cfg, dtype=dtype, param_dtype=dtype), params


def orbax_source(path: Path) -> tuple[Path, int | None] | None:
    """(out_dir, step or None for its latest) when path is an orbax out_dir or one of its step directories, else
    None. A step directory reaches the steps an out_dir keeps besides its latest, such as the best val loss (one
    that is not there: load_weights names the steps that are)."""
    if not (path.is_dir() or path.name.isdigit()):
        return None
    from gpt2_jax import checkpoint  # orbax is only needed for orbax directories

    if path.name.isdigit() and checkpoint.is_checkpoint_dir(path.parent):
        return path.parent, int(path.name)
    return (path, None) if checkpoint.is_checkpoint_dir(path) else None


def params_from(ckpt: Checkpoint, dtype=np.float32) -> dict:
    """Check every tensor of a Checkpoint against its layout, then build the params one at a time."""
    cfg, np_dtype = ckpt.config, _float_dtype(dtype)
    expected = _expected_tensors(ckpt)
    missing = [k for k in expected if k not in ckpt.arrays]
    if missing:
        unused = [k for k in ckpt.arrays if k not in expected and not ckpt.ignored(k) and k not in ckpt.aliases]
        hint = f"; tensors it has that are not used: {unused[:3]}" if unused else ""
        raise WeightsError(f"{ckpt.source} lacks tensor {missing[0]!r} (expected shape {expected[missing[0]]}) of "
                           f"the {ckpt.layout} layout" + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
                           + hint)
    for key, shape in expected.items():
        got = tuple(ckpt.arrays[key].shape)
        if got != shape:
            raise WeightsError(f"{ckpt.source}: tensor {key!r} has shape {got}; expected {shape}")
    for key in [*expected, *ckpt.aliases]:
        if not layouts.has_float_dtype(ckpt.arrays[key]):
            raise WeightsError(f"{ckpt.source}: tensor {key!r} has dtype {ckpt.arrays[key].dtype}; expected "
                               f"floating-point weights (float32, float16, bfloat16 or float64)")
    extra = [k for k in ckpt.arrays if k not in expected and not ckpt.ignored(k) and k not in ckpt.aliases]
    if extra:
        raise WeightsError(f"{ckpt.source} has tensor {extra[0]!r} of shape {tuple(ckpt.arrays[extra[0]].shape)} "
                           f"that the {ckpt.layout} layout does not use"
                           + (f" (and {len(extra) - 1} more: {extra[1:4]})" if len(extra) > 1 else ""))
    for alias, target in ckpt.aliases.items():
        if not np.array_equal(to_numpy(ckpt.arrays[alias]), to_numpy(ckpt.arrays[target])):
            raise WeightsError(f"{ckpt.source}: {alias!r} must equal {target!r} (a tied head) but differs")
    return _assemble(cfg, ckpt.entries, ckpt.arrays, np_dtype)


def _expected_tensors(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    expected = {}
    for entry in ckpt.entries:
        for key, shape in zip(entry.theirs, entry.shapes):
            layers = range(ckpt.config.n_layer) if "{i}" in key else (None,)
            expected.update({key.format(i=i): shape for i in layers})
    return expected


def _assemble(cfg: ModelConfig, entries: list[layouts.Entry], arrays: dict, np_dtype: np.dtype) -> dict:
    shapes = param_shapes(cfg)
    by_ours = {e.ours: e for e in entries}
    if set(by_ours) != set(shapes):
        raise AssertionError(f"layout table and model disagree on {sorted(set(by_ours) ^ set(shapes))}")
    flat = {}
    for key, shape in shapes.items():
        entry = by_ours[key]
        out = _aligned_empty(shape, np_dtype)
        if key.startswith("h."):
            for i in range(cfg.n_layer):
                out[i] = _checked(key, entry.to_ours(*[to_numpy(arrays[k.format(i=i)]) for k in entry.theirs]),
                                  shape[1:])
        else:
            out[...] = _checked(key, entry.to_ours(*[to_numpy(arrays[k]) for k in entry.theirs]), shape)
        flat[key] = jax.device_put(out)
        del out
    return unflatten(flat)


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """np.empty aligned so that jax.device_put on CPU adopts the buffer instead of copying it (one copy, not two)."""
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start: start + nbytes].view(dtype).reshape(shape)


def _checked(key: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if tuple(array.shape) != tuple(shape):
        raise AssertionError(f"layout table built {key} with shape {array.shape}; the model needs {shape}")
    return array


def _float_dtype(dtype) -> np.dtype:
    try:
        np_dtype = np.dtype(jnp.dtype(dtype))
    except TypeError:
        np_dtype = None
    if np_dtype is None or np_dtype.name not in ("float32", "bfloat16", "float16"):
        raise WeightsError(f"dtype must be float32, bfloat16 or float16; got {dtype!r}")
    return np_dtype


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameters as dotted names ("h.attn.c_attn.weight") -> shape, without allocating them."""
    abstract = abstract_params(cfg)
    return {key: tuple(a.shape) for key, a in flatten(abstract).items()}


def flatten(tree: dict) -> dict:
    """Nested params -> {"h.attn.c_attn.weight": array, ...}."""
    return traverse_util.flatten_dict(tree, sep=".")


def unflatten(flat: dict) -> dict:
    """{"h.attn.c_attn.weight": array, ...} -> nested params."""
    return traverse_util.unflatten_dict(flat, sep=".")


# ---------------------------------------------------------------- params -> files


def export_hf(config: ModelConfig, params: dict, out_dir: str | Path) -> None:
    """Write model.safetensors + config.json that transformers' GPT2LMHeadModel.from_pretrained loads.

    Biases the model lacks (bias=False, qkv_bias=False) are written as zeros, which computes the same function;
    an untied head is written untied (tie_word_embeddings false), unless it equals wte. GPT-2 in transformers has
    no lm_head bias: an all-zero one (a reference export's) is left out, any other is refused.
    """
    config, params = _without_redundant_head(config, params)
    if config.lm_head_bias:
        raise WeightsError("Hugging Face GPT-2 has no lm_head bias but this model has one (lm_head_bias=True); "
                           "export it with --to reference or --to orbax")
    _refuse_existing(out_dir, "hf")
    cfg, flat = _complete(config, params, qkv_bias=True, untie=False, lm_head_bias=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _their_tensors(cfg, layouts.hf_entries(cfg), flat)
    with wf.replaced_when_done(out_dir / "config.json") as partial:  # in place only once the weights are
        partial.write_text(json.dumps(hf_config(config, flat["wte"].dtype), indent=2) + "\n")
        wf.write_safetensors(out_dir / "model.safetensors", tensors, {"format": "pt"})


def hf_config(cfg: ModelConfig, dtype=np.float32) -> dict:
    """transformers' GPT2Config fields for a ModelConfig."""
    eot = 50256 if cfg.vocab_size > 50256 else None
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": None,
            "activation_function": "gelu_new" if cfg.activation == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "bos_token_id": eot, "eos_token_id": eot, "dtype": np.dtype(dtype).name}


def export_reference(config: ModelConfig, params: dict, path: str | Path) -> None:
    """Write a state_dict .pt that the reference PyTorch GPT-2 loads with strict=True, and its JSON config beside.

    The reference model has an untied head, and out_head has a bias exactly when the qkv projections do. A tied
    model is written with wte copied into out_head.weight; biases the model lacks are written as zeros (the same
    function): qkv biases when it has an lm_head bias, the out_head bias when it has qkv biases, and all others
    when bias=False. The JSON (path with suffix .json) gives n_heads, which tensor shapes cannot tell.
    """
    import torch

    from gpt2_jax import torch_ref

    _require(config, "the reference GPT-2", activation="gelu_tanh", layer_norm_eps=1e-5)
    path = Path(path)
    if path.suffix == ".json":
        raise WeightsError(f"{path}: the reference weights go to a .pt file; its config is written beside it as .json")
    _refuse_existing(path, "reference")
    ref_qkv = config.qkv_bias or config.lm_head_bias
    cfg, flat = _complete(config, params, qkv_bias=ref_qkv, untie=True, lm_head_bias=ref_qkv)
    tensors = _their_tensors(cfg, layouts.reference_entries(cfg), flat)
    state = {key: _to_torch(make()) for key, _, _, make in tensors}
    state.update(torch_ref.reference_buffers(reference_config(cfg)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with wf.replaced_when_done(path.with_suffix(".json")) as json_partial, wf.replaced_when_done(path) as partial:
        json_partial.write_text(json.dumps(reference_config(cfg), indent=2) + "\n")
        torch.save(state, partial)


def reference_config(cfg: ModelConfig) -> dict:
    """The reference GPT-2's JSON config for a ModelConfig of its layout."""
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.block_size, "emb_dim": cfg.n_embd,
            "n_heads": cfg.n_head, "n_layers": cfg.n_layer, "drop_rate": cfg.dropout, "qkv_bias": cfg.qkv_bias}


def export_nanogpt(config: ModelConfig, params: dict, path: str | Path) -> None:
    """Write a nanoGPT ckpt.pt ({"model": state_dict, "model_args": ...}) that nanoGPT's GPT loads with strict=True.

    nanoGPT's model has erf GELU, a tied head without bias and one bias flag for every Linear and LayerNorm: a model
    with only some of those biases is written with the others as zeros (the same function). The file has no
    optimizer state: nanoGPT's sample.py and init_from="resume"'s model read it, its train.py cannot resume it.
    """
    import torch

    config, params = _without_redundant_head(config, params)
    _require(config, "nanoGPT", activation="gelu_exact", layer_norm_eps=1e-5, tie_embeddings=True,
             lm_head_bias=False)
    path = Path(path)
    _refuse_existing(path, "nanogpt")
    bias = config.bias or config.qkv_bias
    full, flat = _complete(config, params, qkv_bias=bias, untie=False, lm_head_bias=False)
    cfg = replace(full, bias=bias, qkv_bias=bias)
    state = {key: _to_torch(make()) for key, _, _, make in _their_tensors(cfg, layouts.nanogpt_entries(cfg), flat)}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # one tensor under both names, as nanoGPT saves it
    model_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                      bias=bias, vocab_size=cfg.vocab_size, dropout=cfg.dropout)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wf.replaced_when_done(path) as partial:
        torch.save({"model": state, "model_args": model_args}, partial)


def export_llmc(config: ModelConfig, params: dict, path: str | Path, dtype: str = "float32") -> None:
    """Write an llm.c GPT-2 .bin: version 3 (float32) or 5 (bfloat16), token table padded to 128 rows."""
    if dtype not in ("float32", "bfloat16"):
        raise WeightsError(f"llm.c files hold float32 or bfloat16 weights; got dtype {dtype!r}")
    config, params = _without_redundant_head(config, params)
    _require(config, "llm.c", activation="gelu_tanh", layer_norm_eps=1e-5, tie_embeddings=True, lm_head_bias=False)
    _refuse_existing(path, "llmc")
    cfg, flat = _complete(config, params, qkv_bias=True, untie=False, lm_head_bias=False)
    vocab_padded = -(-cfg.padded_vocab_size // LLMC_VOCAB_MULTIPLE) * LLMC_VOCAB_MULTIPLE
    by_name = {e.theirs[0]: e for e in layouts.linear_entries(cfg, layouts.LLMC_NAMES, vocab_padded)}

    def chunks(name):
        if name in by_name:
            yield by_name[name].to_theirs(flat[by_name[name].ours])[0]
            return
        entry = by_name[name + ".{i}"]
        for i in range(cfg.n_layer):
            yield entry.to_theirs(flat[entry.ours][i])[0]

    fields = dict(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                  n_embd=cfg.n_embd, vocab_padded=vocab_padded)
    names = wf.llmc_shapes(cfg.block_size, vocab_padded, cfg.n_layer, cfg.n_embd)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wf.write_llmc(path, fields, ((name, chunks(name)) for name in names), version=3 if dtype == "float32" else 5)


def save(config: ModelConfig, params: dict, dst: str | Path, to: str = "orbax", dtype: str = "float32") -> None:
    """Write params in one of TARGETS (orbax: a directory that train.py --init_from and sample.py read)."""
    if to == "orbax":
        from gpt2_jax import checkpoint

        checkpoint.save_weights(dst, config, params)
    elif to == "hf":
        export_hf(config, params, dst)
    elif to == "nanogpt":
        export_nanogpt(config, params, dst)
    elif to == "reference":
        export_reference(config, params, dst)
    elif to == "llmc":
        export_llmc(config, params, dst, dtype)
    else:
        raise WeightsError(f"unknown target {to!r}; choose one of {TARGETS}")


def _check_destination(dst: str | Path, to: str) -> None:
    """Refuse a destination of the wrong kind (a file where a directory goes, or the reverse) or one that the export
    would overwrite, before any work."""
    dst = Path(dst)
    writes_directory = to in ("orbax", "hf")
    if writes_directory and dst.exists() and not dst.is_dir():
        raise WeightsError(f"destination {dst} is a file; --to {to} writes a directory: give a new path or a "
                           f"directory")
    if not writes_directory and dst.is_dir():
        raise WeightsError(f"destination {dst} is a directory; --to {to} writes a file: give a file path")
    _refuse_existing(dst, to)


def _refuse_existing(dst: str | Path, to: str) -> None:
    """Refuse a destination whose files an export would overwrite (for hf, also weights it would sit beside)."""
    dst = Path(dst)
    if to == "hf":
        taken = [name for name in HF_FILES if (dst / name).exists()]
        if taken:
            raise WeightsError(f"destination {dst} already holds {', '.join(taken)}; export into a new or empty "
                               f"directory (an export never overwrites nor leaves two sets of weights)")
    elif to in ("nanogpt", "reference", "llmc"):
        for path in (dst, dst.with_suffix(".json")) if to == "reference" else (dst,):
            if path.exists():
                raise WeightsError(f"destination {path} already exists; an export never overwrites: give a new "
                                   f"path or remove it first")


def _require(cfg: ModelConfig, target: str, **needed) -> None:
    for key, value in needed.items():
        if getattr(cfg, key) != value:
            raise WeightsError(f"{target} needs {key}={value!r}; this model has {key}={getattr(cfg, key)!r}")


def _without_redundant_head(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """The same function with fewer parameters, for layouts that cannot hold them (HF, llm.c): an all-zero lm_head
    bias is dropped, and an untied head equal to wte (in its vocab_size rows) becomes tied. The reference layout
    writes both (its out_head is untied, with a bias when the qkv projections have one), so that reading such a
    file back gives them."""
    if not cfg.tie_embeddings and isinstance(params.get("lm_head"), dict):
        head = dict(params["lm_head"])
        if cfg.lm_head_bias and "bias" in head and not np.any(np.asarray(head["bias"])):
            del head["bias"]
            cfg = replace(cfg, lm_head_bias=False)
        params = {**params, "lm_head": head}
        V = cfg.vocab_size
        if not cfg.lm_head_bias and "weight" in head and tuple(np.shape(head["weight"])) == tuple(
                np.shape(params["wte"])) and np.array_equal(np.asarray(head["weight"])[:V],
                                                            np.asarray(params["wte"])[:V]):
            params = {k: v for k, v in params.items() if k != "lm_head"}
            cfg = replace(cfg, tie_embeddings=True)
    return cfg, params


def _complete(cfg: ModelConfig, params: dict, *, qkv_bias: bool, untie: bool,
              lm_head_bias: bool) -> tuple[ModelConfig, dict]:
    """The same function with more parameters: absent biases become zeros, a tied head is shared as lm_head."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    expected = param_shapes(cfg)
    for key in sorted(set(expected) | set(flat)):
        if key not in flat or key not in expected or tuple(flat[key].shape) != expected[key]:
            got = tuple(flat[key].shape) if key in flat else "nothing"
            raise WeightsError(f"params do not match the config: {key!r} is {got}; expected "
                               f"{expected.get(key, 'no such parameter')}")
    L, C, dtype = cfg.n_layer, cfg.n_embd, flat["wte"].dtype
    if not cfg.bias:
        for key, shape in {"ln_f.bias": (C,), "h.ln_1.bias": (L, C), "h.ln_2.bias": (L, C),
                           "h.attn.c_proj.bias": (L, C), "h.mlp.c_fc.bias": (L, 4 * C),
                           "h.mlp.c_proj.bias": (L, C)}.items():
            flat[key] = np.zeros(shape, dtype)
    if qkv_bias and not cfg.qkv_bias:
        flat["h.attn.c_attn.bias"] = np.zeros((L, 3, cfg.n_head, cfg.head_dim), dtype)
    if untie and cfg.tie_embeddings:
        flat["lm_head.weight"] = flat["wte"]
    if lm_head_bias and not cfg.lm_head_bias:
        flat["lm_head.bias"] = np.zeros((cfg.padded_vocab_size,), dtype)
    full = replace(cfg, bias=True, qkv_bias=qkv_bias or cfg.qkv_bias, tie_embeddings=cfg.tie_embeddings and not untie,
                   lm_head_bias=lm_head_bias or cfg.lm_head_bias)
    return full, flat


def _their_tensors(cfg: ModelConfig, entries: list[layouts.Entry], flat: dict) -> list[tuple]:
    """(key, shape, dtype, make_array) for every checkpoint tensor; arrays are built only when written."""
    def maker(entry, i, j):
        source = (lambda: flat[entry.ours]) if i is None else (lambda: flat[entry.ours][i])
        return lambda: entry.to_theirs(source())[j]

    out = []
    for entry in entries:
        layers = range(cfg.n_layer) if entry.ours.startswith("h.") else (None,)
        for i in layers:
            for j, (key, shape) in enumerate(zip(entry.theirs, entry.shapes)):
                name = key if i is None else key.format(i=i)
                out.append((name, shape, flat[entry.ours].dtype, maker(entry, i, j)))
    return out


def _to_torch(array: np.ndarray):
    import torch

    array = np.array(array, copy=True, order="C")
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = FlagParser(prog="python -m gpt2_jax.convert", description=(
        "Convert GPT-2 weights: SRC is a Hugging Face directory or file, a nanoGPT ckpt.pt, an llm.c .bin, a "
        "reference PyTorch state_dict, OpenAI's TensorFlow checkpoint (its directory, prefix or .index file) or "
        "an orbax directory (detected from the content)."))
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--to", choices=TARGETS, default="orbax",
                        help="orbax (default; what train.py --init_from and sample.py read), hf, nanogpt, reference, "
                             "llmc")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_flag("n_head", int, default=None, help="heads, when no config JSON gives them")
    args = parser.parse_args(argv)
    try:
        _check_destination(args.dst, args.to)
        cfg, params = load(args.src, jnp.dtype(args.dtype), n_head=args.n_head)
        save(cfg, params, args.dst, args.to, args.dtype)
    except (ValueError, OSError) as e:  # WeightsError, ConfigError, CheckpointError; a path that cannot be written
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"{args.src} -> {args.dst} ({args.to}, {args.dtype}): {n:,} parameters, n_layer={cfg.n_layer} "
          f"n_head={cfg.n_head} n_embd={cfg.n_embd} vocab_size={cfg.vocab_size} block_size={cfg.block_size}")
    return 0


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
