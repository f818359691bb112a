"""Sampling with a KV cache, as nanochat's Engine does: batch-1 prefill, then one-token decode steps.

Greedy output equals the Engine token for token; with temperature > 0 the RNG is consumed exactly as the
Engine consumes it (one multinomial draw per step from a generator seeded with `seed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .errors import NanosaeError
from .gpt import GPT


def sample_next_token(
    logits: torch.Tensor, rng: torch.Generator | None, temperature: float, top_k: int | None
) -> torch.Tensor:
    """logits (B, V) -> token ids (B, 1): argmax at temperature 0, else a (top-k) softmax draw."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1, keepdim=True)
    if top_k is not None and top_k > 0:
        vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        probs = torch.softmax(vals / temperature, dim=-1)
        return idx.gather(1, torch.multinomial(probs, num_samples=1, generator=rng))
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=rng)


@torch.inference_mode()
def generate_stream(
    model: GPT,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    stop_tokens: Iterable[int] | None = None,
    read_last: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time. Stops after max_tokens or after yielding a stop token (which is
    yielded, as the Engine does). With read_last the model also reads the final token, so hooks see it."""
    if not tokens:
        raise NanosaeError("generation needs at least one prompt token")
    if temperature < 0:
        raise NanosaeError(f"temperature must be >= 0 (got {temperature})")
    stop = set(stop_tokens or ())
    device = model.device
    rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache = model.new_kv_cache(1, len(tokens) + max_tokens)
    logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=cache)[:, -1]
    for n in range(max_tokens):
        nxt = sample_next_token(logits, rng, temperature, top_k)
        token = int(nxt.item())
        yield token
        last = n == max_tokens - 1 or token in stop
        if last and not read_last:
            return
        logits = model(nxt.view(1, 1), kv_cache=cache)[:, -1]
        if last:
            return


def generate(
    model: GPT,
    tokens: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 42,
    stop_tokens: Iterable[int] | None = None,
) -> list[int]:
    """The new token ids (a stop token, when one ends generation, is the last id)."""
    return list(generate_stream(model, tokens, max_tokens, temperature, top_k, seed, stop_tokens))
