"""Shared fixtures: PyTorch GPT-2s of each layout with random weights (torch imported only when used)."""

import numpy as np
import pytest


def _randomize(model, seed, std):
    from gpt2_jax.torch_ref import randomize_

    return randomize_(model, seed=seed, std=std)


@pytest.fixture
def random_hf():
    """make(seed=0, tie=True, activation="gelu_new", std=0.05, **GPT2Config fields) -> GPT2LMHeadModel (eval)."""
    import transformers

    def make(seed=0, tie=True, activation="gelu_new", std=0.05, n_layer=2, n_head=2, n_embd=32, vocab_size=96,
             n_positions=32):
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            activation_function=activation, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            tie_word_embeddings=tie, attn_implementation="eager",
            bos_token_id=None if vocab_size <= 50256 else 50256, eos_token_id=None if vocab_size <= 50256 else 50256)
        from transformers.initialization import no_init_weights

        with no_init_weights():  # randomize_ sets every weight: skip transformers' own (slow) init
            model = transformers.GPT2LMHeadModel(cfg)
        model.tie_weights()
        return _randomize(model, seed, std)

    return make


@pytest.fixture
def random_reference():
    """make(seed=0, qkv_bias=True, std=0.05, **reference config fields) -> (ReferenceGPT, its config dict)."""
    from gpt2_jax.torch_ref import ReferenceGPT

    def make(seed=0, qkv_bias=True, std=0.05, vocab_size=96, context_length=32, emb_dim=32, n_heads=2, n_layers=2):
        cfg = dict(vocab_size=vocab_size, context_length=context_length, emb_dim=emb_dim, n_heads=n_heads,
                   n_layers=n_layers, drop_rate=0.0, qkv_bias=qkv_bias)
        return _randomize(ReferenceGPT(cfg), seed, std), cfg

    return make


@pytest.fixture
def random_nanogpt():
    """make(seed=0, bias=True, approximate="none", std=0.05, **model_args) -> (NanoGPT, model_args)."""
    from gpt2_jax.torch_ref import NanoGPT

    def make(seed=0, bias=True, approximate="none", std=0.05, vocab_size=96, block_size=32, n_embd=32, n_head=2,
             n_layer=2):
        args = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=bias,
                    vocab_size=vocab_size, dropout=0.0)
        return _randomize(NanoGPT(args, approximate), seed, std), args

    return make


@pytest.fixture
def torch_logits():
    """logits(model, tokens [B, T] numpy) -> float32 numpy logits of any of the torch models."""
    import torch

    from gpt2_jax.torch_ref import causal_lm_logits

    def logits(model, tokens):
        with torch.no_grad():
            return causal_lm_logits(model, torch.as_tensor(np.asarray(tokens), dtype=torch.long)).numpy()

    return logits
