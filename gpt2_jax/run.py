"""A training run's lifecycle around its TrainState: the mesh, batches, out_dir lock, Ctrl-C, checkpoints, logs."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax import checkpoint, data, evaluate, sharding
from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.dashboards import WandB, open_dashboards
from gpt2_jax.metrics import LogError, Metrics, say
from gpt2_jax.training import update_ratios


class StepFailed(Exception):
    """XLA could not compile or run a step: out of device memory, or a collective with a lost process."""


class MainProcessFailed(Exception):
    """What the other processes raise when a part of setting up the run that only the main process does failed."""


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


def lock_out_dir(out_dir: Path) -> int | None:
    """data.lock_directory on out_dir, so that two runs never save into one directory; a ConfigError if another
    process holds it; None where locks do not work (the run goes on unguarded)."""
    try:
        return data.lock_directory(out_dir)
    except BlockingIOError:
        raise ConfigError(f"another train.py is writing to out_dir {out_dir}; wait for it to end or pick another "
                          f"--out_dir") from None


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


def hellaswag_batch(train_cfg: TrainConfig, mesh) -> int:
    """Examples a --hellaswag batch: --hellaswag_batch_size (0: the global batch), split over data and fsdp."""
    size = train_cfg.hellaswag_batch_size or train_cfg.batch_size * jax.process_count()
    try:
        sharding.check_batch_size(mesh, size)
    except ValueError as e:
        raise ConfigError(f"--hellaswag_batch_size: {e}") from None
    return size


def hellaswag_metrics(model_cfg: ModelConfig, params, examples, batch_size: int, mesh) -> dict:
    """hellaswag_acc and hellaswag_acc_norm of params on examples, scored on every process's devices."""
    result = evaluate.hellaswag(model_cfg, params, examples, batch_size, mesh)
    return {"hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"]}


def mesh_text(mesh) -> str:
    return ",".join(f"{name}:{size}" for name, size in mesh.shape.items())


def open_data(model_cfg: ModelConfig, train_cfg: TrainConfig):
    """The train and val splits, checked against the model's vocabulary and context length."""
    data_dir = Path(train_cfg.data) if train_cfg.data else data.shakespeare()
    splits = data.open_split(data_dir, "train"), data.open_split(data_dir, "val")
    for split in splits:
        split.check(model_cfg.vocab_size, model_cfg.block_size)
    return data_dir, splits


def data_change(meta: dict, data_dir: Path, n_tokens: int) -> str | None:
    """The line that says a resumed run's train data is not its checkpoint's (prepared again, or replaced)."""
    saved = meta.get("data", {}).get("train_tokens")
    if saved in (None, n_tokens):
        return None
    return (f"the train data in {data_dir} holds {n_tokens:,} tokens, the checkpoint's held {saved:,}: the batches "
            "from here differ from an uninterrupted run's")


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


def mean_loss(eval_fn, params, batches: Batches, split: str, n: int) -> float:
    """The mean of eval_fn over the first n eval batches of a split (the same ones every time, so evals compare)."""
    losses = [eval_fn(params, *batches.eval_batch(split, i)) for i in range(n)]
    return float(np.mean(jax.device_get(losses)))


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(params)]))


def evaluate_only(model_cfg: ModelConfig, train_cfg: TrainConfig, params, hellaswag=()) -> str:
    """--eval_only: the line with the train and val loss of the starting weights over eval_iters batches each (and
    their HellaSwag scores on the examples of --hellaswag). Writes nothing; a StepFailed if XLA cannot run it."""
    mesh = make_run_mesh(train_cfg)
    hellaswag_size = hellaswag_batch(train_cfg, mesh) if hellaswag else 0
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
        scores = hellaswag_metrics(model_cfg, params, hellaswag, hellaswag_size, mesh) if hellaswag else {}
    except jax.errors.JaxRuntimeError as e:
        raise xla_failure(e, "the evaluation") from None
    scored = (f"; hellaswag acc {scores['hellaswag_acc']:.4f}, acc_norm {scores['hellaswag_acc_norm']:.4f} "
              f"({len(hellaswag)} examples of {train_cfg.hellaswag})") if scores else ""
    return (f"{where}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f} (the first "
            f"{train_cfg.eval_iters} batches of {batches.global_batch} x {model_cfg.block_size} tokens of each split "
            f"of {batches.data_dir}){scored}")


class Run:
    """One training run: the compiled steps, data, checkpoints and logs around a TrainState."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, params, hellaswag=()):
        self.model_cfg, self.cfg = model_cfg, train_cfg
        self.out_dir = Path(train_cfg.out_dir)
        self.mesh = make_run_mesh(train_cfg)
        self.hellaswag = list(hellaswag)  # run_config.read_hellaswag's examples, scored at every eval
        self.hellaswag_size = hellaswag_batch(train_cfg, self.mesh) if self.hellaswag else 0
        self.batches = Batches(model_cfg, train_cfg, self.mesh)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = on_main_process(lambda: lock_out_dir(self.out_dir))
        rng, self.wandb_id = jax.random.PRNGKey(train_cfg.seed), None
        if train_cfg.init_from == "resume":
            rng = self._restore()
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
        self.metrics = self._open_metrics(int(self.state.step))
        self.git_commit = checkpoint.git_commit()
        self.interrupted = False  # set by the loop: stopped by Ctrl-C or SIGTERM (after saving)

    def _restore(self):
        """Restore the state of the latest checkpoint onto the mesh; returns its saved rng."""
        self.state, meta = checkpoint.restore_train_state(
            self.out_dir, self.model_cfg, self.cfg,
            sharding=sharding.state_shardings(self.model_cfg, self.cfg, self.mesh))
        val = meta.get("val_loss")
        say(f"resumed {self.out_dir} at step {meta['step']} "
            + (f"(val loss {val:.4f})" if val is not None else "(saved between evals: no val loss)"))
        changed = data_change(meta, self.batches.data_dir, self.batches.train_data.n_tokens)
        if changed:
            say(changed)
        self.wandb_id = meta.get("wandb_run_id")
        return np.asarray(meta["rng"], np.uint32)

    def _open_metrics(self, step: int) -> Metrics:
        """The main process writes the logs and dashboards; the others keep the records only."""
        def make():
            configs = {"model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict()}
            dashboards = open_dashboards(self.cfg, self.out_dir, step, self.wandb_id, configs)
            self.wandb_id = next((d.id for d in dashboards if isinstance(d, WandB)), self.wandb_id)
            return Metrics(self.out_dir, step, dashboards=dashboards)

        return on_main_process(make) or Metrics(self.out_dir, step, False)

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

    def evaluate_hellaswag(self) -> dict:
        """hellaswag_acc and hellaswag_acc_norm of the current params ({} without --hellaswag)."""
        if not self.hellaswag:
            return {}
        return hellaswag_metrics(self.model_cfg, self.state.params, self.hellaswag, self.hellaswag_size, self.mesh)

    def params_before(self, step: int):
        """A copy of the params before `step` where --log_health logs that step's update ratios (an eval step), else
        None: the step donates the state, so the copy is made only where it is needed."""
        cfg = self.cfg
        if cfg.log_health and (step % cfg.eval_interval == 0 or step == cfg.max_iters):
            return jax.tree.map(jnp.copy, self.state.params)
        return None

    def update_ratios(self, before) -> dict:
        """--log_health's update:weight ratio of each parameter group over the step since `before` ({} if None)."""
        return {} if before is None else {k: float(v) for k, v in update_ratios(before, self.state.params).items()}

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
        if self.wandb_id is not None:  # a resume continues this wandb run
            meta["wandb_run_id"] = self.wandb_id
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
            self.metrics.close()
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
