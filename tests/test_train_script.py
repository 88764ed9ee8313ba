"""train.py end to end: exact resume after kill -9, Ctrl-C, NaN stop, logs, fine-tuning and input errors (its runs on
device meshes and over several processes are in test_multidevice.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from conftest import REPO, finish, run_train, start_train, wait_until
from gpt2_jax import checkpoint, cpu_kernels, data, run_config
from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.flops import peak_flops
from gpt2_jax.metrics import Figure, Metrics
from gpt2_jax.model import GPT2, init_params
from gpt2_jax.run import Run, data_change, lock_out_dir
from gpt2_jax.tokenizer import get_tokenizer
from gpt2_jax.training import update_ratios

VOCAB = 256
# A small model and vocabulary so that each run compiles and steps in moments; dropout on, so the rng matters.
MODEL_FLAGS = ["--config=tiny", f"--vocab_size={VOCAB}", "--block_size=32", "--dropout=0.1"]
RUN_FLAGS = ["--batch_size=8", "--gradient_accumulation_steps=2", "--max_iters=20", "--eval_interval=10",
             "--log_interval=5", "--eval_iters=2", "--warmup_iters=5", "--lr_decay_iters=20", "--num_samples=0"]


def full_state(out, step):
    meta = checkpoint.read_meta(out, step)
    model_cfg, train_cfg = ModelConfig(**meta["model_config"]), TrainConfig(**meta["train_config"])
    return checkpoint.restore_train_state(out, model_cfg, train_cfg, step)[0]


def assert_bitwise_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


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
    # Many eval batches make the step-20 eval long, so the kill lands between the two checkpoints.
    proc = start_train(*common, "--eval_iters=3000", out=killed, env=env)
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


def test_ctrl_c_saves_and_a_nan_loss_stops_without_touching_the_checkpoint(tmp_path, data_dir, env):
    out = tmp_path / "run"
    # max_iters is not part of the compiled step, so this run reuses the straight run's cached executable.
    proc = start_train(*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", "--max_iters=100000", "--num_samples=1",
                       "--sample_tokens=8", out=out, env=env)
    wait_until(lambda: (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text(), proc,
               "the first logged step")
    os.kill(proc.pid, signal.SIGINT)
    rc, log = finish(proc, timeout=120)
    assert rc == 0, log
    saved = checkpoint._steps(out)
    assert len(saved) == 1 and saved[0] >= 5
    assert f"interrupted: saved a checkpoint of step {saved[0]}" in log
    assert "-" * 60 not in log  # stopped means stopped: no samples after the save
    before = checkpoint.load_weights(out)[1]

    # An absurd learning rate: the first resumed step's update overflows, so the next step's loss is NaN.
    rc, log = run_train("--init_from=resume", "--lr_schedule=constant", "--warmup_iters=0", "--learning_rate=1e30",
                        out=out, env=env)
    assert rc == 1, log
    assert f"the loss is nan at step {saved[0] + 2}" in log
    assert checkpoint._steps(out) == saved
    assert_bitwise_equal(checkpoint.load_weights(out)[1], before)
    # The same overflow on a step that evaluates and saves (the last one): its train loss was computed before the
    # update, so the val loss is the first to show it, and the diverged parameters are not saved.
    rc, log = run_train("--init_from=resume", "--lr_schedule=constant", "--warmup_iters=0", "--learning_rate=1e30",
                        f"--max_iters={saved[0] + 1}", out=out, env=env)
    assert rc == 1, log
    assert re.search(rf"the val loss is (nan|inf) after step {saved[0] + 1}; stopping without saving", log), log
    assert checkpoint._steps(out) == saved
    assert_bitwise_equal(checkpoint.load_weights(out)[1], before)


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.json").write_text('{"preset": "tiny", "n_layer": 3, "max_iters": 5, "learning_rate": 1}')
    model_cfg, train_cfg, params = resolve([f"--config={tmp_path / 'run.json'}", "--max_iters=7",
                                                  "--dtype=bfloat16", "--block_size=16", f"--out_dir={tmp_path}"])
    assert model_cfg == ModelConfig.from_preset("tiny", n_layer=3, dtype="bfloat16", block_size=16)
    assert (train_cfg.max_iters, train_cfg.learning_rate, params) == (7, 1.0, None)
    (tmp_path / "plain.json").write_text('{"n_layer": 3}')  # no "preset": the default one
    model_cfg, _, _ = resolve([f"--config={tmp_path / 'plain.json'}", f"--out_dir={tmp_path}"])
    assert model_cfg == ModelConfig.from_preset(run_config.DEFAULT_PRESET, n_layer=3)


def resolve(argv: list[str]):
    return run_config.resolve(run_config.read_flags(argv))


def main_error(capsys, *argv) -> str:
    assert train.main(list(argv)) == 2
    return capsys.readouterr().err


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


def test_nanogpt_flags_without_a_counterpart_say_what_to_use(tmp_path, capsys):
    for flag, advice in [("--decay_lr=False", "--lr_schedule=constant"), ("--compile=True", "compiled by XLA"),
                         ("--device=cuda", "JAX_PLATFORMS=cpu"), ("--dataset=owt", "--data=DIR")]:
        assert f"{flag.partition('=')[0]} is nanoGPT's, with no counterpart here: " in main_error(capsys, flag)
        assert advice in main_error(capsys, flag)
    (tmp_path / "run.json").write_text('{"always_save_checkpoint": false}')
    assert "config file key always_save_checkpoint is nanoGPT's" in main_error(capsys, f"--config={tmp_path}/run.json")
    assert "nanoGPT's Python config files are not read" in main_error(capsys, "config/train_shakespeare_char.py")
    # The error names the config file, not the first positional argument; --config=FILE.py is no preset name.
    assert main_error(capsys, "extra", "config/train_gpt2.py").startswith("error: config/train_gpt2.py: nanoGPT's")
    assert "--config=config/train_gpt2.py: nanoGPT's Python config files are not read" in main_error(
        capsys, "--config=config/train_gpt2.py")


def hand_loss(model_cfg: ModelConfig, params, split, seed: int, batches: int, B: int) -> float:
    """The mean cross entropy of the first `batches` batches of a split, computed here from the logits."""
    losses = []
    for i in range(batches):
        x, y = split.batch(seed, i, B, model_cfg.block_size)
        logits = GPT2(model_cfg).apply({"params": params}, jnp.asarray(x[0]), deterministic=True)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        losses.append(-np.mean(np.take_along_axis(logp, y[0][..., None], axis=-1)))
    return float(np.mean(losses))


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


def test_eval_only_losses_of_hugging_face_weights_are_transformers_losses(tmp_path, data_dir, capsys):
    # The same token batches (TokenShards.batch of the run's seed) through transformers' own GPT2LMHeadModel.
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from conftest import hf_model

    model = hf_model(ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32), seed=3)
    model.save_pretrained(tmp_path / "hf")
    assert train.main(["--eval_only=true", f"--init_from={tmp_path / 'hf'}", f"--data={data_dir}", "--seed=5",
                       "--eval_iters=2", "--batch_size=4", f"--out_dir={tmp_path / 'unused'}"]) == 0
    got = re.search(r"train loss (\S+), val loss (\S+) \(the first 2 batches of 4 x 32", capsys.readouterr().out)
    for value, split in zip(got.groups(), ("train", "val")):
        losses = []
        for i in range(2):
            x, y = (torch.tensor(a[0], dtype=torch.long) for a in data.open_split(data_dir, split).batch(5, i, 4, 32))
            with torch.no_grad():
                logits = model(x).logits
            losses.append(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
        assert float(value) == pytest.approx(np.mean(losses), abs=1e-4), split


@pytest.mark.parametrize("attention", ["xla", "cpu_kernel"])
def test_eval_only_runs_an_attention_that_has_no_dropout(attention, tmp_path, data_dir, capsys):
    # The weights' dropout (0.1) is a training setting: an evaluation has none, so attention="cpu_kernel" runs it.
    if attention == "cpu_kernel" and not cpu_kernels.available():
        pytest.skip(f"no attention kernel here: {cpu_kernels.unavailable_reason()}")
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32, dropout=0.1)
    params = init_params(model_cfg, jax.random.PRNGKey(0))
    checkpoint.save_weights(tmp_path / "weights", model_cfg, params)
    assert train.main(["--eval_only=true", f"--init_from={tmp_path / 'weights'}", f"--out_dir={tmp_path / 'out'}",
                       f"--data={data_dir}", "--eval_iters=1", f"--attention={attention}"]) == 0
    got = re.search(r"train loss (\S+), val loss (\S+)", capsys.readouterr().out)
    for value, split in zip(got.groups(), ("train", "val")):
        expected = hand_loss(model_cfg, params, data.open_split(data_dir, split), TrainConfig().seed, 1, 8)
        assert float(value) == pytest.approx(expected, abs=1e-4)


def test_a_weights_directory_is_evaluated_but_not_resumed(tmp_path, data_dir, capsys):
    # save_weights writes no train_config: --eval_only reads the weights; a resume says why it cannot (no KeyError).
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32)
    checkpoint.save_weights(tmp_path / "weights", model_cfg, init_params(model_cfg, jax.random.PRNGKey(0)))
    flags = ["--init_from=resume", f"--out_dir={tmp_path / 'weights'}", f"--data={data_dir}", "--num_samples=0"]
    assert train.main(["--eval_only=true", "--eval_iters=1", *flags]) == 0
    assert f"step 0 of {tmp_path / 'weights'}: train loss" in capsys.readouterr().out
    assert (f"{tmp_path / 'weights'}/0 holds weights only (no optimizer state); it cannot be resumed, but "
            f"--init_from={tmp_path / 'weights'} fine-tunes from it") in main_error(capsys, *flags)


def test_two_runs_never_share_an_out_dir(tmp_path, data_dir, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    held = lock_out_dir(busy)  # what a running train.py holds; a second open file description conflicts
    try:
        assert f"another train.py is writing to out_dir {busy}" in main_error(
            capsys, *MODEL_FLAGS, f"--data={data_dir}", f"--out_dir={busy}")
    finally:
        os.close(held)
    assert not (busy / "metrics.jsonl").exists()


def test_ctrl_c_before_training_or_while_sampling_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupt(*args):
        raise KeyboardInterrupt

    flags = [*MODEL_FLAGS, f"--out_dir={tmp_path}"]
    monkeypatch.setattr(train, "Run", interrupt)
    assert train.main(flags) == 130
    assert capsys.readouterr().err == "interrupted before training started; no checkpoint was written\n"
    monkeypatch.setattr(train, "Run", lambda *args: type("FinishedRun", (), {"interrupted": False,
                                                                          "out_dir": tmp_path})())
    monkeypatch.setattr(train, "train", lambda run: 0)
    monkeypatch.setattr(train, "print_samples", interrupt)
    assert train.main(flags) == 130
    assert capsys.readouterr().err == f"interrupted while sampling; the checkpoints in {tmp_path} are complete\n"


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, data_dir, monkeypatch, capsys):
    # The first Ctrl-C only asks for a save; the second raises KeyboardInterrupt wherever the run is, here in
    # the step-20 evaluation, after the step-10 checkpoint.
    evaluate, calls = Run.evaluate, []

    def interrupted_at_the_second_eval(run, eval_fn):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(run, eval_fn)

    monkeypatch.setattr(Run, "evaluate", interrupted_at_the_second_eval)
    out = tmp_path / "run"
    try:
        rc = train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}"])
    except KeyboardInterrupt:
        pytest.fail("a second Ctrl-C escaped train.main as a traceback")
    assert rc == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("interrupted again: stopped without saving the steps since the last save; "
                                    "the last complete checkpoint is step 10"), err
    assert checkpoint._steps(out) == [10]


def test_a_second_ctrl_c_on_one_of_several_processes_leaves_at_once(monkeypatch, capsys):
    # Returning, this process waited at jax.distributed's shutdown for the others, which waited in the collective
    # it left (2 processes, fsdp:8, two Ctrl-C on process 1): both for 5 minutes, then C++ stack traces on both.
    # Gone, the others' collective fails at once and they stop with one line, as after a lost process.
    exits = []
    monkeypatch.setattr(train.os, "_exit", exits.append)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    run = types.SimpleNamespace(close_after_failure=lambda: None,
                                last_complete=lambda: "the last complete checkpoint is step 10")
    assert train.interrupted_again(run) == 130 and exits == [130]
    assert capsys.readouterr().err == ("interrupted again: stopped without saving the steps since the last save; "
                                       "the last complete checkpoint is step 10\n")


@pytest.mark.skipif(Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1",
                    reason="the kernel would grant the allocation and the OOM killer end the test run")
def test_a_step_that_does_not_fit_in_memory_says_so(tmp_path, data_dir, capsys):
    # Logits of 1024 x 64 tokens over 2**20 ids: 275 GB a copy, which no allocator of this machine grants.
    assert train.main(["--config=tiny", "--vocab_size=1048576", "--batch_size=1024", f"--data={data_dir}",
                       "--max_iters=2", "--num_samples=0", f"--out_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # after the progress bar
    assert re.fullmatch(r"error: step 1 failed: RESOURCE_EXHAUSTED: Out of memory allocating \d+ bytes; the step "
                        r"does not fit in device memory: lower batch_size \(raise gradient_accumulation_steps to keep "
                        r"the tokens a step\), or set --remat=true, --dtype=bfloat16 or an fsdp mesh; no checkpoint "
                        r"of this run is complete\n", err), err


def test_a_resume_on_another_process_count_keeps_the_global_batch():
    from gpt2_jax.config import TrainConfig

    saved = TrainConfig(batch_size=8)  # per process, as a checkpoint of 2 processes records it: global 16
    assert run_config.keep_global_batch(saved, 2, 2) == saved
    assert run_config.keep_global_batch(saved, 2, 4).batch_size == 4
    assert run_config.keep_global_batch(saved, 2, 1).batch_size == 16
    with pytest.raises(ConfigError, match=r"global batch \(8 x 2 processes\) does not divide among 3"):
        run_config.keep_global_batch(saved, 2, 3)


def test_a_resume_names_the_flags_that_change_the_checkpoints_settings(tmp_path, monkeypatch):
    from gpt2_jax.config import TrainConfig

    saved = TrainConfig(seed=1, learning_rate=6e-4, max_iters=20, out_dir="old").to_dict()
    model = ModelConfig.from_preset("tiny", dropout=0.1)
    # The same learning rate, another out_dir (a copied checkpoint): no change.
    flags = {"init_from": "resume", "max_iters": 40, "learning_rate": 6e-4, "out_dir": "new"}
    run_model = ModelConfig.from_preset("tiny", dropout=0.0)
    assert run_config.resume_changes([(saved, TrainConfig(**flags), flags), (model.to_dict(), model, {})]) == \
        "resuming with max_iters 20 -> 40"
    flags = dict(flags, seed=2)
    assert run_config.resume_changes([(saved, TrainConfig(**flags), flags),
                                 (model.to_dict(), run_model, {"dropout": 0.0})]) == (
        "resuming with max_iters 20 -> 40, seed 1 -> 2, dropout 0.1 -> 0.0 (the checkpoint's on the left); the "
        "batches from here differ from an uninterrupted run's")
    assert run_config.resume_changes([(saved, TrainConfig(**saved), {"init_from": "resume"})]) is None

    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(data="mine").to_dict()
    for same in ("./mine/", str(tmp_path / "mine")):  # the same directory, named another way: no change
        flags = {"init_from": "resume", "data": same}
        assert run_config.resume_changes([(saved, TrainConfig(**flags), flags)]) is None
    flags = {"init_from": "resume", "data": "other"}
    changes = run_config.resume_changes([(saved, TrainConfig(**flags), flags)])
    assert changes.startswith("resuming with data 'mine' -> ")


def test_a_resume_on_data_that_changed_says_so(straight, data_dir):
    meta = checkpoint.read_meta(straight[0])  # a run on data_dir's 4,000 train tokens
    assert meta["data"]["train_tokens"] == 4000 and data_change(meta, data_dir, 4000) is None
    assert data_change(meta, data_dir, 4500) == (
        f"the train data in {data_dir} holds 4,500 tokens, the checkpoint's held 4,000: the batches from here "
        "differ from an uninterrupted run's")
    assert data_change({}, data_dir, 4500) is None  # a checkpoint that did not record it


def test_a_save_that_cannot_fit_stops_the_run_and_names_the_last_checkpoint(tmp_path, data_dir, capsys,
                                                                              monkeypatch):
    real = shutil.disk_usage
    calls = []

    def disk_usage(path):  # plenty of space at the start and the step-10 save, none at step 20
        calls.append(path)
        usage = real(path)
        return usage._replace(free=0) if len(calls) > 2 else usage

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)
    out = tmp_path / "full"
    assert train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: cannot save step 20: {out} has 0.0 MB free; a checkpoint of this run needs "
                     r"[\d.]+ MB; the last complete checkpoint is step 10", err), err
    assert checkpoint._steps(out) == [10]


def test_a_cut_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    lines = [json.dumps({"step": 5, "loss": 2.0}), json.dumps({"step": 10, "loss": 1.5}), '{"step": 15, "lo',
             json.dumps({"loss": 1.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    metrics = Metrics(tmp_path, start_step=10)
    assert [r["step"] for r in metrics.records] == [5, 10]
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # the temporary file renamed
    out = capsys.readouterr().out
    assert "metrics.jsonl:3 is not a metrics record; dropped" in out and "metrics.jsonl:4 is not" in out


def test_a_log_that_cannot_be_written_stops_the_run_with_a_checkpoint_and_one_line(tmp_path, data_dir, capsys,
                                                                                   monkeypatch):
    # The disk fills while the step-20 curve is drawn: its cut file never replaces the step-10 curve, the run saves
    # step 20 and stops (every process of a run would, after the same step), naming the file (no OSError traceback).
    savefig, calls = Figure.savefig, []

    def disk_full_at_the_second_curve(fig, path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x89PNG")
            raise OSError(28, "No space left on device")
        return savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", disk_full_at_the_second_curve)
    out = tmp_path / "run"
    assert train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}", "--max_iters=40"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"error: cannot write {out / 'loss.png'} (No space left on device); stopped "
                                    f"after saving a checkpoint of step 20 in {out}: make room (or fix the "
                                    "permissions) and continue with --init_from=resume"), err
    assert checkpoint._steps(out) == [10, 20] and len(calls) == 2
    assert [r["step"] for r in records(out)] == [5, 10, 15, 20]
    assert len((out / "loss.png").read_bytes()) > 1000  # the step-10 curve, whole


def test_a_log_that_cannot_be_opened_stops_every_process_before_training(tmp_path, data_dir, capsys, monkeypatch):
    # loss.png is a directory: the main process cannot redraw the curve as it opens the logs, after the state is
    # placed on the mesh. Raised there alone (2 processes, fsdp:8), the other process went on into its first step,
    # failed after gloo's 30 s timeout and left, and the main one aborted 100 s later with a C++ stack trace.
    told = []
    monkeypatch.setattr(train.sharding, "any_process", lambda flag: told.append(flag) or flag)
    out = tmp_path / "run"
    (out / "loss.png").mkdir(parents=True)
    flags = [*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}"]
    assert train.main(flags) == 2
    assert capsys.readouterr().err == f"error: cannot write {out / 'loss.png'} (Is a directory)\n"
    assert told == [False, True]  # the out_dir locked, then the logs not opened: the other processes are told
    # The other processes, told so, stop at the same point with one line.
    monkeypatch.setattr(train.sharding, "is_main_process", lambda: False)
    monkeypatch.setattr(train.sharding, "any_process", lambda flag: told.append(flag) or len(told) == 4)
    assert train.main(flags) == 2
    assert capsys.readouterr().err == ("error: the main process could not set up the run (see its log); training "
                                       "did not start\n")
    assert told[2:] == [False, False] and not checkpoint.is_checkpoint_dir(out)


def test_a_divergence_after_a_failed_save_reports_both(tmp_path, data_dir, capsys, monkeypatch):
    # The step-10 save fails in the background and the parameters then diverge: both are said, the save first.
    calls = []

    def confirm_saved(run):
        calls.append(int(run.state.step))
        if len(calls) > 1:
            raise checkpoint.CheckpointError("saving step 10 failed (disk full)")

    monkeypatch.setattr(Run, "confirm_saved", confirm_saved)
    monkeypatch.setattr(Run, "params_finite", lambda run: int(run.state.step) < 20)
    out = tmp_path / "run"
    assert train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == "error: saving step 10 failed (disk full)", err
    assert re.fullmatch(rf"error: the val loss is \S+ after step 20; stopping without saving; the last complete "
                        rf"checkpoint is step 10 in {re.escape(str(out))}", err[-1]), err


def test_a_ctrl_c_logs_the_steps_since_the_last_line(tmp_path, data_dir, monkeypatch):
    # Stopped after step 12 (log_interval 5): steps 11 and 12 get their line before the save, so that the resumed
    # run's step-15 line, the mean of steps 13 to 15, is again the mean since the previous line.
    steps = []  # setting up the run asks twice (the out_dir locked, the logs opened), then once a step
    monkeypatch.setattr(train.sharding, "any_process", lambda flag: steps.append(1) or len(steps) == 2 + 12)
    out = tmp_path / "run"
    assert train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={out}"]) == 0
    assert checkpoint._steps(out) == [10, 12]
    assert [r["step"] for r in records(out)] == [5, 10, 12]


def test_a_resume_redraws_the_curve_without_the_dropped_steps(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(Metrics, "plot", lambda self: drawn.append([r["step"] for r in self.records]))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (5, 10, 15)))
    Metrics(tmp_path, start_step=10)
    assert drawn == []  # no curve yet: none is drawn before the first eval
    (tmp_path / "loss.png").write_bytes(b"the curve up to step 15")
    Metrics(tmp_path, start_step=10)
    assert drawn == [[5, 10]]


def test_the_final_samples_are_checked_before_training(tmp_path, data_dir, capsys):
    # The samples start from a newline, GPT-2's token 198: a smaller vocabulary fails before training, not after.
    out = tmp_path / "run"
    assert ("num_samples=2: the samples at the end start from a newline, token 198, which is outside vocab_size "
            "150; pass --num_samples=0") in main_error(capsys, "--config=tiny", "--vocab_size=150", "--num_samples=2",
                                                       f"--data={data_dir}", f"--out_dir={out}")
    assert not out.exists()


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


def test_fine_tunes_from_saved_weights_with_a_shorter_context(tmp_path, data_dir, capsys):
    source_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=64)
    params = init_params(source_cfg, jax.random.PRNGKey(7))
    checkpoint.save_weights(tmp_path / "weights", source_cfg, params)
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'weights'}", "--block_size=32", f"--data={data_dir}", f"--out_dir={out}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    assert (f"initialised from the weights in {tmp_path / 'weights'} (wpe cut to its first 32 of 64 positions)"
            in capsys.readouterr().out)
    meta = checkpoint.read_meta(out)
    assert meta["model_config"] == ModelConfig.from_preset("tiny", vocab_size=VOCAB, block_size=32).to_dict()
    # A longer context than the weights' wpe cannot be made up: the error says so (and nothing claims a load).
    with pytest.raises(ConfigError, match=r"--block_size=128 is longer than the 64 positions of the weights"):
        resolve([f"--init_from={tmp_path / 'weights'}", "--block_size=128", f"--out_dir={tmp_path / 'long'}"])
    assert "initialised" not in capsys.readouterr().out
    # The first loss is that of the loaded weights (first 32 positions) on the first batch, computed here by hand.
    x, y = data.open_split(data_dir, "train").batch(meta["train_config"]["seed"], 0, 4, 32)
    cropped = dict(params, wpe=params["wpe"][:32])
    logits = GPT2(ModelConfig(**meta["model_config"])).apply({"params": cropped}, jnp.asarray(x[0]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = -np.mean(np.take_along_axis(np.asarray(logp), y[0][..., None], axis=-1))
    assert records(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e3])
def test_the_logged_grad_norm_is_torchs_clip_grad_norm(grad_clip, random_hf, tmp_path, data_dir, capsys):
    """grad_norm is the global norm before clipping, as torch.nn.utils.clip_grad_norm_ returns it for the same
    weights and batch; clipped says whether it exceeded grad_clip."""
    torch = pytest.importorskip("torch")
    model = random_hf(seed=4, vocab_size=VOCAB, n_positions=32)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'hf'}", f"--data={data_dir}", f"--out_dir={out}", f"--grad_clip={grad_clip}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    x, y = data.open_split(data_dir, "train").batch(TrainConfig().seed, 0, 4, 32)
    logits = model(torch.from_numpy(x[0]).long()).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(y[0]).long().ravel()).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    logged = records(out)[0]
    assert logged["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert logged["clipped"] == (expected > grad_clip)


@pytest.mark.parametrize("tie", [True, False])
def test_fine_tunes_hf_weights_with_another_pad_vocab_to(tie, random_hf, tmp_path, data_dir, capsys):
    """--pad_vocab_to pads the loaded token table (and head) with zero rows: the first loss is transformers'."""
    torch = pytest.importorskip("torch")
    model = random_hf(seed=3, tie=tie, vocab_size=VOCAB, n_positions=32)
    model.save_pretrained(tmp_path / "hf")
    out = tmp_path / "tuned"
    argv = [f"--init_from={tmp_path / 'hf'}", "--pad_vocab_to=96", f"--data={data_dir}", f"--out_dir={out}",
            "--max_iters=1", "--log_interval=1", "--eval_iters=1", "--batch_size=4", "--num_samples=0"]
    assert train.main(argv) == 0, capsys.readouterr()
    cfg, params = checkpoint.load_weights(out)
    assert (cfg.pad_vocab_to, cfg.tie_embeddings, params["wte"].shape[0]) == (96, tie, 288)
    x, y = data.open_split(data_dir, "train").batch(checkpoint.read_meta(out)["train_config"]["seed"], 0, 4, 32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x[0]).long()).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.from_numpy(y[0]).long().ravel())
    assert records(out)[0]["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_a_failure_while_setting_up_the_run_is_one_line(tmp_path, data_dir, monkeypatch, capsys):
    # A process that stops before training (its data missing on its host) makes the others' first cross-process
    # transfer, placing the state on the mesh, fail like this (2 CPU processes, fsdp:8, process 1 given a missing
    # --data: after gloo's 30 s timeout). Unhandled, it was a 50-line traceback.
    gloo = ("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out with key: "
            "cpu:gloo/0/1 and duration: 29.99999995s")

    def place_state(*args, **kwargs):  # as process 0 of 2 sees it
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        raise jax.errors.JaxRuntimeError(gloo)

    monkeypatch.setattr(train.sharding, "create_sharded_state", place_state)
    assert train.main([*MODEL_FLAGS, *RUN_FLAGS, f"--data={data_dir}", f"--out_dir={tmp_path / 'out'}"]) == 1
    assert capsys.readouterr().err == (f"error: setting up the run failed: {gloo}; another process of this run may "
                                       "have stopped: see its log; training did not start\n")


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA GB200", "bfloat16", 2500.0), ("NVIDIA B200", "bfloat16", 2250.0), ("NVIDIA H100 NVL", "bfloat16", 835.0),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.0), ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("AMD Instinct MI300X", "bfloat16", 1307.4), ("TPU v5 lite", "bfloat16", 197.0),
])
def test_peak_flops_takes_the_most_specific_datasheet_row(monkeypatch, kind, dtype, tflops):
    """The first matching name wins, so "gb200" must not be read as "b200", nor "h100 nvl" as "h100"."""
    monkeypatch.setattr(jax, "local_devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    peak, source = peak_flops(ModelConfig.from_preset("tiny", dtype=dtype))
    assert (peak, source) == (tflops * 1e12, f"{kind} datasheet")


def hellaswag_file(path: Path, n: int) -> Path:
    """n lines in the release's format (ctx, endings (4), label and its other fields); endings that differ late."""
    lines = []
    for i in range(n):
        ctx = f"A {['man', 'woman', 'dog', 'child'][i % 4]} {['opens', 'paints', 'carries'][i % 3]} the"
        endings = [f"box and then {word}." for word in ("sits down", "runs away", "naïve smiles", "waves")]
        lines.append(json.dumps({"ind": i, "activity_label": "Test", "ctx": ctx, "endings": endings,
                                 "label": (3 * i) % 4, "split": "val"}, ensure_ascii=i % 2 == 0))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hand_hellaswag(model_cfg: ModelConfig, params, path: Path, n: int) -> tuple[float, float]:
    """(acc, acc_norm) of the first n examples: each candidate a whole unpadded row through GPT2, its ending's
    summed and mean cross entropy from the full log-softmax (llm.c's scoring, without the cache or buckets)."""
    tok = get_tokenizer()
    right, right_norm = 0, 0
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        r = json.loads(line)
        context, losses = tok.encode(r["ctx"]), []
        for ending in r["endings"]:
            cont = tok.encode(" " + ending)
            row = np.array([context + cont])
            logits = GPT2(model_cfg).apply({"params": params}, jnp.asarray(row[:, :-1]))[0, :, :tok.n_vocab]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)
            total = -sum(logp[len(context) - 1 + k, t] for k, t in enumerate(cont))
            losses.append((total, total / len(cont)))
        losses = np.array(losses)
        right += int(np.argmin(losses[:, 0]) == r["label"])
        right_norm += int(np.argmin(losses[:, 1]) == r["label"])
    return right / n, right_norm / n


def test_hellaswag_is_scored_at_every_eval_on_the_params_of_that_step(tmp_path, data_dir, capsys):
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 6)
    out = tmp_path / "run"
    argv = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", f"--out_dir={out}", "--max_iters=4",
            "--eval_interval=2", "--log_interval=2", "--eval_iters=1", "--batch_size=4", "--num_samples=0",
            f"--hellaswag={path}", "--hellaswag_limit=5", "--hellaswag_batch_size=2"]
    assert train.main(argv) == 0, capsys.readouterr()
    evals = [r for r in records(out) if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        model_cfg, params = checkpoint.load_weights(out, r["step"])
        acc, acc_norm = hand_hellaswag(model_cfg, params, path, 5)
        assert (r["hellaswag_acc"], r["hellaswag_acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))
    assert "hellaswag acc" in capsys.readouterr().out
    # --eval_only scores the same examples of the last step's weights
    assert train.main(["--eval_only=true", "--init_from=resume", f"--out_dir={out}", f"--hellaswag={path}",
                       "--hellaswag_limit=5"]) == 0
    assert (f"hellaswag acc {evals[-1]['hellaswag_acc']:.4f}, acc_norm {evals[-1]['hellaswag_acc_norm']:.4f} "
            f"(5 examples of {path})") in capsys.readouterr().out


def test_hellaswag_inputs_are_checked_before_training(tmp_path, data_dir, capsys):
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 3)
    out = tmp_path / "run"
    flags = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", f"--out_dir={out}", "--num_samples=0"]
    assert (f"--hellaswag={tmp_path / 'none.jsonl'}: no such file; expected a HellaSwag JSONL file"
            in main_error(capsys, *flags, f"--hellaswag={tmp_path / 'none.jsonl'}"))
    assert "hellaswag_limit must be >= 0; got -1" in main_error(capsys, *flags, f"--hellaswag={path}",
                                                               "--hellaswag_limit=-1")
    assert ("--hellaswag needs a model with GPT-2's tokenizer's 50257 token ids to score text; this one has "
            f"vocab_size {VOCAB}") in main_error(capsys, *MODEL_FLAGS, *flags[2:], f"--hellaswag={path}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text() + '{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}\n')
    assert f"{bad}:4: label must be an integer 0..3; got 4" in main_error(capsys, *flags, f"--hellaswag={bad}")
    assert not out.exists()  # every refusal came before the run made its out_dir


def test_the_curve_draws_the_hellaswag_scores_of_the_eval_steps(tmp_path, monkeypatch):
    savefig, drawn = Figure.savefig, []

    def kept(fig, path, **kwargs):
        drawn.append(fig)
        savefig(fig, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", kept)
    metrics = Metrics(tmp_path, start_step=0)
    metrics.log({"step": 5, "loss": 3.0, "grad_norm": 1.0})
    metrics.log({"step": 10, "loss": 2.5, "grad_norm": 0.5, "val_loss": 2.6})
    metrics.plot()
    assert len(drawn[-1].axes) == 2  # a run without --hellaswag: loss and grad norm only
    metrics.log({"step": 20, "loss": 2.0, "grad_norm": 0.4, "val_loss": 2.1, "hellaswag_acc": 0.25,
                 "hellaswag_acc_norm": 0.5})
    metrics.plot()
    lines = {line.get_label(): line.get_xydata().tolist() for line in drawn[-1].axes[2].get_lines()}
    assert lines == {"acc": [[20, 0.25]], "acc_norm": [[20, 0.5]]}


def test_hellaswag_is_scored_on_a_mesh_of_the_runs_devices(tmp_path, data_dir, env):
    # Four CPU devices, params split over fsdp: the scores are those of the saved weights, computed here whole.
    path = hellaswag_file(tmp_path / "hellaswag.jsonl", 4)
    mesh_env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    flags = ["--config=tiny", "--vocab_size=50257", f"--data={data_dir}", "--max_iters=2", "--eval_interval=2",
             "--eval_iters=1", "--batch_size=4", "--num_samples=0", "--mesh=data:2,fsdp:2", f"--hellaswag={path}"]
    rc, log = run_train(*flags, "--hellaswag_batch_size=6", out=tmp_path / "odd", env=mesh_env)
    assert rc == 2 and "--hellaswag_batch_size: batch_size 6 must be divisible by data*fsdp = 4" in log, log
    out = tmp_path / "run"
    rc, log = run_train(*flags, out=out, env=mesh_env)  # batches of the global batch_size, 4
    assert rc == 0, log
    (record,) = [r for r in records(out) if "val_loss" in r]
    acc, acc_norm = hand_hellaswag(*checkpoint.load_weights(out, 2), path, 4)
    assert (record["hellaswag_acc"], record["hellaswag_acc_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))


def numpy_update_ratios(old, new, groups):
    """The update:weight norm ratio of each group of flattened parameter names, in float64 numpy."""
    flat_old, flat_new = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (old, new))
    ratios = {}
    for group, member in groups.items():
        keys = [k for k in flat_old if member(jax.tree_util.keystr(k))]
        update = sum(np.sum((np.float64(flat_new[k]) - np.float64(flat_old[k])) ** 2) for k in keys)
        ratios[f"update_ratio/{group}"] = np.sqrt(update / sum(np.sum(np.float64(flat_old[k]) ** 2) for k in keys))
    return ratios


HEALTH_GROUPS = {"wte": lambda k: k.startswith("['wte']"), "wpe": lambda k: k.startswith("['wpe']"),
                 "ln": lambda k: "['ln" in k, "lm_head": lambda k: k.startswith("['lm_head']"),
                 **{f"{a}.{b}": (lambda k, a=a, b=b: f"['{a}']['{b}']" in k)
                    for a, b in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))}}


def test_update_ratios_of_hand_made_params_are_numpys():
    rng = np.random.default_rng(0)
    shapes = {"wte": (5, 4), "wpe": (3, 4), "ln_f": {"weight": (4,), "bias": (4,)}, "lm_head": {"weight": (5, 4)},
              "h": {"ln_1": {"weight": (2, 4)}, "ln_2": {"bias": (2, 4)},
                    "attn": {"c_attn": {"weight": (2, 12, 4), "bias": (2, 12)}, "c_proj": {"weight": (2, 4, 4)}},
                    "mlp": {"c_fc": {"weight": (2, 16, 4)}, "c_proj": {"weight": (2, 4, 16), "bias": (2, 4)}}}}
    old = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                       is_leaf=lambda s: isinstance(s, tuple))
    new = jax.tree.map(lambda a: a + rng.normal(scale=1e-2, size=a.shape).astype(np.float32), old)
    logged = update_ratios(old, new)
    expected = numpy_update_ratios(old, new, HEALTH_GROUPS)
    assert sorted(logged) == sorted(expected)
    for key, value in expected.items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("tie", [True, False])
def test_log_health_logs_the_update_ratios_between_checkpoints(tie, tmp_path, data_dir, capsys):
    """Each eval step's update_ratio/<group> is the norm ratio of the params its step changed, from the checkpoints
    of that step and the one before (every step is an eval and a save)."""
    out = tmp_path / "out"
    argv = [*MODEL_FLAGS, f"--tie_embeddings={str(tie).lower()}", f"--data={data_dir}", f"--out_dir={out}",
            "--log_health=true", "--max_iters=3", "--eval_interval=1", "--eval_iters=1", "--batch_size=4",
            "--num_samples=0", "--keep_checkpoints=3"]
    assert train.main(argv) == 0, capsys.readouterr()
    logged = {r["step"]: r for r in records(out)}
    groups = {g: m for g, m in HEALTH_GROUPS.items() if g != "lm_head" or not tie}
    for step in (2, 3):
        before, after = (checkpoint.load_weights(out, s)[1] for s in (step - 1, step))
        expected = numpy_update_ratios(before, after, groups)
        assert sorted(k for k in logged[step] if k.startswith("update_ratio/")) == sorted(expected)
        for key, value in expected.items():
            assert logged[step][key] == pytest.approx(value, rel=1e-5), (step, key)
