"""GPT-2 in JAX and Flax Linen: model, weights converter, training and sampling."""

from gpt2_jax.config import ModelConfig, TrainConfig

__all__ = ["ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
