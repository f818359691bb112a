"""Cost of the one-pass feature statistics against a plain forward + SAE encode of the same tokens.

    .venv/bin/python bench/features_throughput.py [--model DIR] [--d-sae 16384] [--tokens 65536]

Both sides run the same pre-tokenized batches (the forward stops after the SAE's layer in both), alternating,
best of --repeats each. The weight-only statistics (logits through the unembedding, d_sae x d_sae decoder
cosines) cost the same whatever the token count, so they are timed apart; the last line is `ratio: R` =
(pass time without them) / (forward + SAE.encode time), target R <= 1.3, and the line above it the total.
For TopK SAEs the pass never builds the dense (N, d_sae) latents that SAE.encode returns; the bench also times
forward + pre-activations + top-k alone, the floor of any pass, and prints the pass's ratio to that. The
per-token cost falls as the pass goes on (early on, every activation enters a top-k or reservoir slot; later
few do), so the ratio depends on tokens per latent: --tokens 1048576 with d_sae 16384 is the setting the README
quotes. A random TopK SAE stands in for a trained one: the cost depends on shapes and L0, not on meaning.
On CPU the bench runs one thread and times this process's CPU time (time.process_time): on a machine shared
with other jobs, wall time and multi-threaded CPU time (spinning threads) swing with their load; one thread's
CPU time does not, and both sides are timed the same way.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from nanosae import load_model
from nanosae.data import token_rows
from nanosae.features import FeatureConfig, _Pass, _weight_stats, batch_rows, compute_features
from nanosae.hooks import run_with_cache, site_width
from nanosae.sae import SAE, SAEConfig

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "nanochat-d4" / "base_dir"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--site", default=None, help="default: the middle layer's resid_post")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-rows", type=int, default=0, help="rows per forward (default: about 2^24 latent values)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: see the docstring)")
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    model, tok, _ = load_model(args.model, device=args.device)
    site = args.site or f"blocks.{model.config.n_layer // 2}.resid_post"
    d_in = site_width(model, site)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=args.d_sae, k=args.k, hook_name=site))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
    sae.to(args.device)
    cfg = FeatureConfig(n_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_rows)
    rows = batch_rows(cfg, args.d_sae)
    data = [r for r, _ in zip(token_rows(tok, None, args.seq_len), range(args.tokens // args.seq_len))]
    batches = [torch.tensor(data[i : i + rows]) for i in range(0, len(data), rows)]
    n = sum(b.numel() for b in batches)

    r = compare(model, tok, sae, site, batches, cfg, args.repeats)
    base, sparse, feat, fixed = r["base_s"], r["sparse_s"], r["pass_s"], r["weights_s"]
    state = _Pass(args.d_sae, d_in, cfg, "cpu")
    state_bytes = sum(t.nbytes for t in vars(state).values() if isinstance(t, torch.Tensor))
    state_bytes += sum(
        t.nbytes for s in (state.top, state.res) for t in vars(s).values() if isinstance(t, torch.Tensor)
    )
    enc_flops = 2 * d_in * args.d_sae
    print(
        f"model {model.info.name}, site {site}, SAE topk d_sae={args.d_sae} k={args.k}, {n:,} tokens, {rows} rows/batch"
    )
    print(
        f"forward+encode: {n / base:,.0f} tok/s ({enc_flops * n / base / 1e9:.1f} GFLOP/s in the encode matmul alone)"
    )
    print(
        f"forward+top-k without the dense latents: {n / sparse:,.0f} tok/s (ratio to it: {(feat - fixed) / sparse:.3f})"
    )
    print(f"feature pass:   {n / (feat - fixed):,.0f} tok/s, plus {fixed:.1f} s of weight-only statistics")
    print(
        f"pass state: {state_bytes / 2**20:.0f} MiB for d_sae={args.d_sae}, whatever the token count (+4 B/token ids)"
    )
    print(f"ratio with the weight statistics: {feat / base:.3f}")
    print(f"ratio: {(feat - fixed) / base:.3f}")


def compare(model, tok, sae: SAE, site: str, batches: list[torch.Tensor], cfg: FeatureConfig, repeats: int) -> dict:
    """Best of `repeats` seconds of forward + SAE.encode (`base_s`), forward + top-k without the dense latents
    (`sparse_s`), the whole feature pass (`pass_s`) and its weight-only statistics alone (`weights_s`)."""
    d_in, device = sae.cfg.d_in, sae.device
    # on CPU, this process's CPU time: on a shared machine wall time swings with the other processes' load
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.inference_mode()
    def baseline(encode) -> float:  # the forward to the site and `encode` of its activations, every batch
        sync()
        t0 = clock()
        for b in batches:
            _, acts = run_with_cache(model, b.to(device), [site], stop_early=True)
            encode(acts[site].reshape(-1, d_in).float())
        sync()
        return clock() - t0

    def features() -> float:
        sync()
        t0 = clock()
        compute_features(model, tok, sae, batches, cfg, progress=False)
        sync()
        return clock() - t0

    @torch.inference_mode()
    def weights() -> float:
        sync()
        t0 = clock()
        _weight_stats(model, sae, site, cfg)
        sync()
        return clock() - t0

    base, sparse, feat, fixed = math.inf, math.inf, math.inf, math.inf
    for _ in range(repeats):
        base = min(base, baseline(sae.encode))
        sparse = min(sparse, baseline(sae.encode_sparse))  # without the dense (N, d_sae) latents
        feat = min(feat, features())
        fixed = min(fixed, weights())
    return {"base_s": base, "sparse_s": sparse, "pass_s": feat, "weights_s": fixed}


if __name__ == "__main__":
    main()
