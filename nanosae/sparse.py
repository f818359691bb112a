"""Sparse codes: select on the dense pre-activations, then touch only the active latents. The TopK family always
trains this way; ReLU, Gated and JumpReLU SAEs do once their latents are sparse (threshold_select).

A batch of codes is a list of entries (latent, token), grouped by token (`offsets`: where each token's entries
start, for the decode's embedding_bag) and also listed in latent order (`perm`, `latent_offsets`, for the weight
gradients). The only dense work is the encoder matmul that picks the entries; nothing multiplies a dense
(batch x d_sae) latent matrix, forward or backward (G, V: sparse batch x d_sae):

  gather:  v_e = (x[tok_e] - b_dec) . W_enc[:, lat_e] + b_enc[lat_e]
           dW_enc = (x - b_dec)^T G = x^T G - b_dec (x) colsum(G),  db_enc = colsum(G),  db_dec = -W_enc db_enc
  decode:  x_hat[n] = sum over n's entries of v_e W_dec[lat_e]                          (embedding_bag)
           dv_e = <dx_hat[tok_e], W_dec[lat_e]>,  dW_dec = V^T dx_hat

A weight gradient S^T D (S sparse, D dense) is, row by row, a sum of D's token rows over each latent's entries:
an embedding_bag over the entries in latent order (3-4x faster on CPU than torch.sparse.mm on COO). It is a
RowGrad: autograd gets it materialised whole in W_enc.grad / W_dec.grad as usual, unless the caller passes a
RowGrads collector to `gather` and `decode`; then the backward appends it there unevaluated (the .grad stays None)
and the optimizer builds it a block of latents at a time, never holding a dense gradient (nanosae.train.adam_rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Codes(NamedTuple):
    cols: torch.Tensor  # (nnz,) int32: the latent of each entry
    rows: torch.Tensor  # (nnz,) int32: the token of each entry, non-decreasing
    offsets: torch.Tensor  # (n,) index of each token's first entry
    perm: torch.Tensor  # (nnz,) the entries in latent order
    latent_offsets: torch.Tensor  # (d_sae + 1,) where each latent's entries start in that order, then nnz
    latent_tokens: torch.Tensor  # (nnz,) the entries' tokens in that order
    d_sae: int

    def subset(self, keep: torch.Tensor) -> Codes:
        """The entries where `keep` (nnz,) is true; every token keeps its (possibly empty) place."""
        return _codes(self.cols[keep], self.rows[keep], self.offsets.numel(), self.d_sae)


def _codes(cols: torch.Tensor, rows: torch.Tensor, n: int, d_sae: int) -> Codes:
    """Codes of entries already grouped by token (rows non-decreasing), as int32 (half the memory of int64)."""
    cols, rows = cols.int(), rows.int()
    counts = torch.bincount(rows, minlength=n).int()
    latent_offsets = F.pad(torch.bincount(cols, minlength=d_sae).cumsum(0, dtype=torch.int32), (1, 0))
    perm = torch.argsort(cols, stable=True).int()
    offsets = counts.cumsum(0, dtype=torch.int32) - counts
    return Codes(cols, rows, offsets, perm, latent_offsets, rows[perm], d_sae)


def topk_codes(idx: torch.Tensor, d_sae: int) -> Codes:
    """Codes of a (n, k) index tensor: k entries per token."""
    n, k = idx.shape
    rows = torch.arange(n, dtype=torch.int32, device=idx.device).repeat_interleave(k)
    return _codes(idx.reshape(-1), rows, n, d_sae)


def flat_codes(flat: torch.Tensor, n: int, d_sae: int) -> tuple[Codes, torch.Tensor]:
    """Codes of flat indices into a (n, d_sae) matrix (any order), and the permutation that sorted them."""
    flat, order = flat.sort()
    return _codes(flat % d_sae, flat // d_sae, n, d_sae), order


def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k largest values and their columns (unsorted). Split the columns into chunks; the k chunks with
    the largest maxima hold them all (a chunk holding one of them has a maximum at least the k-th largest value,
    and at most k chunks do), so topk runs on those k x chunk candidates instead of the whole row. Chunk c is the
    strided set of columns c, c + C, c + 2C, ... so that its maximum is an elementwise max over contiguous rows.
    1.3-2.5x faster than torch.topk on CPU; the chunk sizes are those measured fastest (d_sae 2k-32k, k 16-128)."""
    n, m = pre.shape
    chunk = 4 if m < 32 * k else 8 if m < 256 * k else 16
    if m % chunk or k * chunk * 2 > m:
        return pre.topk(k, dim=-1, sorted=False)
    C = m // chunk
    best = pre.view(n, chunk, C).amax(1).topk(k, dim=-1, sorted=False).indices  # (n, k) chunk ids
    cols = (best[:, :, None] + C * torch.arange(chunk, device=pre.device)).view(n, k * chunk)
    vals, j = pre.gather(1, cols).topk(k, dim=-1, sorted=False)
    return vals, cols.gather(1, j)


def _slabs(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, block: int):
    """(start, end, pre) for each block of rows, pre = x[start:end] @ W_enc + b_enc: blocks small enough that each
    (block x d_sae) slab is still in cache when the selection reads it. One buffer serves every block (a fresh slab
    per block would be page-faulted in), so a slab lives until the next one is made."""
    n = x.shape[0]
    buf = x.new_empty(min(block, n), W_enc.shape[1])
    for s in range(0, n, block):
        e = min(s + block, n)
        yield s, e, torch.addmm(b_enc, x[s:e], W_enc, out=buf[: e - s])


@torch.no_grad()
def topk_select(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_latents: torch.Tensor | None = None,
    k_aux: int = 0,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per token, the k largest pre-activations x @ W_enc + b_enc (values, latent ids) and, when `aux_latents`
    is given, the k_aux largest among those latents only (AuxK). The matmul runs in row blocks (_slabs); the full
    dense matrix never exists."""
    n = x.shape[0]
    vals, idx = x.new_empty(n, k), torch.empty(n, k, dtype=torch.long, device=x.device)
    aux = aux_latents is not None and k_aux > 0
    aux_vals = x.new_empty(n, k_aux) if aux else None
    aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=x.device) if aux else None
    for s, e, pre in _slabs(x, W_enc, b_enc, block):
        vals[s:e], idx[s:e] = _topk(pre, k)
        if aux:
            v, i = pre.index_select(1, aux_latents).topk(k_aux, dim=-1, sorted=False)
            aux_vals[s:e], aux_idx[s:e] = v, aux_latents[i]
    return vals, idx, aux_vals, aux_idx


def nth_largest(vals: torch.Tensor, n: int, world_gather: Callable | None = None) -> torch.Tensor:
    """The n-th largest of a 1-D tensor (-inf when it holds fewer); with world_gather (which concatenates every rank's
    tensor), of all ranks' tensors together: each rank's n largest, padded to n, hold the union's n largest."""
    top = vals.topk(min(n, vals.numel()), sorted=False).values
    if world_gather is not None:
        top = world_gather(F.pad(top, (0, n - top.numel()), value=-math.inf))
    if top.numel() < n:
        return vals.new_tensor(-math.inf)
    return top.topk(n, sorted=False).values.min() if world_gather is not None else top.min()


@torch.no_grad()
def batch_topk_select(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    n: int,
    m: int,
    aux_latents: torch.Tensor | None = None,
    k_aux: int = 0,
    world_gather: Callable | None = None,
    hint: float | None = None,
    block: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """BatchTopK's selection: of the pre-activations P = x @ W_enc + b_enc (rows x d_sae), exactly the entries that
    P.flatten().topk(n) picks and that are positive; under DDP (world_gather given), those of this rank's top n that
    are also among the n largest of the global batch. Returns their flat indices into P (unsorted) and values, the
    AuxK part as topk_select, and the cut-off (the n-th largest entry when positive; the caller's next hint).

    Without the flattened topk, whose one row of rows x d_sae runs on one thread. P is made a block of rows at a
    time (_slabs); T is the n-th largest entry (of the global batch), S a set of candidate entries:
    1. while a block is in cache, S gets each row's m largest; low_r, the m-th of row r, bounds the rest of the row.
       A row with low_r >= hint (a guess at T > 0, e.g. the last step's) gives every entry >= hint instead
       ("expanded"). c = the n-th largest of S <= T (S is part of the batch).
    2. a row with low_r >= c and low_r > 0 may still hold entries >= c outside S, unless it was expanded with
       hint <= c. Recompute those rows and put all their entries >= c and > 0 in S. Now S holds every entry >= c
       that is > 0: an entry left out of row r is <= low_r, below c or <= 0, or, in a row expanded with hint <= c,
       below the hint.
    3. if T > 0, every entry >= T is in S and the n-th largest of S is T; if T <= 0, the n-th largest of S is <= 0
       and S holds every positive entry. Either way, the entries of S that are >= the n-th largest of S and > 0 are
       the selection, when there are at most n of them: more means ties at T > 0, where topk's own choice decides,
       so then (rarely) the flattened topk itself runs. (In one process without step 2's recomputation, the n-th
       largest of S is c already.)"""
    rows, d_sae = x.shape[0], W_enc.shape[1]
    m = min(m, d_sae)
    hint = hint if hint is not None and hint > 0 and m < d_sae else math.inf
    vals, idx = x.new_empty(rows, m), torch.empty(rows, m, dtype=torch.long, device=x.device)
    aux = aux_latents is not None and k_aux > 0
    aux_vals = x.new_empty(rows, k_aux) if aux else None
    aux_idx = torch.empty(rows, k_aux, dtype=torch.long, device=x.device) if aux else None
    extra_vals, extra_flat = [], []
    for s, e, pre in _slabs(x, W_enc, b_enc, block):
        vals[s:e], idx[s:e] = _topk(pre, m)
        if aux:
            v, i = pre.index_select(1, aux_latents).topk(k_aux, dim=-1, sorted=False)
            aux_vals[s:e], aux_idx[s:e] = v, aux_latents[i]
        if hint < math.inf:
            big = (vals[s:e].amin(1) >= hint).nonzero().squeeze(1)
            if big.numel():
                r, j = (pre[big] >= hint).nonzero(as_tuple=True)
                extra_vals.append(pre[big[r], j])
                extra_flat.append((s + big[r]) * d_sae + j)
    low = vals.amin(1)
    expanded = low >= hint
    flat = idx + d_sae * torch.arange(rows, device=x.device)[:, None]
    cands, flat = torch.cat([vals[~expanded].view(-1), *extra_vals]), torch.cat([flat[~expanded].view(-1), *extra_flat])
    c = nth_largest(cands, n, world_gather)
    redo = (low >= c) & (low > 0) & ~(expanded & (hint <= c)) if m < d_sae else torch.zeros_like(expanded)
    if redo.any():
        redo_rows = redo.nonzero().squeeze(1)
        pre = torch.addmm(b_enc, x[redo_rows], W_enc)
        r, j = ((pre >= c) & (pre > 0)).nonzero(as_tuple=True)
        drop = redo.index_select(0, torch.div(flat, d_sae, rounding_mode="floor"))
        cands = torch.cat([cands[~drop], pre[r, j]])
        flat = torch.cat([flat[~drop], redo_rows[r] * d_sae + j])
        c = nth_largest(cands, n, world_gather)
    elif world_gather is not None:  # the ranks' collectives must match: every rank takes this second look
        c = nth_largest(cands, n, world_gather)
    keep = (cands >= c) & (cands > 0)
    if int(keep.sum()) > n:  # ties at T > 0: topk decides which of them are kept
        top = torch.addmm(b_enc, x, W_enc).view(-1).topk(min(n, rows * d_sae), sorted=False)
        keep = (top.values > 0) & (top.values >= c)
        return top.indices[keep], top.values[keep], aux_vals, aux_idx, c
    return flat[keep], cands[keep], aux_vals, aux_idx, c


@torch.no_grad()
def threshold_select(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, cut: torch.Tensor | float, max_entries: int,
    block: int = 256,
) -> tuple[Codes, torch.Tensor] | None:  # fmt: skip
    """The entries of P = x @ W_enc + b_enc (rows x d_sae) above `cut` (a number, or one per latent): their codes and
    values. None as soon as they number more than max_entries, the caller's cue to take its dense path instead (the
    blocks made until then, at most max_entries entries' worth, are the work lost). Blocks of rows as topk_select."""
    rows, cols, vals, count = [], [], [], 0
    for s, _, pre in _slabs(x, W_enc, b_enc, block):
        r, c = (pre > cut).nonzero(as_tuple=True)  # row-major: the entries come grouped by token
        count += r.numel()
        if count > max_entries:
            return None
        rows.append(r + s)
        cols.append(c)
        vals.append(pre[r, c])
    return _codes(torch.cat(cols), torch.cat(rows), x.shape[0], W_enc.shape[1]), torch.cat(vals)


class RowGrad(NamedTuple):
    """A (d_sae, d) weight gradient kept unevaluated: row j = sum over latent j's entries e of weights_e
    dense[token_e], minus scale[j] * shift when a scale is given (the input shift x - b_dec of the encoder)."""

    codes: Codes
    weights: torch.Tensor  # (nnz,) in latent order (codes.perm)
    dense: torch.Tensor  # (n, d)
    scale: torch.Tensor | None = None  # (d_sae,)
    shift: torch.Tensor | None = None  # (d,)

    def rows(self, lo: int, hi: int, start: int, end: int) -> torch.Tensor:
        """Rows lo..hi; start, end = latent_offsets[lo], latent_offsets[hi] (host integers, read once by the caller)."""
        offsets, tokens = self.codes.latent_offsets[lo:hi] - start, self.codes.latent_tokens[start:end]
        out = F.embedding_bag(tokens, self.dense, offsets, mode="sum", per_sample_weights=self.weights[start:end])
        if self.scale is not None:
            out.addr_(self.scale[lo:hi], self.shift, alpha=-1)
        return out

    def full(self) -> torch.Tensor:
        return self.rows(0, self.codes.d_sae, 0, self.codes.perm.numel())


@dataclass
class RowGrads:
    """A step's collector of weight gradients: the backward of `gather` and `decode` appends each term of W_enc's and
    W_dec's gradients here, unevaluated and one row per latent (W_enc's transposed), instead of writing W_enc.grad
    and W_dec.grad. nanosae.train hands it to adam_rows (the update on one CPU process); a loss that took its dense
    path leaves it empty and writes .grad as usual."""

    W_enc: list[RowGrad] = field(default_factory=list)
    W_dec: list[RowGrad] = field(default_factory=list)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, pre_vals, codes, row_grads):
        ctx.save_for_backward(x, b_dec, W_enc)
        ctx.codes, ctx.row_grads = codes, row_grads
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, g):
        x, b_dec, W_enc = ctx.saved_tensors
        codes = ctx.codes
        g = g.contiguous()
        db_enc = torch.zeros(codes.d_sae, dtype=g.dtype, device=g.device).index_add_(0, codes.cols, g)
        dW = None
        if ctx.needs_input_grad[2]:  # (x - b_dec)^T G without an (n, d_in) copy of x - b_dec
            grad = RowGrad(codes, g[codes.perm], x, db_enc, b_dec.detach().clone())
            if ctx.row_grads is None:
                dW = grad.full().t()
            else:
                ctx.row_grads.W_enc.append(grad)
        db_dec = -(W_enc.detach() @ db_enc) if ctx.needs_input_grad[1] else None
        return None, db_dec, dW, db_enc if ctx.needs_input_grad[3] else None, None, None, None


def gather(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    codes: Codes,
    pre_vals: torch.Tensor,
    row_grads: RowGrads | None = None,
) -> torch.Tensor:
    """The pre-activations (x - b_dec) W_enc + b_enc at the code entries, already computed as `pre_vals` (nnz,) by
    the selection. The result carries sparse gradients to W_enc, b_enc and b_dec (x is data and gets none); W_enc's
    goes to row_grads.W_enc instead of W_enc.grad when a collector is given."""
    return _Gather.apply(x, b_dec, W_enc, b_enc, pre_vals, codes, row_grads)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, W_dec, codes, row_grads):
        ctx.save_for_backward(vals, W_dec)
        ctx.codes, ctx.row_grads = codes, row_grads
        return F.embedding_bag(codes.cols, W_dec, codes.offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, dout):
        vals, W_dec = ctx.saved_tensors
        codes = ctx.codes
        dout = dout.contiguous()
        dvals = dW = None
        if ctx.needs_input_grad[0]:  # <dout[tok_e], W_dec[lat_e]> per entry, fused (offset2bag = tokens)
            dvals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                dout, W_dec, codes.cols, codes.offsets, codes.rows, 0
            )
        if ctx.needs_input_grad[1]:
            grad = RowGrad(codes, vals.detach()[codes.perm], dout)
            if ctx.row_grads is None:
                dW = grad.full()
            else:
                ctx.row_grads.W_dec.append(grad)
        return dvals, dW, None, None


def decode(codes: Codes, vals: torch.Tensor, W_dec: torch.Tensor, row_grads: RowGrads | None = None) -> torch.Tensor:
    """sum_e vals_e W_dec[lat_e] per token: (n, d_in), no bias. W_dec's gradient goes to row_grads.W_dec instead of
    W_dec.grad when a collector is given."""
    return _Decode.apply(vals, W_dec, codes, row_grads)


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, vals, W, codes):
        ctx.save_for_backward(W)
        ctx.codes = codes
        return out.clone()  # (a view could not be changed in place afterwards)

    @staticmethod
    def backward(ctx, dout):
        (W,) = ctx.saved_tensors
        codes, dout = ctx.codes, dout.contiguous()
        dvals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            dout, W, codes.cols, codes.offsets, codes.rows, 0
        )
        return dout, dvals, None, None


def probe(out: torch.Tensor, codes: Codes, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """`out` (a copy), with entries of value 0 that decode(codes, vals, W) would add to it: they add nothing, so
    nothing is computed forward, but their values get the gradient <dout[tok_e], W[lat_e]> that the decode would
    give them (W gets none: it would be 0). For entries whose value is 0 and whose gradient is not (JumpReLU's
    straight-through band below the threshold): half the decode's work per entry."""
    return _Probe.apply(out, vals, W, codes)


class _SquaredError(torch.autograd.Function):
    """sum |e|^2 of an error tensor nobody else reads afterwards: the backward turns e into its gradient in place,
    so the error and its gradient never both take (n, d) memory."""

    @staticmethod
    def forward(ctx, e):
        ctx.save_for_backward(e)
        flat = e.view(-1)
        return torch.dot(flat, flat)  # no squared copy

    @staticmethod
    def backward(ctx, g):
        (e,) = ctx.saved_tensors
        return e.detach().mul_(2 * g)  # detached: a gradient that carried e's graph would keep that graph alive


squared_error = _SquaredError.apply  # sum |e|^2 of e (overwritten by the backward)
