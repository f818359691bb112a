"""The nanochat tokenizer: safe unpickling, nanochat's exact encodings and chat renderings, training round trip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import tiktoken
import torch

from nanosae import NanosaeError, Tokenizer
from nanosae.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, load_encoding

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir" / "tokenizer"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(TOKENIZER_DIR)


# ---------------------------------------------------------------- restricted unpickling


def test_fixture_pickle_loads_as_the_same_encoding(tok):
    with open(TOKENIZER_DIR / "tokenizer.pkl", "rb") as f:
        trusted = pickle.load(f)  # the fixture is trusted data; the plain unpickler is the comparison
    assert isinstance(tok.enc, tiktoken.Encoding)
    assert tok.enc.name == trusted.name == "rustbpe"
    assert tok.enc._pat_str == trusted._pat_str == SPLIT_PATTERN
    assert tok.enc._mergeable_ranks == trusted._mergeable_ranks
    assert tok.enc._special_tokens == trusted._special_tokens


class _RunsCode:
    """Unpickling this calls os.system; a safe loader must refuse before calling anything."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _OpensFile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _as_encoding(state) -> bytes:
    """The bytes pickle writes for a tiktoken Encoding (GLOBAL, NEWOBJ, then BUILD with its state), for any state."""
    body = pickle.dumps(state, protocol=2)[2:-1]  # without the PROTO header and STOP
    return b"\x80\x02ctiktoken.core\nEncoding\n)\x81" + body + b"b."


def _malicious(kind: str, marker: Path) -> bytes:
    if kind == "os.system":
        return pickle.dumps(_RunsCode(marker))
    if kind == "inside_encoding_state":  # a genuine-looking Encoding whose state hides a payload
        specials = {t: i + 1 for i, t in enumerate(SPECIAL_TOKENS)}
        state = {
            "name": _OpensFile(marker),
            "pat_str": r"\S+",
            "mergeable_ranks": {b"a": 0},
            "special_tokens": specials,
        }
        return _as_encoding(state)
    if kind == "builtins.eval":
        return pickle.dumps(eval)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["os.system", "inside_encoding_state", "builtins.eval"])
def test_pickle_asking_for_anything_else_is_refused_and_nothing_runs(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_malicious(kind, marker))
    with pytest.raises(NanosaeError) as e:
        load_encoding(path)
    msg = str(e.value)
    assert str(path) in msg and "refusing" in msg and "\n" not in msg
    assert not marker.exists()


def test_encoding_pickled_by_name_is_refused(tmp_path):
    """tiktoken pickles its registry encodings by name, which makes it look them up (and download): refused."""
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_as_encoding("gpt2"))
    with pytest.raises(NanosaeError) as e:
        load_encoding(path)
    assert str(path) in str(e.value) and "Encoding state" in str(e.value)


def test_encoding_without_nanochat_specials_is_refused(tmp_path):
    path = tmp_path / "tokenizer.pkl"
    enc = tiktoken.Encoding(name="x", pat_str=r"\S+|\s+", mergeable_ranks={b"a": 0, b"b": 1}, special_tokens={})
    path.write_bytes(pickle.dumps(enc))
    with pytest.raises(NanosaeError, match="special tokens") as e:
        load_encoding(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "state",
    [
        {"name": "x"},
        {"name": "x", "pat_str": r"\S+", "mergeable_ranks": [(b"a", 0)], "special_tokens": {}},
        {"name": "x", "pat_str": r"\S+", "mergeable_ranks": {"a": 0}, "special_tokens": {}},
        {"name": 3, "pat_str": r"\S+", "mergeable_ranks": {b"a": 0}, "special_tokens": {}},
        {"name": "x", "pat_str": r"(", "mergeable_ranks": {b"a": 0}, "special_tokens": {t: i + 1 for i, t in
                                                                                    enumerate(SPECIAL_TOKENS)}},
    ],
)  # fmt: skip
def test_malformed_encoding_state_is_an_error(tmp_path, state):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_as_encoding(state))
    with pytest.raises(NanosaeError) as e:
        load_encoding(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_or_garbage_file(tmp_path):
    with pytest.raises(NanosaeError, match="not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(NanosaeError, match="not a nanochat tokenizer pickle"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- encodings and specials, against nanochat's


def test_encode_matches_nanochat(tok, reference, tok_info):
    for i, text in enumerate(tok_info["strings"]):
        assert tok.encode(text) == reference[f"tok.str{i}_ids"].tolist()
        assert tok.encode(text, prepend="<|bos|>") == reference[f"tok.str{i}_bos_ids"].tolist()
        assert tok.encode(text, prepend=tok.bos_token_id) == reference[f"tok.str{i}_bos_ids"].tolist()
        assert tok.decode(reference[f"tok.str{i}_ids"].tolist()) == text
    batch = tok.encode(tok_info["strings"], prepend="<|bos|>", append="<|assistant_end|>")
    assert [ids[1:-1] for ids in batch] == [tok.encode(s) for s in tok_info["strings"]]
    assert all(ids[0] == 1991 and ids[-1] == 1995 for ids in batch)


def test_special_tokens(tok, tok_info):
    assert tok.vocab_size == tok.get_vocab_size() == 2000
    assert {t: tok.encode_special(t) for t in SPECIAL_TOKENS} == tok_info["special_tokens"]
    assert tok.bos_token_id == tok.get_bos_token_id() == 1991
    assert tok.special_ids() == set(range(1991, 2000)) and tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.stop_token_ids() == {1991, 1995}
    assert tok.encode("<|bos|>") != [1991]  # special-token text in a string is plain text
    assert tok.id_to_token(1995) == "<|assistant_end|>"
    assert tok.decode([1992]) == "<|user_start|>"
    assert "\ufffd" not in tok.id_to_token(tok.encode("a")[0])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ascii",
        "naïve café — “quotes” ½",
        "日本語のテキスト",
        "emoji 🧪🚀 + zwj 👩‍💻",
        "tabs\tand\r\nnewlines\n\n",
        "12345678",
    ],
)
def test_encode_decode_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < 1991 for i in ids)
    assert tok(text) == ids


def test_token_byte_lengths_match_nanochat_file(tok):
    theirs = torch.load(TOKENIZER_DIR / "token_bytes.pt", weights_only=True)
    assert torch.equal(tok.token_byte_lengths(), theirs)


# ---------------------------------------------------------------- chat rendering


def test_render_conversation_matches_nanochat(tok, reference, tok_info):
    ids, mask = tok.render_conversation(tok_info["conversation"])
    assert ids == reference["tok.conv_ids"].tolist()
    assert mask == reference["tok.conv_mask"].tolist()
    assert tok.render_for_completion(tok_info["conversation"]) == reference["tok.conv_completion_ids"].tolist()
    assert tok_info["conversation"]["messages"][0]["role"] == "system"  # the caller's dict is not modified


def test_render_truncates_and_masks(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    ids, mask = tok.render_conversation(conv)
    reply = tok.encode("hello there")
    assert ids == [1991, 1992, *tok.encode("hi"), 1993, 1994, *reply, 1995]
    assert mask == [0] * (4 + len(tok.encode("hi")) - 1) + [0] + [1] * len(reply) + [1]
    short, short_mask = tok.render_conversation(conv, max_tokens=3)
    assert short == ids[:3] and short_mask == mask[:3]


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "no messages"),
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}], "system"),
        ([{"role": "user", "content": ["a"]}], "plain text"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "img", "text": ""}]}], "img"),
    ],
)
def test_bad_conversations(tok, messages, match):
    with pytest.raises(NanosaeError, match=match):
        tok.render_conversation({"messages": messages})


def test_render_for_completion_needs_a_final_assistant_message(tok):
    with pytest.raises(NanosaeError, match="assistant"):
        tok.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})


# ---------------------------------------------------------------- training with rustbpe


def test_train_save_load_round_trip(tmp_path):
    texts = [
        "def add(a, b):\n    return a + b\n",
        "The quick brown fox jumps over the lazy dog. " * 20,
        "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n" * 10,
        "Numbers 1234567890 and unicode: café, naïve, 東京.",
    ] * 5
    trained = Tokenizer.train(texts, vocab_size=300)
    assert trained.vocab_size == 300
    assert [trained.encode_special(t) for t in SPECIAL_TOKENS] == list(range(291, 300))  # the last 9 ids
    assert trained.enc._pat_str == SPLIT_PATTERN
    assert len(trained.encode("The quick brown fox")) < len(b"The quick brown fox")  # merges were learned
    trained.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    loaded = Tokenizer.from_dir(tmp_path)
    for text in texts[:4] + ["unseen text ✓"]:
        assert loaded.encode(text) == trained.encode(text)
        assert loaded.decode(trained.encode(text)) == text
    with open(tmp_path / "tokenizer.pkl", "rb") as f:
        plain = pickle.load(f)  # what nanochat does: a tiktoken Encoding named "rustbpe"
    assert isinstance(plain, tiktoken.Encoding) and plain.name == "rustbpe"
    lengths = torch.load(tmp_path / "token_bytes.pt", weights_only=True)
    assert lengths.dtype == torch.int32 and lengths.shape == (300,)
    assert lengths[291:].tolist() == [0] * 9 and lengths[:256].tolist() == [1] * 256


def test_train_rejects_too_small_vocab():
    with pytest.raises(NanosaeError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=200)
