"""Ground truth: do the SAE architectures recover known directions? Scored side by side at matched L0.

Data (seeded; the sparse-dictionary model of peers.md §4.1, scaled down): `n_true` random unit directions in
R^d; per token n_active ~ Poisson(k) clipped to [1, 4k], drawn without replacement with firing probabilities
p_i ∝ (i + 10)^-0.8; coefficients Exp(1) + 0.25; plus a fixed offset μ (|μ| = 2) and N(0, σ²) noise.
Every SAE is trained by nanosae.train on the same stream. TopK and BatchTopK use k; ReLU/L1 (standard), Gated
and JumpReLU have their sparsity coefficient searched so that their L0 lands near k: a log-spaced grid, then
up to `--refine` rounds of log-log interpolation between the coefficients that bracket k (or a step beyond the
range when none do), keeping the SAE whose L0 is closest to k.

Scores, on held-out tokens: recovery = mean over true directions of the max cosine with any decoder row, and
the fraction of true directions recovered with cosine > 0.9; also L0, FVU (1 - centered EV) and dead fraction.
Near L0 = k the L1-type recipes sit on a cliff (a few % more penalty collapses them), so read single rows of
those with care; the search lines printed per run show the whole curve.

    python bench/ground_truth.py --device cuda                 # d 64, 256 directions, d_sae 512, k 8, 4M tokens
    .venv/bin/python bench/ground_truth.py --tokens 300000 --grid 3   # a quick look on a CPU (undertrained)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae.sae import SAE, SAETrainConfig  # noqa: E402
from nanosae.train import TrainConfig, train  # noqa: E402

ARCHS = {"topk": "TopK", "batchtopk": "BatchTopK", "standard": "ReLU/L1", "gated": "Gated", "jumprelu": "JumpReLU"}
# starting sparsity-coefficient grids (inputs scaled to E|x| = sqrt(d)); the search goes beyond them if needed
GRIDS = {"standard": (0.1, 30.0), "gated": (0.1, 30.0), "jumprelu": (0.01, 3.0)}


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


@torch.no_grad()
def score(sae: SAE, dirs: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    f = sae.encode(x)
    x_hat = sae.decode(f)
    cos = dirs @ torch.nn.functional.normalize(sae.W_dec, dim=-1).T  # (n_true, d_sae)
    best = cos.max(dim=1).values
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return {
        "l0": (f != 0).sum(-1).float().mean().item(),
        "fvu": fvu.item(),
        "dead": ((f > 0).sum(0) == 0).float().mean().item(),
        "mean_max_cos": best.mean().item(),
        "frac_recovered": (best > 0.9).float().mean().item(),
    }


def run(recipes: list[SAETrainConfig], args, dictionary: Dictionary, x_eval: torch.Tensor) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            saes=recipes,
            tokens=args.tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            log_every=max(1, args.tokens // args.batch_size // 10),
            checkpoint_every=0,
            out=out,
            device=args.device,
        )
        saes = train(cfg, lambda state: Stream(dictionary, args.batch_size, args.seed + 1, state), progress=True)
    results = [{"recipe": r, **score(s, dictionary.dirs, x_eval)} for r, s in zip(recipes, saes)]
    for r in results:  # as they come, so a run cut short still shows what it found
        print(f"  {r['recipe'].name:28s} L0 {r['l0']:7.2f}  FVU {r['fvu']:.4f}  recovery {r['mean_max_cos']:.4f}")
    return results


def next_coeff(tried: list[dict], k: float, step: float) -> float:
    """The next coefficient to try: log-log interpolation between the two tried points that bracket L0 = k, or
    two grid steps (at most 10x) beyond the tried range (L0 falls as the coefficient grows)."""
    pts = sorted((r["recipe"].sparsity_coeff, max(r["l0"], 1e-3)) for r in tried)
    for (c0, l0), (c1, l1) in zip(pts, pts[1:]):
        if (l0 - k) * (l1 - k) <= 0 and l0 != l1:
            t = (math.log(k) - math.log(l0)) / (math.log(l1) - math.log(l0))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    jump = min(step**2, 10.0)
    return pts[-1][0] * jump if pts[-1][1] > k else pts[0][0] / jump


def off(r: dict, k: float) -> float:
    """How far an SAE's L0 is from k, as |log ratio|."""
    return abs(math.log(max(r["l0"], 1e-3) / k))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--n-true", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--k", type=int, default=8, help="mean true active directions, and the TopK k")
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=4_000_000, help="training tokens per SAE")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=16_384)
    ap.add_argument("--grid", type=int, default=7, help="coefficients per searched architecture")
    ap.add_argument("--refine", type=int, default=3, help="rounds of search after the grid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dictionary = Dictionary(args.d, args.n_true, args.k, args.noise, args.seed, args.device)
    x_eval = dictionary.sample(args.eval_tokens, dictionary.generator(args.seed + 999))
    true_l0 = torch.poisson(torch.full((100_000,), float(args.k))).clamp(1, dictionary.max_active).mean().item()
    print(
        f"data: {args.n_true} true directions in R^{args.d}, mean {true_l0:.2f} active, noise σ {args.noise}; "
        f"SAEs d_sae {args.d_sae}, {args.tokens:,} training tokens each"
    )
    t0 = time.time()

    def recipe(arch: str, coeff: float | None = None) -> SAETrainConfig:
        return SAETrainConfig(
            arch=arch, d_sae=args.d_sae, k=args.k, sparsity_coeff=coeff, name=f"{arch}_{coeff:.4g}" if coeff else arch
        )

    step = (GRIDS["standard"][1] / GRIDS["standard"][0]) ** (1 / max(1, args.grid - 1))
    grid = {a: [lo * step**i for i in range(args.grid)] for a, (lo, _) in GRIDS.items()}
    results = run(
        [recipe("topk"), recipe("batchtopk")] + [recipe(a, c) for a, cs in grid.items() for c in cs],
        args,
        dictionary,
        x_eval,
    )
    for _ in range(args.refine):  # refine the searched architectures whose L0 is not yet within 10% of k
        tried = {a: [r for r in results if r["recipe"].arch == a] for a in GRIDS}
        todo = [a for a in GRIDS if min(off(r, args.k) for r in tried[a]) > math.log(1.1)]
        if not todo:
            break
        results += run([recipe(a, next_coeff(tried[a], args.k, step)) for a in todo], args, dictionary, x_eval)
    best = {a: min((r for r in results if r["recipe"].arch == a), key=lambda r: off(r, args.k)) for a in ARCHS}

    print(f"\nground-truth recovery at matched L0 (target k = {args.k}), {time.time() - t0:.0f}s in all")
    print(
        f"{'architecture':12s} {'coeff':>8s} {'L0':>7s} {'FVU':>7s} {'dead %':>7s} {'mean max cos':>13s} {'> 0.9':>7s}"
    )
    for arch, label in ARCHS.items():
        r = best[arch]
        c = r["recipe"].sparsity_coeff
        coeff = f"{c:8.4g}" if arch in GRIDS else f"{'k=' + str(args.k):>8s}"
        print(
            f"{label:12s} {coeff} {r['l0']:7.2f} {r['fvu']:7.4f} {100 * r['dead']:7.1f} "
            f"{r['mean_max_cos']:13.4f} {100 * r['frac_recovered']:6.1f}%"
        )


if __name__ == "__main__":
    main()
