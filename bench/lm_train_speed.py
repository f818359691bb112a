"""Speed of one `train-lm` training step against its floor, the step's matrix products alone, side by side.

The step: forward + backward + Muon/AdamW of the tiny model (default TinyConfig, random tokens). The floor: the
same GEMMs timed alone in the same dtype (every Linear's forward, input-grad and weight-grad product, plus
attention's QK^T/AV and their grads over the full T x T, as flops_per_token counts them). Each setting
(fp32 / bf16 autocast x 1 / all threads) runs in alternating rounds and its best round counts, so load from other
processes hits all alike. `floor/step` is the fraction of the step that is matmul work; the rest is elementwise
ops (softcap, softmax, norms, RoPE), attention kernels and the optimisers.

    .venv/bin/python bench/lm_train_speed.py            # default config
    .venv/bin/python bench/lm_train_speed.py --vocab-size 4096 --batch-size 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae.gpt import GPT  # noqa: E402
from nanosae.lm_train import TinyConfig, make_optimizers  # noqa: E402


def step_fn(cfg: TinyConfig, dtype: torch.dtype):
    model = GPT(cfg.gpt_config())
    model.init_weights(seed=0)
    adam, muon = make_optimizers(model, cfg)
    muon.ns_dtype = dtype
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1))

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)

    return step, model.flops_per_token()


def floor_fn(cfg: TinyConfig, dtype: torch.dtype):
    N, C, T, hd = cfg.batch_size * cfg.seq_len, cfg.n_embd, cfg.seq_len, cfg.head_dim
    H = C // hd
    shapes = [(C, C)] * 4 * cfg.n_layer + [(C, 4 * C), (4 * C, C)] * cfg.n_layer + [(C, cfg.vocab_size)]
    mats = [
        (torch.randn(N, i, dtype=dtype), torch.randn(i, o, dtype=dtype), torch.randn(N, o, dtype=dtype))
        for i, o in shapes
    ]
    q = torch.randn(cfg.batch_size * H, T, hd, dtype=dtype)
    s = torch.randn(cfg.batch_size * H, T, T, dtype=dtype)

    def floor():
        for x, w, dy in mats:
            x @ w  # forward
            dy @ w.T  # grad of the input
            x.T @ dy  # grad of the weight
        for _ in range(cfg.n_layer):
            for _ in range(3):  # QK^T / AV forward, and twice that backward (2 + 4 products)
                q @ q.mT
                s @ q

    return floor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab-size", type=int, default=TinyConfig.vocab_size)
    p.add_argument("--batch-size", type=int, default=TinyConfig.batch_size)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    args = p.parse_args()
    cfg = TinyConfig(vocab_size=args.vocab_size, batch_size=args.batch_size)
    n = torch.get_num_threads()
    settings = [(t, d) for d in (torch.float32, torch.bfloat16) for t in sorted({1, n})]
    fns = {s: (*step_fn(cfg, s[1]), floor_fn(cfg, s[1])) for s in settings}
    best = {s: [float("inf"), float("inf")] for s in settings}
    for _ in range(args.rounds):
        for s, (step, _, floor) in fns.items():
            torch.set_num_threads(s[0])
            for i, f in enumerate((step, floor)):
                f()  # settle after the switch
                t = time.perf_counter()
                for _ in range(args.steps):
                    f()
                best[s][i] = min(best[s][i], (time.perf_counter() - t) / args.steps)
    tokens = cfg.batch_size * cfg.seq_len
    print(f"config: {cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, {tokens} tokens/step")
    print(f"{'setting':<22}{'ms/step':>9}{'tok/s':>9}{'GFLOP/s':>9}{'floor ms':>10}{'floor/step':>12}")
    for (t, d), (st, fl) in best.items():
        flops = 3 * fns[(t, d)][1] * tokens
        name = f"{t} thread(s) {str(d).removeprefix('torch.')}"
        print(f"{name:<22}{1000 * st:9.0f}{tokens / st:9.0f}{flops / st / 1e9:9.1f}{1000 * fl:10.0f}{fl / st:12.2f}")
    fastest = min(best, key=lambda s: best[s][0])
    slowest = max(best, key=lambda s: best[s][0])
    print(f"ratio: {best[slowest][0] / best[fastest][0]:.2f} (slowest / fastest setting)")


if __name__ == "__main__":
    main()
