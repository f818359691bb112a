"""Does an unhooked forward run at full speed? Times, interleaved in one process:
  (a) a plain forward of the same network with no hook checks at all (written out below),
  (b) nanosae's GPT with no hooks registered,
  (c) nanosae's GPT with one no-op hook (returns None) at the middle block's resid_post,
on a d12-shaped nanochat model with random weights (n_embd 768, 6 heads, 12 layers, vocab 32768), and on a
tiny model (n_embd 64, 4 layers, 32 tokens) where a forward takes well under a millisecond, so that any Python
overhead of the hook machinery shows in microseconds. Prints median and best times and the ratios b/a, c/a.

    .venv/bin/python bench/hook_overhead.py            # about a minute on 2 CPU cores
    .venv/bin/python bench/hook_overhead.py --rounds 5 --shapes 1x256,4x512 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nanosae.gpt import GPT, GPTConfig, norm
from nanosae.hooks import add_hooks


def plain_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The current-generation forward with no hook checks: the reference speed."""
    T = idx.size(1)
    cos, sin = model.cos[:, :T], model.sin[:, :T]
    x = norm(model.transformer.wte(idx))
    gate = model.smear_lambda * torch.sigmoid(model.smear_gate(x[:, 1:, :24]))
    x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
    x0, x_backout = x, None
    for i, block in enumerate(model.transformer.h):
        x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        ve = model.value_embeds[str(i)](idx) if i in model.ve_layers else None
        x = x + block.attn(norm(x), ve, cos, sin, model.windows[i], None, i)
        x = x + block.mlp.c_proj(F.relu(block.mlp.c_fc(norm(x))).square())
        if i == model.config.n_layer // 2:
            x_backout = x
    x = norm(x - model.backout_lambda * x_backout)
    logits = model.lm_head(x)[..., : model.config.vocab_size].float()
    return 15 * torch.tanh(logits / 15)


def random_model(cfg: GPTConfig) -> GPT:
    model = GPT(cfg, "current")
    model.init_weights(seed=0)
    with torch.no_grad():  # init zeroes the projections; random ones make every op do real work
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.size(1) ** -0.5)
        model.smear_lambda.fill_(0.3)
    return model.eval().requires_grad_(False)


def noop(x: torch.Tensor, start: int) -> None:
    return None


def compare(model: GPT, B: int, T: int, rounds: int, reps: int) -> dict[str, list[float]]:
    """Seconds per forward of each variant, one entry per round; the variants take turns within each round."""
    idx = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    mid = f"blocks.{model.config.n_layer // 2}.resid_post"
    variants = {  # name -> (forward, hooks registered while it runs)
        "a plain (no hook checks)": (lambda: plain_forward(model, idx), {}),
        "b nanosae, no hooks": (lambda: model(idx), {}),
        "c nanosae, 1 no-op hook": (lambda: model(idx), {mid: noop}),
    }
    with torch.inference_mode():
        assert torch.allclose(plain_forward(model, idx), model(idx), atol=1e-4), "plain forward must agree"
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds + 1):
        order = list(variants)
        order = order[r % 3 :] + order[: r % 3]  # rotate so no variant always runs first
        for name in order:
            forward, hooks = variants[name]
            with torch.inference_mode(), add_hooks(model, hooks):
                t0 = time.perf_counter()
                for _ in range(reps):
                    forward()
                dt = (time.perf_counter() - t0) / reps
            if r > 0:  # round 0 warms up
                times[name].append(dt)
    return times


def report(times: dict[str, list[float]], flops: float | None, unit: str) -> None:
    scale = {"ms": 1e3, "us": 1e6}[unit]
    base = times["a plain (no hook checks)"]
    for name, ts in times.items():
        med, best = statistics.median(ts), min(ts)
        speed = f"{flops / best / 1e9:6.1f} GFLOP/s  " if flops else ""
        print(
            f"  {name:26s} {med * scale:8.1f} | {best * scale:8.1f} {unit}  {speed}"
            f"ratio {med / statistics.median(base):.3f} | {best / min(base):.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per shape (after one warm-up round)")
    ap.add_argument("--shapes", default="1x512,2x256", help="comma-separated BxT for the d12 model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = GPTConfig(2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768, window_pattern="SSSL")
    model = random_model(cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n)
    matmul_params -= sum(e.weight.numel() for e in model.value_embeds.values())  # lookups, not matmuls
    print(f"d12-shaped model: {model.num_params() / 1e6:.0f}M params, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; times are median | best of the rounds")  # fmt: skip
    for shape in args.shapes.split(","):
        B, T = map(int, shape.lower().split("x"))
        flops = 2 * matmul_params * B * T + 4 * cfg.n_layer * cfg.n_embd * B * T * T / 2  # causal attention
        print(f"\nd12 B={B} T={T}: {flops / 1e9:.0f} GFLOP per forward, {args.rounds} interleaved rounds")
        report(compare(model, B, T, args.rounds, reps=1), flops, "ms")

    tiny = random_model(GPTConfig(256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=4, n_embd=64))
    print("\ntiny model (4 layers, n_embd 64) B=1 T=32, where Python overhead shows: 20 rounds of 50 forwards")
    report(compare(tiny, 1, 32, rounds=20, reps=50), None, "us")


if __name__ == "__main__":
    main()
