"""Every training architecture against a direct formula; the save-time conversion; SAELens and sparsify folders in
and out; bad inputs."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nanosae import sae as sae_module
from nanosae import sparse
from nanosae.errors import NanosaeError
from nanosae.sae import SAE, SAEConfig, SAETrainConfig, geometric_median, load_sae, training_sae

D_IN, D_SAE, N = 16, 64, 96


def _sae(arch: str, **kw):
    """A training SAE with every parameter and buffer randomised (so no term of a formula can hide behind a 0)."""
    torch.manual_seed(0)
    sae = training_sae(SAETrainConfig(arch=arch, d_sae=D_SAE, **kw), D_IN)
    x = torch.randn(N, D_IN) * 3 + 1
    sae.init_from_sample(x)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.normal_(0, 0.3)
        if arch == "jumprelu":
            sae.threshold.uniform_(0.05, 0.5)
        if arch == "april":
            sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # free decoder norms
    return sae, x


def _grads(sae, loss):
    return torch.autograd.grad(loss, [p for p in sae.parameters()], allow_unused=True)


def _check(sae, x, dead, expected_loss, atol=1e-5):
    out = sae.loss(x, dead, 0.7)
    assert torch.allclose(out.loss, expected_loss, atol=atol, rtol=1e-5), (out.loss, expected_loss)
    for g, r in zip(_grads(sae, out.loss), _grads(sae, expected_loss)):
        assert (g is None and r is None) or torch.allclose(g, r, atol=atol, rtol=1e-4)
    return out


def _topk_dense(pre, k):
    top = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))


def test_topk_loss_is_normalised_mse_plus_auxk():
    sae, x = _sae("topk", k=5, k_aux=4)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[10:30] = True
    xs = x * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    x_hat = _topk_dense(pre, 5) @ sae.W_dec + sae.b_dec
    main = (x_hat - xs).pow(2).sum(-1).mean() / sae.mse_scale
    e = (xs - x_hat).detach()
    e_hat = _topk_dense(pre.masked_fill(~dead, -torch.inf), 4) @ sae.W_dec
    aux = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    out = _check(sae, x, dead, main + aux / 32)
    assert out.fired.sum() == N * 5 and torch.allclose(out.sse, (x_hat - xs).pow(2).sum() / sae.input_scale**2)
    assert torch.allclose(sae.reference_loss(x, dead), main + aux / 32, rtol=1e-5)  # the dense definition states it


def test_matryoshka_averages_the_prefix_reconstructions():
    sae, x = _sae("topk", k=6, matryoshka=(8, 24))
    xs = x * sae.input_scale
    z = _topk_dense((xs - sae.b_dec) @ sae.W_enc + sae.b_enc, 6)
    errs = [(z[:, :m] @ sae.W_dec[:m] + sae.b_dec - xs).pow(2).sum(-1).mean() for m in (8, 24, D_SAE)]
    _check(sae, x, torch.zeros(D_SAE, dtype=torch.bool), sum(errs) / 3 / sae.mse_scale)
    assert torch.allclose(sae.reference_loss(x, torch.zeros(D_SAE, dtype=torch.bool)), sum(errs) / 3 / sae.mse_scale)


@pytest.mark.parametrize(
    "arch, kw, n_dead",
    [
        ("topk", {}, 0),
        ("topk", {}, 20),  # AuxK on
        ("topk", {"matryoshka": (8, 24)}, 20),
        ("batchtopk", {}, 20),
        ("batchtopk", {"matryoshka": (16,)}, 0),
    ],
)
def test_sparse_topk_loss_equals_its_dense_definition(arch, kw, n_dead):
    """`loss` (sparse selection, decode and gradients) against `reference_loss` (dense latents, autograd): the loss
    and every parameter's gradient, through autograd's .grad and through a RowGrads collector."""
    sae, x = _sae(arch, k=5, k_aux=4, **kw)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(1))[:n_dead]] = True
    ref = sae.reference_loss(x, dead)
    out = _check(sae, x, dead, ref)
    assert (out.aux > 0) == (n_dead > 0)
    row_grads = sparse.RowGrads()
    sae.loss(x, dead, 1.0, row_grads).loss.backward()
    assert sae.W_enc.grad is None and sae.W_dec.grad is None and sae.b_enc.grad is not None
    terms = 1 + bool(n_dead) + len(kw.get("matryoshka", ()))  # W_dec: one per prefix group and AuxK
    assert len(row_grads.W_enc) == 1 + bool(n_dead) and len(row_grads.W_dec) == terms
    ref_enc, ref_dec = torch.autograd.grad(sae.reference_loss(x, dead), [sae.W_enc, sae.W_dec])
    assert torch.allclose(sum(g.full() for g in row_grads.W_enc).t(), ref_enc, atol=1e-5, rtol=1e-4)
    assert torch.allclose(sum(g.full() for g in row_grads.W_dec), ref_dec, atol=1e-5, rtol=1e-4)


def test_batchtopk_keeps_the_batch_top_entries_and_tracks_a_threshold():
    sae, x = _sae("batchtopk", k=4)
    xs = x * sae.input_scale
    pre = F.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    keep = torch.zeros(N * D_SAE).index_fill_(0, pre.detach().flatten().topk(N * 4).indices, 1).view(N, D_SAE)
    z = pre * keep
    out = _check(
        sae,
        x,
        torch.zeros(D_SAE, dtype=torch.bool),
        (z @ sae.W_dec + sae.b_dec - xs).pow(2).sum(-1).mean() / sae.mse_scale,
    )
    assert out.fired.sum() == N * 4 and not torch.equal(out.fired, torch.full_like(out.fired, out.fired[0]))
    smallest = z[z > 0].min()
    sae.after_step({k: v.double() for k, v in out.extra.items()}, 4.0, 1e-3)
    assert torch.allclose(sae.threshold, smallest)
    sae.after_step({"min_kept": torch.tensor(2 * smallest.item(), dtype=torch.float64)}, 4.0, 1e-3)
    assert torch.allclose(sae.threshold, 1.5 * smallest)  # running mean while it moves faster than the EMA


def test_standard_and_april_l1_losses():
    sae, x = _sae("standard", sparsity_coeff=0.3)
    xs = x * sae.input_scale
    f = F.relu((xs - sae.b_dec) @ sae.W_enc + sae.b_enc)
    err = (f @ sae.W_dec + sae.b_dec - xs).pow(2).sum(-1)
    _check(sae, x, torch.zeros(D_SAE, dtype=torch.bool), (err + 0.7 * 0.3 * f.sum(-1)).mean())

    sae, x = _sae("april", sparsity_coeff=0.3)
    xs = x * sae.input_scale
    f = F.relu(xs @ sae.W_enc + sae.b_enc)  # April: no b_dec shift, L1 weighted by decoder norms
    err = (f @ sae.W_dec + sae.b_dec - xs).pow(2).sum(-1)
    _check(sae, x, torch.zeros(D_SAE, dtype=torch.bool), (err + 0.21 * (f * sae.W_dec.norm(dim=1)).sum(-1)).mean())


def test_gated_loss_and_its_frozen_decoder_aux_term():
    sae, x = _sae("gated", sparsity_coeff=0.3)
    xs = x * sae.input_scale
    gate = (xs - sae.b_dec) @ sae.W_enc + sae.b_gate
    mag = (xs - sae.b_dec) @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (gate > 0) * F.relu(mag)
    err = (f @ sae.W_dec + sae.b_dec - xs).pow(2).sum(-1)
    aux = (F.relu(gate) @ sae.W_dec.detach() + sae.b_dec.detach() - xs).pow(2).sum(-1)
    _check(sae, x, torch.zeros(D_SAE, dtype=torch.bool), (err + 0.21 * F.relu(gate).sum(-1) + aux).mean())


def test_jumprelu_loss_and_straight_through_threshold_gradient():
    sae, x = _sae("jumprelu", sparsity_coeff=0.3, bandwidth=0.4)
    out = sae.loss(x, torch.zeros(D_SAE, dtype=torch.bool), 0.7)
    out.loss.backward()
    xs = x * sae.input_scale
    z = ((xs - sae.b_dec) @ sae.W_enc + sae.b_enc).detach()
    theta, eps = sae.threshold.detach(), 0.4
    f = (z * (z > theta)).requires_grad_()
    err = (f @ sae.W_dec.detach() + sae.b_dec.detach() - xs).pow(2).sum(-1)
    l0 = (z > theta).float().sum(-1)
    assert torch.allclose(out.loss, (err + 0.21 * l0).mean().detach(), rtol=1e-5)
    (g,) = torch.autograd.grad(err.mean(), f)
    kernel = ((z - theta).abs() < eps / 2).float()
    d_theta = (-(theta / eps) * kernel * g).sum(0) - 0.21 * (kernel / eps).sum(0) / N
    assert kernel.sum() > 0 and torch.allclose(sae.threshold.grad, d_theta, atol=1e-5)
    # the jump's pseudo-derivative reaches z too (Anthropic 2025): d/dz = -d/dθ on top of H(z - θ)
    d_z = g * (z > theta) + (theta / eps) * kernel * g + 0.21 * kernel / eps / N
    assert torch.allclose(sae.b_enc.grad, d_z.sum(0), atol=1e-5)


def _sparse_state(arch: str):
    """A float64 SAE whose latents are sparse, as training leaves them: about 6% of the entries fire and, for
    JumpReLU, as many again lie in the kernel's band below θ (the band above θ is among the firing ones)."""
    sae, x = _sae(arch, sparsity_coeff=0.3, bandwidth=0.6)
    sae.double()
    x = x.double()
    with torch.no_grad():
        z = (x * sae.input_scale - sae.b_dec) @ sae.W_enc
        cut = z.flatten().quantile(0.94)
        if arch == "jumprelu":
            sae.b_enc.zero_()
            sae.threshold.copy_(cut + torch.rand(D_SAE, dtype=torch.float64) * 0.1)
        else:
            bias = sae.b_gate if arch == "gated" else sae.b_enc
            bias.copy_(-cut + torch.randn(D_SAE, dtype=torch.float64) * 0.1)
    return sae, x


@pytest.mark.parametrize("arch", ["standard", "gated", "jumprelu"])
def test_sparse_loss_equals_its_dense_definition(arch, monkeypatch):
    """`loss` from the selected entries alone against `dense_loss` (the definition, dense latents and autograd), in
    float64: the loss, the statistics, every parameter's gradient, through .grad and through a RowGrads collector.
    Over the density cut-off, `loss` is the dense path itself and leaves the collector empty."""
    sae, x = _sparse_state(arch)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    names, params = zip(*sae.named_parameters())
    ref = sae.dense_loss(x, dead, 0.7)
    ref_grads = torch.autograd.grad(ref.loss, params)
    assert 0.03 * N * D_SAE < ref.fired.sum() < 0.09 * N * D_SAE

    monkeypatch.setattr(sae_module, "SPARSE_MAX_DENSITY", 0.5)
    out = sae.loss(x, dead, 0.7)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12) and torch.allclose(out.sse, ref.sse, rtol=1e-12)
    assert torch.equal(out.fired, ref.fired) and torch.allclose(out.aux, ref.aux, rtol=1e-12)
    for name, g, r in zip(names, torch.autograd.grad(out.loss, params), ref_grads):
        assert r.abs().max() > 0 and torch.allclose(g, r, rtol=1e-9, atol=1e-12), (name, (g - r).abs().max())
    row_grads = sparse.RowGrads()
    sae.loss(x, dead, 0.7, row_grads).loss.backward()
    assert sae.W_enc.grad is None and sae.W_dec.grad is None and len(row_grads.W_enc) == len(row_grads.W_dec) == 1
    enc, dec = ref_grads[names.index("W_enc")], ref_grads[names.index("W_dec")]
    assert torch.allclose(row_grads.W_enc[0].full().t(), enc, rtol=1e-9, atol=1e-12)
    assert torch.allclose(row_grads.W_dec[0].full(), dec, rtol=1e-9, atol=1e-12)

    monkeypatch.setattr(sae_module, "SPARSE_MAX_DENSITY", 0.01)  # too dense now: the definition itself
    row_grads = sparse.RowGrads()
    sae.zero_grad(set_to_none=True)
    sae.loss(x, dead, 0.7, row_grads).loss.backward()
    assert not row_grads.W_enc and not row_grads.W_dec and torch.allclose(sae.W_enc.grad, enc, rtol=1e-12)


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
def test_encode_sparse_equals_dense_topk(arch):
    cfg = SAEConfig(architecture=arch, d_in=32, d_sae=96, k=4 if arch == "topk" else None)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(3, 7, 32, generator=g)
    f = sae.encode(x)
    active = int((f > 0).sum(-1).max())
    for n, width in ((6, 4 if arch == "topk" else 6), (None, 4 if arch == "topk" else active)):
        vals, ids = sae.encode_sparse(x, n)
        ref_vals, ref_ids = f.topk(width, dim=-1)
        assert vals.shape == ids.shape == (3, 7, width)
        torch.testing.assert_close(vals, ref_vals)
        live = ref_vals > 0
        assert torch.equal(ids[live], ref_ids[live])
    assert int((vals > 0).sum()) == int((f > 0).sum())  # n=None: every active latent is there


def test_target_l0_steers_the_coefficient_and_starts_jumprelu_on_target():
    sae, x = _sae("standard", target_l0=4.0, sparsity_coeff=1.0)
    sae.after_step({}, 8.0, 0.01)  # L0 twice the target: λ grows by e^(gain x lr)
    assert torch.isclose(sae.sparsity_coeff, torch.tensor(math.exp(0.01 * math.log(2.0))))
    sae.after_step({}, 0.001, 0.01)  # far below: the step is capped
    assert torch.isclose(sae.sparsity_coeff, torch.tensor(math.exp(0.01 * (math.log(2.0) - 1))))
    topk = SAETrainConfig(arch="topk", d_sae=D_SAE, target_l0=6.4).resolved(D_IN)
    assert topk.k == 6 and topk.name == "topk_k6_x4"
    torch.manual_seed(0)
    jump = training_sae(SAETrainConfig(arch="jumprelu", d_sae=D_SAE, target_l0=5.0), D_IN)
    jump.init_from_sample(x)
    with torch.no_grad():
        l0 = (jump.encode(x * jump.input_scale) != 0).float().sum(-1).mean()
    assert abs(l0 - 5.0) < 0.1 and jump.threshold.min() > 0


@pytest.mark.parametrize("arch", ["standard", "april", "topk", "batchtopk", "gated", "jumprelu"])
def test_saved_sae_reads_unscaled_activations(arch, tmp_path):
    """to_inference folds the input scale c: SAE'(x) = SAE(c x) / c and f'(x) = f(c x) / c, exactly."""
    sae, x = _sae(arch, k=5, normalize=True)
    assert abs(sae.input_scale.item() - 1) > 0.1
    if arch == "batchtopk":
        sae.threshold.fill_(0.4)
    inf = sae.to_inference(hook_name="blocks.1.resid_post", model_name="m")
    c = sae.input_scale
    with torch.no_grad():
        if arch == "batchtopk":  # saved as JumpReLU with the tracked threshold
            pre = sae.pre_acts(x * c)
            want_f = pre * (pre > 0.4)
        else:
            want_f = sae.encode(x * c)
        want = (want_f @ sae.W_dec + sae.b_dec) / c
        assert torch.allclose(inf.encode(x), want_f / c, atol=1e-5)
        assert torch.allclose(inf(x), want, atol=1e-5)
    inf.save(tmp_path)
    back = load_sae(tmp_path)
    assert back.cfg.architecture == inf.cfg.architecture and back.cfg.training["arch"] == arch
    assert back.cfg.hook_name == "blocks.1.resid_post" and torch.equal(back(x), inf(x))


def test_saelens_loads_our_folders_with_the_same_outputs(tmp_path):
    import sae_lens  # a test dependency (the test extras): without it this fails, never skips

    x = torch.randn(40, D_IN) * 3
    for arch in ("standard", "topk", "batchtopk", "gated", "jumprelu"):
        sae, _ = _sae(arch, k=5)
        ours = sae.to_inference(hook_name="blocks.2.resid_post", model_name="nanochat-d4")
        ours.save(tmp_path / arch)
        cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["metadata"]["sae_lens_version"]
        theirs = sae_lens.SAE.load_from_disk(tmp_path / arch)
        with torch.no_grad():
            assert torch.allclose(theirs.encode(x), ours.encode(x), atol=1e-5)
            assert torch.allclose(theirs(x), ours(x), atol=1e-5)


def test_we_load_saelens_folders_with_the_same_outputs(tmp_path):
    import sae_lens  # a test dependency (the test extras): without it this fails, never skips

    torch.manual_seed(1)
    x = torch.randn(40, D_IN) * 3
    made = {
        "standard": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(D_IN, D_SAE)),
        "standard_no_bdec": sae_lens.StandardSAE(sae_lens.StandardSAEConfig(D_IN, D_SAE, apply_b_dec_to_input=False)),
        "topk_rescaled": sae_lens.TopKSAE(sae_lens.TopKSAEConfig(D_IN, D_SAE, k=6, rescale_acts_by_decoder_norm=True)),
        "jumprelu": sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(D_IN, D_SAE)),
        "gated": sae_lens.GatedSAE(sae_lens.GatedSAEConfig(D_IN, D_SAE)),
        "batchtopk": sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(D_IN, D_SAE, k=6)),
    }
    for name, theirs in made.items():
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 1.0))
            if name == "jumprelu":
                theirs.threshold.uniform_(0.1, 1.0)
            if name == "batchtopk":
                theirs.topk_threshold.fill_(0.5)
        theirs.save_model(tmp_path / name)
        if name == "batchtopk":  # a training checkpoint: our loader converts it as SAELens' inference export does
            theirs = sae_lens.SAE.load_from_disk(theirs.save_inference_model(tmp_path / "bt_inference")[0].parent)
        ours = load_sae(tmp_path / name)
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-4), name
            assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-4), name


def test_we_load_sparsify_folders(tmp_path):
    """sparsify's layout (cfg.json + sae.safetensors, encoder.weight [M, d_in]) and its formula
    topk(relu((x - b_dec) W^T + b)) decoded as a sum of W_dec rows."""
    torch.manual_seed(2)
    t = {
        "encoder.weight": torch.randn(D_SAE, D_IN),
        "encoder.bias": torch.randn(D_SAE) * 0.3,
        "W_dec": torch.randn(D_SAE, D_IN),
        "b_dec": torch.randn(D_IN),
    }
    folder = tmp_path / "layers.3"
    folder.mkdir()
    save_file(t, folder / "sae.safetensors")
    cfg = {
        "activation": "topk",
        "expansion_factor": 4,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": 5,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)
    x = torch.randn(30, D_IN)
    pre = F.relu((x - t["b_dec"]) @ t["encoder.weight"].T + t["encoder.bias"])
    top = pre.topk(5, dim=-1)
    want = (top.values[..., None] * t["W_dec"][top.indices]).sum(1) + t["b_dec"]
    with torch.no_grad():
        assert sae.cfg.architecture == "topk" and sae.cfg.k == 5 and sae.cfg.hook_name == "blocks.3.resid_post"
        assert torch.allclose(sae(x), want, atol=1e-5)
    with pytest.raises(NanosaeError, match="layers.3"):
        load_sae(tmp_path)  # the run folder, not the hookpoint: the error names the subfolder to pass


def test_geometric_median_beats_the_mean_under_outliers():
    x = torch.randn(500, 4)
    x[:20] += 100.0
    m = geometric_median(x)
    dist = lambda p: (x - p).norm(dim=1).sum()  # noqa: E731
    assert m.norm() < 1.0 < x.mean(0).norm() and dist(m) < dist(x.mean(0))
    assert all(dist(m) <= dist(m + 0.01 * d) for d in torch.eye(4))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(NanosaeError, match="unknown training architecture 'relu6'"):
        SAETrainConfig(arch="relu6").resolved(16)
    with pytest.raises(NanosaeError, match="k <= d_sae"):
        SAETrainConfig(arch="topk", d_sae=32, k=33).resolved(16)
    with pytest.raises(NanosaeError, match="matryoshka"):
        SAETrainConfig(arch="topk", d_sae=64, matryoshka=(32, 16)).resolved(16)
    with pytest.raises(NanosaeError, match="k <= d_sae"):
        SAEConfig("topk", d_in=4, d_sae=8, k=9)
    with pytest.raises(NanosaeError, match="not found"):
        load_sae(tmp_path / "nowhere")
    with pytest.raises(NanosaeError, match="no cfg.json"):
        load_sae(tmp_path)
    good = SAE(SAEConfig("topk", d_in=4, d_sae=8, k=2))
    good.save(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text("{not json")
    with pytest.raises(NanosaeError, match="not valid JSON"):
        load_sae(tmp_path / "a")
    good.save(tmp_path / "b")
    (tmp_path / "b" / "sae_weights.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(NanosaeError, match="cannot read safetensors"):
        load_sae(tmp_path / "b")
    good.save(tmp_path / "c")
    (tmp_path / "c" / "sae_weights.safetensors").unlink()
    with pytest.raises(NanosaeError, match="no sae_weights.safetensors"):
        load_sae(tmp_path / "c")
    good.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    with pytest.raises(NanosaeError, match="'matching_pursuit' is not supported"):
        load_sae(tmp_path / "d")
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 5}))  # d_in does not match the weights
    with pytest.raises(NanosaeError, match="has shape"):
        load_sae(tmp_path / "d")
