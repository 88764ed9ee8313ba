"""sample.py end to end on a tiny checkpoint: JSONL output, bad lines, --resume, streaming, stop strings, flags."""

import json
import os
import re
import shutil

import jax
import pytest

import sample
from conftest import host_devices, process_environ
from gpt2_jax import checkpoint
from gpt2_jax.batch_sampling import TextStream, sample_key
from gpt2_jax.config import ModelConfig
from gpt2_jax.huge_pages import huge_pages_env
from gpt2_jax.model import init_params
from gpt2_jax.sampling import Sampler, generate_batch
from gpt2_jax.tokenizer import get_tokenizer

FIELDS = {"id", "sample", "prompt", "completion", "prompt_tokens", "completion_tokens", "finish_reason", "settings"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = ModelConfig.from_preset("tiny")  # block_size 64, the GPT-2 vocabulary
    params = init_params(cfg, jax.random.PRNGKey(0))
    path = tmp_path_factory.mktemp("ckpt") / "weights"
    checkpoint.save_weights(path, cfg, params)
    return cfg, params, str(path)


def reference(cfg, params, text, prompt_id, k=0, seed=1337, n=12, temperature=0.8, top_k=200, top_p=1.0):
    """What one sample should be: the library call with the key sample.py documents, decoded by hand."""
    tokens = get_tokenizer().encode(text, allow_special=True)
    done = generate_batch(cfg, params, [tokens], [sample_key(seed, prompt_id, k)], max_new_tokens=n,
                          sampler=Sampler(temperature, top_k, top_p))[0]
    return get_tokenizer().decode(done.tokens), done


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_file_with_bad_lines_writes_the_good_ones(model, tmp_path, capsys):
    cfg, params, ckpt = model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": "ROMEO:", "id": "r"}),
        "{not json",
        json.dumps({"text": "no prompt field"}),
        json.dumps({"prompt": ""}),
        json.dumps({"prompt": "word " * 60}),
        json.dumps({"prompt": "Hello there", "id": 7}),
        json.dumps({"prompt": "again", "id": "r"}),
        json.dumps({"prompt": "a longer prompt of several words to sort last"}),
    ]) + "\n")
    with prompts.open("ab") as f:
        f.write(b'{"prompt": "caf\xe9"}\n')  # Latin-1, not UTF-8
    out = tmp_path / "out.jsonl"
    code = sample.main([f"--init_from={ckpt}", f"--prompts_file={prompts}", f"--out={out}", "--max_new_tokens=12",
                        "--batch_size=2"])
    err = capsys.readouterr().err
    assert code == 1
    for line, what in [(2, "not valid JSON"), (3, "expected a JSON object with a string 'prompt' field"),
                       (4, "empty prompt"),
                       (5, "prompt has 61 tokens; with --max_new_tokens=12 that exceeds block_size 64"),
                       (7, "id 'r' is already used on line 1"), (9, "not valid UTF-8 (byte 0xe9 at column 16)")]:
        assert f"prompts.jsonl:{line}: {what}" in err
    rows = read_jsonl(out)
    assert sorted(str(r["id"]) for r in rows) == ["7", "8", "r"]
    for r in rows:
        assert set(r) == FIELDS
        text, done = reference(cfg, params, r["prompt"], r["id"])
        assert (r["completion"], r["completion_tokens"], r["finish_reason"]) == (text, len(done.tokens), "length")


def test_prompt_with_tokens_outside_a_small_vocabulary_is_named(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny", vocab_size=256)  # GPT-2's tokenizer, a model with only 256 token ids
    path = tmp_path / "weights"
    checkpoint.save_weights(path, cfg, init_params(cfg, jax.random.PRNGKey(0)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nHello\n")  # "a" is token 64; "Hello" is 15496 (a known GPT-2 id)
    out = tmp_path / "out.jsonl"
    code = sample.main([f"--init_from={path}", f"--prompts_file={prompts}", f"--out={out}", "--max_new_tokens=4"])
    assert code == 1
    assert "prompts.txt:2: prompt has token id 15496, outside the model's vocabulary of 256" in capsys.readouterr().err
    assert [r["prompt"] for r in read_jsonl(out)] == ["a"]


def test_resume_finishes_an_interrupted_file_without_duplicates(model, tmp_path, capsys):
    _, _, ckpt = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i} {'x ' * i}\n" for i in range(7)))
    flags = [f"--init_from={ckpt}", f"--prompts_file={prompts}", "--max_new_tokens=6", "--num_samples=2",
             "--batch_size=4"]
    full = tmp_path / "full.jsonl"
    assert sample.main(flags + [f"--out={full}"]) == 0
    complete = full.read_text().splitlines(keepends=True)
    assert len(complete) == 14
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(complete[:5]) + complete[5][:17])  # killed while writing the sixth line
    with pytest.raises(SystemExit):  # the file exists: refused without --resume
        sample.main(flags + [f"--out={cut}"])
    assert "pass --resume" in capsys.readouterr().err
    assert sample.main(flags + [f"--out={cut}", "--resume"]) == 0
    resumed = read_jsonl(cut)
    assert len(resumed) == 14
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(resumed, key=key) == sorted(read_jsonl(full), key=key)
    capsys.readouterr()
    assert sample.main(flags + [f"--out={cut}", "--resume"]) == 0  # once more: nothing left to make
    assert capsys.readouterr().err == f"every sample is already in {cut}: nothing to do\n"
    assert read_jsonl(cut) == resumed


OUT_OF_MEMORY = "RESOURCE_EXHAUSTED: Out of memory allocating 825017348840 bytes."  # what XLA:CPU raises


@pytest.mark.parametrize("failure, status, message", [
    (jax.errors.JaxRuntimeError(OUT_OF_MEMORY), 1,
     "error: sampling failed: RESOURCE_EXHAUSTED: Out of memory allocating 825017348840 bytes; a batch does not fit in "
     "device memory: lower --batch_size (or --max_new_tokens); the samples written to {out} are kept: add --resume "
     "to make the rest\n"),
    (KeyboardInterrupt(), 130,  # Ctrl-C
     "error: interrupted; the samples written to {out} are kept: add --resume to make the rest\n"),
])
def test_a_run_that_fails_or_is_interrupted_keeps_the_finished_samples_for_resume(model, tmp_path, capsys,
                                                                                  monkeypatch, failure, status,
                                                                                  message):
    _, _, ckpt = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    flags = [f"--init_from={ckpt}", f"--prompts_file={prompts}", "--max_new_tokens=4", "--batch_size=2"]
    full = tmp_path / "full.jsonl"
    assert sample.main(flags + [f"--out={full}"]) == 0

    class FailsAfterTwoSamples(sample.Engine):
        def run(self, requests):
            for i, done in enumerate(super().run(requests)):
                if i == 2:
                    raise failure
                yield done

    monkeypatch.setattr(sample, "Engine", FailsAfterTwoSamples)
    out = tmp_path / "out.jsonl"
    assert sample.main(flags + [f"--out={out}"]) == status
    err = capsys.readouterr().err
    assert err[err.index("error: "):] == message.format(out=out)
    assert read_jsonl(out) == read_jsonl(full)[:2]  # each sample written as it finished, in the same order
    monkeypatch.undo()
    assert sample.main(flags + [f"--out={out}", "--resume"]) == 0
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert sorted(read_jsonl(out), key=key) == sorted(read_jsonl(full), key=key)


def test_the_default_length_fits_a_short_context(model, tmp_path):
    # README's `sample.py --init_from=out --prompt="ROMEO:"` on a model of block_size 64 (train.py's default model
    # has 128): the default of 200 new tokens would not fit, so the default is block_size // 2.
    cfg, params, ckpt = model
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={ckpt}", "--prompt=ROMEO:", "--temperature=0", f"--out={out}"]) == 0
    [line] = read_jsonl(out)
    text, done = reference(cfg, params, "ROMEO:", 0, n=32, temperature=0)
    assert line["settings"]["max_new_tokens"] == 32 and line["completion"] == text
    assert line["completion_tokens"] == len(done.tokens)


def test_single_prompt_streams_the_completion(model, capsys):
    cfg, params, ckpt = model
    prompt = "Caf\u00e9 \U0001F642 says"
    assert sample.main([f"--init_from={ckpt}", f"--prompt={prompt}", "--max_new_tokens=12", "--seed=3"]) == 0
    text, _ = reference(cfg, params, prompt, 0, seed=3)
    assert capsys.readouterr().out == prompt + text + "\n" + "-" * 60 + "\n"


def test_single_prompt_prints_tokens_while_decoding(model, monkeypatch):
    _, _, ckpt = model
    printed, returned = [], []  # each print, and whether generate_batch had already returned then
    original = sample.generate_batch

    def generate_then_mark(*args, **kwargs):
        out = original(*args, **kwargs)
        returned.append(True)
        return out

    monkeypatch.setattr(sample, "generate_batch", generate_then_mark)
    monkeypatch.setattr(sample, "print", lambda *a, **k: printed.append((bool(returned), a)), raising=False)
    assert sample.main([f"--init_from={ckpt}", "--prompt=ROMEO:", "--max_new_tokens=12", "--seed=3"]) == 0
    during = [a for was_done, a in printed if not was_done]
    assert len(during) == 1 + 12  # the prompt, then one print per decoded token before the call returned


def test_stop_string_cuts_the_completion(model, tmp_path):
    cfg, params, ckpt = model
    text, done = reference(cfg, params, "ROMEO:", 1, n=30, temperature=0.0)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    prompts = tmp_path / "p.txt"
    prompts.write_text("ROMEO:\n")
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={ckpt}", f"--prompts_file={prompts}", f"--out={out}", "--max_new_tokens=30",
                        "--temperature=0", f"--stop={stop}"]) == 0
    [row] = read_jsonl(out)
    assert row["finish_reason"] == "stop" and row["completion"] == text[:text.find(stop)]
    n = row["completion_tokens"]
    assert stop in get_tokenizer().decode(done.tokens[:n]) and stop not in get_tokenizer().decode(done.tokens[:n - 1])


def test_text_stream_holds_back_partial_utf8_and_stop_strings():
    tok = get_tokenizer()
    text = "na\u00efve \U0001F642 end"
    tokens = tok.encode(text)
    assert b"\xf0\x9f\x99\x82" not in [tok.decode_bytes([t]) for t in tokens]  # the emoji is split across tokens
    stream = TextStream([])
    assert "".join(stream.feed(t) for t in tokens) + stream.flush() == text
    stream = TextStream(["\U0001F642 e"])
    pieces = [stream.feed(t) for t in tokens]
    assert "".join(pieces) + stream.flush() == "na\u00efve "
    assert "\ufffd" not in "".join(pieces)


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "argument --temperature: must be a finite number >= 0"),
    ("--temperature=inf", "argument --temperature: must be a finite number >= 0"),
    ("--top_p=0", "argument --top_p: must be a number in (0, 1]"),
    ("--top_p=1.5", "argument --top_p: must be a number in (0, 1]"),
    ("--top_k=-1", "argument --top_k: must be an integer >= 0"),
    ("--num_samples=0", "argument --num_samples: must be an integer >= 1"),
    ("--logprobs=21", "argument --logprobs: must be an integer in [0, 20]; got 21"),
    ("--seed=-1", "argument --seed: must be an integer in [0, 2**32)"),
    (f"--seed={2**32}", "argument --seed: must be an integer in [0, 2**32)"),
    ("--out=/nonexistent-dir/x.jsonl", "--out /nonexistent-dir/x.jsonl: the directory /nonexistent-dir does not exist"),
])
def test_bad_flags_are_named(model, flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([f"--init_from={model[2]}", "--prompt=hi", flag])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_weights_and_empty_prompt_are_clear(model, tmp_path, capsys):
    assert sample.main([f"--init_from={tmp_path / 'nope'}", "--prompt=hi"]) == 1
    assert f"--init_from: no such weights file or directory: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert sample.main(["--init_from=gpt2", "--prompt=hi"]) == 1  # OpenAI's name: where to get the weights
    assert "download model.safetensors and config.json from https://huggingface.co/openai-community/gpt2 " in (
        capsys.readouterr().err)
    assert sample.main([f"--init_from={model[2]}/5", "--prompt=hi"]) == 1  # a step the out_dir lacks: its steps
    assert f"{model[2]} has no checkpoint of step 5; it has steps [0]" in capsys.readouterr().err
    assert sample.main([f"--init_from={model[2]}", "--prompt=", "--max_new_tokens=4"]) == 1
    assert "--prompt: empty prompt" in capsys.readouterr().err
    for path, why in ((tmp_path / "nope.txt", "No such file or directory"), (tmp_path, "Is a directory")):
        assert sample.main([f"--init_from={model[2]}", f"--prompts_file={path}", "--max_new_tokens=4"]) == 1
        assert capsys.readouterr().err == f"error: --prompts_file {path}: {why}\n"


def test_mesh_sharded_weights_sample_the_same_tokens(model, tmp_path, capsys):
    """--mesh=fsdp:8 on 8 simulated CPU devices (a subprocess: the flag must precede jax) equals one device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    cfg, params, ckpt = model
    flags = ["--init_from", ckpt, "--prompt", "ROMEO:", "--temperature", "0", "--max_new_tokens", "12"]
    assert sample.main(flags + ["--out", str(tmp_path / "one.jsonl")]) == 0
    env = host_devices(os.environ, 8)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "sample.py"), *flags, "--mesh", "fsdp:8",
                           "--out", str(tmp_path / "eight.jsonl")], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    one, eight = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "eight.jsonl")
    assert one[0]["completion_tokens"] == 12 and one == eight
    assert "ROMEO:" + one[0]["completion"] in proc.stdout
    capsys.readouterr()
    assert sample.main(flags + ["--mesh", "data:3"]) == 1  # here, on this process's one device
    assert "needs 3 devices but there are 1" in capsys.readouterr().err


def test_bf16_top_k_top_p_samples_do_not_depend_on_the_batch_size(model, tmp_path):
    cfg, params, ckpt = model
    prompts = tmp_path / "prompts.jsonl"
    texts = ["To be", "or not", "to be, that is the question", "Whether", "'tis nobler in the mind to suffer"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    flags = [f"--init_from={ckpt}", f"--prompts_file={prompts}", "--max_new_tokens=10", "--dtype=bfloat16",
             "--temperature=0.9", "--top_k=40", "--top_p=0.9", "--seed=7"]
    outs = {}
    for batch in (2, 5):
        out = tmp_path / f"b{batch}.jsonl"
        assert sample.main(flags + [f"--batch_size={batch}", f"--out={out}"]) == 0
        outs[batch] = sorted(read_jsonl(out), key=lambda r: r["id"])
    assert outs[2] == outs[5] and len(outs[2]) == len(texts)
    # Each line is what the library gives for that prompt alone, with the bf16 weights and the documented key.
    bf16 = ModelConfig.from_preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree.map(lambda a: a.astype("bfloat16"), params)
    for line, text in zip(outs[2], texts):
        completion, done = reference(bf16, bf16_params, text, line["id"], seed=7, n=10, temperature=0.9, top_k=40,
                                     top_p=0.9)
        assert (line["completion"], line["completion_tokens"], line["finish_reason"]) == (
            completion, len(done.tokens), done.finish_reason)


def test_padded_vocabulary_samples_only_ids_the_tokenizer_has(tmp_path, capsys):
    from test_sampling import favour_ids_from, random_params

    from gpt2_jax.sampling import restrict_vocab

    cfg = ModelConfig.from_preset("tiny", vocab_size=50304)  # nanoGPT's padded vocabulary
    params = favour_ids_from(cfg, random_params(cfg, seed=12), 50257)  # ids >= 50257 get almost all the mass
    path = tmp_path / "weights"
    checkpoint.save_weights(path, cfg, params)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nHello there\n")
    out = tmp_path / "out.jsonl"
    flags = [f"--init_from={path}", "--max_new_tokens=6", "--temperature=1", "--top_k=0"]
    assert sample.main(flags + [f"--prompts_file={prompts}", f"--out={out}"]) == 0
    small = restrict_vocab(cfg, 50257)
    for r in read_jsonl(out):
        text, done = reference(small, params, r["prompt"], r["id"], n=6, temperature=1.0, top_k=0)
        assert (r["completion"], r["completion_tokens"]) == (text, 6)
    capsys.readouterr()
    assert sample.main(flags + ["--prompt=ROMEO:"]) == 0  # streamed token by token
    assert capsys.readouterr().out.startswith("ROMEO:" + reference(small, params, "ROMEO:", 0, n=6, top_k=0,
                                                                   temperature=1.0)[0])


def test_prompts_that_cannot_be_written_as_utf8_are_named_and_skipped(model, tmp_path, capsys):
    _, _, ckpt = model
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "\ud800 lone"}, {"prompt": "fine", "id": "ok"}, {"prompt": "x", "id": "bad \udfff"}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))  # JSON escapes: valid UTF-8 bytes
    out = tmp_path / "out.jsonl"
    flags = [f"--init_from={ckpt}", "--max_new_tokens=4"]
    assert sample.main(flags + [f"--prompts_file={prompts}", f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert "prompts.jsonl:1: prompt cannot be written as UTF-8: lone surrogate U+D800 at character 1" in err
    assert "prompts.jsonl:3: 'id' cannot be written as UTF-8: lone surrogate U+DFFF at character 5" in err
    assert [r["id"] for r in read_jsonl(out)] == ["ok"]
    # A Latin-1 command line: Python passes the byte 0xe9 as U+DCE9.
    assert sample.main(flags + ["--prompt=caf\udce9", f"--out={tmp_path / 'one.jsonl'}"]) == 1
    assert ("--prompt: prompt cannot be written as UTF-8: lone surrogate U+DCE9 at character 4, from the byte "
            "0xe9 that is not UTF-8") in capsys.readouterr().err
    assert (tmp_path / "one.jsonl").read_text() == ""


def test_empty_prompts_file_is_an_error(model, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert sample.main([f"--init_from={model[2]}", f"--prompts_file={tmp_path / 'empty.txt'}",
                        "--max_new_tokens=4"]) == 1
    assert f"--prompts_file {tmp_path / 'empty.txt'}: no prompts (the file is empty)" in capsys.readouterr().err


def test_prompt_of_block_size_tokens_gets_one_new_token(model, capsys):
    cfg, params, ckpt = model
    text = "a" + " a" * 63
    assert len(get_tokenizer().encode(text)) == cfg.block_size == 64
    flags = [f"--init_from={ckpt}", f"--prompt={text}", "--temperature=0"]
    assert sample.main(flags + ["--max_new_tokens=1"]) == 0
    assert capsys.readouterr().out.startswith(text + reference(cfg, params, text, 0, n=1, temperature=0.0)[0])
    assert sample.main(flags + ["--max_new_tokens=2"]) == 1
    assert "--prompt: prompt has 64 tokens; with --max_new_tokens=2 that exceeds block_size 64" in \
        capsys.readouterr().err


def test_n_head_flag_reads_a_bare_safetensors_file(model, tmp_path, capsys):
    from gpt2_jax import convert

    cfg, params, _ = model
    convert.export_hf(cfg, params, tmp_path / "hf")
    bare = tmp_path / "bare"
    bare.mkdir()
    (tmp_path / "hf" / "model.safetensors").rename(bare / "model.safetensors")  # no config JSON beside it
    flags = [f"--init_from={bare / 'model.safetensors'}", "--prompt=ROMEO:", "--temperature=0",
             "--max_new_tokens=8"]
    assert sample.main(flags) == 1
    assert "pass n_head= (--n_head) or put a config JSON beside the weights" in capsys.readouterr().err
    assert sample.main(flags + ["--n_head=2"]) == 0
    expected = "ROMEO:" + reference(cfg, params, "ROMEO:", 0, n=8, temperature=0.0)[0]
    assert capsys.readouterr().out.startswith(expected)


def test_byte_order_mark_crlf_and_blank_lines_are_not_prompts(model, tmp_path, capsys):
    cfg, params, ckpt = model
    jsonl = tmp_path / "prompts.JSONL"  # a Windows editor's file: BOM, CRLF, an upper-case suffix, blank lines
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "Hello", "id": "a"}\r\n\r\n  \r\n{"prompt": "World"}\r\n\r\n')
    text = tmp_path / "prompts.txt"
    text.write_bytes(b"\xef\xbb\xbfHello\r\n\r\nWorld\r\n \n")
    flags = [f"--init_from={ckpt}", "--max_new_tokens=4"]
    for path, ids in ((jsonl, ["a", 4]), (text, [1, 3])):
        out = tmp_path / f"{path.suffix}.out.jsonl"
        assert sample.main(flags + [f"--prompts_file={path}", f"--out={out}"]) == 0, capsys.readouterr().err
        rows = read_jsonl(out)
        assert [(r["id"], r["prompt"], r["prompt_tokens"]) for r in rows] == [(ids[0], "Hello", 1),
                                                                              (ids[1], "World", 1)]
        for r in rows:
            assert r["completion"] == reference(cfg, params, r["prompt"], r["id"], n=4)[0]
    (tmp_path / "blank.txt").write_text("\n \n\t\n")
    assert sample.main(flags + [f"--prompts_file={tmp_path / 'blank.txt'}"]) == 1
    assert f"--prompts_file {tmp_path / 'blank.txt'}: no prompts (the file is blank)" in capsys.readouterr().err


def test_a_jsonl_line_s_own_settings_replace_the_flags_and_other_fields_are_named(model, tmp_path, capsys):
    cfg, params, ckpt = model
    greedy = {"prompt": "Hello", "id": "a", "max_new_tokens": 7, "temperature": 0}
    text = reference(cfg, params, "ROMEO:", "d", n=20, temperature=0)[0]
    stop = text[len(text) // 2: len(text) // 2 + 3]  # a stop string the greedy completion reaches
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        greedy,
        {"prompt": "World", "id": "b"},
        {"prompt": "Again", "id": "c", "seed": 5, "n": 2, "top_k": 10, "top_p": 0.9, "source": "web"},
        {"prompt": "ROMEO:", "id": "d", "temperature": 0, "max_new_tokens": 20, "stop": ["\u2603\u2603", stop]},
    ]) + "\n")
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={ckpt}", f"--prompts_file={prompts}", f"--out={out}",
                        "--max_new_tokens=4"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {prompts}: ignored: \"source\" (line 3). A line's fields are 'prompt', 'id' and "
                        "its own settings: max_new_tokens, temperature, top_k, top_p, stop, seed, n"]
    rows = {(r["id"], r["sample"]): r for r in read_jsonl(out)}
    assert sorted(rows) == [("a", 0), ("b", 0), ("c", 0), ("c", 1), ("d", 0)]
    # The greedy line, run next to sampled ones, is what a greedy run of it alone gives.
    alone = tmp_path / "alone.jsonl"
    assert sample.main([f"--init_from={ckpt}", "--prompt=Hello", "--temperature=0", "--max_new_tokens=7",
                        f"--out={alone}"]) == 0
    [single] = read_jsonl(alone)
    assert rows["a", 0]["completion"] == single["completion"] and rows["a", 0]["completion_tokens"] == 7
    assert rows["a", 0]["settings"] == dict(single["settings"], max_new_tokens=7, temperature=0.0)
    assert rows["b", 0]["completion"] == reference(cfg, params, "World", "b", n=4)[0]
    for k in (0, 1):
        assert rows["c", k]["completion"] == reference(cfg, params, "Again", "c", k, seed=5, n=4, top_k=10,
                                                       top_p=0.9)[0]
        assert {key: rows["c", k]["settings"][key] for key in ("seed", "top_k", "top_p")} == {
            "seed": 5, "top_k": 10, "top_p": 0.9}
    assert rows["d", 0]["completion"] == text[:text.find(stop)] and rows["d", 0]["finish_reason"] == "stop"
    assert rows["d", 0]["settings"]["stop"] == ["\u2603\u2603", stop]
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Hello", "id": "a"}) + "\n")
    assert sample.main([f"--init_from={ckpt}", f"--prompts_file={plain}", "--max_new_tokens=2"]) == 0
    assert "warning" not in capsys.readouterr().err
    array = tmp_path / "array.json"
    array.write_text('[\n  {"prompt": "Hello"},\n  {"prompt": "World"}\n]\n')
    assert sample.main([f"--init_from={ckpt}", f"--prompts_file={array}"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f'error: --prompts_file {array} holds a JSON array; a .jsonl or .json prompts file is JSON Lines: one '
        '{"prompt": ...} object per line']


def test_resume_refuses_other_settings_and_ids_that_name_other_prompts(model, tmp_path, capsys):
    _, _, ckpt = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\nB\n")
    flags = [f"--init_from={ckpt}", "--max_new_tokens=4"]
    out = tmp_path / "out.jsonl"
    assert sample.main(flags + [f"--prompts_file={prompts}", f"--out={out}", "--seed=1", "--stop=\n"]) == 0
    before = out.read_bytes()
    made_with = read_jsonl(out)[0]["settings"]
    assert re.fullmatch("[0-9a-f]{16}", made_with.pop("weights"))
    assert made_with == {"seed": 1, "temperature": 0.8, "top_k": 200, "top_p": 1.0, "max_new_tokens": 4,
                         "stop": ["\n"], "sliding_window": False, "dtype": "float32", "logprobs": None, "echo": False}
    capsys.readouterr()
    resume = flags + [f"--prompts_file={prompts}", f"--out={out}", "--resume"]
    assert sample.main(resume + ["--seed=2", "--max_new_tokens=5"]) == 1
    assert capsys.readouterr().err == (f"error: --resume: {out}:1 was made with --max_new_tokens=4 --seed=1 --stop="
                                       '["\\n"]; this run gives id 1 --max_new_tokens=5 --seed=2 --stop=[] (use '
                                       "those settings, or choose another --out)\n")
    assert out.read_bytes() == before
    prompts.write_text("new first line\nA\nB\n")  # every id (a line number) now names another prompt
    assert sample.main(resume + ["--seed=1", "--stop=\n"]) == 1
    assert (f'error: --resume: {out}:1 has id 1 for the prompt "A"; this run gives it "new first line" (choose '
            "another --out)") in capsys.readouterr().err
    assert out.read_bytes() == before
    prompts.write_text("A\nB\n")
    assert sample.main(resume + ["--seed=1", "--stop=\n", "--num_samples=2"]) == 0  # more samples: allowed
    assert sorted((r["id"], r["sample"]) for r in read_jsonl(out)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    jsonl = tmp_path / "prompts.jsonl"  # a line's own settings are what its lines must match
    jsonl.write_text(json.dumps({"prompt": "A", "id": "a", "temperature": 0}) + "\n")
    own = tmp_path / "own.jsonl"
    assert sample.main(flags + [f"--prompts_file={jsonl}", f"--out={own}"]) == 0
    jsonl.write_text(json.dumps({"prompt": "A", "id": "a", "temperature": 0.5, "n": 2}) + "\n")
    capsys.readouterr()
    assert sample.main(flags + [f"--prompts_file={jsonl}", f"--out={own}", "--resume"]) == 1
    assert capsys.readouterr().err == (f"error: --resume: {own}:1 was made with --temperature=0.0; this run gives id "
                                       "'a' --temperature=0.5 (use those settings, or choose another --out)\n")
    one = tmp_path / "one.jsonl"
    assert sample.main(flags + ["--prompt=Hello", f"--out={one}"]) == 0
    assert sample.main(flags + ["--prompt=Bye", f"--out={one}", "--resume"]) == 1  # --prompt is always id 0
    assert 'has id 0 for the prompt "Hello"; this run gives it "Bye"' in capsys.readouterr().err


def test_resume_refuses_other_weights_but_follows_moved_ones(model, tmp_path, capsys):
    cfg, params, ckpt = model
    moved = tmp_path / "moved"
    shutil.copytree(ckpt, moved)
    other = tmp_path / "other"
    checkpoint.save_weights(other, cfg, jax.tree.map(lambda a: a.at[(0,) * a.ndim].add(1e-3), params))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\nB\n")
    out = tmp_path / "out.jsonl"
    flags = ["--max_new_tokens=4", f"--prompts_file={prompts}", f"--out={out}"]
    assert sample.main([f"--init_from={ckpt}", "--num_samples=1"] + flags) == 0
    before = out.read_bytes()
    assert sample.main([f"--init_from={other}", "--num_samples=2", "--resume"] + flags) == 1
    err = capsys.readouterr().err
    assert f"error: --resume: {out}:1 was made from other weights (SHA-256 " in err
    assert f"--init_from {other} gives " in err and out.read_bytes() == before
    assert sample.main([f"--init_from={moved}", "--num_samples=2", "--resume"] + flags) == 0  # same weights
    assert sorted((r["id"], r["sample"]) for r in read_jsonl(out)) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    older = tmp_path / "older.jsonl"  # as sample.py wrote it before settings held the weights' digest
    lines = read_jsonl(out)
    older.write_text("".join(json.dumps(dict(r, settings={k: v for k, v in r["settings"].items() if k != "weights"}))
                             + "\n" for r in lines))
    flags[-1] = f"--out={older}"
    capsys.readouterr()
    assert sample.main([f"--init_from={ckpt}", "--num_samples=3", "--resume"] + flags) == 1
    assert capsys.readouterr().err == (f"error: --resume: {older}:1 has no SHA-256 of its weights (an earlier "
                                       "sample.py wrote it), so this run cannot tell whether --init_from holds "
                                       "them: choose another --out\n")


def test_nan_logits_end_the_sample_with_an_error_and_a_nonfinite_line(model, tmp_path, capsys):
    cfg, params, _ = model
    path = tmp_path / "broken"
    checkpoint.save_weights(path, cfg, dict(params, wpe=params["wpe"].at[4].set(float("nan"))))
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={path}", "--prompt=Hello there", f"--out={out}", "--max_new_tokens=5",
                        "--dtype=float16"]) == 1
    line = read_jsonl(out)[0]  # "Hello there" is 2 tokens: positions 2 and 3 are drawn before position 4 fails
    assert (line["finish_reason"], line["completion_tokens"]) == ("nonfinite", 3)
    assert ("error: prompt 0 sample 0: the model's logits became NaN or infinite after 3 new tokens, so the "
            "sample stops there; float16 overflows past 65504: try --dtype=bfloat16") in capsys.readouterr().err


def test_resume_leaves_a_file_it_did_not_write_unchanged(model, tmp_path, capsys):
    _, _, ckpt = model
    flags = [f"--init_from={ckpt}", "--max_new_tokens=4", "--resume"]
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"id": 0, "sample": 0}\nsomething important')
    assert sample.main(flags + ["--prompt=hi", f"--out={notes}"]) == 1
    assert "ends in a line without a line break that this script did not begin" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"A\nB")
    with pytest.raises(SystemExit) as e:
        sample.main(flags + [f"--prompts_file={prompts}", f"--out={prompts}"])
    assert e.value.code == 2 and f"--out {prompts} is the --prompts_file" in capsys.readouterr().err
    assert (notes.read_bytes(), prompts.read_bytes()) == (b'{"id": 0, "sample": 0}\nsomething important', b"A\nB")


def test_out_that_cannot_be_written_is_one_line(model, tmp_path, capsys):
    flags = [f"--init_from={model[2]}", "--prompt=hi", "--max_new_tokens=2"]
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            sample.main(flags + [f"--out={tmp_path}"] + resume)
        assert e.value.code == 2 and f"--out {tmp_path} is a directory" in capsys.readouterr().err
    assert sample.main(flags + ["--out=/proc/samples.jsonl"]) == 1  # /proc takes no new files, not even root's
    assert capsys.readouterr().err.endswith(
        "error: --out /proc/samples.jsonl: cannot append to it (No such file or directory)\n")


def test_max_new_tokens_beyond_block_size_is_one_error_unless_sliding_window(model, tmp_path, capsys):
    cfg, params, ckpt = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("A\nB\nC\n")
    flags = [f"--init_from={ckpt}", f"--prompts_file={prompts}", "--max_new_tokens=65", "--temperature=0"]
    assert sample.main(flags) == 1
    assert capsys.readouterr().err == ("error: --max_new_tokens=65 is more than the model's block_size 64 (lower it, "
                                       "or pass --sliding_window)\n")
    out = tmp_path / "out.jsonl"
    assert sample.main(flags + ["--sliding_window", f"--out={out}"]) == 0
    for r in read_jsonl(out):
        key = sample_key(1337, r["id"], 0)
        done = generate_batch(cfg, params, [get_tokenizer().encode(r["prompt"])], [key], max_new_tokens=65,
                              sampler=Sampler(0.0), sliding_window=True)[0]
        assert (r["completion"], r["completion_tokens"]) == (get_tokenizer().decode(done.tokens), len(done.tokens))


def test_sample_keys_of_different_ids_differ():
    import zlib

    def key_data(*args):
        return jax.random.key_data(sample_key(*args)).tolist()

    assert zlib.crc32(b"plumless") == zlib.crc32(b"buckeroo")  # a known CRC-32 collision
    ids = [7, "7", "plumless", "buckeroo", 0, "", "caf\u00e9"]
    keys = [key_data(1337, i, 0) for i in ids]
    assert len({tuple(k) for k in keys}) == len(ids)
    assert key_data(1337, 7, 1) != key_data(1337, 7, 0) != key_data(1338, 7, 0)
    assert key_data(1337, "7", 0) == keys[1]


def test_stdout_closed_early_ends_quietly(model, tmp_path):
    """`sample.py ... | head -c 20`: no traceback, from the batch writer nor from the streaming callback inside XLA."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(20)))
    out = tmp_path / "one.jsonl"
    # 20 bytes: the first batch's line, with 19 batches to go; 2 bytes: the prompt, printed before decoding starts.
    for source, n in (([f"--prompts_file={prompts}", "--batch_size=1"], 20), (["--prompt=hi", f"--out={out}"], 2)):
        proc = subprocess.Popen([sys.executable, str(root / "sample.py"), f"--init_from={model[2]}",
                                 "--max_new_tokens=60", *source], cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert len(proc.stdout.read(n)) == n
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait() == 1 and "Traceback" not in err and "error" not in err, err
    assert read_jsonl(out)[0]["completion_tokens"] == 60  # the sample is in --out all the same



def test_bad_settings_of_a_line_name_the_line_and_the_others_run(model, tmp_path, capsys):
    _, _, ckpt = model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "fine", "id": "ok", "max_new_tokens": 3},
        {"prompt": "A", "temperature": -1},
        {"prompt": "B", "top_k": 1.5},
        {"prompt": "C", "top_p": "0.9"},
        {"prompt": "D", "n": 0},
        {"prompt": "E", "stop": ["x", ""]},
        {"prompt": "F", "seed": 2**32},
        {"prompt": "G", "max_new_tokens": True},
        {"prompt": "word " * 30, "max_new_tokens": 40},  # 31 tokens + 40 - 1 > block_size 64
    ]))
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={ckpt}", f"--prompts_file={prompts}", f"--out={out}",
                        "--max_new_tokens=4"]) == 1
    err = capsys.readouterr().err
    for line, what in [(2, "'temperature' must be a finite number >= 0 (0 = greedy); got -1"),
                       (3, "'top_k' must be an integer >= 0 (0 = off); got 1.5"),
                       (4, "'top_p' must be a number in (0, 1] (1 = off); got \"0.9\""),
                       (5, "'n' must be an integer >= 1; got 0"),
                       (6, "'stop' must be a non-empty string or a list of them; got [\"x\", \"\"]"),
                       (7, f"'seed' must be an integer in [0, 2**32); got {2**32}"),
                       (8, "'max_new_tokens' must be an integer >= 1; got true"),
                       (9, "prompt has 31 tokens; with this line's max_new_tokens=40 that exceeds block_size 64")]:
        assert f"prompts.jsonl:{line}: {what}" in err
    assert "8 prompt(s) skipped" in err
    assert [(r["id"], r["completion_tokens"]) for r in read_jsonl(out)] == [("ok", 3)]


def test_logprobs_and_echo_match_transformers(model, tmp_path):
    """--logprobs=5 --echo against transformers' log-softmax of its logits for the same weights (exported)."""
    import numpy as np
    import torch
    import transformers

    from gpt2_jax import convert

    cfg, params, ckpt = model
    convert.export_hf(cfg, params, tmp_path / "hf")
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    prompt = "na\u00efve \u2603 \U0001F99C end"  # the snowman and the parrot are split across byte-level tokens
    out = tmp_path / "out.jsonl"
    assert sample.main([f"--init_from={ckpt}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=6",
                        "--logprobs=5", "--echo", f"--out={out}"]) == 0
    [line] = read_jsonl(out)
    lp = line["logprobs"]
    tok = get_tokenizer()
    prompt_ids = tok.encode(prompt)
    ids = lp["token_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) == len(prompt_ids) + 6
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0].float()
    reference_lp = torch.log_softmax(logits, dim=-1).numpy()
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["top_token_ids"][0] is None
    for i in range(1, len(ids)):
        row = reference_lp[i - 1]
        np.testing.assert_allclose(lp["token_logprobs"][i], row[ids[i]], atol=2e-4)
        top = lp["top_token_ids"][i]
        values = list(lp["top_logprobs"][i].values())
        assert len(top) == 5 and values == sorted(values, reverse=True)
        np.testing.assert_allclose(values, row[top], atol=2e-4)
        assert min(values) >= np.sort(row)[-5] - 2e-4  # the 5 most likely, up to rounding ties
        if i >= len(prompt_ids):  # greedy: each new token is the most likely one
            assert ids[i] == top[0]
    # b" \xe2\x98" b"\x83" (the snowman), b" \xf0\x9f" b"\xa6" b"\x9c" (the parrot): not whole UTF-8 characters,
    # so written as OpenAI does, every byte escaped
    assert lp["tokens"][:len(prompt_ids)] == ["na", "\u00efve", "bytes:\\x20\\xe2\\x98", "bytes:\\x83",
                                              "bytes:\\x20\\xf0\\x9f", "bytes:\\xa6", "bytes:\\x9c", " end"]
    assert lp["text_offset"][:len(prompt_ids)] == [0, 2, 5, 6, 7, 8, 8, 9]  # where its text begins (a space first)
    assert line["completion"].startswith(prompt) and len(line["completion"]) > len(prompt)
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][-1] < len(line["completion"])
    whole = [i for i in range(len(ids)) if not lp["tokens"][i].startswith("bytes:")]
    for i in whole:  # a token that is whole characters sits at its text_offset in the text
        assert line["completion"][lp["text_offset"][i]:].startswith(lp["tokens"][i])


def test_resume_after_kill_9_writes_every_sample_once(model, tmp_path):
    """kill -9 in the middle of a 200-prompt run, then --resume: the same (id, sample) set and texts as a run that
    was never interrupted, nothing twice."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    _, _, ckpt = model
    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{'word ' * (i % 17)}prompt {i}\n" for i in range(200)))
    flags = [f"--init_from={ckpt}", f"--prompts_file={prompts}", "--temperature=0", "--max_new_tokens=5",
             "--batch_size=8"]
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(root / "sample.py"), *flags, f"--out={killed}"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while (not killed.exists() or killed.read_bytes().count(b"\n") < 40) and proc.poll() is None:
        assert time.monotonic() < deadline, "no 40 samples written in 120 s"
        time.sleep(0.05)
    # sample.py re-executed itself with malloc on huge pages where it can (same pid: the kill below reaches it)
    assert process_environ(proc.pid).get("GLIBC_TUNABLES") == (huge_pages_env(os.environ) or os.environ).get(
        "GLIBC_TUNABLES")
    proc.kill()  # SIGKILL: no handler runs, possibly mid-line
    assert proc.wait() == -9, proc.stderr.read().decode()
    written = killed.read_bytes().count(b"\n")
    assert 40 <= written < 200
    assert sample.main(flags + [f"--out={killed}", "--resume"]) == 0
    full = tmp_path / "full.jsonl"
    assert sample.main(flags + [f"--out={full}"]) == 0
    resumed, uninterrupted = read_jsonl(killed), read_jsonl(full)
    key = lambda r: (r["id"], r["sample"])  # noqa: E731
    assert len(resumed) == len({key(r) for r in resumed}) == 200
    assert sorted(resumed, key=key) == sorted(uninterrupted, key=key)
