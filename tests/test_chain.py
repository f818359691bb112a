"""SAE chains: train --init-from continues an SAE exactly where it was (every architecture), refuses SAEs of
another site or width, and a chain along planted checkpoints finds each planted atom's birth."""

from __future__ import annotations

import pytest
import torch

from bench.chain_truth import Planted, run_chain, score
from nanosae.errors import NanosaeError
from nanosae.sae import SAE, TRAINING_CLASSES, SAEConfig, SAETrainConfig, training_sae
from nanosae.train import TrainConfig, train


@pytest.mark.parametrize("arch", sorted(TRAINING_CLASSES))
def test_load_inference_inverts_to_inference(arch):
    recipe = SAETrainConfig(arch=arch, d_sae=24, k=4, normalize=True)
    x = 3 * torch.randn(256, 16) + 1
    src = training_sae(recipe, 16)
    src.init_from_sample(x)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn(p.shape))
        if arch == "batchtopk":
            src.threshold.fill_(0.3)
    saved = src.to_inference(hook_name="blocks.0.resid_post")
    dst = training_sae(recipe, 16)
    dst.init_from_sample(0.5 * torch.randn(256, 16))  # another input scale: the tensors must follow it
    assert dst.input_scale.item() != pytest.approx(src.input_scale.item())
    dst.load_inference(saved)
    again = dst.to_inference(hook_name="blocks.0.resid_post")
    for name, t in saved.state_dict().items():
        assert torch.allclose(again.state_dict()[name], t, atol=1e-5), name
    assert torch.allclose(again.encode(x), saved.encode(x), atol=1e-4)


class _Stream:
    def __init__(self, x: torch.Tensor, batch: int, site: str = "blocks.0.resid_post"):
        self.x, self.batch, self.i = x, batch, 0
        self.d_in, self.site, self.model_name, self.context_size, self.dataset = x.shape[1], site, "m", 0, ""

    def state(self):
        return {"i": self.i}

    def __next__(self):
        self.i += 1
        return self.x[torch.randint(len(self.x), (self.batch,))]


def _saved_sae(tmp_path, d_in=16, d_sae=32, site="blocks.0.resid_post") -> SAE:
    sae = SAE(SAEConfig(architecture="topk", d_in=d_in, d_sae=d_sae, k=4, hook_name=site))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(torch.randn(d_in))
    sae.save(tmp_path / "init")
    return sae


def test_train_init_from_starts_from_the_saved_sae(tmp_path):
    init = _saved_sae(tmp_path)
    x = torch.randn(4096, 16)
    recipe = SAETrainConfig(arch="topk", d_sae=32, k=4, lr=1e-12)
    cfg = TrainConfig(
        saes=[recipe], tokens=256, batch_size=256, out=str(tmp_path / "run"), init_from=str(tmp_path / "init")
    )
    (out,) = train(cfg, lambda state: _Stream(x, 256), progress=False)
    for name, t in init.state_dict().items():
        assert torch.allclose(out.state_dict()[name], t, atol=1e-6), name
    fresh = train(TrainConfig(saes=[recipe], tokens=256, batch_size=256, out=str(tmp_path / "fresh")),
                  lambda state: _Stream(x, 256), progress=False)[0]  # fmt: skip
    assert not torch.allclose(fresh.W_dec, init.W_dec)


def test_init_from_refuses_another_site_or_width(tmp_path):
    _saved_sae(tmp_path)
    recipe = SAETrainConfig(arch="topk", d_sae=32, k=4)
    cfg = TrainConfig(
        saes=[recipe], tokens=256, batch_size=256, out=str(tmp_path / "a"), init_from=str(tmp_path / "init")
    )
    with pytest.raises(NanosaeError, match=r"reads blocks.0.resid_post but this run trains on blocks.1.resid_post"):
        train(cfg, lambda state: _Stream(torch.randn(512, 16), 256, "blocks.1.resid_post"), progress=False)
    cfg.out = str(tmp_path / "b")
    with pytest.raises(NanosaeError, match="reads 16-wide activations but the stream is 24 wide"):
        train(cfg, lambda state: _Stream(torch.randn(512, 24), 256), progress=False)
    cfg.out, cfg.saes = str(tmp_path / "c"), [SAETrainConfig(arch="topk", d_sae=64, k=4)]
    with pytest.raises(NanosaeError, match="leave out --arch/--k/--expansion/--d-sae"):
        train(cfg, lambda state: _Stream(torch.randn(512, 16), 256), progress=False)


def test_init_from_command_takes_the_saes_recipe(hand_sae, tmp_path, capsys):
    from pathlib import Path

    from nanosae.cli import main
    from nanosae.sae import load_sae

    model = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
    for layer in (1, 2):  # small caches: streaming from the model would first fill a 256k-token shuffle buffer
        collect = ["collect", "--model", str(model), "--layer", str(layer), "--tokens", "2k", "--seq-len", "64"]
        assert main([*collect, "--out", str(tmp_path / f"acts{layer}")]) == 0
    _, sae_dir = hand_sae
    run = ["train", "--init-from", str(sae_dir), "--tokens", "1024", "--batch-size", "512"]
    assert main([*run, "--activations", str(tmp_path / "acts2"), "--out", str(tmp_path / "ok")]) == 0
    out = load_sae(tmp_path / "ok")
    assert (out.cfg.hook_name, out.cfg.d_sae, out.cfg.k) == ("blocks.2.resid_post", 256, 16)
    capsys.readouterr()
    assert main([*run, "--activations", str(tmp_path / "acts1"), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "reads blocks.2.resid_post but this run trains on blocks.1.resid_post" in err and len(err.splitlines()) == 1


def test_chain_finds_where_planted_atoms_are_born(tmp_path):
    """Atoms switching on at checkpoints 1 and 3 of 5: the chain's latents for them are born there (±1)."""
    planted = Planted(d=24, n_atoms=28, births={1: 4, 3: 4}, seed=0)
    report, final, density = run_chain(planted, 5, tmp_path, d_sae=36, k=3, first=200_000, link=80_000)
    s = score(planted, report, final)
    assert s["late_found"] == 1.0, s
    assert s["late_born_right"] == 1.0, s
    assert s["early_born_right"] >= 0.9, s
    born = torch.tensor(report["born"])
    assert (born == 0).sum() >= 20 and (born > 0).sum() <= 12  # births are rare: most latents are there from the start


def test_init_from_flags_default_to_the_saes_site_and_recipe(hand_sae):
    from nanosae.cli import _train_config, build_parser

    _, sae_dir = hand_sae
    args = build_parser().parse_args(["train", "--model", "m", "--init-from", str(sae_dir), "--out", "o"])
    cfg = _train_config(args)
    assert cfg.site == "blocks.2.resid_post" and cfg.init_from == str(sae_dir)
    assert [(s.arch, s.d_sae, s.k) for s in cfg.saes] == [("topk", 256, 16)]
    args = build_parser().parse_args(
        ["train", "--model", "m", "--init-from", str(sae_dir), "--layer", "1", "--lr", "1e-3", "--out", "o"]
    )
    cfg = _train_config(args)  # flags given win; a wrong site is refused once the stream is known
    assert cfg.site == "blocks.1.resid_post" and cfg.saes[0].lr == 1e-3
