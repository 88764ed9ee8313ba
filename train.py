"""Train GPT-2: from scratch, resumed, or fine-tuned from converted weights.

    python train.py                                    # the mini model on Shakespeare, ~5.5 minutes on 2 idle CPU cores
    python train.py --config=gpt2 --init_from=PATH --learning_rate=3e-5   # fine-tune converted weights
    python train.py --config=run.json --max_iters=500  # a JSON of overrides ("preset": a model preset)
    python train.py --init_from=resume --out_dir=out   # continue the latest checkpoint in out_dir
    python train.py --config=gpt2-xl --mesh=fsdp:8     # params and optimizer state split over 8 devices
    python train.py --eval_only=true --init_from=PATH --data=DIR   # train and val loss of weights; writes nothing

--config=NAME picks a model preset (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini; default mini); with
--init_from=resume or PATH the model config is the checkpoint's, and a preset must agree with its size. Every
TrainConfig and ModelConfig field is a --key=value flag (nanoGPT's names: out_dir, max_iters, batch_size,
block_size, learning_rate, dtype, n_layer, ...). Ctrl-C saves a checkpoint and exits. One run at a time writes
to an out_dir. A resumed run may change any TrainConfig flag but these: max_iters no lower than the checkpoint's
step, and grad_clip on (> 0) or off (0) as it was (the optimizer state differs).

--mesh=data:D,fsdp:F,tensor:N lays the devices out (default: all on data); batch_size is per process.
Multi-host: run the same command on every host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or --coordinator_address=auto
on TPU pods and SLURM); --join_timeout=SECONDS (default 300) is how long to wait for all of them to start.
docs/scaling.md has the details.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure  # the object API draws off-screen without choosing a pyplot backend
from tqdm import tqdm

from gpt2_jax import checkpoint, convert, data, layouts, sharding
from gpt2_jax.config import (ConfigError, ModelConfig, PRESETS, TrainConfig, parse_overrides, plain_warnings,
                             replace)
from gpt2_jax.model import causal_attention_impl, count_params
from gpt2_jax.sampling import context_length, generate, restrict_vocab
from gpt2_jax.tokenizer import get_tokenizer

DEFAULT_PRESET = "mini"
# Flags that say how to join a multi-process run; not TrainConfig fields, so no checkpoint records them.
CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id", "join_timeout")
# nanoGPT's flags that have no counterpart here, and what its users do instead.
NANOGPT_FLAGS = {
    "decay_lr": "--lr_schedule=constant keeps the learning rate after warmup (add --warmup_iters=0 for none)",
    "always_save_checkpoint": "every eval saves a checkpoint, and --keep_checkpoints=N keeps the last N plus the "
                              "best val loss",
    "compile": "the train step is always compiled by XLA",
    "device": "JAX runs on the accelerator it finds (JAX_PLATFORMS=cpu keeps it on the CPU)",
    "backend": "processes join with --coordinator_address, --num_processes and --process_id (docs/scaling.md)",
    "dataset": "--data=DIR names a prepared shard directory or a nanoGPT data/<dataset> directory with train.bin",
    **dict.fromkeys(("wandb_log", "wandb_project", "wandb_run_name"),
                    "metrics.jsonl and loss.png in out_dir hold the loss curves (no wandb)"),
}
NANOGPT_CONFIG_FILES = ("nanoGPT's Python config files are not read; write its settings as a JSON object of "
                        "overrides and pass --config=FILE.json (or write them as --key=value)")
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 200  # nanoGPT's sample.py defaults
SAMPLE_PROMPT = "\n"  # the samples at the end of training start from a newline
# Dense peak TFLOP/s per chip: (16-bit; float32 at matmul_precision "default"/"high": TF32 on NVIDIA since Ampere,
# one bf16 pass on TPU; float32 at "highest": CUDA cores on NVIDIA, six bf16 passes on TPU). Matched against
# jax's device_kind, first match wins.
PEAK_TFLOPS = [
    ("gb200", (2500.0, 1250.0, 80.0)), ("b200", (2250.0, 1100.0, 75.0)), ("h100 nvl", (835.0, 418.0, 60.0)),
    ("h100 pcie", (756.0, 378.0, 51.0)), ("h100", (989.0, 494.0, 67.0)), ("h200", (989.0, 494.0, 67.0)),
    ("mi325x", (1307.4, 653.7, 163.4)), ("mi300x", (1307.4, 653.7, 163.4)), ("mi250x", (383.0, 95.7, 95.7)),
    ("a100", (312.0, 156.0, 19.5)), ("l40s", (362.0, 183.0, 91.6)), ("l40", (181.0, 90.5, 90.5)),
    ("l4", (121.0, 60.0, 30.3)), ("a10", (125.0, 62.5, 31.2)), ("v100", (125.0, 15.7, 15.7)),
    ("tpu v6", (918.0, 918.0, 153.0)), ("tpu v5 lite", (197.0, 197.0, 32.8)), ("tpu v5e", (197.0, 197.0, 32.8)),
    ("tpu v5", (459.0, 459.0, 76.5)), ("tpu v4", (275.0, 275.0, 45.8)), ("tpu v3", (123.0, 123.0, 20.5)),
]


def say(text: str) -> None:
    """Print a progress line on the main process only (every process of a multi-host run prints alike)."""
    if sharding.is_main_process():
        tqdm.write(text)


def join_cluster(argv: list[str]) -> list[str]:
    """Take the CLUSTER_FLAGS out of argv and join a multi-process run if they (or the environment) ask to."""
    found, rest = {}, []
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and key in CLUSTER_FLAGS:
            if not eq or not value:
                raise ConfigError(f"flag --{key} must be written --{key}=VALUE")
            found[key] = value
        else:
            rest.append(arg)
    numbers = {}
    for key in ("num_processes", "process_id"):
        if key in found:
            try:
                numbers[key] = int(found[key])
            except ValueError:
                raise ConfigError(f"--{key} must be an integer; got {found[key]!r}") from None
    try:
        timeout = float(found.get("join_timeout", 300))
    except ValueError:
        raise ConfigError(f"--join_timeout must be a number of seconds; got {found['join_timeout']!r}") from None
    try:
        sharding.initialize_distributed(found.get("coordinator_address"), numbers.get("num_processes"),
                                        numbers.get("process_id"), timeout, on_timeout=give_up_joining)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return rest


def why_no_weights(init: str) -> str:
    """Why --init_from=init names no weights: empty, no such path, or a step that its out_dir does not have."""
    if not init:
        return "it is empty"
    parent = Path(init).parent
    if Path(init).name.isdigit() and checkpoint.is_checkpoint_dir(parent):
        return f"{parent} has no step {Path(init).name}; it has steps {checkpoint.complete_steps(parent)}"
    return layouts.missing_message(init)


def give_up_joining(message: str) -> None:
    """Called from a timer thread while the main thread waits inside jax.distributed.initialize."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def read_flags(argv: list[str]) -> tuple[str | None, dict, dict]:
    """(preset, model overrides, train overrides) from --config=NAME|FILE.json and --key=value flags."""
    preset, file_overrides, rest = None, {}, []
    for arg in argv:
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
            if value.endswith(".json"):
                try:
                    file_overrides = json.loads(Path(value).read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ConfigError(f"--config={value} is not valid JSON: {e}") from None
                if not isinstance(file_overrides, dict):
                    raise ConfigError(f"{value} must hold a JSON object of overrides")
                if "preset" in file_overrides:
                    preset = file_overrides.pop("preset")
                    if not isinstance(preset, str):
                        raise ConfigError(f"{value}: \"preset\" must be a preset name; got {preset!r}")
            elif value.endswith(".py"):
                raise ConfigError(f"--config={value}: {NANOGPT_CONFIG_FILES}")
            else:
                preset = value
        else:
            rest.append(arg)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    nanogpt_only([a[2:].partition("=")[0] for a in rest if a.startswith("--")], "--")
    nanogpt_only(file_overrides, "config file key ")
    (train_flags, model_flags), positional = parse_overrides(rest, TrainConfig, ModelConfig)
    python_files = [p for p in positional if p.endswith(".py")]
    if python_files:
        raise ConfigError(f"{python_files[0]}: {NANOGPT_CONFIG_FILES}")
    if positional:
        raise ConfigError(f"unexpected argument(s) {positional}; flags are written --key=value")
    model_keys = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(k for k in file_overrides if k not in model_keys and k not in TrainConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"config file keys {unknown} are neither TrainConfig nor ModelConfig fields")
    model = {k: v for k, v in file_overrides.items() if k in model_keys} | model_flags
    train = {k: v for k, v in file_overrides.items() if k not in model_keys} | train_flags
    return preset, model, train


def nanogpt_only(keys, prefix: str) -> None:
    """A ConfigError for the first of keys that is one of nanoGPT's flags without a counterpart here."""
    for key in keys:
        if key in NANOGPT_FLAGS:
            raise ConfigError(f"{prefix}{key} is nanoGPT's, with no counterpart here: {NANOGPT_FLAGS[key]}")


def resolve(argv: list[str]):
    """The run's (ModelConfig, TrainConfig, initial params or None) after checking every input up front."""
    preset, model_over, train_over = read_flags(argv)
    train_cfg = TrainConfig(**train_over)
    init = train_cfg.init_from
    if Path(train_cfg.out_dir).exists() and not Path(train_cfg.out_dir).is_dir():
        raise ConfigError(f"out_dir {train_cfg.out_dir} is a file; pick a directory")
    if init == "resume":
        meta = checkpoint.read_meta(train_cfg.out_dir)
        where = f"{train_cfg.out_dir}/{meta['step']}"
        base = checkpoint.saved_config(meta, "model_config", ModelConfig, where)  # activation, dropout, dtype, ...
        check_preset(preset, base, train_cfg.out_dir)
        saved = checkpoint.saved_config(meta, "train_config", TrainConfig, where)
        train_cfg = replace(saved, **train_over)
        if train_cfg.max_iters < meta["step"]:
            raise ConfigError(f"{train_cfg.out_dir} is at step {meta['step']}, past max_iters={train_cfg.max_iters}; "
                              f"pass --max_iters={meta['step']} or more")
        saved_train = meta.get("train_config", {})  # none in a save_weights directory: --eval_only reads one
        saved_clip = saved_train.get("grad_clip", TrainConfig().grad_clip)
        if (saved_clip > 0) != (train_cfg.grad_clip > 0):  # clipping adds a stage to the optimizer state
            raise ConfigError(f"{train_cfg.out_dir} was saved with grad_clip={saved_clip}; a resumed run keeps "
                              f"clipping {'on (grad_clip > 0)' if saved_clip > 0 else 'off (grad_clip=0)'}")
        if "batch_size" not in train_over:
            saved_processes = meta.get("data", {}).get("process_count", 1)
            train_cfg = keep_global_batch(train_cfg, saved_processes, jax.process_count())
        model_cfg = checked(replace(base, **model_over), train_cfg)
        checkpoint.check_model_config(meta["model_config"], model_cfg, where)  # before "resuming with" is said
        changes = resume_changes([(saved_train, train_cfg, train_over),
                                  (meta["model_config"], model_cfg, model_over)])
        if changes and not train_cfg.eval_only:
            say(changes)
        return model_cfg, train_cfg, None
    if init != "scratch" and (not init or not layouts.weights_exist(init)):
        raise ConfigError(f"--init_from must be scratch, resume or an existing weights path; "
                          f"{why_no_weights(init)}")
    if checkpoint.is_checkpoint_dir(train_cfg.out_dir) and not train_cfg.eval_only:
        raise ConfigError(f"out_dir {train_cfg.out_dir} already holds checkpoints; continue them with "
                          f"--init_from=resume or pick another --out_dir")
    if init == "scratch":
        return checked(ModelConfig.from_preset(preset or DEFAULT_PRESET, **model_over), train_cfg), train_cfg, None
    loaded_cfg, params = convert.load(init)
    check_preset(preset, loaded_cfg, init)
    # Flags still override the weights' config: e.g. gelu_exact for nanoGPT and HF "gelu" weights.
    model_cfg = checked(replace(loaded_cfg, **model_over), train_cfg)
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


# Settings that choose the batches: changed on resume, the run no longer sees an uninterrupted run's batches.
BATCH_SETTINGS = ("data", "seed", "batch_size", "gradient_accumulation_steps")


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


def data_change(meta: dict, data_dir: Path, n_tokens: int) -> str | None:
    """The line that says a resumed run's train data is not its checkpoint's (prepared again, or replaced)."""
    saved = meta.get("data", {}).get("train_tokens")
    if saved in (None, n_tokens):
        return None
    return (f"the train data in {data_dir} holds {n_tokens:,} tokens, the checkpoint's held {saved:,}: the batches "
            "from here differ from an uninterrupted run's")


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


def checked(model_cfg: ModelConfig, train_cfg: TrainConfig) -> ModelConfig:
    """model_cfg, once its attention choice is known to run here in training, or without dropout for --eval_only
    (a ConfigError says why not)."""
    causal_attention_impl(model_cfg, training=not train_cfg.eval_only)
    return model_cfg


def open_data(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The train and val splits, checked against the model's vocabulary and context length."""
    data_dir = Path(train_cfg.data) if train_cfg.data else data.shakespeare()
    splits = data.open_split(data_dir, "train"), data.open_split(data_dir, "val")
    for split in splits:
        split.check(model_cfg.vocab_size, model_cfg.block_size)
    return data_dir, splits


def peak_flops(model_cfg: ModelConfig) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from): the table for known chips, else a measured matmul."""
    device = jax.local_devices()[0]
    kind = device.device_kind.lower()
    dtype = model_cfg.dtype
    for name, (half, fast32, full32) in PEAK_TFLOPS:
        if name in kind:
            peak = half if dtype != "float32" else full32 if model_cfg.matmul_precision == "highest" else fast32
            return peak * 1e12, f"{device.device_kind} datasheet"
    n = 1024
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best, f"measured {n}x{n} {dtype} matmul on {device.device_kind}"


def flops_per_token(model_cfg: ModelConfig, params) -> float:
    """Training FLOPs per token: 6 per matmul weight (forward + backward) plus attention (nanoGPT's estimate)."""
    n = count_params(params) - params["wpe"].size
    return 6 * n + 12 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size


class StepFailed(Exception):
    """XLA could not compile or run a step: out of device memory, or a collective with a lost process."""


def xla_failure(error: Exception, what: str) -> StepFailed:
    """A StepFailed naming what failed, XLA's first line, and what to try."""
    first, cause = sharding.runtime_error_cause(error)
    hint = {"memory": "; the step does not fit in device memory: lower batch_size (raise gradient_accumulation_steps "
                      "to keep the tokens a step), or set --remat=true, --dtype=bfloat16 or an fsdp mesh",
            "process": "; another process of this run may have stopped: see its log"}.get(cause, "")
    return StepFailed(f"{what} failed: {first}{hint}")


class StopRequest:
    """Ctrl-C (or SIGTERM) asks the loop to save and stop; a second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._previous[signum])

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class LogError(Exception):
    """metrics.jsonl or loss.png could not be written (disk full, read-only file system)."""


def log_error(path: Path, error: OSError) -> LogError:
    return LogError(f"cannot write {path} ({error.strerror or error})")


class Metrics:
    """metrics.jsonl (one object a line) and the loss-curve PNG in out_dir. A write that fails during the run is
    kept in `error` (the run saves a checkpoint and stops on it), and nothing more is written."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool = True):
        self.path, self.png = out_dir / "metrics.jsonl", out_dir / "loss.png"
        self.records, self.enabled = [], enabled  # disabled: the processes that are not the main one
        self.error: LogError | None = None
        if not enabled:
            return
        if self.path.exists():  # a resumed run drops what the interrupted run logged after its checkpoint
            self.records = [r for r in self.read() if r["step"] <= start_step]
        # Through a temporary file: a kill while it is written leaves the old log, not a cut one.
        temporary = self.path.with_suffix(".jsonl.tmp")
        try:
            temporary.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            os.replace(temporary, self.path)
        except OSError as e:
            raise log_error(self.path, e) from None
        if self.png.exists():  # the curve loses the dropped steps too, not only at the next eval
            self.plot()
        if self.error is not None:
            raise self.error

    def read(self) -> list[dict]:
        """The records of an existing metrics.jsonl; a line cut off by a kill (or otherwise unreadable) is skipped
        with a warning: the checkpoint, not this log, is what a resumed run needs."""
        records = []
        for number, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
            elif line.strip():
                say(f"warning: {self.path}:{number} is not a metrics record; dropped")
        return records

    def log(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled or self.error is not None:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            self.error = log_error(self.path, e)

    def plot(self) -> None:
        if not self.enabled or self.error is not None:
            return
        fig = Figure(figsize=(7, 4))
        ax = fig.subplots()
        train = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        for points, label in ((train, "train"), (val, "val")):
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
        ax.set(xlabel="step", ylabel="loss", title="cross-entropy loss")
        ax.grid(alpha=0.3)
        if train or val:
            ax.legend()
        fig.tight_layout()
        temporary = self.png.with_suffix(".png.tmp")  # a kill while it is drawn leaves the previous curve
        try:
            fig.savefig(temporary, dpi=100, format="png")
            os.replace(temporary, self.png)
        except OSError as e:
            self.error = log_error(self.png, e)


def mean_loss(eval_fn, params, batches: Batches, split: str, n: int) -> float:
    """The mean of eval_fn over the first n eval batches of a split (the same ones every time, so evals compare)."""
    losses = [eval_fn(params, *batches.eval_batch(split, i)) for i in range(n)]
    return float(np.mean(jax.device_get(losses)))


def evaluate_only(model_cfg: ModelConfig, train_cfg: TrainConfig, params) -> int:
    """--eval_only: the train and val loss of the starting weights over eval_iters batches each; writes nothing."""
    mesh = make_run_mesh(train_cfg)
    batches = Batches(model_cfg, train_cfg, mesh)
    if train_cfg.init_from == "resume":  # only the params of its latest step: no optimizer state is needed
        step = checkpoint.complete_steps(train_cfg.out_dir)[-1]
        params = checkpoint.load_weights(train_cfg.out_dir, step, dtype=jnp.dtype(model_cfg.param_dtype))[1]
        where = f"step {step} of {train_cfg.out_dir}"
    elif train_cfg.init_from == "scratch":
        where = f"the initial weights of seed {train_cfg.seed}"
    else:
        where = f"the weights in {train_cfg.init_from}"
    try:
        if params is None:  # the weights a training run with this seed starts from
            params = sharding.create_sharded_state(model_cfg, train_cfg, mesh,
                                                   jax.random.PRNGKey(train_cfg.seed)).params
        else:
            params = sharding.shard_params(model_cfg, params, mesh)
        eval_fn = sharding.make_sharded_eval_step(model_cfg, train_cfg, mesh)
        losses = {split: mean_loss(eval_fn, params, batches, split, train_cfg.eval_iters) for split in ("train", "val")}
    except jax.errors.JaxRuntimeError as e:
        print(f"error: {xla_failure(e, 'the evaluation')}", file=sys.stderr)
        return 1
    say(f"{where}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (the first {train_cfg.eval_iters} "
        f"batches of {batches.global_batch} x {model_cfg.block_size} tokens of each split of {batches.data_dir})")
    return 0


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(params)]))


class Batches:
    """A run's train and val batches, placed on its mesh: each process reads and feeds only its own rows."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, mesh):
        self.cfg, self.block_size, self.mesh = train_cfg, model_cfg.block_size, mesh
        self.data_dir, (self.train_data, self.val_data) = open_data(model_cfg, train_cfg)
        # batch_size rows per process: the global batch, which the data and fsdp axes split.
        self.global_batch = train_cfg.batch_size * jax.process_count()
        self.rows = sharding.process_batch_rows(mesh, self.global_batch)

    def train_batch(self, step: int):
        """The global x, y [A, B, T] of a step (A: gradient_accumulation_steps)."""
        x, y = self.train_data.batch(self.cfg.seed, step, self.global_batch, self.block_size,
                                     self.cfg.gradient_accumulation_steps, rows=self.rows)
        return self._placed(x), self._placed(y)

    def eval_batch(self, split: str, index: int):
        """The global x, y [B, T] of batch `index` of the "train" or "val" split, for an evaluation."""
        tokens = self.train_data if split == "train" else self.val_data
        x, y = tokens.batch(self.cfg.seed, index, self.global_batch, self.block_size, rows=self.rows)
        return self._placed(x[0]), self._placed(y[0])

    def _placed(self, local):
        return sharding.host_local_to_global(local, self.mesh, self.global_batch)


class Run:
    """One training run: the compiled steps, data, checkpoints and logs around a TrainState."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, params):
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.out_dir = Path(train_cfg.out_dir)
        self.mesh = make_run_mesh(train_cfg)
        self.batches = Batches(model_cfg, train_cfg, self.mesh)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = on_main_process(lambda: lock_out_dir(self.out_dir))
        rng = jax.random.PRNGKey(train_cfg.seed)
        if train_cfg.init_from == "resume":
            self.state, meta = checkpoint.restore_train_state(
                self.out_dir, model_cfg, train_cfg, sharding=sharding.state_shardings(model_cfg, train_cfg, self.mesh))
            rng = np.asarray(meta["rng"], np.uint32)
            val = meta.get("val_loss")
            say(f"resumed {self.out_dir} at step {meta['step']} "
                + (f"(val loss {val:.4f})" if val is not None else "(saved between evals: no val loss)"))
            changed = data_change(meta, self.batches.data_dir, self.batches.train_data.n_tokens)
            if changed:
                say(changed)
        else:
            self.state = sharding.create_sharded_state(model_cfg, train_cfg, self.mesh, rng, params)
        self.rng = jax.device_put(rng, sharding.replicated(self.mesh))
        checkpoint.check_free_space(self.out_dir, self.state)
        say(f"mesh {mesh_text(self.mesh)} over {jax.device_count()} device(s) in {jax.process_count()} "
            f"process(es); {sharding.memory_summary(self.state)}")
        for line in sharding.sharding_fallbacks(model_cfg, self.mesh):
            say(f"sharding fallback: {line}")
        self.last_saved = int(self.state.step) if train_cfg.init_from == "resume" else None
        self.manager = checkpoint.open_manager(self.out_dir, keep=train_cfg.keep_checkpoints)
        step = int(self.state.step)  # the main process writes the logs; the others keep the records only
        self.metrics = on_main_process(lambda: Metrics(self.out_dir, step)) or Metrics(self.out_dir, step, False)
        self.git_commit = checkpoint.git_commit()
        self.interrupted = False  # set by train(): stopped by Ctrl-C or SIGTERM (after saving)

    def compile(self):
        """The jitted, state-donating train step and the eval step, compiled before the clock starts."""
        start = time.perf_counter()
        x, y = self.batches.train_batch(int(self.state.step))
        step_fn = sharding.make_sharded_train_step(self.model_cfg, self.cfg, self.mesh)
        step_fn = step_fn.lower(self.state, x, y, self.rng).compile()
        eval_fn = sharding.make_sharded_eval_step(self.model_cfg, self.cfg, self.mesh)
        eval_fn = eval_fn.lower(self.state.params, *self.batches.eval_batch("val", 0)).compile()
        say(f"compiled the train and eval steps in {time.perf_counter() - start:.1f} s")
        return step_fn, eval_fn

    def evaluate(self, eval_fn) -> float:
        """Mean val loss over eval_iters batches (the same batches at every eval, so evals compare)."""
        return mean_loss(eval_fn, self.state.params, self.batches, "val", self.cfg.eval_iters)

    def params_finite(self) -> bool:
        """True if no parameter is NaN or infinite (checked before a save, so that no diverged state is kept)."""
        return bool(_all_finite(self.state.params))

    def save(self, val_loss: float | None = None) -> None:
        step = int(self.state.step)
        meta = {"model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
                "rng": np.asarray(jax.random.key_data(self.rng)).tolist(), "git_commit": self.git_commit,
                # Batches are a pure function of (seed, step, process), so the step is the data position.
                "data": {"dir": str(self.batches.data_dir), "seed": self.cfg.seed, "next_batch": step,
                         "train_tokens": self.batches.train_data.n_tokens, "process_count": jax.process_count()}}
        self.confirm_saved()
        try:
            checkpoint.check_free_space(self.out_dir, self.state)  # before orbax starts writing, not halfway
        except checkpoint.CheckpointError as e:
            raise checkpoint.CheckpointError(f"cannot save step {step}: {e}; {self.last_complete()}") from None
        checkpoint.save_train_state(self.manager, self.state, meta, val_loss)
        self.last_saved = step

    def confirm_saved(self) -> None:
        """Wait for the save in flight; if it failed, a CheckpointError names it and the last complete step."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # orbax and tensorstore raise many types; each means this save did not complete
            raise checkpoint.CheckpointError(f"saving step {self.last_saved} in {self.out_dir} failed "
                                             f"({checkpoint.io_error_reason(e)}); {self.last_complete()}") from e

    def last_complete(self) -> str:
        steps = checkpoint.complete_steps(self.out_dir)
        if not steps:
            return "no checkpoint of this run is complete"
        return f"the last complete checkpoint is step {steps[-1]}"

    def close(self) -> None:
        try:
            self.confirm_saved()
        finally:
            self.manager.close()
            if self.lock is not None:
                os.close(self.lock)
                self.lock = None

    def close_after_failure(self) -> None:
        """close() for a run that is stopping on a failure: the save in flight completes (its work is not lost); a
        save that fails too is printed, not raised, so that the failure the run stops on is still reported."""
        try:
            self.close()
        except checkpoint.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)


def lock_out_dir(out_dir: Path) -> int | None:
    """data.lock_directory on out_dir, so that two runs never save into one directory; a ConfigError if another
    process holds it; None where locks do not work (the run goes on unguarded)."""
    try:
        return data.lock_directory(out_dir)
    except BlockingIOError:
        raise ConfigError(f"another train.py is writing to out_dir {out_dir}; wait for it to end or pick another "
                          f"--out_dir") from None


class MainProcessFailed(Exception):
    """What the other processes raise when a part of setting up the run that only the main process does failed."""


def on_main_process(make):
    """make() on the main process, None on the others. If it fails there, it raises there and a MainProcessFailed
    on every other process, so that none goes on alone to wait in a collective that the main process never joins
    (and the main process at jax.distributed's shutdown for one that then left with os._exit)."""
    result, error = None, None
    if sharding.is_main_process():
        try:
            result = make()
        except (ConfigError, LogError, OSError) as e:
            error = e
    if sharding.any_process(error is not None):
        raise error or MainProcessFailed("the main process could not set up the run (see its log); training did "
                                         "not start")
    return result


def make_run_mesh(train_cfg: TrainConfig):
    """The run's device mesh from --mesh, checked against the device count and the global batch."""
    where = f"--mesh={train_cfg.mesh}" if train_cfg.mesh else "the default mesh (every device on data)"
    try:
        mesh = sharding.make_mesh(train_cfg.mesh or None)
        sharding.check_batch_size(mesh, train_cfg.batch_size * jax.process_count())
    except ValueError as e:
        resumed = train_cfg.init_from == "resume"
        hint = "; a resumed run keeps the mesh it saved unless --mesh names another" if resumed else ""
        raise ConfigError(f"{where}: {e}{hint}") from None
    return mesh


def mesh_text(mesh) -> str:
    return ",".join(f"{name}:{size}" for name, size in mesh.shape.items())


def progress(step: int, loss: float, lr: float, seconds_per_step: float, tokens_per_step: int,
             flops_per_step: float, peak: float) -> dict:
    return {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_step / seconds_per_step,
            "ms_per_step": 1e3 * seconds_per_step, "mfu": flops_per_step / seconds_per_step / peak}


def train(run: Run) -> int:
    """The loop: step, log, evaluate and save every eval_interval, stop on Ctrl-C or a non-finite loss."""
    cfg, model_cfg = run.cfg, run.model_cfg
    stop = StopRequest()
    try:
        step_fn, eval_fn = run.compile()
    except jax.errors.JaxRuntimeError as e:
        raise xla_failure(e, "compiling the train and eval steps") from None
    device_peak, peak_source = peak_flops(model_cfg)
    peak = device_peak * jax.device_count()
    tokens_per_step = cfg.gradient_accumulation_steps * run.batches.global_batch * model_cfg.block_size
    flops_per_step = flops_per_token(model_cfg, run.state.params) * tokens_per_step
    say(f"{count_params(run.state.params) / 1e6:.2f}M parameters, {tokens_per_step:,} tokens a step; MFU against "
        f"{jax.device_count()} x {device_peak / 1e9:,.0f} GFLOP/s ({peak_source})")
    step = int(run.state.step)
    doing = f"step {step + 1}"  # for an XLA error: what was running
    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True,
               disable=not sharding.is_main_process())
    try:
        x, y = run.batches.train_batch(step)
        window_start, losses, stopping = time.perf_counter(), [], False
        while step < cfg.max_iters and not stopping:
            doing = f"step {step + 1}"
            run.state, out = step_fn(run.state, x, y, run.rng)
            step += 1
            if step < cfg.max_iters:
                x, y = run.batches.train_batch(step)  # drawn on the host while the device runs the step
            loss, lr = float(out["loss"]), float(out["lr"])  # waits for the step: its errors surface here
            if not math.isfinite(loss):
                return diverged(run, bar, f"the loss is {loss} at step {step}")
            losses.append(loss)
            p = progress(step, loss, lr, (time.perf_counter() - window_start) / len(losses), tokens_per_step,
                         flops_per_step, peak)
            bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {p['tokens_per_s']:,.0f} tok/s "
                                f"{p['ms_per_step']:.0f} ms/step MFU {100 * p['mfu']:.1f}%", refresh=False)
            bar.update(1)
            logged = step % cfg.log_interval == 0
            evaluating = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if logged or evaluating:  # one line a step: an eval step's line has val_loss besides the rest
                record = dict(p, loss=float(np.mean(losses)))
                if evaluating:
                    doing = f"the evaluation after step {step}"
                    # The loss above was computed before this step's update; the update itself may have diverged.
                    record["val_loss"] = run.evaluate(eval_fn)
                    if not (math.isfinite(record["val_loss"]) and run.params_finite()):
                        return diverged(run, bar, f"the val loss is {record['val_loss']} after step {step}")
                run.metrics.log(record)
                if evaluating:
                    run.metrics.plot()
                    run.save(record["val_loss"])
                    say(f"step {step}: train loss {record['loss']:.4f}, val loss {record['val_loss']:.4f}; "
                        "saving a checkpoint")
                window_start, losses = time.perf_counter(), []
            # Every process stops after the same step: on Ctrl-C, or when the main one cannot write its logs.
            stopping = sharding.any_process(stop.requested or run.metrics.error is not None)
    except jax.errors.JaxRuntimeError as e:
        raise xla_failure(e, doing) from None
    finally:  # a CheckpointError's message goes below the bar, not onto it
        bar.close()
    run.interrupted = stopping
    if stopping and run.last_saved != step:
        if not run.params_finite():
            return diverged(run, bar, f"the parameters are not finite after step {step}")
        if losses:  # the steps since the last logged one: a resumed run's next line starts after them
            run.metrics.log(dict(p, loss=float(np.mean(losses))))
        run.save()
    run.close()  # the last save completes (or its failure is raised) before anything says it was saved
    stop.restore()
    if run.metrics.error is not None:
        print(f"error: {run.metrics.error}; stopped after saving a checkpoint of step {step} in {run.out_dir}: make "
              "room (or fix the permissions) and continue with --init_from=resume", file=sys.stderr)
        return 1
    if stopping:
        say(f"interrupted: saved a checkpoint of step {step} in {run.out_dir}; continue with --init_from=resume")
    return 0


def diverged(run: Run, bar, what: str) -> int:
    """Stop a run whose loss or parameters are no longer finite, leaving the checkpoints as they are."""
    bar.close()
    run.close_after_failure()  # a save in flight completes (one that failed is printed first), the last stays whole
    if sharding.is_main_process():
        print(f"error: {what}; stopping without saving; {run.last_complete()} in {run.out_dir}", file=sys.stderr)
    return 1


def interrupted_again(run: Run) -> int:
    """Stop a run that a second Ctrl-C interrupted: the save in flight (of a step already done) completes, as its
    work would otherwise be lost; the steps since it are not saved. One line names the last complete checkpoint."""
    try:
        run.close_after_failure()
    except KeyboardInterrupt:  # a third Ctrl-C: leave the save in flight to orbax's temporary directory
        pass
    print(f"interrupted again: stopped without saving the steps since the last save; {run.last_complete()}",
          file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        # The other processes may wait in a collective that this one left (a Ctrl-C that reached it alone), and
        # this one at jax.distributed's shutdown for them: both until its timeout, then a C++ stack trace. Leave
        # now, so that their collective fails and they stop like after a lost process.
        sys.stdout.flush()
        os._exit(130)
    return 130


def print_samples(run: Run) -> None:
    """A few samples from the trained model, each starting from a newline."""
    cfg = run.cfg
    if cfg.num_samples == 0:
        return
    tokenizer = get_tokenizer()
    prompt = tokenizer.encode(SAMPLE_PROMPT)
    model_cfg = restrict_vocab(run.model_cfg, tokenizer.n_vocab)  # e.g. nanoGPT's 50304 ids: only decodable ones
    fits = context_length(prompt, cfg.sample_tokens) <= model_cfg.block_size
    outs = generate(model_cfg, run.state.params, [prompt] * cfg.num_samples, max_new_tokens=cfg.sample_tokens,
                    temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, seed=cfg.seed, sliding_window=not fits)
    for tokens in outs if sharding.is_main_process() else ():
        print(tokenizer.decode(prompt + tokens))
        print("-" * 60)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    checkpoint.quiet_failed_io()  # a failed save or restore is one error line, not orbax's tracebacks
    sharding.order_host_collectives()
    try:
        argv = join_cluster(argv)  # before anything touches a device
        model_cfg, train_cfg, params = resolve(argv)
        if train_cfg.eval_only:
            return evaluate_only(model_cfg, train_cfg, params)
        check_samples(model_cfg, train_cfg)
        run = Run(model_cfg, train_cfg, params)
    except (ConfigError, data.DataError, checkpoint.CheckpointError, convert.WeightsError, OSError, LogError,
            MainProcessFailed, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:  # placing the state on the mesh: out of memory, or a stopped process
        # No save is in flight: a plain return lets jax.distributed's shutdown meet a process that stopped with
        # an error of its own at its shutdown barrier (os._exit here would abort that one with a C++ stack trace).
        print(f"error: {xla_failure(e, 'setting up the run')}; training did not start", file=sys.stderr)
        return 1
    try:
        code = train(run)
    except KeyboardInterrupt:  # a second Ctrl-C (the first asked for a save): stop now, without a traceback
        return interrupted_again(run)
    except checkpoint.CheckpointError as e:  # a save that failed (disk full, permissions): say which
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StepFailed as e:
        alone = jax.process_count() == 1
        if alone:
            run.close_after_failure()
        print(f"error: {e}; {run.last_complete()}", file=sys.stderr, flush=True)
        if not alone:
            # A save in flight cannot finish without the lost process, and jax.distributed's shutdown would wait
            # for it (100 s of heartbeats), then abort with a C++ stack trace: leave now.
            sys.stdout.flush()
            os._exit(1)
        return 1
    if code == 0 and not run.interrupted:  # Ctrl-C means stop: no samples after the save
        try:
            print_samples(run)
        except KeyboardInterrupt:
            print(f"interrupted while sampling; the checkpoints in {run.out_dir} are complete", file=sys.stderr)
            return 130
    return code


if __name__ == "__main__":
    plain_warnings()
    sys.exit(main())
