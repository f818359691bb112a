"""Collection throughput against its floor, the truncated forward alone, measured side by side in one run.

The floor: `model(ids, stop_after_layer=L)` over pre-tokenized batches, no hooks, nothing kept. The contender:
`nanosae.activations.collect` end to end over the same rows (tokenizing, hooking, dropping BOS, casting,
serialising, sha256, atomic writes, manifest). Both count input positions per second. Rounds alternate, each
pairing a forward with a collection, so load from other processes hits both alike. The last line is `ratio: R`,
the median over rounds of collect ÷ forward (the target is ≥ 0.9); the ratio of the best rounds is printed too.

    .venv/bin/python bench/collect_throughput.py                     # a random-weight nanochat-shaped model
    .venv/bin/python bench/collect_throughput.py --model tests/fixtures/nanochat-d4/base_dir --layer 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae import GPT, GPTConfig, Tokenizer, load_model  # noqa: E402
from nanosae.activations import collect, model_identity  # noqa: E402
from nanosae.checkpoint import ModelInfo  # noqa: E402
from nanosae.data import token_rows  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a nanochat checkpoint (default: random weights, shape below)")
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--layer", type=int, default=3, help="hooked block (the forward stops after it)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    ap.add_argument("--rows", type=int, default=40, help="rows per round")
    ap.add_argument("--shard-tokens", type=int, default=2048, help="small shards, so writes overlap compute")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model:
        model, tok, _ = load_model(args.model)
    else:
        tok = Tokenizer.from_dir(FIXTURE / "tokenizer")
        cfg = GPTConfig(
            sequence_len=args.seq_len,
            vocab_size=tok.vocab_size,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_kv_head=args.n_head,
            n_embd=args.n_embd,
            window_pattern="SSSL",
        )
        model = GPT(cfg)
        model.init_weights(seed=0)
        model.eval().requires_grad_(False)
        # load_model fingerprints a checkpoint once when it loads it; do the same here, outside the timing
        model.info = ModelInfo("random-nanochat", "", 0, None, "current", model_identity(model)[1])
    site = f"blocks.{args.layer}.resid_post"
    rows = list(itertools.islice(token_rows(tok, None, args.seq_len), args.rows))
    ids = torch.tensor(rows)
    batches = ids.split(args.batch_size)
    kept = int((ids != tok.bos_token_id).sum())
    positions = ids.numel()
    C, L, T = model.config.n_embd, args.layer + 1, args.seq_len
    flops = 2 * L * 12 * C * C + 2 * L * 2 * C * T / 2  # matmuls of the blocks run, plus causal attention
    print(
        f"model: {model.config.n_layer} layers, n_embd {C}, stop after block {args.layer}; {args.rows} rows x {T} "
        f"= {positions:,} positions ({kept:,} kept), batch {args.batch_size} rows, {torch.get_num_threads()} threads"
    )

    def forward() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(b, stop_after_layer=args.layer)
        return time.perf_counter() - t

    def collection(out: Path) -> float:
        t = time.perf_counter()
        collect(model, tok, out, site, kept, dtype=args.dtype, seq_len=T, batch_size=args.batch_size,
                shard_tokens=args.shard_tokens, progress=False)  # fmt: skip
        return time.perf_counter() - t

    forward()  # warm-up
    best_f = best_c = float("inf")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            tf = forward()
            tc = collection(Path(tmp) / f"round{r}")
            best_f, best_c = min(best_f, tf), min(best_c, tc)
            ratios.append(tf / tc)
            print(f"round {r}: forward {positions / tf:,.0f} pos/s, collect {positions / tc:,.0f} pos/s")
    fwd, col = positions / best_f, positions / best_c
    print(f"forward alone: {fwd:,.0f} positions/s ({fwd * flops / 1e9:.1f} GFLOP/s at {flops / 1e6:.1f} MFLOP/pos)")
    print(f"collect:       {col:,.0f} positions/s ({kept / best_c:,.0f} activations/s written, {args.dtype})")
    print(f"best rounds: {col / fwd:.3f}")
    print(f"ratio: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
