"""compare: the same weights in JAX and PyTorch, a clean run and a run with one block perturbed."""

import json

import pytest

from gpt2_jax import compare, convert
from gpt2_jax.config import ModelConfig, replace
from gpt2_jax.tokenizer import get_tokenizer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

VOCAB = 50257  # compare runs GPT-2 tokens of real text
REQUIRED_KEYS = {"max_abs_logit_diff", "mean_abs_logit_diff", "loss_jax", "loss_torch", "per_layer_max_abs_diff",
                 "greedy_agree_steps"}


def test_json_report_on_hf_directory(random_hf, torch_logits, tmp_path, capsys):
    model = random_hf(seed=20, vocab_size=VOCAB)
    model.save_pretrained(tmp_path / "hf")
    text = "The quick brown fox jumps over the lazy dog, and then it runs far away."
    (tmp_path / "prompt.txt").write_text(text)
    code = compare.main([str(tmp_path / "hf"), "--json", "--steps", "5", "--text", str(tmp_path / "prompt.txt")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and REQUIRED_KEYS <= set(report)
    assert report["max_abs_logit_diff"] <= 1e-4 and report["mean_abs_logit_diff"] <= report["max_abs_logit_diff"]
    assert len(report["per_layer_max_abs_diff"]) == 2 and max(report["per_layer_max_abs_diff"]) <= 1e-4
    assert report["first_layer_beyond_tolerance"] is None and report["greedy_agree_steps"] == 5
    assert report["torch_model"] == "transformers.GPT2LMHeadModel"
    tokens = get_tokenizer().encode(text)
    logits = torch.from_numpy(torch_logits(model, [tokens])[0, :-1])
    loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:])))
    assert report["n_tokens"] == len(tokens)
    assert abs(report["loss_torch"] - loss) < 1e-5 and abs(report["loss_jax"] - loss) < 1e-4


def test_perturbed_block_is_named_and_exit_status_is_1(random_reference, tmp_path, capsys):
    model, ref_cfg = random_reference(seed=21, vocab_size=VOCAB, n_layers=3)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(ref_cfg))
    state = model.state_dict()
    state["trf_blocks.1.feedforward.layers.2.bias"] += 0.01  # shifts the residual stream from block 1 on
    (tmp_path / "changed").mkdir()
    torch.save(state, tmp_path / "changed" / "model.pt")
    (tmp_path / "changed" / "model.json").write_text(json.dumps(ref_cfg))
    report = compare.compare(tmp_path / "model.pt", against=tmp_path / "changed" / "model.pt", steps=2)
    assert report["torch_model"] == "torch_ref.ReferenceGPT"
    assert report["first_layer_beyond_tolerance"] == 1 and not report["within_tolerance"]
    assert report["per_layer_max_abs_diff"][0] <= 1e-5
    assert report["per_layer_max_abs_diff"][1] == pytest.approx(0.01, rel=1e-3)
    assert compare.main([str(tmp_path / "model.pt"), "--against", str(tmp_path / "changed" / "model.pt"),
                         "--steps", "2"]) == 1
    out = capsys.readouterr().out
    assert "first block beyond tolerance: 1" in out and "FAIL" in out


def test_nanogpt_llmc_and_orbax_are_within_tolerance(random_nanogpt, tmp_path):
    model, args = random_nanogpt(seed=22, vocab_size=VOCAB, bias=False)
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    report = compare.compare(tmp_path / "ckpt.pt", steps=3)
    assert report["torch_model"] == "torch_ref.NanoGPT"
    assert report["within_tolerance"] and report["greedy_agree_steps"] == 3

    cfg, params = convert.load(tmp_path / "ckpt.pt")
    tanh_cfg = replace(cfg, activation="gelu_tanh")  # llm.c's GELU; the missing biases are written as zeros
    convert.export_llmc(tanh_cfg, params, tmp_path / "model.bin")
    report = compare.compare(tmp_path / "model.bin", steps=3)
    assert report["torch_model"] == "transformers.GPT2LMHeadModel (after export)"
    assert report["within_tolerance"] and report["greedy_agree_steps"] == 3

    convert.save(tanh_cfg, params, tmp_path / "orbax")
    report = compare.compare(tmp_path / "orbax", steps=3, against=tmp_path / "model.bin")
    assert report["within_tolerance"] and report["max_abs_logit_diff"] <= 1e-5
    step, = (p for p in (tmp_path / "orbax").iterdir() if p.name.isdigit())  # out/STEP, as for the best val loss
    report = compare.compare(step, steps=3)
    assert report["torch_model"] == "transformers.GPT2LMHeadModel (after export)" and report["within_tolerance"]


def test_wrapped_state_dict_and_short_config_json_are_compared_with_their_own_weights(random_hf, tmp_path):
    """transformers' from_pretrained would initialise these at random, silently: the torch side must hold the
    file's own tensors."""
    model = random_hf(seed=23, vocab_size=VOCAB)
    (tmp_path / "wrapped").mkdir()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # a torch.compile'd model's keys
    torch.save({"state_dict": state}, tmp_path / "wrapped" / "model.pt")
    model.config.to_json_file(tmp_path / "wrapped" / "config.json")
    model.save_pretrained(tmp_path / "short")
    (tmp_path / "short" / "config.json").write_text(json.dumps({"n_head": 2}))  # the rest from the tensors
    for src in (tmp_path / "wrapped" / "model.pt", tmp_path / "short"):
        report = compare.compare(src, steps=3)
        assert report["torch_model"] == "transformers.GPT2LMHeadModel"
        assert report["within_tolerance"] and report["greedy_agree_steps"] == 3, src


def test_text_longer_than_a_file_name_is_text(tmp_path):
    text = "word " * 60  # 300 characters: too long for a file name (ENAMETOOLONG)
    tokens = compare.text_tokens(ModelConfig.from_preset("tiny"), text, steps=1)
    assert tokens.tolist() == get_tokenizer().encode(text)


def test_text_that_names_a_binary_file_or_a_directory_is_an_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00\xd0\xff")
    with pytest.raises(ValueError, match=r"--text file .*weights\.bin is not UTF-8 text \(invalid continuation byte"):
        compare.text_tokens(ModelConfig.from_preset("tiny"), str(tmp_path / "weights.bin"), steps=1)
    with pytest.raises(ValueError, match=r"--text .* is a directory; give a text or a UTF-8 text file"):
        compare.text_tokens(ModelConfig.from_preset("tiny"), str(tmp_path), steps=1)


def test_against_a_model_of_another_shape_and_nan_atol_are_one_line_errors(random_hf, tmp_path, capsys):
    random_hf(seed=24, vocab_size=VOCAB).save_pretrained(tmp_path / "hf")
    random_hf(seed=25, vocab_size=300).save_pretrained(tmp_path / "small")  # torch: IndexError on GPT-2 tokens
    capsys.readouterr()  # transformers' progress bars
    assert compare.main([str(tmp_path / "hf"), "--against", str(tmp_path / "small"), "--steps", "1"]) == 2
    assert capsys.readouterr().err == (f"error: --against {tmp_path / 'small'} is not a model of {tmp_path / 'hf'}'s "
                                       f"shape: vocab_size=300 (src: {VOCAB})\n")
    with pytest.raises(SystemExit) as e:
        compare.main([str(tmp_path / "hf"), "--atol", "nan"])
    assert e.value.code == 2 and "--atol > 0" in capsys.readouterr().err


def test_out_dir_trained_in_bfloat16_is_compared_in_float32(random_hf, tmp_path):
    """train.py --dtype=bfloat16 saves that compute dtype with the weights; compare runs JAX in float32 anyway."""
    model = random_hf(seed=26, vocab_size=VOCAB)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load(tmp_path / "hf")
    convert.save(replace(cfg, dtype="bfloat16", matmul_precision="default"), params, tmp_path / "out")
    report = compare.compare(tmp_path / "out", steps=3, against=tmp_path / "hf")
    assert report["torch_model"] == "transformers.GPT2LMHeadModel"
    assert report["within_tolerance"] and report["max_abs_logit_diff"] <= 1e-5
    assert report["first_layer_beyond_tolerance"] is None and report["greedy_agree_steps"] == 3


TRAIN_KEYS = {"train_loss_jax", "train_loss_torch", "grad_max_rel_diff", "param_max_abs_diff"}


def test_training_steps_match_torch(random_hf, tmp_path, capsys):
    model = random_hf(seed=27, vocab_size=VOCAB)
    model.save_pretrained(tmp_path / "hf")
    x, y = compare.corpus_batches(VOCAB, 1, 3, 16)[0]
    with torch.no_grad():  # the first step's loss, before any update, straight from transformers
        first = float(torch.nn.functional.cross_entropy(model(torch.as_tensor(x, dtype=torch.long)).logits.flatten(0, 1),
                                                        torch.as_tensor(y, dtype=torch.long).flatten()))
    capsys.readouterr()
    code = compare.main([str(tmp_path / "hf"), "--train_steps", "4", "--batch_size", "3", "--block_size", "16",
                         "--steps", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and TRAIN_KEYS <= set(report) and report["train_within_tolerance"]
    assert len(report["train_loss_jax"]) == len(report["grad_norm_torch"]) == 4
    assert report["train_loss_torch"][0] == pytest.approx(first, rel=1e-6)
    assert report["train_loss_torch"][-1] < report["train_loss_torch"][0] - 1e-3  # the steps changed the weights
    assert set(report["grad_max_rel_diff"]) == {k for k, _ in model.named_parameters()}
    assert max(report["grad_max_rel_diff"].values()) <= 1e-5 and report["param_max_abs_diff"] <= 1e-4
    assert report["train_params_beyond_tolerance"] == []


def test_training_that_decays_biases_is_caught_and_the_parameter_named(random_reference, tmp_path, monkeypatch,
                                                                        capsys):
    import jax

    from gpt2_jax import optim

    model, ref_cfg = random_reference(seed=28, vocab_size=VOCAB)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "model.json").write_text(json.dumps(ref_cfg))
    right = optim.decay_mask

    def decays_biases(params, decay_embeddings=True):
        return jax.tree_util.tree_map_with_path(lambda path, decay: decay or path[-1].key == "bias",
                                                right(params, decay_embeddings))

    monkeypatch.setattr(optim, "decay_mask", decays_biases)
    report = compare.compare_training(tmp_path / "model.pt", train_steps=3, batch_size=2, block_size=16)
    assert report["train_torch_model"] == "torch_ref.ReferenceGPT" and not report["train_within_tolerance"]
    assert max(report["grad_max_rel_diff"].values()) <= 1e-5  # the mask changes updates, not gradients
    biases = {k for k, _ in model.named_parameters() if k.endswith((".bias", ".shift"))}  # LayerNorm's: "shift"
    assert set(report["train_params_beyond_tolerance"]) == biases - {"trf_blocks.0.attention.W_Key.bias",
                                                                      "trf_blocks.1.attention.W_Key.bias"}
    assert report["param_elements_left_out"]["trf_blocks.0.attention.W_Key.bias"] == ref_cfg["emb_dim"]
    assert report["param_rel_diff"]["trf_blocks.0.attention.W_Key.bias"] == 0.0  # all left out: --json writes it
    json.dumps(report)
    # The command on the same batches: its jitted programs are those just compiled (the persistent XLA cache).
    assert compare.main([str(tmp_path / "model.pt"), "--train_steps", "3", "--batch_size", "2", "--block_size", "16",
                         "--steps", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: training beyond tolerance 1e-05 in ['final_norm.shift', 'out_head.bias'," in out


def test_training_flags_are_checked(random_hf, tmp_path, capsys):
    random_hf(seed=29, vocab_size=VOCAB).save_pretrained(tmp_path / "hf")
    for flags in (["--train_steps", "-1"], ["--batch_size", "0"], ["--rtol", "nan"]):
        with pytest.raises(SystemExit) as e:
            compare.main([str(tmp_path / "hf"), *flags])
        assert e.value.code == 2 and "--train_steps >= 0, --batch_size >= 1 and --rtol > 0" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "hf"), "--train_steps", "1", "--block_size", "33", "--steps", "1"]) == 2
    assert "--block_size must be in [2, 32] (got 33)" in capsys.readouterr().err
