"""Shards (llm.c and nanoGPT formats), text preparation, the bundled corpus, and deterministic batches."""

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_jax import data
from gpt2_jax.tokenizer import get_tokenizer

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


def test_prepare_holds_the_tokens_on_disk_once_plus_one_shard(tmp_path, monkeypatch):
    # The shards are written last to first, each cut off the raw token file once written; a full disk is one line.
    (tmp_path / "t.txt").write_text(" to be or not" * 5)  # 20 tokens + EOT: train shards of 8, 8, 1; val 4
    written, real_write = [], data.write_shard

    def write_shard(path, tokens):
        written.append((Path(path).name, (Path(path).parent / "all.raw").stat().st_size // 2, len(tokens)))
        real_write(path, tokens)

    monkeypatch.setattr(data, "write_shard", write_shard)
    data.prepare([tmp_path / "t.txt"], tmp_path / "out", val_fraction=0.2, shard_tokens=8)
    assert written == [("val_000000.bin", 21, 4), ("train_000002.bin", 17, 1), ("train_000001.bin", 16, 8),
                       ("train_000000.bin", 8, 8)]
    train = data.open_split(tmp_path / "out", "train")
    joined = np.concatenate(train.shards + data.open_split(tmp_path / "out", "val").shards)
    np.testing.assert_array_equal(joined, TO_BE_OR_NOT * 5 + [EOT])

    def disk_full(path, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "write_shard", disk_full)
    with pytest.raises(data.DataError, match=r"the disk of .* is full \(prepare needs about 2 bytes a token"):
        data.prepare([tmp_path / "t.txt"], tmp_path / "full", val_fraction=0.2, shard_tokens=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.txt"]


def test_prepare_errors_name_the_input(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(data.DataError, match=r"bad\.jsonl:2: expected an object with a string field \"text\""):
        data.prepare([tmp_path / "bad.jsonl"], tmp_path / "out")
    with pytest.raises(data.DataError, match="input .*nothing.txt does not exist"):
        data.prepare([tmp_path / "nothing.txt"], tmp_path / "out")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(data.DataError, match="input .*fifo is neither a regular file nor a directory"):
        data.prepare([tmp_path / "fifo"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no input files in .*empty"):
        data.prepare([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "blank.jsonl").write_text('\n  \n{"text": ""}\n')
    with pytest.raises(data.DataError, match="no text in .*blank.jsonl: every document is empty"):
        data.prepare([tmp_path / "blank.jsonl"], tmp_path / "out")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError, match="no text in .*empty.txt: every document is empty"):
        data.prepare([tmp_path / "empty.txt"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def prepared_tokens(out_dir):
    """The tokens of a directory prepared into one train and one val shard, in order."""
    return np.concatenate([data.read_shard(out_dir / f"{split}_000000.bin") for split in ("train", "val")])


def test_bad_text_is_an_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"line one\nline two\ncaf\xe9\n")
    with pytest.raises(data.DataError, match=r"latin1\.txt:3: not UTF-8 text \(invalid continuation byte: byte 0xe9\)"):
        data.prepare([tmp_path / "latin1.txt"], tmp_path / "out")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(data.DataError, match=r"latin1\.jsonl:2: not UTF-8 text"):
        data.prepare([tmp_path / "latin1.jsonl"], tmp_path / "out")
    (tmp_path / "surrogate.jsonl").write_text('{"text": "a"}\n\n{"text": "half an emoji \\ud83d"}\n')
    with pytest.raises(data.DataError, match=r"surrogate\.jsonl:3: \"text\" holds the lone surrogate \\ud83d"):
        data.prepare([tmp_path / "surrogate.jsonl"], tmp_path / "out")
    (tmp_path / "list.jsonl").write_text('{"text": "a"}\n["text"]\n')
    with pytest.raises(data.DataError, match=r"list\.jsonl:2: expected an object with a string field \"text\""):
        data.prepare([tmp_path / "list.jsonl"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_json_is_json_lines_and_archives_are_refused(tmp_path):
    import tarfile
    import zipfile

    (tmp_path / "records.json").write_text('{"text": "Hello world"}\n{"text": "Hello world"}\n')  # to_json's layout
    data.prepare([tmp_path / "records.json"], tmp_path / "out")
    assert prepared_tokens(tmp_path / "out").tolist() == [15496, 995, EOT, 15496, 995, EOT]
    # Not JSON Lines: an error, not its brackets trained on as text.
    (tmp_path / "pretty.json").write_text('[\n  {"text": "Hello world"}\n]\n')
    with pytest.raises(data.DataError, match=r"pretty\.json:1: not valid JSON .*; a \.jsonl or \.json input is "
                                             r"JSON Lines: one \{\"text\": \.\.\.\} object per line"):
        data.prepare([tmp_path / "pretty.json"], tmp_path / "out2")
    (tmp_path / "a.txt").write_text("Hello world")
    with tarfile.open(tmp_path / "corpus.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "a.txt", arcname="a.txt")
    with pytest.raises(data.DataError, match=r"corpus\.tar\.gz is a tar archive; extract it"):
        data.prepare([tmp_path / "corpus.tar.gz"], tmp_path / "out2")
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w") as z:  # stored, not deflated: every byte is ASCII text
        z.write(tmp_path / "a.txt", "a.txt")
    with pytest.raises(data.DataError, match=r"corpus\.zip is a zip archive; extract it"):
        data.prepare([tmp_path / "corpus.zip"], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    (tmp_path / "recipes.txt").write_text("x" * 256 + "custard tart")  # "ustar" where a tar header has it
    data.prepare([tmp_path / "recipes.txt"], tmp_path / "out3")


def test_text_files_are_read_as_open_reads_them_without_the_bom(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PIECE_CHARS", 15)  # file blocks of 15 bytes: the first \r\n spans two of them
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbfHello world\r\n to be\r or not")
    data.prepare([tmp_path / "windows.txt"], tmp_path / "out", val_fraction=0.25)
    tokens = prepared_tokens(tmp_path / "out")
    # "Hello world\n to be\n or not": no byte order mark tokens (171, 119, 123), no "\r" (201)
    np.testing.assert_array_equal(tokens, HELLO_WORLD + [198, 284, 307, 198, 393, 407, EOT])


def test_jsonl_lines_end_only_at_line_feeds(tmp_path):
    # A byte order mark, CRLF line ends, U+2028 and U+0085 unescaped inside strings, and an upper-case suffix.
    lines = ["\ufeff" + json.dumps({"text": "Hello\u2028world"}, ensure_ascii=False),
             json.dumps({"text": "Hello\x85world"}, ensure_ascii=False)]
    (tmp_path / "dump.JSONL").write_bytes("\r\n".join(lines).encode() + b"\r\n")
    summary = data.prepare([tmp_path / "dump.JSONL"], tmp_path / "out", val_fraction=0.2)
    tokens = prepared_tokens(tmp_path / "out")
    hello, world = 15496, 6894  # "Hello", "world"
    assert summary["documents"] == 2
    np.testing.assert_array_equal(tokens, [hello, 447, 101, world, EOT, hello, 126, 227, world, EOT])  # UTF-8 bytes


def test_empty_documents_are_skipped_and_eot_in_text_is_text(tmp_path):
    (tmp_path / "a.txt").write_text("Hello world")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "<|endoftext|>"}) + "\n")
    summary = data.prepare([tmp_path], tmp_path / "out", val_fraction=0.3)
    tokens = prepared_tokens(tmp_path / "out")
    literal = [27, 91, 437, 1659, 5239, 91, 29]  # "<", "|", "end", "of", "text", "|", ">"
    assert summary["documents"] == 2
    np.testing.assert_array_equal(tokens, HELLO_WORLD + [EOT] + literal + [EOT])


def test_long_documents_are_tokenized_in_pieces_with_the_tokens_of_the_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PIECE_CHARS", 16)
    monkeypatch.setattr(data, "_BATCH_CHARS", 64)
    tok = get_tokenizer()
    call_chars, real_encode_batch = [], tok.encode_batch

    def encode_batch(texts, **kwargs):
        call_chars.append(sum(map(len, texts)))
        return real_encode_batch(texts, **kwargs)

    monkeypatch.setattr(tok, "encode_batch", encode_batch)
    # Runs of spaces and newlines, tabs, no-break and ideographic spaces, contractions and digits, around cuts.
    text = "".join(f"Line {i}:  it's\t\tno\u00a0break \u3000 here\n\n  and   there.\n" for i in range(40))
    (tmp_path / "long.txt").write_text(text)
    outs = [data.prepare([tmp_path / "long.txt"], tmp_path / f"out{n}", val_fraction=0.1, num_threads=n)
            for n in (1, 3)]
    tokens = prepared_tokens(tmp_path / "out1")
    np.testing.assert_array_equal(tokens, tok.encode(text) + [EOT])  # tiktoken on the whole text at once
    assert outs[0] == outs[1]
    for name in ("train_000000.bin", "val_000000.bin"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out3" / name).read_bytes()
    assert len(call_chars) > 10 and max(call_chars) <= 64 + 2 * 16  # never the whole document (1,910 characters)


def test_text_without_cuts_is_searched_in_linear_time(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PIECE_CHARS", 16)
    searched, real_search = [], data._SAFE_CUT.search

    class Counting:
        def search(self, text, pos):
            searched.append(len(text) - pos)
            return real_search(text, pos)

    monkeypatch.setattr(data, "_SAFE_CUT", Counting())
    blocks = ["\u4e00\u4e8c\uff0c" * 20] * 200 + [" tail"]  # 12,000 characters with one cut, near the end
    pieces = list(data._pieces(blocks))
    assert "".join(p for p, _ in pieces) == "".join(blocks) and [last for _, last in pieces] == [False, True]
    assert sum(searched) <= 2 * len("".join(blocks))  # each block once, not the whole held text again per block


def test_directories_follow_symbolic_links_once(tmp_path):
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "corpus" / "a" / "x.txt").write_text("Hello world")
    (tmp_path / "elsewhere" / "y.txt").write_text(" to be or not")
    (tmp_path / "corpus" / "b").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "corpus" / "a" / "loop").symlink_to(tmp_path / "corpus")
    files = data.input_files([tmp_path / "corpus"])
    assert [p.relative_to(tmp_path / "corpus").as_posix() for p in files] == ["a/x.txt", "b/y.txt"]
    (tmp_path / "corpus" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(data.DataError, match=r"input .*gone\.txt is a broken symbolic link"):
        data.input_files([tmp_path / "corpus"])


def test_a_directory_that_cannot_be_listed_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "corpus" / "secret").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("Hello world")
    (tmp_path / "corpus" / "secret" / "b.txt").write_text(" to be or not")
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 does for anyone but root
        if os.fspath(path).endswith("secret"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(data.DataError, match=r"input directory .*secret cannot be read \(Permission denied\)"):
        data.prepare([tmp_path / "corpus"], tmp_path / "out")
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
    # A second prepare of the same directory skips the first one's shards (binary, not text).
    again = data.prepare([corpus], corpus / "prepared2", val_fraction=0.25)
    assert again == summary


def test_shard_tokens_must_fit_the_int32_count_of_the_header(tmp_path):
    (tmp_path / "t.txt").write_text("Hello world")
    with pytest.raises(data.DataError, match=r"shard_tokens must be in \[1, 2147483647\]"):
        data.prepare([tmp_path / "t.txt"], tmp_path / "out", shard_tokens=2**31)  # before any tokenizing
    too_many = np.broadcast_to(np.uint16(1), (2**31,))  # no memory: one element seen 2**31 times
    with pytest.raises(data.DataError, match=r"big_train_000000\.bin: 2147483648 tokens do not fit one llm.c shard"):
        data.write_shard(tmp_path / "big_train_000000.bin", too_many)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_output_through_a_symbolic_link_or_onto_a_mount_point(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("Hello world")
    (tmp_path / "big" / "owt").mkdir(parents=True)  # an empty directory on another disk, linked from here
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "owt").symlink_to(tmp_path / "big" / "owt")
    data.prepare([tmp_path / "t.txt"], tmp_path / "data" / "owt", val_fraction=0.3)
    assert prepared_tokens(tmp_path / "data" / "owt").tolist() == HELLO_WORLD + [EOT]
    assert (tmp_path / "data" / "owt").is_symlink() and os.listdir(tmp_path / "data") == ["owt"]
    (tmp_path / "volume").mkdir()  # a docker -v bind mount, a fresh empty disk: renaming onto it fails (EBUSY)
    monkeypatch.setattr(os.path, "ismount", lambda path: os.fspath(path) == str(tmp_path / "volume"))
    with pytest.raises(data.DataError, match=r"output directory .*volume is a mount point.*a new directory inside it"):
        data.prepare([tmp_path / "t.txt"], tmp_path / "volume")


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


def test_interrupted_prepare_leaves_nothing(tmp_path, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text("Hello world")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(get_tokenizer(), "encode_batch", interrupt)
    assert data.main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == f"interrupted: nothing was written to {tmp_path / 'out'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]  # no output, no temporary directory


def test_a_signal_as_the_temporary_directory_is_made_leaves_nothing(tmp_path, monkeypatch):
    # SIGTERM landed inside tempfile.mkdtemp once (in CI), after the directory existed and before prepare had its name.
    (tmp_path / "t.txt").write_text("Hello world")
    mkdir = os.mkdir

    def made_then_interrupted(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if ".tmp-" in os.fspath(path):
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "mkdir", made_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.prepare([tmp_path / "t.txt"], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_stopped_prepare_command_leaves_nothing(tmp_path):
    corpus = (data.SHAKESPEARE_TEXT.read_text() + "\n") * 4  # 20 MB: seconds of tokenizing
    (tmp_path / "big.txt").write_text(corpus)
    run = subprocess.Popen([sys.executable, "-m", "gpt2_jax.data", "prepare", str(tmp_path / "big.txt"),
                            "--out", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    while not list(tmp_path.glob(".out.tmp-*")) and run.poll() is None:
        time.sleep(0.01)
    run.terminate()  # SIGTERM, as a scheduler or `timeout` sends
    assert run.wait(timeout=60) == 130 and "interrupted: nothing was written" in run.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_a_prepare_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path):
    corpus = (data.SHAKESPEARE_TEXT.read_text() + "\n") * 4
    (tmp_path / "big.txt").write_text(corpus)
    run = subprocess.Popen([sys.executable, "-m", "gpt2_jax.data", "prepare", str(tmp_path / "big.txt"),
                            "--out", str(tmp_path / "out")])
    while not list(tmp_path.glob(".out.tmp-*/all.raw")) and run.poll() is None:
        time.sleep(0.01)
    run.kill()  # as the OOM killer does: no cleanup runs
    run.wait(timeout=60)
    left = list(tmp_path.glob(".out.tmp-*"))
    assert len(left) == 1
    other_host = tmp_path / ".out.tmp-another-host-1-abc"  # a shared filesystem: not ours to judge
    live = tmp_path / (data._temporary_prefix(tmp_path / "out", os.getpid()) + "xyz")  # a prepare running here
    other_host.mkdir()
    live.mkdir()
    (tmp_path / "small.txt").write_text("Hello world. " * 50)
    data.prepare([tmp_path / "small.txt"], tmp_path / "out")
    assert not left[0].exists() and other_host.is_dir() and live.is_dir()
    assert data.open_split(tmp_path / "out", "train").n_tokens > 0


def test_a_live_prepare_elsewhere_keeps_its_temporary_directory(tmp_path):
    import fcntl
    import socket

    (tmp_path / "small.txt").write_text("Hello world. " * 50)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a pid that no process of this PID namespace has now
    # Host 'HOST-31337' on a shared filesystem: its name begins as this host's would, and the pid it carries is dead.
    other_host = tmp_path / f".out.tmp-{socket.gethostname()}-31337-{dead}-abcdefgh"
    # A prepare on this host name in another PID namespace (another container): its pid is not ours to see, but
    # it holds its directory's lock.
    other_namespace = tmp_path / (data._temporary_prefix(tmp_path / "out", dead) + "abcdefgh")
    abandoned = tmp_path / (data._temporary_prefix(tmp_path / "out", dead) + "ijklmnop")
    for path in (other_host, other_namespace, abandoned):
        path.mkdir()
    fd = os.open(other_namespace, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data.prepare([tmp_path / "small.txt"], tmp_path / "out")
    finally:
        os.close(fd)
    assert other_host.is_dir() and other_namespace.is_dir() and not abandoned.exists()


def test_a_file_reached_twice_is_read_once(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Hello world")  # [15496, 995]
    (corpus / "b.txt").write_text("Bye")
    (tmp_path / "link.txt").symlink_to(corpus / "a.txt")
    with pytest.warns(UserWarning) as caught:
        summary = data.prepare([corpus, corpus / "a.txt", tmp_path / "link.txt"], tmp_path / "out")
    assert [str(w.message) for w in caught] == [
        f"input {corpus / 'a.txt'} is the same file as {corpus / 'a.txt'}; it is read once",
        f"input {tmp_path / 'link.txt'} is the same file as {corpus / 'a.txt'}; it is read once"]
    assert summary["documents"] == 2  # a.txt and b.txt, each once
    bye = get_tokenizer().encode("Bye")
    tokens = np.concatenate([data.open_split(tmp_path / "out", s).shards[0] for s in ("train", "val")])
    assert tokens.tolist() == [15496, 995, EOT, *bye, EOT]


def test_a_hard_linked_file_is_read_once(tmp_path):
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    (tmp_path / "corpus" / "b").mkdir()
    (tmp_path / "corpus" / "a" / "doc.txt").write_text("Hello world")
    os.link(tmp_path / "corpus" / "a" / "doc.txt", tmp_path / "corpus" / "b" / "doc.txt")  # as cp -al makes
    with pytest.warns(UserWarning, match=r"b/doc\.txt is the same file as .*a/doc\.txt; it is read once"):
        summary = data.prepare([tmp_path / "corpus"], tmp_path / "out", val_fraction=0.3)
    assert summary["documents"] == 1
    assert prepared_tokens(tmp_path / "out").tolist() == HELLO_WORLD + [EOT]


def test_compressed_inputs_are_read_as_their_text(tmp_path):
    import bz2
    import gzip
    import lzma

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt.gz").write_bytes(gzip.compress(b"Hello world"))  # [15496, 995]
    (corpus / "b.jsonl.bz2").write_bytes(bz2.compress(b'{"text": "Bye"}\n{"text": "Hello world"}\n'))
    (corpus / "c.TXT.xz").write_bytes(lzma.compress("caf\u00e9\r\n".encode()))
    summary = data.prepare([corpus], tmp_path / "out")
    assert summary["documents"] == 4
    tokens = np.concatenate([data.open_split(tmp_path / "out", s).shards[0] for s in ("train", "val")])
    encode = get_tokenizer().encode
    assert tokens.tolist() == [15496, 995, EOT, *encode("Bye"), EOT, 15496, 995, EOT, *encode("caf\u00e9\n"), EOT]
    (corpus / "d.txt.gz").write_bytes(gzip.compress(b"x" * 100_000)[:50])  # cut short, as an interrupted copy
    with pytest.raises(data.DataError, match=r"d.txt.gz: not a complete gz file \(Compressed file ended"):
        data.prepare([corpus], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    damaged = bytearray(gzip.compress(b"x" * 100_000))
    damaged[12] ^= 0x55  # the first byte of the deflate stream: zlib reports invalid code lengths
    (corpus / "d.txt.gz").write_bytes(bytes(damaged))
    with pytest.raises(data.DataError, match=r"d.txt.gz: not a complete gz file \(Error -3 while decompressing"):
        data.prepare([corpus], tmp_path / "out3")
    assert not (tmp_path / "out3").exists()


def test_zstd_inputs_are_read_frame_after_frame_and_a_cut_is_an_error(tmp_path, monkeypatch):
    import zstandard

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    long_text = "".join(f"line {i}\n" for i in range(200_000))  # 1.4 MB, 97 KB compressed: two 64 KiB reads
    frames = [zstandard.ZstdCompressor().compress(json.dumps({"text": t}).encode() + b"\n")
              for t in ("Hello world", long_text)]
    (corpus / "pile.jsonl.zst").write_bytes(b"".join(frames))  # two frames, as `cat a.zst b.zst` gives
    summary = data.prepare([corpus], tmp_path / "out")
    assert summary["documents"] == 2
    tokens = np.concatenate([data.open_split(tmp_path / "out", s).shards[0] for s in ("train", "val")])
    assert tokens.tolist()[:3] == [15496, 995, EOT] and len(tokens) == 3 + len(get_tokenizer().encode(long_text)) + 1
    (corpus / "pile.jsonl.zst").write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])  # an interrupted copy
    with pytest.raises(data.DataError, match=r"pile.jsonl.zst: not a complete zst file \(the compressed data ends "):
        data.prepare([corpus], tmp_path / "out2")
    damaged = bytearray(frames[1])
    damaged[4] ^= 0xFF  # the frame header descriptor
    (corpus / "pile.jsonl.zst").write_bytes(bytes(damaged))
    with pytest.raises(data.DataError, match=r"pile.jsonl.zst: not a complete zst file \("):
        data.prepare([corpus], tmp_path / "out3")
    monkeypatch.setitem(sys.modules, "zstandard", None)  # not installed
    with pytest.raises(data.DataError, match=r"pile.jsonl.zst: reading .zst files needs the zstandard package"):
        data.prepare([corpus], tmp_path / "out4")
    assert not any((tmp_path / f"out{i}").exists() for i in (2, 3, 4))


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


def tiktoken_gpt2():
    """tiktoken's r50k_base (GPT-2) built straight from the ranks file in gpt2_jax/assets, not through the project."""
    import base64

    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    lines = (Path(data.__file__).parent / "assets" / "gpt2.tiktoken").read_bytes().split()
    ranks = {base64.b64decode(token): int(rank) for token, rank in zip(lines[::2], lines[1::2])}
    return tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def write_parquet(path, texts, column="text", row_group_size=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), column: texts})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def expected_stream(texts):
    encoding = tiktoken_gpt2()
    return [t for text in texts if text for t in encoding.encode_ordinary(text) + [EOT]]


PARQUET_TEXTS = ["Hello world", "", " to be or not", "Ünïcödé — 日本語 🙂\nnew line", "<|endoftext|> is text",
                 "x" * 5000 + " tail"]


def test_parquet_rows_are_documents_over_several_row_groups(tmp_path):
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "fineweb.parquet", PARQUET_TEXTS, row_group_size=2)
    assert pq.ParquetFile(path).num_row_groups == 3
    summary = data.prepare([path], tmp_path / "out", val_fraction=0.2)
    assert summary["documents"] == 5  # the empty row is skipped, as an empty JSONL document is
    np.testing.assert_array_equal(prepared_tokens(tmp_path / "out"), expected_stream(PARQUET_TEXTS))


def test_parquet_gives_the_shards_of_the_same_jsonl(tmp_path):
    write_parquet(tmp_path / "a.parquet", PARQUET_TEXTS)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in PARQUET_TEXTS))
    data.prepare([tmp_path / "a.parquet"], tmp_path / "from_parquet", shard_tokens=100)
    data.prepare([tmp_path / "a.jsonl"], tmp_path / "from_jsonl", shard_tokens=100)
    names = sorted(p.name for p in (tmp_path / "from_jsonl").glob("*.bin"))
    assert names == sorted(p.name for p in (tmp_path / "from_parquet").glob("*.bin")) and len(names) > 2
    for name in names:
        assert (tmp_path / "from_parquet" / name).read_bytes() == (tmp_path / "from_jsonl" / name).read_bytes()


def test_a_directory_of_parquet_files_and_another_text_column(tmp_path):
    (tmp_path / "fineweb" / "data").mkdir(parents=True)
    write_parquet(tmp_path / "fineweb" / "data" / "001.parquet", PARQUET_TEXTS[3:], column="content")
    write_parquet(tmp_path / "fineweb" / "data" / "000.parquet", PARQUET_TEXTS[:3], column="content")
    assert data.main(["prepare", str(tmp_path / "fineweb"), "--out", str(tmp_path / "out"),
                      "--text_field", "content", "--val_fraction", "0.2"]) == 0
    np.testing.assert_array_equal(prepared_tokens(tmp_path / "out"), expected_stream(PARQUET_TEXTS))


def test_parquet_without_the_column_or_with_nulls_is_an_error_naming_the_file(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "c.parquet", ["Hello world"], column="content")
    assert data.main(["prepare", str(path), "--out", str(tmp_path / "out")]) == 1
    assert f"error: {path} has no column 'text'; its columns are ['id', 'content'] (choose one with --text_field)" \
        in capsys.readouterr().err
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(data.DataError, match=r"null.parquet: row 2 has no 'text' \(null\); expected a string"):
        data.prepare([tmp_path / "null.parquet"], tmp_path / "out")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(data.DataError, match=r"ints.parquet: column 'text' holds int64; expected strings"):
        data.prepare([tmp_path / "ints.parquet"], tmp_path / "out")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match=r"fake.parquet: not a Parquet file \("):
        data.prepare([tmp_path / "fake.parquet"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_jsonl_text_field(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "Hello world"}) + "\n")
    data.prepare([tmp_path / "a.jsonl"], tmp_path / "out", val_fraction=0.3, text_field="content")
    np.testing.assert_array_equal(prepared_tokens(tmp_path / "out"), HELLO_WORLD + [EOT])
    with pytest.raises(data.DataError, match=r"a\.jsonl:1: expected an object with a string field \"body\""):
        data.prepare([tmp_path / "a.jsonl"], tmp_path / "out2", text_field="body")
