import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanosae.chat import ChatSession, TextStream
from nanosae.errors import NanosaeError
from nanosae.generate import generate
from nanosae.runtime import Steer

BASE_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir"


def turn(tok, text):
    sp = tok.encode_special
    return [sp("<|user_start|>"), *tok.encode(text), sp("<|user_end|>"), sp("<|assistant_start|>")]


def test_text_stream_holds_back_partial_characters(d4):
    _, tok, _ = d4
    text = "日本 café — ok"
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)  # the string really splits characters
    stream, pieces = TextStream(tok), []
    for i in ids:
        if piece := stream.push(i, i):
            pieces.append(piece)
    assert stream.flush() is None
    assert "".join(p[0] for p in pieces) == text
    assert all("\ufffd" not in p[0] for p in pieces)
    assert [i for p in pieces for i in p[1]] == ids
    assert [p[0] for p in pieces[:2]] == ["日", "本"]
    stream.push(ids[0])  # half a character at the end of a reply still shows, as U+FFFD
    assert stream.flush() == ("\ufffd", [None])


def test_session_renders_and_samples_like_chat_cli(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    stop = tok.stop_token_ids()
    end = tok.encode_special("<|assistant_end|>")
    session = ChatSession(model, tok, sae, max_tokens=12)  # chat_cli's temperature 0.6, top_k 50, seed 42
    assert session.conversation == [tok.bos_token_id]
    pieces = []
    out = session.reply("Hello, who are you?", pieces.append)
    prompt = [tok.bos_token_id, *turn(tok, "Hello, who are you?")]
    expected = generate(model, prompt, 12, temperature=0.6, top_k=50, seed=42, stop_tokens=stop)
    assert [t for t, _ in out] == expected
    assert session.conversation == prompt + expected + ([] if expected[-1] == end else [end])
    assert "".join(pieces) == tok.decode([t for t in expected if t not in tok.special_ids()])
    assert all(len(rec.ids) == 3 for _, rec in out)  # the session tracks the top_n it shows
    # the next turn continues the same token sequence
    before = list(session.conversation)
    session.temperature = 0.0
    out = session.reply("And then?", lambda s: None)
    assert [t for t, _ in out] == generate(model, before + turn(tok, "And then?"), 12, stop_tokens=stop)


def test_session_commands(d4, hand_sae):
    model, tok, _ = d4
    sae, _ = hand_sae
    s = ChatSession(model, tok, sae)
    assert "5:+4" in s.command("/steer 5 +4")
    s.command("/clamp 6 2.5")
    s.command("/ablate 7")
    assert s.steers == {5: Steer(5, add=4.0), 6: Steer(6, clamp=2.5), 7: Steer.ablate(7)}
    s.command("/clamp 5 0")  # a latent has one steer at a time
    assert s.steers[5] == Steer(5, clamp=0.0)
    s.command("/unsteer 6")
    assert set(s.steers) == {5, 7}
    assert "generated tokens only" in s.command("/only-generated on") and s.only_generated
    assert s.command("/latents off") == "latents hidden" and s.top_n == 0
    s.command("/latents 5")
    assert s.top_n == 5
    assert s.command("/clear") == "steering cleared" and not s.steers
    s.conversation.append(1)
    s.command("/reset")
    assert s.conversation == [tok.bos_token_id]
    for bad in ("/steer 256 +1", "/steer five +1", "/clamp 3", "/latents maybe", "/nope"):
        with pytest.raises(NanosaeError):
            s.command(bad)
    assert s.command("/quit") is None


def test_cli_chat_with_piped_stdin(d4, hand_sae, tmp_path):
    model, tok, _ = d4
    sae, sae_dir = hand_sae
    folder = tmp_path / "sae"
    shutil.copytree(sae_dir, folder)
    (folder / "labels.json").write_text(json.dumps({"5": "the <five> latent"}))
    # what the session should say, computed in-process
    ref = ChatSession(model, tok, sae, [Steer(5, add=4.0), Steer.ablate(7)], temperature=0.0, max_tokens=8)
    first, second = [], []
    ref.reply("Hello there", first.append)
    ref.command("/clear")
    ref.reply("Tell me more", second.append)
    assert "".join(first) != "".join(second)

    lines = ["Hello there", "/clear", "/latents 2", "Tell me more", "/ablate 999", "/quit", "never read"]
    cmd = [sys.executable, "-m", "nanosae", "chat", "--model", str(BASE_DIR), "--sae", str(folder)]
    cmd += ["--temperature", "0", "--max-tokens", "8", "--steer", "5:+4", "--ablate", "7"]
    run = subprocess.run(cmd, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "steering: 5:+4, 7 ablated" in out
    assert f"Assistant: {''.join(first)}\n" in out
    assert f"Assistant: {''.join(second)}\n" in out
    assert "(the <five> latent)" in out  # the steered latent tops the first reply's tokens, with its label
    assert "steering cleared" in out and "showing 2 latents per token" in out
    assert "error: latent 999 does not exist" in out
    latent_lines = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(latent_lines) == 16  # one line per generated token of both replies
    assert all(line.count(" · ") == 1 for line in latent_lines[8:])  # /latents 2


def test_cli_chat_rejects_bad_flags(hand_sae):
    _, sae_dir = hand_sae
    cmd = [sys.executable, "-m", "nanosae", "chat", "--model", str(BASE_DIR), "--sae", str(sae_dir), "--steer", "5"]
    run = subprocess.run(cmd, input="", capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == "nanosae: error: --steer '5': write LATENT:VALUE, e.g. --steer 123:+8"
