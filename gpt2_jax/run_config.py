"""A training run's configs: train.py's flags, and what a checkpoint to resume or weights to fine-tune fix."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from gpt2_jax import checkpoint, convert, evaluate, layouts
from gpt2_jax.config import ConfigError, FlagParser, ModelConfig, PRESETS, TrainConfig, replace
from gpt2_jax.metrics import say
from gpt2_jax.checks import causal_attention_impl
from gpt2_jax.sharding import CLUSTER_FLAGS
from gpt2_jax.tokenizer import get_tokenizer

DEFAULT_PRESET = "mini"
# nanoGPT's flags that have no counterpart here, and what its users do instead.
NANOGPT_FLAGS = {
    "decay_lr": "--lr_schedule=constant keeps the learning rate after warmup (add --warmup_iters=0 for none)",
    "always_save_checkpoint": "every eval saves a checkpoint, and --keep_checkpoints=N keeps the last N plus the "
                              "best val loss",
    "compile": "the train step is always compiled by XLA",
    "device": "JAX runs on the accelerator it finds (JAX_PLATFORMS=cpu keeps it on the CPU)",
    "backend": "processes join with --coordinator_address, --num_processes and --process_id (docs/scaling.md)",
    "dataset": "--data=DIR names a prepared shard directory or a nanoGPT data/<dataset> directory with train.bin",
}
NANOGPT_CONFIG_FILES = ("nanoGPT's Python config files are not read; write its settings as a JSON object of "
                        "overrides and pass --config=FILE.json (or write them as --key=value)")
SAMPLE_PROMPT = "\n"  # the samples at the end of training start from a newline
# Settings that choose the batches: changed on resume, the run no longer sees an uninterrupted run's batches.
BATCH_SETTINGS = ("data", "seed", "batch_size", "gradient_accumulation_steps")


@dataclasses.dataclass
class RunFlags:
    """train.py's flags: a model preset, model and train overrides, and how to join a multi-process run."""

    preset: str | None
    model: dict
    train: dict
    cluster: dict[str, str]


def flag_parser() -> FlagParser:
    """train.py's flags: --config (repeatable, the last preset wins), the cluster flags, every config field."""
    parser = FlagParser(prog="train.py", add_help=False)
    parser.add_argument("--config", action="append", default=[])
    for name in CLUSTER_FLAGS:
        parser.add_argument(f"--{name}", default=argparse.SUPPRESS)
    parser.add_fields(TrainConfig)
    parser.add_fields(ModelConfig)
    return parser


def read_flags(argv: list[str]) -> RunFlags:
    """RunFlags from --config=NAME|FILE.json, the cluster flags and --key=value config fields."""
    nanogpt_only([a[2:].partition("=")[0] for a in argv if a.startswith("--")], "--")
    flags, positional = flag_parser().parse(argv)
    python_files = [p for p in positional if p.endswith(".py")]
    if python_files:
        raise ConfigError(f"{python_files[0]}: {NANOGPT_CONFIG_FILES}")
    if positional:
        raise ConfigError(f"unexpected argument(s) {positional}; flags are written --key=value")
    found = vars(flags)
    preset, file_overrides = None, {}
    for value in found.pop("config"):
        preset, file_overrides = read_config(value, preset, file_overrides)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    nanogpt_only(file_overrides, "config file key ")
    model_keys, train_keys = set(ModelConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    unknown = sorted(k for k in file_overrides if k not in model_keys | train_keys)
    if unknown:
        raise ConfigError(f"config file keys {unknown} are neither TrainConfig nor ModelConfig fields")
    cluster = {k: found.pop(k) for k in CLUSTER_FLAGS if k in found}
    model = {k: v for k, v in (file_overrides | found).items() if k in model_keys}
    train = {k: v for k, v in (file_overrides | found).items() if k in train_keys}
    return RunFlags(preset, model, train, cluster)


def read_config(value: str, preset: str | None, overrides: dict) -> tuple[str | None, dict]:
    """(preset, file overrides) after one --config=NAME|FILE.json: a preset name, or a JSON object of overrides
    that may name a "preset"."""
    if value.endswith(".py"):
        raise ConfigError(f"--config={value}: {NANOGPT_CONFIG_FILES}")
    if not value.endswith(".json"):
        return value, overrides
    try:
        overrides = json.loads(Path(value).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config={value} is not valid JSON: {e}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{value} must hold a JSON object of overrides")
    if "preset" in overrides:
        preset = overrides.pop("preset")
        if not isinstance(preset, str):
            raise ConfigError(f"{value}: \"preset\" must be a preset name; got {preset!r}")
    return preset, overrides


def nanogpt_only(keys, prefix: str) -> None:
    """A ConfigError for the first of keys that is one of nanoGPT's flags without a counterpart here."""
    for key in keys:
        if key in NANOGPT_FLAGS:
            raise ConfigError(f"{prefix}{key} is nanoGPT's, with no counterpart here: {NANOGPT_FLAGS[key]}")


def resolve(flags: RunFlags):
    """The run's (ModelConfig, TrainConfig, initial params or None) after checking every input up front."""
    train_cfg = TrainConfig(**flags.train)
    if Path(train_cfg.out_dir).exists() and not Path(train_cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir {train_cfg.out_dir} is a file; pick a directory")
    if train_cfg.init_from == "resume":
        return resumed(flags, train_cfg) + (None,)
    init = train_cfg.init_from
    if init != "scratch" and (not init or not layouts.weights_exist(init)):
        raise ConfigError(f"--init_from must be scratch, resume or an existing weights path; "
                          f"{why_no_weights(init)}")
    if checkpoint.is_checkpoint_dir(train_cfg.out_dir) and not train_cfg.eval_only:
        raise ConfigError(f"out_dir {train_cfg.out_dir} already holds checkpoints; continue them with "
                          f"--init_from=resume or pick another --out_dir")
    if init == "scratch":
        model_cfg = ModelConfig.from_preset(flags.preset or DEFAULT_PRESET, **flags.model)
        return checked(model_cfg, train_cfg), train_cfg, None
    return fine_tuned(flags, train_cfg)


def resumed(flags: RunFlags, train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The configs of a resumed run: the checkpoint's, with the flags' changes where a resume may make them."""
    meta = checkpoint.read_meta(train_cfg.out_dir)
    where = f"{train_cfg.out_dir}/{meta['step']}"
    base = checkpoint.saved_config(meta, "model_config", ModelConfig, where)  # activation, dropout, dtype, ...
    check_preset(flags.preset, base, train_cfg.out_dir)
    saved = checkpoint.saved_config(meta, "train_config", TrainConfig, where)
    train_cfg = replace(saved, **flags.train)
    if train_cfg.max_iters < meta["step"]:
        raise ConfigError(f"{train_cfg.out_dir} is at step {meta['step']}, past max_iters={train_cfg.max_iters}; "
                          f"pass --max_iters={meta['step']} or more")
    saved_train = meta.get("train_config", {})  # none in a save_weights directory: --eval_only reads one
    saved_clip = saved_train.get("grad_clip", TrainConfig().grad_clip)
    if (saved_clip > 0) != (train_cfg.grad_clip > 0):  # clipping adds a stage to the optimizer state
        raise ConfigError(f"{train_cfg.out_dir} was saved with grad_clip={saved_clip}; a resumed run keeps "
                          f"clipping {'on (grad_clip > 0)' if saved_clip > 0 else 'off (grad_clip=0)'}")
    if "batch_size" not in flags.train:
        saved_processes = meta.get("data", {}).get("process_count", 1)
        train_cfg = keep_global_batch(train_cfg, saved_processes, jax.process_count())
    model_cfg = checked(replace(base, **flags.model), train_cfg)
    checkpoint.check_model_config(meta["model_config"], model_cfg, where)  # before "resuming with" is said
    changes = resume_changes([(saved_train, train_cfg, flags.train),
                              (meta["model_config"], model_cfg, flags.model)])
    if changes and not train_cfg.eval_only:
        say(changes)
    return model_cfg, train_cfg


def fine_tuned(flags: RunFlags, train_cfg: TrainConfig):
    """(ModelConfig, TrainConfig, params) of a run that starts from the weights in --init_from."""
    init = train_cfg.init_from
    loaded_cfg, params = convert.load(init)
    check_preset(flags.preset, loaded_cfg, init)
    # Flags still override the weights' config: e.g. gelu_exact for nanoGPT and HF "gelu" weights.
    model_cfg = checked(replace(loaded_cfg, **flags.model), train_cfg)
    if model_cfg.block_size > loaded_cfg.block_size:  # wpe has no rows for the extra positions
        raise ConfigError(f"--block_size={model_cfg.block_size} is longer than the {loaded_cfg.block_size} positions "
                          f"of the weights in {init}; a fine-tune keeps or shortens the context "
                          f"(--block_size={loaded_cfg.block_size} or less)")
    cut = ""
    if model_cfg.block_size < loaded_cfg.block_size:  # fine-tune with a shorter context: keep the first positions
        params = dict(params, wpe=params["wpe"][: model_cfg.block_size])
        cut = f" (wpe cut to its first {model_cfg.block_size} of {loaded_cfg.block_size} positions)"
        loaded_cfg = replace(loaded_cfg, block_size=model_cfg.block_size)
    if model_cfg.pad_vocab_to != loaded_cfg.pad_vocab_to and model_cfg.vocab_size == loaded_cfg.vocab_size:
        params = with_vocab_rows(params, loaded_cfg.vocab_size, model_cfg.padded_vocab_size)
        loaded_cfg = replace(loaded_cfg, pad_vocab_to=model_cfg.pad_vocab_to)
    checkpoint.check_model_config(loaded_cfg.to_dict(), replace(model_cfg, param_dtype=loaded_cfg.param_dtype), init)
    say(f"initialised from the weights in {init}{cut}")
    params = jax.tree.map(lambda p: p.astype(model_cfg.param_dtype), params)
    return model_cfg, train_cfg, params


def why_no_weights(init: str) -> str:
    """Why --init_from=init names no weights: empty, no such path, or a step that its out_dir does not have."""
    if not init:
        return "it is empty"
    parent = Path(init).parent
    if Path(init).name.isdigit() and checkpoint.is_checkpoint_dir(parent):
        return f"{parent} has no step {Path(init).name}; it has steps {checkpoint.complete_steps(parent)}"
    return layouts.missing_message(init)


def with_vocab_rows(params: dict, vocab_size: int, rows: int) -> dict:
    """params whose token table (and untied head) has `rows` rows for another pad_vocab_to: the first vocab_size
    rows kept, the rest zeros (rows past vocab_size are never looked up, and their logits are cut off)."""
    def fit(a):
        a = a[:vocab_size]
        return jnp.pad(a, [(0, rows - vocab_size)] + [(0, 0)] * (a.ndim - 1))

    out = dict(params, wte=fit(params["wte"]))
    if "lm_head" in params:
        out["lm_head"] = {name: fit(a) for name, a in params["lm_head"].items()}
    return out


def resume_changes(configs: list[tuple[dict, object, dict]]) -> str | None:
    """The line that names the flags by which a resumed run differs from its checkpoint, given (the checkpoint's
    config as a dict, the run's config, the run's flags) for the train and the model config. out_dir is not a
    change (a moved or copied checkpoint)."""
    changed = [(k, saved[k], getattr(cfg, k)) for saved, cfg, flags in configs for k in sorted(flags)
               if k not in ("init_from", "out_dir") and k in saved
               and not _same_setting(k, saved[k], getattr(cfg, k))]
    if not changed:
        return None
    line = "resuming with " + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed)
    if any(k in BATCH_SETTINGS for k, _, _ in changed):
        line += " (the checkpoint's on the left); the batches from here differ from an uninterrupted run's"
    return line


def _same_setting(key: str, saved, value) -> bool:
    """Whether a resumed run's value of key is the checkpoint's: --data naming the same directory another way
    (data/mine, ./data/mine/, its absolute path) is the same data."""
    if key == "data" and saved and value:
        try:
            return os.path.samefile(saved, value)
        except OSError:  # one of them is gone: compare the names
            return os.path.normpath(saved) == os.path.normpath(value)
    return saved == value


def keep_global_batch(train_cfg: TrainConfig, saved_processes: int, processes: int) -> TrainConfig:
    """A run resumed by another number of processes keeps the checkpoint's global batch (batch_size is per
    process), so that it trains on the same batches; a ConfigError if that does not divide."""
    global_batch = train_cfg.batch_size * saved_processes
    if processes == saved_processes:
        return train_cfg
    if global_batch % processes:
        raise ConfigError(f"the checkpoint's global batch ({train_cfg.batch_size} x {saved_processes} processes) "
                          f"does not divide among {processes} processes; pass --batch_size to choose another")
    say(f"resuming on {processes} processes instead of {saved_processes}: batch_size "
        f"{global_batch // processes} per process keeps the global batch of {global_batch}")
    return replace(train_cfg, batch_size=global_batch // processes)


def check_preset(preset: str | None, saved: ModelConfig, where: str) -> None:
    """With a checkpoint or weights the model config is theirs; a --config preset only restates their size."""
    if preset is None:
        return
    diffs = [f"{k}={getattr(saved, k)} (the preset: {PRESETS[preset][k]})"
             for k in ("n_layer", "n_head", "n_embd") if getattr(saved, k) != PRESETS[preset][k]]
    if diffs:
        raise ConfigError(f"{where} is not a {preset} model: {', '.join(diffs)}")


def check_samples(model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    """A ConfigError before training, not a traceback after it, if the final samples' prompt is no token of the
    model's vocabulary."""
    top = max(get_tokenizer().encode(SAMPLE_PROMPT)) if train_cfg.num_samples else -1
    if top >= model_cfg.vocab_size:
        raise ConfigError(f"num_samples={train_cfg.num_samples}: the samples at the end start from a newline, token "
                          f"{top}, which is outside vocab_size {model_cfg.vocab_size}; pass --num_samples=0")


def read_hellaswag(model_cfg: ModelConfig, train_cfg: TrainConfig) -> list[evaluate.Example]:
    """The --hellaswag examples that every eval scores, read before training so that a bad file fails up front (a
    ConfigError naming the flag and, for a bad line, its file and line); [] without --hellaswag."""
    path = train_cfg.hellaswag
    if not path:
        return []
    n_vocab = get_tokenizer().n_vocab
    if model_cfg.vocab_size < n_vocab:  # its candidates are GPT-2 tokenizer ids, which the model must have
        raise ConfigError(f"--hellaswag needs a model with GPT-2's tokenizer's {n_vocab} token ids to score text; "
                          f"this one has vocab_size {model_cfg.vocab_size}")
    if not Path(path).is_file():
        raise ConfigError(f"--hellaswag={path}: no such file; expected a HellaSwag JSONL file "
                          "(one object a line with ctx, endings (4) and label)")
    try:
        examples, skipped = evaluate.read_hellaswag(path, model_cfg.block_size, train_cfg.hellaswag_limit or None,
                                                    skip_bad=True)
    except ValueError as e:
        raise ConfigError(f"--hellaswag={path}: {str(e).removeprefix(f'--data {path}: ')}") from None
    if skipped:  # train.py scores a file whole or not at all: the first bad line says what to fix
        raise ConfigError(f"--hellaswag: {len(skipped)} bad line(s); the first: {skipped[0]}")
    return examples


def checked(model_cfg: ModelConfig, train_cfg: TrainConfig) -> ModelConfig:
    """model_cfg, once its attention choice is known to run here in training, or without dropout for --eval_only
    (a ConfigError says why not)."""
    causal_attention_impl(model_cfg, training=not train_cfg.eval_only)
    return model_cfg
