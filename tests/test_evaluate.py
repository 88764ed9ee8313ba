"""HellaSwag scoring against transformers' GPT2LMHeadModel on the same random weights, and its input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import host_devices
from gpt2_jax import convert, evaluate
from gpt2_jax.tokenizer import get_tokenizer

VOCAB = 50257  # GPT-2's tokenizer: the model must have its ids
SUBJECTS = ["A man", "The chef", "Zoë", "A cat named Ünal", "Das Mädchen", "東京の学生", "Her dog 🐕", "Two kids"]
ACTIONS = ["is kneeling on a roof", "pours batter into a pan", "opens the café door", "sits by the window",
           "läuft über die Straße", "は駅に向かって", "chases a ball", "are building a fort"]


def synthetic_lines(n: int = 20) -> list[str]:
    """n lines in the release's format: endings that differ only in their last word, Unicode, one long ending."""
    lines = []
    for i in range(n):
        stem = f"then {['walks', 'turns', 'smiles', 'waits'][i % 4]} slowly towards the"
        endings = [f"{stem} {word}." for word in ("door", "garden", "naïve crowd", "red box")]
        if i % 5 == 0:  # a much longer ending than its siblings
            endings[i % 4] += " After that, everyone in the room claps loudly and the music starts again."
        ctx = f"{SUBJECTS[i % 8]} {ACTIONS[(i * 3) % 8]}. {SUBJECTS[(i + 1) % 8]}"
        lines.append(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                 "endings": endings, "label": i % 4, "split": "val", "source_id": f"s{i}"},
                                ensure_ascii=i % 2 == 0))
    return lines


def torch_losses(model, lines: list[str]) -> np.ndarray:
    """[N, 4] summed cross entropy of each ending's tokens, one unpadded candidate at a time (llm.c's scoring)."""
    tok = get_tokenizer()
    out = []
    for line in lines:
        r = json.loads(line)
        context = tok.encode(r["ctx"])
        row = []
        for ending in r["endings"]:
            cont = tok.encode(" " + ending)
            ids = torch.tensor([context + cont])
            with torch.no_grad():
                logits = model(ids).logits[0, len(context) - 1:-1].double()
            row.append(torch.nn.functional.cross_entropy(logits, torch.tensor(cont), reduction="sum").item())
        out.append(row)
    return np.array(out)


@pytest.fixture
def hf_dir(tmp_path, random_hf):
    model = random_hf(seed=3, vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2, std=0.2)
    model.save_pretrained(tmp_path / "hf")
    return model, tmp_path / "hf"


def test_losses_and_picks_match_transformers(tmp_path, hf_dir, capsys):
    model, path = hf_dir
    lines = synthetic_lines()
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg, params = convert.load(path)
    examples, skipped = evaluate.read_hellaswag(data, cfg.block_size)
    assert len(examples) == 20 and skipped == []
    loss_N4, count_N4 = evaluate.candidate_losses(cfg, params, examples, batch_size=3)  # 7 batches, the last short
    expected_N4 = torch_losses(model, lines)
    np.testing.assert_allclose(loss_N4, expected_N4, rtol=1e-5, atol=1e-5)
    labels = np.arange(20) % 4
    acc = np.mean(np.argmin(expected_N4, 1) == labels)
    acc_norm = np.mean(np.argmin(expected_N4 / count_N4, 1) == labels)
    assert (np.argmin(loss_N4, 1) == np.argmin(expected_N4, 1)).all()
    assert (np.argmin(loss_N4 / count_N4, 1) == np.argmin(expected_N4 / count_N4, 1)).all()
    assert len(set(np.argmin(expected_N4, 1))) > 1  # the picks are not all the same candidate

    assert evaluate.main(["hellaswag", f"--init_from={path}", f"--data={data}", "--batch_size=4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["acc"], result["acc_norm"], result["n"], result["skipped"]) == (acc, acc_norm, 20, 0)
    assert result["seconds"] > 0


def test_untied_head_matches_transformers(tmp_path, random_hf):
    model = random_hf(seed=4, tie=False, vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2, std=0.2)
    model.save_pretrained(tmp_path / "hf")
    lines = synthetic_lines(5)
    (tmp_path / "val.jsonl").write_text("\n".join(lines))
    cfg, params = convert.load(tmp_path / "hf")
    assert not cfg.tie_embeddings
    examples, _ = evaluate.read_hellaswag(tmp_path / "val.jsonl", cfg.block_size)
    loss_N4, _ = evaluate.candidate_losses(cfg, params, examples, batch_size=2)
    np.testing.assert_allclose(loss_N4, torch_losses(model, lines), rtol=1e-5, atol=1e-5)


BAD = {
    "missing": ({"ctx": "A man", "endings": ["a", "b", "c", "d"]}, "missing field(s) label"),
    "label": ({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}, "label must be an integer 0..3; got 4"),
    "endings": ({"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}, "endings must be a list of 4 strings"),
    "long": ({"ctx": "word " * 70, "endings": ["a", "b", "c", "d"], "label": 1},
             "context + ending is 72 tokens, more than the model's block_size 64"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_line_is_an_error_naming_it_or_a_counted_skip(tmp_path, kind):
    record, message = BAD[kind]
    lines = synthetic_lines(3)
    lines.insert(2, json.dumps(record))  # line 3
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(lines))
    with pytest.raises(ValueError) as e:
        evaluate.read_hellaswag(data, block_size=64)
    assert str(e.value).startswith(f"{data}:3: {message}")
    examples, skipped = evaluate.read_hellaswag(data, block_size=64, skip_bad=True)
    assert [ex.line for ex in examples] == [1, 2, 4] and len(skipped) == 1 and skipped[0].startswith(f"{data}:3: ")


def test_cli_errors_and_skips(tmp_path, hf_dir, capsys):
    _, path = hf_dir
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(synthetic_lines(2) + ["{not json", ""]))
    assert evaluate.main(["hellaswag", f"--init_from={path}", f"--data={data}"]) == 1
    assert capsys.readouterr().err == (f"error: {data}:3: not valid JSON (Expecting property name enclosed in "
                                       "double quotes at column 2) (--skip_bad skips such lines)\n")
    assert evaluate.main(["hellaswag", f"--init_from={path}", f"--data={data}", "--skip_bad", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[-1])["skipped"] == 1 and f"skipped: {data}:3:" in captured.err
    assert evaluate.main(["hellaswag", f"--init_from={tmp_path / 'nothing'}", f"--data={data}"]) == 1
    assert "no such weights file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["hellaswag", f"--init_from={path}", f"--data={data}", "--batch_size=0"])
    assert "--batch_size: must be an integer >= 1; got 0" in capsys.readouterr().err


MESH_SCRIPT = """
import json, sys
from gpt2_jax import convert, evaluate, sharding
path, data = sys.argv[1:]
cfg, params = convert.load(path)
mesh = sharding.make_mesh("data:2,tensor:2")
examples, _ = evaluate.read_hellaswag(data, cfg.block_size)
losses, _ = evaluate.candidate_losses(cfg, sharding.shard_params(cfg, params, mesh), examples, 2, mesh)
assert evaluate.main(["hellaswag", "--init_from=" + path, "--data=" + data, "--mesh=fsdp:4", "--batch_size=4"]) == 0
print(json.dumps(losses.tolist()))
"""


def test_mesh_gives_the_same_losses(tmp_path, hf_dir):
    _, path = hf_dir
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(synthetic_lines(6)))
    env = host_devices(dict(os.environ, JAX_PLATFORMS="cpu"), 4)
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(path), str(data)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cfg, params = convert.load(path)
    examples, _ = evaluate.read_hellaswag(data, cfg.block_size)
    plain = evaluate.hellaswag(cfg, params, examples, batch_size=2)
    assert f"acc {plain['acc']:.4f} acc_norm {plain['acc_norm']:.4f} n 6" in done.stdout
    expected, _ = evaluate.candidate_losses(cfg, params, examples, batch_size=2)
    np.testing.assert_allclose(json.loads(done.stdout.splitlines()[-1]), expected, rtol=1e-5, atol=1e-5)
