"""Core-eval throughput and memory against its floor, measured side by side in one run over the same batches.

The floor is the work no implementation can skip: for the CE/KL batches three full forwards (clean, SAE
spliced, zero-ablated), for the others a forward stopped after the SAE's block plus the SAE encode/decode.
The contender is `nanosae.evaluate.evaluate` end to end (masking, every metric, float64 accumulators, per-latent
counts, weight statistics). Peak accelerator memory of both is printed: streaming means the eval's peak does
not grow with the token count. The last line is `ratio: R` (floor time ÷ eval time; 1.0 is the floor).

    .venv/bin/python bench/eval_throughput.py --tokens 20000 --n-layer 4 --n-embd 128 --n-head 2 --layer 2 --d-sae 2048  # CPU
    python bench/eval_throughput.py --device cuda --dtype bf16   # d20-shaped model, 16k-latent SAE, 4.1M tokens
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae import GPT, GPTConfig, Tokenizer, load_model  # noqa: E402
from nanosae.data import token_rows  # noqa: E402
from nanosae.evaluate import evaluate, format_table  # noqa: E402
from nanosae.hooks import add_hooks, run_with_cache  # noqa: E402
from nanosae.sae import SAE, SAEConfig  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a nanochat checkpoint (default: random weights, shape below)")
    ap.add_argument("--n-layer", type=int, default=20)
    ap.add_argument("--n-embd", type=int, default=1280)
    ap.add_argument("--n-head", type=int, default=10)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--layer", type=int, default=10, help="the SAE reads blocks.<layer>.resid_post")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=4_096_000)
    ap.add_argument("--ce-tokens", type=int, default=None, help="default: tokens / 10")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.model:
        model, tok, _ = load_model(args.model, device=device)
    else:  # token ids come from the fixture tokenizer (2000 ids), the model keeps a full-size vocabulary
        tok = Tokenizer.from_dir(FIXTURE / "tokenizer")
        cfg = GPTConfig(2048, args.vocab, args.n_layer, args.n_head, args.n_head, args.n_embd, "SSSL")
        model = GPT(cfg)
        model.init_weights(seed=0)
        model.eval().requires_grad_(False).to(device)
    if args.dtype == "bf16":
        model.set_compute_dtype(torch.bfloat16)
    d = model.config.n_embd
    site = f"blocks.{args.layer}.resid_post"
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig("topk", d, args.d_sae, k=args.k, hook_name=site))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(args.d_sae, d, generator=g), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
    sae.to(device)

    T, B = args.context_size, args.batch_size
    n_rows = math.ceil(args.tokens / (B * T)) * B
    rows = torch.tensor([r for _, r in zip(range(n_rows), token_rows(tok, None, T, "train", repeat=True))])
    ce_tokens = args.tokens // 10 if args.ce_tokens is None else args.ce_tokens
    n_ce = math.ceil(ce_tokens / (B * T))
    print(
        f"model: {model.config.n_layer} layers, n_embd {d}, vocab {model.config.vocab_size}, {args.dtype} on "
        f"{device}; SAE topk d_sae {args.d_sae} k {args.k} at {site}; {rows.numel():,} tokens, "
        f"{n_ce * B * T:,} of them with CE/KL"
    )

    r = compare(model, tok, sae, site, rows, ce_tokens, B)
    print(format_table(r["result"]))
    print(
        f"floor: {r['floor_s']:.1f}s ({rows.numel() / r['floor_s']:,.0f} tok/s), peak memory {r['floor_mib']:,.0f} MiB"
    )
    print(f"eval:  {r['eval_s']:.1f}s ({rows.numel() / r['eval_s']:,.0f} tok/s), peak memory {r['eval_mib']:,.0f} MiB")
    print(f"ratio: {r['floor_s'] / r['eval_s']:.3f}")


def compare(
    model: GPT, tok: Tokenizer, sae: SAE, site: str, rows: torch.Tensor, ce_tokens: int, B: int, progress: bool = True
) -> dict:
    """Seconds and peak accelerator memory (MiB; NaN on CPU) of the floor and of `evaluate` over the token `rows`,
    the first `ce_tokens` of them with CE/KL; `result` is the eval's output."""
    device = model.device
    T = rows.shape[1]
    n_ce = math.ceil(ce_tokens / (B * T))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def floor() -> float:
        sync()
        t = time.perf_counter()
        for i, b in enumerate(rows.split(B)):
            b = b.to(device)
            if i < n_ce:
                model(b)
                with add_hooks(model, {site: lambda x, s: sae(x).to(x.dtype)}):
                    model(b)
                with add_hooks(model, {site: lambda x, s: torch.zeros_like(x)}):
                    model(b)
            else:
                _, acts = run_with_cache(model, b, [site])
                sae.decode(sae.encode(acts[site]))
        sync()
        return time.perf_counter() - t

    def peak(fn):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        mem = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        return out, mem

    def run_eval():
        t = time.perf_counter()
        result = evaluate(sae, model, tok, rows, rows.numel(), ce_tokens=ce_tokens, batch_size=B, progress=progress)
        sync()
        return time.perf_counter() - t, result

    evaluate(sae, model, tok, rows[: 2 * B], 2 * B * T, ce_tokens=B * T, batch_size=B, progress=False)  # warm-up
    floor_s, floor_mib = peak(floor)
    (eval_s, result), eval_mib = peak(run_eval)
    return {"floor_s": floor_s, "eval_s": eval_s, "floor_mib": floor_mib, "eval_mib": eval_mib, "result": result}


if __name__ == "__main__":
    main()
