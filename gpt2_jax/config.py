"""Frozen configs for the model and for training, presets, and type-checked --key=value overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import sys
import typing
import warnings
from pathlib import Path

ACTIVATIONS = ("gelu_tanh", "gelu_exact")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "xla", "cudnn", "cpu_kernel")
MATMUL_PRECISIONS = ("highest", "high", "default")


def is_integer(value, minimum: int | None = None) -> bool:
    """Whether value is a Python or NumPy integer (a bool is not one) and, given minimum, at least minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return minimum is None or value >= minimum


def seed_error(seed) -> str | None:
    """Why seed cannot seed a run or a sample (None when it can)."""
    if not is_integer(seed, 0) or seed >= 2**32:
        return f"seed must be an integer in [0, 2**32) (jax's PRNG keys take 32 bits); got {seed!r}"
    return None


class ConfigError(ValueError):
    """A config key or value that is not allowed; the message names it."""


def plain_warnings() -> None:
    """Print warnings as `warning: MESSAGE` lines: the scripts' users need the message, not our source line."""
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"warning: {message}\n"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT-2 model."""

    vocab_size: int = 50257
    block_size: int = 1024  # the context length
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    qkv_bias: bool = True
    lm_head_bias: bool = False
    tie_embeddings: bool = True
    bias: bool = True  # biases of the other Linear layers and LayerNorms (nanoGPT's bias=False turns them off)
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    # Rows of the token table (and logits columns computed) rounded up to a multiple of this for speed.
    # The model always returns vocab_size logits, so padded entries are never sampled nor in the loss.
    pad_vocab_to: int = 1
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # Blocks are stacked and run by lax.scan (one compiled block); unroll > 1 unrolls that many per iteration.
    scan_unroll: int = 1
    remat: bool = False  # recompute each block's activations in the backward pass
    # Causal self-attention over a whole sequence: "xla" (ours: masked softmax, XLA-compiled), "cudnn" (cuDNN's
    # fused flash attention: NVIDIA GPU, bfloat16/float16, no attention dropout), "cpu_kernel" (cpu_kernels.py:
    # one CPU device with AVX2 + FMA, AVX-512 or 64-bit ARM, float32, no attention dropout), or "auto" (the first
    # of cudnn, cpu_kernel that can run, else xla).
    attention: str = "auto"
    # Matmuls in float32 compute: "highest" is true float32 (PyTorch's default on GPUs, so logits match it);
    # "high"/"default" let XLA use TF32 on NVIDIA GPUs (about 5e-4 relative error, much faster) and fewer bf16
    # passes on TPUs. No effect on CPUs, nor on bfloat16/float16 compute.
    matmul_precision: str = "highest"

    def __post_init__(self):
        _check_types(self)
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pad_vocab_to", "scan_unroll")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1); got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be > 0; got {self.layer_norm_eps}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}; got {self.attention!r}")
        if self.matmul_precision not in MATMUL_PRECISIONS:
            raise ConfigError(f"matmul_precision must be one of {MATMUL_PRECISIONS}; got {self.matmul_precision!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {DTYPES}; got {getattr(self, name)!r}")
        if self.lm_head_bias and self.tie_embeddings:
            raise ConfigError("lm_head_bias needs an untied head (tie_embeddings=False)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def precision(self) -> str | None:
        """The `precision` of every matmul: matmul_precision in float32 compute, XLA's default in 16-bit."""
        return self.matmul_precision if self.dtype == "float32" else None

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A named preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini) with field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return replace(cls(**PRESETS[name]), **overrides)

    @classmethod
    def from_reference_json(cls, path: str | Path, **overrides) -> "ModelConfig":
        """Map the reference PyTorch GPT-2's JSON config (emb_dim, n_heads, ...) onto a ModelConfig."""
        raw = json.loads(Path(path).read_text())
        return cls.from_reference_dict(raw, **overrides)

    @classmethod
    def from_reference_dict(cls, raw: dict, **overrides) -> "ModelConfig":
        """The same mapping from an already-parsed dict."""
        keys = {"vocab_size": "vocab_size", "context_length": "block_size", "emb_dim": "n_embd",
                "n_heads": "n_head", "n_layers": "n_layer", "drop_rate": "dropout", "qkv_bias": "qkv_bias"}
        missing = [k for k in keys if k not in raw]
        if missing:
            raise ConfigError(f"reference config lacks keys {missing}; it needs {list(keys)}")
        fields = {ours: raw[theirs] for theirs, ours in keys.items()}
        # The reference model has an untied head whose bias follows qkv_bias, and GELU(tanh).
        fields.update(tie_embeddings=False, lm_head_bias=bool(raw["qkv_bias"]))
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # For tests: every feature, almost no compute.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    # The default of train.py: trains on Shakespeare on 2 CPU cores in about five and a half minutes.
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, pad_vocab_to=64),
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What train.py does: data, optimisation, evaluation and checkpoints (nanoGPT's names where they exist)."""

    out_dir: str = "out"
    data: str = ""  # a prepared shard directory or a nanoGPT train.bin/val.bin directory; "" = bundled Shakespeare
    init_from: str = "scratch"  # scratch | resume | a checkpoint or weights path
    seed: int = 1337
    max_iters: int = 600
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-3
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_iters: int = 30
    lr_decay_iters: int = 600
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 turns it off
    label_smoothing: float = 0.0
    ignore_index: int = -100
    eval_interval: int = 100
    eval_iters: int = 10
    eval_only: bool = False  # evaluate the starting weights (train and val loss) and exit; nothing is written
    log_interval: int = 10
    log_health: bool = False  # add each parameter group's update:weight norm ratio to the eval steps' records
    keep_checkpoints: int = 3
    num_samples: int = 3  # samples printed at the end of training
    sample_tokens: int = 200
    mesh: str = ""  # device mesh, e.g. "data:4,fsdp:2"; "" = every device on data (docs/scaling.md)
    tensorboard: bool = False  # TensorBoard event files in out_dir/tensorboard (tensorboardX)
    wandb_log: bool = False  # log to Weights & Biases (WANDB_MODE=offline: to out_dir/wandb only)
    wandb_project: str = "gpt2-jax"
    wandb_run_name: str = ""  # "" = wandb names the run
    hellaswag: str = ""  # a HellaSwag JSONL scored at every eval (hellaswag_acc, hellaswag_acc_norm); "" = none
    hellaswag_limit: int = 0  # score its first N examples; 0 = all
    hellaswag_batch_size: int = 0  # examples a HellaSwag batch (4 rows each); 0 = the global batch_size

    def __post_init__(self):
        _check_types(self)
        positive = ("max_iters", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                    "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "num_samples", "sample_tokens", "hellaswag_limit",
                     "hellaswag_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_schedule must be cosine, linear or constant; got {self.lr_schedule!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1); got {self.label_smoothing}")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ConfigError(f"learning_rate must be > 0 and min_lr >= 0; got {self.learning_rate}, {self.min_lr}")
        if max(self.learning_rate, self.min_lr) > 3.4028234663852886e38:  # float32's largest: the step computes in it
            raise ConfigError(f"learning_rate and min_lr must fit in float32; got {self.learning_rate}, {self.min_lr}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1); got {getattr(self, name)}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("grad_clip and weight_decay must be >= 0")
        if not self.out_dir:
            raise ConfigError("out_dir must name a directory; got an empty string")
        if not self.eps > 0:
            raise ConfigError(f"eps must be > 0 (AdamW divides by sqrt(v) + eps); got {self.eps}")
        if seed_error(self.seed):
            raise ConfigError(seed_error(self.seed))
        if self.wandb_log and not self.wandb_project:
            raise ConfigError("wandb_project must name a project when wandb_log is on; got an empty string")
        if self.num_samples and not self.sample_tokens:
            raise ConfigError("sample_tokens must be >= 1 when num_samples > 0 (or set num_samples=0)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_types(cfg) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        ok = isinstance(value, hint) and not (hint in (int, float) and isinstance(value, bool))
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
            ok = True
        if not ok:
            raise ConfigError(f"{type(cfg).__name__}.{f.name} must be {hint.__name__}; got {value!r}")
        value = getattr(cfg, f.name)
        if hint is float and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number; got {value}")
        # Integers reach jitted code as int32 (seed has its own, 32-bit unsigned range).
        if hint is int and f.name != "seed" and not -2**31 <= value < 2**31:
            raise ConfigError(f"{f.name} must fit in 32 bits, [-2**31, 2**31); got {value}")


def replace(cfg, **overrides):
    """dataclasses.replace that names unknown keys instead of raising a TypeError."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"unknown {type(cfg).__name__} key(s) {unknown}; known keys: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)


def typed(kind: type):
    """The argparse type of a flag of type kind (bool takes true/false, yes/no, on/off or 1/0)."""
    def parse(text: str):
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"takes true or false; got {text!r}")
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind.__name__}; got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


def ranged(cast, ok, expected: str):
    """An argparse type: text cast by cast, then accepted only if ok(value); errors say `must be {expected}`."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}; got {text}")
        return value
    parse.__name__ = cast.__name__
    return parse


class FlagParser(argparse.ArgumentParser):
    """The flag parser of train.py, sample.py, bench/ and the `python -m gpt2_jax.*` tools: argparse without
    abbreviations, taking --key=value (or --key value), with dataclass fields and dicts of defaults as typed flags.
    A bad flag raises a ConfigError from parse(); parse_args() prints argparse's usage and error and exits 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # a typo is an unknown flag, not another flag it begins
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_flag(self, name: str, kind: type, **kwargs):
        """--name of type kind; a bool flag also stands alone (--name is --name=true)."""
        if kind is bool:
            kwargs.update(nargs="?", const=True)
        return self.add_argument(f"--{name}", type=typed(kind), **kwargs)

    def add_fields(self, cls, skip=()) -> None:
        """Every field of the dataclass cls as a flag typed like it; an absent flag leaves no attribute."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                self.add_flag(f.name, hints[f.name], default=argparse.SUPPRESS)

    def add_defaults(self, defaults: dict) -> None:
        """A flag per key of defaults, typed by its default value."""
        for name, value in defaults.items():
            self.add_flag(name, type(value), default=value)

    def error(self, message: str):
        raise ConfigError(message)  # raised, so that each caller chooses: train.py maps it to its exit status

    def fail(self, message: str):
        """argparse's own error(): the usage and `PROG: error: MESSAGE` on stderr, then exit status 2."""
        super().error(message)

    def known_flags(self) -> list[str]:
        """The --flags of this parser and of its sub-commands' parsers."""
        names = {s for a in self._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                names.update(flag for sub in action.choices.values() for flag in sub.known_flags())
        return sorted(names)

    def parse(self, argv: list[str], namespace=None) -> tuple[argparse.Namespace, list[str]]:
        """(the flags, the positional arguments that no argument takes); an unknown flag is a ConfigError that
        lists the known ones."""
        namespace, rest = self.parse_known_args(argv, namespace)
        for arg in rest:
            if arg.startswith("-") and arg != "-":
                raise ConfigError(f"unknown flag {arg.partition('=')[0]}; known flags: "
                                  f"{', '.join(k[2:] for k in self.known_flags())}")
        return namespace, rest

    def parse_args(self, args=None, namespace=None):
        try:
            namespace, rest = self.parse(sys.argv[1:] if args is None else args, namespace)
            if rest:
                raise ConfigError(f"unexpected argument(s) {rest}")
        except ConfigError as e:
            self.fail(str(e))
        return namespace
