import json
import math
import os
import pickle
from pathlib import Path

import pytest
import tiktoken
import torch

from nanosae import lm_train, load_model
from nanosae.cli import main as cli_main
from nanosae.errors import NanosaeError
from nanosae.generate import generate
from nanosae.lm_train import TinyConfig
from nanosae.tokenizer import SPECIAL_TOKENS, Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"
# seconds on 2 cores: 4 layers like the real default (so nanochat's d4 fixture has the same key names)
TINY = dict(
    vocab_size=384,
    n_layer=4,
    n_embd=64,
    head_dim=16,
    seq_len=64,
    batch_size=8,
    steps=120,
    eval_every=40,
    eval_tokens=4096,
    tokenizer_chars=400_000,
    compute="float32",
)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("nanosae_home")


@pytest.fixture(autouse=True)
def _home_env(home, monkeypatch):
    monkeypatch.setenv("NANOSAE_HOME", str(home))


@pytest.fixture(scope="module")
def trained(home):
    """The tiny model trained once through the CLI; (base dir, printed output)."""
    import contextlib
    import io

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOSAE_HOME", str(home))
        buf = io.StringIO()
        argv = ["train-lm"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
        with contextlib.redirect_stdout(buf):
            assert cli_main(argv) == 0
    base = home / "tiny" / lm_train.config_hash(TinyConfig(**TINY))
    return base, buf.getvalue()


def test_writes_nanochat_layout(trained):
    base, out = trained
    step = TINY["steps"]
    ckpt = base / "base_checkpoints" / "d4"
    # the final checkpoint and, by default, one every 100 steps before it
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "meta_000100.json",
        f"meta_{step:06d}.json",
        "model_000100.pt",
        f"model_{step:06d}.pt",
    ]
    assert sorted(p.name for p in (base / "tokenizer").iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    assert not list(base.parent.glob(".*tmp*"))  # the temp build folder was renamed into place
    # same keys, shapes (up to width) and key order as the checkpoint nanochat's own base_train wrote
    ours = torch.load(ckpt / f"model_{step:06d}.pt", weights_only=True)
    theirs = torch.load(FIXTURE / "base_checkpoints" / "d4" / "model_000400.pt", weights_only=True)
    assert list(ours) == list(theirs)
    assert all(ours[k].ndim == theirs[k].ndim and ours[k].dtype == torch.float32 for k in ours)
    assert ours["transformer.wte.weight"].shape == (384, 64)  # 384 is a multiple of 64: no padding rows
    assert "samples from" in out and "val bpb" in out


def test_meta_has_nanochat_keys(trained):
    base, _ = trained
    meta = json.loads((base / "base_checkpoints" / "d4" / f"meta_{TINY['steps']:06d}.json").read_text())
    ref = json.loads((FIXTURE / "base_checkpoints" / "d4" / "meta_000400.json").read_text())
    assert set(meta) == set(ref)
    for key in ("model_config", "dataloader_state_dict", "loop_state"):
        assert set(meta[key]) == set(ref[key]), key
    assert meta["step"] == TINY["steps"]
    assert meta["model_config"] == {
        "sequence_len": 64,
        "vocab_size": 384,
        "n_layer": 4,
        "n_head": 4,
        "n_kv_head": 4,
        "n_embd": 64,
        "window_pattern": "L",
    }
    assert meta["max_seq_len"] == 64 and meta["device_batch_size"] == 8 and meta["total_batch_size"] == 8 * 64
    assert meta["user_config"]["steps"] == TINY["steps"]
    assert math.isfinite(meta["val_bpb"]) and meta["loop_state"]["min_val_bpb"] <= meta["val_bpb"]


def test_load_round_trip_reproduces_training_val_loss(trained):
    """The saved checkpoint, loaded back, scores the val rows exactly as the model did at the end of training."""
    base, _ = trained
    model, tok, meta = load_model(base)
    assert model.info.name == "nanochat-d4" and model.info.step == TINY["steps"]
    summary = json.loads((base / lm_train.MARKER).read_text())
    cfg = TinyConfig(**TINY)
    _, val = lm_train.load_rows(tok, cfg)
    loss, bpb = lm_train.evaluate(model, val[:, :-1], val[:, 1:], tok.token_byte_lengths(), cfg.batch_size)
    assert loss == pytest.approx(summary["val_loss"], abs=1e-5)
    assert bpb == pytest.approx(meta["val_bpb"], abs=1e-5)


def test_tokenizer_round_trips_and_is_a_plain_tiktoken_pickle(trained):
    base, _ = trained
    tok = Tokenizer.from_dir(base / "tokenizer")
    assert tok.vocab_size == 384
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(384 - 9, 384))
    for text in ["def f(x):\n    return x ** 2\n", "The quick brown fox. Ünïcödé ✓ 12345", "<|bos|> stays text"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.bos_token_id not in ids
    with open(base / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)  # what nanochat does: an ordinary unpickle gives a tiktoken Encoding
    assert isinstance(enc, tiktoken.Encoding) and enc.name == "rustbpe"
    token_bytes = torch.load(base / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (384,)
    assert token_bytes[-9:].tolist() == [0] * 9 and token_bytes[:256].tolist() == [1] * 256


def test_training_learned(trained):
    base, _ = trained
    summary = json.loads((base / lm_train.MARKER).read_text())
    hist = summary["history"]
    assert [h["step"] for h in hist] == [40, 80, 100, 120]  # every eval_every steps and at each checkpoint
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.3
    assert summary["train_loss"] < math.log(384) - 1.5  # far below the uniform guess
    assert summary["val_bpb"] < 3.0


def test_generation_runs_past_seq_len(trained):
    base, _ = trained
    model, tok, _ = load_model(base)
    ids = generate(model, tok.encode("def ", prepend=tok.bos_token_id), 3 * TINY["seq_len"])
    assert len(ids) == 3 * TINY["seq_len"]


def test_cache_is_reused(trained, capsys):
    base, _ = trained
    model_file = next((base / "base_checkpoints" / "d4").glob("model_*.pt"))
    before = model_file.stat().st_mtime_ns
    assert lm_train.ensure_tiny_model(TinyConfig(**TINY)) == base
    assert "reusing" in capsys.readouterr().out
    assert model_file.stat().st_mtime_ns == before


def test_config_hash_covers_config_and_data(tmp_path):
    a = lm_train.config_hash(TinyConfig(**TINY))
    assert lm_train.config_hash(TinyConfig(**{**TINY, "steps": 121})) != a
    assert lm_train.config_hash(TinyConfig(**TINY, data="builtin")) == a
    (tmp_path / "t.txt").write_text("some text")
    assert lm_train.config_hash(TinyConfig(**TINY, data=str(tmp_path))) != a
    relative = os.path.relpath(tmp_path)
    assert lm_train.config_hash(TinyConfig(**TINY, data=relative)) == lm_train.config_hash(
        TinyConfig(**TINY, data=str(tmp_path))
    )


def test_killed_run_leaves_nothing_that_looks_complete(home, monkeypatch):
    cfg = TinyConfig(**{**TINY, "steps": 5, "seed": 7})
    target = home / "tiny" / lm_train.config_hash(cfg)
    real_fit = lm_train.fit

    def dying_fit(*args, **kwargs):
        raise KeyboardInterrupt  # killed after the tokenizer was written, before the model

    monkeypatch.setattr(lm_train, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        lm_train.ensure_tiny_model(cfg)
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.tmp-*"))
    # a temp folder left by a process that no longer exists is cleared, and the run completes
    stale = target.parent / f".{target.name}.tmp-999999999"
    (stale / "tokenizer").mkdir(parents=True)
    monkeypatch.setattr(lm_train, "fit", real_fit)
    assert lm_train.ensure_tiny_model(cfg) == target
    assert (target / lm_train.MARKER).exists() and not stale.exists()


def test_out_dir_and_refusals(tmp_path, capsys):
    foreign = tmp_path / "nanochat_base"
    (foreign / "tokenizer").mkdir(parents=True)
    cfg = TinyConfig(**{**TINY, "steps": 5})
    with pytest.raises(NanosaeError, match="not a train-lm result"):
        lm_train.ensure_tiny_model(cfg, out=foreign)
    assert cli_main(["train-lm", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "data source not found" in capsys.readouterr().err
    for bad in ({"n_embd": 60}, {"compute": "fp8"}, {"steps": 0}, {"vocab_size": 100}, {"window_pattern": "SX"}):
        with pytest.raises(NanosaeError):
            lm_train.ensure_tiny_model(TinyConfig(**{**TINY, **bad}), out=tmp_path / "y")


def test_text_file_source_trains(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(3000)))
    cfg = TinyConfig(**{**TINY, "data": str(src), "steps": 20, "eval_every": 10})
    base = lm_train.ensure_tiny_model(cfg, out=tmp_path / "out")
    summary = json.loads((base / lm_train.MARKER).read_text())
    assert summary["config"]["data"] == str(src) and summary["history"][-1]["val_loss"] < math.log(384)
    model, tok, meta = load_model(base)  # this repetitive text has fewer BPE merges than asked: vocab follows it
    assert tok.vocab_size == meta["model_config"]["vocab_size"] == model.config.vocab_size < 384


def test_too_little_data(tmp_path):
    src = tmp_path / "tiny.txt"
    src.write_text("hello world\n" * 30)
    with pytest.raises(NanosaeError, match="train rows"):
        lm_train.ensure_tiny_model(TinyConfig(**{**TINY, "data": str(src)}), out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_schedule_and_orthogonalize():
    cfg = TinyConfig(steps=100, warmup_steps=10, warmdown_ratio=0.5, final_lr_frac=0.1)
    mults = [lm_train.lr_multiplier(s, cfg) for s in range(100)]
    assert mults[0] == pytest.approx(0.1) and mults[9] == 1.0 and mults[50] == 1.0
    assert mults[99] == pytest.approx(0.1 + 0.9 / 50) and all(a >= b for a, b in zip(mults[10:], mults[11:]))
    g = torch.randn(3, 32, 96)
    s = torch.linalg.svdvals(lm_train.orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3  # all directions scaled to about 1, whatever g's spectrum
    s_tall = torch.linalg.svdvals(lm_train.orthogonalize(g.mT))
    assert s_tall.min() > 0.5 and s_tall.max() < 1.3


def run_probe(probe, fake, steps=20):
    notes = []
    for step in range(steps):
        dtype = probe.setting(step)
        assert dtype == probe.current[1] and torch.get_num_threads() == probe.current[0]
        switched = step >= 2 and (step - 2) % 3 == 0  # the first step after a switch is slow and not counted
        notes.append(probe.record(step, 9.0 if switched else fake.get(probe.current, 1.0)))
    return notes


def test_speed_probe_keeps_the_fastest_setting():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bf, fp = torch.bfloat16, torch.float32
        # dtypes compared on 1 thread, then the winner on 2; a loser's 2-thread setting is never tried
        fake = {(2, bf): 0.5, (1, bf): 0.3, (1, fp): 0.6}
        probe = lm_train.SpeedProbe(TinyConfig(compute="auto"), "cpu", first=2, block=3)
        notes = run_probe(probe, fake)
        assert probe.choice == (1, bf) and torch.get_num_threads() == 1
        assert set(probe.times) == set(fake) and all(len(t) == 2 for t in probe.times.values())
        assert [x for x in notes if x] == [notes[10]] and "fastest: 1 thread(s), bfloat16" in notes[10]
        probe.restore()
        assert torch.get_num_threads() == 2
        fake = {(2, fp): 0.2, (1, bf): 0.7, (1, fp): 0.4}  # a quiet machine without bf16 units
        probe = lm_train.SpeedProbe(TinyConfig(compute="auto"), "cpu")
        run_probe(probe, fake)
        assert probe.choice == (2, fp)
        probe = lm_train.SpeedProbe(TinyConfig(compute="float32"), "cpu")  # fixed dtype: threads only
        run_probe(probe, {(1, fp): 0.3, (2, fp): 0.2})
        assert probe.choice == (2, fp) and set(probe.times) == {(1, fp), (2, fp)}
        torch.set_num_threads(1)
        probe = lm_train.SpeedProbe(TinyConfig(compute="float32"), "cpu")  # nothing to choose
        assert probe.plan == [] and run_probe(probe, {(1, fp): 0.1}) == [None] * 20
    finally:
        torch.set_num_threads(n)


def test_a_damaged_cached_model_is_refused_and_left_as_it_is(trained, tmp_path, capsys):
    import shutil

    base, _ = trained
    copy = tmp_path / "tiny"
    shutil.copytree(base, copy)
    cfg = TinyConfig(**TINY)
    assert lm_train.ensure_tiny_model(cfg, out=copy) == copy  # intact: reused
    model = copy / "base_checkpoints" / "d4" / f"model_{TINY['steps']:06d}.pt"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    model.write_bytes(bytes(raw))
    with pytest.raises(NanosaeError, match=r"model_000120.pt: damaged \(its sha256 differs.*train it again"):
        lm_train.ensure_tiny_model(cfg, out=copy)
    argv = ["train-lm", "--out", str(copy)] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    assert cli_main(argv) == 2 and "model_000120.pt: damaged" in capsys.readouterr().err
    assert model.read_bytes() == bytes(raw)  # nothing was overwritten
