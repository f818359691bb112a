"""Batches for BatchTopK's selection, shared by test_sparse.py and ddp_batchtopk.py (run by torchrun). Dyadic
inputs: every matmul, whole or a block of rows at a time, is exact, so selections compare bit for bit with
today's rule, the flattened topk."""

import torch

CASES = ("random", "tied", "negative", "heavy", "one_row")
ROWS, D_IN, D_SAE, K = 96, 8, 160, 4
# hints as fractions of the true cut-off T: none, below, just below, at, above it, far above (nothing expanded)
HINTS = (None, 0.5, 0.99, 1.0, 1.5, 100.0)


def case(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (ROWS, D_IN), W (D_IN, D_SAE), b (D_SAE): pre-activations x @ W + b of the kind `name`."""
    g = torch.Generator().manual_seed(seed)

    def dyadic(*shape, top=64):
        return torch.randint(-top, top + 1, shape, generator=g) / 8

    x, W, b = dyadic(ROWS, D_IN), dyadic(D_IN, D_SAE), dyadic(D_SAE)
    if name == "tied":  # small integers: every value repeats, ties at the cut-off included
        x, W, b = (t.round().clamp(-2, 2) for t in (x, W, b))
    elif name == "negative":  # nothing is positive, so nothing is kept
        b = b - 1000
    elif name == "heavy":  # row norms over a range of 2^6: the large rows hold most of the batch's top entries
        x = x * 2.0 ** torch.randint(0, 7, (ROWS, 1), generator=g)
    elif name == "one_row":  # one row holds nearly all of them
        x[5] *= 64
    return x, W, b


def flattened_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's rule: P.flatten().topk(n), positive entries; the (unsorted) top n and the kept mask."""
    top = torch.addmm(b, x, W).view(-1).topk(min(n, x.shape[0] * W.shape[1]), sorted=False)
    return top, top.values > 0
