"""The training loop: bitwise resume (after Ctrl-C and after a crash), NaN handling, several SAEs per stream,
schedules, dead latents, resampling, the eval hook, and the `nanosae train` command."""

import copy
import gc
import json
import os
import signal
import struct
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanosae import sae as sae_module
from nanosae import sparse
from nanosae.cli import build_parser, main
from nanosae.errors import NanosaeError
from nanosae.sae import SAETrainConfig, load_sae, training_sae
from nanosae.train import TrainConfig, Trainer, lr_factor, read_checkpoint, train

D_IN = 16
BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"


def _data(n=4096, seed=0):
    """Sparse combinations of 64 unit directions plus an offset and noise: something an SAE can learn."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(64, D_IN, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, 64, generator=g) < 0.06) * (torch.rand(n, 64, generator=g) + 0.5)
    return codes @ dirs + 0.02 * torch.randn(n, D_IN, generator=g) + 0.5


DATA = _data()
HELD_OUT = _data(1024, seed=1)


class _TensorStream:
    """An activation stream over a tensor in memory: seeded shuffled epochs (a tail short of a batch is skipped),
    continued exactly from its state()."""

    def __init__(self, data, batch_size, seed=0, state=None, site="", model_name=""):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.d_in, self.site, self.model_name, self.context_size, self.dataset = data.shape[1], site, model_name, 0, ""
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, 0)
        self._perm = None

    def state(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def __next__(self):
        n = self.data.shape[0]
        if self.pos + self.batch_size > n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        self.pos += self.batch_size
        return self.data[self._perm[self.pos - self.batch_size : self.pos]].float()


class _Faulty:
    """A stream that misbehaves at one batch: Ctrl-C, a crash or a NaN."""

    def __init__(self, inner, at, what):
        self.inner, self.at, self.what, self.n = inner, at, what, 0
        self.d_in, self.site, self.model_name, self.context_size, self.dataset = D_IN, "blocks.1.resid_post", "t", 0, ""

    def state(self):
        return self.inner.state()

    def __next__(self):
        x = next(self.inner)
        self.n += 1
        if self.n == self.at:
            if self.what == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            elif self.what == "crash":
                raise RuntimeError("power cut")
            else:
                x[3, 2] = float("nan")
        return x


def _cfg(out, **kw):
    saes = [
        SAETrainConfig(arch="topk", k=4, expansion=4),
        SAETrainConfig(arch="batchtopk", k=4, expansion=4),
        SAETrainConfig(arch="standard", expansion=4, sparsity_coeff=0.3),  # resamples at 20/40/60/80%
        SAETrainConfig(arch="jumprelu", expansion=4, sparsity_coeff=0.3),
    ]
    base = dict(saes=saes, tokens=30 * 128, batch_size=128, dead_tokens=256, log_every=5, checkpoint_every=0)
    return TrainConfig(**{**base, "out": str(out), **kw})


def _stream(wrap=None):
    def make(state):
        s = _TensorStream(DATA, 128, seed=3, state=state, site="blocks.1.resid_post", model_name="t")
        return wrap(s) if wrap else s

    return make


def _weights(out: Path, names) -> dict:
    return {n: load_file(out / n / "sae_weights.safetensors") for n in names}


def _assert_same_run(a: Path, b: Path):
    names = [p.name for p in a.iterdir() if p.is_dir()]
    assert len(names) == 4
    wa, wb = _weights(a, names), _weights(b, names)
    for n in names:
        for k in wa[n]:
            assert torch.equal(wa[n][k], wb[n][k]), (n, k)
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    for sa, sb in zip(ca["saes"], cb["saes"]):
        for k in ("since_fired", "density"):
            assert torch.equal(sa[k], sb[k])
        for p, state in sa["optimizer"]["state"].items():
            assert torch.equal(state["exp_avg_sq"], sb["optimizer"]["state"][p]["exp_avg_sq"])
    la = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    drop = ("tok_s",)
    assert [{k: v for k, v in x.items() if k not in drop} for x in la] == [
        {k: v for k, v in x.items() if k not in drop} for x in lb
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(_cfg(out), _stream(), progress=False)
    return out


def test_ctrl_c_saves_a_checkpoint_and_resume_is_bitwise_equal(uninterrupted, tmp_path, capsys):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup or in a background job
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path), _stream(lambda s: _Faulty(s, 13, "sigint")), progress=False)
    assert read_checkpoint(tmp_path)["step"] == 13 and "continue with --resume" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    train(_cfg(tmp_path), _stream(), resume=True, progress=False)
    _assert_same_run(uninterrupted, tmp_path)


def test_resume_after_a_crash_continues_from_the_last_periodic_checkpoint(uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="power cut"):
        train(_cfg(tmp_path, checkpoint_every=5), _stream(lambda s: _Faulty(s, 18, "crash")), progress=False)
    assert read_checkpoint(tmp_path)["step"] == 15
    with pytest.raises(NanosaeError, match="holds a checkpoint"):  # never overwrite a run by accident
        train(_cfg(tmp_path, checkpoint_every=5), _stream(), progress=False)
    with pytest.raises(NanosaeError, match=r"different settings \(seed\)"):  # (more tokens would extend the run)
        train(_cfg(tmp_path, checkpoint_every=5, seed=1), _stream(), resume=True, progress=False)
    train(_cfg(tmp_path, checkpoint_every=5), _stream(), resume=True, progress=False)
    _assert_same_run(uninterrupted, tmp_path)  # metrics past step 15 were dropped and logged again


def _flip_an_exponent_bit(path: Path) -> None:
    """Flip the top exponent bit of a float32 in the middle of the largest tensor record of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        rec = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, rec.header_offset + 26)  # the local file header
    at = rec.header_offset + 30 + name_len + extra_len + (rec.file_size // 2) // 4 * 4 + 3
    raw[at] ^= 0x40  # little-endian: the fourth byte holds the sign and the top exponent bits
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_refused_and_left_as_it_is(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path), _stream(lambda s: _Faulty(s, 13, "sigint")), progress=False)
    ckpt = tmp_path / "checkpoint.pt"
    _flip_an_exponent_bit(ckpt)
    damaged, metrics = ckpt.read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(NanosaeError, match=r"checkpoint.pt: damaged \(its sha256 differs") as e:
        train(_cfg(tmp_path), _stream(), resume=True, progress=False)
    assert "\n" not in str(e.value) and "restore it from a copy" in str(e.value)
    assert ckpt.read_bytes() == damaged and (tmp_path / "metrics.jsonl").read_bytes() == metrics  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256", "metrics.jsonl"]
    capsys.readouterr()
    argv = ["train", "--activations", "unused", "--resume", "--out", str(tmp_path)]
    assert main(argv) == 2 and "checkpoint.pt: damaged" in capsys.readouterr().err  # one line from the command
    (tmp_path / "checkpoint.pt.sha256").unlink()  # a checkpoint nothing vouches for is not trusted either
    with pytest.raises(NanosaeError, match="no checksum"):
        read_checkpoint(tmp_path)


def test_a_fresh_start_replaces_the_metrics_of_a_run_killed_before_its_first_checkpoint(uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="power cut"):
        train(_cfg(tmp_path), _stream(lambda s: _Faulty(s, 18, "crash")), progress=False)
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3 * 4  # steps 5, 10, 15 of four SAEs
    with pytest.raises(NanosaeError, match="no checkpoint to resume from; start without --resume"):
        train(_cfg(tmp_path), _stream(), resume=True, progress=False)
    train(_cfg(tmp_path), _stream(), progress=False)
    _assert_same_run(uninterrupted, tmp_path)  # one record: steps 5, 10, ..., 30, each once


def test_a_run_removes_temp_files_that_a_kill_left_and_nothing_else(tmp_path):
    # a real kill -9 in the middle of writing the checkpoint
    code = (
        "import os, signal, sys\n"
        "from nanosae.fileio import atomic_write\n"
        "def write(f):\n"
        "    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "checkpoint.pt")], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    (left,) = tmp_path.glob(".checkpoint.pt.*.tmp")
    live = tmp_path / f".metrics.jsonl.{os.getpid()}.abcd_123.tmp"  # a write in flight in a live process
    mine = [tmp_path / n for n in (".notes.tmp", "draft.tmp", ".plan.7.tmp", ".a.b.12.tmp")]
    for p in [live, *mine]:
        p.write_text("keep me")
    train(_cfg(tmp_path, checkpoint_every=10), _stream(), progress=False)
    assert not left.exists() and live.exists() and all(p.read_text() == "keep me" for p in mine)
    assert sorted(tmp_path.glob(".*.tmp")) == sorted([live, *(p for p in mine if p.name.startswith("."))])


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NanosaeError, match=r"step 7: the loss of topk_k4_x4 is nan.*checkpoint \(step 6\)"):
        train(_cfg(tmp_path, checkpoint_every=3), _stream(lambda s: _Faulty(s, 8, "nan")), progress=False)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt["step"] == 6 and all(torch.isfinite(s["sae"]["W_dec"]).all() for s in ckpt["saes"])


def test_resume_refuses_activations_of_another_width(uninterrupted):
    wide = _TensorStream(torch.randn(512, D_IN + 1), 128)
    with pytest.raises(NanosaeError, match="17-wide but the checkpoint's SAEs read 16"):
        train(_cfg(uninterrupted), lambda state: wide, resume=True, progress=False)


def test_several_saes_of_every_architecture_learn_from_one_stream(tmp_path):
    saes = [
        SAETrainConfig(arch="topk", k=4, expansion=4),
        SAETrainConfig(arch="topk", k=8, expansion=8),
        SAETrainConfig(arch="topk", k=4, expansion=4, matryoshka=(8, 24)),
        SAETrainConfig(arch="batchtopk", k=4, expansion=4, threshold_rate=0.1),
        SAETrainConfig(arch="standard", expansion=4, sparsity_coeff=0.1),
        SAETrainConfig(arch="april", expansion=4, sparsity_coeff=0.3),
        SAETrainConfig(arch="gated", expansion=4, sparsity_coeff=0.1),
        SAETrainConfig(arch="jumprelu", expansion=4, sparsity_coeff=0.1),
    ]
    cfg = TrainConfig(saes=saes, tokens=150 * 128, batch_size=128, out=str(tmp_path), log_every=50)
    calls = []

    def eval_fn(sae):
        calls.append(sae.cfg.architecture)
        x_hat = sae(HELD_OUT)
        return {"fvu": ((x_hat - HELD_OUT).pow(2).sum() / (HELD_OUT - HELD_OUT.mean(0)).pow(2).sum()).item()}

    train(cfg, _stream(), eval_fn=eval_fn, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final = {x["sae"]: x for x in lines if x["step"] == 150 and "eval/fvu" in x}
    assert len(final) == 8 and len(calls) == 8
    for c in saes:
        c = c.resolved(D_IN)
        sae = load_sae(tmp_path / c.name)
        want = {"batchtopk": "jumprelu", "april": "standard"}.get(c.arch, c.arch)
        assert sae.cfg.architecture == want and sae.cfg.d_sae == c.d_sae and sae.cfg.hook_name == "blocks.1.resid_post"
        with torch.no_grad():
            f = sae.encode(HELD_OUT)
            fvu = ((sae.decode(f) - HELD_OUT).pow(2).sum() / (HELD_OUT - HELD_OUT.mean(0)).pow(2).sum()).item()
        l0 = (f > 0).float().sum(-1).mean().item()
        assert abs(fvu - final[c.name]["eval/fvu"]) < 1e-5  # the eval hook saw the saved SAE
        assert fvu < 0.6, (c.name, fvu)
        assert 1 < l0 < c.d_sae / 2, (c.name, l0)
        if c.arch == "topk":
            assert c.k - 0.05 < l0 <= c.k
        if c.arch == "batchtopk":  # the saved threshold keeps about k latents per token
            assert c.k / 2 < l0 < 2 * c.k
        density = load_file(tmp_path / c.name / "sparsity.safetensors")["sparsity"]
        assert density.shape == (c.d_sae,) and density.max() <= 0


def test_schedules():
    assert lr_factor(0, 100, 10, 0.2) == pytest.approx(0.1) and lr_factor(9, 100, 10, 0.2) == 1.0
    assert lr_factor(79, 100, 10, 0.2) == 1.0 and lr_factor(80, 100, 10, 0.2) == 1.0
    assert lr_factor(90, 100, 10, 0.2) == pytest.approx(0.5) and lr_factor(99, 100, 10, 0.2) == pytest.approx(0.05)
    cfg = TrainConfig(
        saes=[SAETrainConfig(arch="standard", d_sae=64, lr=1e-3)],
        tokens=40 * 128,
        batch_size=128,
        lr_warmup_steps=4,
        sparsity_warmup_frac=0.25,
    )
    trainer = Trainer(cfg, D_IN)
    trainer.init(DATA[:128])
    seen = []
    sae = trainer.learners[0].sae
    loss = sae.loss
    sae.loss = lambda x, dead, warmup, row_grads: seen.append(warmup) or loss(x, dead, warmup, row_grads)
    for i in range(12):
        trainer.step(DATA[i * 128 : (i + 1) * 128])
        assert trainer.learners[0].opt.param_groups[0]["lr"] == pytest.approx(1e-3 * min(1, (i + 1) / 4))
    assert seen == pytest.approx([min(1, (i + 1) / 10) for i in range(12)])
    assert SAETrainConfig(d_sae=2**16).resolved(D_IN).lr == pytest.approx(1e-4)  # 2e-4 / sqrt(d_sae / 2^14)


@pytest.mark.parametrize("max_density", [0.0, 1.0])  # ReLU, Gated and JumpReLU: always dense, always sparse
def test_a_trainer_step_is_a_plain_adam_step(max_density, monkeypatch):
    """Every architecture's step is torch's Adam on the dense gradient (the decoder's projected, then the decoder
    renormalised) of its loss's dense definition (the TopK family's reference_loss, the others' dense_loss), so the
    sparse loss, its gradients and the block-by-block update from unevaluated gradients (main, AuxK and matryoshka
    terms) are all checked, and so is the dense path the others take while their latents are dense. In float64:
    Adam's first steps divide a gradient by its own size, so float32 rounding in a near-zero gradient would move a
    weight by a good part of the LR. Gradients reach the fused optimizer in their parameter's memory layout; a
    mismatch makes torch 2.13's fused CPU Adam update the wrong elements, silently."""
    saes = [
        SAETrainConfig(arch=a, d_sae=600, k=4, lr=1e-3, sparsity_coeff=0.1, name=f"{a}{len(m)}", matryoshka=m)
        for a, m in (
            ("topk", ()),
            ("topk", (100, 300)),
            ("batchtopk", ()),
            ("standard", ()),
            ("gated", ()),
            ("jumprelu", ()),
        )
    ]
    monkeypatch.setattr(sae_module, "SPARSE_MAX_DENSITY", max_density)
    made, collector = [], sparse.RowGrads
    monkeypatch.setattr(sparse, "RowGrads", lambda: made.append(g := collector()) or g)
    cfg = TrainConfig(
        saes=saes, tokens=40 * 128, batch_size=128, lr_warmup_steps=0, sparsity_warmup_frac=0, dead_tokens=128
    )
    trainer = Trainer(cfg, D_IN)
    data = DATA.double()
    for learner in trainer.learners:
        learner.sae.double()  # in place: the optimizer keeps its parameters
    trainer.init(data[:128])
    refs = [copy.deepcopy(learner.sae) for learner in trainer.learners]
    opts = [torch.optim.Adam(r.parameters(), lr=1e-3, betas=(r.cfg.beta1, 0.999), foreach=False) for r in refs]
    assert trainer.learners[0].sae.W_enc.stride() == (1, D_IN)  # stored transposed on purpose
    for i in range(3):
        x = data[i * 128 : (i + 1) * 128]
        for learner, ref, opt in zip(trainer.learners, refs, opts):
            if ref.cfg.arch in ("topk", "batchtopk"):
                ref.reference_loss(x, learner.dead).backward()
            else:
                ref.dense_loss(x, learner.dead, 1.0).loss.backward()
            ref.project_grads()
            opt.step()
            opt.zero_grad()
            ref.normalize_decoder()
        trainer.step(x)
    # the sparse path ran where it should: its backward filled the step's RowGrads (the dense gradient never existed)
    filled = [bool(g.W_enc) and bool(g.W_dec) for g in made[-len(saes) :]]
    assert len(made) == 3 * len(saes) and filled == [True] * 3 + [max_density == 1] * 3
    assert trainer.learners[0].flush()["aux"] > 0  # AuxK ran (latents go dead after one batch here)
    for learner, ref in zip(trainer.learners, refs):
        for p, q in zip(learner.sae.parameters(), ref.parameters()):
            assert torch.allclose(p, q, atol=1e-10), (learner.sae.cfg.name, (p - q).abs().max())


def test_a_sparse_step_leaves_nothing_behind(monkeypatch):
    """The step's RowGrads (and the graph and batch-sized tensors around it) die with the step: a gradient that still
    carried the forward's graph once tied each step's graph into a cycle through autograd that gc cannot see."""
    made, collector = [], sparse.RowGrads
    monkeypatch.setattr(sparse, "RowGrads", lambda: made.append(weakref.ref(g := collector())) or g)
    cfg = TrainConfig(saes=[SAETrainConfig(arch="topk", k=4, d_sae=64)], tokens=40 * 128, batch_size=128)
    trainer = Trainer(cfg, D_IN)
    trainer.init(DATA[:128])
    for i in range(3):
        trainer.step(DATA[i * 128 : (i + 1) * 128])
    gc.collect()
    assert len(made) == 3 and all(ref() is None for ref in made)


def test_dead_latents_are_counted_and_feed_auxk():
    cfg = TrainConfig(
        saes=[SAETrainConfig(arch="topk", k=4, d_sae=64)], tokens=40 * 128, batch_size=128, dead_tokens=512
    )
    trainer = Trainer(cfg, D_IN)
    trainer.init(DATA[:128])
    learner = trainer.learners[0]
    with torch.no_grad():
        learner.sae.b_enc[:8] = -1e4  # these can never fire
    for i in range(6):
        trainer.step(DATA[i * 128 : (i + 1) * 128])
        learner.sae.b_enc.data[:8] = -1e4
    m = learner.flush()
    assert learner.dead[:8].all() and m["dead_frac"] >= 8 / 64 and m["aux"] > 0  # dead after 512 tokens: AuxK on


def test_aux_rare_hands_rarely_firing_latents_to_auxk():
    saes = [
        SAETrainConfig(arch="batchtopk", k=4, d_sae=64, aux_rare=0.5, name="rare"),
        SAETrainConfig(arch="batchtopk", k=4, d_sae=64),
    ]
    cfg = TrainConfig(saes=saes, tokens=40 * 128, batch_size=128, dead_tokens=10**7)
    trainer = Trainer(cfg, D_IN)
    trainer.init(DATA[:128])
    for i in range(6):
        trainer.step(DATA[i * 128 : (i + 1) * 128])
    rare, plain = trainer.learners
    want = rare.recent < 0.5 * rare.recent.mean()  # the firing rate over about dead_tokens
    assert not rare.dead.any() and want.any() and torch.equal(rare.aux_latents, want)
    assert rare.flush()["aux"] > 0 and plain.flush()["aux"] == 0  # AuxK ran on them; without aux_rare it did not


def test_checkpoints_that_call_lambda_coeff_still_load():
    """Checkpoints written before λ's buffer was named sparsity_coeff hold it as "coeff"."""
    cfg = TrainConfig(saes=[SAETrainConfig(arch="jumprelu", d_sae=64, target_l0=2)], tokens=40 * 128, batch_size=128)
    trainer = Trainer(cfg, D_IN)
    trainer.init(DATA[:128])
    for i in range(3):
        trainer.step(DATA[i * 128 : (i + 1) * 128])
    state = trainer.state_dict()
    state["saes"][0]["sae"]["coeff"] = state["saes"][0]["sae"].pop("sparsity_coeff")
    again = Trainer(cfg, D_IN)
    again.load_state_dict(state)
    moved = trainer.learners[0].sae.sparsity_coeff
    assert moved != 1.0 and torch.equal(again.learners[0].sae.sparsity_coeff, moved)


def test_resampling_reinitialises_dead_latents_and_their_adam_state():
    torch.manual_seed(0)
    sae = training_sae(SAETrainConfig(arch="standard", d_sae=64), D_IN)
    sae.init_from_sample(DATA[:256])
    opt = torch.optim.Adam(sae.parameters())
    sae.loss(DATA[:256], torch.zeros(64, dtype=torch.bool), 1.0).loss.backward()
    opt.step()
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[3, 9, 40]] = True
    alive_norm = sae.W_enc[:, ~dead].norm(dim=0).mean()
    assert sae.resample(dead, DATA[:256], opt) == 3
    xs = DATA[:256] * sae.input_scale
    units = xs / xs.norm(dim=1, keepdim=True)
    for i in (3, 9, 40):
        assert torch.allclose(sae.W_dec[i].norm(), torch.tensor(1.0))
        assert (units - sae.W_dec[i]).norm(dim=1).min() < 1e-5  # a (normalised) input
        assert torch.allclose(sae.W_enc[:, i], sae.W_dec[i] * 0.2 * alive_norm) and sae.b_enc[i] == 0
        assert (
            opt.state[sae.W_dec]["exp_avg"][i].abs().sum() == 0 and opt.state[sae.W_enc]["exp_avg_sq"][:, i].sum() == 0
        )
    assert opt.state[sae.W_dec]["exp_avg"][0].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# the command


def test_cli_flags_mirror_the_configs():
    args = build_parser().parse_args(["train", "--out", "x"])
    dests = set(vars(args))
    renamed = {"model_step": "step", "saes": "arch", "sites": "layers", "kind": "arch", "targets": "target"}
    for cls, skip in ((SAETrainConfig, {"name"}), (TrainConfig, set())):
        for f in cls.__dataclass_fields__:
            if f not in skip:
                assert renamed.get(f, f) in dests, f"--{f.replace('_', '-')} is missing"


def test_cli_trains_from_the_model_and_from_a_cache(tmp_path, capsys, d4):
    from nanosae.activations import collect

    common = "--tokens 8192 --batch-size 512 --seed 1 --log-every 4 --expansion 2"
    m = tmp_path / "m"
    cmd = f"train --model {BASE_DIR} --layer 1 --seq-len 64 --k 8,16 --eval-every 16 --out {m} {common}"
    assert main(cmd.split()) == 0
    out = capsys.readouterr().out
    assert "trained 2 SAE(s) on 8,192 tokens" in out and "topk_k16_x2" in out
    sae = load_sae(m / "topk_k8_x2")
    got = (sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.context_size)
    assert got == ("nanochat-d4", "blocks.1.resid_post", 128, 64) and sae.cfg.training["run"]["model"] == str(BASE_DIR)
    evals = [json.loads(x) for x in (m / "metrics.jsonl").read_text().splitlines() if "eval/l0" in x]
    assert len(evals) == 2 and all(0 < e["eval/ce_loss_score"] <= 1.05 and e["eval/l0"] > 4 for e in evals)

    model, tok, _ = d4
    collect(model, tok, tmp_path / "cache", "blocks.2.resid_post", 8192, seq_len=64, progress=False)
    c = tmp_path / "c"
    assert main(f"train --activations {tmp_path / 'cache'} --arch batchtopk --k 8 --out {c} {common}".split()) == 0
    sae = load_sae(c)  # one SAE: the run folder is the SAE folder
    assert (sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.model_name) == (
        "jumprelu",
        "blocks.2.resid_post",
        "nanochat-d4",
    )
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(c)]) == 0  # finished: resuming only re-saves
    assert torch.equal(load_sae(c).W_enc, sae.W_enc)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arch", "relu9"], "unknown training architecture 'relu9'"),
        (["--k", "200", "--expansion", "1"], "k <= d_sae"),
        (["--activations", "somewhere"], "drop --model/--layer"),
        (["--layer", "9"], "layers 0..3"),
        (["--tokens", "100"], "less than one batch"),
        (["--resume"], "no checkpoint to resume from"),
    ],
)
def test_cli_bad_inputs_exit_2_with_a_one_line_message(argv, message, tmp_path, capsys):
    base = ["train", "--model", str(BASE_DIR), "--layer", "1", "--tokens", "8192", "--out", str(tmp_path / "o")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("nanosae: error:")
