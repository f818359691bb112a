"""The one-pass feature statistics against brute force on the real d4 model (dense latents of every token)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nanosae.data import token_rows
from nanosae.errors import NanosaeError
from nanosae.features import FeatureConfig, FeatureStats, _Pass, compute_features, load_or_compute
from nanosae.hooks import run_with_cache
from nanosae.sae import SAE, SAEConfig

SEQ, ROWS = 64, 24


def make_sae(arch: str, site: str = "blocks.2.resid_post", d_in: int = 128, d_sae: int = 256, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, k=8 if arch == "topk" else None, hook_name=site)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g) / math.sqrt(d_in))
        sae.W_dec.copy_(sae.W_enc.T + 0.3 * torch.randn(d_sae, d_in, generator=g) / math.sqrt(d_in))
        if arch == "standard":  # a bias that keeps it sparse-ish, so densities differ across latents
            sae.b_enc.copy_(-1.0 - torch.rand(d_sae, generator=g))
    return sae


@pytest.fixture(scope="module")
def batches(d4):
    _, tok, _ = d4
    rows = [r for r, _ in zip(token_rows(tok, None, SEQ), range(ROWS))]
    return [torch.tensor(rows[i : i + 4]) for i in range(0, ROWS, 4)]  # 6 batches: slots fill, then turn over


def dense_latents(d4, sae, batches):
    model, tok, _ = d4
    site = sae.cfg.hook_name
    tokens = torch.cat(batches)
    with torch.no_grad():
        x = run_with_cache(model, tokens, [site])[1][site].reshape(-1, sae.cfg.d_in)
        f = sae.encode(x)
    special = torch.tensor([t in tok.special_ids() for t in tokens.reshape(-1).tolist()])
    f[special] = 0
    return tokens.reshape(-1), x, f, special


@pytest.fixture(scope="module", params=["topk", "standard"])
def case(request, d4, batches):
    model, tok, _ = d4
    sae = make_sae(request.param)
    cfg = FeatureConfig(n_tokens=ROWS * SEQ, seq_len=SEQ, top_k=6, interval_samples=4, n_intervals=4, ctx_before=5)
    stats = compute_features(model, tok, sae, batches, cfg, progress=False)
    return sae, stats, dense_latents(d4, sae, batches)


def test_counts_means_and_max_match_dense(case):
    sae, stats, (tokens, x, f, special) = case
    n = int((~special).sum())
    assert stats.meta["n_tokens"] == n and stats.meta["n_positions"] == len(tokens)
    count = (f > 0).sum(0)
    assert torch.equal(stats.t["count"], count)
    assert torch.allclose(stats.t["density"], count.double() / n)
    assert torch.allclose(stats.t["max"], f.max(0).values)
    assert torch.allclose(stats.t["mean"], f.sum(0) / count.clamp(min=1), rtol=1e-4, atol=1e-5)
    assert 0 < int((count == 0).sum()) < sae.cfg.d_sae or (count > 0).all()  # a mix, not all dead


def test_top_examples_are_the_flat_top_k_with_their_windows(case):
    sae, stats, (tokens, x, f, special) = case
    cfg = stats.cfg
    vals, pos = f.topk(cfg.top_k, dim=0)
    checked = 0
    for i in range(sae.cfg.d_sae):
        ex = stats.examples(i)
        k = int((vals[:, i] > 0).sum())
        assert len(ex) == k
        got = torch.tensor([e["value"] for e in ex])
        assert torch.allclose(got, vals[:k, i])
        for e in ex:
            p = e["pos"]
            row0 = p - p % SEQ
            lo = max(row0, p - cfg.ctx_before)
            hi = min(row0 + SEQ, p + cfg.ctx_after + 1)
            assert e["tokens"] == tokens[lo:hi].tolist()
            assert e["tokens"][e["index"]] == int(tokens[p])
            np.testing.assert_allclose(e["values"], f[lo:hi, i].numpy(), rtol=2e-3, atol=2e-3)
            checked += 1
    assert checked > 100


def test_intervals_partition_the_activations_and_sample_inside(case):
    sae, stats, (tokens, x, f, special) = case
    n = int((~special).sum())
    sampled_all = 0
    for i in range(sae.cfg.d_sae):
        col = f[:, i]
        ivs = stats.intervals(i)
        if not (col > 0).any():
            assert ivs == []
            continue
        total = 0.0
        for m, iv in enumerate(ivs):
            last = m == len(ivs) - 1
            inside = (col > iv["min"]) if m == 0 else (col >= iv["min"])
            inside &= (col <= iv["max"]) if last else (col < iv["max"])
            assert iv["contains"] == pytest.approx(int(inside.sum()) / n, abs=1e-12)
            total += iv["contains"]
            want = min(int(inside.sum()), stats.cfg.interval_samples)
            assert len(iv["examples"]) == want
            for e in iv["examples"]:
                assert iv["min"] <= e["value"] <= iv["max"]
                assert e["value"] == pytest.approx(float(col[e["pos"]]))
                lo = e["pos"] - e["index"]
                np.testing.assert_allclose(e["values"], col[lo : lo + len(e["values"])].numpy(), rtol=2e-3, atol=2e-3)
                assert e["tokens"] == tokens[lo : lo + len(e["tokens"])].tolist()
            sampled_all += want
        assert total == pytest.approx(int((col > 0).sum()) / n)
        assert ivs[-1]["max"] == pytest.approx(float(col.max()))
    assert sampled_all > 0


def test_histogram_holds_every_nonzero_activation(case):
    """The bars are re-binned from 256 exact fine bins over [0, hi), hi < 2 max: at each bar edge the cumulative
    count may be off only by the activations within one fine bin (max/128) of that edge, plus rounding."""
    sae, stats, (tokens, x, f, special) = case
    checked = 0
    for i in range(sae.cfg.d_sae):
        centres, heights = stats.act_hist(i)
        col = f[:, i][f[:, i] > 0].double()
        if not len(col):
            assert sum(heights) == 0
            continue
        mx = float(col.max())
        assert centres[0] == pytest.approx(mx / 100) and centres[-1] == pytest.approx(mx * 99 / 100)
        cum = np.concatenate([[0], np.cumsum(heights)])
        for m, edge in enumerate(np.linspace(0, mx, len(heights) + 1)):
            true = int((col <= edge).sum()) if m == len(heights) else int((col < edge).sum())
            slack = int(((col - edge).abs() <= mx / 128).sum()) + (m + 1) / 2
            assert abs(cum[m] - true) <= slack
        checked += 1
    assert checked > 10


def test_correlations_match_dense_pearson_and_cosine(case):
    sae, stats, (tokens, x, f, special) = case
    keep = ~special
    F, X = f[keep].double(), x[keep].double()
    fc, xc = F - F.mean(0), X - X.mean(0)
    pear = (fc.T @ xc) / (fc.norm(dim=0)[:, None] * xc.norm(dim=0)[None])
    cos = (F.T @ X) / (F.norm(dim=0)[:, None] * X.norm(dim=0)[None])
    alive = (f > 0).any(0)
    for i in alive.nonzero().squeeze(1).tolist()[:40]:
        ids = stats.t["cn_idx"][i]
        assert torch.allclose(stats.t["cn_pearson"][i].double(), pear[i, ids], atol=1e-4)
        assert torch.allclose(stats.t["cn_cos"][i].double(), cos[i, ids], atol=1e-4)
        assert stats.t["cn_pearson"][i][0] == pytest.approx(float(pear[i].max()), abs=1e-4)
    fpear = torch.corrcoef(F.T).nan_to_num(0)
    for i in alive.nonzero().squeeze(1).tolist()[:40]:
        group = torch.arange(128 * (i // 128), 128 * (i // 128 + 1))
        group = group[group != i]
        best = float(fpear[i, group].max())
        assert stats.t["cf_idx"][i][0] // 128 == i // 128 and stats.t["cf_idx"][i][0] != i
        assert float(stats.t["cf_pearson"][i][0]) == pytest.approx(best, abs=1e-4)


def test_weight_statistics(case, d4):
    model, _, _ = d4
    sae, stats, _ = case
    lg = sae.W_dec.detach() @ model.lm_head.weight[: model.config.vocab_size].T
    v, i = lg.topk(10, dim=1)
    assert torch.equal(stats.t["pos_idx"], i) and torch.allclose(stats.t["pos_val"], v, atol=1e-5)
    v, i = lg.topk(10, dim=1, largest=False)
    assert torch.equal(stats.t["neg_idx"], i)
    assert (stats.t["logit_hist"].sum(1) == model.config.vocab_size).all()
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    sim = W @ W.T
    sim.fill_diagonal_(-2)
    v, i = sim.topk(10, dim=1)
    assert torch.equal(stats.t["nb_idx"], i) and torch.allclose(stats.t["nb_cos"], v, atol=1e-5)
    top_token, value = stats.logits(3)[0]
    assert top_token == stats.vocab[int(stats.t["pos_idx"][3, 0])] and value == pytest.approx(float(lg[3].max()))


def test_growing_range_merges_bins_exactly():
    """Synthetic batches whose max jumps by 2^12 and then by 2^2: the doubling merges keep every count and
    every sample exact (with interval_samples large enough to hold every activation of the latent)."""
    cfg = FeatureConfig(n_tokens=64, seq_len=8, top_k=3, interval_samples=400, n_intervals=5, ctx_before=2, ctx_after=1)
    acc = _Pass(d_sae=3, d_in=4, cfg=cfg, device="cpu")
    g = torch.Generator().manual_seed(1)
    all_vals = []
    for b, scale in enumerate([0.01, 41.0, 170.0, 3.0]):
        N = 40
        val = torch.rand(N, 1, generator=g) * scale
        val[torch.rand(N, 1, generator=g) < 0.3] = 0
        idx = torch.zeros(N, 1, dtype=torch.long)  # only latent 0
        acc.update(torch.randn(N, 4, generator=g), idx, val, torch.ones(N, dtype=torch.bool), 8, b * N)
        all_vals.append(val[:, 0])
    vals = torch.cat(all_vals)
    stream = torch.zeros(len(vals), dtype=torch.int32)
    from nanosae.features import _finish

    t = _finish(acc, stream, 8, cfg)
    nz = vals[vals > 0]
    assert int(t["count"][0]) == len(nz) and float(t["max"][0]) == pytest.approx(float(nz.max()))
    assert int(acc.hist[0].sum()) == len(nz)
    sampled = set()
    for m in range(cfg.n_intervals):
        lo, hi = t["iv_bounds"][0, m].tolist()
        inside = (nz >= lo) & ((nz <= hi) if m == cfg.n_intervals - 1 else (nz < hi))
        if m == 0:
            inside |= nz < hi
        assert float(t["iv_contains"][0, m]) * acc.n == pytest.approx(int(inside.sum()))
        got = t["iv_pos"][0, m]
        got = got[got >= 0]
        assert len(got) == int(inside.sum())  # every activation of the interval survived the merges
        sampled |= set(got.tolist())
    assert sampled == set((vals > 0).nonzero().squeeze(1).tolist())
    assert torch.allclose(t["top_val"][0], nz.topk(3).values)


def test_interval_samples_are_uniform():
    """300 latents see the same 40 activations, uniform on (0, 1], in 4 batches of increasing value (so each
    latent's range doubles several times); each latent samples 2 from its one interval with its own random
    keys. Every activation must be picked about equally often, whichever batch it came in."""
    cfg = FeatureConfig(n_tokens=64, seq_len=8, top_k=1, interval_samples=2, n_intervals=1, ctx_before=0, ctx_after=0)
    D = 300
    vals = torch.linspace(0.025, 1.0, 40)
    acc = _Pass(d_sae=D, d_in=2, cfg=cfg, device="cpu")
    for b in range(4):
        v = vals[b * 10 : b * 10 + 10, None].expand(10, D).clone()
        idx = torch.arange(D).expand(10, D)
        acc.update(torch.zeros(10, 2), idx, v, torch.ones(10, dtype=torch.bool), 10, b * 10)
    from nanosae.features import _finish

    t = _finish(acc, torch.zeros(40, dtype=torch.int32), 10, cfg)
    hits = torch.bincount(t["iv_pos"][:, 0].reshape(-1), minlength=40)
    assert int(hits.sum()) == 2 * D  # expected 15 per activation; a sampler favouring late batches fails
    assert int(hits[:20].sum()) == pytest.approx(D, abs=60) and int(hits.min()) >= 3 and int(hits.max()) <= 32


def test_mismatched_sae_and_model_errors(d4, batches):
    model, tok, _ = d4
    with pytest.raises(NanosaeError, match="reads 64-wide"):
        compute_features(model, tok, make_sae("topk", d_in=64), batches, progress=False)
    with pytest.raises(NanosaeError, match="layers 0..3"):
        compute_features(model, tok, make_sae("topk", site="blocks.9.resid_post"), batches, progress=False)


def test_mlp_hidden_site_and_cache(d4, tmp_path, monkeypatch):
    model, tok, _ = d4
    sae = make_sae("standard", site="blocks.1.mlp_hidden", d_in=512, d_sae=64)
    sae.save(tmp_path / "sae")
    cfg = FeatureConfig(n_tokens=512, seq_len=64)
    stats = load_or_compute(model, tok, sae, tmp_path / "sae", None, cfg, progress=False)
    dirs = sae.W_dec.detach() @ model.transformer.h[1].mlp.c_proj.weight.T
    lg = dirs @ model.lm_head.weight[: model.config.vocab_size].T
    assert torch.equal(stats.t["pos_idx"][:, 0], lg.argmax(1))
    # a second call reuses the saved statistics; a different setting recomputes
    import nanosae.features as features

    monkeypatch.setattr(features, "compute_features", lambda *a, **k: pytest.fail("recomputed"))
    again = load_or_compute(model, tok, sae, tmp_path / "sae", None, cfg, progress=False)
    assert again.meta == stats.meta and torch.equal(again.t["top_win"], stats.t["top_win"])
    assert again.vocab == stats.vocab and isinstance(again, FeatureStats)
    with pytest.raises(BaseException, match="recomputed"):
        load_or_compute(model, tok, sae, tmp_path / "sae", None, FeatureConfig(n_tokens=256, seq_len=64))


def test_damaged_saved_statistics_are_refused_and_left_as_they_are(d4, tmp_path):
    from nanosae.runtime import load_runtime

    model, tok, _ = d4
    sae = make_sae("topk", site="blocks.1.resid_post", d_in=128, d_sae=64)
    sae.save(tmp_path / "sae")
    cfg = FeatureConfig(n_tokens=512, seq_len=64)
    load_or_compute(model, tok, sae, tmp_path / "sae", None, cfg, progress=False)
    path = tmp_path / "sae" / "feature_stats" / "stats.safetensors"
    raw = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(raw[:8], "little")  # after safetensors' length-prefixed JSON header
    raw[(data_start + len(raw)) // 2] ^= 0x40  # one bit in the middle of the tensor data
    path.write_bytes(bytes(raw))
    for read in (
        lambda: load_or_compute(model, tok, sae, tmp_path / "sae", None, cfg, progress=False),
        lambda: FeatureStats.load(tmp_path / "sae" / "feature_stats"),
        lambda: load_runtime(tmp_path / "sae", model),  # the steering units come from these statistics
    ):
        with pytest.raises(NanosaeError, match=r"stats.safetensors: damaged \(its sha256 differs.*--recompute"):
            read()
    assert path.read_bytes() == bytes(raw)  # nothing was overwritten
    (tmp_path / "sae" / "feature_stats" / "meta.json.sha256").unlink()
    with pytest.raises(NanosaeError, match=r"meta.json: no checksum"):
        FeatureStats.load(tmp_path / "sae" / "feature_stats")
