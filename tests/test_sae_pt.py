"""SAEs in one .pt file: nanosae's best_model.pt (written by save_pt), plain state dicts, and the checkpoints of nanochat
PR #169's scripts, whose TopK and Gated variants load as what they are (signed latents, the Gated one with a gate of
its own); where load_sae takes a file; and what cannot take a signed SAE (SAELens, the Neuronpedia export)."""

from __future__ import annotations

import fractions
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanosae.cli import main
from nanosae.errors import NanosaeError
from nanosae.neuronpedia import check_exportable
from nanosae.sae import SAE, SAEConfig, SignedSAE, load_sae, sae_folder, save_pt

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"

D_IN, D_SAE, K = 128, 256, 8


def random_sae(architecture: str, seed: int = 0) -> SAE:
    """An SAE of the architecture with random weights (every tensor, thresholds and gates included)."""
    cfg = SAEConfig(architecture, D_IN, D_SAE, k=K if "topk" in architecture else None, hook_name="blocks.2.resid_post")
    sae = SignedSAE(cfg) if architecture in SignedSAE.notes else SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name in ("threshold", "r_mag") else 1.0))
    return sae


def x_batch(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1)) * 3


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated", "topk_signed", "gated_signed"])
def test_best_model_pt_is_a_plain_state_dict_that_loads_back(architecture, tmp_path):
    sae = random_sae(architecture)
    path = save_pt(sae, tmp_path / "best_model.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(sae.state_dict()) | {"config"}
    assert json.loads(json.dumps(raw["config"])) == raw["config"]  # plain values only
    assert raw["config"]["architecture"] == architecture and raw["config"]["d_sae"] == D_SAE
    back = load_sae(path)
    assert type(back) is type(sae) and back.cfg.architecture == architecture
    x = x_batch()
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)


def test_a_file_of_a_folder_loads_the_folder_and_companions_live_there(hand_sae, tmp_path):
    sae, folder = hand_sae
    x = x_batch()
    for f in ("cfg.json", "sae_weights.safetensors"):
        torch.testing.assert_close(load_sae(folder / f).encode(x), sae.encode(x), rtol=0, atol=0)
        assert sae_folder(folder / f) == folder
    assert sae_folder(folder) == folder
    with pytest.raises(NanosaeError, match=r"not found; pass an SAE folder .* or a \.pt state dict"):
        load_sae(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------ nanochat PR #169


def pr169_checkpoint(path, activation: str, hook: str = "blocks.2.hook_resid_post") -> dict[str, torch.Tensor]:
    """A checkpoint laid out as PR #169's SAETrainer._save_checkpoint writes best_model.pt (its state dict under
    sae_state_dict, Adam and LambdaLR states, its SAEConfig.to_dict()); returns the SAE's tensors."""
    g = torch.Generator().manual_seed(2)
    sd = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5,
        # TopK: pre-activations mostly negative, so the top k hold negative values too
        "b_enc": torch.randn(D_SAE, generator=g) - (8 if activation == "topk" else 1.5),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    if activation == "gated":
        sd |= {"W_gate": torch.randn(D_IN, D_SAE, generator=g) / D_IN**0.5, "b_gate": torch.randn(D_SAE, generator=g)}
    params = [torch.nn.Parameter(v.clone()) for v in sd.values()]
    opt = torch.optim.Adam(params, lr=3e-4)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 1000))
    config = {"d_in": D_IN, "d_sae": D_SAE, "activation": activation, "k": K, "l1_coefficient": 1e-3}
    config |= {"normalize_decoder": True, "dtype": "bfloat16", "hook_point": hook, "expansion_factor": 2}
    ckpt = {"step": 1000, "epoch": 1, "sae_state_dict": sd, "optimizer_state_dict": opt.state_dict()}
    ckpt |= {"scheduler_state_dict": sched.state_dict(), "config": config, "feature_counts": torch.zeros(D_SAE)}
    torch.save(ckpt | {"best_val_loss": float("inf")}, path)
    return sd


def pr169_encode(sd: dict[str, torch.Tensor], activation: str, x: torch.Tensor) -> torch.Tensor:
    """PR #169's get_feature_activations (sae/models.py), restated: the encoders read x itself, no b_dec shift."""
    pre = x @ sd["W_enc"] + sd["b_enc"]
    if activation == "topk":
        vals, idx = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals)
    if activation == "relu":
        return F.relu(pre)
    return (x @ sd["W_gate"] + sd["b_gate"] > 0).float() * pre


@pytest.mark.parametrize(
    "activation, architecture", [("topk", "topk_signed"), ("relu", "standard"), ("gated", "gated_signed")]
)
def test_a_pr169_checkpoint_computes_what_it_computed(activation, architecture, tmp_path):
    sd = pr169_checkpoint(tmp_path / "best_model.pt", activation)
    sae = load_sae(tmp_path / "best_model.pt")
    assert sae.cfg.architecture == architecture and (sae.cfg.d_in, sae.cfg.d_sae) == (D_IN, D_SAE)
    assert sae.cfg.hook_name == "blocks.2.resid_post" and sae.cfg.training["nanochat_pr169"]["activation"] == activation
    x = x_batch()
    want = pr169_encode(sd, activation, x)
    f = sae.encode(x)
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sae.decode(f), want @ sd["W_dec"] + sd["b_dec"], rtol=1e-5, atol=1e-4)
    if activation != "relu":  # the sign is kept: a ReLU anywhere would have failed the comparison above
        assert (want < 0).any() and ((want != 0).sum(-1) > 0).all()
    if activation == "topk":
        assert sae.cfg.k == K and ((f != 0).sum(-1) == K).all()


def test_pr169_hook_points_are_nanosae_sites_and_a_run_folder_loads(tmp_path):
    for hook, site in [("blocks.1.hook_attn", "blocks.1.attn_out"), ("blocks.3.hook_mlp", "blocks.3.mlp_out")]:
        pr169_checkpoint(tmp_path / "a.pt", "relu", hook)
        assert load_sae(tmp_path / "a.pt").cfg.hook_name == site
    run = tmp_path / "sae_outputs" / "layer_2"  # what PR #169's sae_train leaves: config.json, best_model.pt, …
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"activation": "gated"}))
    sd = pr169_checkpoint(run / "best_model.pt", "gated")
    x = x_batch()
    torch.testing.assert_close(load_sae(run).encode(x), pr169_encode(sd, "gated", x), rtol=1e-5, atol=1e-4)


def test_signed_saes_say_what_they_are_and_saelens_refuses_them(tmp_path):
    from sae_lens import SAE as SAELensSAE

    for architecture in ("topk_signed", "gated_signed"):
        sae = random_sae(architecture)
        folder = sae.save(tmp_path / architecture)
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == architecture and "PR #169" in cfg["metadata"]["nanosae_note"]
        assert "cannot load" in cfg["metadata"]["nanosae_note"]
        x = x_batch()
        torch.testing.assert_close(load_sae(folder).encode(x), sae.encode(x), rtol=0, atol=0)
        with pytest.raises(KeyError, match=architecture):  # no SAELens architecture of that name: never misread
            SAELensSAE.load_from_disk(str(folder))
        with pytest.raises(NanosaeError, match="cannot be exported"):
            check_exportable(sae)
    assert "Rajamanoharan" in SignedSAE.notes["gated_signed"]


def test_export_refuses_a_signed_sae_before_loading_the_model(tmp_path, capsys):
    pr169_checkpoint(tmp_path / "best_model.pt", "gated")
    out = tmp_path / "np"
    argv = ["export", "neuronpedia", "--sae", str(tmp_path / "best_model.pt"), "--model", str(BASE_DIR)]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "gated_signed" in err and "cannot be exported" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "feature_stats").exists()


def test_eval_counts_a_negative_latent_as_firing(d4):
    """L0 counts f != 0: a gated_signed SAE whose gate is always open fires every latent on every token, though about
    half the magnitudes are negative."""
    from nanosae.evaluate import evaluate

    model, tok, _ = d4
    sae = random_sae("gated_signed")
    with torch.no_grad():
        sae.b_gate.fill_(1e6)
    result = evaluate(sae, model, tok, None, 2048, ce_tokens=256, batch_size=4, context_size=64, check_model=False)
    assert result["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(D_SAE)


# ------------------------------------------------------------------------------------------ plain state dicts


def state_of(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


def test_a_state_dict_in_nn_linear_layout_is_turned(tmp_path):
    sae = random_sae("topk")
    sd = state_of(sae)
    sd["W_enc"], sd["W_dec"] = sd["W_enc"].t().contiguous(), sd["W_dec"].t().contiguous()  # [out, in]
    torch.save({**sd, "config": {"architecture": "topk", "k": K}}, tmp_path / "t.pt")
    x = x_batch()
    torch.testing.assert_close(load_sae(tmp_path / "t.pt").encode(x), sae.encode(x), rtol=0, atol=0)


def test_the_architecture_comes_from_the_keys_and_k_from_the_config(tmp_path):
    x = x_batch()
    for architecture in ("jumprelu", "gated"):  # threshold, r_mag: no config needed
        sae = random_sae(architecture)
        torch.save(state_of(sae), tmp_path / "a.pt")
        back = load_sae(tmp_path / "a.pt")
        assert back.cfg.architecture == architecture
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
    sae = random_sae("topk")
    torch.save(state_of(sae), tmp_path / "b.pt")
    with pytest.raises(NanosaeError, match="may be a ReLU or a TopK SAE"):
        load_sae(tmp_path / "b.pt")
    torch.save({**state_of(sae), "config": {"k": K}}, tmp_path / "b.pt")
    back = load_sae(tmp_path / "b.pt")
    assert (back.cfg.architecture, back.cfg.k) == ("topk", K)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)


def test_ambiguous_or_inconsistent_state_dicts_are_refused(tmp_path):
    square = SAE(SAEConfig("jumprelu", D_IN, D_IN))
    torch.save(state_of(square), tmp_path / "sq.pt")
    with pytest.raises(NanosaeError, match="square .* which side is d_in"):
        load_sae(tmp_path / "sq.pt")
    torch.save({**state_of(square), "config": {"architecture": "jumprelu"}}, tmp_path / "sq.pt")
    assert load_sae(tmp_path / "sq.pt").cfg.d_sae == D_IN  # with a config, the SAELens layout is meant
    torch.save(
        {**state_of(random_sae("topk")), "config": {"architecture": "topk", "k": K, "d_in": 64}}, tmp_path / "c.pt"
    )
    with pytest.raises(NanosaeError, match="config says d_in 64"):
        load_sae(tmp_path / "c.pt")
    torch.save({"W_enc": torch.zeros(3, 4)}, tmp_path / "n.pt")
    with pytest.raises(NanosaeError, match="not an SAE state dict"):
        load_sae(tmp_path / "n.pt")
    torch.save([torch.zeros(3)], tmp_path / "l.pt")
    with pytest.raises(NanosaeError, match="not a state dict of SAE tensors"):
        load_sae(tmp_path / "l.pt")


def test_a_damaged_or_unsafe_pt_is_one_line_never_run(tmp_path):
    good = save_pt(random_sae("standard"), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(NanosaeError, match="not a readable torch checkpoint"):
        load_sae(tmp_path / "cut.pt")
    torch.save({"config": fractions.Fraction(1, 3)}, tmp_path / "code.pt")
    with pytest.raises(NanosaeError, match="refused: the pickle asks for fractions.Fraction"):
        load_sae(tmp_path / "code.pt")
