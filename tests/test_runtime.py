import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import save

from nanosae.errors import NanosaeError
from nanosae.features import STATS_VERSION
from nanosae.fileio import atomic_write, sha256_file
from nanosae.generate import generate
from nanosae.hooks import capture, sae_site
from nanosae.runtime import (
    Steer,
    Steering,
    Tracker,
    generate_tracked,
    load_runtime,
    logit_effects,
    parse_steer,
    residual_directions,
    steer,
    track,
)
from nanosae.sae import SAE, SAEConfig

SITE = "blocks.2.resid_post"


def chat_prompt(tok, text):
    sp = tok.encode_special
    return [tok.bos_token_id, sp("<|user_start|>"), *tok.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]


def last_probs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].softmax(-1)


def test_tracking_equals_offline_encode_on_every_read_token(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    prompt = chat_prompt(tok, "What is a list in Python?")
    seen = []
    tracker = Tracker(sae, top_n=8, callback=seen.append)
    with capture(model, [SITE]) as acts:
        out = list(generate_tracked(model, sae, prompt, 12, tracker=tracker))
    tokens = [t for t, _ in out]
    assert tokens == generate(model, prompt, 12)  # tracking does not change what is generated
    # every token read: the prompt in the prefill, then every generated token including the last
    assert [r.pos for r in tracker.records] == list(range(len(prompt) + len(tokens)))
    assert seen == tracker.records
    assert [r for _, r in out] == tracker.records[len(prompt) :]
    x = acts.cat(SITE)[0]
    vals, ids = sae.encode(x).topk(8, dim=-1)
    for r in tracker.records:
        live = vals[r.pos] > 0
        assert r.ids == ids[r.pos][live].tolist()
        torch.testing.assert_close(torch.tensor(r.values), vals[r.pos][live], rtol=1e-5, atol=1e-5)
        assert len(r.ids) == 8


def test_track_context_records_plain_forward(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    ids = tok.encode("import os", prepend=tok.bos_token_id)
    with track(model, sae, top_n=3) as tracker, torch.no_grad():
        model(torch.tensor([ids, ids]))
    assert [(r.row, r.pos) for r in tracker.records] == [(b, t) for b in range(2) for t in range(len(ids))]
    assert all(len(r.ids) == 3 and r.values == sorted(r.values, reverse=True) for r in tracker.records)
    assert not model.hooks


def test_strong_steer_promotes_the_latents_tokens(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    ids = tok.encode("The quick brown fox jumps over the lazy dog. def main():", prepend=tok.bos_token_id)
    effects = logit_effects(model, residual_directions(model, sae))
    base = last_probs(model, ids)
    for i in (0, 1, 2):
        promoted = effects[i].topk(20).indices
        others = effects[i + 10].topk(20).indices  # another latent's tokens, as a control
        with steer(model, sae, [Steer(i, add=4)]):
            p = last_probs(model, ids)
        assert p[promoted].sum() > 0.05 and p[promoted].sum() > 10 * base[promoted].sum()
        assert p[promoted].sum() > 3 * p[others].sum()
        with steer(model, sae, [Steer(i, add=-4)]):
            assert last_probs(model, ids)[promoted].sum() < base[promoted].sum()


def test_steering_off_restores_the_exact_baseline(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    prompt = chat_prompt(tok, "Tell me a story.")
    x = torch.tensor([prompt])
    with torch.no_grad():
        before = model(x)
    gen_before = generate(model, prompt, 10)
    with steer(model, sae, [Steer(3, add=6), Steer(7, clamp=5.0), Steer.ablate(9)]):
        with torch.no_grad():
            assert not torch.equal(model(x), before)
        assert generate(model, prompt, 10) != gen_before
    assert not model.hooks
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert generate(model, prompt, 10) == gen_before


def test_clamp_keeps_the_sae_error(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    ids = torch.tensor([tok.encode("for i in range(10): print(i)", prepend=tok.bos_token_id)])
    with capture(model, [SITE]) as clean, torch.no_grad():
        model(ids)
    x = clean[SITE][0]
    f = sae.encode(x)
    active = f[0, 3].nonzero().flatten()[:2].tolist()  # two latents live at position 3, and one clamped up
    steers = [Steer.ablate(active[0]), Steer.ablate(active[1]), Steer(200, clamp=7.5)]
    with steer(model, sae, steers), capture(model, [SITE]) as edited, torch.no_grad():
        model(ids)
    f2 = f.clone()
    f2[..., active] = 0
    f2[..., 200] = 7.5
    expected = sae.decode(f2) + (x - sae.decode(f))
    torch.testing.assert_close(edited[SITE][0], expected, rtol=1e-5, atol=1e-5)


def test_add_units_and_norm_default(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    x = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(3)) * 10
    units = torch.rand(256, generator=torch.Generator().manual_seed(4)) + 0.5
    out = Steering(sae, [Steer(5, add=2), Steer(6, add=-1)], units=units).hook(x, 0)
    torch.testing.assert_close(out - x, (2 * units[5] * sae.W_dec[5] - units[6] * sae.W_dec[6]).expand_as(x))
    out = Steering(sae, [Steer(5, add=2)]).hook(x, 0)  # no stats: relative to the activation's norm
    W5 = sae.W_dec[5] / sae.W_dec[5].norm()
    torch.testing.assert_close(out - x, 2 * x.norm(dim=-1, keepdim=True) * W5)
    units[5] = 0  # never seen firing in the statistics: that latent falls back to the norm
    out = Steering(sae, [Steer(5, add=2), Steer(6, add=-1)], units=units).hook(x, 0)
    torch.testing.assert_close(out - x, 2 * x.norm(dim=-1, keepdim=True) * W5 - units[6] * sae.W_dec[6])


def test_only_generated_leaves_the_prompt_alone(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    prompt = chat_prompt(tok, "Hello there")
    steers = [Steer(4, add=8)]
    plain = [t for t, _ in generate_tracked(model, sae, prompt, 8)]
    everywhere = [t for t, _ in generate_tracked(model, sae, prompt, 8, steers=steers)]
    gen_only = [t for t, _ in generate_tracked(model, sae, prompt, 8, steers=steers, only_generated=True)]
    assert gen_only[0] == plain[0]  # the first token comes from the unsteered prompt
    assert everywhere != plain and gen_only != plain
    s = Steering(sae, steers, only_generated=True)
    x = torch.randn(1, 5, 128)
    assert s.hook(x, 0) is None  # the prefill is the prompt
    assert not torch.equal(s.hook(x[:, :1], 5), x[:, :1])  # decode steps are generated
    y = s.hook(x[:, :3], 3)  # a chunk that straddles the end of the prompt
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.equal(y[:, 2], x[:, 2])


def test_interleaved_generations_keep_their_own_steering(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    prompt = chat_prompt(tok, "Write a function.")
    a_steer, b_steer = [Steer(11, add=6)], [Steer(12, clamp=9.0)]
    solo_a = list(generate_tracked(model, sae, prompt, 10, steers=a_steer))
    solo_b = list(generate_tracked(model, sae, prompt, 10, steers=b_steer))
    assert [t for t, _ in solo_a] != [t for t, _ in solo_b]
    lock = threading.Lock()
    ga = generate_tracked(model, sae, prompt, 10, steers=a_steer, lock=lock)
    gb = generate_tracked(model, sae, prompt, 10, steers=b_steer, lock=lock)
    got_a, got_b = [], []
    for a, b in zip(ga, gb):  # strictly alternating model steps
        got_a.append(a)
        got_b.append(b)
    assert got_a == solo_a and got_b == solo_b


def test_parse_steer_and_errors(d4, hand_sae):
    model, _, _ = d4
    sae, _ = hand_sae
    assert parse_steer("123:+8") == Steer(123, add=8.0)
    assert parse_steer("5:-2.5") == Steer(5, add=-2.5)
    assert parse_steer("45:0", "clamp") == Steer(45, clamp=0.0)
    assert parse_steer("45 3e1", "clamp") == Steer(45, clamp=30.0)
    assert parse_steer("7", "ablate") == Steer.ablate(7)
    for bad, kind in [("x:1", "steer"), ("12", "steer"), ("1:2:3", "clamp"), ("a", "ablate")]:
        with pytest.raises(NanosaeError):
            parse_steer(bad, kind)
    with pytest.raises(NanosaeError):
        Steer(1)
    with pytest.raises(NanosaeError, match="latents 0..255"):
        with steer(model, sae, [Steer(256, add=1)]):
            pass
    wide = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=32, k=4, hook_name=SITE))
    with pytest.raises(NanosaeError, match="64-wide"):
        sae_site(model, wide)
    deep = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=32, k=4, hook_name="blocks.9.resid_post"))
    with pytest.raises(NanosaeError):
        sae_site(model, deep)


def test_load_runtime_reads_units_and_labels(d4, hand_sae, tmp_path):
    model, _, _ = d4
    _, sae_dir = hand_sae
    folder = tmp_path / "sae"
    shutil.copytree(sae_dir, folder)
    sae, units, labels = load_runtime(folder, model)
    assert units is None and labels == {} and sae.cfg.d_sae == 256
    (folder / "labels.json").write_text(json.dumps({"3": "three", "4": ""}))
    stats = folder / "feature_stats"
    stats.mkdir()
    maxes = torch.rand(256)
    data = save({"max": maxes, "density": torch.rand(256)})
    atomic_write(stats / "stats.safetensors", lambda f: f.write(data), checksum=True)  # as FeatureStats.save does
    key = {"sae": sha256_file(folder / "sae_weights.safetensors"), "version": STATS_VERSION}
    (stats / "key.json").write_text(json.dumps(key))
    _, units, labels = load_runtime(folder, model)
    assert torch.equal(units, maxes) and labels == {3: "three"}
    (stats / "key.json").write_text(json.dumps({"sae": "stale"}))  # statistics of other weights are not used
    assert load_runtime(folder, model)[1] is None
