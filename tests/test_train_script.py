"""train.py end to end in its own processes: exact resume after kill -9, Ctrl-C, NaN stop, logs and checkpoint
meta of one straight run, and the input checks and evaluations that read it (the in-process failure paths are in
test_train_failures.py, fine-tuning and scores in test_train_finetune.py, meshes and several processes in
test_multidevice.py)."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from conftest import (MODEL_FLAGS, REPO, RUN_FLAGS, VOCAB, finish, hand_loss, main_error, process_environ, records,
                      resolve, run_train, start_train, wait_until)
from gpt2_jax import checkpoint, data
from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.huge_pages import THP_MODE, huge_pages_env
from gpt2_jax.run import data_change


def full_state(out, step):
    meta = checkpoint.read_meta(out, step)
    model_cfg, train_cfg = ModelConfig(**meta["model_config"]), TrainConfig(**meta["train_config"])
    return checkpoint.restore_train_state(out, model_cfg, train_cfg, step)[0]


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data_dir, env):
    """A 20-step run, with checkpoints at 10 and 20 and one sample at the end."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    rc, log = run_train(*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", "--num_samples=1", "--sample_tokens=8",
                        out=out, env=env)
    assert rc == 0, log
    return out, log


def test_resume_after_kill_9_is_bitwise_identical_to_a_straight_run(tmp_path, data_dir, straight, env):
    straight, _ = straight
    # The killed and resumed run also log to TensorBoard and to wandb (offline): both continue like metrics.jsonl.
    common = [*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", "--tensorboard=true", "--wandb_log=true"]
    env = dict(env, WANDB_MODE="offline", WANDB_SILENT="true")
    killed = tmp_path / "killed"
    # Many eval batches (2 x 400, seconds) make the step-20 eval long, so the kill lands between the two checkpoints;
    # the step-10 eval is as long (3000 made it 20 s), so no more than that.
    proc = start_train(*common, "--eval_iters=400", out=killed, env=env)
    wait_until(lambda: 10 in checkpoint._steps(killed), proc, "the step-10 checkpoint")
    wait_until(lambda: 15 in [r["step"] for r in records(killed)], proc, "the step-15 log line")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 20 not in checkpoint._steps(killed), "the run finished before the kill; nothing was resumed"
    rc, log = run_train("--init_from=resume", "--eval_iters=2", out=killed, env=env)
    assert rc == 0, log
    assert f"resumed {killed} at step 10" in log

    assert_bitwise_equal(full_state(killed, 20).params, full_state(straight, 20).params)
    assert_bitwise_equal(full_state(killed, 20).opt_state, full_state(straight, 20).opt_state)
    # The log keeps the killed run's first 10 steps (not what it logged after) and continues them exactly.
    train_losses = lambda out: [(r["step"], r["loss"]) for r in records(out) if "loss" in r]
    assert train_losses(killed) == train_losses(straight)
    assert records(killed)[-1]["val_loss"] == records(straight)[-1]["val_loss"]
    assert_dashboards_hold_the_metrics(killed)


def assert_dashboards_hold_the_metrics(out):
    """TensorBoard's reader sees each step of metrics.jsonl once (the killed run's step 15 purged), and the resumed
    wandb run is the killed one, continued from the checkpoint. (What the killed wandb run logged is not checked:
    wandb's own process buffers it, and a kill -9 loses it from the offline file.)"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for key in ("loss", "grad_norm", "val_loss", "lr"):
        logged = [(r["step"], r[key]) for r in records(out) if key in r]
        shown = events.Scalars(key)
        assert [e.step for e in shown] == [step for step, _ in logged], key
        assert [e.value for e in shown] == pytest.approx([value for _, value in logged], rel=1e-6), key  # float32
    run_id = checkpoint.read_meta(out, 20)["wandb_run_id"]
    assert checkpoint.read_meta(out, 10)["wandb_run_id"] == run_id
    killed, resumed = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert (killed / f"run-{run_id}.wandb").exists()
    rows = wandb_history(resumed / f"run-{run_id}.wandb")
    assert [(r["_step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in records(out) if r["step"] > 10]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == [records(out)[-1]["val_loss"]]


def wandb_history(path: Path) -> list[dict]:
    """The history rows of a .wandb file (LevelDB's log format: 32 KiB blocks of chunks with 7-byte headers, each
    record a protocol buffer)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, payload, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = payload + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record.FromString(payload)
            payload = b""
            if record.HasField("history"):
                rows.append({item.key or ".".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_logs_metrics_draws_the_loss_curve_and_prints_samples(straight):
    out, log = straight
    recs = records(out)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)  # eval lines too
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["lr"] > 0 for r in train_recs)
    assert all(r["grad_norm"] > 0 and r["clipped"] == (r["grad_norm"] > 1.0) for r in train_recs)  # grad_clip 1
    # 8 x 2 sequences of 32 tokens a step; tokens/s and ms/step describe the same measured time.
    for r in train_recs:
        assert r["tokens_per_s"] == pytest.approx(8 * 2 * 32 / (r["ms_per_step"] / 1e3))
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MFU against" in log and "step 20: train loss" in log
    assert "-" * 60 in log  # the sample's separator
    assert checkpoint.read_meta(out)["data"]["next_batch"] == 20


def test_checkpoint_meta_holds_the_configs_rng_commit_and_val_loss(straight):
    out, _ = straight
    meta = checkpoint.read_meta(out)
    assert ModelConfig(**meta["model_config"]) == ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32,
                                                                         dropout=0.1)
    assert (meta["train_config"]["max_iters"], meta["train_config"]["batch_size"]) == (20, 8)
    assert meta["rng"] == np.asarray(jax.random.PRNGKey(meta["train_config"]["seed"])).tolist()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert meta["git_commit"] in (head, head + "-dirty")
    assert meta["val_loss"] == records(out)[-1]["val_loss"]


def test_ctrl_c_saves_and_a_nan_loss_stops_without_touching_the_checkpoint(tmp_path, data_dir, env, capsys):
    out = tmp_path / "run"
    # max_iters is not part of the compiled step, so this run reuses the straight run's cached executable.
    proc = start_train(*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", "--max_iters=100000", "--num_samples=1",
                       "--sample_tokens=8", out=out, env=env)
    wait_until(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text(), proc,
               "the first logged step")
    # train.py re-executed itself with malloc on huge pages where it can (same pid: the SIGINT below reaches it)
    assert process_environ(proc.pid).get("GLIBC_TUNABLES") == (huge_pages_env(env) or env).get("GLIBC_TUNABLES")
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, timeout=120)
    assert rc == 0, log
    saved = checkpoint._steps(out)
    assert len(saved) == 1 and saved[0] >= 5
    assert f"interrupted: saved a checkpoint of step {saved[0]}" in log
    assert "-" * 60 not in log  # stopped means stopped: no samples after the save
    before = checkpoint.load_weights(out)[1]

    # An absurd learning rate: the first resumed step's update overflows, so the next step's loss is NaN. (These
    # runs need no process of their own: in this one they skip importing jax, torch and the rest again.)
    overflow = ["--init_from=resume", "--lr_schedule=constant", "--warmup_iters=0", "--learning_rate=1e30",
                f"--out_dir={out}"]
    assert train.main(overflow) == 1
    log = capsys.readouterr().err
    assert f"the loss is nan at step {saved[0] + 2}" in log
    assert checkpoint._steps(out) == saved
    assert_bitwise_equal(checkpoint.load_weights(out)[1], before)
    # The same overflow on a step that evaluates and saves (the last one): its train loss was computed before the
    # update, so the val loss is the first to show it, and the diverged parameters are not saved.
    assert train.main([*overflow, f"--max_iters={saved[0] + 1}"]) == 1
    log = capsys.readouterr().err
    assert re.search(rf"the val loss is (nan|inf) after step {saved[0] + 1}; stopping without saving", log), log
    assert checkpoint._steps(out) == saved
    assert_bitwise_equal(checkpoint.load_weights(out)[1], before)


MALLOC_PROBE = """import ctypes, re
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
ctypes.memset(libc.malloc(64 << 20), 1, 64 << 20)
print(re.search(r"AnonHugePages:\\s+(\\d+) kB", open("/proc/self/smaps_rollup").read()).group(1))"""


def test_train_py_s_malloc_setting_puts_a_large_buffer_on_huge_pages(env):
    huge = huge_pages_env(env)
    if huge is None:
        pytest.skip("glibc older than 2.35, transparent huge pages off, or GLIBC_TUNABLES set by the caller")
    kb = {name: int(subprocess.run([sys.executable, "-c", MALLOC_PROBE], env=e, capture_output=True, text=True,
                                   check=True).stdout) for name, e in (("plain", env), ("huge", huge))}
    assert kb["huge"] >= 32 << 10  # of the 64 MB malloc'd and written, at least half in 2 MB pages
    if "[madvise]" in THP_MODE.read_text():  # else ("always") the kernel uses them for plain malloc too
        assert kb["plain"] < 2 << 10


def test_inputs_are_checked_before_training(tmp_path, data_dir, straight, capsys):
    out, _ = straight
    flags = [*MODEL_FLAGS, f"--data={data_dir}", f"--out_dir={tmp_path / 'new'}"]
    assert "unknown flag --n_layers" in main_error(capsys, *flags, "--n_layers=3")
    assert "unknown model preset 'gpt3'" in main_error(capsys, *flags, "--config=gpt3")
    assert f"{out} already holds checkpoints" in main_error(capsys, *MODEL_FLAGS, f"--data={data_dir}",
                                                            f"--out_dir={out}")
    refused = main_error(capsys, "--init_from=resume", f"--out_dir={out}", "--n_layer=3")
    assert f"checkpoint {out}/20 was saved for another model: n_layer=2 (this run: 3)" in refused
    assert "resuming with" not in capsys.readouterr().out  # no change is announced before the refusal
    assert "train_000000.bin: token id 255 is outside the model's vocabulary (vocab_size 200)" in main_error(
        capsys, *flags, "--vocab_size=200")
    assert "no train data in" in main_error(capsys, *flags[:-2], f"--data={tmp_path}", flags[-1])
    assert "no such weights file or directory" in main_error(capsys, *flags, f"--init_from={tmp_path / 'nothing'}")
    assert "gpt2-jax does not download weights: to use OpenAI's gpt2-medium, download model.safetensors" in (
        main_error(capsys, *flags, "--init_from=gpt2-medium"))
    # the mistyped weights path is the error, not the out_dir that --init_from=PATH cannot continue
    assert f"no such weights file or directory: {tmp_path / 'nothing'}" in main_error(
        capsys, *MODEL_FLAGS, f"--data={data_dir}", f"--out_dir={out}", f"--init_from={tmp_path / 'nothing'}")
    assert "holds no complete checkpoint" in main_error(capsys, "--init_from=resume", f"--out_dir={tmp_path}")
    assert f"{tmp_path / 'none'} does not exist" in main_error(capsys, "--init_from=resume",
                                                               f"--out_dir={tmp_path / 'none'}")
    assert "--init_from must be scratch, resume or an existing weights path; it is empty" in main_error(
        capsys, *flags, "--init_from=")
    assert f"{out} has no step 3; it has steps [" in main_error(capsys, *flags, f"--init_from={out / '3'}")
    (tmp_path / "bad.json").write_text('{"n_layer": 2, "max_iter": 5}')
    assert "keys ['max_iter'] are neither" in main_error(capsys, *flags, f"--config={tmp_path / 'bad.json'}")
    (tmp_path / "broken.json").write_text('{n_layer: 2}')
    assert f"--config={tmp_path / 'broken.json'} is not valid JSON: Expecting property name" in main_error(
        capsys, *flags, f"--config={tmp_path / 'broken.json'}")
    assert "seed must be an integer in [0, 2**32)" in main_error(capsys, *flags, f"--seed={2**32}")
    for flag, message in [("--learning_rate=nan", "learning_rate must be a finite number; got nan"),
                          ("--grad_clip=inf", "grad_clip must be a finite number; got inf"),
                          ("--eps=0", "eps must be > 0"),
                          ("--warmup_iters=3000000000", "warmup_iters must fit in 32 bits"),
                          ("--sample_tokens=0", "sample_tokens must be >= 1 when num_samples > 0"),
                          ("--out_dir=", "out_dir must name a directory"),
                          ("--attention=cpu_kernel", "attention='cpu_kernel' cannot run here: it has no attention "
                                                     "dropout")]:
        assert message in main_error(capsys, *flags, flag)
    (tmp_path / "listed.json").write_text('{"preset": ["tiny"]}')
    assert '"preset" must be a preset name' in main_error(capsys, *flags, f"--config={tmp_path / 'listed.json'}")
    assert f"data directory {tmp_path / 'bad.json'} is a file" in main_error(
        capsys, *flags, f"--data={tmp_path / 'bad.json'}")
    assert f"out_dir {tmp_path / 'bad.json'} is a file" in main_error(
        capsys, *flags, f"--out_dir={tmp_path / 'bad.json'}")
    assert f"{out} is at step 20, past max_iters=10; pass --max_iters=20 or more" in main_error(
        capsys, "--init_from=resume", f"--out_dir={out}", "--max_iters=10")
    assert f"{out} was saved with grad_clip=1.0; a resumed run keeps clipping on (grad_clip > 0)" in main_error(
        capsys, "--init_from=resume", f"--out_dir={out}", "--grad_clip=0")


def test_eval_only_prints_both_losses_of_the_weights_and_writes_nothing(tmp_path, data_dir, straight, capsys):
    out, _ = straight
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert train.main(["--eval_only=true", "--init_from=resume", f"--out_dir={out}", "--eval_iters=3"]) == 0
    printed = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    got = re.search(r"step 20 of \S+: train loss (\S+), val loss (\S+) \(the first 3 batches of 8 x 32 tokens", printed)
    assert got, printed
    meta = checkpoint.read_meta(out)
    model_cfg = ModelConfig(**meta["model_config"])
    params = checkpoint.load_weights(out)[1]
    seed = meta["train_config"]["seed"]
    for value, split in zip(got.groups(), ("train", "val")):
        expected = hand_loss(model_cfg, params, data.open_split(data_dir, split), seed, 3, 8)
        assert float(value) == pytest.approx(expected, abs=1e-4)
    # From a weights path into an out_dir that does not exist: none is made, and a full one is no obstacle.
    fresh = tmp_path / "never"
    assert train.main(["--eval_only=true", f"--init_from={out}/10", f"--out_dir={fresh}", "--eval_iters=1",
                       f"--data={data_dir}"]) == 0
    assert f"the weights in {out}/10: train loss" in capsys.readouterr().out and not fresh.exists()
    assert train.main(["--eval_only=true", f"--init_from={out}/10", f"--out_dir={out}", "--eval_iters=1",
                       f"--data={data_dir}"]) == 0


def test_a_resume_on_data_that_changed_says_so(straight, data_dir):
    meta = checkpoint.read_meta(straight[0])  # a run on data_dir's 4,000 train tokens
    assert meta["data"]["train_tokens"] == 4000 and data_change(meta, data_dir, 4000) is None
    assert data_change(meta, data_dir, 4500) == (
        f"the train data in {data_dir} holds 4,500 tokens, the checkpoint's held 4,000: the batches from here "
        "differ from an uninterrupted run's")
    assert data_change({}, data_dir, 4500) is None  # a checkpoint that did not record it


def test_a_checkpoint_keeps_its_own_model_config_under_a_preset(tmp_path, straight):
    # Resuming or fine-tuning with --config=tiny takes the checkpoint's dropout (0.1, not tiny's 0.0) and
    # vocabulary; the preset only has to agree with its size.
    out, _ = straight
    model_cfg, _, _ = resolve(["--config=tiny", "--init_from=resume", f"--out_dir={out}"])
    assert (model_cfg.dropout, model_cfg.vocab_size, model_cfg.block_size) == (0.1, VOCAB, 32)
    model_cfg, _, params = resolve(["--config=tiny", f"--init_from={out}", f"--out_dir={tmp_path / 'ft'}"])
    assert (model_cfg.dropout, model_cfg.vocab_size) == (0.1, VOCAB) and params["wte"].shape[0] == VOCAB
    with pytest.raises(ConfigError, match=r"is not a gpt2 model: n_layer=2 \(the preset: 12\)"):
        resolve(["--config=gpt2", "--init_from=resume", f"--out_dir={out}"])
