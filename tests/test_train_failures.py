"""train.main's failure paths in-process: flags and config files, Ctrl-C, out of memory, disk full, logs that cannot
be written, divergence, and what a resume checks."""

import json
import os
import re
import shutil
import types
from pathlib import Path

import jax
import pytest

import train
from conftest import MODEL_FLAGS, RUN_FLAGS, main_error, records, resolve
from gpt2_jax import checkpoint, run_config
from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.metrics import Figure, Metrics
from gpt2_jax.run import Run, lock_out_dir


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.json").write_text('{"preset": "tiny", "n_layer": 3, "max_iters": 5, "learning_rate": 1}')
    model_cfg, train_cfg, params = resolve([f"--config={tmp_path / 'run.json'}", "--max_iters=7",
                                                  "--dtype=bfloat16", "--block_size=16", f"--out_dir={tmp_path}"])
    assert model_cfg == ModelConfig.from_preset("tiny", n_layer=3, dtype="bfloat16", block_size=16)
    assert (train_cfg.max_iters, train_cfg.learning_rate, params) == (7, 1.0, None)
    (tmp_path / "plain.json").write_text('{"n_layer": 3}')  # no "preset": the default one
    model_cfg, _, _ = resolve([f"--config={tmp_path / 'plain.json'}", f"--out_dir={tmp_path}"])
    assert model_cfg == ModelConfig.from_preset(run_config.DEFAULT_PRESET, n_layer=3)


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
