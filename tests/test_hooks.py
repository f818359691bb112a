"""Hook sites against a manual computation from the weights (nanochat_ref.py), edits, decode steps, early stop."""

from __future__ import annotations

from pathlib import Path

import nanochat_ref as ref
import pytest
import torch

from nanosae import NanosaeError
from nanosae.generate import generate_stream
from nanosae.hooks import (
    GLOBAL_SITES,
    LAYER_SITES,
    add_hooks,
    canonical_site,
    capture,
    last_layer,
    parse_site,
    run_with_cache,
    saelens_hook_name,
    site_name,
    site_width,
)

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
CFG = dict(sequence_len=256, vocab_size=2000, n_layer=4, n_head=4, n_kv_head=4, n_embd=128, window_pattern="SSSL")
ALL_SITES = ["embed"] + [f"blocks.{i}.{k}" for i in range(4) for k in LAYER_SITES] + ["final"]
TOL = 1e-4


@pytest.fixture(scope="module")
def sd():
    return torch.load(BASE_DIR / "base_checkpoints" / "d4" / "model_000400.pt", weights_only=True)


@pytest.fixture(scope="module")
def ids(reference):
    return torch.tensor(reference["seq2_ids"])[None]  # 200 tokens: crosses the 128-token window


@pytest.fixture(autouse=True)
def no_leftover_hooks(d4):
    yield
    assert d4[0].hooks == {}  # every context removed what it added


def _err(a, b) -> float:
    return (a - b).abs().max().item()


def test_every_site_matches_manual_computation(d4, sd, ids):
    model, _, _ = d4
    with torch.no_grad(), capture(model, ALL_SITES) as got:
        logits = model(ids)
    want_logits, want = ref.forward(sd, CFG, "current", ids)
    assert set(want) == set(ALL_SITES)
    for site in ALL_SITES:
        assert len(got[site]) == 1
        assert got[site][0].shape == want[site].shape, site
        assert _err(got[site][0], want[site]) <= TOL, site
    assert _err(logits, want_logits) <= TOL
    assert got["blocks.2.mlp_hidden"][0].shape == (1, 200, 512) and got["blocks.2.mlp_hidden"][0].min() >= 0


def _add(v):
    return lambda x: x + v


EDITS = {
    "zero_resid_post_1": ("blocks.1.resid_post", lambda x: torch.zeros_like(x)),
    "add_vector_resid_pre_2": ("blocks.2.resid_pre", _add(torch.linspace(-3, 3, 128))),
    "scale_mlp_hidden_0": ("blocks.0.mlp_hidden", lambda x: 0.5 * x),
    "ablate_attn_out_3": ("blocks.3.attn_out", lambda x: torch.zeros_like(x)),
    "resid_mid_2_backout_layer": ("blocks.2.resid_mid", _add(torch.ones(128))),
    "embed_is_x0": ("embed", lambda x: x.flip(-1)),
    "final": ("final", lambda x: x.roll(1, dims=-1)),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_editing_a_site_changes_logits_as_computed_by_hand(d4, sd, ids, name):
    model, _, _ = d4
    site, fn = EDITS[name]
    with torch.no_grad(), add_hooks(model, {site: lambda x, start: fn(x)}):
        edited = model(ids)
    want, _ = ref.forward(sd, CFG, "current", ids, edits={site: fn})
    assert _err(edited, want) <= TOL
    with torch.no_grad():
        assert _err(edited, model(ids)) > 0.1  # the edit mattered, and it is gone after the block


def test_hooks_chain_in_order_and_none_keeps_the_activation(d4, ids):
    model, _, _ = d4
    site = "blocks.1.resid_post"
    seen = []
    chain = [lambda x, s: x * 2, lambda x, s: seen.append(x.clone()), lambda x, s: x + 1]
    with (
        torch.no_grad(),
        capture(model, [site]) as before,
        add_hooks(model, {site: chain}),
        capture(model, [site]) as after,
    ):
        model(ids)
    assert torch.equal(seen[0], before[site][0] * 2)
    assert torch.equal(after[site][0], before[site][0] * 2 + 1)


def test_capture_with_a_function_and_cat(d4, ids):
    model, _, _ = d4
    with torch.no_grad(), capture(model, ["blocks.0.resid_post"], fn=lambda x: x.norm(dim=-1)) as norms:
        cache = model.new_kv_cache(1, 90)
        model(ids[:, :50], kv_cache=cache)
        model(ids[:, 50:90], kv_cache=cache)
    assert [t.shape for t in norms["blocks.0.resid_post"]] == [(1, 50), (1, 40)]
    with torch.no_grad(), capture(model, ["blocks.0.resid_post"]) as full:
        model(ids[:, :90])
    assert _err(norms.cat("blocks.0.hook_resid_post"), full["blocks.0.resid_post"][0].norm(dim=-1)) < 1e-4


# ---------------------------------------------------------------- KV-cache decode steps


def test_hooks_fire_in_decode_steps_with_positions_and_same_activations(d4, reference):
    model, _, _ = d4
    prompt = reference["seq2_ids"][:120].tolist()  # decode runs past the 128-token window
    starts = []
    with capture(model, ALL_SITES) as got, add_hooks(model, {"blocks.2.attn_out": lambda x, s: starts.append(s)}):
        out = list(generate_stream(model, prompt, 15, read_last=True))
    assert starts == [0] + [120 + i for i in range(15)]
    with torch.no_grad(), capture(model, ALL_SITES) as full:
        model(torch.tensor([prompt + out]))
    for site in ALL_SITES:
        assert [t.shape[1] for t in got[site]] == [120] + [1] * 15
        assert _err(got.cat(site), full[site][0]) <= TOL, site


def test_position_dependent_edit_agrees_between_cached_and_full_forward(d4, ids):
    """An edit that uses `start` (here: steer positions >= 100 only) gives the same logits step by step."""
    model, _, _ = d4
    v = torch.randn(128, generator=torch.Generator().manual_seed(0))

    def steer(x, start):
        pos = torch.arange(start, start + x.shape[1])
        return x + 4 * v * (pos >= 100)[None, :, None]

    x = ids[:, :140]
    with torch.no_grad(), add_hooks(model, {"blocks.1.resid_post": steer}):
        full = model(x)
        cache = model.new_kv_cache(1, 140)
        steps = [model(x[:, :90], kv_cache=cache)] + [model(x[:, t : t + 1], kv_cache=cache) for t in range(90, 140)]
    assert _err(torch.cat(steps, dim=1), full) <= TOL
    with torch.no_grad():
        plain = model(x)
    assert _err(full[:, :100], plain[:, :100]) <= TOL and _err(full[:, 100:], plain[:, 100:]) > 0.1


# ---------------------------------------------------------------- stopping early


def test_stop_after_layer_returns_none_and_captures_the_same(d4, ids):
    model, _, _ = d4
    sites = ["embed", "blocks.0.mlp_out", "blocks.1.resid_post", "blocks.2.resid_pre"]
    with torch.no_grad(), capture(model, ALL_SITES) as full:
        model(ids)
    with torch.no_grad(), capture(model, ALL_SITES) as early:
        assert model(ids, stop_after_layer=1) is None
    assert not any(k.startswith(("blocks.2", "blocks.3", "final")) for k in early)  # nothing beyond block 1 ran
    for site in sites[:3]:
        assert torch.equal(early[site][0], full[site][0])
    logits, acts = run_with_cache(model, ids, sites[:3])
    assert logits is None and set(acts) == set(sites[:3])
    assert torch.equal(acts["blocks.1.resid_post"], full["blocks.1.resid_post"][0])
    with torch.no_grad(), capture(model, ["embed", "blocks.0.resid_pre"]) as emb:
        assert model(ids, stop_after_layer=-1) is None
    assert list(emb) == ["embed"]


def test_run_with_cache(d4, ids):
    model, _, _ = d4
    logits, acts = run_with_cache(model, ids, ["blocks.1.resid_post"], stop_early=False)
    with torch.no_grad():
        assert torch.equal(logits, model(ids))
    logits, acts = run_with_cache(model, ids, ["final", "hook_embed"])
    assert logits is not None and set(acts) == {"final", "embed"}


def test_last_layer(d4):
    model, _, _ = d4
    assert last_layer(["blocks.1.resid_post", "blocks.0.attn_out"], model) == 1
    assert last_layer(["embed"], model) == -1
    assert last_layer(["blocks.3.resid_pre"], model) is None  # the last block: nothing to skip
    assert last_layer(["blocks.0.resid_pre", "final"], model) is None
    assert last_layer([], model) is None


# ---------------------------------------------------------------- names


SAELENS = {
    "blocks.2.hook_resid_pre": "blocks.2.resid_pre",
    "blocks.2.hook_resid_mid": "blocks.2.resid_mid",
    "blocks.2.hook_resid_post": "blocks.2.resid_post",
    "blocks.2.hook_attn_out": "blocks.2.attn_out",
    "blocks.2.hook_mlp_out": "blocks.2.mlp_out",
    "blocks.2.mlp.hook_post": "blocks.2.mlp_hidden",
    "hook_embed": "embed",
    "ln_final.hook_normalized": "final",
}


def test_saelens_names_map_both_ways(d4, ids):
    model, _, _ = d4
    for theirs, ours in SAELENS.items():
        assert canonical_site(theirs, model) == ours == canonical_site(ours, model)
        assert saelens_hook_name(ours) == theirs == saelens_hook_name(theirs)
    with torch.no_grad(), capture(model, ["blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]) as got:
        model(ids[:, :20])
    assert set(got) == {"blocks.1.resid_post", "blocks.1.mlp_hidden"}
    assert parse_site("blocks.03.resid_post") == (3, "resid_post") and parse_site("final") == (None, "final")
    assert site_name(2) == "blocks.2.resid_post" and site_name(0, "embed") == "embed"
    assert set(GLOBAL_SITES) == {"embed", "final"}


def test_site_width(d4):
    model, _, _ = d4
    assert {s: site_width(model, s) for s in ("embed", "blocks.0.mlp_hidden", "blocks.3.mlp_out", "final")} == {
        "embed": 128,
        "blocks.0.mlp_hidden": 512,
        "blocks.3.mlp_out": 128,
        "final": 128,
    }


@pytest.mark.parametrize(
    "name", ["blocks.1.resid", "block.1.resid_post", "blocks.x.resid_post", "resid_post", "", "blocks.-1.resid_post"]
)
def test_bad_site_names(d4, name):
    with pytest.raises(NanosaeError, match="unknown site"):
        canonical_site(name, d4[0])


def test_out_of_range_layer_and_cleanup_after_errors(d4, ids):
    model, _, _ = d4
    with pytest.raises(NanosaeError, match=r"layers 0\.\.3"):
        canonical_site("blocks.4.resid_post", model)
    with pytest.raises(NanosaeError, match="blocks.7"):
        with capture(model, ["blocks.7.mlp_out"]):
            pass
    with pytest.raises(NanosaeError):  # the valid first hook must not stay registered
        with add_hooks(model, {"blocks.0.resid_post": lambda x, s: None, "blocks.9.resid_post": lambda x, s: None}):
            pass
    assert model.hooks == {}
    with pytest.raises(RuntimeError, match="boom"), add_hooks(model, {"embed": lambda x, s: None}):
        raise RuntimeError("boom")
    assert model.hooks == {}
    with pytest.raises(NanosaeError, match="unknown site"):
        site_name(1, "resid")
