"""Sparse codes for the TopK family: select on the dense pre-activations, then touch only the active latents.

A batch of codes is a list of entries (row = token, col = latent) grouped by row, with `offsets` (where each
token's entries start) for embedding_bag. The only dense work is the encoder matmul that picks the entries;
nothing multiplies a dense (batch x d_sae) latent matrix, forward or backward (G, V: sparse batch x d_sae):

  gather:  v_e = xc[row_e] . W_enc[:, col_e] + b_enc[col_e]                          (xc = x - b_dec)
           dW_enc = xc^T G,  db_enc = colsum(G),  db_dec = -W_enc db_enc               (G holds dL/dv_e)
  decode:  x_hat[n] = sum over n's entries of v_e W_dec[col_e]                          (embedding_bag)
           dv_e = <dx_hat[row_e], W_dec[col_e]>,  dW_dec = V^T dx_hat

Sparse-times-dense products use torch.sparse.mm on an uncoalesced COO matrix, the fastest of the options
measured on CPU (index_add 3.6x and dense 6.5x slower; peers.md 4.4).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Codes(NamedTuple):
    index: torch.Tensor  # (2, nnz): latent and token of each entry, tokens non-decreasing (COO index of S^T)
    offsets: torch.Tensor  # (n,) index of each token's first entry

    @property
    def cols(self) -> torch.Tensor:
        return self.index[0]

    @property
    def rows(self) -> torch.Tensor:
        return self.index[1]

    @property
    def n(self) -> int:
        return self.offsets.numel()

    def subset(self, keep: torch.Tensor) -> Codes:
        """The entries where `keep` (nnz,) is true; every token keeps its (possibly empty) place."""
        index = self.index[:, keep]
        counts = torch.bincount(index[1], minlength=self.n)
        return Codes(index, counts.cumsum(0) - counts)


def topk_codes(idx: torch.Tensor) -> Codes:
    """Codes of a (n, k) index tensor: k entries per token."""
    n, k = idx.shape
    rows = torch.arange(n, device=idx.device).repeat_interleave(k)
    return Codes(torch.stack([idx.reshape(-1), rows]), torch.arange(0, n * k, k, device=idx.device))


def flat_codes(flat: torch.Tensor, n: int, d_sae: int) -> tuple[Codes, torch.Tensor]:
    """Codes of flat indices into a (n, d_sae) matrix (any order), and the permutation that sorted them."""
    flat, order = flat.sort()
    rows = flat // d_sae
    counts = torch.bincount(rows, minlength=n)
    return Codes(torch.stack([flat % d_sae, rows]), counts.cumsum(0) - counts), order


@torch.no_grad()
def topk_select(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    aux_latents: torch.Tensor | None = None,
    k_aux: int = 0,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per token, the k largest pre-activations x @ W_enc + b_enc (values, latent ids) and, when `aux_latents`
    is given, the k_aux largest among those latents only (AuxK). The matmul runs in row blocks so that each
    (block x d_sae) slab is still in cache when topk reads it; the full dense matrix never exists."""
    n = x.shape[0]
    vals, idx = x.new_empty(n, k), torch.empty(n, k, dtype=torch.long, device=x.device)
    aux = aux_latents is not None and k_aux > 0
    aux_vals = x.new_empty(n, k_aux) if aux else None
    aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=x.device) if aux else None
    buf = x.new_empty(min(block, n), W_enc.shape[1])  # reused: a fresh slab per block would be page-faulted in
    for s in range(0, n, block):
        e = min(s + block, n)
        pre = torch.addmm(b_enc, x[s:e], W_enc, out=buf[: e - s])
        torch.topk(pre, k, dim=-1, sorted=False, out=(vals[s:e], idx[s:e]))
        if aux:
            v, i = pre.index_select(1, aux_latents).topk(k_aux, dim=-1, sorted=False)
            aux_vals[s:e], aux_idx[s:e] = v, aux_latents[i]
    return vals, idx, aux_vals, aux_idx


def _spmm(codes: Codes, values: torch.Tensor, d_sae: int, dense: torch.Tensor) -> torch.Tensor:
    """S^T @ dense for the sparse (n, d_sae) matrix S holding `values` at the code entries: (d_sae, d)."""
    S = torch.sparse_coo_tensor(codes.index, values, (d_sae, codes.n), check_invariants=False)
    return torch.sparse.mm(S, dense)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xc, b_dec, W_enc, b_enc, pre_vals, index, offsets):
        ctx.save_for_backward(xc, W_enc, index, offsets)
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, g):
        xc, W_enc, index, offsets = ctx.saved_tensors
        codes, d_sae = Codes(index, offsets), W_enc.shape[1]
        g = g.contiguous()
        db_dec = dW = db_enc = None
        if ctx.needs_input_grad[2]:
            dW = _spmm(codes, g, d_sae, xc).t()
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
            db_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, codes.cols, g)
        if ctx.needs_input_grad[1]:  # sum over tokens of d(x - b_dec) = W_enc @ db_enc: no (n, d_in) tensor needed
            db_dec = -(W_enc @ db_enc)
        return None, db_dec, dW, db_enc, None, None, None


def gather(
    xc: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    codes: Codes,
    pre_vals: torch.Tensor,
) -> torch.Tensor:
    """The pre-activations xc W_enc + b_enc at the code entries, where xc = x - b_dec is the centred input and the
    values were already computed as `pre_vals` (nnz,) by the selection. The result carries sparse gradients to
    W_enc, b_enc and b_dec (through xc; x is data and gets none)."""
    return _Gather.apply(xc, b_dec, W_enc, b_enc, pre_vals, codes.index, codes.offsets)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, W_dec, index, offsets):
        ctx.save_for_backward(vals, W_dec, index, offsets)
        return F.embedding_bag(index[0], W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, dout):
        vals, W_dec, index, offsets = ctx.saved_tensors
        dout = dout.contiguous()
        dvals = dW = None
        if ctx.needs_input_grad[0]:  # <dout[row_e], W_dec[col_e]> per entry, fused (offset2bag = rows)
            dvals = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                dout, W_dec, index[0], offsets, index[1], 0
            )
        if ctx.needs_input_grad[1]:
            dW = _spmm(Codes(index, offsets), vals, W_dec.shape[0], dout)
        return dvals, dW, None, None


def decode(codes: Codes, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """sum_e vals_e W_dec[col_e] per token: (n, d_in), no bias."""
    return _Decode.apply(vals, W_dec, codes.index, codes.offsets)
