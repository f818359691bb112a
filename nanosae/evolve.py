"""Features over a model's life: one SAE evaluated on every checkpoint of a training series, or a chain of SAEs
fine-tuned along it (SAE-Track: Xu et al. 2024, "Tracking the Feature Dynamics in LLM Training", arXiv 2412.17626).

Every checkpoint reads the same token rows. Per checkpoint: EV, L0, CE/KL score (the SAE spliced into that
checkpoint, evaluate.py's code), dead share; per latent: firing density, mean activation when firing, its best
context in each of `top_n` batches, and (one SAE) the Pearson correlation of its activations with the reference
checkpoint's on the same tokens. The reference's latents are kept sparse (the active ones per token), so the
correlation costs a gather per batch, not a second model.

    out/checkpoints/<label>.safetensors   one checkpoint's results (its key in the metadata: a rerun skips it)
    out/reference.safetensors             the reference checkpoint's sparse latents
    out/chain/<label>/                     --chain: the SAE of each checkpoint (a train run folder each)
    out/evolve.json, evolve.png, index.html
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import PHASE_DIRS, checkpoint_steps, load_model, resolve
from .errors import NanosaeError
from .evaluate import _acc_device, _ce_batch, _CEStats, _Stats, special_token_ids
from .fileio import atomic_write, atomic_write_json, sha256_file
from .hooks import out_site, run_with_cache, sae_site
from .sae import SAE

F64 = torch.float64
VERSION = 1


@dataclass
class EvolveConfig:
    """What `nanosae evolve` measures and on which tokens."""

    steps: str = "all"  # all, or a comma list of steps of the first phase (later phases add their final checkpoint)
    phases: tuple[str, ...] = ("base",)  # phases of a nanochat base dir, in order: base,sft
    tokens: int = 65_536  # tokens for EV, L0, density and correlations (the same rows on every checkpoint)
    ce_tokens: int | None = None  # tokens (the first rows) for the CE/KL score; None: tokens / 16
    batch_size: int = 16  # rows per forward
    context_size: int = 128
    split: str = "val"  # train | val | all
    reference: int = -1  # index of the checkpoint the others' latents are correlated with (-1: the last)
    top_n: int = 5  # top contexts kept per latent and checkpoint (the best token of each of that many batches)
    context: int = 8  # tokens shown on each side of a top context on the page
    chain_tokens: int = 500_000  # --chain: fine-tuning tokens per later checkpoint (--train-tokens: the first one)
    stable_cos: float = 0.9  # --chain: a latent is stable over a link when its decoder rows have this cosine
    device: str = "cpu"


@dataclass
class Checkpoint:
    label: str  # base-000400
    phase: str
    step: int
    path: str  # the model_XXXXXX.pt


def series(model: str, steps: str = "all", phases: tuple[str, ...] = ("base",)) -> list[Checkpoint]:
    """The checkpoints of a training series: every step (or the listed ones) of the first phase, then the final
    checkpoint of each later phase (all of their steps with steps='all')."""
    out = []
    for n, phase in enumerate(phases):
        if phase not in PHASE_DIRS:
            raise NanosaeError(f"unknown phase {phase!r} in --phases; choose from {', '.join(PHASE_DIRS)}")
        files = resolve(model, phase=phase)
        if files.phase not in (None, phase) or (files.phase is None and len(phases) > 1):
            raise NanosaeError(
                f"{model} is one checkpoint folder, not a base dir holding {PHASE_DIRS[phase]}; pass the base dir "
                "(the folder with base_checkpoints/, chatsft_checkpoints/) for --phases"
            )
        present = checkpoint_steps(model, phase)
        if steps == "all":
            chosen = present
        elif n == 0:
            chosen = [int(s) for s in steps.split(",") if s]
            if missing := [s for s in chosen if s not in present]:
                raise NanosaeError(
                    f"no step {', '.join(map(str, missing))} in {files.model.parent} (steps present: "
                    f"{', '.join(map(str, present))}); pick from those or pass --steps all"
                )
        else:
            chosen = present[-1:]
        for s in chosen:
            out.append(Checkpoint(f"{phase}-{s:06d}", phase, s, str(files.model.parent / f"model_{s:06d}.pt")))
    if len(out) < 2:
        raise NanosaeError(
            f"{model} gives a series of {len(out)} checkpoint; evolve needs two or more: keep intermediate "
            "checkpoints (nanosae train-lm --save-every N, nanochat's --save_every), or add --phases base,sft"
        )
    return out


# ------------------------------------------------------------------------------------------ one checkpoint


class _Latents:
    """Per-latent sums over one checkpoint's pass, from the active latents of each token: activation sum and sum
    of squares, the best token of each of the top_n batches where it peaked highest, and the cross-sum with the
    reference's sparse latents (for the correlation)."""

    def __init__(self, d_sae: int, top_n: int, device: torch.device):
        self.d_sae = d_sae
        self.sum = torch.zeros(d_sae, dtype=F64, device=device)
        self.sq = torch.zeros(d_sae, dtype=F64, device=device)
        self.cross = torch.zeros(d_sae, dtype=F64, device=device)
        self.top_val = torch.full((top_n, d_sae), -math.inf, device=device)
        self.top_pos = torch.full((top_n, d_sae), -1, dtype=torch.long, device=device)

    def update(self, vals: torch.Tensor, ids: torch.Tensor, pos0: int, ref: tuple | None) -> None:
        """vals, ids: (n, w) active latents of n tokens (0 at masked tokens and padding) starting at flat token
        position pos0; ref: the reference's (values, ids) of the same tokens."""
        dev = self.sum.device
        vals, ids = vals.to(dev), ids.to(dev)
        v, i = vals.flatten(), ids.flatten()
        self.sum.index_add_(0, i, v.to(F64))
        self.sq.index_add_(0, i, v.to(F64).pow(2))
        if ref is not None:  # Σ f_ref f over tokens: this token's value of each of the reference's latents
            rv, rid = (t.to(dev) for t in ref)
            here = ((rid[:, :, None] == ids[:, None, :]) * vals[:, None, :]).sum(-1)  # (n, w_ref)
            self.cross.index_add_(0, rid.flatten(), (rv * here).flatten().to(F64))
        # this batch's peak of each latent and a token where it is reached
        peak = torch.full((self.d_sae,), -math.inf, device=dev).scatter_reduce(0, i, v.float(), "amax")
        tok = torch.arange(len(vals), device=dev)[:, None].expand_as(vals).flatten() + pos0
        hit = (v > 0) & (v == peak[i])
        pos = torch.full((self.d_sae,), -1, dtype=torch.long, device=dev).scatter_(0, i[hit], tok[hit])
        peak = torch.where(pos >= 0, peak, -math.inf)
        vals_all = torch.cat([self.top_val, peak[None]])
        self.top_val, order = vals_all.topk(self.top_val.shape[0], dim=0)
        self.top_pos = torch.cat([self.top_pos, pos[None]]).gather(0, order)


def _sparse(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The active latents of each token of f (..., d_sae): (values, ids), each (..., max active), zero-padded."""
    width = max(1, int((f != 0).sum(-1).max()))
    ids = f.abs().topk(width, dim=-1).indices
    return f.gather(-1, ids), ids


@torch.no_grad()
def measure(
    model,
    sae: SAE,
    specials: list[int],
    rows: torch.Tensor,
    ce_rows: int,
    batch_size: int,
    top_n: int = 5,
    ref: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_codes: bool = False,
    desc: str = "",
) -> tuple[dict, dict[str, torch.Tensor]]:
    """One pass of `sae` spliced into / reading `model` over the token rows: (metrics, per-latent tensors). The
    first ce_rows rows also get the CE/KL forwards (clean, spliced, zero-ablated); the others a forward stopped
    at the site and a sparse encode and decode (no dense latents). ref: the reference checkpoint's sparse latents
    of every token of rows (flat), for the correlation; keep_codes: return this pass's own."""
    site_in = sae_site(model, sae)
    site = out_site(model, sae)  # where it writes (a transcoder's output site)
    device, acc = model.device, _acc_device(model.device)
    sae = sae.to(device)
    special = torch.tensor(specials, device=device)
    stats, ce = _Stats(sae.cfg.width_out, sae.cfg.d_sae, acc), _CEStats(acc)
    lat = _Latents(sae.cfg.d_sae, top_n, acc)
    codes: list[tuple[torch.Tensor, torch.Tensor]] = []
    T = rows.shape[1]
    for start in tqdm(range(0, len(rows), batch_size), desc=desc or "evolve", unit="batch", leave=False):
        idx = rows[start : start + batch_size].to(device)
        keep = ~torch.isin(idx, special)
        if start < ce_rows:
            s = _ce_batch(model, idx, keep, ce, site, sae=sae, ablate=True)
            x, xh = s["x"], s["xh"]
            vals, ids = _sparse(s["f"])
        else:
            _, acts = run_with_cache(model, idx, [site_in, site])
            x = acts[site]
            vals, ids = sae.encode_sparse(acts[site_in])
            xh = sae.decode_sparse(vals, ids, acts[site_in])
        stats.update(x, (vals, ids), xh, keep)
        vals = (vals.float() * keep[..., None]).flatten(0, 1)
        ids = ids.flatten(0, 1)
        pos0 = start * T
        lat.update(
            vals, ids, pos0, None if ref is None else (ref[0][pos0 : pos0 + len(ids)], ref[1][pos0 : pos0 + len(ids)])
        )
        if keep_codes:
            codes.append((vals.cpu(), ids.cpu()))
    r = stats.metrics()
    n = stats.n.item()
    density = (stats.fired / n).float().cpu()
    metrics = {
        "explained_variance": r["explained_variance_centered"],
        "l0": r["l0"],
        "mse": r["mse_per_token"],
        "cossim": r["cossim"],
        "dead_frac": (density == 0).double().mean().item(),
        "tokens": n,
    }
    if ce_rows:
        metrics.update({k: v for k, v in ce.metrics().items() if k in _CE_KEYS})
    fired = stats.fired.clamp_min(1)
    t = {
        "density": density,
        "mean_act": (lat.sum / fired).float().cpu(),
        "top_val": lat.top_val.cpu(),
        "top_pos": lat.top_pos.cpu(),
        "sum": lat.sum.cpu(),
        "sq": lat.sq.cpu(),
        "cross": lat.cross.cpu(),
    }
    if keep_codes:
        width = max(v.shape[1] for v, _ in codes)
        t["code_val"] = torch.cat([F.pad(v, (0, width - v.shape[1])) for v, _ in codes])
        t["code_id"] = torch.cat([F.pad(i, (0, width - i.shape[1])) for _, i in codes])
    return metrics, t


_CE_KEYS = ("ce_loss_score", "kl_div_score", "ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation")


def pearson(n: int, sx, sxx, sy, syy, sxy) -> torch.Tensor:
    """Per-latent Pearson correlation from sums over n tokens (NaN where either side never varies)."""
    cov = n * sxy - sx * sy
    var = (n * sxx - sx * sx) * (n * syy - sy * sy)
    return torch.where(var > 0, cov / var.clamp_min(1e-300).sqrt(), torch.nan).float()


# ------------------------------------------------------------------------------------------ results on disk


def _save(path: Path, key: dict, metrics: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    meta = {"key": json.dumps(key, sort_keys=True), "metrics": json.dumps(metrics)}
    t = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(save(t, metadata=meta)))


def _load(path: Path, key: dict) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """A checkpoint's saved results when they were measured with this key (else None: measure again)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != json.dumps(key, sort_keys=True):
                return None
            return json.loads(meta["metrics"]), {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a file cut short by a kill: measure again
        return None


def _r(t: torch.Tensor) -> list:
    from .dashboard import _r as rounded

    return rounded(t.numpy())


def _rows_digest(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()[:16]


def _sae_digest(sae: SAE) -> str:
    from .features import weights_digest

    return weights_digest(sae)[:16]


# ------------------------------------------------------------------------------------------ the series


def token_rows_for(tok, data, cfg: EvolveConfig, seq_len: int) -> torch.Tensor:
    from .data import token_tensor

    if cfg.context_size > seq_len:
        raise NanosaeError(f"--context-size {cfg.context_size} exceeds the model's {seq_len}; lower it")
    n_rows = max(1, math.ceil(cfg.tokens / cfg.context_size))
    rows = token_tensor(tok, data, cfg.context_size, None if cfg.split == "all" else cfg.split, n_rows)
    if len(rows) == 0:
        raise NanosaeError(f"{data or 'the built-in corpus'} ({cfg.split}) holds too little text for one row")
    return rows


def run_series(
    ckpts: list[Checkpoint],
    sae_for: Callable[[int], SAE],
    out: Path,
    cfg: EvolveConfig,
    data=None,
    tokenizer_dir: str | None = None,
    correlate: bool = True,
) -> tuple[dict, dict[int, tuple[dict, dict]], torch.Tensor]:
    """Measure sae_for(i) on checkpoint i for every checkpoint (the reference first when correlating); results
    already on disk under the same key are reused. Returns the evolve.json dict, each checkpoint's (metrics,
    tensors) and the token rows."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    tok_sha, rows, specials = None, None, None
    if not -len(ckpts) <= cfg.reference < len(ckpts):
        raise NanosaeError(
            f"--reference {cfg.reference}: the series has checkpoints 0..{len(ckpts) - 1} (-1: the last)"
        )
    ref_i = cfg.reference % len(ckpts)
    order = [ref_i] + [i for i in range(len(ckpts)) if i != ref_i] if correlate else list(range(len(ckpts)))
    results: dict[int, tuple[dict, dict]] = {}
    ref = ref_key = None
    for i in tqdm(order, desc="checkpoints", unit="ckpt"):
        c = ckpts[i]
        files = resolve(c.path, tokenizer_dir=tokenizer_dir)
        sha = sha256_file(files.tokenizer_dir / "tokenizer.pkl")
        if tok_sha is None:
            tok_sha = sha
        elif sha != tok_sha:
            raise NanosaeError(
                f"{c.path} uses another tokenizer than {ckpts[order[0]].path}; a series must share one tokenizer"
            )
        model = tok = None
        if rows is None:
            model, tok, _ = load_model(c.path, device=cfg.device, tokenizer_dir=tokenizer_dir)
            rows = token_rows_for(tok, data, cfg, model.config.sequence_len)
            specials = sorted(special_token_ids(tok))
        sae = sae_for(i)
        is_ref = correlate and i == ref_i
        key = {
            "version": VERSION,
            "checkpoint": c.path,
            "fingerprint": _fingerprint(files.model),
            "sae": _sae_digest(sae),
            "rows": _rows_digest(rows),
            "ce_rows": _ce_rows(cfg, rows),
            "top_n": cfg.top_n,
            "reference": None if not correlate or is_ref else ref_key,  # the reference's own key: its results
            "codes": is_ref,
        }
        path = out / "checkpoints" / f"{c.label}.safetensors"
        saved = _load(path, key)
        if saved is None:
            if model is None:
                model, tok, _ = load_model(c.path, device=cfg.device, tokenizer_dir=tokenizer_dir)
            codes = None if ref is None or is_ref else (ref["code_val"], ref["code_id"])
            metrics, t = measure(
                model, sae, specials, rows, key["ce_rows"], cfg.batch_size, cfg.top_n, codes, is_ref, c.label
            )
            _save(path, key, metrics, t)
            saved = metrics, t
        results[i] = saved
        if is_ref:
            ref, ref_key = saved[1], hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        del model
    return _summary(ckpts, results, ref_i if correlate else None, rows, cfg), results, rows


def _ce_rows(cfg: EvolveConfig, rows: torch.Tensor) -> int:
    ce_tokens = cfg.tokens // 16 if cfg.ce_tokens is None else cfg.ce_tokens
    return min(len(rows), math.ceil(ce_tokens / rows.shape[1])) if ce_tokens else 0


def _fingerprint(path: Path) -> str:
    from .checkpoint import model_fingerprint

    return model_fingerprint(path)


def _summary(ckpts: list[Checkpoint], results: dict, ref_i: int | None, rows: torch.Tensor, cfg: EvolveConfig) -> dict:
    """evolve.json: per checkpoint metrics; per latent density, mean activation, correlation with the reference;
    the latents that appear (dead on the first checkpoint, alive on the last), vanish, and change most."""
    C = len(ckpts)
    density = torch.stack([results[i][1]["density"] for i in range(C)], 1)  # (d_sae, C)
    mean_act = torch.stack([results[i][1]["mean_act"] for i in range(C)], 1)
    per_ckpt = [{**dataclasses.asdict(c), **results[i][0]} for i, c in enumerate(ckpts)]
    out = {
        "version": VERSION,
        "config": dataclasses.asdict(cfg),
        "tokens_per_checkpoint": int(rows.numel()),
        "checkpoints": per_ckpt,
        "latents": {"density": _r(density), "mean_activation": _r(mean_act)},
    }
    alive = density > 0
    appear = (~alive[:, 0] & alive[:, -1]).nonzero().flatten()
    vanish = (alive[:, 0] & ~alive[:, -1]).nonzero().flatten()
    out["appear"] = appear[density[appear, -1].argsort(descending=True)].tolist()
    out["vanish"] = vanish[density[vanish, 0].argsort(descending=True)].tolist()
    if ref_i is not None:
        ref = results[ref_i][1]
        n = results[ref_i][0]["tokens"]
        corr = torch.stack(
            [
                torch.where(ref["density"] > 0, 1.0, torch.nan)
                if i == ref_i
                else pearson(
                    n, results[i][1]["sum"], results[i][1]["sq"], ref["sum"], ref["sq"], results[i][1]["cross"]
                )
                for i in range(C)
            ],
            1,
        )
        out["reference"] = ckpts[ref_i].label
        out["latents"]["correlation"] = _r(torch.nan_to_num(corr, nan=-2.0))  # -2: undefined (never varies)
        low = torch.nan_to_num(corr, nan=0.0).min(1).values  # a latent dead anywhere counts as changed fully
        changed = alive[:, ref_i].nonzero().flatten()
        out["change_most"] = changed[low[changed].argsort()][:50].tolist()
    return out


# ------------------------------------------------------------------------------------------ a chain of SAEs


def train_chain(configs: list, stream_fns: list[Callable], progress: bool = True) -> list[Path]:
    """SAE-Track's chain: train configs[0] (from scratch, or fine-tuned from its init_from), then fine-tune each
    next config from the previous SAE (its init_from is set here). A link whose run finished is kept; one with a
    checkpoint resumes; so an interrupted chain continues where it stopped. Returns the SAE folders."""
    from .train import CHECKPOINT, changed_settings, read_checkpoint, train

    folders = []
    for n, (tc, stream_fn) in enumerate(zip(configs, stream_fns)):
        if n:
            tc.init_from = str(folders[-1])
        out = Path(tc.out)
        ckpt = read_checkpoint(out) if (out / CHECKPOINT).is_file() else None
        if ckpt is not None and changed_settings(tc, ckpt):
            raise NanosaeError(
                f"{out} holds a link trained with other settings ({', '.join(changed_settings(tc, ckpt))}); "
                "give another --out or delete that folder"
            )
        finished = ckpt is not None and ckpt["step"] >= tc.steps and (out / "sae_weights.safetensors").is_file()
        if not finished:
            train(tc, stream_fn, resume=ckpt is not None, progress=progress)
        folders.append(out)
    return folders


@torch.no_grad()
def chain_report(decoders: list[torch.Tensor], density: torch.Tensor, stable_cos: float = 0.9) -> dict:
    """Per latent of a chain: decoder-direction drift over each link (1 - cos of consecutive rows), the cosine
    with the last checkpoint's row, the checkpoint where it is born (the first from which it is alive and stable
    to the end: stable = its row moves by less than stable_cos's angle over every later link; -1: not by the end)
    and where it dies (the first from which it never fires again, having fired before; -1: it does not)."""
    W = torch.stack([torch.nn.functional.normalize(d.float(), dim=-1) for d in decoders])  # (C, d_sae, d_in)
    cos_next = (W[:-1] * W[1:]).sum(-1).T  # (d_sae, C-1)
    alive = density > 0  # (d_sae, C)
    stable = torch.cat([cos_next >= stable_cos, torch.ones_like(alive[:, :1])], 1)
    ok = alive & stable
    # ok from c to the end: a reversed cumulative product
    ok_to_end = ok.flip(1).int().cumprod(1).flip(1).bool()
    dead_to_end = (~alive).flip(1).int().cumprod(1).flip(1).bool()
    C = density.shape[1]
    born = torch.where(ok_to_end.any(1), C - ok_to_end.sum(1), -1)
    died = torch.where(dead_to_end.any(1) & alive.any(1), C - dead_to_end.sum(1), -1)
    return {
        "born": born.tolist(),
        "died": died.tolist(),
        "drift": _r(1 - cos_next),
        "cos_to_last": _r((W * W[-1]).sum(-1).T),
    }


# ------------------------------------------------------------------------------------------ plot and page


def save_plot(summary: dict, path: Path) -> Path:
    """PNG: EV, CE/KL score and dead share per checkpoint, and (one SAE) the median correlation with the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cks = summary["checkpoints"]
    xs = range(len(cks))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    ax = axes[0]
    for key, name in (("explained_variance", "EV"), ("ce_loss_score", "CE score"), ("kl_div_score", "KL score")):
        if key in cks[0]:
            ax.plot(xs, [c[key] for c in cks], marker="o", label=name)
    ax.plot(xs, [c["dead_frac"] for c in cks], marker="o", label="dead share")
    if "correlation" in summary["latents"]:
        corr = torch.tensor(summary["latents"]["correlation"])
        med = [corr[:, i][corr[:, i] > -2].median().item() if (corr[:, i] > -2).any() else math.nan for i in xs]
        ax.plot(xs, med, marker="o", ls="--", label=f"median corr. with {summary['reference']}")
    low = min([c["explained_variance"] for c in cks] + [0.0])
    ax.set_ylim(max(-1.0, low) - 0.05, 1.05)  # a very negative EV (an SAE far from its checkpoint) is cut at -1
    ax.legend(fontsize=7)
    axes[1].plot(xs, [c["l0"] for c in cks], marker="o", color="#c44e52")
    axes[1].set_ylabel("L0")
    for a in axes:
        a.set_xticks(list(xs), [c["label"] for c in cks], rotation=45, ha="right", fontsize=7)
    fig.suptitle(summary.get("title", ""), fontsize=9)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _context(tok, rows: torch.Tensor, pos: int, width: int) -> str:
    """HTML of the tokens around flat position pos of rows (its own row only), the token itself marked."""
    import html

    T = rows.shape[1]
    r, t = divmod(pos, T)
    ids = rows[r, max(0, t - width) : t + 2].tolist()
    at = t - max(0, t - width)
    parts = [html.escape(tok.decode([i])) for i in ids]
    parts[at] = f"<mark>{parts[at]}</mark>"
    return "".join(parts).replace("\n", "⏎")


def write_page(summary: dict, results: dict, rows: torch.Tensor, tok, out: Path, cfg: EvolveConfig) -> Path:
    """out/index.html: the per-checkpoint table, the plot, and the latents that appear, vanish, change most (or,
    for a chain, are born late) with their density and top contexts at each checkpoint as a timeline."""
    import html

    cks = summary["checkpoints"]
    C = len(cks)
    dens = summary["latents"]["density"]
    keys = [k for k in ("explained_variance", "l0", "ce_loss_score", "kl_div_score", "dead_frac") if k in cks[0]]
    head = "".join(f"<th>{k}</th>" for k in ("checkpoint", *keys))
    body = "".join(
        "<tr><td>" + html.escape(c["label"]) + "</td>" + "".join(f"<td>{c[k]:.4g}</td>" for k in keys) + "</tr>"
        for c in cks
    )
    groups = [("Appear (dead on the first checkpoint, alive on the last)", summary.get("appear", []))]
    groups += [("Vanish (alive on the first, dead on the last)", summary.get("vanish", []))]
    if "change_most" in summary:
        groups.append((f"Change most (lowest correlation with {summary['reference']})", summary["change_most"]))
    if "chain" in summary:
        born = summary["chain"]["born"]
        late = sorted((i for i, b in enumerate(born) if b > 0), key=lambda i: -born[i])
        groups.append(("Born after the first checkpoint (chain)", late))
    link = summary.get("dashboard_link", "")
    sections = []
    for title, ids in groups:
        items = []
        for i in ids[:12]:
            name = f'<a href="{html.escape(link)}#/f/{i}">latent {i}</a>' if link else f"latent {i}"
            extra = ""
            if "chain" in summary:
                extra = f" · born {summary['chain']['born'][i]} · died {summary['chain']['died'][i]}"
            cells = []
            for c in range(C):
                t = results[c][1]
                ctx = [
                    f"<div class=ctx>{_context(tok, rows, int(p), cfg.context)} <small>{v:.3g}</small></div>"
                    for v, p in zip(t["top_val"][:3, i].tolist(), t["top_pos"][:3, i].tolist())
                    if p >= 0 and v > 0
                ]
                cells.append(
                    f"<td><b>{html.escape(cks[c]['label'])}</b><br><small>density {dens[i][c]:.2e}</small>"
                    + ("".join(ctx) or "<div class=ctx>—</div>")
                    + "</td>"
                )
            items.append(f"<h3>{name}{extra}</h3><table class=tl><tr>{''.join(cells)}</tr></table>")
        sections.append(f"<h2>{html.escape(title)} · {len(ids)}</h2>" + ("".join(items) or "<p>none</p>"))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nanosae evolve</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src 'self'">
<style>body{{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:3px 8px;vertical-align:top;text-align:left}}
.tl td{{min-width:180px;max-width:260px}}.ctx{{font:12px monospace;white-space:pre-wrap;margin:2px 0}}
mark{{background:#fd6}}</style></head><body>
<h1>{html.escape(summary.get("title", "nanosae evolve"))}</h1>
<p>{summary["tokens_per_checkpoint"]:,} tokens per checkpoint (the same rows on each).</p>
<table><tr>{head}</tr>{body}</table>
<p><img src="evolve.png" alt="metrics per checkpoint" width="900"></p>
{"".join(sections)}
</body></html>
"""
    return atomic_write(out / "index.html", lambda f: f.write(page.encode()))


# ------------------------------------------------------------------------------------------ the command


def _chain_configs(
    ckpts: list[Checkpoint], train_cfg, chain_tokens: int, out: Path, init_from: str | None
) -> tuple[list, list]:
    """One TrainConfig per checkpoint (the first with train_cfg.tokens, the others with chain_tokens) and the
    functions that build their activation streams (each loads its checkpoint when called)."""
    from .activations import model_stream

    configs, fns = [], []
    for n, c in enumerate(ckpts):
        tc = dataclasses.replace(
            train_cfg,
            model=c.path,
            model_step=None,
            phase=None,
            out=str(out / "chain" / c.label),
            tokens=train_cfg.tokens if n == 0 and not init_from else chain_tokens,
            init_from=(init_from or "") if n == 0 else "",
        )

        def stream_fn(state, tc=tc):
            model, tok, _ = load_model(tc.model, device=tc.device, tokenizer_dir=tc.tokenizer)
            seq_len = tc.seq_len or model.config.sequence_len
            # a short fine-tune need not forward the default 256k-token shuffle buffer first
            buffer = min(1 << 18, max(tc.tokens, tc.batch_size, seq_len))
            return model_stream(
                model, tok, tc.site, tc.data, tc.batch_size, seq_len=seq_len, seed=tc.seed, state=state,
                buffer_tokens=buffer, targets=tc.targets,
            )  # fmt: skip

        configs.append(tc)
        fns.append(stream_fn)
    return configs, fns


def evolve(
    model: str,
    sae: str | None,
    out: str | Path,
    cfg: EvolveConfig,
    data=None,
    tokenizer_dir: str | None = None,
    chain=None,
    dashboard: str | None = None,
) -> dict:
    """`nanosae evolve`: one SAE (or, with chain = a TrainConfig, a chain of SAEs trained along the series,
    the first initialised from `sae` when given) measured on every checkpoint; writes evolve.json, evolve.png and
    index.html into out (and links the page from the dashboard folder `dashboard`). Returns the summary."""
    from .sae import load_sae

    out = Path(out)
    ckpts = series(model, cfg.steps, cfg.phases)
    if chain is None:
        if sae is None:
            raise NanosaeError("pass --sae (the SAE to follow over the series), or --chain to train a chain of SAEs")
        the_sae = load_sae(sae, cfg.device)
        summary, results, rows = run_series(ckpts, lambda i: the_sae, out, cfg, data, tokenizer_dir)
        title = f"{the_sae.cfg.hook_name} · {sae} over {len(ckpts)} checkpoints"
    else:
        configs, fns = _chain_configs(ckpts, chain, cfg.chain_tokens, out, sae)
        saes = [load_sae(f, cfg.device) for f in train_chain(configs, fns)]
        summary, results, rows = run_series(ckpts, lambda i: saes[i], out, cfg, data, tokenizer_dir, correlate=False)
        density = torch.tensor(summary["latents"]["density"])
        summary["chain"] = {
            "folders": [c.out for c in configs],
            **chain_report([s.W_dec for s in saes], density, cfg.stable_cos),
        }
        title = f"{chain.site} · a chain of SAEs over {len(ckpts)} checkpoints"
    summary["title"] = title
    if dashboard:
        summary["dashboard_link"] = _link_dashboard(Path(dashboard), out, title)
    atomic_write_json(out / "evolve.json", summary)
    save_plot(summary, out / "evolve.png")
    _, tok, _ = load_model(ckpts[-1].path, device="cpu", tokenizer_dir=tokenizer_dir)
    page = write_page(summary, results, rows, tok, out, cfg)
    print(format_summary(summary))
    print(f"wrote {out / 'evolve.json'}, {out / 'evolve.png'} and {page}")
    return summary


def _link_dashboard(dashboard: Path, out: Path, title: str) -> str:
    """Add the page to the dashboard's list of linked pages; returns the dashboard's index as seen from out."""
    import os

    from .dashboard import register_page

    if not (dashboard / "index.html").is_file():
        raise NanosaeError(f"{dashboard}: no dashboard there (index.html); write one with nanosae viz --out DIR")
    register_page(dashboard, title, os.path.relpath(out / "index.html", dashboard))
    return os.path.relpath(dashboard / "index.html", out)


def format_summary(summary: dict) -> str:
    cks = summary["checkpoints"]
    lines = [summary.get("title", ""), f"{'checkpoint':16s} {'EV':>7s} {'L0':>7s} {'CE score':>9s} {'dead':>6s}"]
    for c in cks:
        ce = f"{c['ce_loss_score']:9.4f}" if "ce_loss_score" in c else f"{'-':>9s}"
        lines.append(f"{c['label']:16s} {c['explained_variance']:7.4f} {c['l0']:7.1f} {ce} {c['dead_frac']:6.1%}")
    lines.append(
        f"latents: {len(summary['appear'])} appear, {len(summary['vanish'])} vanish"
        + (f"; changed most: {summary['change_most'][:8]}" if "change_most" in summary else "")
    )
    if "chain" in summary:
        born = torch.tensor(summary["chain"]["born"])
        counts = [int((born == c).sum()) for c in range(len(cks))]
        lines.append(f"chain: latents born per checkpoint {counts}, never stable {int((born < 0).sum())}")
    return "\n".join(lines)
