"""Match the latents of two SAEs read at the same site: for two widths (feature splitting), two seeds, two
checkpoints. Decoder-direction cosine between every pair, the optimal one-to-one matching that maximises the summed
cosine (the Hungarian algorithm, scipy's linear_sum_assignment), and with a model the Pearson correlation of each
matched pair's activations on the same tokens (each SAE on its own model when two are given)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import NanosaeError
from .hooks import canonical_site, run_with_cache, sae_site
from .sae import SAE

SPLIT_COS = 0.7  # a latent of the wider SAE counts as a piece of its best match in the narrower one above this


@torch.no_grad()
def decoder_cosines(a: SAE, b: SAE) -> torch.Tensor:
    """(d_a, d_b) cosines between the decoder rows of a and b."""
    return F.normalize(a.W_dec.float().cpu(), dim=-1) @ F.normalize(b.W_dec.float().cpu(), dim=-1).T


def match(cos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one matching of rows to columns with the largest summed cosine: (row ids, column ids), as many
    pairs as the smaller side has latents."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cos.double().numpy(), maximize=True)
    return torch.from_numpy(rows), torch.from_numpy(cols)


def check_same_site(a: SAE, b: SAE) -> None:
    sa, sb = (canonical_site(s.cfg.hook_name) if s.cfg.hook_name else "" for s in (a, b))
    if sa != sb or a.cfg.d_in != b.cfg.d_in:
        raise NanosaeError(
            f"the SAEs read different sites ({sa or '?'}, {a.cfg.d_in} wide vs {sb or '?'}, {b.cfg.d_in} wide); "
            "compare matches SAEs trained at the same site of models of the same size"
        )


@torch.no_grad()
def pair_correlations(
    models: tuple, a: SAE, b: SAE, ia: torch.Tensor, ib: torch.Tensor, rows: torch.Tensor, specials, batch_size=8
) -> torch.Tensor:
    """Pearson correlation over the unmasked tokens of rows between latent ia[n] of a (on models[0]) and latent
    ib[n] of b (on models[1]), for every pair n (NaN where either never varies)."""
    site = sae_site(models[0], a)
    sae_site(models[1], b)
    n = 0
    sums = torch.zeros(5, len(ia), dtype=torch.float64)  # Σx, Σx², Σy, Σy², Σxy
    special = torch.tensor(sorted(specials))
    for start in tqdm(range(0, len(rows), batch_size), desc="correlate", unit="batch", leave=False):
        idx = rows[start : start + batch_size]
        keep = ~torch.isin(idx, special).flatten()
        fa, fb = (
            sae.encode(run_with_cache(m, idx.to(m.device), [site])[1][site]).flatten(0, 1)[keep.to(m.device)].cpu()
            for m, sae in zip(models, (a, b))
        )
        x, y = fa[:, ia].double(), fb[:, ib].double()
        sums += torch.stack([x.sum(0), x.pow(2).sum(0), y.sum(0), y.pow(2).sum(0), (x * y).sum(0)])
        n += len(x)
    sx, sxx, sy, syy, sxy = sums
    var = (n * sxx - sx**2) * (n * syy - sy**2)
    return torch.where(var > 0, (n * sxy - sx * sy) / var.clamp_min(1e-300).sqrt(), math.nan).float()


def compare(a: SAE, b: SAE, models: tuple | None = None, rows: torch.Tensor | None = None, specials=()) -> dict:
    """compare.json: every matched pair (A latent, B latent, decoder cosine, activation correlation), summary
    fractions, and for SAEs of different widths the narrower SAE's latents that split into several."""
    check_same_site(a, b)
    cos = decoder_cosines(a, b)
    ia, ib = match(cos)
    mcos = cos[ia, ib]
    corr = pair_correlations(models, a, b, ia, ib, rows, specials) if models else None
    order = mcos.argsort(descending=True)
    pairs = [
        {"a": int(ia[n]), "b": int(ib[n]), "cos": round(float(mcos[n]), 4)}
        | ({"corr": None if math.isnan(corr[n]) else round(float(corr[n]), 4)} if corr is not None else {})
        for n in order.tolist()
    ]
    summary = {
        "pairs": len(pairs),
        "mean_matched_cos": mcos.mean().item(),
        "median_matched_cos": mcos.median().item(),
        "matched_cos_over_0.9": (mcos > 0.9).double().mean().item(),
        "matched_cos_over_0.7": (mcos > 0.7).double().mean().item(),
        "a_best_cos_mean": cos.max(1).values.mean().item(),  # any B latent, not only the matched one
        "b_best_cos_mean": cos.max(0).values.mean().item(),
    }
    if corr is not None:
        ok = corr[~corr.isnan()]
        summary["median_matched_corr"] = ok.median().item() if len(ok) else math.nan
        summary["matched_corr_over_0.9"] = (ok > 0.9).double().mean().item() if len(ok) else math.nan
    out = {"a": _describe(a), "b": _describe(b), "summary": summary, "pairs": pairs}
    if a.cfg.d_sae != b.cfg.d_sae:  # feature splitting: pieces of each narrow latent in the wide SAE
        narrow_is_a = a.cfg.d_sae < b.cfg.d_sae
        c = cos if narrow_is_a else cos.T  # (narrow, wide)
        best, parent = c.max(0)
        pieces = [[] for _ in range(c.shape[0])]
        for w in (best > SPLIT_COS).nonzero().flatten().tolist():
            pieces[parent[w]].append(w)
        splits = sorted(((i, p) for i, p in enumerate(pieces) if len(p) > 1), key=lambda t: -len(t[1]))
        out["splitting"] = {
            "narrow": "a" if narrow_is_a else "b",
            "cos": SPLIT_COS,
            "split_latents": len(splits),
            "largest": [{"latent": i, "pieces": p} for i, p in splits[:50]],
        }
    return out


def _describe(sae: SAE) -> dict:
    c = sae.cfg
    return {"architecture": c.architecture, "d_sae": c.d_sae, "k": c.k, "site": c.hook_name, "model": c.model_name}


def format_compare(result: dict) -> str:
    s, a, b = result["summary"], result["a"], result["b"]
    lines = [
        f"A: {a['architecture']} d_sae {a['d_sae']}   B: {b['architecture']} d_sae {b['d_sae']}   at {a['site']}",
        f"  {s['pairs']} matched pairs: decoder cos mean {s['mean_matched_cos']:.3f}, median "
        f"{s['median_matched_cos']:.3f}; {s['matched_cos_over_0.9']:.1%} above 0.9, {s['matched_cos_over_0.7']:.1%} "
        "above 0.7",
    ]
    if "median_matched_corr" in s:
        lines.append(
            f"  activation correlation of matched pairs: median {s['median_matched_corr']:.3f}, "
            f"{s['matched_corr_over_0.9']:.1%} above 0.9"
        )
    if "splitting" in result:
        sp = result["splitting"]
        top = ", ".join(f"{x['latent']}→{len(x['pieces'])}" for x in sp["largest"][:6])
        lines.append(f"  {sp['split_latents']} latents of {sp['narrow'].upper()} split into several (cos > "
                     f"{sp['cos']}): {top}")  # fmt: skip
    best = result["pairs"][:5]
    lines.append("  best pairs: " + ", ".join(f"A{p['a']}~B{p['b']} ({p['cos']:.3f})" for p in best))
    return "\n".join(lines)
