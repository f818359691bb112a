import itertools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanosae import data
from nanosae.errors import NanosaeError
from nanosae.tokenizer import Tokenizer

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "nanochat-d4" / "base_dir" / "tokenizer"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(TOKENIZER_DIR)


def docs(source, split="train"):
    return list(data.iter_documents(source, split))


def write_parquet(path, texts, row_group_size=None, column="text"):
    pq.write_table(pa.table({column: texts}), path, row_group_size=row_group_size)
    return path


# --- sources ------------------------------------------------------------------------------------------------


def test_builtin_corpus_is_prose_and_code_without_tables():
    files = data.builtin_files()
    names = {f.name for f in files}
    assert "os.py" in names and "argparse.py" in names
    assert not any(f.parent.name in ("test", "tests", "site-packages") for f in files)
    assert not any(f.name == "topics.py" and f.parent.name == "pydoc_data" for f in files)
    everything = docs(None, None)
    assert not any("gencodec.py" in d[:300] for d in everything)
    assert any("import " in d and "def " in d for d in everything)  # Python sources
    assert any(d.lstrip().startswith(("The ", "An ", "A ")) for d in everything[:100])  # pydoc topics: prose
    assert docs("builtin", None) == everything


def test_builtin_splits_every_20th_document():
    everything, train, val = docs(None, None), docs(None, "train"), docs(None, "val")
    assert val == everything[data.VAL_EVERY - 1 :: data.VAL_EVERY]
    assert len(train) + len(val) == len(everything)
    assert train[: data.VAL_EVERY - 1] == everything[: data.VAL_EVERY - 1]


def test_single_text_file_holds_out_its_tail_at_a_line_break(tmp_path):
    lines = [f"line {i}: the quick brown fox" for i in range(200)]
    f = tmp_path / "book.txt"
    f.write_text("\n".join(lines) + "\n")
    (train,), (val,) = docs(f), docs(f, "val")
    assert train + val == f.read_text()
    assert train.endswith("\n") and val.startswith("line ")
    assert 0.02 < len(val) / len(f.read_text()) < 0.08
    assert docs(f, None) == [f.read_text()]


def test_directory_of_text_files_sorted_hidden_and_binary_suffixes_skipped(tmp_path):
    for name in ["b.txt", "a.md", "sub/c.py", ".git/HEAD.txt", "__pycache__/x.py", "img.png", "sub/d.jsonl"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"text of {name}\n" * 50 if not name.endswith("jsonl") else json.dumps({"text": "jsonl doc"}))
    got = docs(tmp_path, None)
    assert got == [
        (tmp_path / "a.md").read_text(),
        (tmp_path / "b.txt").read_text(),
        (tmp_path / "sub/c.py").read_text(),
        "jsonl doc",
    ]
    # fewer than 20 documents: each one's tail is validation, the rest train, nothing shared or lost
    train, val = docs(tmp_path), docs(tmp_path, "val")
    assert [t + v for t, v in zip(train, val)][:3] == got[:3]


def test_directory_with_many_documents_splits_every_20th(tmp_path):
    for i in range(45):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    assert docs(tmp_path, "val") == ["document 19\n", "document 39\n"]
    assert len(docs(tmp_path)) == 43


def test_jsonl_strings_and_objects(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "first"}\n\n"second"\n{"text": "third", "id": 3}\n')
    assert docs(f, None) == ["first", "second", "third"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{not json\n', ":2: not valid JSON"),
        ('{"body": "no text field"}\n', "'text' string field"),
        ('{"text": 5}\n', "'text' string field"),
        ("[1, 2]\n", "'text' string field"),
    ],
)
def test_jsonl_bad_lines(tmp_path, content, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(NanosaeError, match=message):
        docs(f, None)


def test_jsonl_not_utf8(tmp_path):
    f = tmp_path / "latin.jsonl"
    f.write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(NanosaeError, match="UTF-8"):
        docs(f, None)


def test_parquet_shard_read_by_row_group(tmp_path):
    texts = [f"row {i}" for i in range(50)]
    f = write_parquet(tmp_path / "shard_00000.parquet", texts[:25] + [None] + texts[25:], row_group_size=7)
    assert pq.ParquetFile(f).num_row_groups > 1
    assert docs(f, None) == texts  # nulls are skipped
    assert docs(f, "val") == ["row 19", "row 39"]


def test_parquet_directory_last_shard_is_val(tmp_path):
    for i in range(3):
        write_parquet(tmp_path / f"shard_{i:05d}.parquet", [f"shard {i} row {j}" for j in range(4)])
    (tmp_path / "notes.txt").write_text("ignored: parquet shards take precedence")
    assert docs(tmp_path) == [f"shard {i} row {j}" for i in range(2) for j in range(4)]
    assert docs(tmp_path, "val") == [f"shard 2 row {j}" for j in range(4)]
    assert len(docs(tmp_path, None)) == 12


def test_parquet_bad_inputs(tmp_path):
    with pytest.raises(NanosaeError, match="no 'text' column"):
        docs(write_parquet(tmp_path / "a.parquet", ["x"], column="content"), None)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(NanosaeError, match="not strings"):
        docs(tmp_path / "b.parquet", None)
    (tmp_path / "c.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(NanosaeError, match="cannot read as parquet"):
        docs(tmp_path / "c.parquet", None)


def test_bad_sources(tmp_path):
    with pytest.raises(NanosaeError, match="not found"):
        docs(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NanosaeError, match="no .parquet, .jsonl or text files"):
        docs(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(NanosaeError, match="binary"):
        docs(tmp_path / "weights.bin")
    with pytest.raises(NanosaeError, match="unknown split"):
        docs(None, "test")


def test_source_fingerprint_tracks_content(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    first = data.source_fingerprint(tmp_path)
    assert data.source_fingerprint(tmp_path) == first
    f.write_text("one two")
    assert data.source_fingerprint(tmp_path) != first
    assert data.source_fingerprint(None) == data.source_fingerprint("builtin") != first


# --- tokens -------------------------------------------------------------------------------------------------


def test_token_rows_bos_prefixed_and_lossless(tok, tmp_path):
    texts = ["short one", "a much longer document " * 40, "x", "the end of it all " * 3]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(t) + "\n" for t in texts))
    bos = tok.bos_token_id
    rows = list(data.token_rows(tok, f, 16, split=None))
    assert rows and all(len(r) == 16 and r[0] == bos for r in rows)
    # the packed stream is every document after its own BOS; continuations get an extra BOS at the row start
    stream = [t for d in texts for t in [bos] + tok.encode(d)]
    packed = [t for r in rows for t in r]
    rebuilt, i = [], 0
    for r in rows:
        body = r[1:] if stream[i] != bos else r  # a continuation row: its leading BOS is not in the stream
        rebuilt += body
        i += len(body)
    assert rebuilt == stream[: len(rebuilt)]
    assert len(stream) - len(rebuilt) < 16  # only the tail that does not fill a row is dropped
    assert packed.count(bos) > len(texts)  # the long document was continued across rows


def test_token_batches_and_repeat(tok, tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("hello world, this is a tiny corpus.\n" * 20)
    once = list(data.token_batches(tok, f, 2, 32, split=None))
    assert all(b.shape == (2, 32) and b.dtype == torch.long for b in once)
    assert (torch.cat(once)[:, 0] == tok.bos_token_id).all()
    stream = data.token_batches(tok, f, 2, 32, split=None, repeat=True)
    many = [next(stream) for _ in range(3 * len(once))]  # cycles past the end of the source
    assert torch.equal(many[0], once[0])
    with pytest.raises(NanosaeError, match="too little text"):
        next(data.token_batches(tok, f, 1, 100_000, split=None, repeat=True))


def test_token_tensor(tok):
    t = data.token_tensor(tok, None, 65, "val", max_rows=10)
    assert t.shape == (10, 65) and (t[:, 0] == tok.bos_token_id).all()
    assert torch.equal(t[:4], data.token_tensor(tok, None, 65, "val", max_rows=4))


def test_token_bad_arguments(tok):
    with pytest.raises(NanosaeError, match="seq_len"):
        next(data.token_rows(tok, None, 1))
    with pytest.raises(NanosaeError, match="batch_size"):
        next(data.token_batches(tok, None, 0, 16))


def test_chat_source_is_the_sft_rendering_and_joined_sources_alternate(tok, tmp_path):
    user = tok.encode_special("<|user_start|>")
    rows = list(itertools.islice(data.token_rows(tok, "chat", 64, "val"), 40))
    stream = [t for c in data.chat_conversations("val") for t in tok.render_conversation(c)[0]]
    assert rows[0] == stream[:64]  # the held-out conversations as the SFT renders them, packed like documents
    assert all(len(r) == 64 and r[0] == tok.bos_token_id for r in rows)
    f = tmp_path / "a.txt"
    f.write_text("plain text without any chat tokens, said over and over. " * 60)
    text_rows = list(data.token_rows(tok, f, 64, None))
    joined = list(data.token_rows(tok, f"{f}+chat", 64, None))
    n = len(text_rows)
    chat_rows = list(itertools.islice(data.token_rows(tok, "chat", 64, None), n + 1))
    assert joined[: 2 * n] == [r for pair in zip(text_rows, chat_rows) for r in pair]  # a row of each in turn
    assert any(user in r for r in chat_rows) and not any(user in r for r in text_rows)
    assert len(joined) > 2 * n  # the text ran out first; the chat rows went on alone
    with pytest.raises(NanosaeError, match="token rows"):
        docs("builtin+chat")
