"""The tiny model's checkpoint series (train-lm --save-every) and its chat phase (train-sft), on real checkpoints
written here with small configs."""

import contextlib
import io
import json
import sys

import pytest
import torch

from nanosae import data, lm_train, load_model
from nanosae.checkpoint import checkpoint_steps, read_state_dict
from nanosae.cli import main as cli_main
from nanosae.errors import NanosaeError
from nanosae.lm_train import SFTConfig, TinyConfig
from nanosae.tokenizer import Tokenizer

# seconds on 2 cores; seq_len 128 so that most conversations fit a row whole
BASE = dict(
    vocab_size=512,
    n_layer=2,
    n_embd=64,
    head_dim=32,
    seq_len=128,
    batch_size=8,
    steps=60,
    eval_every=30,
    save_every=20,
    eval_tokens=2048,
    tokenizer_chars=200_000,
    compute="float32",
)
SFT = dict(steps=60, eval_every=30, compute="float32")
# for the cache tests: a model trained in a second or two
MINI = dict(BASE, vocab_size=300, n_embd=32, seq_len=32, steps=10, save_every=0, eval_every=10, tokenizer_chars=50_000)


def flags(cfg: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in cfg.items()]


def run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    return rc, out.getvalue()


@pytest.fixture(autouse=True)
def _home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NANOSAE_HOME", str(tmp_path_factory.getbasetemp() / "nanosae_home"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base dir written by the CLI: train-lm with a series, then train-sft; (base dir, train-sft's output)."""
    base = tmp_path_factory.mktemp("tiny") / "base"
    rc, _ = run_cli(["train-lm", "--out", str(base), *flags(BASE)])
    assert rc == 0
    rc, out = run_cli(["train-sft", "--base", str(base), *flags(SFT)])
    assert rc == 0
    return base, out


# --- the chat data ------------------------------------------------------------------------------------------


def test_conversations_are_many_distinct_pairs_held_out_by_subject():
    train, val = data.chat_conversations("train"), data.chat_conversations("val")
    pairs = {(m[0]["content"], m[1]["content"]) for c in train for m in zip(c["messages"][::2], c["messages"][1::2])}
    assert len(pairs) > 10_000  # every pair once: the training set repeats nothing
    questions = {q for q, _ in pairs}
    templates = {q for q, _ in data.TEMPLATES["function"]}
    assert len(templates) >= 3 and sum(1 for c in train if len(c["messages"]) == 4) > 1000  # two-turn ones too
    assert all(m["role"] == ("user", "assistant")[i % 2] for c in train + val for i, m in enumerate(c["messages"]))
    train_subjects = {s for c in train for s in c["subjects"]}
    val_subjects = {s for c in val for s in c["subjects"]}
    assert len(val_subjects) > 100 and not train_subjects & val_subjects
    assert not {c["messages"][0]["content"] for c in val} & questions
    # held-out sources are exactly the files the base model's corpus holds out: neither phase saw them
    val_labels = data.builtin_val_labels()
    held = [s for s in data.stdlib_subjects() if s.held_out and s.module not in ("", "builtins")]
    kinds = {s.kind for s in held}
    assert {"module", "function", "class", "method"} <= kinds
    for s in held:
        path = data._stdlib().joinpath(*s.module.split("."))
        assert str(path.with_suffix(".py")) in val_labels or str(path / "__init__.py") in val_labels, s


def test_answers_come_from_signatures_and_docstrings():
    subjects = {s.name: s for s in data.stdlib_subjects()}
    dumps = subjects["json.dumps"]
    assert dumps.kind == "function" and dumps.signature.startswith("(obj, *, skipkeys")
    assert dumps.summary == "Serialize ``obj`` to a JSON formatted ``str``."
    assert subjects["json"].kind == "module" and "dumps" in subjects["json"].members
    assert subjects["len"].summary == "Return the number of items in a container."
    assert subjects["while"].kind == "keyword" and "repeated execution" in subjects["while"].summary
    method = subjects["json.decoder.JSONDecoder.decode"]
    assert method.kind == "method" and method.signature.startswith("(s") and "self" not in method.signature
    pairs = dict(data.qa_pairs(dumps))
    assert pairs["What does json.dumps do?"] == f"json.dumps{dumps.signature}: {dumps.summary}"
    assert pairs["What is the signature of json.dumps?"] == f"json.dumps{dumps.signature}"
    assert pairs["Which module defines dumps?"] == "dumps is defined in the json module."
    assert "Which module defines dumps?" not in dict(data.qa_pairs(dumps, unique_short=False))
    # a name several modules define (dumps: json, plistlib, xmlrpc.client) gets no "which module" question
    convs = data.chat_conversations("train") + data.chat_conversations("val")
    questions = {m["content"] for c in convs for m in c["messages"]}
    assert "Which module defines dumps?" not in questions and "Which module defines urlopen?" in questions


def test_first_sentence():
    fs = data.first_sentence
    assert fs("Return the thing (e.g. a file). More text.") == "Return the thing (e.g. a file)."
    assert fs("max(iterable, *[, key=func]) -> value\nmax(a, b)\n\nWith one argument, return it. Else.") == (
        "With one argument, return it."
    )
    assert fs("no full stop here") == "no full stop here."
    assert fs("x") is None and fs(None) is None
    long = fs("word " * 100)
    assert len(long) <= 165 and long.endswith(" ...")
    assert fs("x" * 300) == "x" * 160 + " ..."


# --- the loss mask --------------------------------------------------------------------------------------------


def test_packed_rows_train_exactly_what_the_assistant_says(tiny):
    """nanochat's rule: loss on the assistant's text and its <|assistant_end|>; not on BOS, user turns,
    <|assistant_start|> or padding. Rows start with BOS and no conversation is split."""
    base, _ = tiny
    tok = Tokenizer.from_dir(base / "tokenizer")
    convs = [
        {"messages": [{"role": "user", "content": "What is len?"}, {"role": "assistant", "content": "A builtin."}]},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "And os?"},
                {"role": "assistant", "content": "A module for the operating system."},
            ]
        },
        {"messages": [{"role": "user", "content": "q " * 20}, {"role": "assistant", "content": "a " * 20}]},
    ]
    row_len = 48
    x, y = lm_train.pack_conversations(tok, convs, row_len)
    assert x.shape == y.shape and x.shape[1] == row_len - 1
    assert (x[:, 0] == tok.bos_token_id).all()
    assert torch.equal(x[:, 1:], y[:, :-1].clamp(min=0).where(y[:, :-1] >= 0, x[:, 1:]))  # y is x shifted
    end = tok.encode_special("<|assistant_end|>")
    trained = [t for t in y.flatten().tolist() if t >= 0]
    answers = [m["content"] for c in convs for m in c["messages"] if m["role"] == "assistant"]
    # the packing order differs; the trained tokens are the same (a conversation longer than a row is cut to it)
    rendered = [tok.render_conversation(c, max_tokens=row_len) for c in convs]
    assert len(tok.render_conversation(convs[2])[0]) > row_len
    assert sorted(trained) == sorted(t for ids, mask in rendered for t, m in zip(ids, mask) if m)
    assert trained.count(end) == len(answers) - 1  # the cut conversation lost its end
    text = tok.decode(t for t in trained if t != end)
    assert all(a in text for a in answers[:3]) and "What is len" not in text and "q q" not in text
    assert (x == tok.bos_token_id).sum() >= len(convs)


# --- the series -----------------------------------------------------------------------------------------------


def test_save_every_writes_a_series_that_loads(tiny):
    base, _ = tiny
    ckpt = base / "base_checkpoints" / "d2"
    assert checkpoint_steps(base) == checkpoint_steps(ckpt) == [20, 40, 60]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        f"{k}_{s:06d}.{e}" for k, e in [("meta", "json"), ("model", "pt")] for s in (20, 40, 60)
    ]
    marker = json.loads((base / lm_train.MARKER).read_text())
    assert marker["checkpoints"] == [20, 40, 60]
    losses = []
    for step in (20, 40, 60):
        model, tok, meta = load_model(base, step)
        assert model.info.step == meta["step"] == step and model.info.phase == "base"
        assert meta["val_bpb"] == pytest.approx(next(h["val_bpb"] for h in marker["history"] if h["step"] == step))
        losses.append(meta["val_bpb"])
    assert losses[0] > losses[-1]  # later checkpoints are better models, not copies
    first, last = (read_state_dict(ckpt / f"model_{s:06d}.pt") for s in (20, 60))
    assert list(first) == list(last) and not torch.equal(first["lm_head.weight"], last["lm_head.weight"])


def test_series_cache_semantics(capsys):
    """One folder per final model: a run with a series serves requests with fewer checkpoints; a run without
    one is trained again (to the same final weights) when a series is asked for."""
    cfg = TinyConfig(**MINI)
    base = lm_train.ensure_tiny_model(cfg)
    assert checkpoint_steps(base) == [10]
    before = read_state_dict(base / "base_checkpoints" / "d2" / "model_000010.pt")
    capsys.readouterr()
    series = TinyConfig(**{**MINI, "save_every": 5})
    assert lm_train.config_hash(series) == lm_train.config_hash(cfg)
    assert lm_train.ensure_tiny_model(series) == base
    assert "without checkpoints at steps 5" in capsys.readouterr().out
    assert checkpoint_steps(base) == [5, 10]
    after = read_state_dict(base / "base_checkpoints" / "d2" / "model_000010.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)  # writing the series changed nothing
    for fewer in (0, 10):
        assert lm_train.ensure_tiny_model(TinyConfig(**{**MINI, "save_every": fewer})) == base
        assert "reusing" in capsys.readouterr().out
    assert lm_train.series_steps(TinyConfig(**{**MINI, "save_every": 3})) == [3, 6, 9, 10]
    with pytest.raises(NanosaeError, match="save_every"):
        TinyConfig(**{**MINI, "save_every": -1}).validate()


# --- the chat model -------------------------------------------------------------------------------------------


def test_sft_writes_a_nanochat_chat_checkpoint(tiny):
    base, out = tiny
    ckpt = base / "chatsft_checkpoints" / "d2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["meta_000060.json", "model_000060.pt"]
    model, tok, meta = load_model(base, phase="sft")
    assert (model.info.phase, model.info.step, model.info.name) == ("sft", 60, "nanochat-d2-sft")
    assert set(meta) == {"step", "val_bpb", "model_config", "user_config"}  # chat_sft's keys
    assert meta["user_config"]["base_step"] == 60 and meta["user_config"]["steps"] == SFT["steps"]
    base_model, _, base_meta = load_model(base)  # a base dir with no phase still means the base model
    assert base_model.info.phase == "base" and meta["model_config"] == base_meta["model_config"]
    sft_sd, base_sd = (
        read_state_dict(p) for p in (ckpt / "model_000060.pt", base / "base_checkpoints/d2/model_000060.pt")
    )
    assert list(sft_sd) == list(base_sd) and not torch.equal(sft_sd["lm_head.weight"], base_sd["lm_head.weight"])
    assert "Q: " in out and "A: " in out and "held-out answer loss" in out


def test_sft_learns_to_answer_held_out_questions(tiny):
    """On conversations about subjects it never saw, the chat model's loss on the answers is far below the base
    model's (measured on the same held-out rows before and after), and it learned to end its turn."""
    base, _ = tiny
    summary = lm_train.read_sft_marker(base)
    assert summary["history"][0]["step"] == 0 and summary["history"][-1]["step"] == SFT["steps"]
    assert summary["val_loss"] < 0.8 * summary["base_val_loss"]
    model, tok, _ = load_model(base, phase="sft")
    base_model, _, _ = load_model(base)
    convs = data.chat_conversations("val")[:64]
    x, y = lm_train.pack_conversations(tok, convs, model.config.sequence_len + 1)
    token_bytes = tok.token_byte_lengths()
    chat_loss, _ = lm_train.evaluate(model, x, y, token_bytes, 8)
    base_loss, _ = lm_train.evaluate(base_model, x, y, token_bytes, 8)
    assert chat_loss < 0.8 * base_loss
    # the reply ends with <|assistant_end|>: the base model never learned to, the chat model did
    end = tok.encode_special("<|assistant_end|>")
    ends = {"chat": 0, "base": 0}
    for question, _, _ in lm_train.held_out_questions(16):
        prompt = tok.render_for_completion(
            {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": ""}]}
        )
        for name, m in (("chat", model), ("base", base_model)):
            ends[name] += end in lm_train.generate(m, prompt, 96, stop_tokens={end})
    assert ends["chat"] >= 8 and ends["base"] <= 2


def test_sft_cache(tiny, capsys):
    base, _ = tiny
    model_file = base / "chatsft_checkpoints" / "d2" / "model_000060.pt"
    mtime = model_file.stat().st_mtime_ns
    cfg = SFTConfig(**SFT)
    assert lm_train.ensure_chat_model(base, cfg) == base
    assert "reusing the tiny chat model" in capsys.readouterr().out and model_file.stat().st_mtime_ns == mtime
    h = lm_train.sft_hash(base, cfg)
    assert lm_train.read_sft_marker(base)["hash"] == h
    assert lm_train.sft_hash(base, SFTConfig(**{**SFT, "steps": 61})) != h
    other = lm_train.ensure_tiny_model(TinyConfig(**MINI))  # another base model: another key
    assert lm_train.sft_hash(other, cfg) != h


def test_a_damaged_chat_model_is_refused_and_left_as_it_is(tiny, tmp_path):
    import shutil

    copy = tmp_path / "base"
    shutil.copytree(tiny[0], copy)
    model = copy / "chatsft_checkpoints" / "d2" / "model_000060.pt"
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    model.write_bytes(bytes(raw))
    with pytest.raises(NanosaeError, match=r"model_000060.pt: damaged \(its sha256 differs.*train it again"):
        lm_train.ensure_chat_model(copy, SFTConfig(**SFT))
    assert model.read_bytes() == bytes(raw)  # nothing was overwritten


def test_killed_sft_leaves_no_chat_model(tmp_path, monkeypatch):
    base = lm_train.ensure_tiny_model(TinyConfig(**MINI), out=tmp_path / "base")

    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_train, "optimize", dying)
    with pytest.raises(KeyboardInterrupt):
        lm_train.ensure_chat_model(base, SFTConfig(steps=2, compute="float32"))
    assert not (base / "chatsft_checkpoints").exists() and not list(base.glob(".chatsft*"))
    with pytest.raises(NanosaeError, match="sft"):
        load_model(base, phase="sft")


def test_bad_inputs(tmp_path, capsys, monkeypatch):
    rc = cli_main(["train-sft", "--base", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 2 and "no such directory" in err and "train-lm" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "foreign" / "base_checkpoints").mkdir(parents=True)
    assert cli_main(["train-sft", "--base", str(tmp_path / "foreign")]) == 2
    assert "not a train-lm result" in capsys.readouterr().err
    assert cli_main(["train-sft", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    assert cli_main(["chat", "--phase", "base"]) == 2
    assert "needs --model" in capsys.readouterr().err
    # no --model and no SAE: said at once, before minutes of training the default tiny models
    monkeypatch.chdir(tmp_path)
    assert cli_main(["serve"]) == 2
    assert "serve needs an SAE: pass --sae DIR" in capsys.readouterr().err and not lm_train.tiny_dir().exists()


# --- chat and serve defaults ----------------------------------------------------------------------------------


def test_chat_uses_the_chat_model_of_a_tiny_base_dir(tiny, tmp_path, monkeypatch, capsys):
    from nanosae.chat import chat_defaults
    from nanosae.sae import SAE, SAEConfig

    base, _ = tiny
    monkeypatch.chdir(tmp_path)  # no nanosae-demo here
    with pytest.raises(NanosaeError, match="chat needs an SAE: pass --sae DIR .* run `nanosae demo`"):
        chat_defaults(str(base), None, None, None, "chat")
    assert chat_defaults(str(base), "base", "my-sae", None) == (str(base), "base", "my-sae", None)
    # the demo's SAE, when the demo was made from this base dir
    sae = SAE(SAEConfig(architecture="topk", d_in=64, d_sae=128, k=4, hook_name="blocks.1.hook_resid_post"))
    sae.save(tmp_path / "nanosae-demo" / "sae")
    (tmp_path / "nanosae-demo" / "summary.json").write_text(json.dumps({"model_path": str(base)}))
    assert chat_defaults(str(base), None, None, None) == (str(base), "sft", "nanosae-demo/sae", None)
    assert "nanosae demo" in capsys.readouterr().out
    (tmp_path / "nanosae-demo" / "summary.json").write_text(json.dumps({"model_path": str(tmp_path)}))
    with pytest.raises(NanosaeError, match="needs an SAE"):
        chat_defaults(str(base), None, None, None)
    # end to end: the terminal chat with the tiny chat model and an SAE
    monkeypatch.setattr(sys, "stdin", io.StringIO("What does json.dumps do?\n/quit\n"))
    rc, out = run_cli(
        [
            "chat",
            "--model",
            str(base),
            "--sae",
            str(tmp_path / "nanosae-demo" / "sae"),
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ]
    )
    assert rc == 0 and "nanochat-d2-sft" in out and "Assistant: " in out
