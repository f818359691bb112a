"""Per-latent feature statistics in one streaming pass: what the dashboard, the exports and the labeller share.

One forward (stopped after the SAE's layer) and one encode per batch; the latents are never stored. Per latent
we keep, in memory independent of the number of tokens:
  - count, sum, sum of squares and max of its nonzero activations (density, means);
  - a 256-bin histogram over [0, hi) where hi is a power of two >= the running max. When the max outgrows hi,
    hi doubles and adjacent bins are summed, so the bins stay exact without knowing the max in advance;
  - the top-k activations (a flat top-k over all positions) with their context windows;
  - for the interval samples, a bottom-s-by-random-key reservoir in each of 32 bins over the same [0, hi):
    keeping the s smallest of iid uniform keys is a uniform sample without replacement, and the s smallest of
    two such samples are the s smallest of their union, so reservoirs merge exactly when hi doubles. At the
    end, an equal-width interval over (0, max] is the union of the 32-grid bins whose centre it contains
    (edges snapped to the grid, within max/32), and its s smallest keys are a uniform sample of it;
  - sums for Pearson/cosine correlations with the input dimensions and with the other latents of the same
    group of 128 (SAEDashboard's correlated neurons/features), all from the sparse nonzero entries.
A sample's context window (its token ids and this latent's values there) is captured when it enters a
top-k or reservoir slot, from the batch still in memory. Weight-only statistics (direct logit effects through
the unembedding, decoder-cosine neighbours, neuron alignment) are computed at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json, sha256_file, verify_sha256
from .hooks import out_site, parse_site, run_with_cache, sae_site
from .sae import SAE, saved_architecture

FINE_BINS = 256  # histogram resolution over [0, hi)
RES_BINS = 32  # reservoir grid over [0, hi): interval edges snap to within max/32
CORR_GROUP = 128  # correlated features are looked for among the latents of the same group (SAEDashboard's batch)
STATS_VERSION = 2  # 2: the files carry sha256 checksums
RECOMPUTE = "nothing was changed: compute them again (nanosae viz --recompute) or delete the folder"


@dataclass
class FeatureConfig:
    n_tokens: int = 262_144  # tokens read, in prompts of seq_len tokens
    seq_len: int = 128  # tokens per prompt (Neuronpedia uses 128)
    batch_size: int = 0  # rows per forward; 0 = about 2^24 latent values per batch
    split: str | None = "train"
    top_k: int = 20  # top activating examples kept per latent
    n_intervals: int = 5  # equal-width activation intervals over (0, max]
    interval_samples: int = 5  # examples sampled uniformly from each interval
    ctx_before: int = 16  # context window: tokens shown before and after the activating token
    ctx_after: int = 4
    n_bins: int = 50  # histogram bars (activations and logit weights)
    n_logits: int = 10  # promoted / suppressed tokens listed
    n_neighbours: int = 10  # nearest latents by decoder cosine
    n_corr: int = 3  # rows of the alignment/correlation tables
    seed: int = 0

    def __post_init__(self):
        if self.n_tokens < self.seq_len or self.seq_len < 2:
            raise NanosaeError(f"need seq_len >= 2 and n_tokens >= seq_len (got {self.n_tokens}, {self.seq_len})")
        if min(self.top_k, self.n_intervals, self.interval_samples, self.n_bins, self.n_logits) < 1:
            raise NanosaeError("top_k, n_intervals, interval_samples, n_bins and n_logits must be >= 1")


# ------------------------------------------------------------------------------------------------- the pass


class _Slots:
    """Per group, the S entries with the smallest key (in no particular order), each with its context window.
    An entry that gets in takes the slot of one that drops out; kept entries never move, so each batch writes
    only its new entries' windows."""

    def __init__(self, groups: int, S: int, W: int, device):
        self.key = torch.full((groups, S), math.inf, device=device)
        self.worst = torch.full((groups,), math.inf, device=device)  # the largest kept key (inf: a slot is free)
        self.val = torch.zeros(groups, S, device=device)
        self.pos = torch.full((groups, S), -1, dtype=torch.long, device=device)
        self.win = torch.zeros(groups, S, W, dtype=torch.float16, device=device)
        self.S = S

    def offer(self, group, key, val, pos, win) -> None:
        """Merge new entries (group, key, val, pos, win: context-window values, needed where key beats the
        group's worst kept key)."""
        keep = key < self.worst[group]
        if not keep.any():
            return
        idx = keep.nonzero().squeeze(1)
        group, key = group[idx], key[idx]
        order = torch.argsort(key)
        order = order[torch.sort(group[order], stable=True).indices]
        idx, group, key = idx[order], group[order], key[order]
        uniq, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(group), device=group.device) - torch.repeat_interleave(starts, counts)
        inv = torch.repeat_interleave(torch.arange(len(uniq), device=group.device), counts)
        m = rank < self.S  # at most S new entries per group can get in
        idx, key, rank, inv = idx[m], key[m], rank[m], inv[m]
        S, n = self.S, len(uniq)
        new = torch.full((n, S), math.inf, device=key.device)
        new[inv, rank] = key
        which = torch.full((n, S), -1, dtype=torch.long, device=key.device)
        which[inv, rank] = idx
        kept = torch.zeros(n, 2 * S, dtype=torch.bool, device=key.device)
        kept.scatter_(1, torch.cat([self.key[uniq], new], 1).topk(S, dim=1, largest=False).indices, True)
        # per group, as many old slots drop out as new entries get in: pair them up in order
        out_r, out_c = (~kept[:, :S]).nonzero(as_tuple=True)
        in_r, in_c = kept[:, S:].nonzero(as_tuple=True)
        src, k = which[in_r, in_c], new[in_r, in_c]
        real = src >= 0  # an admitted padding entry only ever meets a free slot
        rows, cols, src, k = uniq[out_r[real]], out_c[real], src[real], k[real]
        self.key[rows, cols], self.val[rows, cols], self.pos[rows, cols] = k, val[src], pos[src]
        self.win[rows, cols] = win[src]
        self.worst[uniq] = self.key[uniq].max(1).values

    def halve(self, latents: torch.Tensor, bins: int) -> None:
        """Merge bins pairwise (2b, 2b+1) -> b for these latents: their range doubled."""
        S, W = self.S, self.win.shape[-1]
        rows = (latents[:, None] * bins + torch.arange(bins, device=latents.device)).reshape(-1)
        n = len(latents)
        key = self.key[rows].view(n, bins // 2, 2 * S)
        o = key.argsort(-1)[..., :S]
        pad = bins // 2

        def merged(t, fill, extra=()):
            t = t[rows].view(n, bins // 2, 2 * S, *extra)
            oo = o.view(n, pad, S, *([1] * len(extra))).expand(n, pad, S, *extra)
            got = t.gather(2, oo)
            return torch.cat([got, torch.full_like(got, fill)], 1).view(n * bins, S, *extra)

        self.key[rows] = merged(self.key, math.inf)
        self.val[rows] = merged(self.val, 0)
        self.pos[rows] = merged(self.pos, -1)
        self.win[rows] = merged(self.win, 0, (W,))
        self.worst[rows] = self.key[rows].max(1).values


class _Pass:
    """The streaming accumulators (see the module docstring)."""

    def __init__(self, d_sae: int, d_in: int, cfg: FeatureConfig, device):
        D, self.cfg, self.device = d_sae, cfg, device
        W = cfg.ctx_before + cfg.ctx_after + 1
        self.n = 0  # counted (non-special) tokens
        self.count = torch.zeros(D, dtype=torch.long, device=device)
        self.sum = torch.zeros(D, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(D, dtype=torch.float64, device=device)
        self.max = torch.zeros(D, device=device)
        self.exp = torch.zeros(D, dtype=torch.long, device=device)  # hi = 2**exp once seen
        self.seen = torch.zeros(D, dtype=torch.bool, device=device)
        self.hist = torch.zeros(D, FINE_BINS, dtype=torch.long, device=device)
        self.top = _Slots(D, cfg.top_k, W, device)
        self.res = _Slots(D * RES_BINS, cfg.interval_samples, W, device)
        self.fx = torch.zeros(D, d_in, device=device)  # sum f_j x_d
        self.xsum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.xsq = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.ff = torch.zeros(D, CORR_GROUP, device=device)  # sum f_a f_b, b in a's group of 128
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.offs = torch.arange(-cfg.ctx_before, cfg.ctx_after + 1, device=device)

    def update(self, x: torch.Tensor, idx: torch.Tensor, val: torch.Tensor, counted: torch.Tensor, T: int, pos0: int):
        """One batch: x (N, d_in) inputs, (idx, val) (N, L) the nonzero latents per token (val 0 = none),
        counted (N,) bool, T the row length, pos0 the global position of the batch's first token."""
        D = self.count.numel()
        self.n += int(counted.sum())
        xc = x[counted].double()
        self.xsum += xc.sum(0)
        self.xsq += (xc * xc).sum(0)
        t, c = (val > 0).nonzero(as_tuple=True)
        if not len(t):
            return
        j, v = idx[t, c], val[t, c]
        self.count += torch.bincount(j, minlength=D)
        self.sum.index_add_(0, j, v.double())
        self.sumsq.index_add_(0, j, v.double() ** 2)
        bmax = torch.zeros(D, device=v.device).scatter_reduce_(0, j, v, "amax")
        self.max = torch.maximum(self.max, bmax)
        self._grow(bmax)
        hi = torch.pow(2.0, self.exp[j].float())
        fine = (v / hi * FINE_BINS).long().clamp_(0, FINE_BINS - 1)
        self.hist.view(-1).index_add_(0, j * FINE_BINS + fine, torch.ones_like(fine))
        pos = pos0 + t
        # (token, latent) -> value lookups for the context windows: each row's latents sorted, so the flat keys
        # token * D + latent are sorted and a window is a binary search, not a scan of every latent of a token
        sidx, order = idx.sort(dim=1)
        keys = (torch.arange(len(idx), device=idx.device)[:, None] * D + sidx).reshape(-1)
        kval = val.gather(1, order).reshape(-1)

        rgroup = j * RES_BINS + (v / hi * RES_BINS).long().clamp_(0, RES_BINS - 1)
        rkey = torch.rand(len(v), generator=self.gen, device=v.device)
        # context windows (this latent's values around the entry) only for entries that enter a top-k or a
        # reservoir slot, once for both, from the batch still in memory
        k = ((-v < self.top.worst[j]) | (rkey < self.res.worst[rgroup])).nonzero().squeeze(1)
        p = (t[k, None] % T) + self.offs
        q = (t[k, None] + self.offs).clamp(0, len(idx) - 1) * D + j[k, None]
        at = torch.searchsorted(keys, q).clamp_(max=len(keys) - 1)
        win = torch.zeros(len(v), len(self.offs), dtype=torch.float16, device=v.device)
        win[k] = torch.where((keys[at] == q) & (p >= 0) & (p < T), kval[at], 0).clamp_(max=65504).half()
        self.top.offer(j, -v, v, pos, win)
        self.res.offer(rgroup, rkey, v, pos, win)
        self._correlations(x, t, j, v, idx, val)

    def _grow(self, bmax: torch.Tensor) -> None:
        active = bmax > 0
        target = torch.ceil(torch.log2(bmax.clamp(min=1e-38))).long()
        new = active & ~self.seen
        self.exp[new] = target[new]
        self.seen |= active
        grow = active & ~new & (target > self.exp)
        if not grow.any():
            return
        steps = (target - self.exp).clamp(max=int(math.log2(FINE_BINS)))  # beyond that all sits in bin 0
        for r in range(int(steps[grow].max())):
            ids = (grow & (steps > r)).nonzero().squeeze(1)
            h = self.hist[ids].view(len(ids), FINE_BINS // 2, 2).sum(-1)
            self.hist[ids] = torch.cat([h, torch.zeros_like(h)], 1)
            if r < int(math.log2(RES_BINS)):
                self.res.halve(ids, RES_BINS)
        self.exp[grow] = target[grow]

    def _correlations(self, x, t, j, v, idx, val) -> None:
        # sum_t f_j(t) x(t) as a sparse (d_sae x N) @ dense (N x d_in) product, accumulated in place
        S = torch.sparse_coo_tensor(torch.stack([j, t]), v, (self.fx.shape[0], len(x)), check_invariants=False)
        torch.addmm(self.fx, S, x, out=self.fx)
        # pairs of active latents of the same token and group, each unordered pair once (p < q), added both ways;
        # inactive slots get distinct negative group ids so they never pair
        L = idx.shape[1]
        ar = torch.arange(L, device=idx.device)
        grp = torch.where(val > 0, idx // CORR_GROUP, -1 - ar)
        upper = ar[:, None] < ar[None, :]
        step = max(1, (1 << 22) // (L * L))
        for s in range(0, len(idx), step):
            g = grp[s : s + step]
            r, p, q = ((g[:, :, None] == g[:, None, :]) & upper).nonzero(as_tuple=True)
            r = r + s
            a, b, w = idx[r, p], idx[r, q], val[r, p] * val[r, q]
            flat = self.ff.view(-1)
            flat.index_add_(0, a * CORR_GROUP + b % CORR_GROUP, w)
            flat.index_add_(0, b * CORR_GROUP + a % CORR_GROUP, w)


def _batches(tokenizer, source, cfg: FeatureConfig, rows: int) -> Iterator[torch.Tensor]:
    from .data import token_rows

    batch, total = [], 0
    for row in token_rows(tokenizer, source, cfg.seq_len, cfg.split):
        batch.append(row)
        total += cfg.seq_len
        if len(batch) == rows or total + cfg.seq_len > cfg.n_tokens:
            yield torch.tensor(batch)
            batch = []
        if total + cfg.seq_len > cfg.n_tokens:
            return
    if batch:
        yield torch.tensor(batch)


def batch_rows(cfg: FeatureConfig, d_sae: int) -> int:
    """Rows per forward: about 2^24 latent values (64 MB of fp32) per batch unless set."""
    if cfg.batch_size:
        return cfg.batch_size
    return max(1, min(64, (1 << 24) // (cfg.seq_len * d_sae)))


@torch.inference_mode()
def compute_features(
    model,
    tokenizer,
    sae: SAE,
    batches: Iterable[torch.Tensor] | None = None,
    cfg: FeatureConfig | None = None,
    source: str | os.PathLike | None = None,
    progress: bool = True,
) -> FeatureStats:
    """One streaming pass over `batches` (LongTensor (B, T) rows), or over cfg.n_tokens of `source`."""
    cfg = cfg or FeatureConfig()
    site = sae_site(model, sae)
    device = sae.device
    D = sae.cfg.d_sae
    if batches is None:
        batches = _batches(tokenizer, source, cfg, batch_rows(cfg, D))
    special = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    special[list(tokenizer.special_ids())] = True
    acc = _Pass(D, sae.cfg.d_in, cfg, device)
    rows: list[torch.Tensor] = []
    pos0 = 0
    bar = tqdm(total=cfg.n_tokens, unit="tok", desc="features", disable=not progress, leave=False)
    for tokens in batches:
        tokens = tokens.to(model.device)
        B, T = tokens.shape
        _, acts = run_with_cache(model, tokens, [site], stop_early=True)
        x = acts[site].reshape(B * T, -1).to(device=device, dtype=torch.float32)
        val, idx = sae.encode_sparse(x)  # (N, L): each token's active latents, zero-padded
        counted = ~special[tokens.reshape(-1).to(device)]
        val[~counted] = 0  # special tokens (BOS) never count, as in SAEDashboard
        acc.update(x, idx, val, counted, T, pos0)
        rows.append(tokens.to("cpu", torch.int32))
        pos0 += B * T
        bar.update(B * T)
    bar.close()
    if not rows:
        raise NanosaeError(f"no text in {source or 'the data source'}: nothing to compute features from")
    if len({r.shape[1] for r in rows}) != 1:
        raise NanosaeError("all batches must have the same row length")
    stream = torch.cat(rows).reshape(-1)
    t = _finish(acc, stream, rows[0].shape[1], cfg)
    out = out_site(model, sae)  # logit effects: from where the decoder writes (a transcoder's output site)
    t.update(_weight_stats(model, sae, out, cfg))
    meta = {
        "version": STATS_VERSION,
        "config": dataclasses.asdict(cfg),
        "site": site,
        **({"site_out": out} if out != site else {}),
        "d_sae": D,
        "d_in": sae.cfg.d_in,
        "architecture": saved_architecture(sae.cfg),  # SAELens' name (jumprelu_transcoder for a transcoder)
        "model_name": getattr(getattr(model, "info", None), "name", "") or sae.cfg.model_name,
        "n_tokens": acc.n,
        "n_positions": pos0,
        "n_prompts": len(stream) // rows[0].shape[1],
        "seq_len": rows[0].shape[1],
        "dataset": "builtin" if source is None else str(source),
        "special_ids": sorted(tokenizer.special_ids()),
    }
    vocab = [tokenizer.id_to_token(i) for i in range(model.config.vocab_size)]
    return FeatureStats(meta, {k: v.contiguous().cpu() for k, v in t.items()}, vocab)


def _finish(acc: _Pass, stream: torch.Tensor, T: int, cfg: FeatureConfig) -> dict[str, torch.Tensor]:
    D, n = acc.count.numel(), max(acc.n, 1)
    out = {
        "count": acc.count,
        "density": acc.count.double() / n,
        "mean": (acc.sum / acc.count.clamp(min=1)).float(),
        "mean_all": (acc.sum / n).float(),
        "max": acc.max,
    }
    hi = torch.where(acc.seen, torch.pow(2.0, acc.exp.double()), torch.ones(D, dtype=torch.float64, device=acc.device))
    # activation histogram: n_bins over [0, max], from the fine bins over [0, hi), linear within a fine bin
    cum = torch.cat([torch.zeros(D, 1, device=acc.device), acc.hist.double().cumsum(1)], 1)
    edges = acc.max.double()[:, None] * torch.linspace(0, 1, cfg.n_bins + 1, device=acc.device, dtype=torch.float64)
    f = (edges / hi[:, None] * FINE_BINS).clamp(0, FINE_BINS)
    b = f.floor().long().clamp(max=FINE_BINS - 1)
    cdf = cum.gather(1, b) + (f - b) * acc.hist.double().gather(1, b)
    cdf[:, -1] = cum[:, -1]
    out["act_hist"] = cdf.diff(dim=1).round().float()
    # windows: token ids around each kept position (-1 outside the row)
    offs = acc.offs.cpu()

    def tokens_at(pos):
        pos = pos.cpu()
        p = pos[..., None] + offs
        ok = (pos[..., None] >= 0) & (p // T == pos[..., None] // T) & (p >= 0)
        return torch.where(ok, stream[p.clamp(0, len(stream) - 1)], torch.tensor(-1, dtype=torch.int32))

    o = acc.top.key.argsort(1)  # slots are unordered: largest activation first
    top_pos = acc.top.pos.gather(1, o)
    out.update(
        top_val=acc.top.val.gather(1, o) * (top_pos >= 0),
        top_pos=top_pos,
        top_win=acc.top.win.gather(1, o[..., None].expand_as(acc.top.win)),
        top_tok=tokens_at(top_pos),
    )
    # intervals over (0, max]: unions of the reservoir grid's bins, assigned by bin centre
    S, K = cfg.interval_samples, cfg.n_intervals
    res_count = acc.hist.view(D, RES_BINS, FINE_BINS // RES_BINS).sum(-1)
    centre = (torch.arange(RES_BINS, device=acc.device) + 0.5)[None] * (hi[:, None] / RES_BINS)
    which = (centre / (acc.max.double()[:, None] / K).clamp(min=1e-30)).floor().long().clamp(max=K - 1)
    rkey = acc.res.key.view(D, RES_BINS, S)
    bounds = torch.zeros(D, K, 2, dtype=torch.float64, device=acc.device)
    contains = torch.zeros(D, K, dtype=torch.float64, device=acc.device)
    iv_pos = torch.full((D, K, S), -1, dtype=torch.long, device=acc.device)
    iv_val = torch.zeros(D, K, S, device=acc.device)
    iv_win = torch.zeros(D, K, S, acc.res.win.shape[-1], dtype=torch.float16, device=acc.device)
    grid = torch.arange(RES_BINS + 1, device=acc.device, dtype=torch.float64)[None] * (hi[:, None] / RES_BINS)
    for m in range(K):
        inside = which == m
        keys = torch.where(inside[..., None], rkey, math.inf).view(D, RES_BINS * S)
        k, sel = keys.topk(S, dim=1, largest=False)
        ok = k < math.inf
        iv_pos[:, m] = torch.where(ok, acc.res.pos.view(D, -1).gather(1, sel), -1)
        iv_val[:, m] = acc.res.val.view(D, -1).gather(1, sel) * ok
        W = acc.res.win.shape[-1]
        iv_win[:, m] = acc.res.win.view(D, -1, W).gather(1, sel[..., None].expand(-1, -1, W)) * ok[..., None]
        lo = torch.where(inside, grid[:, :-1], math.inf).min(1).values
        hi_edge = torch.where(inside, grid[:, 1:], -math.inf).max(1).values
        bounds[:, m, 0] = torch.where(inside.any(1), lo, 0)
        bounds[:, m, 1] = torch.where(inside.any(1), torch.minimum(hi_edge, acc.max.double()), 0)
        contains[:, m] = (res_count * inside).sum(1).double() / n
    out.update(iv_pos=iv_pos, iv_val=iv_val, iv_win=iv_win, iv_tok=tokens_at(iv_pos), iv_bounds=bounds)
    out["iv_contains"] = contains
    # correlations with the input dimensions and within groups of 128 latents, over all counted tokens
    out.update(_correlations(acc, n, cfg.n_corr))
    return out


def _correlations(acc: _Pass, n: int, n_corr: int) -> dict[str, torch.Tensor]:
    """Pearson and cosine of each latent with the input dimensions and with the latents of its group of 128."""
    D, dev = acc.count.numel(), acc.device
    mu_f = acc.sum / n
    sd_f = (acc.sumsq / n - mu_f**2).clamp(min=0).sqrt()
    norm_f = acc.sumsq.sqrt()
    mu_x = acc.xsum / n
    sd_x = (acc.xsq / n - mu_x**2).clamp(min=0).sqrt()
    norm_x = acc.xsq.sqrt()
    ar = torch.arange(D, device=dev)
    other = (ar[:, None] // CORR_GROUP) * CORR_GROUP + torch.arange(CORR_GROUP, device=dev)
    valid = (other < D) & (other != ar[:, None])
    other = other.clamp(max=D - 1)
    kn, kf = min(n_corr, acc.fx.shape[1]), min(n_corr, CORR_GROUP - 1)
    out = {k: [] for k in ("cn_idx", "cn_pearson", "cn_cos", "cf_idx", "cf_pearson", "cf_cos")}
    for s in range(0, D, 2048):  # chunks keep the float64 temporaries small for d_sae x d_model
        sl = slice(s, s + 2048)
        fx = acc.fx[sl].double()
        pear = ((fx / n - mu_f[sl, None] * mu_x) / (sd_f[sl, None] * sd_x)).nan_to_num(0, 0, 0)
        cos = (fx / (norm_f[sl, None] * norm_x)).nan_to_num(0, 0, 0)
        v, i = pear.topk(kn, dim=1)
        out["cn_idx"].append(i)
        out["cn_pearson"].append(v.float())
        out["cn_cos"].append(cos.gather(1, i).float())
        ff, o = acc.ff[sl].double(), other[sl]
        pear = ((ff / n - mu_f[sl, None] * mu_f[o]) / (sd_f[sl, None] * sd_f[o])).nan_to_num(0, 0, 0)
        cos = (ff / (norm_f[sl, None] * norm_f[o])).nan_to_num(0, 0, 0)
        v, i = torch.where(valid[sl], pear, -math.inf).topk(kf, dim=1)
        out["cf_idx"].append(torch.where(v > -math.inf, o.gather(1, i), -1))
        out["cf_pearson"].append(v.clamp(min=-1).float())
        out["cf_cos"].append(cos.gather(1, i).float())
    return {k: torch.cat(v) for k, v in out.items()}


def direction_to_resid(model, site: str, W_dec: torch.Tensor) -> torch.Tensor:
    """Decoder rows as residual-stream directions (MLP-hidden rows go through the MLP's output matrix)."""
    layer, kind = parse_site(site)
    if kind == "mlp_hidden":
        return W_dec @ model.transformer.h[layer].mlp.c_proj.weight.float().T.to(W_dec.device)
    return W_dec


def _weight_stats(model, sae: SAE, site: str, cfg: FeatureConfig) -> dict[str, torch.Tensor]:
    W_dec = sae.W_dec.detach().float()
    D = W_dec.shape[0]
    W_U = model.lm_head.weight[: model.config.vocab_size].detach().float().to(W_dec.device)
    dirs = direction_to_resid(model, site, W_dec)
    nl = min(cfg.n_logits, W_U.shape[0])
    out = {k: [] for k in ("pos_idx", "pos_val", "neg_idx", "neg_val", "logit_hist", "logit_range")}
    step = max(1, (1 << 24) // W_U.shape[0])
    for s in range(0, D, step):
        lg = dirs[s : s + step] @ W_U.T  # direct logit effect, no final-norm scaling (TransformerLens convention)
        v, i = lg.topk(nl, dim=1)
        out["pos_val"].append(v)
        out["pos_idx"].append(i)
        v, i = lg.topk(nl, dim=1, largest=False)
        out["neg_val"].append(v)
        out["neg_idx"].append(i)
        lo, hi = lg.min(1).values, lg.max(1).values
        b = ((lg - lo[:, None]) / (hi - lo).clamp(min=1e-12)[:, None] * cfg.n_bins).long().clamp(0, cfg.n_bins - 1)
        out["logit_hist"].append(
            torch.zeros(len(lg), cfg.n_bins, device=lg.device).scatter_add_(1, b, torch.ones_like(lg))
        )
        out["logit_range"].append(torch.stack([lo, hi], 1))
    out = {k: torch.cat(v) for k, v in out.items()}
    # nearest latents by decoder cosine (SAEBench's max-cosine statistic, top n instead of top 1)
    Wn = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    nn_ = min(cfg.n_neighbours, D - 1)
    vals, ids = [], []
    step = max(1, (1 << 24) // D)
    for s in range(0, D, step):
        sim = Wn[s : s + step] @ Wn.T
        sim[torch.arange(len(sim)), torch.arange(s, s + len(sim))] = -math.inf
        v, i = sim.topk(nn_, dim=1) if nn_ > 0 else (sim[:, :0], sim[:, :0].long())
        vals.append(v)
        ids.append(i)
    out["nb_idx"], out["nb_cos"] = torch.cat(ids), torch.cat(vals)
    # neuron alignment: the largest entries of the decoder row and their share of its L1 norm
    v, i = W_dec.topk(min(cfg.n_corr, W_dec.shape[1]), dim=1)
    out.update(na_idx=i, na_val=v, na_l1=v.abs() / W_dec.abs().sum(1, keepdim=True).clamp(min=1e-12))
    return out


# ------------------------------------------------------------------------------------------------- results


class FeatureStats:
    """What the pass found: `meta` (settings, sizes, names), tensors `t`, and the vocabulary as display text."""

    def __init__(self, meta: dict, t: dict[str, torch.Tensor], vocab: list[str]):
        self.meta, self.t, self.vocab = meta, t, vocab
        self._np: dict[str, np.ndarray] = {}

    @property
    def d_sae(self) -> int:
        return self.meta["d_sae"]

    @property
    def cfg(self) -> FeatureConfig:
        return FeatureConfig(**self.meta["config"])

    def a(self, name: str) -> np.ndarray:
        """A statistic as a numpy array (cached)."""
        if name not in self._np:
            self._np[name] = (
                self.t[name].float().numpy() if self.t[name].dtype == torch.float16 else self.t[name].numpy()
            )
        return self._np[name]

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "stats.safetensors", lambda f: f.write(save(self.t)), checksum=True)
        atomic_write_json(path / "meta.json", {**self.meta, "vocab": self.vocab}, indent=None, checksum=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        from safetensors.torch import load_file

        path = Path(path)
        files = [path / "meta.json", path / "stats.safetensors"]
        if not all(f.is_file() for f in files):
            raise NanosaeError(f"{path}: no feature statistics here (meta.json + stats.safetensors)")
        for f in files:
            verify_sha256(f, RECOMPUTE)
        try:
            meta = json.loads(files[0].read_text())
            t = load_file(files[1])
        except Exception as e:
            raise NanosaeError(f"{path}: unreadable feature statistics ({e}); delete the folder to recompute") from None
        if meta.get("version") != STATS_VERSION:
            raise NanosaeError(f"{path}: feature statistics of another version; delete the folder to recompute")
        return cls(meta, t, meta.pop("vocab"))

    def examples(self, i: int, group: str | int = "top") -> list[dict]:
        """Examples of latent i: group "top" or an interval number. Each: tokens (ids), values, the activating
        token's index, its value; the window is trimmed at the row's edges."""
        if group == "top":
            pos, val, tok, win = self.a("top_pos")[i], self.a("top_val")[i], self.a("top_tok")[i], self.a("top_win")[i]
        else:
            pos, val = self.a("iv_pos")[i, group], self.a("iv_val")[i, group]
            tok, win = self.a("iv_tok")[i, group], self.a("iv_win")[i, group]
        q = self.meta["config"]["ctx_before"]
        out = []
        for k in range(len(pos)):
            if pos[k] < 0:
                continue
            keep = tok[k] >= 0
            first = int(keep.argmax())
            out.append(
                {
                    "tokens": tok[k][keep].tolist(),
                    "values": win[k][keep].tolist(),
                    "index": q - first,
                    "value": float(val[k]),
                    "pos": int(pos[k]),
                }
            )
        return out

    def intervals(self, i: int) -> list[dict]:
        b, c = self.a("iv_bounds")[i], self.a("iv_contains")[i]
        return [
            {"min": float(b[m, 0]), "max": float(b[m, 1]), "contains": float(c[m]), "examples": self.examples(i, m)}
            for m in range(len(c))
            if b[m, 1] > 0
        ]

    def act_hist(self, i: int) -> tuple[list[float], list[int]]:
        """(bin centres, counts) of the nonzero activations over [0, max]."""
        h, mx = self.a("act_hist")[i], float(self.a("max")[i])
        centres = (np.arange(len(h)) + 0.5) * mx / len(h)
        return centres.tolist(), h.astype(np.int64).tolist()

    def logit_hist(self, i: int) -> tuple[list[float], list[int]]:
        h, (lo, hi) = self.a("logit_hist")[i], self.a("logit_range")[i]
        centres = lo + (np.arange(len(h)) + 0.5) * (hi - lo) / len(h)
        return centres.tolist(), h.astype(np.int64).tolist()

    def logits(self, i: int, which: str = "pos") -> list[tuple[str, float]]:
        return [(self.vocab[t], float(v)) for t, v in zip(self.a(f"{which}_idx")[i], self.a(f"{which}_val")[i])]

    def top_tokens(self, i: int, n: int = 3) -> list[int]:
        """The tokens latent i fires on most often among its top examples (most frequent first)."""
        q = self.meta["config"]["ctx_before"]
        toks = [int(t) for t, p in zip(self.a("top_tok")[i, :, q], self.a("top_pos")[i]) if p >= 0]
        seen: dict[int, int] = {}
        for t in toks:
            seen[t] = seen.get(t, 0) + 1
        return sorted(seen, key=lambda t: -seen[t])[:n]

    def summary(self) -> str:
        d = self.a("density")
        dead = int((d == 0).sum())
        alive = d[d > 0]
        med = float(np.median(alive)) if len(alive) else 0.0
        return (
            f"{self.d_sae} latents over {self.meta['n_tokens']:,} tokens at {self.meta['site']}{' -> ' + self.meta['site_out'] if 'site_out' in self.meta else ''}: {dead} never fired, "
            f"median density {med:.2e}, densest {float(d.max()):.2%}"
        )


# ------------------------------------------------------------------------------------------------- cache


def weights_digest(sae: SAE) -> str:
    """sha256 of the SAE's tensors as loaded (whatever folder format they came from)."""
    h = hashlib.sha256()
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_key(model, sae: SAE, sae_dir: str | os.PathLike, source, cfg: FeatureConfig) -> dict:
    """What the statistics depend on: the model, the SAE weights, the data and the settings. The SAE is named by
    the sha256 of its sae_weights.safetensors (what the runtime checks too), else of its tensors."""
    weights = Path(sae_dir) / "sae_weights.safetensors"
    src = "builtin" if source is None or str(source) == "builtin" else str(Path(source).expanduser().resolve())
    if src != "builtin" and Path(src).is_file():
        st = Path(src).stat()
        src = f"{src}:{st.st_size}:{int(st.st_mtime)}"
    return {
        "model": getattr(getattr(model, "info", None), "fingerprint", "") or "",
        "sae": sha256_file(weights) if weights.is_file() else weights_digest(sae),
        "data": src,
        "config": dataclasses.asdict(cfg),
        "version": STATS_VERSION,
    }


def load_or_compute(
    model,
    tokenizer,
    sae: SAE,
    sae_dir: str | os.PathLike,
    source=None,
    cfg: FeatureConfig | None = None,
    stats_dir: str | os.PathLike | None = None,
    recompute: bool = False,
    progress: bool = True,
) -> FeatureStats:
    """The statistics from `stats_dir` (default <sae_dir>/feature_stats) when they match; else compute and save."""
    cfg = cfg or FeatureConfig()
    stats_dir = Path(stats_dir) if stats_dir else Path(sae_dir) / "feature_stats"
    key = cache_key(model, sae, sae_dir, source, cfg)
    key_file = stats_dir / "key.json"
    if not recompute and key_file.is_file():
        try:
            if json.loads(key_file.read_text()) == key:
                return FeatureStats.load(stats_dir)
        except ValueError:
            pass
    stats = compute_features(model, tokenizer, sae, cfg=cfg, source=source, progress=progress)
    stats.save(stats_dir)
    atomic_write_json(key_file, key)
    return stats
