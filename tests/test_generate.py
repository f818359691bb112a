"""Generation with the KV cache against nanochat's Engine (fixture), an uncached reference, and its sampler."""

from __future__ import annotations

import nanochat_ref as ref
import numpy as np
import pytest
import torch

from nanosae import NanosaeError, generate
from nanosae.checkpoint import build_model
from nanosae.generate import generate_stream
from nanosae.gpt import GPTConfig
from nanosae.hooks import add_hooks, capture


@torch.inference_mode()
def generate_uncached(model, tokens, max_tokens, temperature=0.0, top_k=None, seed=42, stop_tokens=()):
    """nanochat's GPT.generate: re-run the whole prefix every step, no cache. Sampling written as nanochat's
    sample_next_token: one multinomial draw per step from a generator seeded with `seed`."""
    rng = torch.Generator(device=model.device).manual_seed(seed)
    ids, out = list(tokens), []
    for _ in range(max_tokens):
        logits = model(torch.tensor([ids], device=model.device))[:, -1, :]
        if temperature == 0:
            token = int(logits.argmax(-1).item())
        elif top_k:
            vals, idx = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
            choice = torch.multinomial(torch.softmax(vals / temperature, dim=-1), 1, generator=rng)
            token = int(idx.gather(1, choice).item())
        else:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=rng).item())
        out.append(token)
        ids.append(token)
        if token in stop_tokens:
            break
    return out


@pytest.fixture(scope="module")
def tiny():
    """A random current-generation model with GQA, 3 layers and a 128-token short window (seq_len 256)."""
    cfg = dict(sequence_len=256, vocab_size=100, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, window_pattern="SSL")
    return build_model(ref.random_state_dict(cfg, "current", seed=5), GPTConfig(**cfg), "current", where="tiny")


# ---------------------------------------------------------------- nanochat's fixture


@pytest.mark.parametrize("g", [0, 1])  # a plain prompt and a chat prompt
def test_greedy_equals_nanochat_engine(d4, reference, g):
    model, _, _ = d4
    prompt = reference[f"gen{g}_prompt"].tolist()
    assert generate(model, prompt, 20) == reference[f"gen{g}_engine_tokens"].tolist()


@pytest.mark.parametrize("g", [0, 1])
def test_uncached_reference_equals_nanochat_naive_generator(d4, reference, g):
    model, _, _ = d4
    prompt, naive = reference[f"gen{g}_prompt"].tolist(), reference[f"gen{g}_naive_tokens"].tolist()
    assert generate_uncached(model, prompt, 20) == naive
    with torch.no_grad():
        logits = model(torch.tensor([prompt + naive]))[0, len(prompt) - 1 :]
    assert np.abs(logits.numpy() - reference[f"gen{g}_fullseq_logits_lastpos"]).max() <= 1e-4


def test_cached_and_uncached_agree_across_the_window(d4, tiny):
    model, _, _ = d4
    prompt = list(range(1, 121))  # 120 + 16 tokens: decode crosses the 128-token short window
    assert generate(model, prompt, 16) == generate_uncached(model, prompt, 16)
    prompt = [int(t) for t in torch.randint(0, 100, (110,), generator=torch.Generator().manual_seed(0))]
    assert generate(tiny, prompt, 30) == generate_uncached(tiny, prompt, 30)


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("top_k", [None, 5])
def test_sampling_consumes_the_rng_like_the_engine(d4, reference, top_k):
    model, _, _ = d4
    prompt = reference["gen0_prompt"].tolist()
    ours = generate(model, prompt, 16, temperature=0.9, top_k=top_k, seed=123)
    assert ours == generate_uncached(model, prompt, 16, temperature=0.9, top_k=top_k, seed=123)
    assert ours == generate(model, prompt, 16, temperature=0.9, top_k=top_k, seed=123)  # reproducible
    assert ours != generate(model, prompt, 16, temperature=0.9, top_k=top_k, seed=124)
    assert ours != reference["gen0_engine_tokens"].tolist()[:16]  # it really sampled


def test_top_k_1_is_greedy(d4, reference):
    model, _, _ = d4
    prompt = reference["gen1_prompt"].tolist()
    assert generate(model, prompt, 20, temperature=1.5, top_k=1, seed=7) == reference["gen1_engine_tokens"].tolist()


def test_top_k_restricts_the_draw(tiny):
    prompt = [1, 2, 3, 4]
    with torch.no_grad():
        allowed = set(tiny(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    firsts = {generate(tiny, prompt, 1, temperature=5.0, top_k=3, seed=s)[0] for s in range(40)}
    assert firsts <= allowed and len(firsts) > 1


# ---------------------------------------------------------------- stopping and what the model reads


def test_stop_tokens_end_generation_after_being_yielded(d4, reference):
    model, _, _ = d4
    prompt, greedy = reference["gen0_prompt"].tolist(), reference["gen0_engine_tokens"].tolist()
    stop = greedy[5]
    out = generate(model, prompt, 20, stop_tokens={stop, 1995})
    assert out == greedy[: greedy.index(stop) + 1]
    assert generate(model, prompt, 20, stop_tokens={1999}) == greedy  # never produced: runs to max_tokens


@pytest.mark.parametrize("read_last", [False, True])
def test_decode_forwards_and_positions(d4, reference, read_last):
    """Prefill, then one single-token forward per new token; the last token is read only with read_last."""
    model, _, _ = d4
    prompt = reference["gen0_prompt"].tolist()
    starts = []
    with (
        capture(model, ["final"]) as got,
        add_hooks(model, {"embed": lambda x, start: starts.append((start, x.shape[1]))}),
    ):
        out = list(generate_stream(model, prompt, 6, read_last=read_last))
    n_forwards = 1 + len(out) - (0 if read_last else 1)
    assert len(got["final"]) == n_forwards
    assert starts == [(0, len(prompt))] + [(len(prompt) + i, 1) for i in range(n_forwards - 1)]


def test_stream_is_lazy_and_zero_tokens_is_empty(tiny):
    stream = generate_stream(tiny, [1, 2, 3], 1000)
    first = [next(stream) for _ in range(3)]
    stream.close()
    assert first == generate(tiny, [1, 2, 3], 3)
    assert generate(tiny, [1, 2, 3], 0) == []


def test_bad_requests_are_errors(tiny):
    with pytest.raises(NanosaeError, match="prompt"):
        generate(tiny, [], 5)
    with pytest.raises(NanosaeError, match="temperature"):
        generate(tiny, [1], 5, temperature=-0.1)
    with pytest.raises(NanosaeError, match="RoPE"):
        generate(tiny, [1] * 2561, 1)  # the table covers 10 * sequence_len positions
