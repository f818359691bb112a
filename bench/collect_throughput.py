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
import shutil
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
    rows = list(itertools.islice(token_rows(tok, None, args.seq_len), args.rows))
    ids = torch.tensor(rows)
    kept = int((ids != tok.bos_token_id).sum())
    C, L, T = model.config.n_embd, args.layer + 1, args.seq_len
    flops = 2 * L * 12 * C * C + 2 * L * 2 * C * T / 2  # matmuls of the blocks run, plus causal attention
    print(
        f"model: {model.config.n_layer} layers, n_embd {C}, stop after block {args.layer}; {args.rows} rows x {T} "
        f"= {ids.numel():,} positions ({kept:,} kept), batch {args.batch_size} rows, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = compare(model, tok, args.layer, rows, args.batch_size, args.shard_tokens, args.dtype, args.rounds, tmp)
    fwd, col = r["forward_pos_s"], r["collect_pos_s"]
    print(f"forward alone: {fwd:,.0f} positions/s ({fwd * flops / 1e9:.1f} GFLOP/s at {flops / 1e6:.1f} MFLOP/pos)")
    print(
        f"collect:       {col:,.0f} positions/s ({col * kept / ids.numel():,.0f} activations/s written, {args.dtype})"
    )
    print(f"best rounds: {r['best']:.3f}")
    print(f"ratio: {r['ratio']:.3f}")


def compare(
    model: GPT,
    tok: Tokenizer,
    layer: int,
    rows: list[list[int]],
    batch_size: int,
    shard_tokens: int,
    dtype: str,
    rounds: int,
    tmp: str,
    verbose: bool = True,
) -> dict[str, float]:
    """Alternating rounds of the truncated forward over `rows` and a collection of the same rows into `tmp`:
    positions/s of each (best round), the best-rounds ratio and the median per-round ratio (collect / forward)."""
    ids = torch.tensor(rows)
    batches = ids.split(batch_size)
    kept = int((ids != tok.bos_token_id).sum())
    positions, T, device = ids.numel(), ids.shape[1], model.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward() -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(b.to(device), stop_after_layer=layer)
        sync()
        return time.perf_counter() - t

    def collection(out: Path) -> float:
        t = time.perf_counter()
        collect(model, tok, out, f"blocks.{layer}.resid_post", kept, dtype=dtype, seq_len=T, batch_size=batch_size,
                shard_tokens=shard_tokens, progress=False)  # fmt: skip
        return time.perf_counter() - t  # collect ends with the activations on the host and the files written

    forward()  # warm-up
    best_f = best_c = float("inf")
    ratios = []
    for r in range(rounds):
        tf = forward()
        tc = collection(Path(tmp) / f"round{r}")
        shutil.rmtree(Path(tmp) / f"round{r}")  # at d20 scale a round writes gigabytes
        best_f, best_c = min(best_f, tf), min(best_c, tc)
        ratios.append(tf / tc)
        if verbose:
            print(f"round {r}: forward {positions / tf:,.0f} pos/s, collect {positions / tc:,.0f} pos/s")
    return {
        "forward_pos_s": positions / best_f,
        "collect_pos_s": positions / best_c,
        "best": best_f / best_c,
        "ratio": statistics.median(ratios),
    }


if __name__ == "__main__":
    main()
