"""The TopK-family sparse path: selection, decode and every gradient against the dense computation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from batchtopk_cases import CASES, D_SAE, HINTS, ROWS, K, case, flattened_topk
from torch.utils._python_dispatch import TorchDispatchMode

from nanosae import sparse
from nanosae.sae import SAETrainConfig, training_sae


def _params(d=12, n_lat=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(d, n_lat), mk(n_lat), mk(d), mk(n_lat, d)


def test_topk_select_matches_torch_topk_in_every_block():
    # dyadic values: every product and sum is exact in float32, so the row blocks' matmuls equal the full one
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randint(-64, 65, s, generator=g) / 8 for s in [(50, 8), (8, 40), (40,)])
    dead = torch.tensor([3, 7, 11, 20, 39])
    vals, idx, aux_vals, aux_idx = sparse.topk_select(x, W, b, 5, dead, 3, block=16)
    pre = x @ W + b
    ref = pre.topk(5, dim=-1)
    assert torch.equal(vals.sort(-1).values, ref.values.sort(-1).values)
    assert torch.equal(pre.gather(1, idx), vals)
    aux_ref = pre[:, dead].topk(3, dim=-1)
    assert torch.allclose(aux_vals.sort(-1).values, aux_ref.values.sort(-1).values)
    assert torch.isin(aux_idx, dead).all() and torch.equal(pre.gather(1, aux_idx), aux_vals)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("hint", HINTS)
@pytest.mark.parametrize("m", [K, 2 * K, D_SAE])
def test_batch_topk_select_is_the_flattened_topk(name, hint, m):
    """Exactly the entries P.flatten().topk(B*k) keeps (positive ones), whatever the hint (none, below, at or above
    the cut-off T; it only changes which rows are expanded or recomputed) and the number of candidates per row."""
    x, W, b = case(name)
    n = K * ROWS
    top, keep = flattened_topk(x, W, b, n)
    T = top.values.min().item()
    dead = torch.arange(0, D_SAE, 7)
    flat, vals, aux_vals, aux_idx, cutoff = sparse.batch_topk_select(
        x, W, b, n, m, dead, 3, hint=None if hint is None else hint * T, block=16
    )
    assert torch.equal(flat.sort().values, top.indices[keep].sort().values)
    assert torch.equal(torch.addmm(b, x, W).view(-1)[flat], vals)
    assert cutoff.item() == T or (T <= 0 and cutoff.item() <= 0)
    ref_aux, _, _, _ = sparse.topk_select(x, W[:, dead], b[dead], 3)  # AuxK as the TopK path picks it
    assert torch.equal(aux_vals.sort(-1).values, ref_aux.sort(-1).values) and torch.isin(aux_idx, dead).all()
    if name == "tied":  # more than n entries tie at or above T > 0: topk's own choice among them is what counts
        assert T > 0 and (torch.addmm(b, x, W) >= T).sum() > n
    if name == "negative":
        assert flat.numel() == 0


def test_batch_topk_select_under_ddp_is_the_global_rule(tmp_path):
    """Two gloo ranks under torchrun, each with half of every batch: each keeps the entries of its own top B*k that
    are positive and among the global batch's B*k largest (as the flattened-topk rule did under DDP)."""
    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(here)}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(here / "ddp_batchtopk.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    kept = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for name in CASES:
        x, W, b = case(name)
        n = K * ROWS
        tops = [flattened_topk(share, W, b, n) for share in x.chunk(2)]
        T = torch.cat([top.values for top, _ in tops]).topk(n).values.min()
        for rank, (top, keep) in enumerate(tops):
            want = top.indices[keep & (top.values >= T)].sort().values
            for h in HINTS:
                assert torch.equal(kept[rank][f"{name}/{h}"], want), (name, h, rank)


@pytest.mark.parametrize("m, k", [(512, 6), (3072, 32), (8192, 32), (2048, 128)])  # chunks of 8, 8, 16, 4
def test_chunked_topk_is_exact_even_with_ties(m, k):
    """Wide rows take the chunk-maxima shortcut; ties (a value repeated across chunks) must not lose an entry."""
    g = torch.Generator().manual_seed(0)
    pre = (torch.randn(64, m, generator=g) * 4).round() / 4  # coarse values: many ties
    pre[:, 100:140] = 3.0  # a run of equal maxima spanning several chunks
    vals, idx = sparse._topk(pre, k)
    ref = pre.topk(k, dim=-1).values
    assert torch.equal(vals.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(pre.gather(1, idx), vals) and (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct


def test_topk_encode_decode_and_gradients_match_dense():
    W_enc, b_enc, b_dec, W_dec = _params()
    x, k = torch.randn(40, 12, dtype=torch.float64), 7
    dout = torch.randn(40, 12, dtype=torch.float64)

    with torch.no_grad():
        pre_vals, idx, _, _ = sparse.topk_select(x - b_dec, W_enc, b_enc, k, block=16)
    codes = sparse.topk_codes(idx, 96)
    vals = F.relu(sparse.gather(x, b_dec, W_enc, b_enc, codes, pre_vals.reshape(-1)))
    out = sparse.decode(codes, vals, W_dec) + b_dec
    grads = torch.autograd.grad(out, [W_enc, b_enc, b_dec, W_dec], dout)

    pre = (x - b_dec) @ W_enc + b_enc
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))  # the dense (batch x d_sae) codes
    ref = z @ W_dec + b_dec
    ref_grads = torch.autograd.grad(ref, [W_enc, b_enc, b_dec, W_dec], dout)
    assert torch.allclose(out, ref, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10), (g - r).abs().max()

    # with a collector the weight gradients arrive there, unevaluated, and autograd leaves .grad empty
    row_grads = sparse.RowGrads()
    vals = F.relu(sparse.gather(x, b_dec, W_enc, b_enc, codes, pre_vals.reshape(-1), row_grads))
    (sparse.decode(codes, vals, W_dec, row_grads) + b_dec).backward(dout)
    assert W_enc.grad is None and W_dec.grad is None and len(row_grads.W_enc) == len(row_grads.W_dec) == 1
    assert torch.allclose(row_grads.W_enc[0].full().t(), ref_grads[0], atol=1e-10)
    assert torch.allclose(row_grads.W_dec[0].full(), ref_grads[3], atol=1e-10)
    assert torch.allclose(b_enc.grad, ref_grads[1], atol=1e-10) and torch.allclose(b_dec.grad, ref_grads[2], atol=1e-10)


def test_variable_bags_match_dense():
    """BatchTopK-style codes: any number of entries per token, some none."""
    W_enc, b_enc, b_dec, W_dec = _params(seed=1)
    x = torch.randn(30, 12, dtype=torch.float64)
    dout = torch.randn(30, 12, dtype=torch.float64)
    pre = (x - b_dec) @ W_enc + b_enc
    flat = pre.detach().flatten().topk(30 * 4).indices  # 4 per token on average, unevenly
    codes, order = sparse.flat_codes(flat, 30, 96)
    assert (torch.bincount(codes.rows, minlength=30) == 0).any()  # some tokens have no entry at all
    pre_vals = pre.detach().flatten()[flat][order]
    out = sparse.decode(codes, sparse.gather(x, b_dec, W_enc, b_enc, codes, pre_vals), W_dec)
    grads = torch.autograd.grad(out, [W_enc, b_enc, b_dec, W_dec], dout)

    mask = torch.zeros(30 * 96, dtype=torch.float64).index_fill_(0, flat, 1).view(30, 96)
    ref = (pre * mask) @ W_dec
    ref_grads = torch.autograd.grad(ref, [W_enc, b_enc, b_dec, W_dec], dout)
    assert torch.allclose(out, ref, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-10)


def test_threshold_select_is_the_dense_mask_or_nothing_over_the_budget():
    """Every entry above its latent's cut, in every row block, with its value; None past max_entries."""
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randint(-64, 65, s, generator=g) / 8 for s in [(50, 8), (8, 40), (40,)])  # exact in float32
    cut = torch.randint(0, 40, (40,), generator=g) / 4
    pre = x @ W + b
    mask = pre > cut
    assert 0 < mask.sum() < mask.numel() / 2
    codes, vals = sparse.threshold_select(x, W, b, cut, int(mask.sum()), block=16)
    got = torch.zeros_like(mask).index_put_((codes.rows.long(), codes.cols.long()), torch.tensor(True))
    assert torch.equal(got, mask) and torch.equal(vals, pre[codes.rows.long(), codes.cols.long()])
    assert (codes.rows.diff() >= 0).all() and codes.offsets.tolist() == (mask.sum(1).cumsum(0) - mask.sum(1)).tolist()
    assert sparse.threshold_select(x, W, b, cut, int(mask.sum()) - 1, block=16) is None


def test_probe_gives_zero_valued_entries_the_gradient_a_decode_would():
    W_enc, b_enc, b_dec, W_dec = _params(seed=2)
    out = torch.randn(30, 12, dtype=torch.float64, requires_grad=True)
    codes = sparse.topk_codes(torch.randint(0, 96, (30, 5), generator=torch.Generator().manual_seed(3)), 96)
    vals = torch.zeros(150, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(30, 12, dtype=torch.float64)
    got = sparse.probe(out, codes, vals, W_dec.detach())
    assert torch.equal(got, out)
    ref = out + sparse.decode(codes, vals, W_dec.detach())
    for g, r in zip(torch.autograd.grad(got, [out, vals], dout), torch.autograd.grad(ref, [out, vals], dout)):
        assert torch.allclose(g, r, atol=1e-12) and r.abs().max() > 0


def test_codes_subset_keeps_token_positions():
    codes = sparse.topk_codes(torch.tensor([[0, 5], [2, 7], [1, 6]]), 8)
    sub = codes.subset(codes.cols < 5)
    assert sub.cols.tolist() == [0, 2, 1] and sub.rows.tolist() == [0, 1, 2] and sub.offsets.tolist() == [0, 1, 2]
    empty_first = codes.subset(codes.cols >= 6)
    assert empty_first.offsets.tolist() == [0, 0, 1] and empty_first.rows.tolist() == [1, 2]


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self.largest = max(self.largest, t.numel())
        return out


def test_topk_training_step_never_builds_a_dense_latent_matrix():
    """Forward and backward of the TopK loss (with AuxK active): no tensor reaches batch x d_sae elements; the
    biggest is one block of the encoder matmul. The same check on the dense reference does see it."""
    n, d_in, d_sae = 2048, 16, 512
    torch.manual_seed(0)
    sae = training_sae(SAETrainConfig(arch="topk", d_sae=d_sae, k=8, k_aux=8), d_in)
    x = torch.randn(n, d_in)
    sae.init_from_sample(x)
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[::3] = True
    with _LargestOutput() as probe:
        out = sae.loss(x, dead, 1.0)
        out.loss.backward()
    assert out.aux > 0
    assert probe.largest <= 1024 * d_sae < n * d_sae  # one 1024-row block of pre-activations
    with _LargestOutput() as dense:
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(8, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        ((z @ sae.W_dec + sae.b_dec - x) ** 2).sum().backward()
    assert dense.largest >= n * d_sae
