"""SAE training throughput: nanosae's trainer against a plain dense PyTorch loop of the same architecture, in one
process, and the encoder-matmul floor.

Setup: seeded synthetic activations from a sparse dictionary (4096 unit directions in R^512; per
token Poisson(20) of them, clipped to [1, 64], drawn from p_i ∝ (i + 10)^-0.8, coefficients Exp(1) + 0.25; an
offset of norm 2; N(0, 0.05^2) noise); d_sae 8192, k 32, batch 4096 tokens, Adam lr 2e-4 constant, fp32.
--arch picks the architectures (comma-separated): topk, batchtopk, matryoshka (BatchTopK with prefixes 512 and
2048; matryoshka_topk: TopK with them), jumprelu, gated, standard, each with its defaults. The dense loop of each is
its loss's dense definition (the TopK family's reference_loss: dense (batch x d_sae) latents times the decoder; the
others' dense_loss), autograd, torch's Adam, the decoder's gradient projected and its rows renormalised.
--start picks where jumprelu, gated and standard start (comma-separated, a row each): `init`, the fresh SAE, whose
latents are dense (about half fire: nanosae takes its dense path), or `sparse`, the same SAE with one encoder bias
-q for every latent (gated: the gate's bias; JumpReLU: threshold q, bias 0), q the value that K of a token's d_sae
pre-activations exceed on average on the first batch: the sparsity that training brings them to. JumpReLU's sparse
path also reads the entries in the straight-through band below the threshold (the `codes` column). --sweep times
nanosae's sparse path against its dense one from sparse starts of L0 16 to 1024 (the density cut-off's measure).
Every implementation trains on the same batches in the same order, one step each per cycle (alternating the
order) so that the drift of a shared machine hits all alike; the first 2 cycles are warm-up. Each cycle also times
the encoder matmul alone, which is the floor: with TopK it is the only dense work. FVU and L0 are measured on 16k
held-out tokens after the same steps (the training SAEs' own encode, a 4096-token batch at a time). With topk among
the architectures, peak memory, in a fresh process per implementation over 4 steps: the growth of the RSS (with a
fixed malloc mmap threshold, so freed tensors leave it) and the peak of the live tensors created by the steps,
against the budget weights + Adam state + 2 batches. The last line is `ratio: R` (nanosae tokens/s / dense-loop
tokens/s) of the first row.

    python bench/train_throughput.py                        # TopK, 32 steps (~3 min on 2 cores)
    python bench/train_throughput.py --quick                # 8 steps, ~1 min
    python bench/train_throughput.py --quick --arch topk,batchtopk,matryoshka,jumprelu,gated,standard
    python bench/train_throughput.py --arch topk,jumprelu,gated,standard --start init,sparse
    python bench/train_throughput.py --arch standard,gated,jumprelu --sweep --steps 4   # where the sparse path pays
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

from nanosae import sae as sae_module
from nanosae.sae import GatedSAE, JumpReLUSAE, SAETrainConfig, TopKSAE, TrainingSAE, training_sae
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


ARCHS = {
    "topk": {"arch": "topk"},
    "batchtopk": {"arch": "batchtopk"},
    "matryoshka": {"arch": "batchtopk", "matryoshka": (512, 2048)},
    "matryoshka_topk": {"arch": "topk", "matryoshka": (512, 2048)},
    "jumprelu": {"arch": "jumprelu"},
    "gated": {"arch": "gated"},
    "standard": {"arch": "standard"},
}


def recipe(arch: str) -> SAETrainConfig:
    return SAETrainConfig(d_sae=D_SAE, k=K, lr=LR, **ARCHS[arch])


@torch.no_grad()
def sparse_start(sae: TrainingSAE, x: torch.Tensor, l0: int = K) -> None:
    """The `sparse` start: one encoder bias (or JumpReLU threshold) q for every latent, so that l0 latents per token
    of x fire on average."""
    z = ((x * sae.input_scale - sae.b_dec) @ sae.W_enc).view(-1)
    q = z.kthvalue(z.numel() - l0 * len(x)).values
    if isinstance(sae, JumpReLUSAE):
        sae.b_enc.zero_()
        sae.threshold.fill_(q)
    else:
        (sae.b_gate if isinstance(sae, GatedSAE) else sae.b_enc).fill_(-q)


@torch.no_grad()
def codes_per_token(sae: TrainingSAE, x: torch.Tensor) -> float:
    """The entries per token the sparse path of jumprelu, gated or standard reads on x (those its loss selects)."""
    xs = x * sae.input_scale
    if isinstance(sae, JumpReLUSAE):
        return (sae.pre_acts(xs) > sae.band_floor()).sum().item() / len(x)
    if isinstance(sae, GatedSAE):
        return (sae._paths(xs)[0] > 0).sum().item() / len(x)
    return (sae.pre_acts(xs) > 0).sum().item() / len(x)


class DenseLoop:
    """The plain reference: the architecture's loss written densely (the TopK family's TopKSAE.reference_loss, the
    others' dense_loss), autograd, torch's Adam, the decoder's gradient projected and its rows renormalised,
    JumpReLU's threshold kept >= 0."""

    def __init__(self, arch: str, first: torch.Tensor, start: str = "init"):
        torch.manual_seed(0)
        self.sae = training_sae(recipe(arch), D_IN)
        self.sae.init_from_sample(first)
        self.sae.normalize_decoder()
        if start == "sparse":
            sparse_start(self.sae, first)
        c = self.sae.cfg
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=LR, betas=(c.beta1, 0.999))
        self.dead = torch.zeros(D_SAE, dtype=torch.bool)  # none die in these few steps (nanosae's dead_tokens: 10M)

    def step(self, x):
        sae = self.sae
        if isinstance(sae, TopKSAE):
            loss = sae.reference_loss(x, self.dead)
        else:
            loss = sae.dense_loss(x, self.dead, 1.0).loss
        loss.backward()
        sae.project_grads()
        if sae.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), sae.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sae.normalize_decoder()
        if isinstance(sae, JumpReLUSAE):
            with torch.no_grad():
                sae.threshold.clamp_(min=0.0)


def nanosae_trainer(steps: int, arch: str = "topk") -> Trainer:
    cfg = TrainConfig(
        saes=[recipe(arch)],
        tokens=steps * BATCH,
        batch_size=BATCH,
        lr_warmup_steps=0,
        lr_decay_frac=0.0,
        dead_tokens=10**7,
    )
    return Trainer(cfg, D_IN)


@torch.no_grad()
def fvu_l0(sae: TrainingSAE, x: torch.Tensor) -> tuple[float, float]:
    """FVU and L0 of a training SAE on x, through its own encode (BatchTopK: over each 4096-token batch)."""
    xs = x * sae.input_scale
    sse, l0 = 0.0, 0.0
    for chunk in xs.split(BATCH):
        f = sae.encode(chunk)
        sse += (f @ sae.W_dec + sae.b_dec - chunk).pow(2).sum().item()
        l0 += (f != 0).sum().item()
    return sse / (xs - xs.mean(0)).pow(2).sum().item(), l0 / len(x)


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
        ref = DenseLoop("topk", xs[0])
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


def density_sweep(archs: list[str], steps: int) -> None:
    """For each architecture of the L1/L0 kind, from sparse starts of several L0s: nanosae's step on its sparse path
    against its dense path (the definition, taken above the cut-off), alternating, on the same batches. Where the
    ratio falls to 1 is the density the cut-off (nanosae.sae.SPARSE_MAX_DENSITY) must stay below."""
    data = Synthetic()
    batches = [data.sample(BATCH, 1000 + i) for i in range(steps + 1)]
    for arch in (a for a in archs if ARCHS[a]["arch"] in ("jumprelu", "gated", "standard")):
        for l0 in (16, 64, 256, 512, 1024):
            runs = {}
            for path, density in (("sparse", 1.0), ("dense", 0.0)):
                trainer = nanosae_trainer(steps + 1, arch)
                trainer.init(batches[0])
                sparse_start(trainer.learners[0].sae, batches[0], l0)
                runs[path] = (trainer, density, [])
            for i, x in enumerate(batches):
                for trainer, density, times in runs.values() if i % 2 else reversed(runs.values()):
                    sae_module.SPARSE_MAX_DENSITY = density
                    t = time.perf_counter()
                    trainer.step(x)
                    times.append(time.perf_counter() - t)
            codes = codes_per_token(runs["sparse"][0].learners[0].sae, batches[0])
            sparse, dense = (statistics.median(times[1:]) for _, _, times in runs.values())
            print(f"{arch:9s} L0 {l0:5d}: {codes:5.0f} codes/token, density {codes / D_SAE:.3f}; step sparse "
                  f"{sparse:.2f} s, dense {dense:.2f} s: dense / sparse {dense / sparse:.2f}")  # fmt: skip


def print_table(rows, impls, times, cpu, floor, held_out) -> None:
    """One line per row (arch, start): tokens/s of both, their ratios, share of the floor, against nanosae TopK, the
    entries per token nanosae's sparse path reads, held-out FVU and L0 of both."""
    print(f"{'arch':11s} {'start':6s} {'nanosae tok/s':>13s} {'dense tok/s':>11s} {'ratio':>6s} {'per-cycle':>9s} "
          f"{'cpu':>5s} {'% floor':>7s} {'x topk':>6s} {'cpu':>5s} {'codes':>6s}  {'FVU nanosae / dense':>19s}  "
          f"{'L0 nanosae / dense':>18s}")  # fmt: skip
    tok = {key: BATCH * len(t) / sum(t) for key, t in times.items()}
    topk = ("topk", "init", "nanosae")
    for arch, start in rows:
        ours, dense = (arch, start, "nanosae"), (arch, start, "dense")
        per_cycle = statistics.median(d / o for o, d in zip(times[ours], times[dense]))
        cpu_ratio = sum(cpu[dense]) / sum(cpu[ours])
        vs_topk = "".join(
            f" {statistics.median(t / o for o, t in zip(ts[ours], ts[topk])):5.2f}" if topk in ts else f" {'':5s}"
            for ts in (times, cpu)
        )  # fmt: skip
        sae = impls[ours][1]
        codes = K if isinstance(sae, TopKSAE) else codes_per_token(sae, held_out[:BATCH])
        (f_ours, l_ours), (f_dense, l_dense) = fvu_l0(sae, held_out), fvu_l0(impls[dense][1], held_out)
        print(f"{arch:11s} {start:6s} {tok[ours]:13,.0f} {tok[dense]:11,.0f} {tok[ours] / tok[dense]:6.2f} "
              f"{per_cycle:9.2f} {cpu_ratio:5.2f} {100 * tok[ours] / floor:6.0f}% {vs_topk} {codes:6.0f}  "
              f"{f_ours:9.4f} / {f_dense:.4f}  {l_ours:8.1f} / {l_dense:.1f}")  # fmt: skip
    print("(ratio: nanosae tok/s / dense tok/s; per-cycle: median of dense / nanosae step time; cpu: the same ratio "
          "in process CPU time; x topk: median per cycle of nanosae TopK step time / this step time, wall and CPU; "
          "codes: entries per token nanosae's sparse path reads, at the end, k for the TopK family)")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="topk", help=f"comma-separated, of {', '.join(ARCHS)}")
    ap.add_argument("--start", default="init", help="jumprelu, gated, standard: init, sparse or both (a row each)")
    ap.add_argument("--steps", type=int, default=32, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--quick", action="store_true", help="8 timed steps and a 4k-token eval (~1 minute per arch)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--sweep", action="store_true", help="jumprelu, gated, standard: sparse vs dense path by density")
    ap.add_argument("--memory-probe", choices=["nanosae", "reference"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.steps)
    archs, starts = args.arch.split(","), args.start.split(",")
    if unknown := [a for a in archs if a not in ARCHS]:
        ap.error(f"unknown --arch {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    if args.sweep:
        return density_sweep(archs, 8 if args.quick else args.steps)
    if unknown := [s for s in starts if s not in ("init", "sparse")]:
        ap.error(f"unknown --start {', '.join(unknown)}; choose from init, sparse")
    steps, warm = (8 if args.quick else args.steps), 2
    n_eval = 4096 if args.quick else 16384
    print(f"SAE training, d_in {D_IN}, d_sae {D_SAE}, k {K}, batch {BATCH}, Adam lr {LR}, fp32, {args.threads} "
          f"threads, {steps} timed steps after {warm} warm-up; {', '.join(archs)}; start {', '.join(starts)}")  # fmt: skip

    data = Synthetic()
    batches = [data.sample(BATCH, 1000 + i) for i in range(warm + steps)]
    held_out = data.sample(n_eval, 7)
    rows = [(a, s) for a in archs for s in (["init"] if ARCHS[a]["arch"] in ("topk", "batchtopk") else starts)]
    impls = {}  # (arch, start, "nanosae" | "dense") -> (step function, training SAE)
    for arch, start in rows:
        trainer, ref = nanosae_trainer(warm + steps, arch), DenseLoop(arch, batches[0], start)
        trainer.init(batches[0])
        if start == "sparse":
            sparse_start(trainer.learners[0].sae, batches[0])
        impls[arch, start, "nanosae"] = (trainer.step, trainer.learners[0].sae)
        impls[arch, start, "dense"] = (ref.step, ref.sae)
    times = {key: [] for key in impls}
    cpu = {key: [] for key in impls}  # process CPU time: less swayed than wall time by other jobs on a shared machine
    gflops = []
    for i, x in enumerate(batches):
        order = list(impls) if i % 2 == 0 else list(impls)[::-1]
        for key in order:
            t, c = time.perf_counter(), time.process_time()
            impls[key][0](x)
            if i >= warm:
                times[key].append(time.perf_counter() - t)
                cpu[key].append(time.process_time() - c)
        W = impls[(*rows[0], "dense")][1].W_enc.detach()
        gflops.append(encoder_gflops(x, W.t(), torch.zeros(D_SAE)))

    rate = statistics.median(gflops)
    floor = rate * 1e9 / (2 * D_IN * D_SAE)
    print(f"floor: {floor:,.0f} tok/s (encoder matmul {2 * BATCH * D_IN * D_SAE / 1e9:.1f} GFLOP/step at {rate:.0f} "
          "GFLOP/s, median over cycles)")  # fmt: skip
    print_table(rows, impls, times, cpu, floor, held_out)

    if "topk" in archs:
        weights = (2 * D_SAE * D_IN + D_SAE + D_IN) * 4 / 2**20
        batch_mb = BATCH * D_IN * 4 / 2**20
        mem = {impl: measure_memory(impl, 4) for impl in ("nanosae", "reference")}
        if all(v is not None for v in mem.values()):
            (ours, ours_live), (theirs, theirs_live) = mem["nanosae"], mem["reference"]
            print(f"memory (topk): peak over 4 steps (MiB): RSS growth nanosae {ours:.0f}, dense {theirs:.0f}; live "
                  f"tensors nanosae {ours_live:.0f}, dense {theirs_live:.0f}. Budget: weights {weights:.0f} + Adam "
                  f"{2 * weights:.0f} + 2 batches {2 * batch_mb:.0f} = {3 * weights + 2 * batch_mb:.0f}; nanosae's "
                  f"transients = {(ours_live - 3 * weights) / batch_mb:.1f} batches live, "
                  f"{(ours - 3 * weights) / batch_mb:.1f} in RSS")  # fmt: skip
    first = (*rows[0], "nanosae"), (*rows[0], "dense")
    print(f"ratio: {sum(times[first[1]]) / sum(times[first[0]]):.2f}")


if __name__ == "__main__":
    main()
