"""nanochat's tokenizer: a tiktoken Encoding pickled in <base>/tokenizer/tokenizer.pkl, trained by rustbpe.

The pickle is read by a restricted unpickler that admits only tiktoken's Encoding class and builds it from
its plain-data state itself, so a crafted file can neither run code nor make tiktoken fetch an encoding.
A Hugging Face model folder carries the same tokenizer as tokenizer.json (transformers converts the tiktoken
Encoding to a byte-level BPE whose ids are the ranks); it is parsed back into a tiktoken Encoding here, without
the `tokenizers` package.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

from .errors import NanosaeError
from .fileio import atomic_write

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]
# GPT-4's split pattern with numbers in chunks of at most two digits (nanochat's SPLIT_PATTERN)
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it only records the pickled state."""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tiktoken.core.Encoding is allowed")


def load_encoding(path: str | os.PathLike) -> tiktoken.Encoding:
    """Unpickle a nanochat tokenizer.pkl safely and rebuild the tiktoken Encoding from its checked state."""
    path = Path(path)
    try:
        obj = _RestrictedUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise NanosaeError(f"{path}: tokenizer file not found (expected <base_dir>/tokenizer/tokenizer.pkl)") from None
    except Exception as e:  # any malformed or hostile pickle
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise NanosaeError(
            f"{path}: not a nanochat tokenizer pickle ({why}); copy tokenizer/ from the run again"
        ) from None
    state = getattr(obj, "state", None)
    keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    ok = (
        isinstance(obj, _EncodingState)
        and isinstance(state, dict)
        and set(state) == keys
        and isinstance(state["name"], str)
        and isinstance(state["pat_str"], str)
        and isinstance(state["mergeable_ranks"], dict)
        and isinstance(state["special_tokens"], dict)
        and all(type(k) is bytes and type(v) is int for k, v in state["mergeable_ranks"].items())
        and all(type(k) is str and type(v) is int for k, v in state["special_tokens"].items())
    )
    if not ok:
        raise NanosaeError(f"{path}: pickle does not hold a tiktoken Encoding state (name, pat_str, ranks, specials)")
    return _encoding(path, **state)


def _encoding(path: Path, **state) -> tiktoken.Encoding:
    missing = [t for t in SPECIAL_TOKENS if t not in state["special_tokens"]]
    if missing:
        raise NanosaeError(f"{path}: lacks nanochat's special tokens {missing}; is this a nanochat tokenizer?")
    try:
        return tiktoken.Encoding(**state)
    except Exception as e:  # e.g. an invalid split regex or empty ranks
        raise NanosaeError(
            f"{path}: tiktoken rejects the encoding it holds ({' '.join(str(e).split())[:200]})"
        ) from None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, inverted: the character that stands for each byte -> that byte.
    Printable Latin-1 bytes stand for themselves; the others take the characters from U+0100 on, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(moved)}


def _split_pattern(pre: object) -> str | None:
    """The split regex of a pre-tokenizer that is a regex Split then a regex-free ByteLevel (what transformers'
    tiktoken converter writes), else None."""
    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, dict) for p in parts):
        return None
    split, byte_level = parts
    regex = split.get("pattern", {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
    plain_split = split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
    plain_bytes = byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True)
    plain_bytes = plain_bytes and not byte_level.get("add_prefix_space")
    return regex if isinstance(regex, str) and plain_split and plain_bytes else None


def _merges_in_rank_order(model: dict) -> bool:
    """tiktoken merges the pair whose joined token has the lowest id; a BPE merge list gives the same result when
    each merge makes a token of an id no lower than the merge before it (as converted tiktoken ranks do)."""
    vocab, prev = model["vocab"], -1
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            return False
        rank = vocab.get(pair[0] + pair[1])
        if type(rank) is not int or rank < prev:
            return False
        prev = rank
    return True


def load_hf_encoding(path: str | os.PathLike) -> tiktoken.Encoding:
    """A Hugging Face tokenizer.json holding nanochat's tokenizer, as the tiktoken Encoding it was converted from."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NanosaeError(f"{path}: not found; copy tokenizer.json from the model's repository") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NanosaeError(f"{path}: not valid JSON ({e}); copy tokenizer.json from the model again") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise NanosaeError(f"{path}: holds no BPE vocabulary; is this a nanochat model's tokenizer.json?")
    pattern = _split_pattern(data.get("pre_tokenizer"))
    extras = [
        k for k in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback", "dropout") if model.get(k)
    ]
    if pattern is None or data.get("normalizer") is not None or extras:
        raise NanosaeError(
            f"{path}: not a byte-level BPE split by one regex (as transformers converts nanochat's tokenizer.pkl); "
            "nanosae cannot reproduce its encoding: convert the model's tokenizer.pkl instead"
        )
    alphabet = _byte_level_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in token): rank for token, rank in model["vocab"].items()}
    except (KeyError, TypeError):
        raise NanosaeError(f"{path}: its vocabulary is not byte-level BPE; is this a nanochat tokenizer?") from None
    if not _merges_in_rank_order(model):
        raise NanosaeError(
            f"{path}: its merges are not in the order of the token ids, so tiktoken (which merges by id) would "
            "encode differently; convert the model's tokenizer.pkl with transformers instead"
        )
    added = data.get("added_tokens") or []
    specials = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    if not all(isinstance(k, str) and type(v) is int for k, v in specials.items()):
        raise NanosaeError(f"{path}: added_tokens entries need a content string and an integer id; copy it again")
    return _encoding(path, name=path.parent.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


class Tokenizer:
    """encode/decode, special tokens and chat rendering, producing exactly nanochat's token sequences."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_token_id = self.encode_special("<|bos|>")

    @classmethod
    def from_dir(cls, tokenizer_dir: str | os.PathLike) -> Tokenizer:
        """nanochat's tokenizer.pkl, or a Hugging Face tokenizer.json when the folder has only that."""
        d = Path(tokenizer_dir)
        if not (d / "tokenizer.pkl").exists() and (d / "tokenizer.json").is_file():
            return cls(load_hf_encoding(d / "tokenizer.json"))
        return cls(load_encoding(d / "tokenizer.pkl"))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a GPT-4-style BPE with rustbpe, as nanochat's tok_train does; specials take the last 9 ids."""
        import rustbpe

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise NanosaeError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(
            tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
        )

    def save(self, tokenizer_dir: str | os.PathLike) -> None:
        """Write tokenizer.pkl (a pickled tiktoken Encoding, loadable by nanochat) and token_bytes.pt."""
        d = Path(tokenizer_dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "tokenizer.pkl", lambda f: pickle.dump(self.enc, f))
        atomic_write(d / "token_bytes.pt", lambda f: torch.save(self.token_byte_lengths(), f))

    def token_byte_lengths(self) -> torch.Tensor:
        specials = set(self.enc._special_tokens.values())
        lengths = [0 if i in specials else len(self.enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)]
        return torch.tensor(lengths, dtype=torch.int32)

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> set[str]:
        return set(self.enc._special_tokens)

    def special_ids(self) -> set[int]:
        return set(self.enc._special_tokens.values())

    def encode_special(self, text: str) -> int:
        return self.enc.encode_single_token(text)

    def _one(self, tok: int | str) -> int:
        return self.encode_special(tok) if isinstance(tok, str) else tok

    def encode(self, text: str | list[str], prepend: int | str | None = None, append: int | str | None = None):
        """Ordinary encoding (special-token text is plain text); a list is batch-encoded."""
        pre = [] if prepend is None else [self._one(prepend)]
        post = [] if append is None else [self._one(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        return [pre + ids + post for ids in self.enc.encode_ordinary_batch(text, num_threads=8)]

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def id_to_token(self, i: int) -> str:
        """A token as text (invalid UTF-8 fragments shown with U+FFFD), for display."""
        return self.enc.decode_single_token_bytes(i).decode("utf-8", errors="replace")

    def stop_token_ids(self) -> set[int]:
        """The tokens that end an assistant turn in nanochat's Engine."""
        return {self.encode_special("<|assistant_end|>"), self.bos_token_id}

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """nanochat's SFT rendering: ids and a mask that is 1 on what the assistant is trained to produce."""
        messages = conversation["messages"]
        if messages and messages[0]["role"] == "system":
            messages = copy.deepcopy(messages)
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise NanosaeError("a system message must be followed by a user message")
            messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
            messages = messages[1:]
        if not messages:
            raise NanosaeError("conversation has no messages")
        sp = self.encode_special
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], m: int) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        add(self.bos_token_id, 0)
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise NanosaeError(f"message {i} is from {message['role']!r}; roles must alternate user/assistant")
            content = message["content"]
            if expected == "user":
                if not isinstance(content, str):
                    raise NanosaeError("user messages must be plain text")
                add(sp("<|user_start|>"), 0)
                add(self.encode(content), 0)
                add(sp("<|user_end|>"), 0)
                continue
            add(sp("<|assistant_start|>"), 0)
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                value = self.encode(part["text"])
                if part["type"] == "text":
                    add(value, 1)
                elif part["type"] == "python":
                    add(sp("<|python_start|>"), 1)
                    add(value, 1)
                    add(sp("<|python_end|>"), 1)
                elif part["type"] == "python_output":
                    add(sp("<|output_start|>"), 0)
                    add(value, 0)
                    add(sp("<|output_end|>"), 0)
                else:
                    raise NanosaeError(f"unknown assistant content part type {part['type']!r}")
            add(sp("<|assistant_end|>"), 1)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict) -> list[int]:
        """The conversation without its last (assistant) message, primed with <|assistant_start|>."""
        messages = list(conversation["messages"])
        if not messages or messages[-1]["role"] != "assistant":
            raise NanosaeError("render_for_completion needs a conversation that ends with an assistant message")
        ids, _ = self.render_conversation({"messages": messages[:-1]})
        return ids + [self.encode_special("<|assistant_start|>")]
