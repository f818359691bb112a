"""SAEBench-style core evaluation of an SAE spliced into a nanochat model (definitions: docs/metrics.md).

One stream of token batches serves two metric sets, as in SAEBench where both start at the same tokens:
  CE/KL (the first `ce_tokens`): clean, SAE-spliced and zero-ablated full forwards, per-token CE and KL
  sparsity/variance/density (the first `n_tokens`): a forward stopped after the SAE's layer, then encode/decode
Everything streams: per-batch sums go into float64 accumulators and per-latent counts into d_sae vectors, so
memory is one batch of activations and latents whatever the token count.

Masking is by token id (every nanochat special token: <|bos|> plays GPT-2's <|endoftext|> role):
  sparsity/variance/density drop those tokens; the splice keeps the original activation there; per-token CE
  (keyed on the input token) and KL at those positions are dropped; zero-ablation zeroes every position.
Metrics are the correct ones by default (centered EV, MSE = E‖x−x̂‖²); `saebench_compat=True` reports
SAEBench's two quirky formulas under the standard keys instead (both variants are always in the result).
"""

from __future__ import annotations

import copy
import math
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import token_batches
from .errors import NanosaeError
from .fileio import atomic_write, atomic_write_json
from .gpt import GPT
from .hooks import add_hooks, canonical_site, out_site, run_with_cache, sae_site
from .sae import SAE, SAELENS_VERSION, saelens_cfg
from .tokenizer import Tokenizer

F64 = torch.float64
DENSE_THRESHOLDS = (0.01, 0.1)  # SAEBench's "dense" latents: density above 1% and above 10%


def special_token_ids(tokenizer: Tokenizer) -> dict[int, str]:
    return {tokenizer.encode_special(name): name for name in sorted(tokenizer.get_special_tokens())}


def _batches(
    tokenizer: Tokenizer, source, batch_size: int, context_size: int, split: str | None
) -> Iterator[torch.Tensor]:
    """Token batches (B, T): from a text source, or slices of a LongTensor of rows."""
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise NanosaeError(f"token rows must be a 2-D tensor (rows, seq_len), got shape {tuple(source.shape)}")
        return iter(source.split(batch_size))
    return token_batches(tokenizer, source, batch_size, context_size, split)


class _Stats:
    """Streaming sums over unmasked tokens: float64 scalars, Chan's running mean/M2 for the centered variance,
    per-latent firing counts, and the per-batch terms SAEBench's formulas average over batches. Masks are
    applied with `where`, never by boolean indexing, and counts stay tensors: no device sync per batch."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.d_in, self.device = d_in, device
        self.s: dict[str, torch.Tensor] = {}
        z = torch.zeros((), dtype=torch.long, device=device)
        self.n, self.batches = z, z.clone()
        self.mean = torch.zeros(d_in, dtype=F64, device=device)
        self.fired = torch.zeros(d_sae, dtype=F64, device=device)
        self.fired_prompts = torch.zeros(d_sae, dtype=F64, device=device)

    def _add(self, **sums: torch.Tensor) -> None:
        for k, v in sums.items():
            self.s[k] = self.s[k] + v if k in self.s else v

    @torch.no_grad()
    def update(self, x: torch.Tensor, f, xh: torch.Tensor, keep: torch.Tensor) -> None:
        """x, xh: (B, T, d_in), f: (B, T, d_sae) of one batch, or its active latents as (values, ids), each
        (B, T, n), zero-padded (SAE.encode_sparse); keep: (B, T), False at masked tokens."""
        keep = keep.to(self.device)
        # SAEBench's L0 counts f != 0 and its density f > 0: the same events where f >= 0 (every architecture that
        # ends in a ReLU), so one boolean pass serves both; the signed ones (topk_signed, gated_signed) fire when f != 0
        if isinstance(f, tuple):
            vals, ids = (t.to(self.device) for t in f)
            fired = (vals != 0) & keep[..., None]
            ids = ids[fired]
            counts = torch.zeros_like(self.fired).index_add_(0, ids, torch.ones_like(ids, dtype=F64))
            prompt = torch.arange(len(vals), device=self.device)[:, None, None].expand_as(vals)[fired]
            pairs = (prompt * len(self.fired) + ids).unique()  # (prompt, latent) pairs that fired
            self.fired_prompts += torch.bincount(pairs % len(self.fired), minlength=len(self.fired))
            l1_per_token = vals.sum(-1).flatten()
        else:
            f = f.to(self.device)
            fired = f != 0
            fired &= keep[..., None]
            counts = fired.sum((0, 1))
            self.fired_prompts += fired.any(1).sum(0)
            l1_per_token = f.sum(-1).flatten()
        self.fired += counts
        k = keep.flatten()

        def kept_sum(per_token: torch.Tensor) -> torch.Tensor:
            return torch.where(k, per_token, 0).sum(dtype=F64)

        x, xh = x.to(self.device).flatten(0, 1).float(), xh.to(self.device).flatten(0, 1).float()
        nb = k.sum()
        nb1 = nb.clamp_min(1)
        sse = (x - xh).pow(2).sum(-1)  # per token
        x64 = x.to(F64)
        mb = (x64 * k[:, None]).sum(0) / nb1
        tss = (x64 - mb).pow(2).sum(-1)  # per token, about this batch's mean (the legacy EV's denominator)
        norm_in, norm_out = x.norm(dim=-1), xh.norm(dim=-1)
        dot = (x64 * xh.to(F64)).sum(-1)  # in f64: the bias ratio divides by its batch sum, which can be near 0
        xh2_b, dot_b, sse_b = kept_sum(norm_out.pow(2)), kept_sum(dot), kept_sum(sse)
        # Chan et al.'s merge of (count, mean, sum of squared deviations): stable even with a large mean offset
        delta, tot = mb - self.mean, (self.n + nb).clamp_min(1)
        self._add(m2=kept_sum(tss) + delta.pow(2).sum() * self.n * nb / tot)
        self.mean += delta * nb / tot
        self.n, self.batches = self.n + nb, self.batches + (nb > 0)
        self._add(
            l0=counts.sum().to(F64),
            l1=kept_sum(l1_per_token),  # SAEBench takes no abs (the same for f >= 0)
            sse=sse_b,
            cos=kept_sum(dot / (norm_in * norm_out).clamp_min(1e-8)),
            norm_in=kept_sum(norm_in),
            norm_out=kept_sum(norm_out),
            ratio=kept_sum(norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in)),
            xh2=xh2_b,
            dot=dot_b,
            ev_legacy=kept_sum(1 - sse.to(F64) / tss),
            # SAEBench: per-batch means, then averaged over batches
            sb_mse=sse_b / nb1,
            sb_mss=kept_sum(x64.pow(2).sum(-1)) / nb1,
            sb_mres=sse_b / nb1,
            sb_rrb=torch.where(nb > 0, xh2_b / dot_b, 0),
        )

    def metrics(self) -> dict[str, float]:
        n, nb, d = self.n.item(), self.batches.item(), self.d_in
        if n == 0:
            raise NanosaeError("no unmasked tokens to evaluate; give more text (--tokens, --data)")
        s = {k: v.item() for k, v in self.s.items()}
        sb_mss = s["sb_mss"] / nb
        return {
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "mse_per_token": s["sse"] / n,
            "mse_saebench": s["sb_mse"] / n,
            "explained_variance_centered": 1 - (s["sse"] / n) / _div(s["m2"], n),
            "explained_variance_saebench": 1 - (s["sb_mres"] / nb) / (sb_mss - (sb_mss / d) ** 2),
            "explained_variance_legacy": s["ev_legacy"] / n,
            "cossim": s["cos"] / n,
            "l2_norm_in": s["norm_in"] / n,
            "l2_norm_out": s["norm_out"] / n,
            "l2_ratio": s["ratio"] / n,
            "relative_reconstruction_bias_pooled": _div(s["xh2"], s["dot"]),
            "relative_reconstruction_bias_saebench": s["sb_rrb"] / nb,
        }


class _CEStats:
    """Sums of per-token CE (clean, spliced, ablated) and KL(clean ‖ ·) over the kept positions, and the
    position counts, all kept as device tensors."""

    def __init__(self, device: torch.device):
        self.device = device
        self.s = {k: torch.zeros((), dtype=F64, device=device) for k in ("clean", "sae", "abl", "kl_sae", "kl_abl")}
        self.n_ce = self.n_kl = torch.zeros((), dtype=torch.long, device=device)

    def add(self, **sums: torch.Tensor) -> None:
        for k, v in sums.items():
            self.s[k] += v.to(self.device)

    def count(self, keep: torch.Tensor) -> None:
        """Count the positions of one batch: CE is keyed on the input token and has T-1 positions."""
        self.n_ce = self.n_ce + keep[:, :-1].sum().to(self.device)
        self.n_kl = self.n_kl + keep.sum().to(self.device)

    def metrics(self) -> dict[str, float]:
        n_ce, n_kl = self.n_ce.item(), self.n_kl.item()
        if n_ce == 0:
            raise NanosaeError("no unmasked positions for CE/KL; give more text (--ce-tokens, --data)")
        clean, sae, abl = (self.s[k].item() / n_ce for k in ("clean", "sae", "abl"))
        kl_sae, kl_abl = (self.s[k].item() / n_kl for k in ("kl_sae", "kl_abl"))
        return {
            "ce_loss_score": _div(abl - sae, abl - clean),
            "ce_loss_with_ablation": abl,
            "ce_loss_with_sae": sae,
            "ce_loss_without_sae": clean,
            "ce_loss_diff": sae - clean,
            "kl_div_score": _div(kl_abl - kl_sae, kl_abl),
            "kl_div_with_ablation": kl_abl,
            "kl_div_with_sae": kl_sae,
        }


def _acc_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _ce_sum(logp: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum of next-token CE at positions whose *input* token is kept (CE has T-1 positions: mask[:, :-1])."""
    ce = -logp[:, :-1].gather(-1, idx[:, 1:, None]).squeeze(-1)
    return torch.where(keep[:, :-1], ce, 0).sum(dtype=F64)


def _kl_sum(logp: torch.Tensor, logq: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Sum over kept positions of KL(p ‖ q) = Σ_v p (log p − log q), over the full vocabulary."""
    return torch.where(keep, F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1), 0).sum(dtype=F64)


def _logprobs(model: GPT, idx: torch.Tensor, hooks: dict | None = None) -> torch.Tensor:
    with add_hooks(model, hooks or {}):
        return torch.log_softmax(model(idx), dim=-1)


def _zero(x: torch.Tensor, start: int) -> torch.Tensor:
    return torch.zeros_like(x)


def _splice_hooks(sae: SAE, site_in: str, site: str, keep: torch.Tensor, stash: dict) -> dict[str, Callable]:
    """Hooks replacing the activation at `site` by the SAE's output where `keep` (B, T) is True: an SAE's
    reconstruction of it, a transcoder's prediction from its input at site_in (read earlier in the same forward)."""

    def read(x: torch.Tensor, start: int) -> None:
        stash["x_in"] = x

    def splice(x: torch.Tensor, start: int) -> torch.Tensor:
        x_in = stash.pop("x_in", x)
        f = sae.encode(x_in)
        xh = sae.decode(f, x_in)
        stash.update(x=x, f=f, xh=xh)
        return torch.where(keep[..., None], xh.to(x.dtype), x)

    return {site: splice} if site_in == site else {site_in: read, site: splice}


def _ce_batch(
    model: GPT,
    idx: torch.Tensor,
    keep: torch.Tensor,
    ce: _CEStats,
    site: str,
    logp: torch.Tensor | None = None,
    sae: SAE | None = None,
    splice_keep: torch.Tensor | None = None,
    ablate: bool = False,
) -> dict:
    """One batch of the CE/KL loop that `evaluate` and `make_train_eval` share, summed into `ce`: the clean CE
    (log-probs computed unless given as logp), then with the SAE spliced in at `site` (the site it writes: a
    transcoder's output site; where splice_keep, default keep) and with the site zero-ablated (if `ablate`), each
    with its KL from the clean distribution. Returns the SAE's x, f and x̂ at the site (empty without an SAE)."""
    logp = _logprobs(model, idx) if logp is None else logp
    ce.add(clean=_ce_sum(logp, idx, keep))
    stash: dict = {}
    if sae is not None:
        site_in = canonical_site(sae.cfg.hook_name, model) if sae.cfg.transcoder else site
        hooks = _splice_hooks(sae, site_in, site, keep if splice_keep is None else splice_keep, stash)
        logq = _logprobs(model, idx, hooks)
        ce.add(sae=_ce_sum(logq, idx, keep), kl_sae=_kl_sum(logp, logq, keep))
        del logq  # one vocabulary-wide tensor besides logp at a time
    if ablate:
        logq = _logprobs(model, idx, {site: _zero})
        ce.add(abl=_ce_sum(logq, idx, keep), kl_abl=_kl_sum(logp, logq, keep))
    ce.count(keep)
    return stash


@torch.no_grad()
def _max_cosine(rows: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """max_{j≠i} cos(rows[i], rows[j]) without materialising the (n, n) matrix."""
    u = F.normalize(rows.float(), dim=-1)
    out = torch.empty(u.shape[0], device=u.device)
    for s in range(0, u.shape[0], chunk):
        sims = u[s : s + chunk] @ u.T
        i = torch.arange(sims.shape[0], device=u.device)
        sims[i, s + i] = -math.inf
        out[s : s + chunk] = sims.max(dim=1).values
    return out


@torch.no_grad()
def weight_metrics(sae: SAE) -> dict[str, torch.Tensor]:
    """Per-latent weight statistics as SAEBench names them (encoder bias: b_mag for gated SAEs)."""
    W_enc, W_dec = sae.W_enc.float(), sae.W_dec.float()
    bias = sae.b_mag if sae.cfg.architecture == "gated" else sae.b_enc
    return {
        "encoder_bias": bias.float(),
        "encoder_norm": W_enc.norm(dim=0),
        "encoder_decoder_cosine_sim": F.cosine_similarity(W_enc.T, W_dec, dim=-1),
        "max_encoder_cosine_sim": _max_cosine(W_enc.T),
        "max_decoder_cosine_sim": _max_cosine(W_dec),
    }


def _misc_metrics(density: torch.Tensor, w: dict[str, torch.Tensor]) -> dict[str, float]:
    total = density.sum().item()
    out = {
        "average_max_encoder_cosine_sim": w["max_encoder_cosine_sim"].mean().item(),
        "average_max_decoder_cosine_sim": w["max_decoder_cosine_sim"].mean().item(),
        "frac_alive": (density > 0).double().mean().item(),
    }
    for t in DENSE_THRESHOLDS:
        name = f"{round(t * 100)}_percent"
        out[f"freq_over_{name}"] = (density > t).double().mean().item()
        out[f"normalized_freq_over_{name}"] = density[density > t].sum().item() / total if total > 0 else 0.0
    return out


@torch.no_grad()
def evaluate(
    sae: SAE,
    model: GPT,
    tokenizer: Tokenizer,
    source=None,
    n_tokens: int = 409_600,
    *,
    ce_tokens: int | None = None,
    batch_size: int = 16,
    context_size: int | None = None,
    split: str | None = "val",
    saebench_compat: bool = False,
    exclude_special_tokens_from_reconstruction: bool = True,
    check_model: bool = True,
    sae_id: str = "",
    progress: bool = True,
) -> dict:
    """SAEBench core-eval result (same keys and nesting) of `sae` on `n_tokens` tokens of `source` (a data
    source for nanosae.data, or a LongTensor of token rows); CE/KL on the first `ce_tokens` (default n/10).
    context_size: SAEBench's 128 by default, or the model's context when that is shorter."""
    site = sae_site(model, sae, check_model)
    out = out_site(model, sae)
    if isinstance(source, torch.Tensor):
        context_size = source.shape[1]
    elif context_size is None:
        context_size = min(128, model.config.sequence_len)
    elif context_size > model.config.sequence_len:
        raise NanosaeError(f"context size {context_size} exceeds the model's {model.config.sequence_len}")
    ce_tokens = n_tokens // 10 if ce_tokens is None else ce_tokens
    per_batch = batch_size * context_size
    n_sv = max(1, math.ceil(n_tokens / per_batch))
    n_ce = math.ceil(ce_tokens / per_batch)
    sae = sae if sae.device == model.device else copy.deepcopy(sae).to(model.device)  # the caller's SAE stays put
    specials = special_token_ids(tokenizer)

    t0 = time.time()
    batches = islice(_batches(tokenizer, source, batch_size, context_size, split), max(n_sv, n_ce))
    bar = tqdm(total=max(n_sv, n_ce) * per_batch, unit="tok", unit_scale=True, desc="eval", disable=not progress)
    stats, ce, sv_tok, ce_tok = _eval_pass(
        sae, model, (site, out), batches, n_sv, n_ce, specials, exclude_special_tokens_from_reconstruction, bar
    )
    seconds = time.time() - t0
    if sv_tok < n_tokens or ce_tok < ce_tokens:
        print(
            f"nanosae eval: the data ran out after {sv_tok:,} tokens ({ce_tok:,} for CE/KL); "
            "give more text (--data) or another --split"
        )

    metrics, cols = _result_metrics(stats, ce, sae, sv_tok, ce_tok, saebench_compat)
    details = [{"index": i, **{k: v[i] for k, v in cols.items()}} for i in range(sae.cfg.d_sae)]
    info = getattr(model, "info", None)
    return {
        "eval_type_id": "core",
        "eval_config": {
            "model_name": info.name if info else sae.cfg.model_name or "unnamed model",
            "llm_dtype": str(model.compute_dtype).removeprefix("torch."),
            "batch_size_prompts": batch_size,
            "n_eval_reconstruction_batches": n_ce,
            "n_eval_sparsity_variance_batches": n_sv,
            "dataset": "token rows" if isinstance(source, torch.Tensor) else str(source or "builtin"),
            "split": split,
            "context_size": context_size,
            "compute_kl": n_ce > 0,
            "compute_ce_loss": n_ce > 0,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": exclude_special_tokens_from_reconstruction,
            "saebench_compat": saebench_compat,
            "ignore_token_ids": sorted(specials),
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": None,
        "sae_lens_id": sae_id or site,
        "sae_lens_release_id": "nanosae",
        "sae_lens_version": SAELENS_VERSION,
        "sae_cfg_dict": saelens_cfg(sae.cfg),
        "eval_result_unstructured": {
            "site": site,
            **({"site_out": out, "ablated": f"{out} (the transcoder's output site)"} if out != site else {}),
            **_policy(specials, exclude_special_tokens_from_reconstruction, saebench_compat),
            "seconds": seconds,
        },
    }


def _eval_pass(
    sae: SAE,
    model: GPT,
    sites: tuple[str, str],
    batches: Iterator[torch.Tensor],
    n_sv: int,
    n_ce: int,
    specials: dict[int, str],
    exclude_specials: bool,
    bar: tqdm,
) -> tuple[_Stats, _CEStats, int, int]:
    """The one pass over the token batches: the first n_ce get CE/KL (clean, spliced, ablated), and their spliced
    activations feed the sparsity/variance sums; the rest of the first n_sv get a forward stopped at the site.
    Returns the sums and the tokens each metric set read. sites: (where the SAE reads, where it writes)."""
    (site_in, site), device = sites, model.device
    special = torch.tensor(sorted(specials), device=device)
    acc_device = _acc_device(device)
    stats, ce = _Stats(sae.cfg.width_out, sae.cfg.d_sae, acc_device), _CEStats(acc_device)
    sv_tok = ce_tok = 0
    for i, idx in enumerate(batches):
        idx = idx.to(device)
        keep = ~torch.isin(idx, special)
        if i < n_ce:
            splice_keep = keep if exclude_specials else torch.ones_like(keep)
            stash = _ce_batch(model, idx, keep, ce, site, sae=sae, splice_keep=splice_keep, ablate=True)
            ce_tok += idx.numel()
            if i < n_sv:
                stats.update(stash["x"], stash["f"], stash["xh"], keep)
        elif i < n_sv:
            _, acts = run_with_cache(model, idx, [site_in, site])
            f = sae.encode(acts[site_in])
            stats.update(acts[site], f, sae.decode(f, acts[site_in]), keep)
        sv_tok += idx.numel() if i < n_sv else 0
        bar.update(idx.numel())
    bar.close()
    return stats, ce, sv_tok, ce_tok


def _result_metrics(
    stats: _Stats, ce: _CEStats, sae: SAE, sv_tok: int, ce_tok: int, saebench_compat: bool
) -> tuple[dict, dict[str, list]]:
    """SAEBench's eval_result_metrics, and the per-latent columns of eval_result_details."""
    recon = stats.metrics()
    density = (stats.fired / stats.n).cpu()
    cah = (stats.fired / stats.fired_prompts).cpu()  # 0/0 = NaN for latents that never fired, as in SAEBench
    w = {k: v.cpu() for k, v in weight_metrics(sae).items()}
    q = "saebench" if saebench_compat else None
    metrics = {
        "model_behavior_preservation": {},
        "model_performance_preservation": {},
        "reconstruction_quality": {
            "explained_variance": recon[f"explained_variance_{q or 'centered'}"],
            "explained_variance_legacy": recon["explained_variance_legacy"],
            "mse": recon[f"mse_{q or 'per_token'}"],
            "cossim": recon["cossim"],
            "explained_variance_centered": recon["explained_variance_centered"],
            "explained_variance_saebench": recon["explained_variance_saebench"],
            "mse_per_token": recon["mse_per_token"],
            "mse_saebench": recon["mse_saebench"],
        },
        "shrinkage": {
            "l2_norm_in": recon["l2_norm_in"],
            "l2_norm_out": recon["l2_norm_out"],
            "l2_ratio": recon["l2_ratio"],
            "relative_reconstruction_bias": recon[f"relative_reconstruction_bias_{q or 'pooled'}"],
        },
        "sparsity": {"l0": recon["l0"], "l1": recon["l1"]},
        "token_stats": {
            "total_tokens_eval_reconstruction": ce_tok,
            "total_tokens_eval_sparsity_variance": sv_tok,
            "unmasked_tokens_eval_sparsity_variance": int(stats.n),
            "unmasked_positions_eval_ce": int(ce.n_ce),
            "unmasked_positions_eval_kl": int(ce.n_kl),
        },
        "misc_metrics": _misc_metrics(density, w),
    }
    if ce_tok:
        m = ce.metrics()
        metrics["model_behavior_preservation"] = {k: m[k] for k in m if k.startswith("kl_")}
        metrics["model_performance_preservation"] = {k: m[k] for k in m if k.startswith("ce_")}
    cols = {"feature_density": density, "consistent_activation_heuristic": cah, **w}
    return metrics, {k: v.tolist() for k, v in cols.items()}


def _policy(specials: dict[int, str], exclude_specials: bool, saebench_compat: bool) -> dict:
    """How tokens were masked and what each metric means, for the record."""
    return {
        "mask_policy": {
            "masked_token_ids": {str(k): v for k, v in sorted(specials.items())},
            "by": "token id (every nanochat special token)",
            "sparsity_variance_density": "masked tokens dropped",
            "reconstruction_splice": "original activation kept at masked tokens"
            if exclude_specials
            else "SAE spliced at every token",
            "ce_kl": "per-token CE (keyed on the input token) and KL at masked positions dropped",
            "zero_ablation": "every position zeroed",
        },
        "metric_definitions": {
            "explained_variance": "SAEBench's: 1 - mean_b E|x-x̂|² / (mean_b E|x|² - (mean_b E|x|²/d)²)"
            if saebench_compat
            else "centered: 1 - E|x-x̂|² / (E|x|² - |E x|²), float64, pooled over all tokens",
            "mse": "SAEBench's: mean over tokens of |x-x̂|² / (unmasked tokens in its batch)"
            if saebench_compat
            else "E|x-x̂|² per token, summed over d",
            "relative_reconstruction_bias": "E|x̂|²/E<x,x̂> per batch, averaged over batches"
            if saebench_compat
            else "E|x̂|²/E<x,x̂> pooled over all tokens",
            "feature_density": "fraction of unmasked tokens with f > 0",
            "kl_div": "sum_v p_clean (log p_clean - log p) over the full vocabulary, per position",
        },
    }


def _nan_to_neg1(obj):
    """SAEBench writes NaN as -1 (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _nan_to_neg1(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_neg1(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return -1
    return obj


def densities(result: dict) -> torch.Tensor:
    return torch.tensor([d["feature_density"] for d in result["eval_result_details"]], dtype=F64)


def save_density_histogram(density: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """PNG histogram of log10 feature density over the live latents; dead ones are counted in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=60, color="#3b75af")
    for t in DENSE_THRESHOLDS:
        ax.axvline(math.log10(t), color="#c44e52", lw=0.8, ls="--")
    ax.set_xlabel("log10 feature density (fraction of tokens with f > 0)")
    ax.set_ylabel("latents")
    dead = density.numel() - alive.numel()
    ax.set_title(f"{title}  ·  {density.numel():,} latents, {dead:,} dead".strip(" ·"), fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def save_result(result: dict, path: str | Path) -> tuple[Path, Path]:
    """Write the result JSON (NaN → -1) and its density histogram `<stem>_density.png` beside it."""
    path = Path(path)
    atomic_write_json(path, _nan_to_neg1(result))
    cfg = result["sae_cfg_dict"]
    tokens = result["eval_result_metrics"]["token_stats"]["unmasked_tokens_eval_sparsity_variance"]
    title = f"{_where(result)} · {cfg['architecture']} d_sae {cfg['d_sae']} · {tokens:,} tokens"
    png = save_density_histogram(densities(result), path.with_name(f"{path.stem}_density.png"), title)
    return path, png


def _where(result: dict) -> str:
    u = result["eval_result_unstructured"]
    return f"{u['site']} -> {u['site_out']}" if u.get("site_out") else u["site"]


def format_table(result: dict) -> str:
    """A short readable summary of a result."""
    m, c = result["eval_result_metrics"], result["eval_config"]
    r, s, sp, ts, misc = (
        m[k] for k in ("reconstruction_quality", "shrinkage", "sparsity", "token_stats", "misc_metrics")
    )
    cfg = result["sae_cfg_dict"]
    k = f" k {cfg['k']}" if cfg.get("k") else ""
    ev = "SAEBench formula" if c["saebench_compat"] else "centered"
    lines = [
        f"{_where(result)} of {c['model_name']} · {cfg['architecture']} "
        f"d_sae {cfg['d_sae']:,}{k} · {ts['total_tokens_eval_sparsity_variance']:,} tokens "
        f"({ts['unmasked_tokens_eval_sparsity_variance']:,} unmasked), "
        f"{ts['total_tokens_eval_reconstruction']:,} for CE/KL",
        f"  sparsity        L0 {sp['l0']:.2f}   L1 {sp['l1']:.4g}",
        f"  reconstruction  explained variance {r['explained_variance']:.4f} ({ev})   mse {r['mse']:.4g}   "
        f"cossim {r['cossim']:.4f}",
        f"                  [centered EV {r['explained_variance_centered']:.4f} · SAEBench EV "
        f"{r['explained_variance_saebench']:.4f} · legacy EV {r['explained_variance_legacy']:.4f} · "
        f"SAEBench mse {r['mse_saebench']:.4g}]",
        f"  shrinkage       l2 ratio {s['l2_ratio']:.4f}   relative reconstruction bias "
        f"{s['relative_reconstruction_bias']:.4f}",
    ]
    pp, bp = m["model_performance_preservation"], m["model_behavior_preservation"]
    if pp:
        lines += [
            f"  CE loss         clean {pp['ce_loss_without_sae']:.4f}   with SAE {pp['ce_loss_with_sae']:.4f}   "
            f"zero-ablated {pp['ce_loss_with_ablation']:.4f}   → ce_loss_score {pp['ce_loss_score']:.4f}   "
            f"(CE diff {pp['ce_loss_diff']:+.4f} nats)",
            f"  KL              with SAE {bp['kl_div_with_sae']:.4f}   zero-ablated {bp['kl_div_with_ablation']:.4f}"
            f"   → kl_div_score {bp['kl_div_score']:.4f}",
        ]
    lines.append(
        f"  latents         alive {misc['frac_alive']:.1%}   denser than 1%: {misc['freq_over_1_percent']:.1%}   "
        f"10%: {misc['freq_over_10_percent']:.1%}   mean max decoder cos {misc['average_max_decoder_cosine_sim']:.3f}"
    )
    return "\n".join(lines)


def make_train_eval(
    model: GPT,
    tokenizer: Tokenizer,
    source=None,
    n_tokens: int = 4096,
    *,
    batch_size: int = 16,
    context_size: int = 128,
    split: str | None = "val",
) -> Callable[[SAE], dict[str, float]]:
    """A quick eval for the training loop: fn(inference SAE) -> {ce_loss_score, kl_div_score,
    explained_variance (centered), l0, ...} on `n_tokens` fixed tokens, masked as in `evaluate`. The token
    batches and clean log-probs are prepared once (the log-probs kept when they fit in 256 MiB, else recomputed),
    the zero-ablation baseline once per site, so each call costs one spliced forward per batch."""
    if isinstance(source, torch.Tensor):
        context_size = source.shape[1]
    n_batches = max(1, math.ceil(n_tokens / (batch_size * context_size)))
    rows = list(islice(_batches(tokenizer, source, batch_size, context_size, split), n_batches))
    if not rows:
        raise NanosaeError(f"source {source or 'builtin'} ({split}) holds too little text for one eval batch")
    device = model.device
    acc_device = _acc_device(device)
    special = torch.tensor(sorted(special_token_ids(tokenizer)), device=device)
    batches = [(idx.to(device), ~torch.isin(idx.to(device), special)) for idx in rows]
    vocab = model.config.vocab_size
    keep_logp = sum(idx.numel() for idx, _ in batches) * vocab * 4 <= 256 << 20
    with torch.no_grad():
        clean = [_logprobs(model, idx) if keep_logp else None for idx, _ in batches]
    ablated: dict[str, dict[str, torch.Tensor]] = {}  # site -> summed ablated CE and KL

    @torch.no_grad()
    def run(sae: SAE) -> dict[str, float]:
        sae_site(model, sae)
        site = out_site(model, sae)  # where it writes: a transcoder's output site is the one ablated
        if site not in ablated:
            base = _CEStats(acc_device)
            for (idx, keep), logp in zip(batches, clean):
                _ce_batch(model, idx, keep, base, site, logp, ablate=True)
            ablated[site] = {k: base.s[k] for k in ("abl", "kl_abl")}
        ce = _CEStats(acc_device)
        ce.s.update({k: v.clone() for k, v in ablated[site].items()})
        stats = _Stats(sae.cfg.width_out, sae.cfg.d_sae, acc_device)
        for (idx, keep), logp in zip(batches, clean):
            stash = _ce_batch(model, idx, keep, ce, site, logp, sae=sae)
            stats.update(stash["x"], stash["f"], stash["xh"], keep)
        r, m = stats.metrics(), ce.metrics()
        return {
            "ce_loss_score": m["ce_loss_score"],
            "kl_div_score": m["kl_div_score"],
            "ce_loss_diff": m["ce_loss_diff"],
            "ce_loss_with_sae": m["ce_loss_with_sae"],
            "ce_loss_without_sae": m["ce_loss_without_sae"],
            "ce_loss_with_ablation": m["ce_loss_with_ablation"],
            "kl_div_with_sae": m["kl_div_with_sae"],
            "explained_variance": r["explained_variance_centered"],
            "mse": r["mse_per_token"],
            "cossim": r["cossim"],
            "l0": r["l0"],
            "l1": r["l1"],
            "frac_alive": (stats.fired > 0).double().mean().item(),
        }

    return run
