"""Run by torchrun (gloo, 2+ ranks) from test_sparse.py: each rank selects BatchTopK entries from its share of
every case's batch with the global batch's cut-off, and saves what it kept (flat indices into its share) to
OUT/rank<r>.pt."""

import sys

import torch
import torch.distributed as dist
from batchtopk_cases import CASES, HINTS, K, case

from nanosae import sparse


def gather(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    kept = {}
    for name in CASES:
        x, W, b = case(name)
        n = K * len(x)  # B*k of the global batch
        share = x.chunk(world)[rank]
        T = torch.addmm(b, x, W).view(-1).topk(n).values.min().item()
        for h in HINTS:
            flat, vals, *_ = sparse.batch_topk_select(share, W, b, n, 2 * K, world_gather=gather,
                                                      hint=None if h is None else h * T, block=16)  # fmt: skip
            kept[f"{name}/{h}"] = flat.sort().values
    torch.save(kept, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
