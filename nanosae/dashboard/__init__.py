"""A self-contained feature dashboard: static files that open from file:// with no network.

    out/index.html, app.js, style.css   the page and its code (copied from this package)
    out/data/index.js                   every latent's density, max, mean and top tokens (the index view)
    out/data/vocab.js, labels.js        token strings by id; labels
    out/data/pages.js                   other pages linked from the header (pages.json: their list)
    out/data/chunk-N.js                 full details of latents [N*chunk, (N+1)*chunk), loaded on demand

Browsers block fetch() from file:// pages, so data files are scripts that assign to a global and are added as
<script> tags when needed: the index loads one small file, a latent's page one chunk. The page builds all its
DOM with textContent, so token strings and labels are shown as text whatever they contain.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..fileio import atomic_write_text

ASSETS = ("index.html", "app.js", "style.css")
CHUNK = 64


def _r(a, digits: int = 4) -> list:
    """Floats rounded to `digits` significant digits, as (nested) lists. Dividing the rounded integer by an exact
    power of ten gives the double nearest the short decimal, so JSON writes it short: 2.764, not 2.763671875."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = digits - 1 - np.floor(np.log10(np.abs(a)))
    e = np.where(np.isfinite(e), e, 0).astype(np.int64)
    p = 10.0 ** np.abs(e)
    return np.where(e >= 0, np.round(a * p) / p, np.round(a / p) * p).tolist()


def _js(path: Path, target: str, obj) -> None:
    # ensure_ascii: the file is plain ASCII whatever the tokens hold, and is JavaScript as well as JSON
    atomic_write_text(path, f"{target} = {json.dumps(obj, ensure_ascii=True, separators=(',', ':'))};\n")


def _spans(tok: np.ndarray) -> tuple[list, list, list]:
    """Token ids as lists, and where each window's -1 padding (beyond its row's edges) ends and starts again."""
    valid = tok >= 0
    return tok.tolist(), valid.argmax(-1).tolist(), (valid.shape[-1] - valid[..., ::-1].argmax(-1)).tolist()


def _trim(toks: list, lo: list, hi: list, vals: list, pos: list, q: int) -> list:
    """[tokens, values, index of the activating token] per kept example, the padding cut off."""
    return [[t[a:b], v[a:b], q - a] for t, a, b, v, p in zip(toks, lo, hi, vals, pos) if p >= 0]


def feature_records(stats, lo: int, hi: int) -> list[dict]:
    """Everything the pages of latents lo..hi-1 show, compactly (token ids, not strings). Rounding and list
    conversion run once per chunk: per-latent numpy calls would dominate at 16k latents."""

    def a(name, digits=None, raw=False):
        x = stats.a(name)[lo:hi]
        return x if raw else _r(x, digits) if digits else x.tolist()

    q = stats.meta["config"]["ctx_before"]
    dens, mx, mean = a("density", 4), a("max", 4), a("mean", 4)
    act_h, log_h, log_r = a("act_hist"), a("logit_hist"), a("logit_range", 4)
    pos_i, pos_v, neg_i, neg_v = a("pos_idx"), a("pos_val", 4), a("neg_idx"), a("neg_val", 4)
    nb_i, nb_c = a("nb_idx"), a("nb_cos", 3)
    na = zip(a("na_idx"), a("na_val", 3), a("na_l1", 3))
    cn = zip(a("cn_idx"), a("cn_pearson", 3), a("cn_cos", 3))
    cf = zip(a("cf_idx"), a("cf_pearson", 3), a("cf_cos", 3))
    top = zip(*_spans(a("top_tok", raw=True)), a("top_win", 4), a("top_pos"))
    ivs = zip(*_spans(a("iv_tok", raw=True)), a("iv_win", 4), a("iv_pos"), a("iv_bounds", 4), a("iv_contains", 4))
    out = []
    for n, (na_, cn_, cf_, top_, iv_) in enumerate(zip(na, cn, cf, top, ivs)):
        intervals = []
        for toks, lo_, hi_, vals, pos, (b0, b1), c in zip(*iv_):
            if b1 > 0:
                ex = _trim(toks, lo_, hi_, vals, pos, q)
                intervals.append({"min": b0, "max": b1, "contains": c, "examples": ex})
        out.append(
            {
                "i": lo + n,
                "density": dens[n],
                "max": mx[n],
                "mean": mean[n],
                "act_hist": [int(h) for h in act_h[n]],
                "logit_hist": [int(h) for h in log_h[n]],
                "logit_range": log_r[n],
                "pos": [list(p) for p in zip(pos_i[n], pos_v[n])],
                "neg": [list(p) for p in zip(neg_i[n], neg_v[n])],
                "neighbours": [list(p) for p in zip(nb_i[n], nb_c[n])],
                "alignment": [list(r) for r in zip(*na_)],
                "corr_neurons": [list(r) for r in zip(*cn_)],
                "corr_features": [list(r) for r in zip(*cf_) if r[0] >= 0],
                "top": _trim(*top_, q),
                "intervals": intervals,
            }
        )
    return out


def write_dashboard(
    stats, out_dir: str | os.PathLike, labels: dict[int, str] | None = None, chunk: int = CHUNK, progress: bool = True
) -> Path:
    """Write the dashboard for `stats` (features.FeatureStats) into out_dir; returns the index.html path."""
    from tqdm import tqdm

    out = Path(out_dir)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in ASSETS:
        shutil.copyfile(Path(__file__).parent / name, out / name)
    for old in data.glob("chunk-*.js"):  # from an earlier, wider SAE written here
        old.unlink()
    m = stats.meta
    D = stats.d_sae
    meta = {
        k: m[k] for k in ("model_name", "site", "d_sae", "architecture", "n_tokens", "n_prompts", "seq_len", "dataset")
    }
    meta["special_ids"] = m["special_ids"]
    meta["chunk"] = chunk
    _js(
        data / "index.js",
        "window.NANOSAE_INDEX",
        {
            "meta": meta,
            "density": _r(stats.a("density")),
            "max": _r(stats.a("max")),
            "mean": _r(stats.a("mean")),
            "top": [stats.top_tokens(i, 5) for i in range(D)],
        },
    )
    _js(data / "vocab.js", "window.NANOSAE_VOCAB", stats.vocab)
    _js(data / "labels.js", "window.NANOSAE_LABELS", {str(k): v for k, v in sorted((labels or {}).items())})
    _write_pages(data)
    for c in tqdm(range(0, D, chunk), desc="dashboard", unit="chunk", disable=not progress, leave=False):
        records = feature_records(stats, c, min(D, c + chunk))
        _js(
            data / f"chunk-{c // chunk}.js",
            f"(window.NANOSAE_CHUNKS = window.NANOSAE_CHUNKS || {{}})[{c // chunk}]",
            records,
        )
    return out / "index.html"


def _write_pages(data: Path) -> None:
    pages = json.loads((data / "pages.json").read_text()) if (data / "pages.json").is_file() else []
    _js(data / "pages.js", "window.NANOSAE_PAGES", pages)


def register_page(dashboard: str | os.PathLike, title: str, href: str) -> None:
    """Link a page (href relative to the dashboard folder) from the dashboard's header; kept when viz rewrites it."""
    data = Path(dashboard) / "data"
    data.mkdir(parents=True, exist_ok=True)
    pages = json.loads((data / "pages.json").read_text()) if (data / "pages.json").is_file() else []
    pages = [p for p in pages if p["href"] != href] + [{"title": title, "href": href}]
    atomic_write_text(data / "pages.json", json.dumps(pages, indent=1))
    _write_pages(data)
