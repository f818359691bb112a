"""`nanosae demo`: the whole pipeline in one command, from nothing (or a nanochat checkpoint) to a dashboard.

model (the cached tiny nanochat model, trained on the built-in corpus if needed, or --model) -> activations at
the middle layer, collected once to a checksummed cache -> TopK SAE trained over several shuffled epochs of it ->
SAEBench core eval -> feature statistics -> HTML dashboard -> Neuronpedia export -> a one-screen summary.
Every stage reuses its result when run again with the same settings.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import NanosaeError
from .fileio import atomic_write_json
from .hooks import canonical_site, site_name


@dataclass
class DemoConfig:
    out: str = "nanosae-demo"
    model: str | None = None  # a nanochat checkpoint; None: the tiny model (trained once, then cached)
    layer: int | None = None  # None: the middle layer (n_layer // 2)
    site: str = "resid_post"
    data: str | None = None  # None: the built-in corpus (the standard library's sources and docs)
    collect_tokens: int = 1_000_000  # activations collected once (bf16 cache); training cycles over them
    tokens: int = 4_000_000  # SAE training tokens
    batch_size: int = 4096
    expansion: int = 16
    k: int = 32
    # Adam lr: 10x the width rule's 4.6e-4 (tuned for billions of tokens); on the tiny model's 4M tokens 4e-3 reached
    # explained variance 0.91 where the rule gave 0.85 (README, "The demo")
    lr: float = 4e-3
    eval_tokens: int = 98_304
    viz_tokens: int = 262_144
    device: str = "cpu"
    seed: int = 0
    force: bool = False  # retrain the SAE even if this demo folder holds a finished one


def _stage(n: int, text: str) -> float:
    print(f"\n[{n}/7] {text}", flush=True)
    return time.perf_counter()


def _train_sae(cfg: DemoConfig, model, tok, model_path: str, site: str, acts_dir: Path, sae_dir: Path):
    """Train (or reuse, or resume) the demo's TopK SAE on the cache; returns the inference SAE."""
    from .activations import cache_stream
    from .evaluate import make_train_eval
    from .sae import SAETrainConfig, load_sae
    from .train import CHECKPOINT, TrainConfig, changed_settings, read_checkpoint, train

    tcfg = TrainConfig(
        saes=[SAETrainConfig(arch="topk", k=cfg.k, expansion=cfg.expansion, lr=cfg.lr)],
        tokens=cfg.tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        out=str(sae_dir),
        device=cfg.device,
        model=model_path,
        site=site,
        data=cfg.data,
        activations=str(acts_dir),
        checkpoint_every=100,
        eval_every=max(1, cfg.tokens // cfg.batch_size // 4),
        log_every=10,
    )
    resume = False
    if (sae_dir / CHECKPOINT).exists():
        saved = read_checkpoint(sae_dir)
        changed = changed_settings(tcfg, saved)
        done = saved["step"] >= tcfg.steps and (sae_dir / "cfg.json").is_file()
        if not changed and done and not cfg.force:
            print(f"reusing the SAE trained before in {sae_dir}")
            return load_sae(sae_dir, cfg.device)
        if changed and not cfg.force:
            raise NanosaeError(
                f"{sae_dir} holds an SAE trained with other settings ({', '.join(changed)}); pass --force or a new --out"
            )
        if cfg.force:
            shutil.rmtree(sae_dir)
        else:
            resume = True
    eval_fn = make_train_eval(model, tok, cfg.data, n_tokens=4096)

    def stream(state):
        return cache_stream(acts_dir, cfg.batch_size, seed=cfg.seed, state=state)

    [sae] = train(tcfg, stream, eval_fn=eval_fn, resume=resume)
    return sae.to(cfg.device)


def striking_latents(stats, n: int = 5, min_density: float = 1e-4, max_density: float = 0.05) -> list[dict]:
    """Latents whose top examples agree on one token (the easiest to read at a glance), strongest first."""
    density, mx = stats.a("density"), stats.a("max")
    q = stats.meta["config"]["ctx_before"]
    toks, pos = stats.a("top_tok")[:, :, q], stats.a("top_pos")
    found = []
    for i in np.flatnonzero((density >= min_density) & (density <= max_density)):
        shown = [stats.vocab[t] for t, p in zip(toks[i], pos[i]) if p >= 0 and t >= 0]
        if len(shown) < 5:
            continue
        words, counts = np.unique(shown, return_counts=True)
        purity = counts.max() / len(shown)
        found.append((purity, float(mx[i]), int(i), [str(w) for w in words[np.argsort(-counts)][:3]], len(shown)))
    found.sort(key=lambda f: (-f[0], -f[1]))
    return [
        {
            "index": i,
            "purity": round(float(p), 3),
            "examples": m,
            "top_tokens": w,
            "density": float(density[i]),
            "max": round(m_, 3),
            "promotes": [t for t, _ in stats.logits(i, "pos")[:3]],
        }
        for p, m_, i, w, m in found[:n]
    ]


def run_demo(cfg: DemoConfig) -> dict:
    from .activations import collect
    from .checkpoint import load_model
    from .dashboard import write_dashboard
    from .evaluate import evaluate, format_table, save_result
    from .features import FeatureConfig, load_or_compute
    from .labels import load_label_records, load_labels
    from .lm_train import ensure_tiny_model
    from .neuronpedia import export_neuronpedia

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out).expanduser()
    times = {}

    t = _stage(1, "model" + ("" if cfg.model else ": the tiny nanochat model on the built-in corpus"))
    model_path = str(cfg.model or ensure_tiny_model())
    model, tok, _ = load_model(model_path, device=cfg.device)
    layer = model.config.n_layer // 2 if cfg.layer is None else cfg.layer
    site = site_name(layer, cfg.site)
    canonical_site(site, model)  # a clear error for a layer the model does not have
    times["model"] = time.perf_counter() - t
    print(f"{model.info.name}: {model.config.n_layer} layers, width {model.config.n_embd}, site {site}")

    t = _stage(2, f"collect {cfg.collect_tokens:,} activations at {site}")
    acts_dir = out / "activations"
    collect(model, tok, acts_dir, site, cfg.collect_tokens, source=cfg.data, dtype="bf16")
    times["collect"] = time.perf_counter() - t

    t = _stage(3, f"TopK SAE (k={cfg.k}, {cfg.expansion}x) on {cfg.tokens:,} tokens from the cache")
    sae_dir = out / "sae"
    sae = _train_sae(cfg, model, tok, model_path, site, acts_dir, sae_dir)
    times["train"] = time.perf_counter() - t

    t = _stage(4, f"SAEBench core eval on {cfg.eval_tokens:,} held-out tokens")
    result = evaluate(sae, model, tok, cfg.data, cfg.eval_tokens, split="val", sae_id=str(sae_dir))
    print(format_table(result))
    eval_json, eval_png = save_result(result, sae_dir / "eval_core.json")
    times["eval"] = time.perf_counter() - t

    t = _stage(5, f"feature statistics over {cfg.viz_tokens:,} tokens")
    stats = load_or_compute(model, tok, sae, sae_dir, cfg.data, FeatureConfig(n_tokens=cfg.viz_tokens))
    times["features"] = time.perf_counter() - t

    t = _stage(6, "dashboard")
    index = write_dashboard(stats, out / "dashboard", labels=load_labels(sae_dir))
    times["dashboard"] = time.perf_counter() - t

    t = _stage(7, "Neuronpedia export")
    export_neuronpedia(stats, sae, out / "neuronpedia", labels=load_label_records(sae_dir))
    times["export"] = time.perf_counter() - t

    m = result["eval_result_metrics"]
    summary = {
        "model": model.info.name,
        "model_path": model_path,
        "site": site,
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "k": cfg.k,
        "l0": m["sparsity"]["l0"],
        "explained_variance": m["reconstruction_quality"]["explained_variance"],
        "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
        "ce_loss_diff": m["model_performance_preservation"]["ce_loss_with_sae"]
        - m["model_performance_preservation"]["ce_loss_without_sae"],
        "kl_div_score": m["model_behavior_preservation"]["kl_div_score"],
        "dead_frac": 1.0 - m["misc_metrics"]["frac_alive"],
        "striking": striking_latents(stats),
        "files": {
            "activations": str(acts_dir),
            "sae": str(sae_dir),
            "eval": str(eval_json),
            "density_png": str(eval_png),
            "dashboard": str(index),
            "neuronpedia": str(out / "neuronpedia"),
        },
        "seconds": {k: round(v, 1) for k, v in times.items()} | {"total": round(time.perf_counter() - t_start, 1)},
        "config": dataclasses.asdict(cfg),
    }
    print_summary(summary)
    atomic_write_json(out / "summary.json", summary)
    return summary


def print_summary(s: dict) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nnanosae demo: done in {s['seconds']['total']:.0f}s")
    print(f"model     {s['model']}  ({s['model_path']})")
    print(f"site      {s['site']}   SAE  TopK k={s['k']}, {s['d_in']} -> {s['d_sae']} latents")
    print(
        f"quality   L0 {s['l0']:.1f}   explained variance {s['explained_variance']:.3f}   "
        f"CE score {s['ce_loss_score']:.3f} (+{s['ce_loss_diff']:.3f} nats)   KL score {s['kl_div_score']:.3f}   "
        f"dead {100 * s['dead_frac']:.1f}%"
    )
    if s["striking"]:
        print("striking latents (top examples agree on one token):")
        for f in s["striking"]:
            print(
                f"  #{f['index']:<6d} fires on {', '.join(repr(t) for t in f['top_tokens'])}"
                f"  ({100 * f['purity']:.0f}% of {f['examples']} top examples, density {f['density']:.1e})"
                f"  promotes {', '.join(repr(t) for t in f['promotes'])}"
            )
    files = s["files"]
    print(f"SAE       {files['sae']}  (SAELens folder; eval_core.json, eval_core_density.png)")
    print(f"dashboard {files['dashboard']}  (open in a browser, no server needed)")
    print(f"export    {files['neuronpedia']}  (Neuronpedia batches and bulk-import layout)")
    dashboard = str(Path(files["dashboard"]).parent)
    args = ["serve", "--model", s["model_path"], "--sae", files["sae"], "--dashboard", dashboard]
    print(f"explore   {command()} {shlex.join(args)}")
    print(bar)


def command() -> str:
    """How the user can run nanosae from where they are: as run.sh was called (it says so in NANOSAE_COMMAND),
    else `nanosae` when that is on PATH, else this Python with -m (a venv that was never activated)."""
    if invoked := os.environ.get("NANOSAE_COMMAND"):
        return shlex.quote(invoked)
    return "nanosae" if shutil.which("nanosae") else f"{shlex.quote(sys.executable)} -m nanosae"
