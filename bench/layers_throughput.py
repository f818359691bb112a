"""Dictionaries at every layer from one stream of forwards, against what the shared forward saves: in one process,
cycle after cycle (so that the drift of a shared machine hits all alike), the time per batch of

  all    one stream of the model read at all L sites (one forward up to the last site per batch of rows) feeding a
         trainer of L dictionaries, one per site;
  fwd    a one-site stream at the last site alone: the forward to the last site (and the shuffle) per batch;
  dicts  L one-site trainers, each stepping on in-memory batches of its site: the L dictionary steps alone.

The target: all <= 1.15 x (fwd + dicts), i.e. the forward is paid once for all sites. The three take turns at
being first in a cycle (the first after another way's work pays for the caches it evicted). Both streams hold the same
number of rows (4 batches), so they forward alike per batch. Then, in a fresh process (with a fixed malloc mmap
threshold, so freed tensors leave the RSS), the peak memory of the all-site run as `nanosae train --layers all`
builds it (default shuffle buffer): the RSS growth from just before the stream and the trainer are built to the
end of the steps, plus the model, against nanosae.train.memory_estimate (model + L x (weights, gradients and Adam
state) + the shuffle buffer + a few batches), the number a run checks --max-memory against.

    python bench/layers_throughput.py                    # the test fixture nanochat-d4 (4 layers), k 32, x16
    python bench/layers_throughput.py --model DIR --device cuda --batch-size 4096 --expansion 16
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nanosae import load_model
from nanosae.activations import model_stream
from nanosae.hooks import expand_sites
from nanosae.sae import SAETrainConfig
from nanosae.train import TrainConfig, Trainer, memory_estimate

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nanochat-d4" / "base_dir"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _config(args, sites: list[str], steps: int) -> TrainConfig:
    sae = SAETrainConfig(arch="topk", k=args.k, expansion=args.expansion)
    site = {"sites": sites} if len(sites) > 1 else {"site": sites[0]}
    return TrainConfig(
        saes=[sae], tokens=steps * args.batch_size, batch_size=args.batch_size, device=args.device, **site
    )


def timing(args, model, tok, sites: list[str]) -> dict[str, float]:
    """Seconds per batch of each way (median over cycles of `fill` batches, after one warm-up cycle)."""
    fill = 4  # batches per buffer fill
    steps = (args.cycles + 1) * fill
    kw = dict(seq_len=args.seq_len, buffer_tokens=fill * args.batch_size + args.seq_len)
    every = model_stream(model, tok, sites, None, args.batch_size, **kw)
    last = model_stream(model, tok, sites[-1], None, args.batch_size, **kw)
    all_trainer = Trainer(_config(args, sites, steps), every.widths)
    first = {s: x.to(args.device) for s, x in next(every).items()}
    all_trainer.init(first)
    one = [Trainer(_config(args, [s], steps), every.widths[s]) for s in sites]
    for t, s in zip(one, sites):
        t.init(first[s])
    batch = first

    def run_all() -> None:
        nonlocal batch
        for _ in range(fill):
            batch = {s: x.to(args.device) for s, x in next(every).items()}
            all_trainer.step(batch)

    def run_fwd() -> None:
        for _ in range(fill):
            next(last).to(args.device)

    def run_dicts() -> None:
        for _ in range(fill):
            for t, s in zip(one, sites):
                t.step(batch[s])  # the latest batch again: the step's cost does not depend on the data

    ways = {"all": run_all, "fwd": run_fwd, "dicts": run_dicts}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for cycle in range(args.cycles + 1):
        order = list(ways)[cycle % 3 :] + list(ways)[: cycle % 3]  # each way takes each place in turn
        for k in order:
            _sync(args.device)
            t0 = time.perf_counter()
            ways[k]()
            _sync(args.device)
            if cycle:
                times[k].append((time.perf_counter() - t0) / fill)
    return {k: statistics.median(v) for k, v in times.items()}


def memory_probe(args) -> None:
    """In a fresh process: the all-site run's peak RSS growth (MiB) and, on CUDA, its peak allocated bytes."""
    model, tok, _ = load_model(args.model, device=args.device)
    sites = expand_sites("resid_post", model.config.n_layer, "all")
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # outside the count: torch.optim's first-use imports
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:  # restart the high-water mark here
        f.write("5")
    base = _rss_kb("VmHWM")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    stream = model_stream(model, tok, sites, None, args.batch_size, seq_len=args.seq_len)
    trainer = Trainer(_config(args, sites, args.memory_steps), stream.widths)
    trainer.init({s: x.to(args.device) for s, x in next(stream).items()})
    for _ in range(args.memory_steps):
        trainer.step({s: x.to(args.device) for s, x in next(stream).items()})
    rss = (_rss_kb("VmHWM") - base) / 1024
    cuda = (torch.cuda.max_memory_allocated() - cuda_base) / 2**20 if args.device.startswith("cuda") else 0.0
    print(rss, cuda, stream.buffer_bytes)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(FIXTURE), help="nanochat checkpoint (default: the test fixture, d4)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--cycles", type=int, default=3, help="timed cycles of 4 batches (after one warm-up cycle)")
    ap.add_argument("--memory-steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        return memory_probe(args)

    model, tok, _ = load_model(args.model, device=args.device)
    sites = expand_sites("resid_post", model.config.n_layer, "all")
    L = len(sites)
    print(
        f"{model.info.name} on {args.device}: {L} sites ({sites[0]} .. {sites[-1]}), topk k {args.k} x{args.expansion}"
    )
    print(f"batch {args.batch_size} tokens, context {args.seq_len}, {torch.get_num_threads()} threads")
    t = timing(args, model, tok, sites)
    bound = t["fwd"] + t["dicts"]
    print(f"all sites, one stream      {t['all'] * 1e3:8.1f} ms/batch")
    print(f"forward to the last site   {t['fwd'] * 1e3:8.1f} ms/batch")
    print(f"{L} dictionary steps alone  {t['dicts'] * 1e3:8.1f} ms/batch")
    print(f"L separate runs would pay  {(L * t['fwd'] + t['dicts']) * 1e3:8.1f} ms/batch (a forward per site)")

    cmd = [sys.executable, __file__, "--memory-probe", "--model", args.model, "--device", args.device]
    cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--k", str(args.k)]
    cmd += ["--expansion", str(args.expansion), "--memory-steps", str(args.memory_steps)]
    cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    try:
        rss, cuda, buffer_bytes = (float(v) for v in r.stdout.strip().splitlines()[-1].split())
    except (ValueError, IndexError):
        print(f"memory probe failed: {r.stderr.strip()[-500:]}")
        rss = None
    if rss is not None:
        widths = {s: model.config.n_embd for s in sites}
        est = memory_estimate(_config(args, sites, 1), widths, model, int(buffer_bytes))
        mib = {k: v / 2**20 for k, v in est.items()}
        dict_adam = mib["dictionaries"] * 3 / 4  # weights + Adam's two moments, without the gradients
        print(
            f"memory estimate {sum(mib.values()):.0f} MiB: model {mib['model']:.1f}, {L} x (weights + grads + Adam) "
            f"{mib['dictionaries']:.0f} (weights + Adam alone {dict_adam:.0f}), shuffle buffer {mib['buffer']:.0f}, "
            f"batches {mib['batches']:.0f}"
        )
        peak = (cuda if args.device.startswith("cuda") else rss) + mib["model"]
        what = "CUDA max allocated" if args.device.startswith("cuda") else "RSS growth"
        print(f"peak memory of the all-site run: {peak:.0f} MiB ({what} {peak - mib['model']:.0f} + model)")
        print(f"memory: peak / estimate = {peak / sum(mib.values()):.2f} (<= 1: within the bound)")
    print(f"ratio: {t['all'] / bound:.3f}  (all sites from one stream / (forward to the last site + {L} steps alone))")


if __name__ == "__main__":
    main()
