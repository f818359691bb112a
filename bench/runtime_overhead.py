"""Cost of live feature tracking during generation: tokens/s with and without the tracker, side by side.

A d12-shaped nanochat model (random weights) and a 16x TopK SAE (d_sae 12288) at its middle layer; plain
KV-cache generation and generation with tracking (nanosae.runtime.generate_tracked: every read token
encoded, top-8 latents to the host) run in one process in lockstep: a token of one, a token of the other, in
alternating order, each step timed. The overhead is the median over rounds of (tracked time / plain time) - 1;
tracking also reads the last generated token (one more forward, 1/tokens of the total).
The floor is the SAE encoder's FLOPs over the model's FLOPs per token at the context the benchmark actually
runs (batch-1 decode is bound by reading weights, and both read each weight once per token, so the FLOP
ratio is also the bytes ratio when the SAE and the model share a dtype).

    python bench/runtime_overhead.py [--device cuda] [--tokens 64] [--rounds 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanosae.generate import generate_stream
from nanosae.gpt import GPT, GPTConfig
from nanosae.runtime import Tracker, generate_tracked
from nanosae.sae import SAE, SAEConfig


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def model_flops(model: GPT, context: float) -> float:
    """Forward FLOPs per token: 2 per weight of every matmul, plus QK^T and AV over `context` keys."""
    cfg = model.config
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".weight") and "h." in n)
    weights += model.lm_head.weight.numel()
    return 2.0 * weights + 4.0 * cfg.n_layer * cfg.n_embd * context


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per run")
    ap.add_argument("--rounds", type=int, default=8, help="pairs of generations (plain, tracked), run in lockstep")
    ap.add_argument("--top-n", type=int, default=8)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is steadier on a busy machine)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    torch.manual_seed(0)

    cfg = GPTConfig(n_layer=12, n_embd=768, n_head=6, n_kv_head=6, vocab_size=32768, sequence_len=2048)
    model = GPT(cfg)
    model.init_weights(seed=0)
    model = model.to(dev).eval().requires_grad_(False)
    if dev.startswith("cuda"):
        model.set_compute_dtype(torch.bfloat16)
    d_sae = 16 * cfg.n_embd
    sae = SAE(SAEConfig(architecture="topk", d_in=cfg.n_embd, d_sae=d_sae, k=32, hook_name="blocks.6.resid_post"))
    with torch.no_grad():
        W = torch.randn(d_sae, cfg.n_embd)
        sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    sae = sae.to(dev).requires_grad_(False)
    prompt = torch.randint(0, cfg.vocab_size - 16, (args.prompt,)).tolist()
    n = args.tokens
    print(
        f"device {dev}, model d12 ({model.num_params() / 1e6:.0f}M params, {model.compute_dtype}), "
        f"SAE topk d_sae {d_sae}, prompt {args.prompt} + {n} generated tokens, {args.rounds} rounds, "
        f"{torch.get_num_threads()} CPU threads"
    )
    r = compare(model, sae, prompt, n, args.rounds, args.top_n)
    plain_s, tracked_s, t_hook = r["plain_s"], r["tracked_s"], r["hook_s"]
    print(f"plain   {n / plain_s:7.1f} tok/s (median)")
    print(
        f"tracked {n / tracked_s:7.1f} tok/s (median), the hook alone {t_hook * 1e3:.2f} ms/token "
        f"= {t_hook / (plain_s / n):.1%} of a plain step"
    )
    print(
        f"floor: encoder {2 * cfg.n_embd * d_sae / 1e6:.1f} MFLOP / model {r['model_flops'] / 1e6:.0f} "
        f"MFLOP per token at context {r['context']:.0f} (model.flops_per_token() at full context: "
        f"{2 * cfg.n_embd * d_sae / model.flops_per_token():.1%})"
    )
    print(f"ratio to floor: {r['overhead'] / r['floor']:.2f}")
    print(f"overhead: {r['overhead']:.1%} (floor: {r['floor']:.1%})")


def compare(model: GPT, sae: SAE, prompt: list[int], n: int, rounds: int, top_n: int, verbose: bool = True) -> dict:
    """Plain and tracked generation of n tokens after `prompt`, in lockstep for `rounds` rounds (after a warm-up):
    median seconds of each, the overhead (median tracked / plain - 1), its FLOP floor, and the hook alone."""
    dev = str(model.device)

    def runs():
        tracker = Tracker(sae, top_n)
        gens = {
            "plain": generate_stream(model, prompt, n),
            "tracked": generate_tracked(model, sae, prompt, n, tracker=tracker),
        }
        return gens, tracker

    def lockstep() -> dict[str, float]:
        """One plain and one tracked generation advanced a token at a time in alternating order, each step
        timed: a machine getting busier or quieter slows both alike."""
        gens, tracker = runs()
        spent, counts, live, step = {"plain": 0.0, "tracked": 0.0}, {"plain": 0, "tracked": 0}, list(gens), 0
        while live:
            for name in list(live if step % 2 == 0 else live[::-1]):
                sync(dev)
                t0 = time.perf_counter()
                try:
                    next(gens[name])
                    counts[name] += 1
                except StopIteration:
                    live.remove(name)
                sync(dev)
                spent[name] += time.perf_counter() - t0
            step += 1
        assert counts == {"plain": n, "tracked": n} and len(tracker.records) == len(prompt) + n
        return spent

    lockstep()  # warm-up
    ratios, t_plain, t_tracked = [], [], []
    for r in range(rounds):
        spent = lockstep()
        tp, tt = spent["plain"], spent["tracked"]
        t_plain.append(tp), t_tracked.append(tt), ratios.append(tt / tp)
        if verbose:
            print(f"round {r}: plain {n / tp:7.1f} tok/s   tracked {n / tt:7.1f} tok/s   ratio {tt / tp:.3f}")

    # the hook alone on one decode-step activation, for the record
    x = torch.randn(1, 1, sae.cfg.d_in, device=dev, dtype=model.compute_dtype)
    tracker = Tracker(sae, top_n)
    with torch.inference_mode():
        t_hook = timed(lambda: [tracker.hook(x, 0) or tracker.flush() for _ in range(200)], dev) / 200

    context = len(prompt) + n / 2  # mean keys attended per generated token
    flops = model_flops(model, context)
    return {
        "plain_s": statistics.median(t_plain),
        "tracked_s": statistics.median(t_tracked),
        "hook_s": t_hook,
        "overhead": statistics.median(ratios) - 1,
        "floor": 2.0 * sae.cfg.d_in * sae.cfg.d_sae / flops,
        "model_flops": flops,
        "context": context,
    }


if __name__ == "__main__":
    main()
