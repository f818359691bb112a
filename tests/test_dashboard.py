"""The dashboard in a real browser (headless Debian chromium via playwright), opened from file:// with no server."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch
from playwright.sync_api import expect

from nanosae.dashboard import write_dashboard
from nanosae.data import token_rows
from nanosae.features import FeatureConfig, FeatureStats, compute_features
from nanosae.sae import SAE, SAEConfig

D = 200  # 4 data chunks of 64 (the last one partial)
SCRIPT = '<script>window.__pwned=1;alert("x")</script>'
IMG = '"><img src=x onerror="window.__pwned=2">'
LABEL = 'dogs <b>bold</b> "quoted"'


def sig4(x: float) -> float:
    return float(f"{x:.4g}")


@pytest.fixture(scope="module")
def stats(d4):
    model, tok, _ = d4
    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=D, k=8, hook_name="blocks.2.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, D, generator=g) / 128**0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    rows = [r for r, _ in zip(token_rows(tok, None, 64), range(24))]
    batches = [torch.tensor(rows[i : i + 8]) for i in range(0, 24, 8)]
    cfg = FeatureConfig(n_tokens=24 * 64, seq_len=64, top_k=8, interval_samples=3)
    return compute_features(model, tok, sae, batches, cfg, progress=False)


@pytest.fixture(scope="module")
def site(stats, tmp_path_factory):
    """The dashboard, with hostile token strings planted in the top example of latent `bad`, and a label."""
    bad = int(np.argmax(stats.a("density")))
    ex = stats.examples(bad)[0]
    q = ex["tokens"][ex["index"]]
    other = next(t for t in ex["tokens"] if t != q)
    ws = next(t for t in ex["tokens"] if t not in (q, other))
    vocab = list(stats.vocab)
    vocab[q], vocab[other], vocab[ws] = SCRIPT, IMG, "\n\t "
    planted = FeatureStats(stats.meta, stats.t, vocab)
    out = tmp_path_factory.mktemp("dash")
    index = write_dashboard(planted, out, labels={5: LABEL}, progress=False)
    return index, bad, planted


@pytest.fixture()
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.errors, pg.dialogs = [], []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("request", lambda r: None if r.url.startswith("file://") else pg.errors.append(f"network: {r.url}"))
    yield pg
    assert pg.errors == [], pg.errors  # no console error, no page error, no network request
    assert pg.dialogs == []
    ctx.close()


def shown_ids(page) -> list[int]:
    return [int(x) for x in page.locator("#latents tbody tr").evaluate_all("rs => rs.map(r => r.dataset.id)")]


def test_index_sort_search_and_pages(site, page):
    index, bad, stats = site
    page.goto(index.as_uri())
    page.wait_for_selector("#latents tbody tr")
    assert page.inner_text("#count") == f"1–50 of {D} latents (page 1 of 4)"
    dens = [sig4(x) for x in stats.a("density").tolist()]
    assert shown_ids(page) == sorted(range(D), key=lambda i: (-dens[i], i))[:50]  # default: density, descending
    assert f"{D} latents" in page.inner_text("#subtitle")

    mx = [sig4(x) for x in stats.a("max").tolist()]
    page.click("th[data-sort=max]")
    assert shown_ids(page) == sorted(range(D), key=lambda i: (-mx[i], i))[:50]
    page.click("th[data-sort=max]")  # again: ascending
    assert shown_ids(page) == sorted(range(D), key=lambda i: (mx[i], i))[:50]
    page.click("#next")
    assert page.inner_text("#count").startswith("51–100 of 200")
    assert shown_ids(page) == sorted(range(D), key=lambda i: (mx[i], i))[50:100]
    page.select_option("#sort", "density")
    assert shown_ids(page)[0] == sorted(range(D), key=lambda i: (-dens[i], i))[0]

    # search by id, by label, by token text (the query matches a latent's top activating tokens)
    page.fill("#search", "#17")
    assert shown_ids(page) == [17]
    page.fill("#search", "BOLD")
    assert shown_ids(page) == [5]
    assert page.inner_text("#latents tbody tr td.label") == LABEL  # markup in a label is text
    word = next(
        stats.vocab[t]
        for i in range(D)
        for t in stats.top_tokens(i, 5)
        if len(stats.vocab[t].strip()) >= 3 and stats.vocab[t].isascii() and "<" not in stats.vocab[t]
    )
    page.fill("#search", word.strip())
    want = {i for i in range(D) if any(word.strip().lower() in stats.vocab[t].lower() for t in stats.top_tokens(i, 5))}
    got = set(shown_ids(page))
    assert got and (got == want if len(want) <= 50 else got <= want)
    page.fill("#search", "zzzz-no-such-token")
    assert page.inner_text("#count") == "no latent matches"
    # the state survives a reload: it lives in the URL
    page.fill("#search", "#42")
    page.reload()
    page.wait_for_selector("#latents tbody tr")
    assert shown_ids(page) == [42] and page.input_value("#search") == "#42"


def test_feature_page_escapes_tokens_and_loads_lazily(site, page):
    index, bad, stats = site
    page.goto(index.as_uri() + f"#/?q=%23{bad}")
    page.wait_for_selector("#latents tbody tr")
    page.click(f"#latents tbody tr[data-id='{bad}']")
    page.wait_for_selector("#top .ex")
    assert page.inner_text("#title") == f"Latent {bad}"
    assert page.url.endswith(f"#/f/{bad}")
    d = float(stats.a("density")[bad])
    assert re.search(rf"density {100 * d:.3g}%", page.inner_text("#stats"))
    assert page.locator("#top .ex").count() == len(stats.examples(bad))
    ivs = stats.intervals(bad)
    assert page.locator("[id^=interval-]").count() == len(ivs)
    for m, iv in enumerate(ivs):
        n = len(iv["examples"])
        assert page.locator(f"#interval-{m} .ex").count() == n
    assert page.locator("#pos tbody tr").count() == 10 and page.locator("#neighbours tbody tr").count() == 10
    assert page.locator("svg.hist rect").count() == 100  # two 50-bar histograms

    # hostile token strings are text: shown literally, no element injected, nothing ran
    top_text = page.inner_text("#top")
    assert SCRIPT in top_text and IMG in top_text
    assert "↵⇥␣" in top_text  # whitespace made visible
    assert page.locator("img").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("[...document.scripts].every(s => s.src && !s.textContent)")

    # hover shows the value: a title on each token and the readout next to the pointer
    first = stats.examples(bad)[0]
    q = page.locator("#top .ex").first.locator("span.q")
    assert float(q.get_attribute("title")) == pytest.approx(first["value"], rel=2e-3)
    q.hover()
    assert page.is_visible("#tip") and q.get_attribute("title") in page.inner_text("#tip")

    # only the chunks of the latents visited were loaded
    chunks = lambda: page.evaluate("[...document.scripts].map(s => s.src).filter(s => s.includes('chunk-')).length")  # noqa: E731
    assert chunks() == 1
    nb = int(stats.a("nb_idx")[bad][0])
    page.click("#neighbours tbody tr:first-child a")
    expect(page.locator("#title")).to_have_text(f"Latent {nb}")  # polls without eval (the page's CSP forbids it)
    assert chunks() == (1 if nb // 64 == bad // 64 else 2)
    page.click("text=← all latents")
    page.wait_for_selector("#latents")


def test_label_and_other_link_forms(site, page):
    index, bad, stats = site
    page.goto(index.as_uri() + "#5")  # the form `nanosae serve` links with
    page.wait_for_selector("#title")
    assert page.inner_text("#title") == "Latent 5" and page.inner_text("#label") == LABEL
    page.goto(index.as_uri() + f"#/f/{D + 3}")
    page.wait_for_selector("text=There is no latent")


def fake_stats(n: int, rng: np.random.Generator) -> FeatureStats:
    """Statistics of the right shapes for n latents (random values), to test the dashboard at 16k latents."""
    K, I, S, W, V = 4, 5, 2, 9, 300
    cfg = FeatureConfig(top_k=K, n_intervals=I, interval_samples=S, ctx_before=6, ctx_after=2)
    mx = rng.gamma(2, 2, n).astype(np.float32)
    pos = rng.integers(0, 10**6, (n, K))
    t = {
        "density": rng.beta(0.5, 50, n),
        "max": mx,
        "mean": mx / 3,
        "act_hist": rng.integers(0, 100, (n, 50)).astype(np.float32),
        "logit_hist": rng.integers(0, 20, (n, 50)).astype(np.float32),
        "logit_range": np.stack([-np.ones(n), np.ones(n)], 1).astype(np.float32),
        "top_pos": pos,
        "top_val": np.sort(rng.random((n, K)), 1)[:, ::-1].astype(np.float32) * mx[:, None],
        "top_tok": rng.integers(0, V, (n, K, W)).astype(np.int32),
        "top_win": rng.random((n, K, W)).astype(np.float16),
        "iv_pos": rng.integers(0, 10**6, (n, I, S)),
        "iv_val": rng.random((n, I, S)).astype(np.float32),
        "iv_tok": rng.integers(0, V, (n, I, S, W)).astype(np.int32),
        "iv_win": rng.random((n, I, S, W)).astype(np.float16),
        "iv_bounds": np.stack([np.arange(I) / I, (np.arange(I) + 1) / I], -1)[None].repeat(n, 0) * mx[:, None, None],
        "iv_contains": rng.random((n, I)) / 100,
    }
    for name, width in (("pos", 10), ("neg", 10), ("nb", 10), ("na", 3), ("cn", 3), ("cf", 3)):
        t[f"{name}_idx"] = rng.integers(0, min(n, V), (n, width))
    for name in ("pos_val", "neg_val", "nb_cos", "na_val", "na_l1", "cn_pearson", "cn_cos", "cf_pearson", "cf_cos"):
        t[name] = rng.random((n, 10 if name[:2] in ("po", "ne", "nb") else 3)).astype(np.float32)
    meta = {
        "config": {**cfg.__dict__},
        "site": "blocks.10.resid_post",
        "d_sae": n,
        "d_in": 1280,
        "architecture": "topk",
        "model_name": "nanochat-d20",
        "n_tokens": 10**6,
        "n_positions": 10**6,
        "n_prompts": 7812,
        "seq_len": 128,
        "dataset": "builtin",
        "special_ids": [0],
    }
    return FeatureStats(
        meta, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}, [f"t{i}" for i in range(V)]
    )


def test_sixteen_thousand_latents_stay_usable(browser, tmp_path):
    n = 16384
    stats = fake_stats(n, np.random.default_rng(0))
    t0 = time.perf_counter()
    index = write_dashboard(stats, tmp_path, progress=False)
    written = time.perf_counter() - t0
    data = tmp_path / "data"
    assert len(list(data.glob("chunk-*.js"))) == n // 64
    assert (data / "index.js").stat().st_size < 3_000_000  # the index page loads only this (plus vocab, labels)
    assert max(p.stat().st_size for p in data.glob("chunk-*.js")) < 1_000_000
    first = json.loads((data / "chunk-0.js").read_text().split("] = ", 1)[1].rstrip(";\n"))
    assert [f["i"] for f in first] == list(range(64))
    pg = browser.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(index.as_uri())
    pg.wait_for_selector("#latents tbody tr")
    assert pg.inner_text("#count") == f"1–50 of {n} latents (page 1 of {n // 50 + 1})"
    t0 = time.perf_counter()
    pg.click("th[data-sort=max]")
    pg.fill("#search", "t12")
    sorted_and_searched = time.perf_counter() - t0
    assert pg.locator("#latents tbody tr").count() > 0
    pg.goto(index.as_uri() + "#/f/16000")
    pg.wait_for_selector("#top .ex")
    assert pg.evaluate(
        "[...document.scripts].filter(s => s.src.includes('chunk-')).map(s => s.src.split('/').pop())"
    ) == ["chunk-250.js"]
    assert errors == []
    pg.close()
    print(f"16k latents: written in {written:.1f} s, sort + search {sorted_and_searched:.2f} s")


def test_cli_viz_reuses_saved_statistics(tmp_path, capsys):
    from pathlib import Path

    from nanosae.cli import main
    from nanosae.labels import set_label

    base = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
    sae = SAE(SAEConfig(architecture="topk", d_in=128, d_sae=64, k=4, hook_name="blocks.3.resid_post"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(128, 64, generator=torch.Generator().manual_seed(2)))
        sae.W_dec.copy_(sae.W_enc.T)
    sae.save(tmp_path / "sae")
    set_label(tmp_path / "sae", 3, "</script><b>x</b>")
    args = ["viz", "--sae", str(tmp_path / "sae"), "--model", str(base), "--out", str(tmp_path / "viz")]
    args += ["--tokens", "512", "--seq-len", "64", "--stats", str(tmp_path / "stats")]
    assert main(args) == 0
    assert "64 latents over" in capsys.readouterr().out
    key = tmp_path / "stats" / "key.json"
    stamp = key.stat().st_mtime_ns
    labels = (tmp_path / "viz" / "data" / "labels.js").read_text()
    assert labels.startswith("window.NANOSAE_LABELS = ") and json.loads(labels.split(" = ", 1)[1][:-2]) == {
        "3": "</script><b>x</b>"
    }
    assert main(args) == 0  # same model, SAE, data and settings: the saved statistics are reused
    assert key.stat().st_mtime_ns == stamp
    assert main(args[:-2] + ["--stats", str(tmp_path / "stats"), "--model", str(tmp_path / "nope")]) == 2
    assert "error" in capsys.readouterr().err


def test_page_code_never_parses_data_as_html():
    from pathlib import Path

    import nanosae.dashboard

    code = (Path(nanosae.dashboard.__file__).parent / "app.js").read_text()
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function", code)
    html = (Path(nanosae.dashboard.__file__).parent / "index.html").read_text()
    assert "Content-Security-Policy" in html and "script-src 'self'" in html and "http" not in html.split("<body>")[1]
