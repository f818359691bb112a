"""Core eval metrics against plain, independent computations on the real d4 model and hand-built SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanosae.cli import main
from nanosae.data import token_batches
from nanosae.errors import NanosaeError
from nanosae.evaluate import evaluate, make_train_eval
from nanosae.hooks import add_hooks, capture
from nanosae.sae import SAE, SAEConfig

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
SITE = "blocks.1.resid_post"
D = 128


@pytest.fixture(scope="module")
def rows(d4):
    """6 rows of 64 real tokens with special tokens planted mid-row (besides each row's leading BOS)."""
    _, tok, _ = d4
    r = next(token_batches(tok, None, 6, 64, "val")).clone()
    r[1, 10] = tok.encode_special("<|user_start|>")
    r[2, 30] = tok.bos_token_id
    r[4, 5] = tok.encode_special("<|assistant_end|>")
    r[4, 6] = tok.encode_special("<|python_start|>")
    return r


def special_mask(tok, r):
    return ~torch.isin(r, torch.tensor(sorted(tok.special_ids())))


def make_sae(arch: str, seed: int = 0, d_sae: int = 256, **kw) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(architecture=arch, d_in=D, d_sae=d_sae, hook_name=SITE, model_name="nanochat-d4", **kw)
    sae = SAE(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("W") else 0.2))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(d_sae, generator=g))
    return sae


def plus_minus_identity() -> SAE:
    """relu(x) - relu(-x) = x: an exact identity with a ReLU SAE of width 2 d."""
    sae = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=2 * D, hook_name=SITE))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(D), -torch.eye(D)], dim=1))
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


@torch.no_grad()
def reference(sae, model, tok, r, batch_size, exclude=True):
    """Every metric computed directly on all tokens at once (and per batch for SAEBench's formulas)."""
    keep = special_mask(tok, r)
    with capture(model, [SITE]) as got:
        clean = model(r)
    x = got[SITE][0]
    X = x[keep].double()
    f = sae.encode(x[keep])
    Xh = sae.decode(f).double()
    err = ((X - Xh) ** 2).sum(-1)
    out = {
        "l0": (f != 0).sum(-1).double().mean(),
        "l1": f.sum(-1).double().mean(),
        "mse": err.mean(),
        "explained_variance": 1 - err.mean() / ((X - X.mean(0)) ** 2).sum(-1).mean(),
        "cossim": ((X * Xh).sum(-1) / (X.norm(dim=-1) * Xh.norm(dim=-1))).mean(),
        "l2_norm_in": X.norm(dim=-1).mean(),
        "l2_norm_out": Xh.norm(dim=-1).mean(),
        "l2_ratio": (Xh.norm(dim=-1) / X.norm(dim=-1)).mean(),
        "relative_reconstruction_bias": (Xh**2).sum(-1).mean() / (X * Xh).sum(-1).mean(),
        "density": (f > 0).double().mean(0),
    }
    fired_rows = torch.stack([(sae.encode(x[i][keep[i]]) > 0).any(0) for i in range(len(r))]).double().sum(0)
    out["cah"] = (f > 0).double().sum(0) / fired_rows

    # SAEBench: per batch, then averaged over batches
    ev_legacy, mse_sb, mss, mres, rrb = [], [], [], [], []
    for xb, kb in zip(x.split(batch_size), keep.split(batch_size)):
        Xb = xb[kb].double()
        Xhb = sae.decode(sae.encode(xb[kb])).double()
        eb = ((Xb - Xhb) ** 2).sum(-1)
        ev_legacy.append(1 - eb / ((Xb - Xb.mean(0)) ** 2).sum(-1))
        mse_sb.append(eb / len(Xb))
        mss.append((Xb**2).sum(-1).mean())
        mres.append(eb.mean())
        rrb.append((Xhb**2).sum(-1).mean() / (Xb * Xhb).sum(-1).mean())
    mss_mean = torch.stack(mss).mean()
    out["explained_variance_saebench"] = 1 - torch.stack(mres).mean() / (mss_mean - (mss_mean / D) ** 2)
    out["explained_variance_legacy"] = torch.cat(ev_legacy).mean()
    out["mse_saebench"] = torch.cat(mse_sb).mean()
    out["relative_reconstruction_bias_saebench"] = torch.stack(rrb).mean()

    # CE / KL: splice at unmasked tokens, zero-ablate everywhere, drop masked positions (CE keyed on input)
    splice_at = keep if exclude else torch.ones_like(keep)

    def splice(a, start):
        return torch.where(splice_at[..., None], sae(a), a)

    with add_hooks(model, {SITE: splice}):
        sae_logits = model(r)
    with add_hooks(model, {SITE: lambda a, start: a * 0}):
        abl_logits = model(r)

    def ce(logits):
        V = logits.shape[-1]
        per = F.cross_entropy(logits[:, :-1].reshape(-1, V), r[:, 1:].reshape(-1), reduction="none").view(len(r), -1)
        return per[keep[:, :-1]].double().mean()

    def kl(logits):
        p = clean.softmax(-1)
        return (p * (clean.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)[keep].double().mean()

    out.update(
        ce_clean=ce(clean), ce_sae=ce(sae_logits), ce_abl=ce(abl_logits), kl_sae=kl(sae_logits), kl_abl=kl(abl_logits)
    )
    out["ce_score"] = (out["ce_abl"] - out["ce_sae"]) / (out["ce_abl"] - out["ce_clean"])
    out["kl_score"] = (out["kl_abl"] - out["kl_sae"]) / out["kl_abl"]
    return {k: v.item() if v.dim() == 0 else v for k, v in out.items()}


def run(sae, d4, r, **kw):
    model, tok, _ = d4
    kw.setdefault("batch_size", 4)
    return evaluate(sae, model, tok, r, r.numel(), ce_tokens=r.numel(), progress=False, **kw)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_every_metric_matches_independent_computation(d4, rows, arch):
    model, tok, _ = d4
    sae = make_sae(arch, k=16 if arch == "topk" else None)
    res = run(sae, d4, rows)
    ref = reference(sae, model, tok, rows, batch_size=4)
    m = res["eval_result_metrics"]
    rq, sh, sp = m["reconstruction_quality"], m["shrinkage"], m["sparsity"]
    got = {
        "l0": sp["l0"],
        "l1": sp["l1"],
        "mse": rq["mse"],
        "explained_variance": rq["explained_variance"],
        "explained_variance_legacy": rq["explained_variance_legacy"],
        "cossim": rq["cossim"],
        "l2_norm_in": sh["l2_norm_in"],
        "l2_norm_out": sh["l2_norm_out"],
        "l2_ratio": sh["l2_ratio"],
        "relative_reconstruction_bias": sh["relative_reconstruction_bias"],
        "ce_clean": m["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_sae": m["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_abl": m["model_performance_preservation"]["ce_loss_with_ablation"],
        "ce_score": m["model_performance_preservation"]["ce_loss_score"],
        "kl_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
        "kl_abl": m["model_behavior_preservation"]["kl_div_with_ablation"],
        "kl_score": m["model_behavior_preservation"]["kl_div_score"],
    }
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-4, abs=1e-6), k
    assert m["model_performance_preservation"]["ce_loss_diff"] == pytest.approx(
        ref["ce_sae"] - ref["ce_clean"], abs=1e-5
    )
    assert 0 < ref["l0"] < sae.cfg.d_sae  # the SAEs are genuinely sparse-ish, not trivially all-on/off

    details = res["eval_result_details"]
    density = torch.tensor([d["feature_density"] for d in details], dtype=torch.float64)
    assert torch.allclose(density, ref["density"], atol=1e-12)
    cah = torch.tensor([d["consistent_activation_heuristic"] for d in details], dtype=torch.float64)
    alive = ref["density"] > 0
    assert torch.allclose(cah[alive], ref["cah"][alive], rtol=1e-6) and cah[~alive].isnan().all()
    misc = m["misc_metrics"]
    assert misc["frac_alive"] == pytest.approx(alive.double().mean().item())
    assert misc["freq_over_1_percent"] == pytest.approx((ref["density"] > 0.01).double().mean().item())
    assert misc["freq_over_10_percent"] == pytest.approx((ref["density"] > 0.1).double().mean().item())
    dense = ref["density"][ref["density"] > 0.1].sum() / ref["density"].sum()
    assert misc["normalized_freq_over_10_percent"] == pytest.approx(dense.item())

    # weight-based per-latent metrics, with the full cosine matrix
    Wd = F.normalize(sae.W_dec.detach(), dim=-1)
    cos = Wd @ Wd.T
    cos.fill_diagonal_(-2)
    We = sae.W_enc.detach()
    for key, want in [
        ("max_decoder_cosine_sim", cos.max(1).values),
        ("encoder_norm", We.norm(dim=0)),
        ("encoder_decoder_cosine_sim", (We.T * sae.W_dec.detach()).sum(-1) / (We.norm(dim=0) * sae.W_dec.norm(dim=-1))),
    ]:
        assert torch.allclose(torch.tensor([d[key] for d in details]), want.float(), atol=1e-5), key
    assert misc["average_max_decoder_cosine_sim"] == pytest.approx(cos.max(1).values.mean().item(), abs=1e-6)


def test_saebench_compat_reproduces_its_formulas(d4, rows):
    model, tok, _ = d4
    sae = make_sae("topk", k=8, seed=1)
    ref = reference(sae, model, tok, rows, batch_size=4)
    res = run(sae, d4, rows, saebench_compat=True)
    rq, sh = res["eval_result_metrics"]["reconstruction_quality"], res["eval_result_metrics"]["shrinkage"]
    assert res["eval_config"]["saebench_compat"] is True
    assert rq["explained_variance"] == pytest.approx(ref["explained_variance_saebench"], rel=1e-6)
    assert rq["mse"] == pytest.approx(ref["mse_saebench"], rel=1e-6)
    assert sh["relative_reconstruction_bias"] == pytest.approx(ref["relative_reconstruction_bias_saebench"], rel=1e-6)
    # both variants are always present under explicit names; the quirky ones really differ here
    assert rq["explained_variance_centered"] == pytest.approx(ref["explained_variance"], rel=1e-5)
    assert rq["mse_per_token"] == pytest.approx(ref["mse"], rel=1e-5)
    assert abs(rq["explained_variance_saebench"] - rq["explained_variance_centered"]) > 0.01
    assert rq["mse_saebench"] < rq["mse_per_token"] / 100  # divided by the ~250 unmasked tokens per batch


def test_identity_sae_is_perfect(d4, rows):
    res = run(plus_minus_identity(), d4, rows)
    m = res["eval_result_metrics"]
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert m["reconstruction_quality"]["mse"] == pytest.approx(0.0, abs=1e-9)
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-6)
    assert m["model_behavior_preservation"]["kl_div_with_ablation"] > 0.1


def test_zero_sae_scores_zero(d4, rows):
    model, tok, _ = d4
    zero = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=64, hook_name=SITE))
    everywhere = run(zero, d4, rows, exclude_special_tokens_from_reconstruction=False)["eval_result_metrics"]
    assert everywhere["model_performance_preservation"]["ce_loss_score"] == pytest.approx(0.0, abs=1e-9)
    assert everywhere["model_behavior_preservation"]["kl_div_score"] == pytest.approx(0.0, abs=1e-9)
    assert everywhere["misc_metrics"]["frac_alive"] == 0.0
    # the standard run keeps the original activation at special tokens, so it is not a full ablation
    masked = run(zero, d4, rows)["eval_result_metrics"]["model_performance_preservation"]
    ref = reference(zero, model, tok, rows, batch_size=4)
    assert masked["ce_loss_with_sae"] == pytest.approx(ref["ce_sae"], rel=1e-5)
    assert masked["ce_loss_with_sae"] != pytest.approx(masked["ce_loss_with_ablation"], rel=1e-3)


def test_special_tokens_masked_by_id(d4, rows):
    model, tok, _ = d4
    sae = make_sae("standard", seed=2)
    keep = special_mask(tok, rows)
    assert (~keep).sum() == len(rows) + 4  # leading BOS per row + the 4 planted
    res = run(sae, d4, rows)
    ts = res["eval_result_metrics"]["token_stats"]
    assert ts["total_tokens_eval_sparsity_variance"] == rows.numel()
    assert ts["unmasked_tokens_eval_sparsity_variance"] == keep.sum().item()
    assert ts["unmasked_positions_eval_ce"] == keep[:, :-1].sum().item()
    assert ts["unmasked_positions_eval_kl"] == keep.sum().item()
    assert res["eval_config"]["ignore_token_ids"] == sorted(tok.special_ids())
    assert res["eval_result_unstructured"]["mask_policy"]["masked_token_ids"][str(tok.bos_token_id)] == "<|bos|>"
    # (the metric values with these planted specials are checked in test_every_metric_...); splicing at
    # every token instead matches its own reference and changes CE, so the splice mask is really applied
    all_spliced = run(sae, d4, rows, exclude_special_tokens_from_reconstruction=False)
    ref_all = reference(sae, model, tok, rows, batch_size=4, exclude=False)
    ce = all_spliced["eval_result_metrics"]["model_performance_preservation"]["ce_loss_with_sae"]
    assert ce == pytest.approx(ref_all["ce_sae"], rel=1e-5)
    assert ce != pytest.approx(res["eval_result_metrics"]["model_performance_preservation"]["ce_loss_with_sae"])


def test_batch_size_does_not_change_pooled_metrics(d4, rows):
    sae = make_sae("topk", k=16, seed=3)
    a = run(sae, d4, rows, batch_size=1)["eval_result_metrics"]
    b = run(sae, d4, rows, batch_size=6)["eval_result_metrics"]
    for cat, key in [
        ("reconstruction_quality", "explained_variance"),
        ("reconstruction_quality", "mse"),
        ("sparsity", "l1"),
        ("model_performance_preservation", "ce_loss_score"),
        ("model_behavior_preservation", "kl_div_with_sae"),
    ]:
        assert a[cat][key] == pytest.approx(b[cat][key], rel=1e-5), key


def test_centered_ev_is_stable_with_a_large_mean(d4):
    """Float64 streaming (Chan merge) keeps centered EV right when ‖mean‖² ≫ variance."""
    from nanosae.evaluate import _Stats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 16, generator=g) * 0.01 + 100.0
    xh = x + torch.randn(4096, 16, generator=g) * 0.001
    stats = _Stats(16, 4, torch.device("cpu"))
    for xb, xhb in zip(x.split(512), xh.split(512)):
        stats.update(xb[None], torch.zeros(1, len(xb), 4), xhb[None], torch.ones(1, len(xb), dtype=torch.bool))
    X, Xh = x.double(), xh.double()
    want = 1 - ((X - Xh) ** 2).sum(-1).mean() / ((X - X.mean(0)) ** 2).sum(-1).mean()
    assert stats.metrics()["explained_variance_centered"] == pytest.approx(want.item(), abs=1e-6)


def test_train_eval_matches_full_eval(d4, rows):
    model, tok, _ = d4
    fn = make_train_eval(model, tok, rows, rows.numel(), batch_size=4)
    ident = fn(plus_minus_identity())
    assert ident["ce_loss_score"] == pytest.approx(1.0, abs=1e-6)
    assert ident["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert ident["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)

    sae = make_sae("standard", seed=4)
    quick = fn(sae)
    full = run(sae, d4, rows)["eval_result_metrics"]
    assert quick["ce_loss_score"] == pytest.approx(full["model_performance_preservation"]["ce_loss_score"], rel=1e-5)
    assert quick["kl_div_score"] == pytest.approx(full["model_behavior_preservation"]["kl_div_score"], rel=1e-5)
    assert quick["explained_variance"] == pytest.approx(full["reconstruction_quality"]["explained_variance"], rel=1e-5)
    assert quick["l0"] == pytest.approx(full["sparsity"]["l0"], rel=1e-6)


def test_bad_inputs_raise_clear_errors(d4, rows, tmp_path, capsys):
    model, tok, _ = d4
    wide = SAE(SAEConfig(architecture="standard", d_in=64, d_sae=32, hook_name=SITE))
    with pytest.raises(NanosaeError, match="reads 64-wide"):
        evaluate(wide, model, tok, rows, 64, progress=False)
    for site in ("blocks.9.resid_post", "blocks.1.nowhere"):
        sae = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=32, hook_name=site))
        with pytest.raises(NanosaeError, match="site"):
            evaluate(sae, model, tok, rows, 64, progress=False)
    other = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=32, hook_name=SITE, model_name="nanochat-d20"))
    with pytest.raises(NanosaeError, match="nanochat-d20"):
        evaluate(other, model, tok, rows, 64, progress=False)
    assert evaluate(other, model, tok, rows, 64, check_model=False, progress=False)["eval_type_id"] == "core"
    assert main(["eval", "--sae", str(tmp_path / "missing"), "--model", str(BASE_DIR)]) == 2
    assert "SAE folder" in capsys.readouterr().err


def test_cli_writes_saebench_json_and_histogram(d4, tmp_path, capsys):
    sae = make_sae("topk", k=8, seed=5)
    sae.save(tmp_path / "sae")
    out = tmp_path / "res" / "core.json"
    argv = ["eval", "--sae", str(tmp_path / "sae"), "--model", str(BASE_DIR), "--tokens", "4096", "--json", str(out)]
    assert main(argv + ["--ce-tokens", "2048", "--batch-size", "8", "--context-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "ce_loss_score" in printed and "explained variance" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {
        "eval_type_id",
        "eval_config",
        "eval_id",
        "datetime_epoch_millis",
        "eval_result_metrics",
        "eval_result_details",
        "sae_bench_commit_hash",
        "sae_lens_id",
        "sae_lens_release_id",
        "sae_lens_version",
        "sae_cfg_dict",
        "eval_result_unstructured",
    }
    assert set(res["eval_result_metrics"]) == {
        "model_behavior_preservation",
        "model_performance_preservation",
        "reconstruction_quality",
        "shrinkage",
        "sparsity",
        "token_stats",
        "misc_metrics",
    }
    assert res["eval_result_metrics"]["token_stats"]["total_tokens_eval_sparsity_variance"] == 4096
    assert res["eval_result_metrics"]["token_stats"]["total_tokens_eval_reconstruction"] == 2048
    assert res["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(8.0)
    assert len(res["eval_result_details"]) == 256
    assert all(isinstance(d["consistent_activation_heuristic"], (int, float)) for d in res["eval_result_details"])
    png = out.with_name("core_density.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_default_context_fits_a_short_context_model(d4, monkeypatch):
    """SAEBench's 128-token rows by default, the model's own context when that is shorter; an explicit size over
    the model's is refused."""
    model, tok, _ = d4
    sae = make_sae("standard", seed=5)
    monkeypatch.setattr(model.config, "sequence_len", 64)
    out = evaluate(sae, model, tok, None, 256, ce_tokens=128, batch_size=2, progress=False)
    assert out["eval_config"]["context_size"] == 64
    with pytest.raises(NanosaeError, match="exceeds the model's 64"):
        evaluate(sae, model, tok, None, 256, batch_size=2, context_size=128, progress=False)
