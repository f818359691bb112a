"""nanosae's GPT against nanochat's own outputs (fixture) and, for every checkpoint generation, against the
independent from-the-spec forward in nanochat_ref.py on random weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import nanochat_ref as ref
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanosae import NanosaeError, load_model
from nanosae.checkpoint import build_model, save_checkpoint
from nanosae.gpt import GPT, GPTConfig, detect_generation
from nanosae.hooks import capture

TOL = 1e-4
BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"


def _max_err(a, b) -> float:
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else a
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a - b).max())


# ---------------------------------------------------------------- parity with nanochat's own outputs (fixture)


@pytest.mark.parametrize("i", [0, 1, 2])  # 11, 80 and 200 tokens; the last crosses the 128-token window
def test_fixture_logits_match_nanochat(d4, reference, i):
    model, _, _ = d4
    with torch.no_grad():
        logits = model(torch.tensor(reference[f"seq{i}_ids"])[None])
    assert logits.dtype == torch.float32 and logits.shape == (1, len(reference[f"seq{i}_ids"]), 2000)
    assert _max_err(logits[0], reference[f"seq{i}_logits"]) <= TOL


def test_fixture_block_states_and_final_norm_match_nanochat(d4, reference):
    model, _, _ = d4
    sites = [f"blocks.{i}.{k}" for i in range(4) for k in ("resid_pre", "resid_post")] + ["final"]
    with torch.no_grad(), capture(model, sites) as got:
        model(torch.tensor(reference["seq1_ids"])[None])
    for i in range(4):
        assert _max_err(got[f"blocks.{i}.resid_pre"][0][0], reference[f"seq1_block{i}_in"]) <= TOL
        assert _max_err(got[f"blocks.{i}.resid_post"][0][0], reference[f"seq1_block{i}_out"]) <= TOL
    assert _max_err(got["final"][0][0], reference["seq1_final_norm_out"]) <= TOL


def test_reference_forward_itself_reproduces_nanochat(reference):
    """The from-the-spec reference used below is trustworthy: it reproduces nanochat on the real checkpoint."""
    sd = torch.load(BASE_DIR / "base_checkpoints/d4/model_000400.pt", weights_only=True)
    cfg = dict(sequence_len=256, vocab_size=2000, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, window_pattern="SSSL")
    logits, _ = ref.forward(sd, cfg, "current", torch.tensor(reference["seq2_ids"])[None])
    assert _max_err(logits[0], reference["seq2_logits"]) <= TOL


def test_fixture_model_state(d4):
    model, _, _ = d4
    assert model.gen.name == "current" and model.info.generation == "current"
    assert model.windows == [128, 128, 128, 256]
    assert model.ve_layers == [1, 3]
    assert model.padded_vocab == 2048
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the bf16 embeddings were upcast


# ---------------------------------------------------------------- every generation vs the spec reference


def _cfg(L, H, KV, seq, pattern="L", C=64, V=100):
    return dict(sequence_len=seq, vocab_size=V, n_layer=L, n_head=H, n_kv_head=KV, n_embd=C, window_pattern=pattern)


# (era, config, tokens fed, padded vocab?, what detect_generation must say)
CASES = {
    "v0": ("v0", _cfg(3, 4, 4, 64), 80, False, "v0"),  # unpadded vocab, no windows even past sequence_len
    "v0-padded-gqa": ("v0", _cfg(2, 4, 2, 64), 70, True, "v0"),  # Dec 2025: padded vocab, same constants
    "lambdas": ("lambdas", _cfg(3, 4, 4, 64, "SL"), 100, True, "lambdas"),  # windows [32, 64, 64]
    "ve32-gqa": ("ve32", _cfg(4, 4, 2, 64, "SSSL"), 100, True, "ve32"),
    "softcap20": ("softcap20", _cfg(3, 4, 4, 64, "SSL"), 100, True, "ve32"),
    "fp32rope": ("fp32rope", _cfg(2, 4, 1, 64, "SL"), 100, True, "ve32"),
    "ve12": ("ve12", _cfg(3, 4, 2, 512, "SSL"), 600, True, "ve12"),  # windows [256, 256, 512]
    "current-gqa-odd": ("current", _cfg(3, 4, 2, 512, "SSSL"), 600, True, "current"),  # windows [128, 128, 512]
    "current-2layers": ("current", _cfg(2, 2, 2, 256, "SL"), 300, True, "current"),  # backout on the last block
}


def _model(sd, cfg, generation) -> GPT:
    return build_model(sd, GPTConfig(**cfg), generation, where="test")


def _inputs(cfg, T, seed=0, B=2):
    return torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_generation_matches_spec_reference(case):
    era, cfg, T, pad, detected = CASES[case]
    sd = ref.random_state_dict(cfg, era, seed=len(case), pad=pad)
    assert detect_generation(sd, cfg if era != "v0" else {k: v for k, v in cfg.items() if k != "window_pattern"}) == (
        detected
    )
    model = _model(sd, cfg, era)
    idx = _inputs(cfg, T)
    with torch.no_grad():
        logits = model(idx)
    expected, _ = ref.forward(sd, cfg, era, idx)
    assert logits.shape == (2, T, cfg["vocab_size"])
    assert _max_err(logits, expected) <= TOL


def test_window_pattern_in_meta_means_lambdas_era():
    cfg = _cfg(2, 4, 4, 64, "SL")
    sd = ref.random_state_dict(cfg, "v0", pad=True)
    assert detect_generation(sd, {k: v for k, v in cfg.items() if k != "window_pattern"}) == "v0"
    assert detect_generation(sd, cfg) == "lambdas"
    # nanochat patches missing lambdas to ones/zeros, which is then the v0 network with windows
    model = _model(sd, cfg, "lambdas")
    assert torch.equal(model.resid_lambdas, torch.ones(2)) and torch.equal(model.x0_lambdas, torch.zeros(2))


@pytest.mark.parametrize("era", ["softcap20", "fp32rope"])
def test_generation_flag_overrides_detection(era):
    """ve32/softcap20/fp32rope share keys and shapes: detection picks ve32, the flag picks the others."""
    cfg = _cfg(3, 4, 2, 64, "SSL")
    sd = ref.random_state_dict(cfg, era, seed=7)
    assert detect_generation(sd, cfg) == "ve32"
    idx = _inputs(cfg, 100)
    with torch.no_grad():
        detected, flagged = _model(sd, cfg, "ve32")(idx), _model(sd, cfg, era)(idx)
    want_flagged, _ = ref.forward(sd, cfg, era, idx)
    want_detected, _ = ref.forward(sd, cfg, "ve32", idx)
    assert _max_err(flagged, want_flagged) <= TOL
    assert _max_err(detected, want_detected) <= TOL
    assert _max_err(flagged, detected) > 10 * TOL  # the override really changes the forward


def test_load_model_detects_and_the_flag_overrides(tmp_path):
    cfg = _cfg(3, 4, 2, 64, "SSL", V=2000)
    sd = ref.random_state_dict(cfg, "softcap20", seed=2)
    save_checkpoint(tmp_path / "base_checkpoints" / "d3", 10, _model(sd, cfg, "softcap20"), {})
    shutil.copytree(BASE_DIR / "tokenizer", tmp_path / "tokenizer")
    idx = _inputs(cfg, 100, B=1)
    for flag, era in ((None, "ve32"), ("softcap20", "softcap20")):
        model, _, _ = load_model(tmp_path, generation=flag)
        assert model.info.generation == era
        with torch.no_grad():
            assert _max_err(model(idx), ref.forward(sd, cfg, era, idx)[0]) <= TOL


def test_flag_for_incompatible_generation_is_refused():
    cfg = _cfg(3, 4, 2, 256, "SL")
    sd = ref.random_state_dict(cfg, "current")
    with pytest.raises(NanosaeError, match="smear_gate"):
        _model(sd, cfg, "ve12")  # the smear keys are unexpected there
    with pytest.raises(NanosaeError, match="unknown generation"):
        _model(sd, cfg, "v9")


def _mutated(era: str, **changes) -> dict:
    return {**ref.ERAS[era], **changes}


# Each wrong constant or missing piece must move the logits far beyond the parity tolerance.
MUTATIONS = {
    "rope_base_10000": (_mutated("current", rope_base=10000.0), {}),
    "rope_tables_bf16": (_mutated("current", rope_bf16=True), {}),
    "no_qk_scale": (_mutated("current", qk_scale=1.0), {}),
    "qk_scale_1.15": (_mutated("current", qk_scale=1.15), {}),
    "softcap_20": (_mutated("current", softcap=20.0), {}),
    "ve_gate_2x": (_mutated("current", ve_mult=2.0), {}),
    "short_window_seq/3": (_mutated("ve12", qk_scale=1.2, smear=True), {}),
    "full_causal": (_mutated("current", windows=None), {}),
    "no_lambdas": (_mutated("current", lambdas=False), {}),
    "no_smear": (ref.ERAS["current"], {"smear_lambda": torch.zeros(1)}),
    "no_backout": (ref.ERAS["current"], {"backout_lambda": torch.zeros(1)}),
}


@pytest.fixture(scope="module")
def current_case():
    cfg = _cfg(3, 4, 2, 512, "SSSL")
    sd = ref.random_state_dict(cfg, "current", seed=3)
    idx = _inputs(cfg, 600, B=1)
    want, _ = ref.forward(sd, cfg, "current", idx)
    return cfg, sd, idx, want


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_wrong_constant_would_be_caught(current_case, name):
    cfg, sd, idx, want = current_case
    era, weights = MUTATIONS[name]
    wrong, _ = ref.forward({**sd, **weights}, cfg, era, idx)
    # rounding the RoPE tables to bf16 is the subtlest difference (up to ~0.01); the rest move by > 0.1
    assert _max_err(wrong, want) > (1e-3 if name == "rope_tables_bf16" else 0.1)


def test_softcap20_reference_differs_from_ve32():
    cfg = _cfg(3, 4, 2, 64, "SSL")
    sd = ref.random_state_dict(cfg, "ve32", seed=1)
    idx = _inputs(cfg, 100)
    assert _max_err(ref.forward(sd, cfg, "softcap20", idx)[0], ref.forward(sd, cfg, "ve32", idx)[0]) > 0.1


# ---------------------------------------------------------------- KV cache, loss, limits, init


@pytest.mark.parametrize("case", ["current-gqa-odd", "ve32-gqa", "v0"])
def test_kv_cache_forward_equals_full_forward(case):
    """Prefill, then decode in chunks of 1 and several tokens, crossing the short and long windows."""
    era, cfg, T, pad, _ = CASES[case]
    sd = ref.random_state_dict(cfg, era, seed=11, pad=pad)
    model = _model(sd, cfg, era)
    idx = _inputs(cfg, T)
    with torch.no_grad():
        full = model(idx)
        cache = model.new_kv_cache(2, T)
        outs, pos = [], 0
        chunks = [T // 2, 1, 3, 1, 1, 17] + [1] * 8
        chunks.append(T - sum(chunks))
        for n in chunks:
            outs.append(model(idx[:, pos : pos + n], kv_cache=cache))
            pos += n
    assert cache.pos == T
    assert _max_err(torch.cat(outs, dim=1), full) <= TOL


def test_kv_cache_overflow_is_an_error():
    cfg = _cfg(2, 4, 4, 64, "SL")
    model = _model(ref.random_state_dict(cfg, "current"), cfg, "current")
    cache = model.new_kv_cache(1, 8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
        with pytest.raises(NanosaeError, match="KV cache"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_loss_matches_cross_entropy_of_reference_logits():
    era, cfg, T, pad, _ = CASES["current-2layers"]
    sd = ref.random_state_dict(cfg, era)
    model = _model(sd, cfg, era)
    idx, targets = _inputs(cfg, 50), _inputs(cfg, 50, seed=1)
    targets[0, :10] = -1  # ignored positions, as nanochat's loss masks them
    with torch.no_grad():
        loss = model(idx, targets)
        per_token = model(idx, targets, loss_reduction="none")
    logits, _ = ref.forward(sd, cfg, era, idx)
    want = F.cross_entropy(logits.view(-1, cfg["vocab_size"]), targets.view(-1), ignore_index=-1)
    assert abs(loss.item() - want.item()) <= 1e-5
    assert per_token.shape == (100,) and torch.all(per_token.view(2, 50)[0, :10] == 0)


def test_too_long_input_and_bad_stop_layer_are_errors():
    cfg = _cfg(2, 4, 4, 16, "L")  # the RoPE table covers 10 * sequence_len = 160 positions
    model = _model(ref.random_state_dict(cfg, "v0", pad=False), cfg, "v0")
    with torch.no_grad():
        assert model(torch.zeros(1, 160, dtype=torch.long)).shape == (1, 160, 100)
        with pytest.raises(NanosaeError, match="RoPE"):
            model(torch.zeros(1, 161, dtype=torch.long))
        for bad in (2, -2):
            with pytest.raises(NanosaeError, match="stop_after_layer"):
                model(torch.zeros(1, 4, dtype=torch.long), stop_after_layer=bad)
        with pytest.raises(NanosaeError, match="KV cache"):
            model(torch.zeros(1, 4, dtype=torch.long), kv_cache=model.new_kv_cache(1, 4), stop_after_layer=0)


def test_bad_config_is_an_error():
    with pytest.raises(NanosaeError, match="n_head"):
        GPT(GPTConfig(**_cfg(2, 4, 3, 64)), "current")
    with pytest.raises(NanosaeError, match="window_pattern"):
        GPT(GPTConfig(**_cfg(2, 4, 4, 64, "SXL")), "current")


def test_init_weights_follow_nanochat():
    model = GPT(GPTConfig(**_cfg(5, 4, 4, 512, "SL", C=64, V=1000)), "current")
    model.init_weights(seed=0)
    assert torch.allclose(model.resid_lambdas, torch.tensor([1.15, 1.125, 1.10, 1.075, 1.05]))
    assert torch.allclose(model.x0_lambdas, torch.tensor([0.20, 0.1625, 0.125, 0.0875, 0.05]))
    assert model.smear_lambda.item() == 0.0 and model.backout_lambda.item() == pytest.approx(0.2)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_q.weight.abs().max() <= 3**0.5 / 64**0.5
    again = GPT(GPTConfig(**_cfg(5, 4, 4, 512, "SL", C=64, V=1000)), "current")
    again.init_weights(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert list(model.value_embeds) == ["0", "2", "4"] and model.windows == [128, 512, 128, 512, 512]


# ---------------------------------------------------------------- bf16 compute


def test_bf16_compute_close_to_fp32(d4, reference):
    model, _, _ = load_model(BASE_DIR, dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.resid_lambdas.dtype == torch.float32
    idx = torch.tensor(reference["seq2_ids"])[None]
    with torch.no_grad():
        logits = model(idx)
        fp32 = d4[0](idx)
    assert logits.dtype == torch.float32
    err = (logits - fp32).abs()
    assert err.max().item() < 0.5 and err.mean().item() < 0.05
    assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean().item() > 0.9
    with torch.no_grad():
        cache = model.new_kv_cache(1, idx.size(1))
        assert cache.k.dtype == torch.bfloat16
        cached = torch.cat([model(idx[:, :150], kv_cache=cache), model(idx[:, 150:], kv_cache=cache)], dim=1)
    assert (cached - logits).abs().max().item() < 0.5
    model.set_compute_dtype(torch.float32)  # and back: fp32 weights hold the bf16-rounded values
    with torch.no_grad():
        assert (model(idx) - fp32).abs().max().item() < 0.5
