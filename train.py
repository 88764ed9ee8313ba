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
--hellaswag=FILE.jsonl scores HellaSwag at every eval (--hellaswag_limit=N, --hellaswag_batch_size=B), and
--log_health=true logs each parameter group's update:weight ratio there (docs/training.md).
--tensorboard=true writes TensorBoard event files to out_dir/tensorboard; --wandb_log=true (with --wandb_project,
--wandb_run_name) logs to Weights & Biases, and a resumed run continues the same wandb run.

--mesh=data:D,fsdp:F,tensor:N lays the devices out (default: all on data); batch_size is per process.
Multi-host: run the same command on every host with --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or --coordinator_address=auto
on TPU pods and SLURM); --join_timeout=SECONDS (default 300) is how long to wait for all of them (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from gpt2_jax.huge_pages import reexec_with_huge_pages

if __name__ == "__main__":
    reexec_with_huge_pages()  # glibc reads its tunables when a process starts: before jax allocates anything

import jax
import numpy as np
from tqdm import tqdm

from gpt2_jax import checkpoint, convert, data, sharding
from gpt2_jax.config import ConfigError, plain_warnings
from gpt2_jax.flops import flops_per_token, peak_flops
from gpt2_jax.metrics import LogError, eval_line, progress, say
from gpt2_jax.model import count_params
from gpt2_jax.run import MainProcessFailed, Run, StepFailed, StopRequest, evaluate_only, xla_failure
from gpt2_jax.run_config import SAMPLE_PROMPT, check_samples, read_flags, read_hellaswag, resolve
from gpt2_jax.sampling import context_length, generate, restrict_vocab
from gpt2_jax.tokenizer import get_tokenizer

SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 200  # nanoGPT's sample.py defaults
SETUP_ERRORS = (ConfigError, data.DataError, checkpoint.CheckpointError, convert.WeightsError, OSError, LogError,
                MainProcessFailed, json.JSONDecodeError)


def speed_basis(run: Run) -> tuple[int, float, float]:
    """(tokens a step, FLOPs a step, peak FLOP/s of all devices) for the progress bar's throughput and MFU."""
    device_peak, peak_source = peak_flops(run.model_cfg)
    tokens = run.cfg.gradient_accumulation_steps * run.batches.global_batch * run.model_cfg.block_size
    flops = flops_per_token(run.model_cfg, run.state.params) * tokens
    say(f"{count_params(run.state.params) / 1e6:.2f}M parameters, {tokens:,} tokens a step; MFU against "
        f"{jax.device_count()} x {device_peak / 1e9:,.0f} GFLOP/s ({peak_source})")
    return tokens, flops, device_peak * jax.device_count()


def train(run: Run) -> int:
    """The loop: step, log, evaluate and save every eval_interval, stop on Ctrl-C or a non-finite loss."""
    cfg, stop = run.cfg, StopRequest()
    try:
        step_fn, eval_fn = run.compile()
    except jax.errors.JaxRuntimeError as e:
        raise xla_failure(e, "compiling the train and eval steps") from None
    tokens_per_step, flops_per_step, peak = speed_basis(run)
    step = int(run.state.step)
    doing = f"step {step + 1}"  # for an XLA error: what was running
    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", dynamic_ncols=True,
               disable=not sharding.is_main_process())
    try:
        x, y = run.batches.train_batch(step)
        window_start, losses, stopping = time.perf_counter(), [], False
        while step < cfg.max_iters and not stopping:
            doing = f"step {step + 1}"
            before = run.params_before(step + 1)  # for --log_health (the step donates the state)
            run.state, out = step_fn(run.state, x, y, run.rng)
            step += 1
            if step < cfg.max_iters:
                x, y = run.batches.train_batch(step)  # drawn on the host while the device runs the step
            out = {k: float(v) for k, v in jax.device_get(out).items()}  # waits for the step: its errors surface here
            if not math.isfinite(out["loss"]):
                return diverged(run, bar, f"the loss is {out['loss']} at step {step}")
            losses.append(out["loss"])
            p = progress(step, out, cfg.grad_clip, (time.perf_counter() - window_start) / len(losses),
                         tokens_per_step, flops_per_step, peak)
            bar.set_postfix_str(f"loss {p['loss']:.4f} lr {p['lr']:.2e} grad norm {p['grad_norm']:.3f} "
                                f"{p['tokens_per_s']:,.0f} tok/s {p['ms_per_step']:.0f} ms/step MFU "
                                f"{100 * p['mfu']:.1f}%", refresh=False)
            bar.update(1)
            evaluating = step % cfg.eval_interval == 0 or step == cfg.max_iters
            if step % cfg.log_interval == 0 or evaluating:  # an eval step's line has val_loss besides the rest
                record = dict(p, loss=float(np.mean(losses)))
                if evaluating:
                    doing = f"the evaluation after step {step}"
                    # The loss above was computed before this step's update; the update itself may have diverged.
                    record["val_loss"] = run.evaluate(eval_fn)
                    if not (math.isfinite(record["val_loss"]) and run.params_finite()):
                        return diverged(run, bar, f"the val loss is {record['val_loss']} after step {step}")
                    record.update(run.evaluate_hellaswag(), **run.update_ratios(before))
                run.metrics.log(record)
                if evaluating:
                    run.metrics.plot()
                    run.save(record["val_loss"])
                    say(f"{eval_line(step, record)}; saving a checkpoint")
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
    return finished(run, step, stopping)


def finished(run: Run, step: int, stopping: bool) -> int:
    """The exit status of a loop that ended with its last step saved, and the line that says why it ended."""
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
    """After a second Ctrl-C: the save in flight (of a step done) completes; the steps since it are not saved."""
    try:
        run.close_after_failure()
    except KeyboardInterrupt:  # a third Ctrl-C: leave the save in flight to orbax's temporary directory
        pass
    print(f"interrupted again: stopped without saving the steps since the last save; {run.last_complete()}",
          file=sys.stderr, flush=True)
    if jax.process_count() > 1:
        # The others may wait in a collective this one left (a Ctrl-C that reached it alone), and this one for them
        # at jax.distributed's shutdown, until a C++ stack trace: leave now, so they stop as after a lost process.
        sys.stdout.flush()
        os._exit(130)
    return 130


def step_failed(run: Run, error: StepFailed) -> int:
    """Stop a run whose step XLA could not run; alone, the save in flight completes first."""
    alone = jax.process_count() == 1
    if alone:
        run.close_after_failure()
    print(f"error: {error}; {run.last_complete()}", file=sys.stderr, flush=True)
    if not alone:
        # The save in flight needs the lost process, and jax.distributed's shutdown would wait 100 s, then abort.
        sys.stdout.flush()
        os._exit(1)
    return 1


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
        flags = read_flags(argv)
        sharding.join_cluster(flags.cluster)  # before anything touches a device
        model_cfg, train_cfg, params = resolve(flags)
        hellaswag = read_hellaswag(model_cfg, train_cfg)
        if train_cfg.eval_only:
            say(evaluate_only(model_cfg, train_cfg, params, hellaswag))
            return 0
        check_samples(model_cfg, train_cfg)
        run = Run(model_cfg, train_cfg, params, hellaswag)
    except SETUP_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StepFailed as e:  # the evaluation of --eval_only
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted before training started; no checkpoint was written", file=sys.stderr)
        return 130
    except jax.errors.JaxRuntimeError as e:  # placing the state on the mesh: out of memory, or a stopped process
        # No save in flight: return, so a process that failed on its own meets this one at the shutdown barrier.
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
        return step_failed(run, e)
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
