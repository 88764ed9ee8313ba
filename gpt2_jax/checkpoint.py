"""Checkpoints as orbax CheckpointManager directories.

A directory holds one subdirectory per saved step, each with up to three items:
  params     the model parameters (a pytree in model.py's layout)
  opt_state  the optimizer state (train.py checkpoints only; save_weights leaves it out)
  meta       JSON: model and train config, step, rng, data position, git commit, val loss
and, for a step saved with a val loss, orbax's `metrics` item, from which a reopened manager knows the best step.
orbax writes a step into a temporary directory and renames it when complete, so a run killed during a save
leaves the previous steps intact and the unfinished one is ignored.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN

from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig, replace
from gpt2_jax.model import abstract_params
from gpt2_jax.sharding import flat_shapes, state_shapes
from gpt2_jax.training import TrainState

FORMAT = "gpt2_jax"
UNFINISHED_SAVE = ".orbax-checkpoint-tmp"  # in the name of a step directory that orbax has not finished writing
# ModelConfig fields that change the shape or storage dtype of a parameter; the others (dropout, compute dtype,
# remat, scan_unroll, attention, activation, layer_norm_eps) may differ between a checkpoint and the run that loads it.
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "qkv_bias", "lm_head_bias",
                "tie_embeddings", "bias", "pad_vocab_to", "param_dtype")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete, or does not fit the model asked for."""


def quiet_failed_io() -> None:
    """For scripts: once a save or restore has failed (reported once, as a CheckpointError), orbax's threads log a
    traceback per array (absl), asyncio one per abandoned write, and its abandoned coroutines and tensorstore
    callbacks (after orbax closed its event loop) raise unraisable exceptions at exit. Silence those; every
    other unraisable exception still reaches the previous hook."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    previous = sys.unraisablehook

    def from_orbax(unraisable) -> bool:
        error, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        tb, files = unraisable.exc_traceback, [code.co_filename] if code else []
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        return closed_loop or any(f"{os.sep}orbax{os.sep}" in f for f in files)

    sys.unraisablehook = lambda unraisable: None if from_orbax(unraisable) else previous(unraisable)


def is_checkpoint_dir(path) -> bool:
    """True if path is a directory with at least one complete step saved by this module (or orbax)."""
    return bool(_steps(Path(path)))


def complete_steps(path) -> list[int]:
    """The steps of a checkpoint directory that have their params item, in order ([] for anything else)."""
    return _steps(Path(path))


def check_free_space(directory, state) -> None:
    """Raise a CheckpointError if directory's file system cannot hold one more checkpoint of state, counting the
    space of unfinished saves as free (orbax removes them before it writes the next step)."""
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    free = shutil.disk_usage(directory).free + _unfinished_bytes(Path(directory))
    if free < needed:
        raise CheckpointError(f"{directory} has {free / 1e6:,.1f} MB free; a checkpoint of this run needs "
                              f"{needed / 1e6:,.1f} MB")


def _unfinished_bytes(directory: Path) -> int:
    """The disk space held by the unfinished saves in directory (orbax's temporary step directories)."""
    return sum(f.lstat().st_blocks * 512 for tmp in directory.glob(f"*{UNFINISHED_SAVE}*") if tmp.is_dir()
               for f in tmp.rglob("*"))


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "params").is_dir())


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler()}


def _reader() -> ocp.Checkpointer:
    """A plain Checkpointer for one step directory (reading needs no manager), knowing the manager's metrics item."""
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers(), metrics=ocp.JsonCheckpointHandler()))


def _restore(directory: Path, step: int, **items):
    """Restore the named items of one step directory."""
    try:
        return _reader().restore((directory / str(step)).absolute(), args=ocp.args.Composite(**items))
    except Exception as e:  # orbax wraps tensorstore's errors on damaged files in a bare Exception
        raise _unreadable(directory, step, e) from e


def _item_metadata(directory: Path, step: int, item: str):
    try:
        metadata = _reader().metadata((directory / str(step)).absolute()).item_metadata[item]
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise _unreadable(directory, step, e) from e
    if metadata is None:  # orbax reads an item whose _METADATA file is gone as None, not as an error
        raise _unreadable(directory, step, FileNotFoundError(f"{item}/_METADATA is missing"))
    return metadata


def io_error_reason(error: Exception) -> str:
    """One line on why orbax failed to read or write: the innermost error of the chain (orbax wraps tensorstore's),
    its type and first line; past 200 characters, only what follows its last ': ' (tensorstore names every
    layer of its storage and every file on the way before the actual problem)."""
    while error.__cause__ is not None:
        error = error.__cause__
    reason = (str(error).strip().splitlines() or [""])[0]
    # tensorstore appends the JSON spec of the store it opened (about 800 characters that name no problem)
    reason = re.sub(r"\s*\[(?:tensorstore_spec|source locations)=.*$", "", reason)
    if len(reason) > 200:
        reason = "... " + reason.rsplit(": ", 1)[-1]
    return f"{type(error).__name__}: {reason}" if reason else type(error).__name__


def _unreadable(directory: Path, step: int, error: Exception | str) -> CheckpointError:
    """A CheckpointError for a step that cannot be read, naming the older steps to fall back on."""
    older = [s for s in _steps(directory) if s < step]
    hint = (f"; the older complete steps are {older}: move {directory}/{step} aside to use step {older[-1]}"
            if older else "")
    reason = error if isinstance(error, str) else io_error_reason(error)
    return CheckpointError(f"checkpoint {directory}/{step} is damaged or incomplete ({reason}){hint}")


def _pick_step(directory: Path, step: int | None) -> int:
    steps = _steps(directory)
    if not steps:
        if not directory.exists():
            raise CheckpointError(f"{directory} does not exist")
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is a file, not a checkpoint directory")
        raise CheckpointError(f"{directory} holds no complete checkpoint (no step directory with a 'params' item)")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise CheckpointError(f"{directory} has no checkpoint of step {step}; it has steps {steps}")
    return step


def open_manager(directory, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A manager for train.py that keeps the last `keep` steps plus the one with the lowest val_loss."""
    policy = AnyPreservationPolicy([
        LatestN(n=keep),
        BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn only makes orbax write each step's metrics to disk (BestN decides what is kept): without it a
    # resumed run's manager knows no val loss of the steps before it, and LatestN deletes the best one.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda m: m["val_loss"],
                                           best_mode="min", enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(Path(directory).absolute(), item_handlers=_handlers(), options=options)


def git_commit() -> str | None:
    """The commit of the repository this package lives in, with '-dirty' for local changes; None outside git,
    and None for a copy inside another repository (installed in a project's venv, unpacked into a checkout)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--show-toplevel", "HEAD")
        if head.returncode or Path(head.stdout.splitlines()[0]).resolve() != repo:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.splitlines()[1] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save_train_state(manager: ocp.CheckpointManager, state: TrainState, meta: dict,
                     val_loss: float | None = None) -> None:
    """Start an asynchronous save of the full state at state.step (manager.wait_until_finished() completes it)."""
    step = int(state.step)
    meta = {"format": FORMAT, "step": step, "val_loss": val_loss, **meta}
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                              opt_state=ocp.args.StandardSave(state.opt_state), meta=ocp.args.JsonSave(meta))
    metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
    manager.save(step, args=args, metrics=metrics, force=True)


def save_weights(directory, model_config: ModelConfig, params) -> None:
    """Write params alone (no optimizer state) as a one-step checkpoint directory that load_weights reads."""
    directory = Path(directory)
    if _steps(directory):
        raise CheckpointError(f"{directory} already holds a checkpoint; save weights into a new directory")
    if directory.name.isdigit() and int(directory.name) in _steps(directory.parent):
        # orbax would nest a checkpoint inside that step, which every later load of it then warns about
        raise CheckpointError(f"{directory} is step {directory.name} of the checkpoint in {directory.parent}; "
                              "save weights into a new directory")
    meta = {"format": FORMAT, "step": 0, "model_config": model_config.to_dict()}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory.absolute(), item_handlers=_handlers(), options=options) as manager:
        manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))


def read_meta(directory, step: int | None = None) -> dict:
    """The meta item of a step (the latest by default)."""
    directory = Path(directory)
    step = _pick_step(directory, step)
    meta = _restore(directory, step, meta=ocp.args.JsonRestore())["meta"]
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"{directory}/{step} has no gpt2_jax meta item with a model_config")
    saved_config(meta, "model_config", ModelConfig, f"{directory}/{step}")
    return meta


def saved_config(meta: dict, key: str, cls, where: str):
    """meta[key] as a cls (ModelConfig or TrainConfig): a CheckpointError naming `where` if this version cannot
    use it (another version's fields, a hand-edited file), not an error that reads like a mistyped --flag."""
    saved = meta.get(key, {})
    try:
        if not isinstance(saved, dict):
            raise ConfigError(f"{saved!r:.60} is not a JSON object")
        return replace(cls(), **saved)
    except ConfigError as e:
        raise CheckpointError(f"{where}: its saved {key} does not fit this version of gpt2_jax ({e})") from None


def load_weights(directory, step: int | None = None, dtype=jnp.float32) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a train.py out_dir (latest step unless given) or a save_weights directory."""
    directory = Path(directory)
    step = _pick_step(directory, step)
    meta = read_meta(directory, step)
    model_config = saved_config(meta, "model_config", ModelConfig, f"{directory}/{step}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # this process's own device
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype), sharding=sharding),
                          abstract_params(model_config))
    _check_against_metadata(directory, step, "params", target)
    params = _restore(directory, step, params=ocp.args.StandardRestore(target))["params"]
    return model_config, params


def abstract_train_state(model_config: ModelConfig, train_config: TrainConfig, sharding=None) -> TrainState:
    """The shapes, dtypes and shardings of a TrainState, without allocating it.

    sharding: one Sharding for every leaf, or a TrainState of them (sharding.state_shardings: restore onto a
    mesh); default this process's first device.
    """
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shapes = state_shapes(model_config, train_config)
    if isinstance(sharding, TrainState):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sharding)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), shapes)


def check_model_config(saved: dict, model_config: ModelConfig, where: str) -> None:
    """Raise a ConfigError naming every shape field in which the run's model differs from the checkpoint's."""
    ours = model_config.to_dict()
    diffs = [f"{k}={saved.get(k)!r} (this run: {ours[k]!r})" for k in SHAPE_FIELDS if saved.get(k) != ours[k]]
    if diffs:
        raise ConfigError(f"checkpoint {where} was saved for another model: {', '.join(diffs)}")


def restore_train_state(directory, model_config: ModelConfig, train_config: TrainConfig,
                        step: int | None = None, sharding=None) -> tuple[TrainState, dict]:
    """(TrainState, meta) of a train.py checkpoint (latest step unless given), checked against the configs."""
    directory = Path(directory)
    step = _pick_step(directory, step)
    where = f"{directory}/{step}"
    meta = read_meta(directory, step)
    check_model_config(meta["model_config"], model_config, where)
    if not (directory / str(step) / "opt_state").is_dir():
        if "val_loss" in meta:  # save_train_state's meta (save_weights has none): its opt_state item is lost
            raise _unreadable(directory, step, "its opt_state item is missing")
        raise CheckpointError(f"{where} holds weights only (no optimizer state); it cannot be resumed, "
                              f"but --init_from={directory} fine-tunes from it")
    target = abstract_train_state(model_config, train_config, sharding)
    _check_against_metadata(directory, step, "params", target.params)
    _check_against_metadata(directory, step, "opt_state", target.opt_state)
    restored = _restore(directory, step, params=ocp.args.StandardRestore(target.params),
                        opt_state=ocp.args.StandardRestore(target.opt_state))
    # device_put from a host value: on a multi-process mesh each process places its own copy of the scalar.
    step_array = jax.device_put(np.asarray(meta["step"], np.int32), target.step.sharding)
    state = TrainState(step=step_array, params=restored["params"], opt_state=restored["opt_state"])
    return state, meta


def _check_against_metadata(directory: Path, step: int, item: str, target) -> None:
    """Compare the saved tree's keys and shapes with the target's before orbax meets a mismatch mid-restore."""
    where = f"{directory}/{step}"
    saved = flat_shapes(_item_metadata(directory, step, item))
    wanted = flat_shapes(target)
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    hint = " (was the optimizer configured differently, e.g. grad_clip 0 vs > 0?)" if item == "opt_state" else ""
    if missing or extra:
        raise CheckpointError(f"{where}: {item} does not match this run{hint}: missing keys {missing[:5]}, "
                              f"unexpected keys {extra[:5]}")
    for key, shape in wanted.items():
        if saved[key] != shape:
            raise CheckpointError(f"{where}: {item} key '{key}' has shape {saved[key]}; expected {shape}")
