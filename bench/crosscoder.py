"""Crosscoders (nanosae diff): planted truth, training speed against a TopK SAE of the same width, paired collection.

1. Planted truth (nanosae.diff.PlantedPair, seeded): two "models" of width 48 built from 40 shared atoms (B's
   direction rotated a little from A's), 8 A-only, 8 B-only and 8 `scaled` atoms (shared, B carries them at 0.4 of
   A's strength), 4 atoms per token on average. A BatchTopK crosscoder (the default) and an L1 crosscoder (λ 5),
   d_sae 128, k 4, 300k tokens each. Each planted atom is matched to the latent whose decoder row [d^A ; d^B] has
   the largest cosine with [atom^A ; atom^B]; it counts as correct when that cosine is > 0.9 and the latent's group
   (A-only, shared, B-only by relative decoder norm) is the atom's. Latent Scaling on 12k held-out tokens: the
   share of correctly found exclusive latents it flags (should be ~0), whether it flags the L1 crosscoder's shrunk
   scaled atoms (Complete Shrinkage, made by training), and two artefacts planted by hand into the BatchTopK
   crosscoder (a shared latent's A decoder zeroed: Complete Shrinkage; a shared latent split into an A-only and a
   B-only latent with one encoder: Latent Decoupling).
2. Speed: the BatchTopK crosscoder and a TopK SAE of the same total width on the same concatenated input (d_in 384
   = 2 x the tiny model's 192, d_sae 3072, k 32, batch 4096), one step each per cycle on the same batches,
   alternating which goes first, after 2 warm-up cycles. The line `ratio: R` is crosscoder tokens/s over TopK's.
3. Paired collection: a PairedModelStream over the test checkpoint (tests/fixtures/nanochat-d4) and a copy of it
   against a ModelStream over one of them, same tokens: the paired stream should cost about 2x (both models run
   on every forward batch, one batch of each in memory at a time).

    .venv/bin/python bench/crosscoder.py            # ~2-4 min on 2 cores
    .venv/bin/python bench/crosscoder.py --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanosae import load_model  # noqa: E402
from nanosae.activations import model_stream, paired_model_stream  # noqa: E402
from nanosae.diff import (  # noqa: E402
    PlantedPair,
    artefacts,
    classify,
    latent_scaling,
    match_planted,
    planted_artefacts,
    train_planted,
)
from nanosae.sae import SAETrainConfig  # noqa: E402
from nanosae.train import TrainConfig, Trainer  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"
KINDS = {0: "A-only", 1: "shared", 2: "B-only", 3: "scaled"}


def planted(steps: int) -> None:
    p = PlantedPair(scaled=8, scale=0.4)
    truth = p.truth()
    held_out = [p.sample(4096, torch.Generator().manual_seed(7)) for _ in range(3)]
    print(f"planted truth: width {p.d}, atoms {dict(zip(KINDS.values(), np.bincount(truth)))}, {steps} steps of 1024")
    for arch, extra in (("crosscoder", {}), ("crosscoder_l1", {"sparsity_coeff": 5.0})):
        t0 = time.perf_counter()
        cc = train_planted(p, arch, steps, **extra)
        groups = classify(cc)
        latent, cos = match_planted(cc, p)
        want = np.where(truth == 3, 1, truth)  # scaled atoms are shared
        correct = (cos > 0.9) & (groups[latent] == want)
        scaling = latent_scaling(cc, held_out)
        flagged = artefacts(groups, scaling)
        per = "  ".join(
            f"{KINDS[k]} {correct[truth == k].mean():.0%} (matched {(cos[truth == k] > 0.9).mean():.0%})" for k in KINDS
        )
        core = correct[truth != 3].mean()
        print(f"  {arch:14s} correct: {per}; exclusive+shared {core:.1%}  ({time.perf_counter() - t0:.0f}s)")
        found = latent[correct & (truth != 1) & (truth != 3)]
        if len(found):
            share = flagged[found].mean()
            print(f"  {'':14s} Latent Scaling flags {share:.0%} of the {len(found)} correctly found exclusive latents")
        shrunk = latent[(truth == 3) & (cos > 0.9) & (groups[latent] != 1)]
        if len(shrunk):
            print(f"  {'':14s} scaled atoms that look exclusive by norm (Complete Shrinkage): {len(shrunk)}, flagged "
                  f"{flagged[shrunk].sum()}; their ν_ε {np.round(scaling['nu_eps'][shrunk], 2).tolist()}")  # fmt: skip
        if arch == "crosscoder":
            shared = latent[correct & (truth == 1)]
            bad = planted_artefacts(cc, int(shared[0]), int(shared[1]))
            bad_flags = artefacts(classify(bad), latent_scaling(bad, held_out))
            hits = [bool(bad_flags[i]) for i in (int(shared[0]), int(shared[1]), -1)]
            print(f"  {'':14s} planted artefacts flagged: shrinkage {hits[0]}, decoupling {hits[1]} and {hits[2]}")


def speed(cycles: int) -> None:
    d_in, d_sae, k, batch = 384, 3072, 32, 4096
    g = torch.Generator().manual_seed(0)
    p = PlantedPair(d=d_in // 2, shared=600, a_only=100, b_only=100, active=24)
    xs = [p.sample(batch, g) for _ in range(4)]
    trainers = {}
    for arch in ("crosscoder", "topk"):
        torch.manual_seed(0)
        cfg = TrainConfig(saes=[SAETrainConfig(arch=arch, d_sae=d_sae, k=k)], tokens=10**9, batch_size=batch)
        trainers[arch] = Trainer(cfg, d_in)
        trainers[arch].init(xs[0])
    times = {a: [] for a in trainers}
    for c in range(cycles + 2):
        order = list(trainers) if c % 2 == 0 else list(reversed(trainers))
        for arch in order:
            t0 = time.perf_counter()
            trainers[arch].step(xs[c % len(xs)])
            if c >= 2:
                times[arch].append(time.perf_counter() - t0)
    tok_s = {a: batch / statistics.median(t) for a, t in times.items()}
    print(f"speed: d_in {d_in}, d_sae {d_sae}, k {k}, batch {batch}, {cycles} cycles, median step: "
          + ", ".join(f"{a} {batch / v * 1e3:.0f} ms ({v:,.0f} tok/s)" for a, v in tok_s.items()))  # fmt: skip
    print(f"ratio: {tok_s['crosscoder'] / tok_s['topk']:.3f}")


def collection(batches: int) -> None:
    model, tok, _ = load_model(FIXTURE)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.01)
    site, bs = "blocks.2.resid_post", 1024
    times = {"single": [], "paired": []}
    for c in range(batches):
        streams = {
            "single": lambda: model_stream(model, tok, site, None, bs, buffer_tokens=4096),
            "paired": lambda: paired_model_stream(model, twin, tok, site, None, bs, buffer_tokens=4096),
        }
        for name in list(streams) if c % 2 == 0 else list(reversed(streams)):
            s = streams[name]()
            t0 = time.perf_counter()
            for _ in range(4):
                next(s)
            times[name].append(time.perf_counter() - t0)
    single, paired = (statistics.median(times[n]) for n in ("single", "paired"))
    print(f"paired collection: 4096 tokens in {paired:.2f}s vs {single:.2f}s for one model: x{paired / single:.2f} "
          f"(d_in {2 * model.config.n_embd} vs {model.config.n_embd})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    planted(150 if args.quick else 300)
    collection(3 if args.quick else 6)
    speed(4 if args.quick else 10)


if __name__ == "__main__":
    main()
