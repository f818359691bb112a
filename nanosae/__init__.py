"""nanosae: sparse autoencoders for nanochat models."""

from .checkpoint import load_model
from .errors import NanosaeError
from .generate import generate
from .gpt import GPT, GPTConfig
from .tokenizer import Tokenizer

__all__ = ["GPT", "GPTConfig", "NanosaeError", "Tokenizer", "generate", "load_model"]
