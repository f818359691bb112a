"""Planted truth for SAE chains: are latents born where their features appear?

A series of C synthetic "checkpoints" whose activations are sparse sums of unit atoms (3 per token, coefficients
Exp(1) + 0.5, plus small noise). Most atoms are there from checkpoint 0; planted groups switch on at later
checkpoints (by default 5 atoms at checkpoint 2 and 5 at checkpoint 4). nanosae.evolve.train_chain trains a TopK
SAE on checkpoint 0 and fine-tunes it along the series (SAE-Track, Xu et al. 2024); chain_report reads each
latent's birth from the chain (alive on held-out tokens of that checkpoint and stable from there on). For every
atom, its latent is the final SAE's decoder row with the highest cosine; the atom counts as found when that cosine
is above 0.9, and as born right when the latent's birth is its switch-on checkpoint ±1.

    .venv/bin/python bench/chain_truth.py             # d 32, 40 atoms, d_sae 48, 6 checkpoints (~1 min on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae.evolve import chain_report, train_chain  # noqa: E402
from nanosae.sae import SAETrainConfig, load_sae  # noqa: E402
from nanosae.train import TrainConfig  # noqa: E402


class Planted:
    """Atoms (n, d) and the checkpoint each switches on at; sample(c, n, g): n tokens of checkpoint c."""

    def __init__(self, d: int, n_atoms: int, births: dict[int, int], seed: int = 0, per_token: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=-1)
        self.birth = torch.zeros(n_atoms, dtype=torch.long)
        start = n_atoms - sum(births.values())
        for c, count in sorted(births.items()):
            self.birth[start : start + count] = c
            start += count
        self.per_token = per_token

    def sample(self, c: int, n: int, g: torch.Generator) -> torch.Tensor:
        on = (self.birth <= c).float()
        idx = torch.multinomial(on.expand(n, -1), self.per_token, generator=g)
        coef = torch.empty(n, self.per_token).exponential_(1.0, generator=g) + 0.5
        x = torch.nn.functional.embedding_bag(idx, self.atoms, per_sample_weights=coef, mode="sum")
        return x + 0.02 * torch.randn(x.shape, generator=g)


class Stream:
    """nanosae.train's activation stream over one checkpoint of a Planted series (batch i from its own seed)."""

    def __init__(self, planted: Planted, c: int, batch_size: int, state: dict | None = None):
        self.planted, self.c, self.batch_size = planted, c, batch_size
        self.i = state["i"] if state else 0
        self.d_in = planted.atoms.shape[1]
        self.site, self.model_name, self.context_size, self.dataset = "", "planted", 0, f"checkpoint {c}"

    def state(self) -> dict:
        return {"i": self.i}

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.i += 1
        return self.planted.sample(self.c, self.batch_size, torch.Generator().manual_seed(self.c * 1_000_003 + self.i))


def run_chain(planted: Planted, C: int, out: Path, d_sae: int, k: int, first: int, link: int, batch: int = 512):
    """Train the chain over C checkpoints; returns (chain_report dict, the final SAE, densities (d_sae, C))."""
    recipe = SAETrainConfig(arch="topk", d_sae=d_sae, k=k, lr=3e-3)
    configs = [
        TrainConfig(saes=[recipe], tokens=first if c == 0 else link, batch_size=batch, out=str(out / f"c{c}"))
        for c in range(C)
    ]
    fns = [lambda state, c=c: Stream(planted, c, batch, state) for c in range(C)]
    saes = [load_sae(f) for f in train_chain(configs, fns, progress=False)]
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        density = torch.stack(
            [(s.encode(planted.sample(c, 8192, g)) > 0).float().mean(0) for c, s in enumerate(saes)], 1
        )
    return chain_report([s.W_dec for s in saes], density), saes[-1], density


def score(planted: Planted, report: dict, final) -> dict:
    """Per atom: found (best final decoder cosine > 0.9) and born right (its latent's birth within ±1)."""
    cos = planted.atoms @ torch.nn.functional.normalize(final.W_dec.detach(), dim=-1).T
    best, latent = cos.max(1)
    born = torch.tensor(report["born"])[latent]
    found = best > 0.9
    right = found & ((born - planted.birth).abs() <= 1)
    late = planted.birth > 0
    return {
        "found": found.float().mean().item(),
        "late_found": found[late].float().mean().item(),
        "late_born_right": right[late].float().mean().item(),
        "early_born_right": right[~late].float().mean().item(),
        "late": [(int(planted.birth[j]), int(born[j]), round(best[j].item(), 3)) for j in late.nonzero().flatten()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--atoms", type=int, default=40)
    ap.add_argument("--d-sae", type=int, default=48)
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument("--first-tokens", type=int, default=600_000)
    ap.add_argument("--link-tokens", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    planted = Planted(a.d, a.atoms, {2: 5, 4: 5}, a.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        report, final, _ = run_chain(planted, a.checkpoints, Path(tmp), a.d_sae, 3, a.first_tokens, a.link_tokens)
    s = score(planted, report, final)
    print(f"chain of {a.checkpoints} SAEs (d_sae {a.d_sae}) over {a.atoms} atoms in R^{a.d}: {time.time() - t0:.0f}s")
    print(f"atoms found (cos > 0.9): {s['found']:.0%}   planted late atoms found: {s['late_found']:.0%}")
    print(f"born at their checkpoint ±1: late atoms {s['late_born_right']:.0%}, atoms of checkpoint 0 "
          f"{s['early_born_right']:.0%}")  # fmt: skip
    print("late atoms (switched on at, born at, cos):", s["late"])


if __name__ == "__main__":
    main()
