"""Checkpoints: weights round trip, full train state, keep policy, unfinished saves, and mismatch errors."""

import asyncio
import re
import shutil
import subprocess
import threading

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gpt2_jax import checkpoint
from gpt2_jax.config import ConfigError, ModelConfig, TrainConfig
from gpt2_jax.model import init_params
from gpt2_jax.training import init_train_state, make_train_step

TINY = ModelConfig.from_preset("tiny")


def assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


TRAIN = TrainConfig(warmup_iters=1)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(TINY, jax.random.PRNGKey(3))


@pytest.fixture(scope="module")
def state():
    """A state two steps in, so its optimizer moments are non-zero and a restore that dropped them would show."""
    state = jax.jit(init_train_state, static_argnums=(0, 1))(TINY, TRAIN, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(TINY, TRAIN))
    x = jax.random.randint(jax.random.PRNGKey(1), (1, 2, 16), 0, TINY.vocab_size)
    for _ in range(2):
        state, _ = step(state, x, jnp.roll(x, -1, axis=-1), jax.random.PRNGKey(2))
    return state


def save_state(directory, state, step=None, val_loss=None, keep=3):
    manager = checkpoint.open_manager(directory, keep=keep)
    if step is not None:
        state = state.replace(step=jnp.int32(step))
    checkpoint.save_train_state(manager, state, {"model_config": TINY.to_dict(), "rng": [0, 7]}, val_loss)
    return manager


def test_save_and_load_weights_round_trip(tmp_path, params):
    checkpoint.save_weights(tmp_path / "w", TINY, params)
    assert checkpoint.is_checkpoint_dir(tmp_path / "w")
    assert not checkpoint.is_checkpoint_dir(tmp_path)
    cfg, loaded = checkpoint.load_weights(tmp_path / "w")
    assert cfg == TINY
    assert_trees_equal(loaded, params)


def test_load_weights_casts_to_the_requested_dtype(tmp_path, params):
    checkpoint.save_weights(tmp_path / "w", TINY, params)
    _, loaded = checkpoint.load_weights(tmp_path / "w", dtype=jnp.bfloat16)
    expected = jax.tree.map(lambda p: np.asarray(p.astype(jnp.bfloat16)), params)
    assert_trees_equal(loaded, expected)


def test_save_weights_refuses_a_directory_that_already_holds_a_checkpoint(tmp_path, params):
    checkpoint.save_weights(tmp_path / "w", TINY, params)
    with pytest.raises(checkpoint.CheckpointError, match="already holds a checkpoint"):
        checkpoint.save_weights(tmp_path / "w", TINY, params)


def test_train_state_round_trip_and_load_weights_of_an_out_dir(tmp_path, state):
    save_state(tmp_path, state, val_loss=5.0).wait_until_finished()
    restored, meta = checkpoint.restore_train_state(tmp_path, TINY, TRAIN)
    assert int(restored.step) == 2 and meta["step"] == 2 and meta["rng"] == [0, 7] and meta["val_loss"] == 5.0
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)
    cfg, params = checkpoint.load_weights(tmp_path)
    assert cfg == TINY
    assert_trees_equal(params, state.params)


def test_train_state_restores_onto_the_shardings_asked_for(tmp_path, state):
    save_state(tmp_path, state).wait_until_finished()
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    # A tree of shardings as sharding.state_shardings gives: here the embed axis of wte split over fsdp.
    split, whole = NamedSharding(mesh, P(None, "fsdp")), NamedSharding(mesh, P())
    shardings = jax.tree.map(lambda _: whole, state)
    shardings = shardings.replace(params=dict(shardings.params, wte=split))
    restored, _ = checkpoint.restore_train_state(tmp_path, TINY, TRAIN, sharding=shardings)
    assert restored.params["wte"].sharding == split and restored.params["wpe"].sharding == whole
    assert restored.step.sharding == whole and int(restored.step) == 2
    assert_trees_equal(restored.params, state.params)
    assert_trees_equal(restored.opt_state, state.opt_state)


def test_keeps_the_last_n_steps_and_the_best_val_loss(tmp_path, state):
    manager = checkpoint.open_manager(tmp_path, keep=2)
    val_losses = {10: 4.0, 20: 3.0, 30: 3.5, 40: None, 50: 3.2}  # None: a Ctrl-C save without an eval
    for step, val in val_losses.items():
        checkpoint.save_train_state(manager, state.replace(step=jnp.int32(step)),
                                    {"model_config": TINY.to_dict()}, val_loss=val)
    manager.wait_until_finished()
    # The last two (40, 50) plus the lowest val loss (20 with 3.0).
    assert checkpoint._steps(tmp_path) == [20, 40, 50]
    assert checkpoint.read_meta(tmp_path, 20)["val_loss"] == 3.0


def test_the_best_val_loss_outlives_a_resume(tmp_path, state):
    # A resumed run opens a new manager: it must know the val loss of the steps saved before it.
    for losses in ({10: 3.0, 20: 4.0}, {30: 5.0, 40: None, 50: 6.0}):
        manager = checkpoint.open_manager(tmp_path, keep=1)
        for step, val in losses.items():
            checkpoint.save_train_state(manager, state.replace(step=jnp.int32(step)),
                                        {"model_config": TINY.to_dict()}, val_loss=val)
        manager.wait_until_finished()
        manager.close()
    assert checkpoint._steps(tmp_path) == [10, 50]
    assert checkpoint.read_meta(tmp_path, 10)["val_loss"] == 3.0


def test_an_unfinished_save_is_ignored_and_then_removed(tmp_path, state):
    save_state(tmp_path, state, step=5).wait_until_finished()
    # What a process killed in the middle of saving step 7 leaves: orbax's temporary directory, never renamed.
    unfinished = tmp_path / "7.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "5", unfinished)
    for f in unfinished.rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0")
    assert checkpoint._steps(tmp_path) == [5]
    restored, meta = checkpoint.restore_train_state(tmp_path, TINY, TRAIN)
    assert meta["step"] == 5
    assert_trees_equal(restored.params, state.params)
    # The next run's manager removes the leftover before its first save.
    save_state(tmp_path, state, step=6).wait_until_finished()
    assert not unfinished.exists()
    assert checkpoint._steps(tmp_path) == [5, 6]


def test_the_space_of_an_unfinished_save_counts_as_free(tmp_path, state, monkeypatch):
    # A run killed (or out of space) while saving leaves orbax's temporary directory; orbax removes it before the
    # next save, so a resume onto a disk that it fills is not refused.
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: real(path)._replace(free=0))
    with pytest.raises(checkpoint.CheckpointError, match="has 0.0 MB free"):
        checkpoint.check_free_space(tmp_path, state)
    unfinished = tmp_path / "7.orbax-checkpoint-tmp-1700000000000000" / "params"
    unfinished.mkdir(parents=True)
    (unfinished / "d").write_bytes(b"\1" * needed)
    checkpoint.check_free_space(tmp_path, state)


def test_no_commit_is_recorded_for_a_copy_inside_another_repository(tmp_path, monkeypatch):
    git = lambda *args: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                                       check=True, capture_output=True)
    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "another project")
    (tmp_path / "vendored" / "gpt2_jax").mkdir(parents=True)  # this package unpacked into that project
    monkeypatch.setattr(checkpoint, "__file__", str(tmp_path / "vendored" / "gpt2_jax" / "checkpoint.py"))
    assert checkpoint.git_commit() is None


@pytest.mark.parametrize("damage", ["truncated params", "no meta", "cut meta", "no params metadata",
                                    "no opt_state metadata", "no opt_state"])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see checkpoint.quiet_failed_io
def test_a_damaged_latest_step_is_named_with_the_older_ones(tmp_path, state, damage):
    manager = save_state(tmp_path, state, step=5)
    checkpoint.save_train_state(manager, state.replace(step=jnp.int32(6)), {"model_config": TINY.to_dict()})
    manager.wait_until_finished()
    if damage == "truncated params":
        for f in (tmp_path / "6" / "params").rglob("*"):
            if f.is_file() and f.parent.name == "d":  # the arrays' data files
                f.write_bytes(f.read_bytes()[:10])
    elif damage == "no opt_state":  # not a weights-only directory (whose advice would be to fine-tune from it)
        shutil.rmtree(tmp_path / "6" / "opt_state")
    elif damage == "no meta":
        shutil.rmtree(tmp_path / "6" / "meta")
    elif damage.endswith("metadata"):  # the tree of names and shapes, read before any array
        (tmp_path / "6" / damage.split()[1] / "_METADATA").unlink()
    else:
        (tmp_path / "6" / "meta" / "metadata").write_text('{"format": "gpt2_jax", "st')
    message = rf"checkpoint {tmp_path}/6 is damaged or incomplete \(.*\); the older complete steps are \[5\]"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.restore_train_state(tmp_path, TINY, TRAIN)
    if not damage.startswith("no opt_state"):  # weights alone do not read the optimizer state
        with pytest.raises(checkpoint.CheckpointError, match=message):
            checkpoint.load_weights(tmp_path)
    restored, meta = checkpoint.restore_train_state(tmp_path, TINY, TRAIN, step=5)  # the older step is whole
    assert meta["step"] == 5


def test_a_saved_config_from_another_version_names_the_checkpoint(tmp_path, state):
    # A key this version does not know would otherwise read as a mistyped --flag.
    manager = save_state(tmp_path, state, step=5)
    checkpoint.save_train_state(manager, state.replace(step=jnp.int32(6)),
                                {"model_config": {**TINY.to_dict(), "rope_theta": 1e4}, "train_config": "?"})
    manager.wait_until_finished()
    message = r"/6: its saved model_config does not fit this version of gpt2_jax \(unknown ModelConfig key\(s\) \['rope"
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_weights(tmp_path)
    manager = save_state(tmp_path / "b", state, step=5)
    checkpoint.save_train_state(manager, state.replace(step=jnp.int32(6)), {"model_config": TINY.to_dict(),
                                                                          "train_config": {"batch_size": "8"}})
    manager.wait_until_finished()
    meta = checkpoint.read_meta(tmp_path / "b")  # weights and their model_config are still readable
    with pytest.raises(checkpoint.CheckpointError, match=r"b/6: its saved train_config does not fit .*batch_size must "
                                                         r"be int; got '8'"):
        checkpoint.saved_config(meta, "train_config", TrainConfig, f"{tmp_path / 'b'}/6")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see checkpoint.quiet_failed_io
def test_a_damaged_step_is_one_short_line_without_tensorstores_spec(tmp_path, state):
    manager = save_state(tmp_path, state, step=5)
    checkpoint.save_train_state(manager, state.replace(step=jnp.int32(6)), {"model_config": TINY.to_dict()})
    manager.wait_until_finished()
    (tmp_path / "6" / "params" / "manifest.ocdbt").unlink()  # the index of the arrays' data files
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.restore_train_state(tmp_path, TINY, TRAIN)
    message = str(raised.value)
    assert re.fullmatch(rf"checkpoint {tmp_path}/6 is damaged or incomplete \(ValueError: .*Metadata at "
                        rf"\"h\..*\" in OCDBT database at local file \"{tmp_path}/6/params/\" does not exist\); "
                        rf"the older complete steps are \[5\]: move {tmp_path}/6 aside to use step 5", message), message
    assert len(message) < 400 + 3 * len(str(tmp_path)), message


def test_another_model_config_is_a_clear_error(tmp_path, state):
    save_state(tmp_path, state).wait_until_finished()
    other = ModelConfig.from_preset("tiny", n_layer=3, n_embd=64)
    with pytest.raises(ConfigError, match=r"n_layer=2 \(this run: 3\), n_embd=32 \(this run: 64\)"):
        checkpoint.restore_train_state(tmp_path, other, TRAIN)
    # Fields that do not change any parameter's shape may differ.
    checkpoint.restore_train_state(tmp_path, ModelConfig.from_preset("tiny", dropout=0.1, remat=True), TRAIN)


def test_a_differently_built_optimizer_state_is_a_clear_error(tmp_path, state):
    save_state(tmp_path, state).wait_until_finished()
    with pytest.raises(checkpoint.CheckpointError, match="opt_state does not match"):
        checkpoint.restore_train_state(tmp_path, TINY, TrainConfig(grad_clip=0.0))


def test_weights_only_directory_cannot_be_resumed(tmp_path, params):
    checkpoint.save_weights(tmp_path, TINY, params)
    with pytest.raises(checkpoint.CheckpointError, match="weights only"):
        checkpoint.restore_train_state(tmp_path, TINY, TrainConfig())


def test_missing_checkpoint_and_missing_step_are_named(tmp_path, params):
    with pytest.raises(checkpoint.CheckpointError, match="holds no complete checkpoint"):
        checkpoint.load_weights(tmp_path)
    checkpoint.save_weights(tmp_path, TINY, params)
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint of step 5; it has steps \[0\]"):
        checkpoint.load_weights(tmp_path, step=5)


def test_saves_are_asynchronous_and_survive_the_next_donated_step(tmp_path, state, monkeypatch):
    # The meta file write waits until the test lets it go: a save that blocked the caller would only
    # return after the wait timed out, with nothing left in progress.
    release = threading.Event()
    write_meta = ocp.JsonCheckpointHandler._save_fn

    async def held_write(self, item, directory):
        await asyncio.to_thread(release.wait, 20)
        await write_meta(self, item, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", held_write)
    expected = jax.tree.map(np.array, state)  # host copies, taken before anything is donated
    live = jax.tree.map(jnp.copy, state)
    manager = save_state(tmp_path, live, step=3)
    assert manager.is_saving_in_progress()
    assert checkpoint._steps(tmp_path) == []  # nothing complete yet
    # The next training step donates the saved buffers and overwrites them while the save is still running.
    step = jax.jit(make_train_step(TINY, TRAIN), donate_argnums=0)
    x = jnp.zeros((1, 2, 16), jnp.int32)
    saved = live
    live, _ = step(live, x, x, jax.random.PRNGKey(5))
    jax.block_until_ready(live)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(saved.params))
    release.set()
    manager.wait_until_finished()
    restored, meta = checkpoint.restore_train_state(tmp_path, TINY, TRAIN)
    assert meta["step"] == 3
    assert_trees_equal(restored.params, expected.params)
    assert_trees_equal(restored.opt_state, expected.opt_state)
