"""A transcoder's training step against an SAE's of the same width, in one process.

Setup: d_in = d_out 512, d_sae 8192, k 32, batch 4096, fp32, one thread per op as the trainer runs by default.
Inputs x are seeded Gaussian activations with a few heavy directions; the target is a fixed random two-layer ReLU
map of x (an MLP stand-in), so a transcoder has something to learn. For each activation (topk, batchtopk) three
Trainers step on the same batches in turn, one step each per cycle (alternating the order, so a shared machine's
drift hits all alike; the first 2 cycles are warm-up): the SAE on x, the transcoder x -> y and the skip-transcoder.
The extra work of a transcoder is slicing its [input | target] rows and, for the skip, one dense (batch x 512 x 512)
matmul forward and two backward, against the SAE's (batch x 512 x 8192) encoder. Prints the median step times and
the ratios; the goal is a transcoder step <= 1.1x the SAE step.

    python bench/transcoder_step.py            # 24 cycles (~2 min on 2 cores)
    python bench/transcoder_step.py --quick    # 8 cycles
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nanosae.sae import SAETrainConfig
from nanosae.train import TrainConfig, Trainer

D, D_SAE, K, BATCH = 512, 8192, 32, 4096


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g) * torch.linspace(0.2, 3.0, D)
    gm = torch.Generator().manual_seed(123)  # the same map for every batch
    w1, w2 = torch.randn(D, 2 * D, generator=gm) / D**0.5, torch.randn(2 * D, D, generator=gm) / (2 * D) ** 0.5
    return x, torch.relu(x @ w1) @ w2


def trainer(arch: str, kind: str, steps: int) -> Trainer:
    cfg = TrainConfig(saes=[SAETrainConfig(arch=arch, kind=kind, d_sae=D_SAE, k=K)], tokens=steps * BATCH,
                      batch_size=BATCH, lr_warmup_steps=0)  # fmt: skip
    return Trainer(cfg, D, d_out=D if kind != "sae" else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="8 cycles instead of 24")
    p.add_argument("--arch", default="topk,batchtopk", help="activations to compare (comma-separated)")
    args = p.parse_args()
    cycles, warm = (8 if args.quick else 24), 2
    print(f"d_in = d_out {D}, d_sae {D_SAE}, k {K}, batch {BATCH}, fp32, {torch.get_num_threads()} threads")
    ratios = []
    for arch in args.arch.split(","):
        kinds = ("sae", "transcoder", "skip_transcoder")
        trainers = {kind: trainer(arch, kind, cycles + 1) for kind in kinds}
        x, y = data(BATCH, 0)
        for kind, t in trainers.items():
            t.init(x if kind == "sae" else torch.cat([x, y], dim=1))
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for c in range(cycles):
            x, y = data(BATCH, c + 1)
            xy = torch.cat([x, y], dim=1)
            for kind in kinds if c % 2 == 0 else kinds[::-1]:
                t0 = time.perf_counter()
                trainers[kind].step(x if kind == "sae" else xy)
                if c >= warm:
                    times[kind].append(time.perf_counter() - t0)
        med = {kind: statistics.median(v) for kind, v in times.items()}
        fvu = {kind: t.learners[0].flush()["fvu"] for kind, t in trainers.items()}
        for kind in kinds:
            ratio = med[kind] / med["sae"]
            print(f"{arch:10s} {kind:16s} {1e3 * med[kind]:8.1f} ms/step  {BATCH / med[kind]:9,.0f} tok/s  "
                  f"x{ratio:.3f} the SAE step  (FVU {fvu[kind]:.3f} after {cycles} steps)")  # fmt: skip
            if kind != "sae":
                ratios.append(ratio)
    print(f"worst transcoder step ratio: {max(ratios):.3f} (goal <= 1.1)")


if __name__ == "__main__":
    main()
