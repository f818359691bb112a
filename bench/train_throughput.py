"""TopK SAE training throughput: nanosae's trainer against a plain dense-decoder PyTorch TopK, in one process.

Setup: seeded synthetic activations from a sparse dictionary (4096 unit directions in R^512; per
token Poisson(20) of them, clipped to [1, 64], drawn from p_i ∝ (i + 10)^-0.8, coefficients Exp(1) + 0.25; an
offset of norm 2; N(0, 0.05^2) noise); d_sae 8192, k 32, batch 4096 tokens, Adam lr 2e-4 constant, fp32. Both
train on the same batches in the same order, one step each per cycle (alternating which goes first) so that the
drift of a shared machine hits both alike; the first 2 cycles are warm-up. Each cycle also times the encoder
matmul alone, which is the floor: with TopK it is the only dense work. FVU is measured on 16k held-out tokens
after the same steps. Peak memory, in a fresh process per implementation over 4 steps: the growth of the RSS (with a
fixed malloc mmap threshold, so freed tensors leave it) and the peak of the live tensors created by the steps,
against the budget weights + Adam state + 2 batches. The last line is `ratio: R` (nanosae tokens/s / reference
tokens/s).

    python bench/train_throughput.py            # 32 steps (~3 min on 2 cores)
    python bench/train_throughput.py --quick    # 8 steps, ~1 min
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nanosae.sae import SAETrainConfig, training_sae
from nanosae.train import TrainConfig, Trainer

D_IN, D_SAE, K, BATCH, LR = 512, 8192, 32, 4096, 2e-4


class Synthetic:
    """The sparse-dictionary data model; sample(n, seed) is a pure function of its arguments."""

    # seed 0 would draw the directions exactly as both SAEs draw their initial decoder (torch.manual_seed(0), randn),
    # handing them the answer
    def __init__(self, seed: int = 1, n_dirs: int = 4096):
        g = torch.Generator().manual_seed(seed)
        self.dirs = torch.randn(n_dirs, D_IN, generator=g)
        self.dirs /= self.dirs.norm(dim=1, keepdim=True)
        self.log_p = torch.log((torch.arange(n_dirs) + 10.0) ** -0.8)
        mu = torch.randn(D_IN, generator=g)
        self.mu = 2 * mu / mu.norm()

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        n_active = torch.poisson(torch.full((n,), 20.0), generator=g).clamp(1, 64).long()
        gumbel = -torch.empty(n, len(self.log_p)).exponential_(generator=g).log()
        idx = (self.log_p + gumbel).topk(64, dim=-1).indices  # 64 draws without replacement ∝ p, in draw order
        coef = torch.empty(n, 64).exponential_(generator=g) + 0.25
        coef *= torch.arange(64) < n_active[:, None]
        x = F.embedding_bag(idx, self.dirs, per_sample_weights=coef, mode="sum")
        return x + self.mu + 0.05 * torch.randn(n, D_IN, generator=g)


class DenseTopK:
    """The plain reference: the TopK loss as nanosae.sae defines it (TopKSAE.reference_loss: dense (batch x d_sae)
    latents times the decoder, autograd), torch's Adam, the decoder's gradient projected and its rows renormalised."""

    def __init__(self, first: torch.Tensor):
        torch.manual_seed(0)
        self.sae = training_sae(SAETrainConfig(arch="topk", d_sae=D_SAE, k=K, lr=LR), D_IN)
        self.sae.init_from_sample(first)
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR)
        self.dead = torch.zeros(D_SAE, dtype=torch.bool)  # none die in these few steps (nanosae's dead_tokens: 10M)

    def step(self, x):
        self.sae.reference_loss(x, self.dead).backward()
        self.sae.project_grads()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sae.normalize_decoder()

    @torch.no_grad()
    def reconstruct(self, x):
        f = self.sae.encode(x)
        return f @ self.sae.W_dec + self.sae.b_dec, f


def nanosae_trainer(steps: int) -> Trainer:
    sae = SAETrainConfig(arch="topk", d_sae=D_SAE, k=K, lr=LR)
    cfg = TrainConfig(
        saes=[sae], tokens=steps * BATCH, batch_size=BATCH, lr_warmup_steps=0, lr_decay_frac=0.0, dead_tokens=10**7
    )
    return Trainer(cfg, D_IN)


def fvu_l0(reconstruct, x: torch.Tensor) -> tuple[float, float]:
    sse, l0 = 0.0, 0.0
    for chunk in x.split(2048):
        x_hat, f = reconstruct(chunk)
        sse += (x_hat - chunk).pow(2).sum().item()
        l0 += (f > 0).sum().item()
    return sse / (x - x.mean(0)).pow(2).sum().item(), l0 / len(x)


def encoder_gflops(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> float:
    """The best of the two ways to do the encoder matmul's FLOPs: one call, or 1024-row blocks (cache-friendly)."""
    best = float("inf")
    t = time.perf_counter()
    torch.addmm(b, x, W.T)
    best = min(best, time.perf_counter() - t)
    t = time.perf_counter()
    for s in range(0, len(x), 1024):
        torch.addmm(b, x[s : s + 1024], W.T)
    best = min(best, time.perf_counter() - t)
    return 2 * x.shape[0] * D_IN * D_SAE / best / 1e9


def _rss_peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


class LiveTensors(TorchDispatchMode):
    """The peak bytes of tensor storages created under it and still alive (frees seen through weak references):
    what the implementation holds, apart from the allocator and Python around it."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        leaves = tree_leaves((args, kwargs))
        inputs = {
            t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage()  # views and in-place results share an input's storage: not new
                if st.nbytes() and st.data_ptr() not in self.live and st.data_ptr() not in inputs:
                    self.live[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
                    self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        return out


def memory_probe(impl: str, steps: int) -> None:
    """In a fresh process: peak RSS growth from just before the implementation is built to the end of `steps`, then
    the same steps again from scratch counting live tensors (MiB, both)."""
    data = Synthetic()
    xs = [data.sample(BATCH, 1000 + i) for i in range(steps)]
    # outside the count: MKL's buffers, and the modules torch.optim imports on first use
    torch.addmm(torch.zeros(D_SAE), xs[0], torch.randn(D_SAE, D_IN).T)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, or later allocations reuse it unseen
    with open("/proc/self/clear_refs", "w") as f:  # restart the high-water mark here
        f.write("5")
    base = _rss_peak_kb()
    run_steps(impl, xs)
    rss = (_rss_peak_kb() - base) / 1024
    with LiveTensors() as live:
        run_steps(impl, xs)
    print(rss, live.peak / 2**20)


def run_steps(impl: str, xs: list[torch.Tensor]) -> None:
    if impl == "nanosae":
        trainer = nanosae_trainer(len(xs))
        trainer.init(xs[0])
        for x in xs:
            trainer.step(x)
    else:
        ref = DenseTopK(xs[0])
        for x in xs:
            ref.step(x)


def measure_memory(impl: str, steps: int) -> tuple[float, float] | None:
    cmd = [
        sys.executable,
        __file__,
        "--memory-probe",
        impl,
        "--steps",
        str(steps),
        "--threads",
        str(torch.get_num_threads()),
    ]
    # a fixed mmap threshold: every large tensor gets its own mapping, returned when freed, so the RSS follows the live
    # tensors instead of what glibc's heap happens to keep (its dynamic threshold varies the number by ~40 MB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        rss, live = r.stdout.strip().splitlines()[-1].split()
        return float(rss), float(live)
    except (ValueError, IndexError):
        print(f"memory probe for {impl} failed: {r.stderr.strip()[-300:]}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=32, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--quick", action="store_true", help="8 timed steps and a 4k-token eval (~1 minute)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--memory-probe", choices=["nanosae", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.steps)
    steps, warm = (8 if args.quick else args.steps), 2
    n_eval = 4096 if args.quick else 16384
    print(f"TopK SAE d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, Adam lr {LR}, fp32, {args.threads} threads, "
          f"{steps} timed steps after {warm} warm-up")  # fmt: skip

    data = Synthetic()
    batches = [data.sample(BATCH, 1000 + i) for i in range(warm + steps)]
    held_out = data.sample(n_eval, 7)
    trainer, ref = nanosae_trainer(warm + steps), DenseTopK(batches[0])
    trainer.init(batches[0])
    times = {"nanosae": [], "reference": []}
    gflops = []
    for i, x in enumerate(batches):
        order = [("nanosae", trainer.step), ("reference", ref.step)]
        for name, step in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            step(x)
            if i >= warm:
                times[name].append(time.perf_counter() - t)
        gflops.append(encoder_gflops(x, ref.sae.W_enc.detach().t(), ref.sae.b_enc.detach()))

    sae = trainer.learners[0].sae.to_inference()
    with torch.no_grad():
        ours = fvu_l0(lambda c: (sae.decode(f := sae.encode(c)), f), held_out)
    theirs = fvu_l0(ref.reconstruct, held_out)
    tok = {name: BATCH * len(t) / sum(t) for name, t in times.items()}
    rate = statistics.median(gflops)
    floor = rate * 1e9 / (2 * D_IN * D_SAE)
    per_cycle = statistics.median(r / n for n, r in zip(times["nanosae"], times["reference"]))

    print(
        f"nanosae   : {tok['nanosae']:9,.0f} tok/s  ({statistics.median(times['nanosae']):.3f} s/step median)  "
        f"FVU {ours[0]:.4f}  L0 {ours[1]:.1f}"
    )
    print(
        f"reference : {tok['reference']:9,.0f} tok/s  ({statistics.median(times['reference']):.3f} s/step median)  "
        f"FVU {theirs[0]:.4f}  L0 {theirs[1]:.1f}"
    )
    print(
        f"floor     : {floor:9,.0f} tok/s  (encoder matmul {2 * BATCH * D_IN * D_SAE / 1e9:.1f} GFLOP/step at "
        f"{rate:.0f} GFLOP/s, median over cycles); nanosae runs at {100 * tok['nanosae'] / floor:.0f}% of it"
    )
    print(f"per-cycle ratio (median of reference / nanosae step time): {per_cycle:.2f}")

    weights = (2 * D_SAE * D_IN + D_SAE + D_IN) * 4 / 2**20
    batch_mb = BATCH * D_IN * 4 / 2**20
    mem = {impl: measure_memory(impl, 4) for impl in ("nanosae", "reference")}
    if all(v is not None for v in mem.values()):
        (ours, ours_live), (theirs, theirs_live) = mem["nanosae"], mem["reference"]
        print(f"memory    : peak over 4 steps (MiB): RSS growth nanosae {ours:.0f}, reference {theirs:.0f}; live "
              f"tensors nanosae {ours_live:.0f}, reference {theirs_live:.0f}. Budget: weights {weights:.0f} + Adam "
              f"{2 * weights:.0f} + 2 batches {2 * batch_mb:.0f} = {3 * weights + 2 * batch_mb:.0f}; nanosae's "
              f"transients = {(ours_live - 3 * weights) / batch_mb:.1f} batches live, "
              f"{(ours - 3 * weights) / batch_mb:.1f} in RSS")  # fmt: skip
    print(f"ratio: {tok['nanosae'] / tok['reference']:.2f}")


if __name__ == "__main__":
    main()
