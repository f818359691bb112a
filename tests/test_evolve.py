"""nanosae evolve: one SAE over a checkpoint series (metrics equal evaluate's, correlations equal a dense
computation, resumable, bad input refused), and SAE-Track chains on planted truth."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nanosae import load_model
from nanosae.checkpoint import save_checkpoint
from nanosae.errors import NanosaeError
from nanosae.evaluate import evaluate
from nanosae.evolve import EvolveConfig, run_series, series
from nanosae.hooks import run_with_cache

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
STEPS = (100, 200, 300, 400)


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory):
    """A nanochat base dir with a series of four checkpoints: the fixture model with noise that shrinks to zero at
    the last step (a stand-in for training converging), in the real layout."""
    base = tmp_path_factory.mktemp("series")
    shutil.copytree(BASE_DIR / "tokenizer", base / "tokenizer")
    model, _, meta = load_model(BASE_DIR)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in STEPS:
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    p.copy_(final[k] + (1 - s / 400) * 0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
            save_checkpoint(base / "base_checkpoints" / "d4", s, model, meta)
    return base


CFG = EvolveConfig(tokens=2048, ce_tokens=512, batch_size=4, context_size=64)


def test_series_picks_steps_and_refuses_bad_ones(series_dir, tmp_path):
    assert [c.step for c in series(str(series_dir))] == list(STEPS)
    assert [c.label for c in series(str(series_dir), "100,400")] == ["base-000100", "base-000400"]
    with pytest.raises(NanosaeError, match=r"no step 250 .*steps present: 100, 200, 300, 400"):
        series(str(series_dir), "100,250")
    with pytest.raises(NanosaeError, match="evolve needs two or more.*--save-every"):
        series(str(BASE_DIR))  # the fixture holds one checkpoint
    with pytest.raises(NanosaeError, match="no chatsft_checkpoints"):
        series(str(series_dir), "all", ("base", "sft"))


def test_evolve_metrics_match_evaluate_and_correlations_match_dense(series_dir, hand_sae, tmp_path):
    sae, sae_dir = hand_sae
    summary, results, rows = run_series(series(str(series_dir)), lambda i: sae, tmp_path, CFG)
    first, last = summary["checkpoints"][0], summary["checkpoints"][-1]
    model, tok, _ = load_model(series_dir, 400)
    ref = evaluate(sae, model, tok, rows, rows.numel(), ce_tokens=512, batch_size=4, progress=False)
    m = ref["eval_result_metrics"]
    assert last["explained_variance"] == pytest.approx(m["reconstruction_quality"]["explained_variance"], abs=1e-6)
    assert last["l0"] == pytest.approx(m["sparsity"]["l0"])
    assert last["ce_loss_score"] == pytest.approx(m["model_performance_preservation"]["ce_loss_score"], abs=1e-6)
    # the noisier checkpoint is worse reconstructed and its latents agree less with the final one's
    assert first["explained_variance"] < last["explained_variance"]
    corr = torch.tensor(summary["latents"]["correlation"])
    alive = torch.tensor(summary["latents"]["density"])[:, -1] > 0
    assert (corr[alive, -1] == 1).all()
    assert corr[alive, 0].median() < corr[alive, 2].median() < 1

    # the correlation is Pearson's over the unmasked tokens, computed densely here
    def latents(step):
        m, _, _ = load_model(series_dir, step)
        with torch.no_grad():
            f = sae.encode(run_with_cache(m, rows, [sae.cfg.hook_name])[1][sae.cfg.hook_name]).flatten(0, 1)
            return f[rows.flatten() != tok.get_bos_token_id()]

    a, b = latents(100), latents(400)
    both = (a.std(0) > 0) & (b.std(0) > 0)
    assert both.sum() > 100
    dense = torch.tensor([torch.corrcoef(torch.stack([a[:, i], b[:, i]]))[0, 1] for i in both.nonzero().flatten()])
    assert corr[both, 0] == pytest.approx(dense, abs=2e-3)
    assert len(summary["appear"]) + len(summary["vanish"]) + len(summary["change_most"]) > 0


def test_evolve_continues_after_an_interruption(series_dir, hand_sae, tmp_path, monkeypatch):
    import nanosae.evolve as ev

    sae, _ = hand_sae
    real, calls = ev.measure, []

    def interrupted(*a, **k):
        calls.append(k.get("desc") or a[-1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "measure", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_series(series(str(series_dir)), lambda i: sae, tmp_path, CFG)
    done = sorted(p.stem for p in (tmp_path / "checkpoints").glob("*.safetensors"))
    assert len(done) == 2  # the reference (the last) and the first
    calls.clear()
    monkeypatch.setattr(ev, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _, _ = run_series(series(str(series_dir)), lambda i: sae, tmp_path, CFG)
    assert len(calls) == 2  # only the two checkpoints not done
    fresh, _, _ = run_series(series(str(series_dir)), lambda i: sae, tmp_path / "fresh", CFG)
    assert again["latents"] == fresh["latents"]
    assert again["checkpoints"] == fresh["checkpoints"]


def test_evolve_command_writes_json_plot_and_a_linked_page(series_dir, hand_sae, tmp_path, capsys):
    from nanosae.cli import main

    _, sae_dir = hand_sae
    dash = tmp_path / "dash"
    (dash / "data").mkdir(parents=True)
    (dash / "index.html").write_text("<html></html>")
    out = tmp_path / "ev"
    args = ["evolve", "--sae", str(sae_dir), "--model", str(series_dir), "--steps", "100,300,400"]
    args += ["--tokens", "1024", "--batch-size", "4", "--context-size", "64", "--out", str(out)]
    assert main(args + ["--dashboard", str(dash)]) == 0
    summary = json.loads((out / "evolve.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [100, 300, 400]
    assert (out / "evolve.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    assert "base-000300" in page and "<script" not in page and "../dash/index.html#/f/" in page
    pages = (dash / "data" / "pages.js").read_text()
    assert "../ev/index.html" in pages
    assert "base-000100" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "100,999"], "no step 999"),
        (["--model", str(BASE_DIR)], "evolve needs two or more"),
        (["--reference", "7"], "checkpoints 0..3"),
    ],
)
def test_evolve_command_bad_input_is_one_line(series_dir, hand_sae, tmp_path, capsys, extra, message):
    from nanosae.cli import main

    args = ["evolve", "--sae", str(hand_sae[1]), "--model", str(series_dir), "--out", str(tmp_path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_evolve_chain_trains_along_the_series_and_reuses_what_is_done(series_dir, tmp_path, capsys):
    from nanosae.cli import main
    from nanosae.sae import load_sae

    out = tmp_path / "chain"
    args = ["evolve", "--chain", "--model", str(series_dir), "--steps", "100,200,400", "--out", str(out)]
    args += ["--train-tokens", "8k", "--chain-tokens", "4k", "--train-batch-size", "1024", "--expansion", "2"]
    args += ["--k", "8", "--tokens", "1024", "--batch-size", "4", "--context-size", "64"]
    assert main(args) == 0
    summary = json.loads((out / "evolve.json").read_text())
    chain = summary["chain"]
    saes = [load_sae(f) for f in chain["folders"]]
    assert [s.cfg.hook_name for s in saes] == ["blocks.2.resid_post"] * 3  # the middle layer of 4
    assert len(chain["born"]) == 256 and len(chain["drift"][0]) == 2
    # each link starts from the one before: decoder rows move little over a short fine-tune
    assert torch.tensor(chain["cos_to_last"])[:, 1].median() > 0.8
    assert "latents born per checkpoint" in capsys.readouterr().out
    stamps = [(Path(f) / "checkpoint.pt").stat().st_mtime_ns for f in chain["folders"]]
    assert main(args) == 0  # nothing left to train or measure
    assert stamps == [(Path(f) / "checkpoint.pt").stat().st_mtime_ns for f in chain["folders"]]
    assert json.loads((out / "evolve.json").read_text())["chain"]["born"] == chain["born"]


def test_stats_from_sparse_latents_equal_the_dense_ones():
    from nanosae.evaluate import _Stats
    from nanosae.evolve import _sparse

    f = torch.relu(torch.randn(3, 10, 40)) * (torch.rand(3, 10, 40) < 0.2)
    x, xh = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    keep = torch.rand(3, 10) < 0.8
    dense, sparse = _Stats(8, 40, torch.device("cpu")), _Stats(8, 40, torch.device("cpu"))
    dense.update(x, f, xh, keep)
    sparse.update(x, _sparse(f), xh, keep)
    assert torch.equal(dense.fired, sparse.fired) and torch.equal(dense.fired_prompts, sparse.fired_prompts)
    assert dense.metrics() == pytest.approx(sparse.metrics())


def test_dashboard_header_links_registered_pages_as_text(d4, browser, tmp_path):
    from nanosae.dashboard import register_page, write_dashboard
    from nanosae.data import token_rows
    from nanosae.features import FeatureConfig, compute_features
    from nanosae.sae import SAE, SAEConfig

    model, tok, _ = d4
    sae = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=16, k=4, hook_name="blocks.2.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, 16) / 128**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    rows = [r for r, _ in zip(token_rows(tok, None, 32), range(8))]
    cfg = FeatureConfig(n_tokens=8 * 32, seq_len=32, top_k=4, interval_samples=2)
    stats = compute_features(model, tok, sae, [torch.tensor(rows)], cfg, progress=False)
    index = write_dashboard(stats, tmp_path / "dash", progress=False)
    title = '<img src=x onerror="window.__pwned=1"> evolve'
    register_page(tmp_path / "dash", title, "../ev/index.html")
    write_dashboard(stats, tmp_path / "dash", progress=False)  # viz again: the link stays
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(index.as_uri())
    page.wait_for_selector("#latents tbody tr")
    link = page.locator("header a", has_text="evolve")
    assert link.inner_text() == title and link.get_attribute("href") == "../ev/index.html"
    assert page.evaluate("window.__pwned") is None and errors == []
    page.close()


def test_evolve_follows_a_transcoder_and_chains_them(series_dir, tmp_path):
    """One transcoder over the series is spliced in place of block 2's MLP at each checkpoint (the last one's
    metrics are `evaluate`'s); a chain of transcoders keeps reading mlp_in and predicting mlp_out."""
    from nanosae.cli import main
    from nanosae.sae import SAE, SAEConfig, load_sae

    tc = SAE(SAEConfig("standard", 128, 64, d_out=128, hook_name="blocks.2.mlp_in", hook_name_out="blocks.2.mlp_out"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    summary, _, rows = run_series(series(str(series_dir), "100,400"), lambda i: tc, tmp_path / "one", CFG)
    model, tok, _ = load_model(series_dir, 400)
    m = evaluate(tc, model, tok, rows, rows.numel(), ce_tokens=512, batch_size=4, progress=False)["eval_result_metrics"]
    last = summary["checkpoints"][-1]
    assert last["explained_variance"] == pytest.approx(m["reconstruction_quality"]["explained_variance"], abs=1e-6)
    assert last["ce_loss_score"] == pytest.approx(m["model_performance_preservation"]["ce_loss_score"], abs=1e-6)

    args = ["evolve", "--chain", "--model", str(series_dir), "--steps", "100,400", "--out", str(tmp_path / "chain"),
            "--layer", "2", "--site", "mlp_in", "--arch", "transcoder", "--train-tokens", "4k", "--chain-tokens", "2k",
            "--train-batch-size", "1024", "--expansion", "2", "--k", "8", "--tokens", "1024", "--batch-size", "4",
            "--context-size", "64"]  # fmt: skip
    assert main(args) == 0
    chain = json.loads((tmp_path / "chain" / "evolve.json").read_text())["chain"]
    saes = [load_sae(f) for f in chain["folders"]]
    assert [(s.cfg.hook_name, s.cfg.hook_name_out, s.cfg.d_out) for s in saes] == [
        ("blocks.2.mlp_in", "blocks.2.mlp_out", 128)
    ] * 2
