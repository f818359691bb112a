"""Crosscoder model diffing: the crosscoder's math, planted truth (exclusive and shared atoms, and planted
artefacts that Latent Scaling must flag), and `nanosae diff` end to end on tiny models made here."""

import contextlib
import io
import json
import re
import signal

import numpy as np
import pytest
import torch

from nanosae import activations, lm_train, load_model
from nanosae.cli import main as cli_main
from nanosae.diff import (
    PlantedPair,
    _fires_on,
    _paired_batches,
    artefacts,
    classify,
    latent_scaling,
    match_planted,
    planted_artefacts,
    redirected,
    train_planted,
)
from nanosae.errors import NanosaeError
from nanosae.hooks import run_with_cache
from nanosae.lm_train import SFTConfig, TinyConfig
from nanosae.sae import SAETrainConfig, crosscoder_norms, crosscoder_side, load_crosscoder, load_sae, training_sae


def run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return rc, out.getvalue() + err.getvalue()


# --- the math -----------------------------------------------------------------------------------------------


def test_batchtopk_crosscoder_keeps_the_largest_norm_weighted_latents():
    torch.manual_seed(0)
    sae = training_sae(SAETrainConfig(arch="crosscoder", d_sae=64, k=4), 16)
    with torch.no_grad():  # make the decoder norms unequal so that the weighting matters
        sae.W_dec.mul_(torch.rand(64, 1) * 2 + 0.1)
        sae.W_dec[:, :8].mul_(torch.rand(64, 1))
    x = torch.randn(32, 16)
    sae.init_from_sample(x)
    dead = torch.zeros(64, dtype=torch.bool)
    out = sae.loss(x, dead, 1.0)
    # dense definition: f = relu(pre), keep the B*k largest f_i (|d_i^A| + |d_i^B|), reconstruct both halves
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    weight = crosscoder_norms(sae.W_dec).sum(1)
    score = (pre * weight).flatten()
    keep = torch.zeros_like(score).scatter_(0, score.topk(4 * 32).indices, 1).view_as(pre)
    f = pre * keep
    mse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum() / (len(x) * sae.mse_scale)
    torch.testing.assert_close(out.loss, mse, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.fired, (f > 0).sum(0).to(out.fired))
    plain = torch.zeros(pre.numel()).scatter_(0, pre.flatten().topk(4 * 32).indices, 1).view_as(pre)
    assert not torch.equal(keep, plain)  # the weighting changed the choice
    # the inference threshold is per latent: θ / (|d_i^A| + |d_i^B|)
    sae.after_step(out.extra, 4.0, 1e-3)
    inf = sae.to_inference()
    assert inf.cfg.architecture == "jumprelu"
    torch.testing.assert_close(inf.threshold, sae.threshold / weight.detach())


def test_l1_crosscoder_penalises_the_summed_decoder_norms():
    torch.manual_seed(0)
    sae = training_sae(SAETrainConfig(arch="crosscoder_l1", d_sae=32), 8)
    f = torch.rand(5, 32)
    W = sae.W_dec
    expected = f @ (W[:, :4].norm(dim=1) + W[:, 4:].norm(dim=1))
    torch.testing.assert_close(sae.penalty(f), expected)
    assert not torch.allclose(expected, f @ W.norm(dim=1))  # not the norm of the concatenated row
    with pytest.raises(NanosaeError, match="odd"):
        training_sae(SAETrainConfig(arch="crosscoder", d_sae=32, k=2), 7)


def test_each_side_is_the_crosscoder_fed_one_models_activations_twice():
    torch.manual_seed(0)
    cc = training_sae(SAETrainConfig(arch="crosscoder", d_sae=48, k=3), 12).to_inference()
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        cc.threshold.abs_()
    x = torch.randn(20, 6)
    for side in range(2):
        sae = crosscoder_side(cc, side, model_name="m")
        f = cc.encode(torch.cat([x, x], 1))
        torch.testing.assert_close(sae.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(f), cc.decode(f)[:, side * 6 : (side + 1) * 6])
        assert sae.cfg.d_in == 6 and sae.cfg.model_name == "m"


def test_latent_scaling_is_its_definition_and_keeps_each_latents_top_rows():
    torch.manual_seed(0)
    cc = training_sae(SAETrainConfig(arch="crosscoder", d_sae=40, k=4), 16).to_inference()
    with torch.no_grad():
        cc.W_dec.mul_(torch.rand(40, 1) + 0.5)
        cc.threshold.fill_(0.3)
        cc.threshold[:4] = 1e6  # never fire
    batches = [torch.randn(n, 16) for n in (50, 7, 64)]
    got = latent_scaling(cc, batches, top=3)
    # the definition, dense and in float64: β = Σ_t f_j <v_j, y_t> / (|v_j|^2 Σ_t f_j^2), y = â^m or a^m - â^m + f_j d_j^m
    x = torch.cat(batches).double()
    with torch.no_grad():
        f = cc.encode(x.float()).double()
    W = cc.W_dec.detach().double()
    D = W.view(40, 2, 8)
    V = D[torch.arange(40), crosscoder_norms(W).argmax(1)]
    recon = f @ W + cc.b_dec.detach().double()
    f2 = (f * f).sum(0)
    for m in range(2):
        rec, a = recon[:, 8 * m : 8 * (m + 1)], x[:, 8 * m : 8 * (m + 1)]
        beta_r = (f * (rec @ V.t())).sum(0) / (V.pow(2).sum(1) * f2)
        beta_e = ((f * ((a - rec) @ V.t())).sum(0) + f2 * (D[:, m] * V).sum(1)) / (V.pow(2).sum(1) * f2)
        fired = f2 > 0
        torch.testing.assert_close(torch.from_numpy(got["beta"][m, 0])[fired], beta_r[fired], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got["beta"][m, 1])[fired], beta_e[fired], rtol=1e-4, atol=1e-5)
    assert fired.sum() > 20 and not fired[:4].any()
    assert (got["top_rows"][:4] == -1).all()
    vals, rows = f.topk(3, dim=0)
    assert (got["top_rows"] == rows.where(vals > 0, -1).t().numpy()).all()  # rows across batches, in order
    torch.testing.assert_close(torch.from_numpy(got["top_values"]).double(), vals.t(), rtol=1e-5, atol=1e-6)


# --- planted truth ------------------------------------------------------------------------------------------


def test_planted_exclusive_and_shared_atoms_and_artefacts():
    planted = PlantedPair()
    cc = train_planted(planted, "crosscoder", 300)
    groups = classify(cc)
    latent, cos = match_planted(cc, planted)
    truth = planted.truth()
    correct = (cos > 0.9) & (groups[latent] == truth)
    for kind in (0, 1, 2):  # A-only, shared, B-only each
        assert correct[truth == kind].mean() >= 0.75, (kind, correct[truth == kind])
    assert correct.mean() >= 0.9, correct.mean()

    g = torch.Generator().manual_seed(7)
    held_out = [planted.sample(4096, g) for _ in range(3)]
    scaling = latent_scaling(cc, held_out)
    flagged = artefacts(groups, scaling)
    exclusive = latent[correct & (truth != 1)]
    assert flagged[exclusive].mean() <= 0.1  # true exclusives keep their verdict

    shared = latent[correct & (truth == 1)]
    shrink, split = int(shared[0]), int(shared[1])
    bad = planted_artefacts(cc, shrink, split)
    bad_groups = classify(bad)
    assert bad_groups[shrink] == 2 and bad_groups[split] == 0 and bad_groups[-1] == 2  # by norm they look exclusive
    bad_scaling = latent_scaling(bad, held_out)
    bad_flagged = artefacts(bad_groups, bad_scaling)
    assert bad_flagged[shrink] and bad_flagged[split] and bad_flagged[-1]
    assert bad_scaling["nu_eps"][shrink] > 0.8  # A's error holds the direction its decoder lost
    assert bad_scaling["nu_r"][split] > 0.8  # B's reconstruction holds it through the twin
    assert bad_flagged[exclusive].mean() <= 0.1


def test_latent_scaling_finds_shared_atoms_whose_direction_changed():
    planted = PlantedPair(shared=32, a_only=4, b_only=4, redirected=8)
    cc = train_planted(planted, "crosscoder", 300)
    groups = classify(cc)
    latent, cos = match_planted(cc, planted)
    truth = planted.truth()
    g = torch.Generator().manual_seed(7)
    scaling = latent_scaling(cc, [planted.sample(4096, g) for _ in range(3)])
    turned = redirected(groups, scaling)
    found = cos > 0.9
    is_turned, is_shared = (truth == 4) & found, (truth == 1) & found
    assert is_turned.sum() >= 6 and is_shared.sum() >= 28
    assert (groups[latent[is_turned]] == 1).all()  # by decoder norm they are shared
    assert turned[latent[is_turned]].mean() >= 0.8 and turned[latent[is_shared]].mean() <= 0.1
    assert not turned[groups != 1].any()


# --- nanosae diff ---------------------------------------------------------------------------------------------

TINY = dict(
    vocab_size=300,
    n_layer=2,
    n_embd=32,
    head_dim=16,
    seq_len=128,
    batch_size=8,
    steps=20,
    save_every=0,
    eval_every=20,
    eval_tokens=1024,
    tokenizer_chars=50_000,
    compute="float32",
)
DIFF = ["--tokens", "6144", "--batch-size", "512", "--expansion", "2", "--k", "4", "--eval-tokens", "2048",
        "--viz-tokens", "2048"]  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    base = lm_train.ensure_tiny_model(TinyConfig(**TINY), out=tmp_path_factory.mktemp("tiny") / "base")
    lm_train.ensure_chat_model(base, SFTConfig(steps=10, eval_every=10, compute="float32"))
    return base


def test_diff_end_to_end_resumes_and_reuses(pair, tmp_path, monkeypatch):
    out = tmp_path / "diff"
    argv = ["diff", "--model", str(pair), "--phase", "base", "--phase", "sft", "--out", str(out), *DIFF]
    real = activations.paired_model_stream
    served = []

    class Interrupting:  # Ctrl-C after 5 batches: the trainer checkpoints and stops
        def __init__(self, stream):
            self.stream = stream
            self.d_in, self.site, self.model_name = stream.d_in, stream.site, stream.model_name
            self.context_size, self.dataset = stream.context_size, stream.dataset

        def state(self):
            return self.stream.state()

        def __next__(self):
            served.append(1)
            if len(served) == 5:
                signal.raise_signal(signal.SIGINT)
            return next(self.stream)

    monkeypatch.setattr(activations, "paired_model_stream", lambda *a, **k: Interrupting(real(*a, **k)))
    rc, text = run_cli(argv)
    assert rc == 130 and "run the same command again to continue" in text and "--resume" not in text
    monkeypatch.setattr(activations, "paired_model_stream", real)
    rc, text = run_cli(argv)
    assert rc == 0, text
    assert "resuming the crosscoder" in text and "from step 5" in text
    assert "chat-only" in text and "base-only" in text

    result = json.loads((out / "diff.json").read_text())
    assert result["labels"] == ["base", "chat"]
    rows = result["latents"]
    assert len(rows) == result["d_sae"] == 2 * 2 * 32
    assert sum(result["counts"].values()) == len(rows)
    for r in rows:  # the group follows the relative norm with the default ratio 0.2 (r < 1/6: A-only, > 5/6: B-only)
        assert r["group"] == ("a_only" if r["relative_norm"] < 1 / 6 else "b_only" if r["relative_norm"] > 5 / 6
                              else "shared") or abs(r["relative_norm"] - 1 / 6) < 1e-3 or abs(r["relative_norm"] - 5 / 6) < 1e-3  # fmt: skip
    for r in rows:  # redirected: shared, fired, both Latent Scaling ratios below 0.2 (the rows round them)
        low = abs(r["nu_r"]) < 0.2 and abs(r["nu_eps"]) < 0.2
        assert r["redirected"] == (r["group"] == "shared" and r["density"] > 0 and low) or min(
            abs(abs(r["nu_r"]) - 0.2), abs(abs(r["nu_eps"]) - 0.2)) < 1e-3  # fmt: skip
    turned = result["examples"]["redirected"]
    assert [r["density"] for r in turned] == sorted((r["density"] for r in turned), reverse=True)
    assert len(turned) == min(8, sum(r["redirected"] for r in rows)) and all(r["redirected"] for r in turned)
    assert sum(result["redirected"].values()) == sum(r["redirected"] for r in rows) and "redirected" in text
    fired = [r for r in rows if r["density"] > 0]
    assert fired and all(r["top_tokens"] and r["context"][1] for r in fired)
    assert (out / "relative_norms.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "dashboard" / "index.html").read_text()
    assert "a/index.html#/f/0" in page and "b/index.html#/f/0" in page and "chat-only" in page
    assert (out / "dashboard" / "a" / "index.html").is_file() and (out / "dashboard" / "b" / "index.html").is_file()

    # each side is an ordinary SAE for its model; the crosscoder itself only loads as a crosscoder
    cc = load_crosscoder(out / "crosscoder")
    assert cc.cfg.d_in == 64 and cc.cfg.training["crosscoder_models"]
    with pytest.raises(NanosaeError, match=r"crosscoder over two models; pass one side: .*/a .*/b"):
        load_sae(out / "crosscoder")
    side_b = load_sae(out / "crosscoder" / "b")
    assert side_b.cfg.d_in == 32 and side_b.cfg.hook_name == "blocks.1.resid_post"
    torch.testing.assert_close(side_b.W_dec, cc.W_dec[:, 32:])
    rc, text = run_cli(["eval", "--sae", str(out / "crosscoder" / "b"), "--model", str(pair), "--phase", "sft",
                        "--tokens", "2048"])  # fmt: skip
    assert rc == 0, text

    rc, text = run_cli(argv)  # everything done: reused
    assert rc == 0 and "reusing the crosscoder" in text
    rc, text = run_cli([*argv, "--passes", "2"])  # but not for other settings, the stream's included
    assert rc == 2 and "other settings (passes)" in text and "--force" in text


def test_paired_stream_states_the_memory_of_its_doubled_rows(pair):
    (ma, tok, _), (mb, _, _) = (load_model(pair, phase=p) for p in ("base", "sft"))
    stream = activations.paired_model_stream(ma, mb, tok, "blocks.1.resid_post", None, 64, buffer_tokens=1024)
    block = stream._load((0,))  # one shuffle block: 8 rows of 128 tokens, BOS dropped, each row [a^A ; a^B]
    assert block.shape[1] == 64
    held = block.numel() * block.element_size()
    assert 0.95 * stream.buffer_bytes <= held <= stream.buffer_bytes  # what --max-memory counts is what is held


def test_passes_serve_each_paired_fill_several_times_reshuffled_and_resume(pair):
    (ma, tok, _), (mb, _, _) = (load_model(pair, phase=p) for p in ("base", "sft"))

    def stream(passes, state=None):
        s = activations.paired_model_stream(
            ma, mb, tok, "blocks.1.resid_post", None, 64, passes=passes, state=state, buffer_tokens=1024, seed=3
        )
        forwards = []
        real = s._acts
        s._acts = lambda ids: forwards.append(1) or real(ids)  # one call runs both models on one token batch
        return s, forwards

    def rows(s, count):  # the stream's next `count` rows, whatever its batch size
        return torch.cat(s._consume(count, keep=True))

    n = len(stream(1)[0]._load((0,)))  # a fill: 1024 tokens, 8 rows of 128, BOS dropped
    one, one_forwards = stream(1)
    fill0 = rows(one, n)
    three, forwards = stream(3)
    first = rows(three, 3 * n)
    assert len(forwards) == len(one_forwards) == 1  # three passes over fill 0 ran its forward once
    for p in range(3):  # each pass is fill 0 again, in an order of its own
        part = first[p * n : (p + 1) * n]
        assert torch.equal(part.sort(0).values, fill0.sort(0).values)
        assert not torch.equal(part, first[((p + 1) % 3) * n : ((p + 1) % 3 + 1) * n])
    assert three._bid == (3,) and torch.equal(three._load((3,)), one._load((1,))) and len(forwards) == 2  # fill 1

    # a resumed stream (nothing held) continues exactly, mid-pass
    s, _ = stream(3)
    rows(s, n + 100)
    state, rest = s.state(), rows(s, n)
    assert torch.equal(rows(stream(3, state)[0], n), rest)
    with pytest.raises(NanosaeError, match="passes must be at least 1"):
        stream(0)


def test_held_out_contexts_point_at_the_tokens_of_the_activations(pair):
    (ma, tok, _), (mb, _, _) = (load_model(pair, phase=p) for p in ("base", "sft"))
    site = "blocks.1.resid_post"
    tokens = []
    x = torch.cat(list(_paired_batches(ma, mb, tok, site, "builtin+chat", 1500, tokens, rows=4)))
    assert len(x) == 1500
    ids, where = torch.cat([t for t, _ in tokens]), torch.cat([w for _, w in tokens])
    assert len(where) == 1500 and (ids[where] != tok.bos_token_id).all()
    user = tok.encode_special("<|user_start|>")
    r = int((ids[where] == user).nonzero()[0])  # an activation row on a chat token
    row, col = divmod(int(where[r]), 128)
    for m, half in ((ma, x[r, :32]), (mb, x[r, 32:])):
        _, acts = run_with_cache(m, ids[row * 128 : (row + 1) * 128][None], [site])
        torch.testing.assert_close(acts[site][0, col].float(), half)
    fires = _fires_on(tok, tokens, {"top_rows": np.array([[r, r, -1], [-1, -1, -1]])}, 128)
    before, token, after = fires[0]["context"]
    assert token == "<|user_start|>" and fires[0]["top_tokens"] == ["<|user_start|>"]
    assert tok.decode(ids[row * 128 + 1 : row * 128 + col].tolist()).endswith(before)  # its row, after the BOS
    assert fires[1] == {"top_tokens": [], "context": ("", "", "")}


def test_diff_bad_requests(pair, tmp_path):
    wide = lm_train.ensure_tiny_model(TinyConfig(**{**TINY, "n_embd": 64, "steps": 2}), out=tmp_path / "wide")
    other_tok = lm_train.ensure_tiny_model(TinyConfig(**{**TINY, "vocab_size": 280, "steps": 2}), out=tmp_path / "tk")
    cases = [
        (["--model", str(pair), "--model", str(wide)], "32 wide at blocks.1.resid_post but .* is 64"),
        (["--model", str(pair), "--model", str(other_tok)], "different tokenizers"),
        (["--model", str(pair)], "give --model twice, or one base dir with --phase twice"),
        (["--model", str(pair), "--model", str(pair)], "the same checkpoint"),
        (["--model", str(pair), "--step", "20", "--step", "5"], r"no model_000005.pt \(steps present: 20\)"),
        (["--model", str(pair), "--phase", "base", "--phase", "sft", "--layer", "7"], "layer"),
        (["--model", str(tmp_path / "nope"), "--phase", "base", "--phase", "sft"], "nope"),
        (["--model", str(pair), "--phase", "base", "--phase", "sft", "--passes", "0"], "--passes must be at least 1"),
    ]
    for args, message in cases:
        rc, text = run_cli(["diff", *args, "--out", str(tmp_path / "d"), *DIFF])
        assert rc == 2, (args, text)
        line = text.strip().splitlines()[-1]  # after the stage headers on stdout, one line on stderr
        assert line.startswith("nanosae: error:") and "Traceback" not in text
        assert re.search(message, line), (message, line)
    rc, text = run_cli(["train", "--model", str(pair), "--layer", "1", "--arch", "crosscoder", "--out",
                        str(tmp_path / "t")])  # fmt: skip
    assert rc == 2 and "nanosae diff --arch crosscoder" in text
