"""Ground truth: do the SAE architectures recover known directions? All of them train side by side, from one
activation stream, at the same L0.

Data (seeded; bench/train_throughput.py's sparse-dictionary model, scaled down): `n_true` random unit directions in R^d;
per token n_active ~ Poisson(k) clipped to [1, 4k], drawn without replacement with firing probabilities
p_i ∝ (i + 10)^-0.8; coefficients Exp(1) + 0.25; plus a fixed offset μ (|μ| = 2) and N(0, σ²) noise. The
directions come from their own seed: drawn from the SAEs' seed, they would equal the first rows of the initial
decoder (both are randn(n, d)) and hand every SAE the answer; the `init` row checks that chance level is low.

Every SAE gets the same L0: TopK and BatchTopK keep k latents per token (on average over the batch for BatchTopK);
ReLU/L1 (standard), Gated and JumpReLU steer their sparsity coefficient to L0 = k during training (target_l0).
BatchTopK is shown as published and with `aux_rare`, where AuxK also trains the latents that fire far below the mean
rate. Every SAE uses the same learning rate and batch: the width rule's default (2e-4 / sqrt(d_sae / 2^14)) suits
runs of 100M+ tokens, far too slow for a few million.

Scores, on held-out tokens: recovery = mean over true directions of the max cosine with any decoder row, and
the fraction of true directions recovered with cosine > 0.9; also L0, FVU (1 - centered EV), dead fraction (no
firing on the held-out tokens) and the coefficient λ the L1/L0 recipes settled at.

    .venv/bin/python bench/ground_truth.py          # d 64, 256 directions, d_sae 512, k 8, 1.5M tokens (~2 min, 2 cores)
    python bench/ground_truth.py --large --device cuda  # the same at 8M tokens
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae.sae import SAE, SAETrainConfig  # noqa: E402
from nanosae.train import TrainConfig, train  # noqa: E402

# (label, recipe overrides): every recipe at its defaults except L0 and the shared LR
RECIPES = {
    "topk": ("TopK", {}),
    "batchtopk": ("BatchTopK", {}),
    "batchtopk_rare": ("BatchTopK+rare", {"arch": "batchtopk", "aux_rare": 0.1}),
    "standard": ("ReLU/L1", {}),
    "gated": ("Gated", {}),
    "jumprelu": ("JumpReLU", {}),
}


class Dictionary:
    """The generative model: true directions, firing probabilities, offset, noise."""

    def __init__(self, d: int, n_true: int, k: float, noise: float, seed: int, device: str = "cpu"):
        g = torch.Generator().manual_seed(seed)
        self.dirs = torch.nn.functional.normalize(torch.randn(n_true, d, generator=g), dim=-1).to(device)
        self.p = ((torch.arange(n_true) + 10.0) ** -0.8).to(device)
        self.mu = (torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0) * 2.0).to(device)
        self.k, self.noise, self.max_active, self.device = k, noise, min(n_true, int(4 * k)), device

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def sample(self, n: int, g: torch.Generator) -> torch.Tensor:
        dev = self.device
        active = torch.poisson(torch.full((n,), float(self.k), device=dev), generator=g).clamp(1, self.max_active)
        idx = torch.multinomial(self.p.expand(n, -1), self.max_active, generator=g)  # without replacement
        coef = torch.empty(n, self.max_active, device=dev).exponential_(1.0, generator=g) + 0.25
        coef *= torch.arange(self.max_active, device=dev) < active[:, None]
        x = torch.nn.functional.embedding_bag(idx, self.dirs, per_sample_weights=coef, mode="sum")
        return x + self.mu + self.noise * torch.randn(n, self.dirs.shape[1], generator=g, device=dev)


class Stream:
    """An endless activation stream for nanosae.train: batch i is drawn from its own seed, so the position is
    the whole state."""

    def __init__(self, dictionary: Dictionary, batch_size: int, seed: int, state: dict | None = None):
        self.dictionary, self.batch_size, self.seed = dictionary, batch_size, seed
        self.i = state["i"] if state else 0
        self.d_in = dictionary.dirs.shape[1]
        self.site, self.model_name, self.context_size, self.dataset = "", "synthetic", 0, "ground_truth"

    def state(self) -> dict:
        return {"i": self.i}

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        g = self.dictionary.generator(self.seed * 1_000_003 + self.i)
        self.i += 1
        return self.dictionary.sample(self.batch_size, g)


def recovery(W_dec: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Per true direction, the best cosine with any decoder row."""
    return (dirs @ torch.nn.functional.normalize(W_dec, dim=-1).T).max(dim=1).values


@torch.no_grad()
def score(sae: SAE, dirs: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    f = sae.encode(x)
    best = recovery(sae.W_dec, dirs)
    return {
        "l0": (f != 0).sum(-1).float().mean().item(),
        "fvu": ((x - sae.decode(f)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "dead": ((f > 0).sum(0) == 0).float().mean().item(),
        "mean_max_cos": best.mean().item(),
        "frac_recovered": (best > 0.9).float().mean().item(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n-true", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=8, help="mean true active directions, and every SAE's L0")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens (every SAE sees all of them)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=8e-3, help="one LR for every SAE")
    ap.add_argument("--large", action="store_true", help="the GPU setting: 8M tokens")
    ap.add_argument("--archs", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.large:
        args.tokens = 8_000_000
    if args.threads:
        torch.set_num_threads(args.threads)

    dictionary = Dictionary(args.d, args.n_true, args.k, args.noise, 1_000 + args.seed, args.device)
    x_eval = dictionary.sample(args.eval_tokens, dictionary.generator(args.seed + 999))
    true_l0 = torch.poisson(torch.full((100_000,), float(args.k))).clamp(1, dictionary.max_active).mean().item()
    names = args.archs.split(",")
    recipes = [
        SAETrainConfig(**{"arch": name, **RECIPES[name][1]}, d_sae=args.d_sae, target_l0=args.k, lr=args.lr, name=name)
        for name in names
    ]
    print(
        f"data: {args.n_true} true directions in R^{args.d}, mean {true_l0:.2f} active, noise σ {args.noise}; "
        f"{len(recipes)} SAEs of d_sae {args.d_sae} at L0 {args.k}, trained together on {args.tokens:,} tokens "
        f"(batch {args.batch_size}, lr {args.lr:g})"
    )
    torch.manual_seed(args.seed)  # what the trainer does: the initial decoder, for the chance-level row
    init = recovery(torch.randn(args.d_sae, args.d), dictionary.dirs.cpu())

    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            saes=recipes,
            tokens=args.tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            log_every=max(1, args.tokens // args.batch_size // 20),
            checkpoint_every=0,
            out=out,
            device=args.device,
        )
        stream = Stream(dictionary, args.batch_size, args.seed + 1)
        saes = train(cfg, lambda state: stream, progress=True)

    print(f"\nground-truth recovery at L0 {args.k} ({args.tokens:,} tokens, {time.time() - t0:.0f}s for all)")
    print(f"{'architecture':15s} {'λ':>7s} {'L0':>6s} {'FVU':>7s} {'dead %':>7s} {'mean max cos':>13s} {'> 0.9':>7s}")
    print(f"{'init (chance)':15s} {'':>7s} {'':>6s} {'':>7s} {'':>7s} {init.mean():13.4f} {100 * (init > 0.9).float().mean():6.1f}%")  # fmt: skip
    for name, sae in zip(names, saes):
        r = score(sae, dictionary.dirs, x_eval)
        coeff = sae.cfg.training.get("final_sparsity_coeff")
        lam = f"{coeff:7.3g}" if coeff and RECIPES[name][1].get("arch", name) not in ("topk", "batchtopk") else ""
        print(
            f"{RECIPES[name][0]:15s} {lam:>7s} {r['l0']:6.2f} {r['fvu']:7.4f} {100 * r['dead']:7.1f} "
            f"{r['mean_max_cos']:13.4f} {100 * r['frac_recovered']:6.1f}%"
        )


if __name__ == "__main__":
    main()
