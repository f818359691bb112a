"""Transcoders: the mlp_in site, the training math against its dense definition, the save-time folding of both
scales, SAELens' own transcoder classes reading what we write (and we theirs), evaluation spliced in place of the
MLP (a planted transcoder scores CE 1), downstream use (features, Neuronpedia, steering at the output site),
`nanosae train --arch transcoder` end to end (resume, every layer) and its one-line errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanosae import sparse
from nanosae.cli import main
from nanosae.errors import NanosaeError
from nanosae.evaluate import evaluate
from nanosae.gpt import norm
from nanosae.hooks import add_hooks, run_with_cache
from nanosae.sae import SAE, SAEConfig, SAETrainConfig, load_sae, save_pt, split_arch, training_sae

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
D_IN, D_OUT, D_SAE, N = 12, 10, 48, 80


def _transcoder(arch: str, kind: str = "transcoder", **kw):
    """A training transcoder with every parameter randomised and inputs/targets on different scales (so a
    mixed-up scale or a dropped term shows)."""
    sae = training_sae(SAETrainConfig(arch=arch, kind=kind, d_sae=D_SAE, **kw), D_IN, D_OUT)
    x = torch.cat([torch.randn(N, D_IN) * 3 + 1, torch.randn(N, D_OUT) * 0.2 - 0.1], dim=1)
    sae.init_from_sample(x)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "W_skip":
                p.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.5)
    return sae, x


def _predict(sae, x):
    """The dense prediction in scaled units, written out: f(c x W_enc + b_enc) W_dec + b_dec + c x W_skip^T."""
    xs, ys = x[:, :D_IN] * sae.input_scale, x[:, D_IN:] * sae.output_scale
    f = sae.encode(xs)
    y_hat = f @ sae.W_dec + sae.b_dec
    if sae.cfg.kind == "skip_transcoder":
        y_hat = y_hat + xs @ sae.W_skip.T
    return f, ys, y_hat


def test_mlp_in_is_what_the_mlp_reads(d4):
    model, _, _ = d4
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    _, acts = run_with_cache(model, idx, ["blocks.1.resid_mid", "blocks.1.mlp_in", "blocks.1.mlp_out"])
    mlp = model.transformer.h[1].mlp
    u = acts["blocks.1.mlp_in"]
    torch.testing.assert_close(u, norm(acts["blocks.1.resid_mid"], model.transformer.h[1].attn.gen.norm_eps))
    torch.testing.assert_close(mlp.c_proj(F.relu(mlp.c_fc(u)).square()), acts["blocks.1.mlp_out"])
    _, same = run_with_cache(model, idx, ["blocks.1.ln2.hook_normalized"])  # TransformerLens' name for it
    torch.testing.assert_close(same["blocks.1.mlp_in"], u)


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
@pytest.mark.parametrize(("arch", "kw"), [("topk", {}), ("batchtopk", {}), ("topk", {"matryoshka": (16,)})])
def test_topk_family_transcoder_loss_and_gradients_equal_the_dense_definition(arch, kw, kind):
    """The sparse fast path (selection, decode, RowGrads) against the dense reference, itself checked against the
    formula written out here: the target is the other site, the encoder reads x unshifted, W_skip gets its gradient."""
    sae, x = _transcoder(arch, kind, k=4, k_aux=3, **kw)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::5] = True
    ref = sae.reference_loss(x, dead)
    if not kw:
        f, ys, y_hat = _predict(sae, x)
        main = (ys - y_hat).pow(2).sum() / (N * sae.mse_scale)
        assert main <= ref and (ref - main).item() > 0  # the AuxK term rides on top (dead latents given)
        assert torch.allclose(sae.reference_loss(x, torch.zeros_like(dead)), main, rtol=1e-5)
    names, params = zip(*sae.named_parameters())
    want = torch.autograd.grad(ref, params, allow_unused=True)
    out = sae.loss(x, dead, 1.0)
    assert torch.allclose(out.loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or not g.abs().any(), name
        else:
            assert torch.allclose(g, w, rtol=1e-4, atol=1e-5), name
    if kind == "skip_transcoder":
        assert got[names.index("W_skip")].abs().sum() > 0
    row_grads = sparse.RowGrads()  # the CPU path that never builds dense weight gradients
    sae.loss(x, dead, 1.0, row_grads).loss.backward()
    assert torch.allclose(sum(g.full() for g in row_grads.W_enc).t(), want[names.index("W_enc")], atol=1e-5)
    assert torch.allclose(sum(g.full() for g in row_grads.W_dec), want[names.index("W_dec")], atol=1e-5)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "april"])
def test_relu_and_jumprelu_transcoder_losses(arch):
    sae, x = _transcoder(arch, "skip_transcoder", sparsity_coeff=0.3)
    f, ys, y_hat = _predict(sae, x)
    err = (ys - y_hat).pow(2).sum(-1)
    if arch == "jumprelu":
        penalty = (f > 0).float().sum(-1)
    elif arch == "april":
        penalty = f @ sae.W_dec.norm(dim=1)
    else:
        penalty = f.sum(-1)
    out = sae.loss(x, torch.zeros(D_SAE, dtype=torch.bool), 1.0)
    assert torch.allclose(out.loss, (err + 0.3 * penalty).mean(), rtol=1e-5)
    assert torch.allclose(out.sse, err.sum() / sae.output_scale**2, rtol=1e-5)  # in the model's units


@pytest.mark.parametrize(("arch", "kind"), [("batchtopk", "skip_transcoder"), ("topk", "transcoder"),
                                            ("jumprelu", "skip_transcoder"), ("april", "transcoder")])  # fmt: skip
def test_saving_folds_both_scales_and_loads_back(tmp_path, arch, kind):
    """The saved transcoder reads raw inputs and writes raw targets: its output is the training prediction / c_out,
    its latents the training latents / c; through the folder, the .pt, and back into a training transcoder."""
    sae, x = _transcoder(arch, kind, k=4, normalize=True)
    assert sae.input_scale.item() != pytest.approx(sae.output_scale.item(), rel=0.1)
    if arch == "batchtopk":
        sae.threshold.fill_(0.3)
    inf = sae.to_inference(hook_name="blocks.1.mlp_in", hook_name_out="blocks.1.mlp_out")
    with torch.no_grad():
        xs = x[:, :D_IN] * sae.input_scale
        f = sae.encode(xs) if arch not in ("batchtopk",) else F.relu(sae.pre_acts(xs)) * (sae.pre_acts(xs) > 0.3)
        y_hat = f @ sae.W_dec + sae.b_dec + (xs @ sae.W_skip.T if kind == "skip_transcoder" else 0)
        torch.testing.assert_close(inf(x[:, :D_IN]), y_hat / sae.output_scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(inf.encode(x[:, :D_IN]), f / sae.input_scale, rtol=1e-4, atol=1e-5)
    inf.save(tmp_path / "tc")
    save_pt(inf, tmp_path / "tc.pt")
    for path in (tmp_path / "tc", tmp_path / "tc.pt"):
        back = load_sae(path)
        assert (back.cfg.d_out, back.cfg.skip, back.cfg.hook_name_out) == (D_OUT, kind == "skip_transcoder",
                                                                          "blocks.1.mlp_out")  # fmt: skip
        torch.testing.assert_close(back(x[:, :D_IN]), inf(x[:, :D_IN]))
    again, _ = _transcoder(arch, kind, k=4, normalize=True)
    assert again.input_scale != sae.input_scale  # another sample: the inverse must use its own scales
    again.load_inference(load_sae(tmp_path / "tc"))  # --init-from: the inverse of the folding
    with torch.no_grad():
        torch.testing.assert_close(again.to_inference()(x[:, :D_IN]), inf(x[:, :D_IN]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("form", "skip", "name"), [("standard", False, "transcoder"),
                                                     ("standard", True, "skip_transcoder"),
                                                     ("jumprelu", False, "jumprelu_transcoder"),
                                                     ("jumprelu", True, "jumprelu_skip_transcoder")])  # fmt: skip
def test_saelens_loads_what_we_write_and_we_load_what_it_writes(tmp_path, form, skip, name):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(0)
    cfg = SAEConfig(form, D_IN, D_SAE, d_out=D_OUT, skip=skip, hook_name="blocks.2.mlp_in",
                    hook_name_out="blocks.2.mlp_out")  # fmt: skip
    ours = SAE(cfg)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.5)
        if form == "jumprelu":
            ours.threshold.uniform_(0.0, 0.6)
    ours.save(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert raw["architecture"] == name and raw["d_out"] == D_OUT and raw["apply_b_dec_to_input"] is False
    assert raw["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    lens = LensSAE.load_from_disk(str(tmp_path / "ours"))
    assert type(lens).__name__.lower() == name.replace("_", "")  # SAELens' own class for it (JumpReLUTranscoder, …)
    x = torch.randn(N, D_IN) * 2
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), ours.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lens(x), ours(x), rtol=1e-5, atol=1e-6)
        for p in lens.parameters():  # different weights, written by SAELens, read by nanosae
            p.add_(torch.randn_like(p) * 0.1)
    lens.save_model(str(tmp_path / "theirs"))
    back = load_sae(tmp_path / "theirs")
    assert (back.cfg.architecture, back.cfg.skip, back.cfg.d_out) == (form, skip, D_OUT)
    with torch.no_grad():
        torch.testing.assert_close(back(x), lens(x), rtol=1e-5, atol=1e-6)


def test_topk_transcoder_says_saelens_cannot_read_it(tmp_path):
    SAE(SAEConfig("topk", D_IN, D_SAE, k=3, d_out=D_OUT)).save(tmp_path / "t")
    raw = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert (
        raw["architecture"] == "topk_transcoder" and "SAELens has no TopK transcoder" in raw["metadata"]["nanosae_note"]
    )
    assert load_sae(tmp_path / "t").cfg.k == 3


def test_bad_transcoder_folders_give_one_line_errors(tmp_path):
    SAE(SAEConfig("jumprelu", D_IN, D_SAE, d_out=D_OUT)).save(tmp_path / "t")
    good = json.loads((tmp_path / "t" / "cfg.json").read_text())
    for change, message in (
        ({"hook_point_layer_out": 3, "use_error_term": True}, "hook_point_layer_out, use_error_term are unknown"),
        ({"d_out": None}, "needs d_out"),
        ({"apply_b_dec_to_input": True}, "apply_b_dec_to_input"),
        ({"d_out": D_OUT + 1}, "has shape"),
    ):
        (tmp_path / "t" / "cfg.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(NanosaeError, match=message) as e:
            load_sae(tmp_path / "t")
        assert "\n" not in str(e.value)
    with pytest.raises(NanosaeError, match="gated transcoder does not exist"):
        SAEConfig("gated", D_IN, D_SAE, d_out=D_OUT)
    with pytest.raises(NanosaeError, match="decode\\(f, x\\)"):
        SAE(SAEConfig("standard", D_IN, D_SAE, d_out=D_OUT, skip=True)).decode(torch.zeros(1, D_SAE))


def test_split_arch_names():
    assert split_arch("transcoder") == ("batchtopk", "transcoder")
    assert split_arch("skip_transcoder") == ("batchtopk", "skip_transcoder")
    assert split_arch("jumprelu_skip_transcoder") == ("jumprelu", "skip_transcoder")
    assert split_arch("topk_transcoder") == ("topk", "transcoder") and split_arch("topk") == ("topk", "sae")
    with pytest.raises(NanosaeError, match="gated activation is not supported"):
        SAETrainConfig(arch="gated", kind="transcoder").resolved(D_IN)


def _planted(model, layer: int, d_sae: int = 64, seed: int = 0) -> SAE:
    """A ReLU transcoder with random weights, from mlp_in to mlp_out of `layer`."""
    g = torch.Generator().manual_seed(seed)
    d = model.config.n_embd
    sae = SAE(SAEConfig("standard", d, d_sae, d_out=d, hook_name=f"blocks.{layer}.mlp_in",
                        hook_name_out=f"blocks.{layer}.mlp_out", model_name=model.info.name))  # fmt: skip
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d**0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) * 0.05)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.01)
    return sae


def test_eval_splices_in_place_of_the_mlp_and_a_planted_transcoder_scores_one(d4):
    """Plant a one-layer ReLU MLP in block 2 (a hook replaces the MLP's output with relu(u W + b) D + b_dec of its
    input u): the transcoder with exactly those weights, spliced in place of the MLP, leaves every logit as it was
    (CE and KL scores 1, explained variance 1), and one with other weights does not."""
    model, tok, _ = d4
    sae = _planted(model, 2)
    stash = {}

    def read(u, start):
        stash["u"] = u

    def plant(y, start):
        return sae(stash["u"]).to(y.dtype)

    with add_hooks(model, {"blocks.2.mlp_in": read, "blocks.2.mlp_out": plant}):
        r = evaluate(sae, model, tok, n_tokens=2048, ce_tokens=1024, batch_size=4, context_size=64, progress=False)
        other = evaluate(_planted(model, 2, seed=1), model, tok, n_tokens=2048, ce_tokens=1024, batch_size=4,
                         context_size=64, progress=False)  # fmt: skip
    m = r["eval_result_metrics"]
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["model_behavior_preservation"]["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert m["reconstruction_quality"]["explained_variance"] == pytest.approx(1.0, abs=1e-4)
    perf = m["model_performance_preservation"]
    assert abs(perf["ce_loss_with_ablation"] - perf["ce_loss_without_sae"]) > 0.02  # the MLP's output matters
    assert r["eval_result_unstructured"]["site_out"] == "blocks.2.mlp_out"
    assert other["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] < 0.99


def test_features_neuronpedia_and_steering_use_both_sides(d4, tmp_path):
    """Contexts come from the input site, logit effects and steering from the output site."""
    from nanosae.features import FeatureConfig, compute_features
    from nanosae.neuronpedia import names
    from nanosae.runtime import Steer, residual_directions, steer

    model, tok, _ = d4
    sae = _planted(model, 1)
    stats = compute_features(model, tok, sae, cfg=FeatureConfig(n_tokens=2048, seq_len=64), progress=False)
    assert (stats.meta["site"], stats.meta["site_out"], stats.meta["architecture"]) == (
        "blocks.1.mlp_in", "blocks.1.mlp_out", "transcoder")  # fmt: skip
    assert (
        names(stats)["set_name"] == "transcoder-nanosae" and names(stats)["hook_name"] == "blocks.1.ln2.hook_normalized"
    )
    torch.testing.assert_close(residual_directions(model, sae), sae.W_dec)  # mlp_out is a residual direction
    idx = torch.randint(0, model.config.vocab_size, (1, 12))
    sites = ["blocks.1.mlp_in", "blocks.1.mlp_out"]
    _, clean = run_with_cache(model, idx, sites)
    with steer(model, sae, [Steer(latent=5, add=2.0)], units=torch.ones(sae.cfg.d_sae)):
        _, steered = run_with_cache(model, idx, sites)
    torch.testing.assert_close(steered["blocks.1.mlp_in"], clean["blocks.1.mlp_in"])  # the input is untouched
    torch.testing.assert_close(steered["blocks.1.mlp_out"], clean["blocks.1.mlp_out"] + 2.0 * sae.W_dec[5])
    f = sae.encode(clean["blocks.1.mlp_in"])
    with steer(model, sae, [Steer(latent=7, clamp=3.0)]):  # clamp reads f from the input, writes the output
        _, clamped = run_with_cache(model, idx, sites)
    want = clean["blocks.1.mlp_out"] + (3.0 - f[..., 7:8]) * sae.W_dec[7]
    torch.testing.assert_close(clamped["blocks.1.mlp_out"], want, rtol=1e-4, atol=1e-5)


def _train(tmp_path, name, *flags):
    base = f"train --model {BASE_DIR} --seq-len 64 --batch-size 256 --expansion 2 --k 8 --log-every 2".split()
    return main([*base, "--out", str(tmp_path / name), *flags])


def test_train_transcoder_end_to_end_resumes_exactly(tmp_path, capsys):
    flags = ["--layer", "1", "--site", "mlp_in", "--arch", "skip_transcoder", "--checkpoint-every", "3"]
    assert _train(tmp_path, "one", *flags, "--tokens", "2048") == 0
    assert _train(tmp_path, "two", *flags, "--tokens", "1024") == 0
    assert _train(tmp_path, "two", "--resume", "--tokens", "2048") == 0  # the saved flags, target included
    a, b = load_sae(tmp_path / "one"), load_sae(tmp_path / "two")
    assert (a.cfg.hook_name, a.cfg.hook_name_out, a.cfg.architecture, a.cfg.skip) == (
        "blocks.1.mlp_in", "blocks.1.mlp_out", "jumprelu", True)  # fmt: skip
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert "batchtopk_skip_transcoder_k8_x2" in capsys.readouterr().out


def test_transcoders_at_every_layer_from_one_stream(tmp_path, capsys):
    assert (
        _train(tmp_path, "all", "--layers", "all", "--site", "mlp_in", "--arch", "transcoder", "--tokens", "1024") == 0
    )
    for layer in range(4):
        sae = load_sae(tmp_path / "all" / f"blocks.{layer}.mlp_in")
        assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == (f"blocks.{layer}.mlp_in", f"blocks.{layer}.mlp_out")
    assert "trained 4 SAE(s)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--layer 1 --site mlp_out --arch transcoder --target mlp_in", "comes before blocks.1.mlp_out"),
        ("--layer 1 --site mlp_in --arch transcoder --target blocks.2.mlp_out", "within one block"),
        ("--layer 1 --site mlp_in --arch transcoder --target mlp_in", "is the input site itself"),
        ("--layer 1 --site mlp_in --target mlp_out", "--target is for transcoders"),
        ("--layer 1 --site mlp_in --arch topk,transcoder", "mixes SAEs and transcoders"),
        ("--layer 1 --site mlp_in --arch gated_transcoder", "gated activation is not supported"),
        ("--layers all --site mlp_in --arch transcoder --target blocks.1.mlp_out", "give a kind"),
        ("--site embed --arch transcoder --target blocks.0.mlp_out", "sites of one block"),
    ],
)
def test_bad_transcoder_flags_give_one_line_errors(tmp_path, capsys, flags, message):
    assert _train(tmp_path, "bad", "--tokens", "1024", *flags.split()) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "bad").exists()


def test_transcoder_from_a_cache_is_refused(tmp_path, capsys):
    assert main(["train", "--activations", str(tmp_path), "--arch", "transcoder", "--out", str(tmp_path / "o")]) == 2
    assert "train it from --model" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_sparse_relu_and_jumprelu_transcoder_steps_equal_their_dense_definition(arch):
    """With few latents firing, ReLU's and JumpReLU's losses run from sparse codes; for a transcoder too, with the
    unshifted encoder, the target's own scale and the skip: the same loss and gradients as dense_loss."""
    sae, x = _transcoder(arch, "skip_transcoder", sparsity_coeff=0.3)
    with torch.no_grad():
        sae.b_enc.sub_(sae.pre_acts(x[:, :D_IN] * sae.input_scale).quantile(0.985).item())  # ~1.5% fire
        if arch == "jumprelu":  # the band reaches ε/2 = 1 below θ: θ above 1 keeps it about as sparse
            sae.threshold.uniform_(1.0, 1.2)
    x = x.double()
    sae.double()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    names, params = zip(*sae.named_parameters())
    picked = sae.firing(x[:, :D_IN] * sae.input_scale, sae.b_enc, 0.0 if arch == "standard" else sae.band_floor())
    assert picked is not None  # the sparse path runs
    fast, ref = sae.loss(x, dead, 1.0), sae.dense_loss(x, dead, 1.0)
    assert torch.allclose(fast.loss, ref.loss, rtol=1e-10) and torch.equal(fast.fired, ref.fired)
    for name, g, w in zip(names, torch.autograd.grad(fast.loss, params), torch.autograd.grad(ref.loss, params)):
        assert torch.allclose(g, w, rtol=1e-8, atol=1e-12), name
