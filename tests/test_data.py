"""Shards (llm.c and nanoGPT formats), text preparation, the bundled corpus, and deterministic batches."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from gpt2_jax import data

EOT = 50256
HELLO_WORLD = [15496, 995]  # GPT-2 ids of "Hello world"
TO_BE_OR_NOT = [284, 307, 393, 407]  # GPT-2 ids of " to be or not"


def test_shard_layout_is_llm_c(tmp_path):
    path = tmp_path / "x_train_000000.bin"
    data.write_shard(path, [1, 2, 65535])
    raw = path.read_bytes()
    assert raw[:1024] == struct.pack("<256i", 20240520, 1, 3, *([0] * 253))
    assert raw[1024:] == struct.pack("<3H", 1, 2, 65535)
    np.testing.assert_array_equal(data.read_shard(path), [1, 2, 65535])


def test_raw_nanogpt_files_are_read(tmp_path):
    np.array([5, 6, 7, 8], np.uint16).tofile(tmp_path / "train.bin")
    np.array([9, 10], np.uint16).tofile(tmp_path / "val.bin")
    np.testing.assert_array_equal(data.open_split(tmp_path, "train").shards[0], [5, 6, 7, 8])
    np.testing.assert_array_equal(data.open_split(tmp_path, "val").shards[0], [9, 10])


def test_corrupt_shards_are_errors_naming_the_file(tmp_path):
    bad_magic = tmp_path / "a_train_000000.bin"
    bad_magic.write_bytes(struct.pack("<256i", 1234, 1, 2, *([0] * 253)) + struct.pack("<2H", 1, 2))
    with pytest.raises(data.DataError, match=r"a_train_000000\.bin: bad magic number 1234"):
        data.read_shard(bad_magic)
    short = tmp_path / "b_train_000000.bin"
    short.write_bytes(struct.pack("<256i", 20240520, 1, 5, *([0] * 253)) + struct.pack("<2H", 1, 2))
    with pytest.raises(data.DataError, match=r"b_train_000000\.bin: header says 5 tokens but the file holds 2"):
        data.read_shard(short)
    headed = tmp_path / "val.bin"  # an llm.c shard under nanoGPT's raw name: its header would be read as tokens
    headed.write_bytes(struct.pack("<256i", 20240520, 1, 2, *([0] * 253)) + struct.pack("<2H", 1, 2))
    with pytest.raises(data.DataError, match=r"val\.bin starts with an llm\.c shard header.*val_000000\.bin"):
        data.read_shard(headed)
    odd = tmp_path / "train.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(data.DataError, match=r"train\.bin: a raw uint16 token file must have an even size"):
        data.read_shard(odd)


def test_missing_split_is_named(tmp_path):
    data.write_shard(tmp_path / "train_000000.bin", [1, 2, 3])
    with pytest.raises(data.DataError, match="no val data in"):
        data.open_split(tmp_path, "val")


def test_prepare_files_directories_and_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Hello world")
    (tmp_path / "docs" / "b.txt").write_text(" to be or not")
    (tmp_path / "more.jsonl").write_text(json.dumps({"text": "Hello world"}) + "\n\n"
                                         + json.dumps({"text": " to be or not", "id": 3}) + "\n")
    summary = data.prepare([tmp_path / "docs", tmp_path / "more.jsonl"], tmp_path / "out", val_fraction=0.25)
    # Four documents, each ending with <|endoftext|>; the last quarter of the 16 tokens is val.
    stream = HELLO_WORLD + [EOT] + TO_BE_OR_NOT + [EOT] + HELLO_WORLD + [EOT] + TO_BE_OR_NOT + [EOT]
    assert summary["documents"] == 4 and summary["train_tokens"] == 12 and summary["val_tokens"] == 4
    np.testing.assert_array_equal(data.read_shard(tmp_path / "out" / "train_000000.bin"), stream[:12])
    np.testing.assert_array_equal(data.read_shard(tmp_path / "out" / "val_000000.bin"), stream[12:])


def test_prepare_splits_into_shards_of_the_given_size(tmp_path):
    (tmp_path / "t.txt").write_text(" to be or not" * 5)  # 20 tokens + EOT
    data.prepare([tmp_path / "t.txt"], tmp_path / "out", val_fraction=0.2, shard_tokens=8)
    train = data.open_split(tmp_path / "out", "train")
    assert [p.name for p in train.paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [len(s) for s in train.shards] == [8, 8, 1]
    joined = np.concatenate(train.shards + data.open_split(tmp_path / "out", "val").shards)
    np.testing.assert_array_equal(joined, TO_BE_OR_NOT * 5 + [EOT])


def test_prepare_errors_name_the_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: expected an object with a string field \"text\""):
        data.prepare([tmp_path / "bad.jsonl"], tmp_path / "out")
    with pytest.raises(data.DataError, match="input .*nothing.txt does not exist"):
        data.prepare([tmp_path / "nothing.txt"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no input files in .*empty"):
        data.prepare([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(data.DataError, match="no documents in .*blank.jsonl"):
        data.prepare([tmp_path / "blank.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_into_its_own_input_directory_reads_only_the_inputs(tmp_path):
    # The output (and prepare's hidden temporary directory beside it) lies inside the input directory.
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("a.txt", "b.txt", ".hidden.txt"):
        (corpus / name).write_text("Hello world")
    summary = data.prepare([corpus], corpus / "prepared", val_fraction=0.25)
    assert summary["documents"] == 2
    assert summary["train_tokens"] + summary["val_tokens"] == 2 * 3  # [15496, 995, EOT] per document


def test_prepare_command_line(tmp_path):
    (tmp_path / "t.txt").write_text("Hello world" * 10)
    run = subprocess.run([sys.executable, "-m", "gpt2_jax.data", "prepare", str(tmp_path / "t.txt"),
                          "--out", str(tmp_path / "out"), "--val_fraction", "0.5"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "1 documents: 11 train and 10 val tokens" in run.stdout
    again = subprocess.run([sys.executable, "-m", "gpt2_jax.data", "prepare", str(tmp_path / "t.txt"),
                            "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert again.returncode == 1 and "is not empty" in again.stderr
    onto_a_file = subprocess.run([sys.executable, "-m", "gpt2_jax.data", "prepare", str(tmp_path / "t.txt"),
                                  "--out", str(tmp_path / "t.txt")], capture_output=True, text=True)
    assert onto_a_file.returncode == 1 and f"output directory {tmp_path / 't.txt'} is a file" in onto_a_file.stderr


def test_bundled_shakespeare_is_prepared_on_first_use(tmp_path):
    out = data.shakespeare(tmp_path / "prepared")
    train, val = data.open_split(out, "train"), data.open_split(out, "val")
    total = 1_566_041 + 1  # the corpus's GPT-2 token count, plus the closing <|endoftext|>
    assert train.n_tokens + val.n_tokens == total
    assert val.n_tokens == round(total * 0.1)
    assert val.shards[0][-1] == EOT and train.shard_max()[0] < EOT
    assert data.shakespeare(tmp_path / "prepared") == out  # second use: nothing to do


def make_counting_shards(tmp_path):
    """Two shards whose token at global position i is i, so a window's values give its offset."""
    data.write_shard(tmp_path / "train_000000.bin", np.arange(0, 300))
    data.write_shard(tmp_path / "train_000001.bin", np.arange(1000, 1100))
    return data.open_split(tmp_path, "train")


def test_batches_are_windows_with_labels_shifted_by_one(tmp_path):
    split = make_counting_shards(tmp_path)
    x, y = split.batch(seed=1, index=0, batch_size=64, block_size=16, accum=3)
    assert x.shape == y.shape == (3, 64, 16) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(y[..., :-1], x[..., 1:])
    rows = np.concatenate([x, y[..., -1:]], axis=-1).reshape(-1, 17)
    # Every row is 17 consecutive tokens from one shard (never across the boundary between shards).
    np.testing.assert_array_equal(rows - rows[:, :1], np.broadcast_to(np.arange(17), rows.shape))
    assert np.all((rows[:, -1] < 300) | (rows[:, 0] >= 1000))
    assert (rows[:, 0] < 300).any() and (rows[:, 0] >= 1000).any()


def test_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    split = make_counting_shards(tmp_path)
    again = data.open_split(tmp_path, "train")

    def draw(s, seed=1, index=5):
        return s.batch(seed, index, batch_size=8, block_size=16)[0]

    np.testing.assert_array_equal(draw(split), draw(again))
    assert not np.array_equal(draw(split), draw(split, index=6))
    assert not np.array_equal(draw(split), draw(split, seed=2))


def test_processes_read_their_rows_of_the_same_global_batch(tmp_path):
    split = make_counting_shards(tmp_path)
    whole_x, whole_y = split.batch(1, 5, batch_size=8, block_size=16, accum=2)
    halves = [split.batch(1, 5, batch_size=8, block_size=16, accum=2, rows=slice(i, i + 4)) for i in (0, 4)]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves], axis=1), whole_x)
    np.testing.assert_array_equal(np.concatenate([h[1] for h in halves], axis=1), whole_y)
    # The draw is numpy's default generator seeded with (stream, seed, step): rebuild row 6 of micro-batch 1.
    starts = np.random.default_rng([0, 1, 5]).integers(0, 284 + 84, size=(2, 8))
    start = starts[1, 6]
    first = start if start < 284 else 1000 + start - 284
    np.testing.assert_array_equal(halves[1][0][1, 2], np.arange(first, first + 16))
    with pytest.raises(data.DataError, match="select no row of a batch of 8"):
        split.batch(1, 5, batch_size=8, block_size=16, rows=slice(8, 12))


def test_check_rejects_tokens_outside_the_vocabulary_and_short_data(tmp_path):
    split = make_counting_shards(tmp_path)
    split.check(vocab_size=1100, block_size=64)
    with pytest.raises(data.DataError, match=r"train_000001\.bin: token id 1099 is outside .*vocab_size 1000"):
        split.check(vocab_size=1000, block_size=64)
    with pytest.raises(data.DataError, match="no train shard holds more than block_size=300 tokens"):
        split.check(vocab_size=1100, block_size=300)
