"""Weights in and out: every layout against the PyTorch model that wrote it, round trips, and malformed files."""

import functools
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import random_params
from gpt2_jax import convert
from gpt2_jax.config import ConfigError, ModelConfig
from gpt2_jax.model import GPT2
from gpt2_jax.weight_files import WeightsError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@functools.lru_cache(maxsize=None)
def forward(cfg):
    return jax.jit(lambda params, tokens: GPT2(cfg).apply({"params": params}, tokens))


def jax_logits(cfg, params, tokens):
    return np.asarray(forward(cfg)(params, jnp.asarray(tokens)))


def tokens_for(vocab_size, shape=(2, 12), seed=0):
    return np.random.default_rng(seed).integers(0, vocab_size, shape)


def assert_same_params(a, b):
    fa, fb = convert.flatten(a), convert.flatten(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def save_safetensors(path, state):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------- Hugging Face


def test_hf_directory_matches_transformers(random_hf, torch_logits, tmp_path):
    model = random_hf(seed=1)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load(tmp_path / "hf")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (2, 2, 32, 96, 32)
    assert cfg.tie_embeddings and cfg.activation == "gelu_tanh" and "lm_head" not in params
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_hf_bare_file_without_prefix_and_untied_head(random_hf, torch_logits, tmp_path):
    model = random_hf(seed=2, tie=False, activation="gelu")
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    save_safetensors(tmp_path / "weights.safetensors", state)
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 2, "activation_function": "gelu",
                                                         "tie_word_embeddings": False}))
    cfg, params = convert.load(tmp_path / "weights.safetensors")
    assert not cfg.tie_embeddings and cfg.activation == "gelu_exact" and "lm_head" in params
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


@pytest.mark.parametrize("activation, ours", [("gelu_fast", "gelu_tanh"), ("gelu_accurate", "gelu_tanh"),
                                               ("gelu_python_tanh", "gelu_tanh"), ("gelu_python", "gelu_exact")])
def test_hf_activation_aliases_match_transformers(random_hf, torch_logits, tmp_path, activation, ours):
    model = random_hf(seed=4, activation=activation)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = convert.load(tmp_path / "hf")
    assert cfg.activation == ours
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_hf_gpt2_shape_within_1e4(random_hf, torch_logits, tmp_path):
    model = random_hf(seed=3, std=0.02, n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    model.save_pretrained(tmp_path / "gpt2")
    cfg, params = convert.load(tmp_path / "gpt2")
    assert cfg == ModelConfig.from_preset("gpt2")
    tokens = tokens_for(50257, (1, 24), seed=3)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-4


def test_fp16_pytorch_model_bin_loads_as_float32_and_bfloat16(random_hf, torch_logits, tmp_path):
    model = random_hf(seed=4).half()
    (tmp_path / "hf").mkdir()
    torch.save(model.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model.config.to_json_file(tmp_path / "hf" / "config.json")
    cfg, params = convert.load(tmp_path / "hf")
    assert params["wte"].dtype == jnp.float32 and cfg.param_dtype == "float32"
    np.testing.assert_array_equal(params["wte"], model.transformer.wte.weight.detach().float().numpy())
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model.float(), tokens)).max() <= 1e-5
    cfg16, params16 = convert.load(tmp_path / "hf", jnp.bfloat16)
    assert cfg16.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}


def test_bf16_safetensors_upcast_exactly(random_hf, tmp_path):
    model = random_hf(seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    _, params = convert.load(tmp_path / "hf")
    expected = model.transformer.h[1].mlp.c_fc.weight.detach().float().numpy().T
    np.testing.assert_array_equal(params["h"]["mlp"]["c_fc"]["weight"][1], expected)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": False}, {"activation": "gelu_exact", "bias": False, "qkv_bias": False},
    {"vocab_size": 90, "pad_vocab_to": 64}])
def test_export_hf_reloads_in_transformers(overrides, torch_logits, tmp_path):
    cfg = ModelConfig.from_preset("tiny", **{"vocab_size": 96, **overrides})
    params = random_params(cfg)
    convert.export_hf(cfg, params, tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.tie_word_embeddings == cfg.tie_embeddings
    tokens = tokens_for(cfg.vocab_size)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_export_hf_refuses_lm_head_bias(tmp_path):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=False, lm_head_bias=True)
    with pytest.raises(WeightsError, match="no lm_head bias"):
        convert.export_hf(cfg, random_params(cfg), tmp_path / "out")


@pytest.mark.parametrize("change, message", [
    ({"n_inner": 64}, "n_inner=64 is not supported"),  # transformers would build a 64-wide MLP
    ({"scale_attn_weights": 0}, "scale_attn_weights is 0; expected true or false"),  # 0 turns the scaling off
    ({"layer_norm_epsilon": None}, "layer_norm_epsilon is None; expected a number > 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings is 'false'; expected true or false"),
    ({"n_head": "2"}, "n_head is '2'; expected a positive integer"),
    ({"activation_function": ["gelu"]}, r"activation_function \['gelu'\] is not supported"),
])
def test_hf_config_values_that_transformers_would_not_take_as_ours_are_refused(change, message, random_hf,
                                                                               tmp_path):
    random_hf(seed=30).save_pretrained(tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(WeightsError, match=f"{config}: .*{message}"):
        convert.load(tmp_path / "hf")


def test_another_model_type_with_gpt2_tensor_names_is_refused(tmp_path):
    """GPTBigCode without multi-query has GPT-2's tensor names in nn.Linear layout and a tanh GELU: read as a
    nanoGPT model its logits were 0.07 off transformers'."""
    from transformers.initialization import no_init_weights

    cfg = transformers.GPTBigCodeConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                        multi_query=False)
    with no_init_weights():
        transformers.GPTBigCodeForCausalLM(cfg).save_pretrained(tmp_path / "bigcode")
    with pytest.raises(WeightsError, match="config.json: model_type 'gpt_bigcode' is not GPT-2"):
        convert.load(tmp_path / "bigcode")


def test_hf_config_with_num_attention_heads_gives_the_heads(random_hf, torch_logits, tmp_path):
    model = random_hf(seed=31, n_head=4)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["num_attention_heads"] = config.pop("n_head")  # GPT2Config's alias of n_head
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    cfg, params = convert.load(tmp_path / "hf")
    assert cfg.n_head == 4
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_tensor_in_two_shards_is_refused(hf_state, tmp_path):
    (tmp_path / "hf").mkdir()
    names = sorted(hf_state)  # transformer.wte.weight last: in the second shard, and also in the first
    first, second = names[: len(names) // 2] + ["transformer.wte.weight"], names[len(names) // 2:]
    save_safetensors(tmp_path / "hf" / "a.safetensors", {k: hf_state[k] for k in first})
    save_safetensors(tmp_path / "hf" / "b.safetensors", {k: hf_state[k] + 1.0 for k in second})
    weight_map = {**{k: "a.safetensors" for k in first}, **{k: "b.safetensors" for k in second}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WeightsError, match="'transformer.wte.weight' is in two shards, a.safetensors and "
                                           "b.safetensors"):
        convert.load(tmp_path / "hf", n_head=2)


def test_n_head_that_disagrees_with_the_files_config_is_refused(random_hf, random_nanogpt, tmp_path):
    # The heads cannot be read from tensor shapes: an --n_head that contradicts config.json (nanoGPT's model_args,
    # llm.c's header) would silently load another function, and compare would build its torch side from the same
    # wrong count and report a match.
    random_hf(seed=32, n_head=2).save_pretrained(tmp_path / "hf")
    with pytest.raises(WeightsError, match=r"n_head=4 was given but .*config.json \(n_head\) says n_head=2"):
        convert.load(tmp_path / "hf", n_head=4)
    assert convert.load(tmp_path / "hf", n_head=2)[0].n_head == 2  # agreeing is fine
    model, args = random_nanogpt(seed=33)
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match=r"n_head=4 was given but .*model_args\) says n_head=2"):
        convert.load(tmp_path / "ckpt.pt", n_head=4)
    cfg = ModelConfig.from_preset("tiny", vocab_size=100)
    convert.export_llmc(cfg, random_params(cfg), tmp_path / "m.bin")
    with pytest.raises(WeightsError, match=r"n_head=4 was given but .*llm.c header\) says n_head=2"):
        convert.load(tmp_path / "m.bin", n_head=4)
    with pytest.raises(ConfigError, match=r"n_head must be an integer >= 1; got -2"):  # not the weights' fault
        convert.load(tmp_path / "m.bin", n_head=-2)
    convert.save(cfg, random_params(cfg), tmp_path / "orbax", "orbax")  # an orbax checkpoint's saved config too
    with pytest.raises(WeightsError, match=r"n_head=4 was given but .*orbax \(its saved model config\) says n_head=2"):
        convert.load(tmp_path / "orbax", n_head=4)
    with pytest.raises(ConfigError, match=r"n_head must be an integer >= 1; got 0"):
        convert.load(tmp_path / "orbax", n_head=0)
    assert convert.load(tmp_path / "orbax", n_head=2)[0].n_head == 2


# ---------------------------------------------------------------- reference layout


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_reference_layout_matches_torch(qkv_bias, random_reference, torch_logits, tmp_path):
    model, ref_cfg = random_reference(seed=6, qkv_bias=qkv_bias)
    torch.save({"state_dict": model.state_dict(), "optimizer": torch.optim.AdamW(model.parameters()).state_dict()},
               tmp_path / "ckpt.pth")
    (tmp_path / "ckpt.json").write_text(json.dumps(ref_cfg))
    cfg, params = convert.load(tmp_path / "ckpt.pth")
    assert cfg.qkv_bias == cfg.lm_head_bias == qkv_bias and not cfg.tie_embeddings
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_reference_gpt2_shape_within_1e4(random_reference, torch_logits, tmp_path):
    model, _ = random_reference(seed=7, std=0.02, vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12,
                                n_layers=12)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="n_head"):  # no JSON beside: 12 heads from the width 768
        cfg, params = convert.load(tmp_path / "model.pt")
    assert cfg == ModelConfig.from_preset("gpt2", tie_embeddings=False, lm_head_bias=True)
    tokens = tokens_for(50257, (1, 24), seed=7)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-4


def test_reference_config_json_that_disagrees_warns(random_reference, tmp_path):
    model, ref_cfg = random_reference(seed=8)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({**ref_cfg, "vocab_size": 50527}))
    with pytest.warns(UserWarning, match="vocab_size=50527"):
        cfg, _ = convert.load(tmp_path / "model.pt")
    assert cfg.vocab_size == 96 and cfg.n_head == 2


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_jax_reference_jax_round_trip_is_bitwise(qkv_bias, torch_logits, tmp_path):
    from gpt2_jax.torch_ref import ReferenceGPT

    cfg = ModelConfig.from_preset("tiny", vocab_size=96, qkv_bias=qkv_bias, lm_head_bias=qkv_bias,
                                  tie_embeddings=False)
    params = random_params(cfg)
    convert.export_reference(cfg, params, tmp_path / "ref.pt")
    model = ReferenceGPT(json.loads((tmp_path / "ref.json").read_text()))
    model.load_state_dict(torch.load(tmp_path / "ref.pt", weights_only=True), strict=True)
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model.eval(), tokens)).max() <= 1e-5
    cfg2, params2 = convert.load(tmp_path / "ref.pt")
    assert cfg2 == cfg
    assert_same_params(params, params2)


def test_export_reference_of_tied_biasless_model_is_the_same_function(torch_logits, tmp_path):
    from gpt2_jax.torch_ref import ReferenceGPT

    cfg = ModelConfig.from_preset("tiny", vocab_size=96, bias=False, qkv_bias=False)
    params = random_params(cfg)
    convert.export_reference(cfg, params, tmp_path / "ref.pt")
    state = torch.load(tmp_path / "ref.pt", weights_only=True)
    np.testing.assert_array_equal(state["out_head.weight"].numpy(), np.asarray(params["wte"]))
    assert float(state["trf_blocks.0.norm_layer1.shift"].abs().max()) == 0.0
    model = ReferenceGPT(json.loads((tmp_path / "ref.json").read_text()))
    model.load_state_dict(state, strict=True)
    tokens = tokens_for(96)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model.eval(), tokens)).max() <= 1e-5


def test_hf_reference_hf_round_trip_is_bitwise(random_hf, tmp_path):
    # The reference layout gives out_head a bias whenever the qkv projections have one, and no tying: an HF model
    # exported to it comes back with a zero lm_head bias and a head equal to wte, the same function that HF (and
    # llm.c) can hold, so that exporting it back must work and give the original file.
    from safetensors.numpy import load_file

    random_hf(seed=34).save_pretrained(tmp_path / "hf")
    cfg, params = convert.load(tmp_path / "hf")
    convert.export_reference(cfg, params, tmp_path / "ref.pt")
    cfg2, params2 = convert.load(tmp_path / "ref.pt")
    assert cfg2.lm_head_bias and not cfg2.tie_embeddings
    convert.export_hf(cfg2, params2, tmp_path / "hf2")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    again = load_file(tmp_path / "hf2" / "model.safetensors")
    assert sorted(original) == sorted(again)
    for key in original:
        np.testing.assert_array_equal(original[key], again[key], err_msg=key)
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["tie_word_embeddings"] is True
    convert.export_llmc(cfg2, params2, tmp_path / "a.bin")
    convert.export_llmc(cfg, params, tmp_path / "b.bin")
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    params2["lm_head"]["bias"] = params2["lm_head"]["bias"].at[3].set(1e-3)  # a real bias is still refused
    with pytest.raises(WeightsError, match="no lm_head bias"):
        convert.export_hf(cfg2, params2, tmp_path / "hf3")


# ---------------------------------------------------------------- nanoGPT


@pytest.mark.parametrize("bias", [False, True])
def test_nanogpt_checkpoint_matches_torch(bias, random_nanogpt, torch_logits, tmp_path):
    model, args = random_nanogpt(seed=9, bias=bias, vocab_size=50304)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # as saved from a torch.compile'd model
    state.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)})
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": args, "iter_num": 5,
                "best_val_loss": torch.tensor(3.2), "config": {"dataset": "shakespeare", "compile": True}},
               tmp_path / "ckpt.pt")
    cfg, params = convert.load(tmp_path / "ckpt.pt")
    assert (cfg.vocab_size, cfg.bias, cfg.qkv_bias, cfg.activation) == (50304, bias, bias, "gelu_exact")
    tokens = tokens_for(50304)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5


def test_nanogpt_head_that_is_not_tied_is_an_error(random_nanogpt, tmp_path):
    model, args = random_nanogpt(seed=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] += 1.0
    torch.save({"model": state, "model_args": args}, tmp_path / "ckpt.pt")
    with pytest.raises(WeightsError, match="'lm_head.weight' must equal 'transformer.wte.weight'"):
        convert.load(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("overrides", [
    {}, {"bias": False, "qkv_bias": False}, {"bias": False}, {"qkv_bias": False},
    {"vocab_size": 90, "pad_vocab_to": 64}, {"tie_embeddings": False}])
def test_export_nanogpt_loads_strictly_in_nanogpts_model(overrides, torch_logits, tmp_path):
    from gpt2_jax.torch_ref import NanoGPT

    cfg = ModelConfig.from_preset("tiny", **{"vocab_size": 96, "activation": "gelu_exact", **overrides})
    params = random_params(cfg)
    if not cfg.tie_embeddings:  # an untied head equal to wte is the tied model
        params = dict(params, lm_head={"weight": params["wte"]})
    convert.export_nanogpt(cfg, params, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = NanoGPT(saved["model_args"])
    model.load_state_dict(saved["model"], strict=True)
    tokens = tokens_for(cfg.vocab_size)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model.eval(), tokens)).max() <= 1e-5
    cfg2, params2 = convert.load(tmp_path / "ckpt.pt")
    np.testing.assert_allclose(jax_logits(cfg2, params2, tokens), jax_logits(cfg, params, tokens), atol=1e-6)


def test_export_nanogpt_needs_a_tied_erf_gelu_model(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(WeightsError, match="nanoGPT needs activation='gelu_exact'; this model has activation="):
        convert.export_nanogpt(cfg, random_params(cfg), tmp_path / "ckpt.pt")
    cfg = ModelConfig.from_preset("tiny", activation="gelu_exact", tie_embeddings=False)
    with pytest.raises(WeightsError, match="nanoGPT needs tie_embeddings=True"):
        convert.export_nanogpt(cfg, random_params(cfg), tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


# ---------------------------------------------------------------- llm.c


def write_llmc_by_hand(path, model, args, vocab_padded, version=3):
    """llm.c's own layout, written from a nanoGPT-shaped torch model without the converter."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    L = args["n_layer"]
    header = np.zeros(256, np.int32)
    header[:8] = [20240326, version, args["block_size"], args["vocab_size"], L, args["n_head"], args["n_embd"],
                  vocab_padded]
    wte = np.zeros((vocab_padded, args["n_embd"]), np.float32)
    wte[: args["vocab_size"]] = sd["transformer.wte.weight"]
    names = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
             "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"]
    parts = [wte, sd["transformer.wpe.weight"]]
    parts += [np.stack([sd[f"transformer.h.{i}.{n}"] for i in range(L)]) for n in names]
    parts += [sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]]
    dtype = np.float32 if version == 3 else ml_dtypes.bfloat16
    with open(path, "wb") as f:
        f.write(header.tobytes())
        for part in parts:
            f.write(part.astype(dtype).tobytes())


def test_llmc_file_matches_torch(random_nanogpt, torch_logits, tmp_path):
    model, args = random_nanogpt(seed=11, approximate="tanh", vocab_size=90)
    write_llmc_by_hand(tmp_path / "model.bin", model, args, vocab_padded=128)
    cfg, params = convert.load(tmp_path / "model.bin")
    assert (cfg.vocab_size, cfg.padded_vocab_size, cfg.activation) == (90, 128, "gelu_tanh")
    tokens = tokens_for(90)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max() <= 1e-5
    convert.export_llmc(cfg, params, tmp_path / "again.bin")  # llm.c -> JAX -> llm.c keeps every byte
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "model.bin").read_bytes()


def test_llmc_fp32_round_trip_is_bitwise(tmp_path):
    cfg = ModelConfig.from_preset("tiny", vocab_size=100, pad_vocab_to=128)
    params = random_params(cfg)
    convert.export_llmc(cfg, params, tmp_path / "m.bin")
    header = np.fromfile(tmp_path / "m.bin", np.int32, 8)
    assert header.tolist() == [20240326, 3, 64, 100, 2, 2, 32, 128]
    cfg2, params2 = convert.load(tmp_path / "m.bin")
    assert cfg2 == cfg
    assert_same_params(params, params2)


def test_llmc_bf16_round_trip_rounds_like_torch(tmp_path):
    cfg = ModelConfig.from_preset("tiny", vocab_size=100)
    params = random_params(cfg)
    convert.export_llmc(cfg, params, tmp_path / "m.bin", dtype="bfloat16")
    assert np.fromfile(tmp_path / "m.bin", np.int32, 2).tolist() == [20240326, 5]
    cfg2, params2 = convert.load(tmp_path / "m.bin")
    assert cfg2.padded_vocab_size == 128  # llm.c pads the token table; the extra rows are zeros
    np.testing.assert_array_equal(params2["wte"][100:], 0.0)
    w = np.asarray(params["h"]["mlp"]["c_fc"]["weight"])
    expected = torch.tensor(w).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(params2["h"]["mlp"]["c_fc"]["weight"], expected)
    tokens = tokens_for(100)
    diff = np.abs(jax_logits(cfg, params, tokens) - jax_logits(cfg2, params2, tokens)).max()
    assert 0 < diff < 0.05


def test_llmc_export_needs_a_tied_tanh_model(tmp_path):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=False)
    with pytest.raises(WeightsError, match="llm.c needs tie_embeddings=True"):
        convert.export_llmc(cfg, random_params(cfg), tmp_path / "m.bin")


# ---------------------------------------------------------------- malformed input


@pytest.fixture
def hf_state(random_hf):
    return {k: v.detach().clone() for k, v in random_hf(seed=12).state_dict().items()}


def test_missing_tensor_is_named(hf_state, tmp_path):
    del hf_state["transformer.h.1.mlp.c_fc.bias"]
    save_safetensors(tmp_path / "m.safetensors", hf_state)
    with pytest.raises(WeightsError, match=r"lacks tensor 'transformer.h.1.mlp.c_fc.bias' \(expected shape \(128,\)\)"):
        convert.load(tmp_path / "m.safetensors", n_head=2)


def test_extra_tensor_is_named(hf_state, tmp_path):
    hf_state["transformer.h.0.attn.rotary"] = torch.zeros(3)
    save_safetensors(tmp_path / "m.safetensors", hf_state)
    with pytest.raises(WeightsError, match=r"tensor 'transformer.h.0.attn.rotary' of shape \(3,\)"):
        convert.load(tmp_path / "m.safetensors", n_head=2)


def test_wrong_shape_is_named(hf_state, tmp_path):
    hf_state["transformer.h.1.mlp.c_proj.weight"] = torch.zeros(100, 32)
    save_safetensors(tmp_path / "m.safetensors", hf_state)
    with pytest.raises(WeightsError, match=r"'transformer.h.1.mlp.c_proj.weight' has shape \(100, 32\); "
                                           r"expected \(128, 32\)"):
        convert.load(tmp_path / "m.safetensors", n_head=2)


def test_missing_reference_tensor_is_named(random_reference, tmp_path):
    model, ref_cfg = random_reference(seed=13)
    state = model.state_dict()
    del state["trf_blocks.1.attention.W_Key.bias"]
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(WeightsError, match=r"lacks tensor 'trf_blocks.1.attention.W_Key.bias' \(expected shape"):
        convert.load(tmp_path / "m.pt", n_head=2)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_files_are_named(random_hf, hf_state, tmp_path):
    save_safetensors(tmp_path / "m.safetensors", hf_state)
    with pytest.raises(WeightsError, match="is truncated"):
        convert.load(truncate(tmp_path / "m.safetensors"), n_head=2)
    torch.save(hf_state, tmp_path / "m.pt")
    with pytest.raises(WeightsError, match="truncated or not a PyTorch file"):
        convert.load(truncate(tmp_path / "m.pt"), n_head=2)
    torch.save(hf_state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(WeightsError, match="truncated or not a PyTorch file"):
        convert.load(truncate(tmp_path / "legacy.pt"), n_head=2)
    cfg = ModelConfig.from_preset("tiny")
    convert.export_llmc(cfg, random_params(cfg), tmp_path / "m.bin")
    with pytest.raises(WeightsError, match="is truncated: the header promises"):
        convert.load(truncate(tmp_path / "m.bin"))


def test_safetensors_cut_inside_its_header_and_empty_files_are_named(hf_state, tmp_path):
    save_safetensors(tmp_path / "m.safetensors", hf_state)
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:100])
    with pytest.raises(WeightsError, match=r"m.safetensors is truncated or not safetensors: header of \d+ bytes, "
                                           r"file of 100"):
        convert.load(tmp_path / "m.safetensors", n_head=2)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"empty.safetensors is empty \(0 bytes\)"):
        convert.load(tmp_path / "empty.safetensors")


def test_random_bytes_and_other_files_are_not_checkpoints(tmp_path):
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightsError, match="not a weights file this converter reads"):
        convert.load(tmp_path / "noise.bin")
    (tmp_path / "notes.txt").write_text("hello world, these are not weights")
    with pytest.raises(WeightsError, match="not a weights file this converter reads"):
        convert.load(tmp_path / "notes.txt")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "scalars.pt")
    with pytest.raises(WeightsError, match="'step' is a int, not a tensor"):
        convert.load(tmp_path / "scalars.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="does not look like a GPT-2 checkpoint"):
        convert.load(tmp_path / "other.pt")
    (tmp_path / "config.json").write_text('{"n_head": 2}')  # an HF directory's file, given instead of the directory
    with pytest.raises(WeightsError, match="config.json is a JSON file, not weights: pass the directory that holds"):
        convert.load(tmp_path / "config.json")


def write_raw_safetensors(path, header):
    """A safetensors file with exactly this header (as JSON) and 8 bytes of data."""
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(8))
    return path


@pytest.mark.parametrize("header, message", [
    ({"wte.weight": {"dtype": "F32", "data_offsets": [0, 8]}}, r"header entry 'wte.weight' lacks \['shape'\]"),
    ({"wte.weight": 5}, "header entry 'wte.weight' is 5; expected {\"dtype\""),
    ({"wte.weight": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}},
     r"tensor 'wte.weight' has shape \[2, 'x'\]; expected a list of integers >= 0"),
    ({"wte.weight": {"dtype": "F32", "shape": [2], "data_offsets": [8]}},
     r"tensor 'wte.weight' has data_offsets \[8\]; expected \[start, end\]"),
])
def test_malformed_safetensors_header_entries_are_named(header, message, tmp_path):
    path = write_raw_safetensors(tmp_path / "m.safetensors", header)
    with pytest.raises(WeightsError, match=f"{path}: .*{message}"):
        convert.load(path, n_head=2)


def test_safetensors_that_its_library_refuses_or_numpy_cannot_hold_are_named(hf_state, tmp_path):
    path = write_raw_safetensors(tmp_path / "long.safetensors", {"wte.weight": {
        "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})  # 8 bytes of data, 4 of them a tensor's
    with pytest.raises(WeightsError, match=f"{path} is longer than its header says: the tensors cover 4 bytes of "
                                           f"the data section, which holds 8"):
        convert.load(path, n_head=2)
    path = write_raw_safetensors(tmp_path / "gap.safetensors", {"wte.weight": {
        "dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})  # the first 4 bytes belong to no tensor
    with pytest.raises(WeightsError, match=f"{path} is not a valid safetensors file: .*offset"):
        convert.load(path, n_head=2)
    hf_state["transformer.h.0.ln_1.weight"] = hf_state["transformer.h.0.ln_1.weight"].to(torch.float8_e4m3fn)
    save_safetensors(tmp_path / "f8.safetensors", hf_state)
    with pytest.raises(WeightsError, match="tensor 'transformer.h.0.ln_1.weight' has dtype F8_E4M3; expected "
                                           "floating-point weights"):
        convert.load(tmp_path / "f8.safetensors", n_head=2)


@pytest.mark.parametrize("index, message", [
    ('{"metadata": {}}', "has no 'weight_map' object"),
    ('{"weight_map": ', "is not valid JSON"),
    ('{"weight_map": {"wte.weight": "gone.safetensors"}}', "names shard 'gone.safetensors', but .* does not exist"),
])
def test_malformed_safetensors_index_is_named(index, message, tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(WeightsError, match=f"{tmp_path / 'hf' / 'model.safetensors.index.json'}.* {message}"):
        convert.load(tmp_path / "hf", n_head=2)


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_integer_tensor_is_refused(suffix, hf_state, tmp_path):
    hf_state["transformer.h.0.ln_1.weight"] = torch.arange(32)  # int64: not weights
    if suffix == "pt":
        torch.save(hf_state, tmp_path / "m.pt")
    else:
        save_safetensors(tmp_path / "m.safetensors", hf_state)
    with pytest.raises(WeightsError, match=r"tensor 'transformer.h.0.ln_1.weight' has dtype (torch\.)?int64; "
                                           "expected floating-point weights"):
        convert.load(tmp_path / f"m.{suffix}", n_head=2)


@pytest.mark.parametrize("key", ["transformer.h.0.ln_1.weight", "lm_head.weight"])
def test_float8_tensor_is_refused(key, hf_state, tmp_path, capsys):
    hf_state[key] = hf_state[key].to(torch.float8_e4m3fn)  # a float dtype that numpy cannot hold
    torch.save(hf_state, tmp_path / "m.pt")
    assert convert.main([str(tmp_path / "m.pt"), str(tmp_path / "out"), "--n_head", "2"]) == 2
    assert f"error: {tmp_path / 'm.pt'}: tensor '{key}' has dtype torch.float8_e4m3fn; expected floating-point " \
           f"weights" in capsys.readouterr().err


class RunsCode:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(writer, hf_state, tmp_path):
    marker = tmp_path / "code-ran"
    payload = {**hf_state, "transformer.h.0.attn.evil": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(payload, tmp_path / "evil.pt")
    else:
        with open(tmp_path / "evil.pt", "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(WeightsError, match="refusing to load .* could run code"):
        convert.load(tmp_path / "evil.pt", n_head=2)
    assert not marker.exists()


def test_missing_pretrained_preset_explains_where_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    hub = "model.safetensors and config.json from https://huggingface.co/openai-community/gpt2-medium"
    with pytest.raises(FileNotFoundError, match=hub):
        convert.load("gpt2-medium")
    assert convert.main(["gpt2", "out"]) == 2
    assert "https://huggingface.co/openai-community/gpt2 " in capsys.readouterr().err


# ---------------------------------------------------------------- command line and orbax


def test_cli_converts_hf_to_orbax_and_reference(random_hf, tmp_path, capsys):
    model = random_hf(seed=14)
    model.save_pretrained(tmp_path / "hf")
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "orbax")]) == 0
    assert "n_layer=2 n_head=2 n_embd=32" in capsys.readouterr().out
    cfg, params = convert.load(tmp_path / "hf")
    cfg2, params2 = convert.load(tmp_path / "orbax")
    assert cfg2 == cfg
    assert_same_params(params, params2)
    assert convert.main([str(tmp_path / "orbax"), str(tmp_path / "ref.pt"), "--to", "reference"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the JSON written beside gives n_head: no warning
        cfg3, params3 = convert.load(tmp_path / "ref.pt")
    tokens = tokens_for(96)
    np.testing.assert_allclose(jax_logits(cfg3, params3, tokens), jax_logits(cfg, params, tokens), atol=1e-6)


def test_a_step_directory_of_an_out_dir_loads_that_step(tmp_path, capsys):
    # train.py keeps the best val loss besides the latest steps: its step directory is how one reaches it.
    from gpt2_jax import checkpoint
    from gpt2_jax.config import TrainConfig
    from gpt2_jax.training import init_train_state

    cfg = ModelConfig.from_preset("tiny", vocab_size=96)
    state = init_train_state(cfg, TrainConfig(), jax.random.PRNGKey(0))
    best, latest = random_params(cfg, seed=1), random_params(cfg, seed=2)
    manager = checkpoint.open_manager(tmp_path / "out")
    for step, params, val_loss in ((15, best, 1.0), (20, latest, 2.0)):
        checkpoint.save_train_state(manager, state.replace(step=jnp.int32(step), params=params),
                                    {"model_config": cfg.to_dict()}, val_loss)
    manager.close()
    assert_same_params(convert.load(tmp_path / "out")[1], latest)
    loaded_cfg, params = convert.load(tmp_path / "out" / "15")
    assert loaded_cfg == cfg
    assert_same_params(params, best)
    assert convert.main([str(tmp_path / "out" / "15"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = tokens_for(96)
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, jax_logits(cfg, best, tokens), atol=1e-5)
    capsys.readouterr()
    assert convert.main([str(tmp_path / "out" / "16"), str(tmp_path / "hf16"), "--to", "hf"]) == 2
    assert f"{tmp_path / 'out'} has no checkpoint of step 16; it has steps [15, 20]" in capsys.readouterr().err


@pytest.mark.parametrize("to, dst_is_file", [("hf", True), ("orbax", True), ("nanogpt", False), ("reference", False),
                                         ("llmc", False)])
def test_cli_refuses_a_destination_of_the_wrong_kind(to, dst_is_file, random_hf, tmp_path, capsys):
    random_hf(seed=15).save_pretrained(tmp_path / "hf")
    dst = tmp_path / "dst"
    if dst_is_file:
        dst.write_text("not a directory")
    else:
        dst.mkdir()
    assert convert.main([str(tmp_path / "hf"), str(dst), "--to", to]) == 2
    kind = "a file; --to {} writes a directory" if dst_is_file else "a directory; --to {} writes a file"
    assert f"error: destination {dst} is {kind.format(to)}" in capsys.readouterr().err


@pytest.mark.parametrize("to, existing", [("hf", "hf/model.safetensors"), ("hf", "hf/pytorch_model.bin"),
                                          ("reference", "ref.pt"), ("reference", "ref.json"),
                                          ("llmc", "model.bin")])
def test_exports_never_overwrite(to, existing, tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny")
    params = random_params(cfg)
    dst = tmp_path / {"hf": "hf", "reference": "ref.pt", "llmc": "model.bin"}[to]
    (tmp_path / existing).parent.mkdir(exist_ok=True)
    (tmp_path / existing).write_bytes(b"someone's weights")
    with pytest.raises(WeightsError, match="already"):
        convert.save(cfg, params, dst, to)
    convert.save(cfg, params, tmp_path / "orbax")
    assert convert.main([str(tmp_path / "orbax"), str(dst), "--to", to]) == 2
    assert "already" in capsys.readouterr().err
    assert (tmp_path / existing).read_bytes() == b"someone's weights"


def test_orbax_export_refuses_a_step_directory_of_a_checkpoint(tmp_path, capsys):
    cfg = ModelConfig.from_preset("tiny")
    convert.save(cfg, random_params(cfg), tmp_path / "orbax")
    step = tmp_path / "orbax" / "0"
    before = sorted(p.name for p in step.iterdir())
    assert convert.main([str(tmp_path / "orbax"), str(step)]) == 2
    assert f"error: {step} is step 0 of the checkpoint in {tmp_path / 'orbax'}" in capsys.readouterr().err
    assert sorted(p.name for p in step.iterdir()) == before


def disk_full():
    raise OSError(28, "No space left on device")


def test_failed_writes_leave_no_file(tmp_path, monkeypatch):
    from gpt2_jax import weight_files

    ok = lambda: np.zeros(4, np.float32)  # noqa: E731
    entries = [("a", (4,), np.float32, ok), ("b", (4,), np.float32, disk_full)]
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'm.safetensors'}: No space left"):
        weight_files.write_safetensors(tmp_path / "m.safetensors", entries)

    def chunks():
        yield np.zeros(4, np.float32)
        disk_full()

    fields = dict(block_size=4, vocab_size=8, n_layer=1, n_head=1, n_embd=4, vocab_padded=8)
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'm.bin'}: No space left"):
        weight_files.write_llmc(tmp_path / "m.bin", fields, [("wte", chunks())])

    def torch_save_cut_short(obj, path):
        path.write_bytes(b"PK\x03\x04 half of it")
        disk_full()

    monkeypatch.setattr(torch, "save", torch_save_cut_short)
    cfg = ModelConfig.from_preset("tiny")
    with pytest.raises(OSError, match=rf"^\[Errno 28\] cannot write {tmp_path / 'ref.pt'}: No space left on device$"):
        convert.export_reference(cfg, random_params(cfg), tmp_path / "ref.pt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- OpenAI's TensorFlow release

OPENAI_TF = Path(__file__).resolve().parent / "data" / "openai_tf"  # written by TensorFlow: data/make_tf.py


def openai_tf_in_transformers(random_hf):
    """transformers' GPT2LMHeadModel holding the fixture's values, named as Hugging Face converted OpenAI's."""
    values = np.load(OPENAI_TF / "values.npz")
    state = {"transformer.wte.weight": values["model/wte"], "transformer.wpe.weight": values["model/wpe"],
             "transformer.ln_f.weight": values["model/ln_f/g"], "transformer.ln_f.bias": values["model/ln_f/b"]}
    for i in range(12):
        for module in ("ln_1", "ln_2"):
            state[f"transformer.h.{i}.{module}.weight"] = values[f"model/h{i}/{module}/g"]
            state[f"transformer.h.{i}.{module}.bias"] = values[f"model/h{i}/{module}/b"]
        for module in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            hf = f"transformer.h.{i}.{module.replace('/', '.')}"
            state[hf + ".weight"] = values[f"model/h{i}/{module}/w"][0]  # conv1d [1, in, out] -> Conv1D [in, out]
            state[hf + ".bias"] = values[f"model/h{i}/{module}/b"]
    model = random_hf(n_layer=12, n_head=2, n_embd=8, vocab_size=64, n_positions=16)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k == "lm_head.weight" for k in missing)
    model.tie_weights()
    return model


@pytest.mark.parametrize("name", ["", "model.ckpt", "model.ckpt.index", "model.ckpt.data-00000-of-00001"])
def test_openai_tensorflow_checkpoint_matches_transformers(name, random_hf, torch_logits):
    cfg, params = convert.load(OPENAI_TF / name if name else OPENAI_TF)  # its directory, prefix or .index file
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (12, 2, 8, 64, 16)
    assert cfg.tie_embeddings and cfg.activation == "gelu_tanh" and cfg.layer_norm_eps == 1e-5
    tokens = tokens_for(64)
    assert np.abs(jax_logits(cfg, params, tokens) - torch_logits(openai_tf_in_transformers(random_hf), tokens)).max() \
        <= 1e-5


def test_damaged_tensorflow_checkpoints_are_named(tmp_path):
    from gpt2_jax.layouts import weights_exist

    copy = tmp_path / "124M"
    shutil.copytree(OPENAI_TF, copy)
    assert weights_exist(copy / "model.ckpt") and not weights_exist(copy / "other.ckpt")
    data = copy / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:40_000])
    with pytest.raises(WeightsError, match=r"model.ckpt.data-00000-of-00001 is truncated: tensor 'model/\S+' needs"):
        convert.load(copy)
    data.unlink()
    with pytest.raises(WeightsError, match="tensor 'model/h0/attn/c_attn/b' is in model.ckpt.data-00000-of-00001, "
                                           "which does not exist"):
        convert.load(copy)
    index = copy / "model.ckpt.index"
    index.write_bytes(index.read_bytes()[:-3])
    with pytest.raises(WeightsError, match="model.ckpt.index is truncated or not a TensorFlow checkpoint index"):
        convert.load(copy)
    (copy / "hparams.json").unlink()
    shutil.copy(OPENAI_TF / "model.ckpt.index", index)
    shutil.copy(OPENAI_TF / data.name, data)
    with pytest.raises(WeightsError, match="n_head cannot be read from tensor shapes"):  # width 8: no OpenAI preset
        convert.load(copy)
    assert convert.load(copy, n_head=2)[0].n_head == 2


def test_a_directory_of_several_tensorflow_checkpoints_reads_the_latest(tmp_path):
    # A fine-tuning run's directory (TF's Saver keeps several): the `checkpoint` file names the newest.
    values = np.load(OPENAI_TF / "values.npz")
    for step in (1000, 2000):
        shutil.copy(OPENAI_TF / "model.ckpt.index", tmp_path / f"model-{step}.index")
        shutil.copy(OPENAI_TF / "model.ckpt.data-00000-of-00001", tmp_path / f"model-{step}.data-00000-of-00001")
    shutil.copy(OPENAI_TF / "hparams.json", tmp_path)
    data = tmp_path / "model-1000.data-00000-of-00001"
    data.write_bytes(b"\0" * data.stat().st_size)  # the older one holds other weights
    (tmp_path / "checkpoint").write_text(f'model_checkpoint_path: "/elsewhere/{tmp_path.name}/model-2000"\n'
                                         'all_model_checkpoint_paths: "model-1000"\n'
                                         'all_model_checkpoint_paths: "model-2000"\n')
    _, params = convert.load(tmp_path)
    np.testing.assert_array_equal(params["wte"], values["model/wte"])


def test_a_fine_tuning_runs_tensorflow_checkpoint_loads_its_model_without_the_training_state():
    # TF's Saver wrote model-1.* with global_step, beta1_power/beta2_power and Adam slots beside the model, and a
    # `checkpoint` file naming model-1 by the absolute path of the machine that wrote it (data/make_tf.py).
    values = np.load(OPENAI_TF.parent / "tf_finetuned" / "values.npz")
    cfg, params = convert.load(OPENAI_TF.parent / "tf_finetuned")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (1, 2, 8)
    np.testing.assert_array_equal(params["wte"], values["model/wte"])
    np.testing.assert_array_equal(params["h"]["mlp"]["c_fc"]["weight"][0], values["model/h0/mlp/c_fc/w"][0].T)


def test_warnings_of_the_command_line_tools_are_one_plain_line(tmp_path):
    cfg = ModelConfig.from_preset("tiny", n_embd=768, n_head=12, n_layer=1, vocab_size=256, block_size=16)
    convert.export_hf(cfg, random_params(cfg), tmp_path / "hf")
    bare = tmp_path / "model.safetensors"
    (tmp_path / "hf" / "model.safetensors").rename(bare)  # no config JSON: n_head is guessed with a warning
    out = subprocess.run([sys.executable, "-m", "gpt2_jax.convert", str(bare), str(tmp_path / "orbax")],
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    assert out.stderr == (f"warning: {bare}: no config JSON gives n_head; using 12, the OpenAI GPT-2 value for "
                          "n_embd=768\n")
