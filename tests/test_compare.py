"""nanosae compare: the matching is optimal and recovers a planted permutation; splitting and correlations."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from nanosae.compare import compare, decoder_cosines, match
from nanosae.errors import NanosaeError
from nanosae.sae import SAE, SAEConfig


def _sae(W_dec: torch.Tensor, site: str = "blocks.2.resid_post", k: int = 16) -> SAE:
    d_sae, d_in = W_dec.shape
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=min(k, d_sae), hook_name=site))
    with torch.no_grad():
        sae.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    return sae


def test_matching_maximises_the_summed_cosine():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        cos = torch.rand(6, 6, generator=g)
        rows, cols = match(cos)
        best = max(sum(cos[i, p[i]].item() for i in range(6)) for p in itertools.permutations(range(6)))
        assert cos[rows, cols].sum().item() == pytest.approx(best)
    # greedy would take (0, 0) = 0.9 and be left with 0.1; the optimum is 0.8 + 0.8
    rows, cols = match(torch.tensor([[0.9, 0.8], [0.8, 0.1]]))
    assert cols.tolist() == [1, 0]


def test_compare_recovers_a_permuted_copy_with_activation_correlations(hand_sae, d4):
    a, _ = hand_sae
    model, tok, _ = d4
    perm = torch.randperm(a.cfg.d_sae, generator=torch.Generator().manual_seed(1))
    b = _sae(a.W_dec.detach()[perm] + 0.01 * torch.randn(a.W_dec.shape))
    from nanosae.data import token_tensor
    from nanosae.evaluate import special_token_ids

    rows = token_tensor(tok, None, 64, "val", 16)
    result = compare(a, b, (model, model), rows, special_token_ids(tok))
    got = {p["a"]: p["b"] for p in result["pairs"]}
    assert all(got[int(perm[j])] == j for j in range(a.cfg.d_sae))  # B's latent j is A's perm[j]
    s = result["summary"]
    assert s["matched_cos_over_0.9"] == 1.0 and s["median_matched_corr"] > 0.9
    # an unrelated SAE of the same width matches far worse
    other = compare(a, _sae(torch.randn(a.W_dec.shape)))["summary"]
    assert other["matched_cos_over_0.9"] == 0.0 and other["mean_matched_cos"] < 0.5


def test_compare_finds_a_latent_split_in_a_wider_sae():
    g = torch.Generator().manual_seed(2)
    narrow = torch.linalg.qr(torch.randn(64, 8, generator=g))[0].T  # 8 orthonormal rows
    extra = torch.randn(64, generator=g)
    extra -= (extra @ narrow[0]) * narrow[0]
    extra /= extra.norm()
    pieces = [0.85 * narrow[0] + 0.53 * extra, 0.85 * narrow[0] - 0.53 * extra]  # two pieces at cos 0.85 each
    wide = torch.cat([narrow[1:], torch.stack(pieces), torch.randn(7, 64, generator=g)])
    result = compare(_sae(narrow, k=4), _sae(wide, k=4))
    sp = result["splitting"]
    assert sp["narrow"] == "a" and sp["largest"][0] == {"latent": 0, "pieces": [7, 8]}
    assert decoder_cosines(_sae(narrow, k=4), _sae(wide, k=4))[0, 7] == pytest.approx(0.85, abs=0.01)


def test_compare_refuses_saes_at_different_sites(tmp_path, capsys):
    from nanosae.cli import main

    a, b = _sae(torch.randn(32, 16)), _sae(torch.randn(32, 16), site="blocks.1.resid_post")
    with pytest.raises(NanosaeError, match="different sites"):
        compare(a, b)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "same site" in err and len(err.splitlines()) == 1


def test_compare_command_writes_json(hand_sae, tmp_path):
    from nanosae.cli import main

    _, path = hand_sae
    other = tmp_path / "other"
    _sae(torch.randn(512, 128)).save(other)
    out = tmp_path / "c.json"
    model = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
    assert main(["compare", str(path), str(other), "--json", str(out), "--model", str(model), "--tokens", "1k"]) == 0
    result = json.loads(out.read_text())
    assert result["summary"]["pairs"] == 256 and result["splitting"]["narrow"] == "a"
    assert all("corr" in p for p in result["pairs"]) and -1 <= result["summary"]["median_matched_corr"] <= 1
