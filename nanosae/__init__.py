"""nanosae: sparse autoencoders for nanochat models."""

from .checkpoint import load_model
from .errors import NanosaeError
from .generate import generate
from .gpt import GPT, GPTConfig
from .sae import SAE, SAEConfig, load_sae
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "NanosaeError", "SAE", "SAEConfig", "Tokenizer", "generate", "load_model", "load_sae"]
